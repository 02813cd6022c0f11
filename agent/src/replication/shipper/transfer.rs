//! Streaming to the replica: a sealed segment in chunks (resumed by
//! sequence: a broken stream is sent again whole), and the initial copy of
//! the image, sparse-aware (holes and zero blocks are not sent). A reader
//! thread reads and rate-limits while the gRPC stream sends; while zstd is
//! on, a segment's chunks are compressed on several threads, in order.

use std::{
    fs::File,
    io::{self, Read},
    os::unix::fs::FileExt,
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vmreplica_api::replication::{CopyChunk, CopyStart, SegmentChunk, SegmentStart};

use super::{ShipError, Shipper, autocompress::AutoCompress};
use crate::{fail_point_armed, image::data_extents, limits::Limits, log::SealedSegment};

/// What one chunk producer hands the gRPC stream.
type Chunks<T> = mpsc::Receiver<T>;

impl Shipper {
    /// Streams `produce`'s chunks from a blocking reader thread.
    /// The producer returns the bytes it put on the wire.
    fn spawn_producer<T: Send + 'static>(
        &self,
        produce: impl FnOnce(&mpsc::Sender<T>) -> Result<u64, ShipError> + Send + 'static,
    ) -> (Chunks<T>, tokio::task::JoinHandle<Result<u64, ShipError>>) {
        let (tx, rx) = mpsc::channel(4);
        let handle = tokio::task::spawn_blocking(move || produce(&tx));
        (rx, handle)
    }

    /// Compresses one chunk (when that pays): `(data, compressed, raw_len)`.
    fn encode(mut raw: Vec<u8>, compression: &AutoCompress) -> (Vec<u8>, bool, u32) {
        // Test hook: corrupt what is sent (the replica must notice).
        if fail_point_armed!("ship.tamper-chunk") && !raw.is_empty() {
            let mid = raw.len() / 2;
            raw[mid] ^= 0x20;
        }
        let raw_len = raw.len() as u32;
        match compression.encode(&raw) {
            Some(c) => (c, true, raw_len),
            None => (raw, false, raw_len),
        }
    }

    /// [`Self::encode`], then waits for the bandwidth limit.
    fn encode_limited(raw: Vec<u8>, compression: &AutoCompress, limits: &Limits) -> (Vec<u8>, bool, u32) {
        let encoded = Self::encode(raw, compression);
        limits.bandwidth.acquire_blocking(encoded.0.len());
        encoded
    }

    pub(super) async fn push(&self, seg: &SealedSegment) -> Result<u64, ShipError> {
        let _slot = self.limits.transfers.acquire().await;
        let start = SegmentStart {
            disk: Some(self.disk_ref()),
            first_seq: seg.first_seq,
            last_seq: seg.last_seq,
            epoch: self.epoch,
            length: seg.bytes,
        };
        let (path, chunk, compression, limits) =
            (seg.path.clone(), self.cfg.chunk_size, self.compress.clone(), self.limits.clone());
        let (rx, producer) = self.spawn_producer(move |tx| {
            let read_err = |source| ShipError::Read { what: path.display().to_string(), source };
            let mut file = File::open(&path).map_err(read_err)?;
            let mut read_error = None;
            let chunks = std::iter::from_fn(|| {
                // Read into spare capacity: the buffer is not zeroed first.
                let mut buf = Vec::with_capacity(chunk);
                match (&mut file).take(chunk as u64).read_to_end(&mut buf) {
                    Ok(0) => None,
                    Ok(_) => Some(buf),
                    Err(e) => {
                        read_error = Some(e);
                        None
                    }
                }
            });
            let (mut offset, mut wire, mut start) = (0u64, 0u64, Some(start));
            // Several threads only while compressing: otherwise a chunk is
            // only moved along.
            let threads = if compression.active() { compression_threads() } else { 1 };
            in_order(
                threads,
                chunks,
                |raw| Self::encode(raw, &compression),
                |(data, compressed, raw_len)| {
                    // Test hook: end the stream early, as a dropped connection would.
                    if offset > 0 && fail_point_armed!("ship.cut-stream") {
                        return false;
                    }
                    limits.bandwidth.acquire_blocking(data.len());
                    wire += data.len() as u64;
                    let c =
                        SegmentChunk { start: start.take(), offset, data: data.into(), compressed, raw_len };
                    offset += u64::from(raw_len);
                    // A send that fails: the call ended, and its status says why.
                    tx.blocking_send(c).is_ok()
                },
            );
            match read_error {
                Some(e) => Err(read_err(e)),
                None => Ok(wire),
            }
        });
        let call = self.client.clone().push_segment(ReceiverStream::new(rx)).await;
        let wire = producer
            .await
            .map_err(|e| ShipError::Read { what: "segment reader".into(), source: io::Error::other(e) })??;
        let ack = call?.into_inner();
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.raw_bytes_sent += seg.bytes;
        s.wire_bytes_sent += wire;
        if let Some(m) = &self.metrics {
            let [vm, disk] = self.labels();
            m.bytes_sent.with_label_values(&[vm, disk, "raw"]).inc_by(seg.bytes);
            m.bytes_sent.with_label_values(&[vm, disk, "wire"]).inc_by(wire);
        }
        Ok(ack.durable_through)
    }

    /// Sends every non-zero block of the disk; returns the sequence replication
    /// resumes at. Writes go on meanwhile and are shipped after.
    pub(super) async fn initial_copy(&self) -> Result<u64, ShipError> {
        let _slot = self.limits.transfers.acquire().await;
        // Everything logged before the cut is in the image, so the copy covers
        // it; replication resumes at the cut. (Reading next_seq after sealing
        // instead would race with writes landing in the new segment.)
        // Read before the cut: a new copy arriving at a forwarding source
        // during this one leaves the generation behind, so it is sent again.
        let generation = self.source.copy_generation();
        let next_seq = self.source.cut()?;
        let start = CopyStart {
            disk: Some(self.disk_ref()),
            disk_size: self.source.size(),
            epoch: self.epoch,
            next_seq,
        };
        let (path, size, chunk, compression, limits, source, copying) = (
            self.source.image_path(),
            self.source.size(),
            self.cfg.chunk_size,
            self.compress.clone(),
            self.limits.clone(),
            self.source.clone(),
            self.copying.clone(),
        );
        let (rx, producer) = self.spawn_producer(move |tx| {
            let read_err = |source| ShipError::Read { what: path.display().to_string(), source };
            let file = File::open(&path).map_err(read_err)?;
            let mut start = Some(start);
            let mut buf = vec![0u8; chunk];
            let mut wire = 0u64;
            let extents = data_extents(&file, size).map_err(read_err)?;
            use std::sync::atomic::Ordering::Relaxed;
            copying.0.store(0, Relaxed);
            copying.1.store(extents.iter().map(|(_, len)| len).sum(), Relaxed);
            let mut send = |off: u64, data: &mut [u8]| {
                copying.0.fetch_add(data.len() as u64, Relaxed);
                let (data, compressed, raw_len) = Self::encode_limited(data.to_vec(), &compression, &limits);
                wire += data.len() as u64;
                let c = CopyChunk {
                    start: start.take(),
                    offset: off,
                    data: data.into(),
                    compressed,
                    raw_len,
                    ..Default::default()
                };
                tx.blocking_send(c).is_ok()
            };
            if !send_runs(&file, extents, &mut buf, &mut send).map_err(read_err)? {
                return Ok(0);
            }
            let last = CopyChunk {
                start: start.take(),
                last: true,
                consistent_from: source.next_seq(),
                offset: size,
                ..Default::default()
            };
            let _ = tx.blocking_send(last);
            Ok(wire)
        });
        let call = self.client.clone().push_initial_copy(ReceiverStream::new(rx)).await;
        let produced = producer.await;
        self.copying.0.store(0, std::sync::atomic::Ordering::Relaxed);
        self.copying.1.store(0, std::sync::atomic::Ordering::Relaxed);
        let wire = produced
            .map_err(|e| ShipError::Read { what: "image reader".into(), source: io::Error::other(e) })??;
        let ack = call?.into_inner();
        self.source.copied(generation)?;
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.initial_copy_bytes += ack.bytes_received;
        s.wire_bytes_sent += wire;
        if let Some(m) = &self.metrics {
            let [vm, disk] = self.labels();
            m.initial_copy_bytes.with_label_values(&[vm, disk]).inc_by(ack.bytes_received);
            m.bytes_sent.with_label_values(&[vm, disk, "wire"]).inc_by(wire);
        }
        Ok(ack.next_seq)
    }
}

