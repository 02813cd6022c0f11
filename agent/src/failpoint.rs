//! Fail points at the steps a crash can interrupt. Tests arm one in-process
//! (the operation then fails there with an error, leaving on disk exactly what
//! a crash would), or name them in `VMREPLICA_FAILPOINTS` to make a real agent
//! process abort there.
//!
//! Only with the `failpoints` cargo feature, which the test command enables:
//! without it (release builds) [`fail_point!`] and [`fail_point_armed!`]
//! expand to nothing, so no fail point, its name, or the environment
//! lookup is in the binary.

#[cfg(feature = "failpoints")]
use std::{collections::HashSet, io, sync::Mutex};

#[cfg(feature = "failpoints")]
static ARMED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
#[cfg(feature = "failpoints")]
static ONCE: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[cfg(feature = "failpoints")]
/// Arms `name` to fire at its next hit only.
pub fn arm_once(name: &str) {
    ONCE.lock().unwrap_or_else(|p| p.into_inner()).push(name.to_owned());
}

#[cfg(feature = "failpoints")]
/// Arms `name` in this process.
pub fn arm(name: &str) {
    ARMED.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashSet::new).insert(name.to_owned());
}

#[cfg(feature = "failpoints")]
/// Disarms every fail point of this process.
pub fn disarm_all() {
    *ARMED.lock().unwrap_or_else(|p| p.into_inner()) = None;
    ONCE.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

#[cfg(feature = "failpoints")]
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

/// At a fail point named `$name`: returns `Err($map(io_error))` from the
/// enclosing function when armed (see the module docs); nothing at all
/// without the `failpoints` feature.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! fail_point {
    ($name:literal, $map:expr) => {
        $crate::failpoint::hit($name).map_err($map)?
    };
}

/// See the `failpoints` variant.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! fail_point {
    ($name:literal, $map:expr) => {};
}

/// Whether the fail point `$name` is armed (a test hook that changes what
/// is done rather than failing); always `false` without the `failpoints` feature.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! fail_point_armed {
    ($name:literal) => {
        $crate::failpoint::hit($name).is_err()
    };
}

/// See the `failpoints` variant.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! fail_point_armed {
    ($name:literal) => {
        false
    };
}
