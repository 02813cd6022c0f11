//! The agent's command line: what each flag means, checked and turned into
//! the options [`crate::run`] takes. `main.rs` only parses and dispatches.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args as ClapArgs, Parser, Subcommand};
use vmreplica_api::tls::LiveTls;

use crate::{
    log,
    quiesce::Quiesce,
    replica::retention::Policy,
    replication::{
        authz::{Entry, SiteConfig},
        shipper::ShipperConfig,
    },
    run,
};

/// vmreplica's node agent.
#[derive(Parser)]
#[command(version)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve protected disks over NBD, logging every write; optionally replicate them.
    Serve(Box<Serve>),
    /// Accept replication from authorised primaries (a replica site's server).
    Receive(Box<Receive>),
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
    /// At a replica site, make replicas from an initial copy carried on
    /// external media (`--from`, every `<vm>/<disk>` export under it,
    /// verified chunk by chunk before anything is written), or from an image
    /// already here (`--existing`, moved in; the primary then resynchronises
    /// it, sending only what differs). Run it with the storage location and
    /// primary name of the AuthorizationEntry that admits the primary.
    Import {
        /// The export's root directory (initialReplication.method ExternalMedia).
        #[arg(long, conflicts_with = "existing", required_unless_present = "existing")]
        from: Option<PathBuf>,
        /// An image already at this site (method ExistingImage); needs --vm and --disk.
        #[arg(long, requires_all = ["vm", "disk"])]
        existing: Option<PathBuf>,
        /// Only this VM (`<namespace>.<name>` of its VMReplication).
        #[arg(long)]
        vm: Option<String>,
        /// With --existing: the disk's name in spec.disks.
        #[arg(long)]
        disk: Option<String>,
        /// The replica storage location (the entry's replicaStorageLocation).
        #[arg(long)]
        storage: PathBuf,
        /// The primary server's name the entry admits (its certificate's).
        #[arg(long)]
        primary: String,
        /// The entry's trust group.
        #[arg(long, default_value = "default")]
        trust_group: String,
    },
    /// Write a recovery point of a replica directory to a new image, with
    /// no agent running (one holding the directory is refused): the data of
    /// a replica whose agent is gone. Lists the points when `--point` is unset.
    Materialize {
        /// The replica's directory (`<storage>/<vm>/<disk>`, holding replica.json).
        #[arg(long)]
        replica: PathBuf,
        /// A point's sequence, `latest`, or `diverged`.
        #[arg(long)]
        point: Option<String>,
        /// The image to write (must not exist).
        #[arg(long, required_if_eq("point", "latest"))]
        out: Option<PathBuf>,
    },
}

/// What `import` was asked.
pub struct ImportArgs {
    pub from: Option<PathBuf>,
    pub existing: Option<PathBuf>,
    pub vm: Option<String>,
    pub disk: Option<String>,
    pub storage: PathBuf,
    pub owner: crate::media::Owner,
}

/// `import`: replicas from an export or an existing image, under `storage`.
pub fn import(a: ImportArgs) -> Result<(), String> {
    use crate::{media, replica::store::replica_dir};
    let err = |e: &dyn std::fmt::Display| e.to_string();
    if !a.storage.is_absolute() {
        return Err(format!("--storage {}: an absolute directory is needed", a.storage.display()));
    }
    if let Some(image) = &a.existing {
        let (vm, disk) = (a.vm.as_deref().unwrap_or_default(), a.disk.as_deref().unwrap_or_default());
        let dir = replica_dir(&a.storage, vm, disk, true).map_err(|e| err(&e))?;
        let size = media::adopt_existing(image, &dir, (vm, disk), &a.owner).map_err(|e| err(&e))?;
        println!(
            "{vm}/{disk}: {size} bytes from {}; the primary resynchronises it at its next cycle",
            image.display()
        );
        return Ok(());
    }
    let from = a.from.expect("clap: --from or --existing");
    let mut imported = 0;
    for vm in fs::read_dir(&from).map_err(|e| format!("{}: {e}", from.display()))?.flatten() {
        let vm_id = vm.file_name().to_string_lossy().into_owned();
        if a.vm.as_ref().is_some_and(|want| *want != vm_id) || !vm.path().is_dir() {
            continue;
        }
        for disk in fs::read_dir(vm.path()).map_err(|e| format!("{}: {e}", vm.path().display()))?.flatten() {
            let disk_id = disk.file_name().to_string_lossy().into_owned();
            let src = media::disk_dir(&from, &vm_id, &disk_id).map_err(|e| err(&e))?;
            if !src.join("manifest.json").exists() {
                continue;
            }
            let dir = replica_dir(&a.storage, &vm_id, &disk_id, true).map_err(|e| err(&e))?;
            let m = media::import(&src, &dir, &a.owner).map_err(|e| err(&e))?;
            println!(
                "{vm_id}/{disk_id}: {} chunks verified and imported; replication resumes at sequence {}",
                m.chunks.len(),
                m.next_seq
            );
            imported += 1;
        }
    }
    if imported == 0 {
        return Err(format!("{}: no export (<vm>/<disk>/manifest.json) found", from.display()));
    }
    Ok(())
}

