//! Resynchronisation, the primary's side (DESIGN step 6): after the log is
//! cut (later writes are logged and shipped after), this disk's image is
//! hashed window by window on a thread of its own and offered to the
//! replica top-down; only the leaves it says differ are read again and sent.
//! With a dirty map the replica can trust, only the dirty blocks are read
//! and offered (their leaf hashes, straight away), and nothing else is
//! hashed on either side. The image is read live, so what
//! arrives is fuzzy until the writes logged since the cut are applied: the
//! replica is consistent again from the sequence at the end (as after an
//! initial copy).
//!
//! ```text
//!  hasher thread ─WindowHashes─▶ loop ─Window──────────▶ replica
//!                                 ◀──verdicts (reader task: reading never waits on sending)
//!                                 ─HashList / LeafHashes / Data ─▶ ... ─Finish─▶ ◀─Done
//! ```
//! At most [`IN_FLIGHT`] windows are offered and not settled, which bounds
//! memory on both sides whatever the replica's pace.

use std::{
    collections::BTreeMap,
    fs::File,
    os::unix::fs::FileExt,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::SystemTime,
};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vmreplica_api::replication::{
    HashList, LeafHashes, LeafVerdict, ResyncData, ResyncFinish, ResyncStart, ResyncUp, WindowHash,
    resync_down::Msg as Down, resync_up::Msg as Up,
};

use super::{ShipError, Shipper};
use crate::{
    hashtree::{self, BLOCK, LEAF, LEAVES_PER_BLOCK, WINDOW, WindowHashes},
    log::dirty::{DIRTY_BLOCK, DirtyMap},
};

// The dirty map's blocks are the tree's blocks: a dirty block's leaves are offered as they are.
const _: () = assert!(DIRTY_BLOCK == BLOCK);

/// Windows offered and not yet settled, at most.
const IN_FLIGHT: usize = 32;
/// Largest run of bytes sent in one message.
const RUN: u64 = 1 << 20;

/// How far a resync is, for status: shared with whoever reports it.
#[derive(Debug, Default)]
pub struct ResyncProgress {
    pub id: std::sync::Mutex<String>,
    pub running: std::sync::atomic::AtomicBool,
    pub dirty_map: std::sync::atomic::AtomicBool,
    /// Bytes of the disk compared (hashed on both sides, or dirty bytes sent).
    pub done_bytes: std::sync::atomic::AtomicU64,
    pub total_bytes: std::sync::atomic::AtomicU64,
    /// Everything on the wire: hashes, verdicts answered, data.
    pub wire_bytes: std::sync::atomic::AtomicU64,
    /// Of those, bytes of disk data (after compression; zeros cost none).
    pub data_bytes: std::sync::atomic::AtomicU64,
    /// Bytes of the disk brought over: every leaf that differed, zeros included.
    pub changed_bytes: std::sync::atomic::AtomicU64,
    pub started: std::sync::Mutex<Option<SystemTime>>,
}

/// A running resync, as status reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncNow {
    pub id: String,
    pub dirty_map: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub wire_bytes: u64,
    pub data_bytes: u64,
    pub changed_bytes: u64,
    pub started: Option<SystemTime>,
}