/// Sends the image's data as runs of non-zero 64 KiB blocks, up to a chunk
/// (`buf`'s length) each: holes and zero blocks inside allocated extents are
/// not sent. False when `send` reports the receiver gone.
fn send_runs(
    file: &File,
    extents: Vec<(u64, u64)>,
    buf: &mut [u8],
    send: &mut impl FnMut(u64, &mut [u8]) -> bool,
) -> io::Result<bool> {
    const BLOCK: u64 = 64 << 10;
    let chunk = buf.len();
    let mut run_start = 0u64;
    let mut run_len = 0usize;
    for (ext_off, ext_len) in extents {
        let mut off = ext_off;
        while off < ext_off + ext_len {
            let n = (ext_off + ext_len - off).min(BLOCK) as usize;
            let at = if run_len > 0 && run_start + run_len as u64 == off && run_len + n <= chunk {
                run_len
            } else {
                if run_len > 0 && !send(run_start, &mut buf[..run_len]) {
                    return Ok(false);
                }
                run_start = off;
                run_len = 0;
                0
            };
            file.read_exact_at(&mut buf[at..at + n], off)?;
            if buf[at..at + n].iter().any(|&b| b != 0) {
                run_len = at + n;
            } else if run_len > 0 {
                if !send(run_start, &mut buf[..run_len]) {
                    return Ok(false);
                }
                run_len = 0;
            }
            off += n as u64;
        }
    }
    Ok(run_len == 0 || send(run_start, &mut buf[..run_len]))
}

