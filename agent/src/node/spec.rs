//! What the controller asks of a node, as the node's own types: a VM to
//! protect ([`VmSpec`]) and extended replication of its replicas
//! ([`ExtendSpec`]), and the checks every request passes before anything is
//! touched (names, paths confined to the disk roots, quiesce consent).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{quiesce::Quiesce, replica::names, replication::cycle::QuiesceStatus};

/// A disk of a VM to protect: its name and raw image on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub path: String,
}

/// One VM's protection, as its VMReplication asks it (`EnableReplication`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmSpec {
    /// `<namespace>.<name>` of the VMReplication: names the replica too.
    pub vm_id: String,
    pub uid: String,
    pub generation: i64,
    pub disks: Vec<DiskSpec>,
    /// HOST:PORT of the replica site's replication server.
    pub replica_address: String,
    pub interval_seconds: u32,
    pub compression: bool,
    /// Keep logging writes but ship nothing.
    pub suspended: bool,
    /// Start the initial copy no earlier than this (ms since the Unix epoch; 0: at once).
    pub initial_replication_at_unix_ms: u64,
    /// Take an application-consistent point this often (0: never).
    pub app_consistent_interval_seconds: u32,
    pub freeze_command: Vec<String>,
    pub thaw_command: Vec<String>,
    pub guest_agent_socket: String,
    /// The recovery history the replica keeps for this VM.
    pub history_window_seconds: u64,
    pub history_hourly_points: u32,
    /// When the VM's disks may be resynchronised.
    pub resync: crate::replication::shipper::ResyncPolicy,
    /// How a replica without a copy gets one.
    pub initial: crate::replication::shipper::InitialMethod,
}

/// Extended replication of the replicas of a VM held here (A→B→C, at B).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtendSpec {
    pub vm_id: String,
    pub uid: String,
    pub generation: i64,
    /// HOST:PORT of the extended replica site's replication server.
    pub replica_address: String,
    pub interval_seconds: u32,
    pub compression: bool,
    pub history_window_seconds: u64,
    pub history_hourly_points: u32,
    /// Stop it (and drop what was kept for the extended replica).
    pub remove: bool,
}

/// A VM's disks served here: the export URIs, and the generation and epoch
/// they are served under.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Served {
    pub generation: i64,
    /// "nbd+unix:///EXPORT?socket=PATH" per disk, in the order given.
    pub exports: Vec<String>,
    pub epoch: u64,
}

/// A VM protected here, as status reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProtectedVm {
    pub vm_id: String,
    pub uid: String,
    pub generation: i64,
    pub suspended: bool,
    /// Prepared for a planned failover: read-only, no longer replicating.
    pub prepared: bool,
    /// The newer epoch that fenced it (0: not fenced).
    pub fenced_epoch: u64,
    /// How its application-consistent points go.
    pub quiesce: QuiesceStatus,
    /// Its disks as served.
    pub disks: Vec<DiskSpec>,
}

/// A disk's position at the end of a planned failover's primary part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FinalDisk {
    pub disk_id: String,
    /// The last sequence logged (0: nothing logged).
    pub last_seq: u64,
    /// The last sequence the replica acknowledged as durable.
    pub durable_through: u64,
}

/// How the guest is quiesced for application-consistent points, if ever.
pub fn quiesce(spec: &VmSpec, allow_commands: bool) -> Result<Option<(Quiesce, Duration)>, String> {
    if spec.app_consistent_interval_seconds == 0 {
        return Ok(None);
    }
    let every = Duration::from_secs(u64::from(spec.app_consistent_interval_seconds));
    match (spec.freeze_command.is_empty(), spec.thaw_command.is_empty(), spec.guest_agent_socket.as_str()) {
        (false, false, _) if !allow_commands => Err(
            "freeze/thaw commands are not allowed on this node (start the agent with --allow-quiesce-commands, \
             or use the guest agent socket)"
                .into(),
        ),
        (false, false, _) => {
            Ok(Some((Quiesce::Command { freeze: spec.freeze_command.clone(), thaw: spec.thaw_command.clone() }, every)))
        }
        (true, true, socket) if Path::new(socket).is_absolute() => {
            Ok(Some((Quiesce::GuestAgent { socket: PathBuf::from(socket) }, every)))
        }
        (true, true, "") => Err("an application-consistent interval needs a way to quiesce: freeze and thaw \
                                 commands, or the guest agent socket"
            .into()),
        (true, true, socket) => Err(format!("guest agent socket {socket:?} is not an absolute path")),
        _ => Err("give both a freeze and a thaw command".into()),
    }
}