impl ResyncProgress {
    /// The resync running now, if any.
    pub fn now(&self) -> Option<ResyncNow> {
        if !self.running.load(Relaxed) {
            return None;
        }
        Some(ResyncNow {
            id: self.id.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            dirty_map: self.dirty_map.load(Relaxed),
            done_bytes: self.done_bytes.load(Relaxed),
            total_bytes: self.total_bytes.load(Relaxed),
            wire_bytes: self.wire_bytes.load(Relaxed),
            data_bytes: self.data_bytes.load(Relaxed),
            changed_bytes: self.changed_bytes.load(Relaxed),
            started: *self.started.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    /// What the resync that just ended did.
    pub fn summary(&self, id: &str, took: std::time::Duration) -> ResyncSummary {
        ResyncSummary {
            id: id.to_owned(),
            dirty_map: self.dirty_map.load(Relaxed),
            wire_bytes: self.wire_bytes.load(Relaxed),
            data_bytes: self.data_bytes.load(Relaxed),
            changed_bytes: self.changed_bytes.load(Relaxed),
            seconds: took.as_secs_f64(),
        }
    }
}

/// What a finished resync did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResyncSummary {
    pub id: String,
    pub dirty_map: bool,
    pub wire_bytes: u64,
    pub data_bytes: u64,
    pub changed_bytes: u64,
    pub seconds: f64,
}

/// A window to offer: its hashes, the bytes of the disk it stands for, and
/// (dirty-map mode) which of its blocks are offered, leaves first.
struct Offer {
    bytes: u64,
    hashes: WindowHashes,
    blocks: Option<Vec<u32>>,
}

/// How many windows will be offered, and a thread producing them in order:
/// every window, or (with `dirty` blocks) each window holding dirty blocks
/// with the hashes of just those.
fn offers(
    path: &std::path::Path,
    size: u64,
    dirty: Option<Vec<u64>>,
) -> (u64, mpsc::Receiver<std::io::Result<Offer>>) {
    let (tx, rx) = mpsc::channel(16);
    let total = match dirty {
        None => {
            let mut whole = hashtree::spawn_hasher(path.to_owned(), size);
            tokio::spawn(async move {
                while let Some(h) = whole.recv().await {
                    let o = h.map(|h| Offer {
                        bytes: WINDOW.min(size - h.index * WINDOW),
                        hashes: h,
                        blocks: None,
                    });
                    if tx.send(o).await.is_err() {
                        return;
                    }
                }
            });
            hashtree::windows(size)
        }
        Some(blocks) => {
            let per = hashtree::BLOCKS_PER_WINDOW as u64;
            let windows = blocks.chunk_by(|a, b| a / per == b / per).count() as u64;
            let mut some = hashtree::spawn_block_hasher(path.to_owned(), size, blocks);
            tokio::spawn(async move {
                while let Some(h) = some.recv().await {
                    let o = h.map(|(h, bs)| {
                        let base = h.index * WINDOW;
                        let bytes = bs.iter().map(|&b| BLOCK.min(size - base - u64::from(b) * BLOCK)).sum();
                        Offer { bytes, hashes: h, blocks: Some(bs) }
                    });
                    if tx.send(o).await.is_err() {
                        return;
                    }
                }
            });
            windows
        }
    };
    (total, rx)
}

/// What the replica answers in a Resync stream.
pub(super) type Verdicts =
    mpsc::UnboundedReceiver<Result<Option<vmreplica_api::replication::ResyncDown>, tonic::Status>>;

/// This disk's image as a resync or verification reads it.
#[derive(Clone, Copy)]
pub(super) struct Reading<'a> {
    pub image: &'a Arc<File>,
    pub path: &'a std::path::Path,
    pub size: u64,
}

/// An accepted Resync stream: what goes up, what comes down, and the task reading it.
pub(super) struct Stream {
    pub tx: mpsc::Sender<ResyncUp>,
    pub verdicts: Verdicts,
    pub reader: tokio::task::JoinHandle<()>,
}

pub(super) fn up(msg: Up) -> ResyncUp {
    ResyncUp { msg: Some(msg) }
}

pub(super) fn bad(why: String) -> ShipError {
    ShipError::Rpc(tonic::Status::internal(format!("resync: {why}")))
}

impl Shipper {
    /// Brings the replica's image to this disk's and returns where
    /// replication resumes. `cut`: the first sequence the image may not
    /// hold (the log was cut there); `dirty`: a map of every block changed
    /// since the replica's position, when one can be trusted.
    pub(super) async fn resync(&self, id: &str, cut: u64, dirty: Option<DirtyMap>) -> Result<u64, ShipError> {
        let _slot = self.limits.transfers.acquire().await;
        let (size, path) = (self.source.size(), self.source.image_path());
        let p = &self.resync;
        *p.id.lock().unwrap_or_else(|e| e.into_inner()) = id.to_owned();
        *p.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
        for c in [&p.done_bytes, &p.wire_bytes, &p.data_bytes, &p.changed_bytes] {
            c.store(0, Relaxed);
        }
        p.dirty_map.store(dirty.is_some(), Relaxed);
        p.total_bytes
            .store(dirty.as_ref().map_or(size, |m| (m.dirty_blocks() * DIRTY_BLOCK).min(size)), Relaxed);
        p.running.store(true, Relaxed);
        let result = self.resync_inner(id, cut, dirty, size, &path).await;
        p.running.store(false, Relaxed);
        result
    }