/// `materialize`: lists a replica's points, or writes one to `out`.
pub fn materialize(replica: &Path, point: Option<&str>, out: Option<&Path>) -> Result<(), String> {
    use crate::replica::ReplicaDisk;
    if !replica.join("replica.json").is_file() {
        return Err(format!("{} holds no replica (no replica.json)", replica.display()));
    }
    let r = ReplicaDisk::open(replica, || unreachable!("replica.json exists")).map_err(|e| e.to_string())?;
    let Some(point) = point else {
        let s = r.state().clone();
        println!("{:?}, applied through {}", s.lifecycle, s.applied_through);
        for p in &s.points {
            println!("point {} {:?} sealed at {} ms", p.seq, p.kind, p.time_ms);
        }
        if let Some(d) = &s.diverged {
            println!(
                "diverged: its own log through {} (epoch {}), set aside at {} ms",
                d.seq, d.epoch, d.time_ms
            );
        }
        return Ok(());
    };
    let out = out.ok_or("--out is required with --point")?;
    if out.exists() {
        return Err(format!("{} exists: materialising writes a new image", out.display()));
    }
    if point == "diverged" {
        return r.materialize_diverged(out).map_err(|e| e.to_string());
    }
    let seq = match point {
        "latest" => r.points().last().map(|p| p.seq).ok_or("the replica has no recovery point")?,
        n => n.parse().map_err(|_| format!("--point {n:?}: a sequence, `latest` or `diverged`"))?,
    };
    r.materialize(seq, out).map_err(|e| e.to_string())?;
    println!("point {seq} written to {}", out.display());
    Ok(())
}

/// How the agent announces itself in the cluster (a Lease per node).
#[derive(ClapArgs, Clone)]
struct AnnounceArgs {
    /// Keep a Lease in this namespace announcing the agent to the controller.
    #[arg(long)]
    lease_namespace: Option<String>,
    /// This agent's node name.
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// A label of this node (`key=value`, repeatable), copied onto the Lease.
    #[arg(long = "node-label", value_parser = parse_label)]
    node_labels: Vec<(String, String)>,
    /// Kubeconfig to reach the apiserver (default: in-cluster or $KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Host the controller and peers reach this agent at (default: the node name).
    #[arg(long)]
    advertise_host: Option<String>,
    /// The name the controller verifies this agent's certificate as: a DNS
    /// name (or IP address) in it (default: the advertised host). One name
    /// for every node lets one certificate serve a whole DaemonSet.
    #[arg(long)]
    server_name: Option<String>,
    /// Also copy the labels of this Kubernetes Node (the agent's own node,
    /// e.g. `$(NODE_NAME)`; read every minute) onto the Lease, so a
    /// ReplicationServer's nodeSelector selects by them. Needs `get` on nodes.
    #[arg(long, value_name = "NODE")]
    labels_from_node: Option<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected key=value"))
}

impl AnnounceArgs {
    fn resolve(self) -> Result<Option<run::Announce>, String> {
        let Some(namespace) = self.lease_namespace else { return Ok(None) };
        let node = self.node.ok_or("--lease-namespace needs --node (or NODE_NAME)")?;
        let host = self.advertise_host.unwrap_or_else(|| node.clone());
        Ok(Some(run::Announce {
            kubeconfig: self.kubeconfig,
            namespace,
            server_name: self.server_name.unwrap_or_else(|| host.clone()),
            host,
            node,
            labels: self.node_labels.into_iter().collect(),
            labels_from_node: self.labels_from_node,
        }))
    }
}

