//! Helpers for data-path tests: images, an in-process NBD server on a unix
//! socket, and the real NBD clients from qemu-utils.
#![allow(dead_code)]

pub mod nbd_raw;
pub mod net;
pub mod netem;
pub mod procs;

use std::{
    fs,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Arc,
};

use vmreplica_agent::{disk::ProtectedDisk, nbd::NbdServer};

pub struct Served {
    pub dir: tempfile::TempDir,
    pub disk: Arc<ProtectedDisk>,
    pub image: PathBuf,
    /// A copy of the image as it was before serving started.
    pub base: PathBuf,
    pub socket: PathBuf,
}

impl Served {
    /// `nbd+unix:///root?socket=...`
    pub fn url(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.disk.name(), self.socket.display())
    }
}

/// Creates a sparse image of `size` bytes (optionally with `content` at 0),
/// keeps a copy as the base, and serves it as export `root`.
pub fn serve_new_image(size: u64, content: &[u8]) -> Served {
    serve_new_image_for("vm1", size, content)
}

/// [`serve_new_image`] for a VM of another id.
pub fn serve_new_image_for(vm: &str, size: u64, content: &[u8]) -> Served {
    let served = new_image_for(vm, size, content);
    NbdServer::new([served.disk.clone()]).serve_unix(UnixListener::bind(&served.socket).unwrap());
    served
}

/// [`serve_new_image_for`] without the NBD listener (its accept thread,
/// holding the disk open, lives as long as the test process): for tests
/// that make thousands of disks and drive `NbdServer::handle` themselves.
pub fn new_image_for(vm: &str, size: u64, content: &[u8]) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("root.img");
    let f = fs::File::create(&image).unwrap();
    f.set_len(size).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, content, 0).unwrap();
    let base = dir.path().join("base.img");
    fs::copy(&image, &base).unwrap();
    let (disk, _) = ProtectedDisk::open(vm, "root", &image).unwrap();
    let disk = Arc::new(disk);
    let socket = dir.path().join("nbd.sock");
    Served { dir, disk, image, base, socket }
}

/// Serves an existing image (its log as it is) as export `root` of `vm`.
pub fn serve_image(vm: &str, image: &Path) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    fs::copy(image, &base).unwrap();
    let (disk, _) = ProtectedDisk::open(vm, "root", image).unwrap();
    let disk = Arc::new(disk);
    let socket = dir.path().join("nbd.sock");
    NbdServer::new([disk.clone()]).serve_unix(UnixListener::bind(&socket).unwrap());
    Served { dir, disk, image: image.to_owned(), base, socket }
}

/// Runs `qemu-io` with `commands` against `url`; panics with its output if it fails.
pub fn qemu_io(url: &str, commands: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.arg(url).output().expect("qemu-io runs (qemu-utils)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("failed"), "qemu-io {commands:?} failed:\n{text}");
    text
}

pub fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().expect("qemu-img runs (qemu-utils)")
}

/// Whether two images (paths or NBD URLs) hold the same bytes, by `qemu-img compare`.
pub fn identical(a: &str, b: &str) -> bool {
    let out = qemu_img(&["compare", "-f", "raw", "-F", "raw", a, b]);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare {a} {b}: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Paths of the sealed segments of a disk, oldest first.
pub fn sealed_paths(disk: &ProtectedDisk) -> Vec<PathBuf> {
    disk.log_status().sealed.into_iter().map(|s| s.path).collect()
}

/// A deterministic pseudo-random generator (xorshift), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
