//! Fail points at the steps a crash can interrupt. Tests arm one in-process
//! (the operation then fails there with an error, leaving on disk exactly what
//! a crash would), or name them in `VMREPLICA_FAILPOINTS` to make a real agent
//! process abort there.

use std::{collections::HashSet, io, sync::Mutex};

static ARMED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static ONCE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Arms `name` to fire at its next hit only.
pub fn arm_once(name: &str) {
    ONCE.lock().unwrap_or_else(|p| p.into_inner()).push(name.to_owned());
}

/// Arms `name` in this process.
pub fn arm(name: &str) {
    ARMED.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashSet::new).insert(name.to_owned());
}

/// Disarms every fail point of this process.
pub fn disarm_all() {
    *ARMED.lock().unwrap_or_else(|p| p.into_inner()) = None;
    ONCE.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// Called at a fail point: errors if armed in-process, aborts if named in the environment.
pub fn hit(name: &str) -> io::Result<()> {
    if std::env::var("VMREPLICA_FAILPOINTS").is_ok_and(|v| v.split(',').any(|n| n == name)) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
    let mut once = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = once.iter().position(|n| n == name) {
        once.remove(i);
        return Err(io::Error::other(format!("failpoint {name}")));
    }
    drop(once);
    if ARMED.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|s| s.contains(name)) {
        return Err(io::Error::other(format!("failpoint {name}")));
    }
    Ok(())
}
