//! What `replica.json` holds, and how it is read and written: a versioned
//! file, replaced atomically, checked before use. Where a replica stands in
//! its life is one [`Lifecycle`] value, not a set of flags that could
//! contradict each other.
//!
//! ```text
//!  AwaitingCopy ──copy durable──▶ CommittingCopy ──image replaced──▶ Receiving ◀──▶ Finalized(last)
//!        ▲                                                              │ ▲ │           │
//!        │                                             Resync begins ──▶│ │ └─ promote ─┴─▶ Promoted
//!        │                                   Resyncing{next_seq} ───────┘ │ (finished)
//!        └── opened again ── Removed{by primary | at replica} ◀───────────┘
//! ```
//! Version 1 files (before the lifecycle was one field) are read and
//! migrated; a newer version than this agent knows is refused by name.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{ReplicaError, Result, io_at};
use crate::log::format::MAX_SEQ;

/// The `replica.json` format this agent writes (3: with its checksum).
pub const STATE_VERSION: u32 = 3;

/// How `replica.json` ends: its CRC32C, over the file as it would be without
/// this member, is the last member, so the file stays JSON a person can read.
const CHECKSUM_HEAD: &[u8] = b",\n  \"checksum\": \"crc32c:";
const CHECKSUM_TAIL: &[u8] = b"\"\n}";
const CHECKSUM_LEN: usize = CHECKSUM_HEAD.len() + 8 + CHECKSUM_TAIL.len();

/// The file `body` (pretty JSON of an object) with its checksum member.
fn with_checksum(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&body);
    assert!(body.ends_with(b"\n}"), "pretty JSON of an object ends with a closing brace");
    body.truncate(body.len() - 2);
    body.extend_from_slice(CHECKSUM_HEAD);
    body.extend_from_slice(format!("{crc:08x}").as_bytes());
    body.extend_from_slice(CHECKSUM_TAIL);
    body
}

/// Checks the checksum member of `bytes`: `Ok(false)` when there is none
/// (files of versions 1 and 2), an error when it does not match.
fn verify_checksum(bytes: &[u8]) -> std::result::Result<bool, String> {
    let Some(at) = bytes.len().checked_sub(CHECKSUM_LEN) else { return Ok(false) };
    let (body, member) = bytes.split_at(at);
    if !member.starts_with(CHECKSUM_HEAD) || !member.ends_with(CHECKSUM_TAIL) {
        return Ok(false);
    }
    let hex = &member[CHECKSUM_HEAD.len()..CHECKSUM_HEAD.len() + 8];
    let want = std::str::from_utf8(hex).ok().and_then(|h| u32::from_str_radix(h, 16).ok());
    let mut original = body.to_vec();
    original.extend_from_slice(b"\n}");
    match want {
        Some(w) if w == crc32c::crc32c(&original) => Ok(true),
        _ => Err("checksum mismatch: the file changed on disk after it was written (damage at rest)".into()),
    }
}

/// Largest disk a replica accepts (64 TiB, VHDX's limit too).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// The replica side's recovery history settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Every point newer than this is kept (default one hour).
    pub window_ms: u64,
    /// Hourly points kept beyond the window (default 24, up to 168).
    pub hourly: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self { window_ms: 3_600_000, hourly: 24 }
    }
}

/// How a recovery point came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointKind {
    Standard,
    Hourly,
    ApplicationConsistent,
}

/// One recovery point: the image as it was after applying sequence `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    pub seq: u64,
    /// When the primary sealed the segment ending here (ms since the epoch).
    pub time_ms: u64,
    pub kind: PointKind,
    /// Undo file (in `undo/`) that takes this point back to the previous one;
    /// `None` for the oldest point.
    pub undo: Option<String>,
    /// Further undo files to apply after `undo` on the way back, newest
    /// first: what a resync between the two points overwrote (see
    /// [`ReplicaState::bridge`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
}

impl Point {
    /// The undo files from this point back to the previous one, in the order they apply.
    pub fn undo_files(&self) -> impl Iterator<Item = &String> {
        self.undo.iter().chain(&self.chain)
    }
}

/// Where replication resumes after an initial copy (see [`super::ReplicaDisk::finish_copy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyCommit {
    pub next_seq: u64,
    pub consistent_from: u64,
    pub epoch: u64,
}

