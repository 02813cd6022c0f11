//! Real agent processes for tests: started with their arguments (and fail
//! points), killed with -9, waited on; certificates written as the agents
//! read them.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use vmreplica_tests::pki::Ca;

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn kill9(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

pub fn agent(args: &[String], failpoints: Option<&str>, log: &Path) -> Proc {
    agent_in(None, args, failpoints, log)
}

/// [`agent`] with more environment variables (no fail points).
pub fn agent_env(args: &[String], env: &[(&str, &Path)], log: &Path) -> Proc {
    start(Command::new(env!("CARGO_BIN_EXE_vmreplica-agent")), args, env, log)
}

/// [`agent`], inside the network namespace `netns` (`ip netns exec`).
pub fn agent_in(netns: Option<&str>, args: &[String], failpoints: Option<&str>, log: &Path) -> Proc {
    let bin = env!("CARGO_BIN_EXE_vmreplica-agent");
    let cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin]);
            c
        }
        None => Command::new(bin),
    };
    let fp = failpoints.map(|fp| ("VMREPLICA_FAILPOINTS", Path::new(fp)));
    start(cmd, args, fp.as_slice(), log)
}

fn start(mut cmd: Command, args: &[String], env: &[(&str, &Path)], log: &Path) -> Proc {
    cmd.args(args).stdout(Stdio::piped()).stderr(fs::File::create(log).unwrap());
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "ready",
        "agent {args:?} did not start: {}",
        fs::read_to_string(log).unwrap_or_default()
    );
    Proc(child)
}

pub fn write_tls(dir: &Path, ca: &Ca, names: &[&str]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let leaf = ca.leaf(names[0], names).unwrap();
    fs::write(dir.join("tls.crt"), leaf.cert_pem).unwrap();
    fs::write(dir.join("tls.key"), leaf.key_pem).unwrap();
    fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
    dir.to_owned()
}

/// Waits for `ok`; on a timeout, fails with every agent log of `dir` attached.
pub fn wait_until(dir: &Path, what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        if Instant::now() > deadline {
            let mut logs = String::new();
            for e in fs::read_dir(dir).unwrap().flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    logs += &format!(
                        "--- {}\n{}\n",
                        e.path().display(),
                        fs::read_to_string(e.path()).unwrap_or_default()
                    );
                }
            }
            panic!("timed out waiting for {what}\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn applied_through(replica_dir: &Path) -> u64 {
    fs::read(replica_dir.join("replica.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["appliedThrough"].as_u64())
        .unwrap_or(0)
}

/// `receive` on `listen`, admitting `*.site-a.example.com` into `storage`
/// (trust group `t`), then `extra`.
pub fn receive_args(listen: &str, tls: &Path, storage: &Path, extra: &[&str]) -> Vec<String> {
    let rule = format!("pattern=*.site-a.example.com,storage={},trust-group=t", storage.display());
    let mut v = vec!["receive", "--listen", listen, "--tls-dir", path(tls), "--authorize", &rule];
    v.extend_from_slice(extra);
    v.into_iter().map(String::from).collect()
}

/// `serve` of VM `vm1`'s disk `root` (`image`) on `socket`, replicating every
/// second to `to` (`replica.site-b.example.com`), retrying every second, then `extra`.
pub fn serve_args(image: &Path, socket: &Path, to: &str, tls: &Path, extra: &[&str]) -> Vec<String> {
    let disk = format!("root={}", image.display());
    let mut v = vec![
        "serve",
        "--vm",
        "vm1",
        "--disk",
        &disk,
        "--socket",
        path(socket),
        "--interval",
        "1",
        "--replicate-to",
        to,
        "--replica-server-name",
        "replica.site-b.example.com",
        "--tls-dir",
        path(tls),
        "--retry-seconds",
        "1",
    ];
    v.extend_from_slice(extra);
    v.into_iter().map(String::from).collect()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Runs a command to its end; fails the test, with its stderr, if it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Writes `count` 64 KiB blocks of random bytes (zstd cannot shrink them, so
/// what crosses the network is what was written) from block `first` through
/// qemu-io, each from its own file in `dir`; returns how many were acknowledged.
pub fn write_random(url: &str, dir: &Path, first: u64, count: u64, rng: &mut super::Rng) -> u64 {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for b in first..first + count {
        let src = dir.join(format!("random-{b}.bin"));
        fs::write(&src, rng.bytes(65536)).unwrap();
        cmd.arg("-c").arg(format!("write -s {} {} 64k", src.display(), b * 65536));
    }
    cmd.arg("-c").arg("flush");
    let out = cmd.arg(url).stderr(Stdio::null()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("wrote ")).count() as u64
}

/// The sum of the Prometheus samples whose line starts with `name`, scraped
/// from `/metrics` at `addr` (from inside network namespace `netns`, if given).
pub fn metric(netns: Option<&str>, addr: &str, name: &str) -> f64 {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "python3"]);
            c
        }
        None => Command::new("python3"),
    };
    let out = cmd
        .arg("-c")
        .arg("import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
