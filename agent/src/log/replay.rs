//! Replay: bring a copy of a base image forward by a run of sealed segments.
//! Every segment is verified in full before any byte of the image changes, so a
//! damaged or out-of-order run changes nothing.

use std::{
    fs::{File, OpenOptions},
    io::BufReader,
    path::{Path, PathBuf},
};

use super::{
    apply::apply_record,
    format::{FormatError, SegmentHeader, SegmentReader},
};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is damaged and was not applied: {source}")]
    Damaged { path: PathBuf, source: FormatError },
    #[error("{path} is for {found}, the first segment for {expected}")]
    MixedDisks { path: PathBuf, expected: String, found: String },
    #[error("{path} starts at sequence {found}, but the previous segment ended at {}", .expected - 1)]
    Gap { path: PathBuf, expected: u64, found: u64 },
    #[error("{path} is of epoch {found}, older than the previous segment's {previous}")]
    EpochWentBack { path: PathBuf, previous: u64, found: u64 },
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub segments: usize,
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

fn open(path: &Path) -> Result<SegmentReader<BufReader<File>>, ReplayError> {
    let file = File::open(path).map_err(|source| ReplayError::Io { path: path.to_owned(), source })?;
    SegmentReader::new(BufReader::with_capacity(1 << 20, file))
        .map_err(|source| ReplayError::Damaged { path: path.to_owned(), source })
}

/// Verifies `segments` (in order) and, only if all verify and follow each other,
/// applies them to `image` and makes it durable.
pub fn replay(image: &Path, segments: &[PathBuf]) -> Result<ReplayReport, ReplayError> {
    let mut report = ReplayReport::default();
    let mut first: Option<SegmentHeader> = None;
    let mut next_seq = None;
    let mut epoch = 0;
    for path in segments {
        let damaged = |source| ReplayError::Damaged { path: path.clone(), source };
        let reader = open(path)?;
        let h = reader.header.clone();
        if let Some(f) = first.as_ref().filter(|f| (&f.vm_id, &f.disk_id) != (&h.vm_id, &h.disk_id)) {
            return Err(ReplayError::MixedDisks {
                path: path.clone(),
                expected: format!("{}/{}", f.vm_id, f.disk_id),
                found: format!("{}/{}", h.vm_id, h.disk_id),
            });
        }
        if let Some(expected) = next_seq.filter(|&e| e != h.first_seq) {
            return Err(ReplayError::Gap { path: path.clone(), expected, found: h.first_seq });
        }
        if h.epoch < epoch {
            return Err(ReplayError::EpochWentBack { path: path.clone(), previous: epoch, found: h.epoch });
        }
        let (_, seal) = reader.read_to_seal().map_err(damaged)?;
        report.records += seal.records;
        next_seq = Some(seal.last_seq + 1);
        epoch = h.epoch;
        if first.is_none() {
            report.first_seq = h.first_seq;
            first = Some(h);
        }
        report.last_seq = seal.last_seq;
    }
    let io = |source| ReplayError::Io { path: image.to_owned(), source };
    let file = OpenOptions::new().read(true).write(true).open(image).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    for path in segments {
        let mut reader = open(path)?;
        while let Some(r) =
            reader.next_record().map_err(|source| ReplayError::Damaged { path: path.clone(), source })?
        {
            apply_record(&file, size, &r).map_err(io)?;
        }
    }
    file.sync_all().map_err(io)?;
    report.segments = segments.len();
    Ok(report)
}
