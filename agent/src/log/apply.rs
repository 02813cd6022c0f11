//! Applying records to an image: the one place a log record changes a disk,
//! shared by crash recovery (redo), replay, and later the replica's apply.

use std::{fs::File, io, os::unix::fs::FileExt};

use super::format::{Record, RecordKind};
use crate::image::zero_range;

/// Applies one data record. Idempotent: applying a record twice, or a sequence of
/// records again from its start, gives the same bytes.
pub fn apply_record(image: &File, image_size: u64, r: &Record) -> io::Result<()> {
    check_bounds(image_size, r)?;
    match r.kind {
        RecordKind::Write => image.write_all_at(&r.payload, r.offset),
        RecordKind::WriteZeroes | RecordKind::Trim => zero_range(image, r.offset, r.length, false),
        RecordKind::Seal => Ok(()),
    }
}

/// Refuses a record that reaches past the end of the image.
pub fn check_bounds(image_size: u64, r: &Record) -> io::Result<()> {
    let end = r.offset.checked_add(r.length);
    if end.is_none_or(|e| e > image_size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("record {} reaches past the end of the {image_size}-byte image", r.seq),
        ));
    }
    Ok(())
}
