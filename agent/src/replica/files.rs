//! The files of a replica directory: opening without following symlinks,
//! durable directory updates, and listing segments and undo files by the
//! sequence their names start with.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufReader},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use super::{Result, io_at};
use crate::log::{FormatError, SegmentHeader, SegmentReader, format::SealInfo};

pub(super) fn open_nofollow(path: &Path, write: bool, create_new: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .create_new(create_new)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

pub(super) fn seq_files(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io_at(dir))? {
        let path = e.map_err(io_at(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(seq) = name.strip_suffix(ext).and_then(|n| n.parse::<u64>().ok()) {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Complete undo files (`<seq>.undo`, or `<seq>.f<n>.undo` for folds) with the
/// sequence their name starts with.
pub(super) fn undo_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io_at(dir))? {
        let path = e.map_err(io_at(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(seq) = name.strip_suffix(".undo").and_then(|n| n.split('.').next()?.parse::<u64>().ok()) {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

pub(super) fn open_reader(path: &Path) -> Result<SegmentReader<BufReader<File>>, FormatError> {
    let f = open_nofollow(path, false, false)?;
    SegmentReader::new(BufReader::with_capacity(1 << 20, f))
}

pub(super) fn verify_file(path: &Path) -> Result<(SegmentHeader, SealInfo), FormatError> {
    open_reader(path)?.read_to_seal()
}
