//! `vmreplica-agent`: one per node. The command line is [`vmreplica_agent::cli`].
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vmreplica_agent::{
    cli::{Args, Command, ImportArgs, import, inspect, materialize, receive_options, serve_options},
    log, run,
};

fn main() -> ExitCode {
    limit_malloc_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, not in a pod's log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = || tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = match Args::parse().command {
        Command::Serve(s) => serve_options(*s).and_then(|o| rt().block_on(run::serve(o))),
        Command::Receive(r) => receive_options(*r).and_then(|o| rt().block_on(run::receive(o))),
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
        Command::Materialize { replica, point, out } => {
            materialize(&replica, point.as_deref(), out.as_deref())
        }
        Command::Import { from, existing, vm, disk, storage, primary, trust_group } => import(ImportArgs {
            from,
            existing,
            vm,
            disk,
            storage,
            owner: vmreplica_agent::media::Owner { primary, trust_group },
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmreplica-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Two malloc arenas, unless `MALLOC_ARENA_MAX` says otherwise. The agent
/// starts short-lived threads for every transfer and apply; glibc gives
/// threads arenas of their own (up to eight per core) and keeps in each what
/// was freed there, which took a replica's peak RSS at 100 MiB/s of churn to
/// 104–127 MiB; with two it stays at 46 MiB, at the same CPU
/// (`COMPRESSION=off benches/rpo.sh 30 100`, see BENCHMARKS.md).
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