#[derive(ClapArgs)]
pub struct Serve {
    /// The protected VM's id (written into every log segment) of the --disk images.
    #[arg(long, requires = "disks")]
    vm: Option<String>,
    /// A disk to protect, as NAME=PATH of an existing raw image. Repeatable.
    /// Without any, the agent protects what the controller enables through
    /// the control API (--control-listen).
    #[arg(long = "disk", value_parser = parse_disk, required_unless_present = "control_listen")]
    disks: Vec<(String, PathBuf)>,
    /// A directory whose images the controller may ask this agent to serve. Repeatable.
    #[arg(long = "disk-root", default_value = "/var/lib/vmreplica/disks")]
    disk_roots: Vec<PathBuf>,
    /// Also receive replication on this address (mutual TLS), with the rules
    /// the controller pushes: one agent per node in both roles.
    #[arg(long, requires = "control_listen")]
    listen: Option<SocketAddr>,
    /// A directory replicas may be stored under (repeatable): storage an
    /// AuthorizationEntry or ReplicationServer names elsewhere is refused
    /// (in a pod, only these host paths are mounted). None: anywhere.
    #[arg(long = "replica-root")]
    replica_roots: Vec<PathBuf>,
    /// Let VMReplications name freeze/thaw commands, run here as the agent.
    /// Off by default: whoever may create a VMReplication could run them.
    #[arg(long)]
    allow_quiesce_commands: bool,
    /// Resolve HOST to ADDRESS instead of asking DNS (`HOST=ADDRESS`, repeatable).
    #[arg(long, value_parser = parse_resolve)]
    resolve: Vec<(String, std::net::IpAddr)>,
    /// Unix socket to serve NBD on (`nbd+unix:///NAME?socket=PATH`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve NBD over TCP on this loopback address.
    #[arg(long)]
    tcp: Option<SocketAddr>,
    /// Most NBD connections one export serves at once (a VM's QEMU opens
    /// one, or a few with multi-conn); more are refused.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    nbd_max_connections: u16,
    /// Seconds between replication cycles (sealing, and shipping when replicating).
    #[arg(long = "interval", alias = "seal-interval")]
    interval: Option<u64>,
    /// Replicate to the replica site's server at HOST:PORT.
    #[arg(long)]
    replicate_to: Option<String>,
    /// The replica server's name in its certificate (default: the host of --replicate-to).
    #[arg(long)]
    replica_server_name: Option<String>,
    /// Directory with tls.crt, tls.key and ca.crt (needed to replicate);
    /// re-read every 10 s, so a renewed certificate needs no restart.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Send segments uncompressed.
    #[arg(long)]
    no_compression: bool,
    /// Replication bandwidth limit, bytes per second (a ReplicationServer
    /// selecting this agent overrides it).
    #[arg(long)]
    bandwidth_limit: Option<u64>,
    /// Most transfers at once, inbound and outbound (Hyper-V's
    /// MaximumActiveTransfers; a ReplicationServer selecting this agent overrides it).
    #[arg(long, default_value_t = 6)]
    max_transfers: usize,
    /// Waits after failed cycles, in seconds; the last repeats.
    #[arg(long, value_delimiter = ',', default_values_t = [60, 120, 240, 480, 1800])]
    retry_seconds: Vec<u64>,
    /// Take an application-consistent point this often (seconds), quiescing
    /// with --freeze-command/--thaw-command or --guest-agent-socket.
    #[arg(long)]
    app_consistent_every: Option<u64>,
    /// Freeze command, run with `sh -c`.
    #[arg(long, requires = "thaw_command")]
    freeze_command: Option<String>,
    /// Thaw command, run with `sh -c` after every freeze attempt.
    #[arg(long, requires = "freeze_command")]
    thaw_command: Option<String>,
    /// The QEMU guest agent's socket (guest-fsfreeze-freeze / -thaw).
    #[arg(long, conflicts_with = "freeze_command")]
    guest_agent_socket: Option<PathBuf>,
    /// Serve Prometheus metrics (/metrics) and /healthz on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Serve the control API (mutual TLS, certificates from --tls-dir) on this address.
    #[arg(long)]
    control_listen: Option<SocketAddr>,
    #[command(flatten)]
    announce: AnnounceArgs,
    /// The controller's certificate name (a DNS name in its SAN), repeatable:
    /// only it may call the control API, and it may not call the replication API.
    #[arg(long = "controller-name", default_value = crate::grpc::control::DEFAULT_CONTROLLER_NAME)]
    controller_names: Vec<String>,
    /// With --listen: read back and verify every stored segment and undo
    /// file of the replicas held here this often (hours; 0: never).
    #[arg(long, default_value_t = 24)]
    scrub_hours: u64,
}