/// Checks a spec before anything is touched; the disks' resolved paths.
pub fn check_spec(spec: &VmSpec, roots: &[PathBuf]) -> Result<Vec<(String, PathBuf)>, String> {
    names::check("vm id", &spec.vm_id).map_err(|e| e.to_string())?;
    if spec.uid.is_empty() {
        return Err("the request carries no uid".into());
    }
    if spec.disks.is_empty() {
        return Err("no disks to protect".into());
    }
    if !(1..=3600).contains(&spec.interval_seconds) {
        return Err(format!("replication interval {}s is outside 1-3600s", spec.interval_seconds));
    }
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for d in &spec.disks {
        names::check("disk name", &d.name).map_err(|e| e.to_string())?;
        if out.iter().any(|(n, _)| *n == d.name) {
            return Err(format!("disk {:?} is listed twice", d.name));
        }
        let given = Path::new(&d.path);
        if !given.is_absolute() {
            return Err(format!("disk {}: path {:?} is not absolute", d.name, d.path));
        }
        let real = given.canonicalize().map_err(|e| format!("disk {}: {}: {e}", d.name, d.path))?;
        let inside = roots.iter().filter_map(|r| r.canonicalize().ok()).any(|r| real.starts_with(&r));
        if !inside {
            let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            return Err(format!(
                "disk {}: {} is outside the directories this agent may serve ({}); move the image or \
                 start the agent with --disk-root for its directory",
                d.name,
                real.display(),
                roots.join(", ")
            ));
        }
        if !real.is_file() {
            return Err(format!("disk {}: {} is not a regular file", d.name, real.display()));
        }
        out.push((d.name.clone(), real));
    }
    // An export for external media is written by this agent: only where it may serve disks.
    if let crate::replication::shipper::InitialMethod::ExternalMedia(dir) = &spec.initial {
        let inside =
            roots.iter().any(|r| dir.starts_with(r) || r.canonicalize().is_ok_and(|c| dir.starts_with(c)));
        if !inside {
            return Err(format!(
                "initialReplication.directory {} is outside the directories this agent may write ({}); export \
                 under a --disk-root",
                dir.display(),
                roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &str) -> VmSpec {
        VmSpec {
            vm_id: "ns.vm".into(),
            uid: "u1".into(),
            generation: 1,
            disks: vec![DiskSpec { name: "root".into(), path: path.into() }],
            replica_address: "replica:9443".into(),
            interval_seconds: 30,
            compression: true,
            suspended: false,
            initial_replication_at_unix_ms: 0,
            ..Default::default()
        }
    }

    #[test]
    fn quiesce_commands_need_the_agents_consent() {
        let mut s = spec("/x");
        assert_eq!(quiesce(&s, false).unwrap(), None, "no interval, no quiesce");
        s.app_consistent_interval_seconds = 3600;
        assert!(quiesce(&s, true).unwrap_err().contains("needs a way to quiesce"));
        s.freeze_command = vec!["fsfreeze".into(), "-f".into(), "/".into()];
        s.thaw_command = vec!["fsfreeze".into(), "-u".into(), "/".into()];
        assert!(quiesce(&s, false).unwrap_err().contains("--allow-quiesce-commands"));
        assert!(
            matches!(quiesce(&s, true).unwrap(), Some((Quiesce::Command { .. }, d)) if d.as_secs() == 3600)
        );
        s.freeze_command.clear();
        s.thaw_command.clear();
        s.guest_agent_socket = "/run/qga.sock".into();
        assert!(matches!(quiesce(&s, false).unwrap(), Some((Quiesce::GuestAgent { .. }, _))));
        s.guest_agent_socket = "qga.sock".into();
        assert!(quiesce(&s, false).unwrap_err().contains("not an absolute path"));
    }

    #[test]
    fn disk_paths_are_confined_to_the_roots() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let img = root.path().join("root.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let escape = outside.path().join("secret.img");
        std::fs::write(&escape, [0u8; 512]).unwrap();
        let roots = vec![root.path().to_owned()];
        assert!(check_spec(&spec(img.to_str().unwrap()), &roots).is_ok());

        let err = check_spec(&spec(escape.to_str().unwrap()), &roots).unwrap_err();
        assert!(err.contains("outside the directories"), "{err}");
        let dotdot = format!(
            "{}/../{}/secret.img",
            root.path().display(),
            outside.path().file_name().unwrap().to_str().unwrap()
        );
        let err = check_spec(&spec(&dotdot), &roots).unwrap_err();
        assert!(err.contains("outside the directories"), "{err}");
        let link = root.path().join("link.img");
        std::os::unix::fs::symlink(&escape, &link).unwrap();
        let err = check_spec(&spec(link.to_str().unwrap()), &roots).unwrap_err();
        assert!(err.contains("outside the directories"), "symlink escape: {err}");
        let err = check_spec(&spec("relative.img"), &roots).unwrap_err();
        assert!(err.contains("not absolute"), "{err}");

        let mut bad = spec(img.to_str().unwrap());
        bad.interval_seconds = 0;
        assert!(check_spec(&bad, &roots).unwrap_err().contains("1-3600"));
        bad = spec(img.to_str().unwrap());
        bad.vm_id = "../x".into();
        assert!(check_spec(&bad, &roots).unwrap_err().contains("is not allowed"));
    }
}
