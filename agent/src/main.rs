//! `vmreplica-agent`: one per node.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use vmreplica_agent::{disk::ProtectedDisk, log, nbd::NbdServer};

/// vmreplica's node agent.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve protected disks over NBD, logging every write.
    Serve {
        /// The protected VM's id (written into every log segment).
        #[arg(long)]
        vm: String,
        /// A disk to protect, as NAME=PATH of an existing raw image. Repeatable.
        #[arg(long = "disk", value_parser = parse_disk, required = true)]
        disks: Vec<(String, PathBuf)>,
        /// Unix socket to serve NBD on (`nbd+unix:///NAME?socket=PATH`).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Also serve NBD over TCP on this loopback address.
        #[arg(long)]
        tcp: Option<SocketAddr>,
        /// Seal every disk's active segment this often (seconds). Without it,
        /// segments are sealed only when asked (by the controller, later).
        #[arg(long)]
        seal_interval: Option<u64>,
    },
    /// Apply sealed segments, in order, to a copy of the base image. Every
    /// segment is verified before anything is written.
    Replay {
        /// The image to bring forward (a copy of the image the first segment starts from).
        #[arg(long)]
        image: PathBuf,
        /// Sealed segments, oldest first.
        #[arg(required = true)]
        segments: Vec<PathBuf>,
    },
    /// Verify sealed segments and print what they hold.
    Inspect {
        #[arg(required = true)]
        segments: Vec<PathBuf>,
    },
}

fn parse_disk(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or("expected NAME=PATH")?;
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(format!("disk name {name:?} must be a lower-case RFC 1123 label"));
    }
    Ok((name.to_owned(), PathBuf::from(path)))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let result = match Args::parse().command {
        Command::Serve { vm, disks, socket, tcp, seal_interval } => {
            serve(vm, disks, socket, tcp, seal_interval)
        }
        Command::Replay { image, segments } => log::replay::replay(&image, &segments)
            .map(|r| {
                println!(
                    "applied {} segments ({} records, sequence {}..={}) to {}",
                    r.segments,
                    r.records,
                    r.first_seq,
                    r.last_seq,
                    image.display()
                )
            })
            .map_err(|e| e.to_string()),
        Command::Inspect { segments } => inspect(&segments),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmreplica-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inspect(segments: &[PathBuf]) -> Result<(), String> {
    let mut failed = false;
    for path in segments {
        let result = std::fs::File::open(path).map_err(log::FormatError::Io).and_then(|f| {
            let mut r = log::SegmentReader::new(std::io::BufReader::new(f))?;
            while r.next_record()?.is_some() {}
            let h = r.header.clone();
            Ok((h, r.finish_sealed()?))
        });
        match result {
            Ok((h, seal)) => println!(
                "{}: ok: {}/{} epoch {} sequence {}..={} ({} records, {} data bytes)",
                path.display(),
                h.vm_id,
                h.disk_id,
                h.epoch,
                h.first_seq,
                seal.last_seq,
                seal.records,
                seal.data_bytes
            ),
            Err(e) => {
                failed = true;
                println!("{}: DAMAGED: {e}", path.display());
            }
        }
    }
    if failed { Err("some segments are damaged".into()) } else { Ok(()) }
}

fn serve(
    vm: String,
    disks: Vec<(String, PathBuf)>,
    socket: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    seal_interval: Option<u64>,
) -> Result<(), String> {
    if socket.is_none() && tcp.is_none() {
        return Err("give --socket, --tcp, or both".into());
    }
    if let Some(addr) = tcp.filter(|a| !a.ip().is_loopback()) {
        return Err(format!("NBD over TCP is unauthenticated: {addr} is not a loopback address"));
    }
    let mut opened = Vec::new();
    for (name, path) in &disks {
        let (disk, recovery) = ProtectedDisk::open(&vm, name, path).map_err(|e| e.to_string())?;
        tracing::info!(disk = name, image = %path.display(), size = disk.size(), ?recovery, "disk opened");
        opened.push(Arc::new(disk));
    }
    let server = NbdServer::new(opened.iter().cloned());
    if let Some(path) = &socket {
        // A socket file left by a previous run would make bind fail.
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        server.serve_unix(listener);
        tracing::info!(socket = %path.display(), "serving NBD");
    }
    if let Some(addr) = tcp {
        let listener =
            std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "serving NBD over TCP");
        server.serve_tcp(listener);
    }
    if let Some(secs) = seal_interval {
        let disks = opened.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(secs.max(1)));
                for d in &disks {
                    match d.seal() {
                        Ok(Some(s)) => {
                            tracing::info!(disk = d.name(), first = s.first_seq, last = s.last_seq, "sealed")
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(disk = d.name(), error = %e, "sealing failed"),
                    }
                }
            }
        });
    }
    println!("ready");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<(), String>(())
    })?;
    for d in &opened {
        if let Err(e) = d.shutdown() {
            tracing::error!(disk = d.name(), error = %e, "clean shutdown failed");
        }
    }
    if let Some(path) = &socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
