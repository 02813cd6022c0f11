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
    if hit_in_process(name) {
        return Err(io::Error::other(format!("failpoint {name}")));
    }
    Ok(())
}

/// An I/O fault point, where the agent reads, writes or syncs its files: it
/// fails with EIO as the storage below would (a failing disk, a filesystem
/// gone read-only behind the agent's back) when armed in-process, or when
/// named in the file `VMREPLICA_IO_FAULTS` points to (comma- or
/// line-separated; `name:errno` for another error, e.g. `io.log.append:28`
/// for ENOSPC), read at every hit so a test can start and stop the fault
/// while a real agent process runs. Never aborts. Without the `failpoints`
/// feature this is `Ok(())`, inlined away.
#[inline(always)]
pub fn io(#[allow(unused_variables)] name: &str) -> std::io::Result<()> {
    #[cfg(feature = "failpoints")]
    if let Some(errno) = io_armed(name) {
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(())
}

#[cfg(feature = "failpoints")]
fn io_armed(name: &str) -> Option<i32> {
    const EIO: i32 = 5;
    if let Some(path) = std::env::var_os("VMREPLICA_IO_FAULTS") {
        let listed = std::fs::read_to_string(path).unwrap_or_default();
        for item in listed.split([',', '\n']).map(str::trim) {
            let (n, errno) = item.split_once(':').unwrap_or((item, ""));
            if n == name {
                return Some(errno.parse().unwrap_or(EIO));
            }
        }
    }
    hit_in_process(name).then_some(EIO)
}

/// Whether `name` is armed in this process (an `arm_once` is used up).
#[cfg(feature = "failpoints")]
fn hit_in_process(name: &str) -> bool {
    let mut once = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = once.iter().position(|n| n == name) {
        once.remove(i);
        return true;
    }
    drop(once);
    ARMED.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|s| s.contains(name))
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