    async fn resync_inner(
        &self,
        id: &str,
        cut: u64,
        dirty: Option<DirtyMap>,
        size: u64,
        path: &std::path::Path,
    ) -> Result<u64, ShipError> {
        let start = ResyncStart {
            disk: Some(self.disk_ref()),
            disk_size: size,
            epoch: self.epoch,
            next_seq: cut,
            dirty_map: dirty.is_some(),
            id: id.to_owned(),
            verify: false,
        };
        let Stream { tx, mut verdicts, reader } = self.open_resync(start).await?;
        let image = Arc::new(
            File::open(path).map_err(|e| ShipError::Read { what: path.display().to_string(), source: e })?,
        );
        let dirty: Option<Vec<u64>> = dirty.map(|m| (0..m.blocks()).filter(|&b| m.is_dirty(b)).collect());
        let sent =
            self.send_tree(&tx, &mut verdicts, Reading { image: &image, path, size }, dirty, None).await;
        let finish = async {
            sent?;
            let consistent_from = self.source.next_seq();
            self.send_up(&tx, Up::Finish(ResyncFinish { consistent_from })).await?;
            match verdicts.recv().await {
                Some(Ok(Some(m))) => match m.msg {
                    Some(Down::Done(d)) => Ok(d.next_seq),
                    other => Err(bad(format!("after the finish the replica sent {other:?}"))),
                },
                Some(Err(s)) => Err(ShipError::Rpc(s)),
                _ => Err(bad("the replica ended the stream before it was done".into())),
            }
        }
        .await;
        reader.abort();
        finish
    }

