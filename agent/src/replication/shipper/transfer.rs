//! Streaming to the replica: a sealed segment in chunks (resumed by
//! sequence: a broken stream is sent again whole), and the initial copy of
//! the image, sparse-aware (holes and zero blocks are not sent). A reader
//! thread reads, compresses and rate-limits while the gRPC stream sends.

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

    /// Reads, compresses and rate-limits one chunk: `(data, compressed, raw_len)`.
    fn encode(raw: &mut [u8], compression: &AutoCompress, limits: &Limits) -> (Vec<u8>, bool, u32) {
        // Test hook: corrupt what is sent (the replica must notice).
        if fail_point_armed!("ship.tamper-chunk") && !raw.is_empty() {
            raw[raw.len() / 2] ^= 0x20;
        }
        let raw_len = raw.len() as u32;
        let (data, compressed) = match compression.encode(raw) {
            Some(c) => (c, true),
            None => (raw.to_vec(), false),
        };
        limits.bandwidth.acquire_blocking(data.len());
        (data, compressed, raw_len)
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
            let mut offset = 0u64;
            let mut wire = 0u64;
            let mut start = Some(start);
            let mut buf = vec![0u8; chunk];
            loop {
                let n = read_full(&mut file, &mut buf).map_err(read_err)?;
                if n == 0 {
                    return Ok(wire);
                }
                // Test hook: end the stream early, as a dropped connection would.
                if offset > 0 && fail_point_armed!("ship.cut-stream") {
                    return Ok(wire);
                }
                let (data, compressed, raw_len) = Self::encode(&mut buf[..n], &compression, &limits);
                wire += data.len() as u64;
                let c = SegmentChunk { start: start.take(), offset, data, compressed, raw_len };
                if tx.blocking_send(c).is_err() {
                    return Ok(wire); // the call ended; its status says why
                }
                offset += n as u64;
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
                let (data, compressed, raw_len) = Self::encode(data, &compression, &limits);
                wire += data.len() as u64;
                let c = CopyChunk {
                    start: start.take(),
                    offset: off,
                    data,
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

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
