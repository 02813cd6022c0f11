//! `vmreplica-agent`: one per node.
use clap::Parser;

/// vmreplica's node agent.
#[derive(Parser)]
#[command(version)]
struct Args {}

fn main() -> std::process::ExitCode {
    let _args = Args::parse();
    eprintln!("vmreplica-agent: this build has no data path yet");
    std::process::ExitCode::FAILURE
}