/// Where a replica stands in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "camelCase")]
pub enum Lifecycle {
    /// Created; no initial copy has landed yet (or a new one is awaited).
    #[default]
    AwaitingCopy,
    /// A received copy is durable in `incoming/` and replaces the image.
    CommittingCopy { commit: CopyCommit },
    /// Receiving and applying the primary's segments.
    Receiving,
    /// Planned failover: the primary stopped writing after `last_seq`.
    #[serde(rename_all = "camelCase")]
    Finalized { last_seq: u64 },
    /// This copy is the VM's disk now; nothing more is received.
    Promoted,
    /// Replication was removed (by the primary, or at this replica site);
    /// the disk and points stay.
    #[serde(rename_all = "camelCase")]
    Removed { at_replica: bool },
    /// A resync is bringing the image to the primary's (resync.rs): not
    /// consistent until one finishes; replication then resumes at `next_seq`.
    /// The newest point stays recoverable through `bridge`.
    #[serde(rename_all = "camelCase")]
    Resyncing { next_seq: u64, epoch: u64 },
}

/// What `replica.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaState {
    /// The file's format ([`STATE_VERSION`] when written by this agent).
    #[serde(default = "version_one")]
    pub version: u32,
    pub vm_id: String,
    pub disk_id: String,
    pub disk_size: u64,
    pub epoch: u64,
    /// Trust group of the authorisation that created this replica.
    pub trust_group: String,
    /// The primary server name that created it.
    pub primary: String,
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// Points ending before this sequence are not crash-consistent (the initial
    /// copy was read while the VM kept writing).
    pub consistent_from: u64,
    pub received_through: u64,
    pub applied_through: u64,
    pub points: Vec<Point>,
    /// What was applied, for the replica side's statistics.
    #[serde(default)]
    pub stats: ApplyStats,
    /// The VM's own recovery history, as its primary last sent it; `None`:
    /// the site's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Policy>,
    /// Reverse replication onto the old primary: its own disk is the image
    /// (set by this agent, never from the wire). `None`: `disk.img` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// Extended replication: applied segments are kept in `forward/` until
    /// the extended replica acknowledges them, instead of being deleted.
    #[serde(default)]
    pub forward: bool,
    /// The primary's replication interval, as it last said (0: not said).
    #[serde(default)]
    pub primary_interval_seconds: u32,
    /// Initial copies received so far (each starts a new history).
    #[serde(default)]
    pub copies: u64,
    /// Undo files of what changed since the newest point without making a
    /// point (resync batches, and segments before `consistent_from` after
    /// one), oldest first: applied newest first, they take the image back to
    /// the newest point. The next point takes them over as its `chain`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bridge: Vec<String>,
    /// Resync batches ever applied here (names their undo files uniquely).
    #[serde(default)]
    pub resync_batches: u64,
    /// Resyncs finished here.
    #[serde(default)]
    pub resyncs: u64,
    /// Extended replication: which of those the extended replica holds a
    /// copy of; another one arriving means it needs a new copy too.
    #[serde(default)]
    pub forwarded_copy: u64,
    /// What this image held before a resync brought it onto another
    /// history (the old primary's writes that never reached the side that
    /// took the VM over): kept, listed and materialisable until pruned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged: Option<Diverged>,
    /// A received segment was found damaged before it was applied and set
    /// aside: the log can no longer bring this replica up to date, and the
    /// primary is told to resynchronise it (cleared when a resync finishes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resync_wanted: bool,
}

/// The state before a resync of another history (see
/// [`ReplicaState::diverged`]). While `file` is `None` it is reached from
/// the image like a point older than every point: the bridge, then every
/// point's undo files, newest first (the oldest point's undo leads to it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Diverged {
    /// The last sequence of the log it ends, in its own history.
    pub seq: u64,
    /// That history's epoch.
    pub epoch: u64,
    /// When it was set aside (ms since the epoch).
    pub time_ms: u64,
    /// Written out as a file of its own (under `materialized/`) before the
    /// image was promoted and could change without undo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

fn version_one() -> u32 {
    1
}

/// How version 1 of `replica.json` said where a replica stood.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LegacyFlags {
    #[serde(default)]
    has_copy: bool,
    #[serde(default)]
    removed: bool,
    #[serde(default)]
    removed_at_replica: bool,
    #[serde(default)]
    primary_final_seq: Option<u64>,
    #[serde(default)]
    promoted: bool,
}

impl LegacyFlags {
    fn lifecycle(&self) -> Lifecycle {
        match self {
            LegacyFlags { promoted: true, .. } => Lifecycle::Promoted,
            LegacyFlags { removed: true, removed_at_replica, .. } => {
                Lifecycle::Removed { at_replica: *removed_at_replica }
            }
            LegacyFlags { has_copy: false, .. } => Lifecycle::AwaitingCopy,
            LegacyFlags { primary_final_seq: Some(last_seq), .. } => {
                Lifecycle::Finalized { last_seq: *last_seq }
            }
            LegacyFlags { .. } => Lifecycle::Receiving,
        }
    }
}