#[derive(ClapArgs)]
pub struct Receive {
    /// Address to listen on for replication (mutual TLS).
    #[arg(long)]
    listen: SocketAddr,
    /// Directory with tls.crt, tls.key and ca.crt; re-read every 10 s.
    #[arg(long)]
    tls_dir: PathBuf,
    /// An authorised primary, as `pattern=*.site-a.example.com,storage=/dir,trust-group=NAME`. Repeatable.
    #[arg(long = "authorize", value_parser = parse_entry)]
    entries: Vec<Entry>,
    /// A directory replicas may be stored under (repeatable): storage an
    /// AuthorizationEntry or ReplicationServer names elsewhere is refused
    /// (in a pod, only these host paths are mounted). None: anywhere.
    #[arg(long = "replica-root")]
    replica_roots: Vec<PathBuf>,
    /// Accept any primary the CA signed, storing its replicas under --storage.
    #[arg(long)]
    allow_any_server: bool,
    /// Storage for replicas accepted through --allow-any-server.
    #[arg(long)]
    storage: Option<PathBuf>,
    /// Trust group of replicas accepted through --allow-any-server.
    #[arg(long, default_value = "default")]
    default_trust_group: String,
    /// Most transfers at once (until a ReplicationServer sets maxActiveTransfers).
    #[arg(long, default_value_t = 6)]
    max_transfers: usize,
    /// Replication bandwidth limit, bytes per second (until a ReplicationServer sets one).
    #[arg(long)]
    bandwidth_limit: Option<u64>,
    /// Every replication cycle within this many seconds is a recovery point (at most a day).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    window_seconds: u64,
    /// Beyond the window, keep one point per hour for this many hours (0-168).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(0..=168))]
    hourly_points: u32,
    /// Serve Prometheus metrics (/metrics) and /healthz on this address.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Serve the control API (mutual TLS, certificates from --tls-dir) on this address.
    #[arg(long)]
    control_listen: Option<SocketAddr>,
    #[command(flatten)]
    announce: AnnounceArgs,
    /// The controller's certificate name (a DNS name in its SAN), repeatable:
    /// only it may call the control API, and it may not call the replication API.
    #[arg(long = "controller-name", default_value = crate::grpc::control::DEFAULT_CONTROLLER_NAME)]
    controller_names: Vec<String>,
    /// Read back and verify every stored segment and undo file this often
    /// (hours; 0: never): damage at rest is found before it is needed.
    #[arg(long, default_value_t = 24)]
    scrub_hours: u64,
}

fn parse_disk(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').ok_or("expected NAME=PATH")?;
    crate::replica::names::check("disk name", name).map_err(|e| e.to_string())?;
    Ok((name.to_owned(), PathBuf::from(path)))
}

fn parse_resolve(s: &str) -> Result<(String, std::net::IpAddr), String> {
    let (host, ip) = s.split_once('=').ok_or("expected HOST=ADDRESS")?;
    Ok((host.to_ascii_lowercase(), ip.parse().map_err(|e| format!("{ip:?}: {e}"))?))
}

fn parse_entry(s: &str) -> Result<Entry, String> {
    let mut e = Entry {
        name: String::new(),
        allowed_primary_server: String::new(),
        storage: PathBuf::new(),
        trust_group: String::new(),
    };
    for kv in s.split(',') {
        match kv.split_once('=') {
            Some(("pattern", v)) => e.allowed_primary_server = v.to_ascii_lowercase(),
            Some(("storage", v)) => e.storage = PathBuf::from(v),
            Some(("trust-group", v)) => e.trust_group = v.to_owned(),
            Some(("name", v)) => e.name = v.to_owned(),
            _ => {
                return Err(format!(
                    "unknown part {kv:?}: expected pattern=, storage=, trust-group= (and name=)"
                ));
            }
        }
    }
    if e.allowed_primary_server.is_empty() || e.trust_group.is_empty() || !e.storage.is_absolute() {
        return Err("pattern, trust-group and an absolute storage are required".into());
    }
    if e.name.is_empty() {
        e.name = e.allowed_primary_server.clone();
    }
    Ok(e)
}