    /// Starts a Resync stream with `start`; once the replica accepted it,
    /// its messages are read by a task of their own, so that the replica
    /// never waits for this side to read while this side waits to send.
    pub(super) async fn open_resync(&self, start: ResyncStart) -> Result<Stream, ShipError> {
        let (tx, rx) = mpsc::channel::<ResyncUp>(16);
        tx.send(up(Up::Start(start))).await.map_err(|_| bad("stream closed".into()))?;
        let mut down = self.client.clone().resync(ReceiverStream::new(rx)).await?.into_inner();
        match down.message().await?.and_then(|m| m.msg) {
            Some(Down::Accepted(_)) => {}
            other => return Err(bad(format!("the replica answered the start with {other:?}"))),
        }
        let (vtx, verdicts) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let m = down.message().await;
                let end = !matches!(m, Ok(Some(_)));
                if vtx.send(m).is_err() || end {
                    return;
                }
            }
        });
        Ok(Stream { tx, verdicts, reader })
    }

    pub(super) async fn send_up(&self, tx: &mpsc::Sender<ResyncUp>, msg: Up) -> Result<(), ShipError> {
        let m = up(msg);
        self.resync.wire_bytes.fetch_add(m.encoded_len() as u64, Relaxed);
        tx.send(m).await.map_err(|_| bad("the stream to the replica closed".into()))
    }

    /// Reads `[offset, offset + len)` and sends it (zeros as such,
    /// compressed when that helps, under the bandwidth limit).
    async fn send_run(
        &self,
        tx: &mpsc::Sender<ResyncUp>,
        image: &Arc<File>,
        offset: u64,
        len: u64,
        window: Option<(u64, bool)>,
    ) -> Result<(), ShipError> {
        let (img, compression) = (image.clone(), self.compress.clone());
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            img.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(|e| bad(e.to_string()))?
        .map_err(|e| ShipError::Read { what: format!("image bytes {offset}+{len}"), source: e })?;
        let raw_len = len as u32;
        let msg = if data.iter().all(|b| *b == 0) {
            ResyncData { offset, raw_len, zero: true, ..Default::default() }
        } else {
            let (data, compressed) = match compression.encode(&data) {
                Some(c) => (c, true),
                None => (data, false),
            };
            self.limits.bandwidth.acquire(data.len()).await;
            ResyncData { offset, data: data.into(), compressed, raw_len, ..Default::default() }
        };
        let (window, window_done) = window.unwrap_or_default();
        self.resync.data_bytes.fetch_add(msg.data.len() as u64, Relaxed);
        self.resync.changed_bytes.fetch_add(len, Relaxed);
        self.send_up(tx, Up::Data(ResyncData { window, window_done, ..msg })).await
    }

    /// Offers every window top-down (or, with `dirty` blocks, just those
    /// blocks' leaf hashes) and answers the replica down the tree.
    pub(super) async fn send_tree(
        &self,
        tx: &mpsc::Sender<ResyncUp>,
        verdicts: &mut Verdicts,
        reading: Reading<'_>,
        dirty: Option<Vec<u64>>,
        mut differing: Option<&mut Vec<(u64, u64)>>,
    ) -> Result<(), ShipError> {
        let Reading { image, path, size } = reading;
        let (total, mut hashes) = offers(path, size, dirty);
        let mut offered: BTreeMap<u64, (u64, WindowHashes)> = BTreeMap::new();
        let (mut hashed, mut settled) = (0u64, 0u64);
        let settle = |offered: &mut BTreeMap<u64, (u64, WindowHashes)>, w: u64, settled: &mut u64| {
            if let Some((bytes, _)) = offered.remove(&w) {
                *settled += 1;
                self.resync.done_bytes.fetch_add(bytes, Relaxed);
            }
        };
        while settled < total {
            tokio::select! {
                h = hashes.recv(), if hashed < total && offered.len() < IN_FLIGHT => {
                    let Offer { bytes, hashes: h, blocks } = h.ok_or_else(|| bad("the hashing thread stopped".into()))?
                        .map_err(|e| ShipError::Read { what: path.display().to_string(), source: e })?;
                    hashed += 1;
                    let msg = match blocks {
                        // The dirty blocks' leaves, straight away.
                        Some(blocks) => {
                            let hashes = blocks.iter().flat_map(|&b| h.block_leaves(b as usize).concat()).collect();
                            Up::Leaves(LeafHashes { window: h.index, blocks, hashes })
                        }
                        None => Up::Window(WindowHash { index: h.index, hash: h.window.to_vec() }),
                    };
                    self.send_up(tx, msg).await?;
                    offered.insert(h.index, (bytes, h));
                }
                v = verdicts.recv() => {
                    let msg = match v {
                        Some(Ok(Some(m))) => m.msg,
                        Some(Err(s)) => return Err(ShipError::Rpc(s)),
                        _ => return Err(bad("the replica ended the stream mid-resync".into())),
                    };
                    match msg {
                        Some(Down::Window(v)) if !v.differs => settle(&mut offered, v.index, &mut settled),
                        Some(Down::Window(v)) => {
                            let (_, w) = offered.get(&v.index).ok_or_else(|| bad(format!("verdict on window {} never offered", v.index)))?;
                            let hashes = w.blocks.concat();
                            self.send_up(tx, Up::Blocks(HashList { window: v.index, hashes })).await?;
                        }
                        Some(Down::Blocks(v)) if v.blocks.is_empty() => settle(&mut offered, v.window, &mut settled),
                        Some(Down::Blocks(v)) => {
                            let (_, w) = offered.get(&v.window).ok_or_else(|| bad(format!("verdict on window {} never offered", v.window)))?;
                            let mut hashes = Vec::new();
                            for &b in &v.blocks {
                                let leaves = w.blocks.get(b as usize).map(|_| w.block_leaves(b as usize))
                                    .ok_or_else(|| bad(format!("window {} has no block {b}", v.window)))?;
                                hashes.extend(leaves.concat());
                            }
                            self.send_up(tx, Up::Leaves(LeafHashes { window: v.window, blocks: v.blocks, hashes })).await?;
                        }
                        Some(Down::Leaves(v)) => {
                            match differing.as_deref_mut() {
                                // Verifying: counted, not sent.
                                Some(out) => out.extend(leaf_runs(&v, size)?),
                                None => self.send_leaves(tx, image, &v, size).await?,
                            }
                            settle(&mut offered, v.window, &mut settled);
                        }
                        other => return Err(bad(format!("unexpected {other:?} mid-resync"))),
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends the leaves a verdict asks for, adjacent ones as one run.
    async fn send_leaves(
        &self,
        tx: &mpsc::Sender<ResyncUp>,
        image: &Arc<File>,
        v: &LeafVerdict,
        size: u64,
    ) -> Result<(), ShipError> {
        let runs = leaf_runs(v, size)?;
        let count = runs.len();
        for (k, (off, len)) in runs.into_iter().enumerate() {
            self.send_run(tx, image, off, len, Some((v.window, k + 1 == count))).await?;
        }
        Ok(())
    }
}

/// The leaves a verdict names, adjacent ones as one run (offset, length).
fn leaf_runs(v: &LeafVerdict, size: u64) -> Result<Vec<(u64, u64)>, ShipError> {
    if v.blocks.len() != v.masks.len() {
        return Err(bad(format!("window {}: {} blocks, {} masks", v.window, v.blocks.len(), v.masks.len())));
    }
    let base = v.window * WINDOW;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (&b, &mask) in v.blocks.iter().zip(&v.masks) {
        for l in 0..LEAVES_PER_BLOCK as u64 {
            if mask & (1 << l) == 0 {
                continue;
            }
            let off = base + u64::from(b) * BLOCK + l * LEAF;
            if off >= size {
                return Err(bad(format!("leaf at {off} lies past the disk's end")));
            }
            let len = LEAF.min(size - off);
            match runs.last_mut() {
                Some((o, n)) if *o + *n == off && *n + len <= RUN => *n += len,
                _ => runs.push((off, len)),
            }
        }
    }
    Ok(runs)
}