/// Counters of applied segments (kept in `replica.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyStats {
    pub segments: u64,
    pub bytes: u64,
    pub max_segment_bytes: u64,
    /// Of `bytes`, how many were written with O_DIRECT (aligned writes on a
    /// filesystem that allows it); the rest went through the page cache.
    #[serde(default)]
    pub direct_bytes: u64,
    /// When the newest applied segment was sealed on the primary.
    pub last_sealed_unix_ms: u64,
}

impl ReplicaState {
    /// A new replica's state, waiting for its initial copy.
    pub fn new(
        vm_id: &str,
        disk_id: &str,
        disk_size: u64,
        epoch: u64,
        trust_group: &str,
        primary: &str,
    ) -> Self {
        Self {
            version: STATE_VERSION,
            vm_id: vm_id.to_owned(),
            disk_id: disk_id.to_owned(),
            disk_size,
            epoch,
            trust_group: trust_group.to_owned(),
            primary: primary.to_owned(),
            ..Default::default()
        }
    }

    /// An initial copy has landed (and replication may have moved on since).
    pub fn has_copy(&self) -> bool {
        matches!(
            self.lifecycle,
            Lifecycle::Receiving
                | Lifecycle::Finalized { .. }
                | Lifecycle::Promoted
                | Lifecycle::Resyncing { .. }
        ) || matches!(self.lifecycle, Lifecycle::Removed { .. }) && self.copies > 0
    }

    /// Replication was removed, by either side.
    pub fn removed(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Removed { .. })
    }

    /// Replication was removed at this (the replica) site.
    pub fn removed_at_replica(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Removed { at_replica: true })
    }

    pub fn promoted(&self) -> bool {
        self.lifecycle == Lifecycle::Promoted
    }

    /// Planned failover: the primary's final sequence, once it finished.
    pub fn primary_final_seq(&self) -> Option<u64> {
        match self.lifecycle {
            Lifecycle::Finalized { last_seq } => Some(last_seq),
            _ => None,
        }
    }

    /// Checks what `replica.json` says before it is used: the numbers a
    /// damaged or hand-edited file could carry that arithmetic relies on.
    fn check(&self) -> std::result::Result<(), String> {
        let bad = |field: &str, v: u64| Err(format!("{field} {v} is out of range"));
        if self.disk_size == 0 || self.disk_size > MAX_DISK_SIZE {
            return bad("diskSize", self.disk_size);
        }
        if self.epoch > MAX_SEQ {
            return bad("epoch", self.epoch);
        }
        if self.received_through > MAX_SEQ {
            return bad("receivedThrough", self.received_through);
        }
        if self.applied_through > self.received_through {
            return bad("appliedThrough (beyond receivedThrough)", self.applied_through);
        }
        if self.consistent_from > MAX_SEQ + 1 {
            return bad("consistentFrom", self.consistent_from);
        }
        if let Some(p) = self.points.iter().find(|p| p.seq > self.applied_through) {
            return bad("a recovery point's seq (beyond appliedThrough)", p.seq);
        }
        if let Lifecycle::CommittingCopy { commit: c } = self.lifecycle
            && (c.next_seq == 0 || c.next_seq > MAX_SEQ || c.consistent_from < c.next_seq)
        {
            return bad("lifecycle.commit.nextSeq", c.next_seq);
        }
        Ok(())
    }
}

/// Reads `dir/replica.json`: `None` when there is none; an error naming the
/// file when it is unreadable, of an unknown version, or out of range.
pub fn load(dir: &Path) -> Result<Option<ReplicaState>> {
    let path = dir.join("replica.json");
    let bad = |why: String| ReplicaError::BadState { path: path.clone(), why };
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReplicaError::Io { path, source: e }),
    };
    let checked = verify_checksum(&bytes).map_err(&bad)?;
    let mut state: ReplicaState = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if state.version >= 3 && !checked {
        return Err(bad("no checksum where this format has one: damaged at rest".into()));
    }
    match state.version {
        1 => {
            let legacy: LegacyFlags = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
            state.lifecycle = legacy.lifecycle();
            state.version = STATE_VERSION;
        }
        // Version 2 differs only in having no checksum: it gets one when
        // next stored.
        2 => state.version = STATE_VERSION,
        STATE_VERSION => {}
        v if v > STATE_VERSION => {
            return Err(bad(format!(
                "format version {v} is newer than this agent reads ({STATE_VERSION}): run a newer agent"
            )));
        }
        v => return Err(bad(format!("format version {v} does not exist"))),
    }
    state.check().map_err(bad)?;
    Ok(Some(state))
}

