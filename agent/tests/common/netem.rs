//! A userspace TCP proxy for network-fault tests: latency, a bandwidth cap
//! and connection resets between a primary and its replica, set while it
//! runs. It can listen inside a network namespace the test made (its
//! listening thread enters it; the sockets it makes belong there).

use std::{
    fs::File,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

#[derive(Default)]
struct Ctl {
    /// Added to every chunk, each way.
    delay_ms: AtomicU64,
    /// Bytes per second each way (0: no cap).
    rate: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
    accepted: AtomicU64,
}

pub struct Netem {
    ctl: Arc<Ctl>,
    pub addr: SocketAddr,
}

impl Netem {
    /// Listens on 127.0.0.1 (inside `netns`, a /run/netns path, if given)
    /// and forwards every connection to `to`.
    pub fn start(netns: Option<&Path>, to: SocketAddr) -> Self {
        let ctl = Arc::new(Ctl::default());
        let (tx, rx) = mpsc::channel();
        let netns = netns.map(|p| File::open(p).unwrap());
        let c = ctl.clone();
        thread::spawn(move || {
            if let Some(ns) = netns {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
            }
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                c.accepted.fetch_add(1, Relaxed);
                {
                    let mut conns = c.conns.lock().unwrap();
                    conns.push(client.try_clone().unwrap());
                    conns.push(upstream.try_clone().unwrap());
                }
                pump(&c, client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pump(&c, upstream, client);
            }
        });
        Self { ctl, addr: rx.recv().unwrap() }
    }

    pub fn set_delay(&self, d: Duration) {
        self.ctl.delay_ms.store(d.as_millis() as u64, Relaxed);
    }

    pub fn set_rate(&self, bytes_per_second: u64) {
        self.ctl.rate.store(bytes_per_second, Relaxed);
    }

    /// Cuts every connection open now, both ways.
    pub fn reset(&self) {
        for s in self.ctl.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.ctl.accepted.load(Relaxed)
    }
}

/// One direction: a reader stamps chunks as they arrive, a writer sends
/// each once its delay has passed, no faster than the rate.
fn pump(ctl: &Arc<Ctl>, mut from: TcpStream, mut to: TcpStream) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(64);
    thread::spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Read);
    });
    let ctl = ctl.clone();
    thread::spawn(move || {
        for (at, data) in rx {
            let due = at + Duration::from_millis(ctl.delay_ms.load(Relaxed));
            thread::sleep(due.saturating_duration_since(Instant::now()));
            let rate = ctl.rate.load(Relaxed);
            if rate > 0 {
                thread::sleep(Duration::from_secs_f64(data.len() as f64 / rate as f64));
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
