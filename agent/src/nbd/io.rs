//! Pieces every NBD connection uses: a reader with a deadline, a counted
//! slot, and the protocol's big-endian numbers.

use std::{
    io::{self, BufRead, Read},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

/// Counts a connection while it lives.
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes one of `limit` slots of `count`, if one is free.
    pub fn take(count: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A reader whose reads fail once `deadline` passes; the socket's read
/// timeout (a tick) wakes a blocked read so the deadline is seen. Without a
/// deadline, a read that times out is simply tried again.
pub struct Timed<R> {
    pub inner: R,
    pub deadline: Option<Instant>,
}

impl<R: Read> Read for Timed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if self.deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "the client stalled"));
                    }
                }
                other => return other,
            }
        }
    }
}

impl<R: BufRead> Timed<R> {
    /// Waits, however long, for the first byte of the next request; `false`
    /// at the end of the stream.
    pub fn wait_for_request(&mut self) -> io::Result<bool> {
        loop {
            match self.inner.fill_buf() {
                Ok(b) => return Ok(!b.is_empty()),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

pub fn protocol(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