/// Replaces `dir/replica.json` with `s`, durably.
pub fn store(dir: &Path, s: &ReplicaState) -> Result<()> {
    let body = with_checksum(
        serde_json::to_vec_pretty(&ReplicaState { version: STATE_VERSION, ..s.clone() })
            .expect("state serialises"),
    );
    crate::failpoint::io("io.replica.state")
        .and_then(|()| crate::log::dirty::replace_durably(dir, "replica.json", &body))
        .map_err(io_at(&dir.join("replica.json")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_one_files_migrate_and_unknown_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = serde_json::json!({
            "vmId": "ns.vm", "diskId": "root", "diskSize": 1024, "epoch": 1, "trustGroup": "g",
            "primary": "h", "hasCopy": true, "consistentFrom": 1, "receivedThrough": 9, "appliedThrough": 9,
            "points": [], "primaryFinalSeq": 9,
        });
        fs::write(dir.path().join("replica.json"), v1.to_string()).unwrap();
        let s = load(dir.path()).unwrap().unwrap();
        assert_eq!((s.version, s.lifecycle), (STATE_VERSION, Lifecycle::Finalized { last_seq: 9 }));
        store(dir.path(), &s).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("replica.json")).unwrap()).unwrap();
        assert_eq!(written["version"], 3);
        assert_eq!(written["lifecycle"], serde_json::json!({"stage": "finalized", "lastSeq": 9}));
        assert!(written.get("hasCopy").is_none(), "the flags are gone: {written}");
        assert_eq!(load(dir.path()).unwrap().unwrap(), s);

        // Version 2 (no checksum) loads as it is, and is stored with one.
        let mut v2 = written.clone();
        v2["version"] = serde_json::json!(2);
        v2.as_object_mut().unwrap().remove("checksum");
        fs::write(dir.path().join("replica.json"), serde_json::to_vec_pretty(&v2).unwrap()).unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap(), s, "version 2 loads");

        let mut v4 = written.clone();
        v4["version"] = serde_json::json!(4);
        fs::write(dir.path().join("replica.json"), with_checksum(serde_json::to_vec_pretty(&v4).unwrap()))
            .unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("replica.json") && err.contains("version 4"), "{err}");
        fs::write(dir.path().join("replica.json"), b"{not json").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("replica.json") && err.contains("unreadable"), "{err}");
    }

    /// Every single flipped bit of a stored `replica.json` (values, names,
    /// punctuation, the checksum itself) is refused when it is loaded,
    /// naming the file; the file as written loads back equal.
    #[test]
    fn a_bit_flipped_anywhere_in_replica_json_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ReplicaState::new("ns.vm", "root", 1 << 30, 2, "g", "host1.site-a.example.com");
        s.lifecycle = Lifecycle::Receiving;
        (s.received_through, s.applied_through, s.consistent_from) = (4711, 4700, 12);
        s.points.push(Point {
            seq: 4700,
            time_ms: 1_800_000_000_000,
            kind: PointKind::Standard,
            undo: Some("00000000000000004690.undo".into()),
            chain: vec![],
        });
        s.bridge.push("00000000000000004701.undo".into());
        store(dir.path(), &s).unwrap();
        let path = dir.path().join("replica.json");
        let good = fs::read(&path).unwrap();
        assert_eq!(load(dir.path()).unwrap().unwrap(), ReplicaState { version: STATE_VERSION, ..s });
        for at in 0..good.len() {
            for bit in [0, 3, 6] {
                let mut bad = good.clone();
                bad[at] ^= 1 << bit;
                fs::write(&path, &bad).unwrap();
                let err = load(dir.path()).err().unwrap_or_else(|| {
                    panic!("bit {bit} of byte {at} ({:?}) flipped went unnoticed", good[at] as char)
                });
                assert!(err.to_string().contains("replica.json"), "{err}");
            }
        }
        // Cut short, or with the checksum member gone: refused too.
        fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(load(dir.path()).is_err());
        let text = String::from_utf8(good).unwrap();
        let without = text[..text.rfind(",\n  \"checksum\"").unwrap()].to_owned() + "\n}";
        fs::write(&path, without).unwrap();
        assert!(load(dir.path()).unwrap_err().to_string().contains("no checksum"));
    }

    #[test]
    fn each_legacy_combination_maps_to_one_stage() {
        let f = |has_copy, removed, at_replica, final_seq, promoted| {
            LegacyFlags {
                has_copy,
                removed,
                removed_at_replica: at_replica,
                primary_final_seq: final_seq,
                promoted,
            }
            .lifecycle()
        };
        assert_eq!(f(false, false, false, None, false), Lifecycle::AwaitingCopy);
        assert_eq!(f(true, false, false, None, false), Lifecycle::Receiving);
        assert_eq!(f(true, false, false, Some(4), false), Lifecycle::Finalized { last_seq: 4 });
        assert_eq!(f(true, true, false, None, false), Lifecycle::Removed { at_replica: false });
        assert_eq!(f(true, true, true, None, false), Lifecycle::Removed { at_replica: true });
        assert_eq!(f(true, false, false, Some(4), true), Lifecycle::Promoted);
    }
}
