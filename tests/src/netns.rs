//! A network namespace a test makes (deleted when dropped), iptables rules
//! inside it, and a TCP bridge from loopback into it: a process inside the
//! namespace (a replica agent) is reached from this one's loopback, and
//! whatever the namespace's rules drop is dropped on that path too. No
//! address outside the namespace and loopback is used; this machine's own
//! rules are never touched. Needs root.

use std::{
    fs::File,
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    thread,
    time::Duration,
};

pub struct NetNs {
    pub name: String,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("running ip/iptables");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl NetNs {
    /// A namespace `vmr-<tag>-<pid>` with its loopback up.
    pub fn new(tag: &str) -> Self {
        let name = format!("vmr-{tag}-{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        NetNs { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Adds (`-A`) or deletes (`-D`) `rule` on the namespace's INPUT and
    /// OUTPUT chains.
    pub fn rule(&self, op: &str, rule: &[&str]) {
        for chain in ["INPUT", "OUTPUT"] {
            let mut v = vec!["ip", "netns", "exec", &self.name, "iptables", "-w", op, chain];
            v.extend_from_slice(rule);
            run(&v);
        }
    }

    /// Listens on this process's 127.0.0.1 and forwards each connection to
    /// `to` inside the namespace; the address it listens on. A connection
    /// whose other end cannot be reached within 5 s is closed.
    pub fn bridge_to(&self, to: SocketAddr) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().unwrap();
        let ns = File::open(self.path()).expect("the namespace's file");
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let ns = ns.try_clone().unwrap();
                thread::spawn(move || {
                    // This thread's sockets are made inside the namespace.
                    // SAFETY: setns on the calling thread with a namespace fd.
                    let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(entered, 0, "setns: {}", io::Error::last_os_error());
                    match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
                        Ok(upstream) => pipe(client, upstream),
                        Err(_) => {
                            let _ = client.shutdown(Shutdown::Both);
                        }
                    }
                });
            }
        });
        addr
    }
}

/// Copies both ways until either side ends.
fn pipe(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let one = thread::spawn(move || copy(a2, b2));
    copy(b, a);
    let _ = one.join();
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}