/// Threads compressing one transfer's chunks.
fn compression_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// Maps `items` through `f` on `threads` threads and hands the results to
/// `out` in the items' order, until `out` says stop. Item `i` goes to thread
/// `i % threads`, so the oldest result outstanding is always the next one of
/// the thread the next item goes to.
fn in_order<I: Send, O: Send>(
    threads: usize,
    items: impl Iterator<Item = I>,
    f: impl Fn(I) -> O + Sync,
    mut out: impl FnMut(O) -> bool,
) {
    if threads <= 1 {
        for item in items {
            if !out(f(item)) {
                return;
            }
        }
        return;
    }
    std::thread::scope(|scope| {
        let f = &f;
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (to_worker, inbox) = std::sync::mpsc::sync_channel::<I>(1);
                let (outbox, from_worker) = std::sync::mpsc::sync_channel::<O>(1);
                let work = move || {
                    for item in inbox {
                        if outbox.send(f(item)).is_err() {
                            return;
                        }
                    }
                };
                std::thread::Builder::new()
                    .name("ship-encode".into())
                    .spawn_scoped(scope, work)
                    .expect("a thread for compression");
                (to_worker, from_worker)
            })
            .collect();
        // Items `next .. next + outstanding` are with the threads.
        let (mut next, mut outstanding) = (0usize, 0usize);
        let mut take_oldest = |next: &mut usize| {
            let o = workers[*next % threads].1.recv();
            *next += 1;
            o.is_ok_and(&mut out)
        };
        for (i, item) in items.enumerate() {
            if outstanding == threads {
                outstanding -= 1;
                if !take_oldest(&mut next) {
                    return;
                }
            }
            if workers[i % threads].0.send(item).is_err() {
                return;
            }
            outstanding += 1;
        }
        for _ in 0..outstanding {
            if !take_oldest(&mut next) {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::in_order;

    #[test]
    fn results_come_in_the_items_order_and_a_stop_stops() {
        for threads in 1..=4 {
            // Uneven work, so that later items often finish first.
            let slow = |i: u64| {
                std::thread::sleep(std::time::Duration::from_micros((i * 7919) % 13 * 50));
                i * i
            };
            let mut got = Vec::new();
            in_order(threads, 0..50u64, slow, |o| {
                got.push(o);
                true
            });
            assert_eq!(got, (0..50u64).map(|i| i * i).collect::<Vec<_>>(), "{threads} threads");
            let mut taken = 0;
            in_order(threads, 0..50u64, slow, |_| {
                taken += 1;
                taken < 5
            });
            assert_eq!(taken, 5, "{threads} threads");
        }
    }
}
