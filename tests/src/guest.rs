//! Real guests: Debian's cloud kernel and the project's initramfs
//! (`hack/guest-kit.sh`, `hack/guest/init`) under `qemu-system-x86_64`, with
//! the disk given as a QEMU `-drive` (the agent's NBD export, or a file), and
//! what the guest reports read from its serial console ("VMR ..." lines).

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The guest kit: kernel, initramfs, and the accelerator that boots here.
#[derive(Clone, Debug)]
pub struct Kit {
    pub dir: PathBuf,
    pub accel: String,
}

impl Kit {
    /// The kit `hack/guest-kit.sh` built (`VMREPLICA_GUEST_KIT`, else the cache).
    pub fn find() -> Kit {
        let dir = std::env::var_os("VMREPLICA_GUEST_KIT").map(PathBuf::from).unwrap_or_else(|| {
            let cache = std::env::var_os("VMREPLICA_CACHE").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/vmreplica")
            });
            cache.join("guest")
        });
        assert!(
            dir.join("vmlinuz").exists() && dir.join("initrd.img").exists(),
            "no guest kit in {}: run hack/guest-kit.sh (hack/test.sh does)",
            dir.display()
        );
        let accel = fs::read_to_string(dir.join("accel"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "tcg".into());
        Kit { dir, accel }
    }
}

/// The `-drive` of an NBD export on a unix socket, as a VM's QEMU attaches it.
pub fn nbd_drive(socket: &Path, export: &str) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},export={export},if=virtio,cache=none",
        socket.display()
    )
}

/// The `-drive` of a raw image file.
pub fn file_drive(path: &Path) -> String {
    format!("file={},format=raw,if=virtio,cache=none", path.display())
}

/// QEMU arguments for virtio-serial ports, each on a unix socket QEMU
/// listens on, named as given: qemu-ga in a guest booted with `qga=1` serves
/// the one named `org.qemu.guest_agent.0`; on any other, nobody answers.
pub fn serial_ports(ports: &[(&Path, &str)]) -> Vec<String> {
    let mut args = vec!["-device".to_owned(), "virtio-serial".to_owned()];
    for (i, (socket, name)) in ports.iter().enumerate() {
        args.push("-chardev".into());
        args.push(format!("socket,id=port{i},path={},server=on,wait=off", socket.display()));
        args.push("-device".into());
        args.push(format!("virtserialport,chardev=port{i},name={name}"));
    }
    args
}

/// A running guest; killed (a crash, as far as its disk is concerned) when dropped.
pub struct Guest {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    log: PathBuf,
}

impl Guest {
    /// Boots a guest on `drive` running `workload` (`hack/guest/init` lists
    /// them) with `args` (`records=5` → `vmr.records=5`) and `qemu` extra
    /// QEMU arguments; its console goes to `log` too.
    pub fn boot(kit: &Kit, drive: &str, workload: &str, args: &[&str], qemu: &[&str], log: &Path) -> Guest {
        let mut append = format!("console=ttyS0 panic=-1 quiet vmr.workload={workload}");
        for a in args {
            append += &format!(" vmr.{a}");
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", &kit.accel, "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(kit.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(kit.dir.join("initrd.img"))
            .args(["-append", &append, "-drive", drive])
            .args(qemu)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting qemu-system-x86_64 (hack/guest-kit.sh installs it)");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut file = fs::File::create(log).expect("creating the guest's console log");
        let (out, err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                kept.lock().unwrap().push(line.trim_end_matches('\r').to_owned());
            }
        });
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(format!("qemu: {line}"));
            }
        });
        Guest { child, lines, log: log.to_owned() }
    }

    /// Everything the console and QEMU printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The guest's report lines ("VMR <word> ...") starting with `word`, without "VMR ".
    pub fn reports(&self, word: &str) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("VMR "))
            .filter(|l| l.starts_with(word))
            .map(str::to_owned)
            .collect()
    }

    /// Waits for the first report starting with `word`; panics with the
    /// console after `secs`, or when the guest exits first.
    pub fn wait_report(&mut self, word: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(r) = self.reports(word).into_iter().next() {
                return r;
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                std::thread::sleep(Duration::from_millis(200));
                if let Some(r) = self.reports(word).into_iter().next() {
                    return r;
                }
                panic!(
                    "the guest did not report {word} ({}); its console ({}):\n{}",
                    exited.map_or("timed out".to_owned(), |s| format!("exited {s}")),
                    self.log.display(),
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the guest to report DONE and power off.
    pub fn wait_done(&mut self, secs: u64) {
        self.wait_report("DONE", secs);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(
                Instant::now() < deadline,
                "the guest reported DONE but did not power off:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pulls the plug: QEMU is killed, nothing the guest had not flushed survives.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.crash();
    }
}

/// What the verify workload found, parsed from its reports.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// The journal needed recovery (the guest did not shut down cleanly).
    pub needed_recovery: bool,
    /// `e2fsck -fn`'s exit status after the journal was replayed.
    pub fsck: i32,
    /// The WAL's records, how many had a bad checksum, how many were out of sequence.
    pub wal_last: u64,
    pub wal_bad: u64,
    pub wal_holes: u64,
    /// Files whose checksum matched, of those listed.
    pub files_ok: u64,
    pub files_listed: u64,
}

fn field(report: &str, name: &str) -> u64 {
    report
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {report:?}"))
}

/// Boots the verify workload on `drive` and returns what it found.
pub fn verify(kit: &Kit, drive: &str, log: &Path) -> Verified {
    let mut g = Guest::boot(kit, drive, "verify", &[], &[], log);
    g.wait_done(240);
    let journal = g.wait_report("JOURNAL", 1);
    let fsck = g.wait_report("FSCK", 1);
    let wal = g.wait_report("WAL", 1);
    let files = g.wait_report("FILES", 1);
    Verified {
        needed_recovery: journal.contains("needs_recovery"),
        fsck: fsck.trim_start_matches("FSCK ").trim().parse().unwrap_or(-1),
        wal_last: field(&wal, "last"),
        wal_bad: field(&wal, "bad"),
        wal_holes: field(&wal, "holes"),
        files_ok: field(&files, "ok"),
        files_listed: field(&files, "listed"),
    }
}

/// The highest WAL sequence the guest reported as acknowledged (fsync returned).
pub fn last_ack(g: &Guest) -> u64 {
    g.reports("ACK")
        .iter()
        .filter_map(|r| r.trim_start_matches("ACK ").trim().parse().ok())
        .max()
        .unwrap_or(0)
}
