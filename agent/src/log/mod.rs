//! Replication logs: the segment format, the per-disk journal that writes it,
//! and replay/apply that read it.

pub mod apply;
pub mod dirty;
pub mod format;
pub mod journal;
pub mod replay;

pub use format::{FormatError, Record, RecordKind, SegmentHeader, SegmentReader};
pub use journal::{Journal, JournalConfig, JournalError, Logged, Recovery, SealedSegment};