/// Loads and checks the certificate in `dir`; the error names the file at fault.
fn tls_dir(dir: PathBuf) -> Result<run::TlsDir, String> {
    let live = LiveTls::from_dir(&dir).map_err(|e| format!("--tls-dir {}: {e}", dir.display()))?;
    Ok(run::TlsDir { dir, live })
}

pub fn serve_options(s: Serve) -> Result<run::ServeOptions, String> {
    let tls = s.tls_dir.map(tls_dir).transpose()?;
    if !s.disks.is_empty() && s.vm.is_none() {
        return Err("--disk needs --vm (the protected VM's id)".into());
    }
    let retry: Vec<Duration> = s.retry_seconds.iter().map(|&x| Duration::from_secs(x)).collect();
    let replicate = match s.replicate_to {
        None => None,
        Some(addr) => {
            if tls.is_none() {
                return Err("--replicate-to needs --tls-dir".into());
            }
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h).to_owned();
            Some(run::ReplicateTo {
                server_name: s.replica_server_name.unwrap_or(host),
                addr,
                shipper: ShipperConfig {
                    compression: !s.no_compression,
                    backoff: retry.clone(),
                    ..Default::default()
                },
            })
        }
    };
    let sh = |c: String| vec!["sh".to_owned(), "-c".to_owned(), c];
    let quiesce = match (s.freeze_command, s.thaw_command, s.guest_agent_socket) {
        (Some(f), Some(t), None) => Some(Quiesce::Command { freeze: sh(f), thaw: sh(t) }),
        (None, None, Some(socket)) => Some(Quiesce::GuestAgent { socket }),
        _ => None,
    };
    let app_consistent = match (s.app_consistent_every, quiesce) {
        (Some(every), Some(q)) => Some((q, Duration::from_secs(every))),
        (Some(_), None) => return Err("--app-consistent-every needs a way to quiesce: --freeze-command and --thaw-command, or --guest-agent-socket".into()),
        (None, _) => None,
    };
    Ok(run::ServeOptions {
        app_consistent,
        metrics: s.metrics,
        control: s.control_listen,
        announce: s.announce.resolve()?,
        vm: s.vm.unwrap_or_default(),
        disks: s.disks,
        tls,
        disk_roots: s.disk_roots,
        resolve: s.resolve.into_iter().collect(),
        retry,
        bandwidth: s.bandwidth_limit,
        max_transfers: s.max_transfers,
        allow_quiesce_commands: s.allow_quiesce_commands,
        replica_roots: s.replica_roots,
        controllers: s.controller_names,
        receive: s.listen,
        receive_retention: Policy::default(),
        scrub_every: scrub_every(s.scrub_hours),
        socket: s.socket,
        tcp: s.tcp,
        nbd_limits: crate::nbd::server::Limits {
            max_connections_per_export: usize::from(s.nbd_max_connections),
            ..Default::default()
        },
        interval: s.interval.map(|x| Duration::from_secs(x.max(1))),
        replicate,
    })
}

/// `--scrub-hours`: 0 turns the scrub off.
fn scrub_every(hours: u64) -> Option<Duration> {
    (hours > 0).then(|| Duration::from_secs(hours * 3600))
}

pub fn receive_options(r: Receive) -> Result<run::ReceiveOptions, String> {
    let announce = r.announce.resolve()?;
    if r.entries.is_empty() && !r.allow_any_server && announce.is_none() {
        return Err(
            "give --authorize entries, --allow-any-server, or --lease-namespace (the controller then \
                    configures the site): otherwise no primary is accepted"
                .into(),
        );
    }
    Ok(run::ReceiveOptions {
        listen: r.listen,
        tls: tls_dir(r.tls_dir)?,
        site: SiteConfig {
            allow_any_server: r.allow_any_server,
            default_storage: r.storage,
            default_trust_group: r.default_trust_group,
            entries: r.entries,
        },
        max_transfers: r.max_transfers,
        bandwidth: r.bandwidth_limit,
        replica_roots: r.replica_roots,
        retention: Policy { window_ms: r.window_seconds * 1000, hourly: r.hourly_points },
        metrics: r.metrics,
        control: r.control_listen,
        announce,
        controllers: r.controller_names,
        scrub_every: scrub_every(r.scrub_hours),
    })
}

pub fn inspect(segments: &[PathBuf]) -> Result<(), String> {
    let mut failed = false;
    for path in segments {
        let result = log::format::verify_sealed_file(path);
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
