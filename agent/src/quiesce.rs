//! Quiescing the guest for application-consistent points: a command pair run
//! on the node, or the QEMU guest agent's `guest-fsfreeze-freeze` /
//! `guest-fsfreeze-thaw` over its unix socket. The freeze covers only the cut
//! (rotating every disk's log), never hashing or shipping.

use std::{path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

/// How long a freeze or thaw may take before it counts as failed.
pub const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Quiesce {
    /// argv of the freeze and thaw commands.
    Command { freeze: Vec<String>, thaw: Vec<String> },
    /// The QEMU guest agent's socket.
    GuestAgent { socket: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    #[error("{what} command {argv:?} failed: {detail}")]
    Command { what: &'static str, argv: Vec<String>, detail: String },
    #[error("guest agent at {socket}: {detail}")]
    GuestAgent { socket: PathBuf, detail: String },
    #[error("{0} took longer than {TIMEOUT:?}")]
    Timeout(&'static str),
}

impl Quiesce {
    pub async fn freeze(&self) -> Result<(), QuiesceError> {
        self.step("freeze").await
    }

    /// Thaws; called after every freeze attempt, even a failed one.
    pub async fn thaw(&self) -> Result<(), QuiesceError> {
        self.step("thaw").await
    }

    async fn step(&self, what: &'static str) -> Result<(), QuiesceError> {
        let run = async {
            match self {
                Self::Command { freeze, thaw } => {
                    run_command(what, if what == "freeze" { freeze } else { thaw }).await
                }
                Self::GuestAgent { socket } => {
                    let cmd = if what == "freeze" { "guest-fsfreeze-freeze" } else { "guest-fsfreeze-thaw" };
                    guest_agent(socket, cmd)
                        .await
                        .map_err(|detail| QuiesceError::GuestAgent { socket: socket.clone(), detail })
                }
            }
        };
        tokio::time::timeout(TIMEOUT, run).await.map_err(|_| QuiesceError::Timeout(what))?
    }
}

async fn run_command(what: &'static str, argv: &[String]) -> Result<(), QuiesceError> {
    let err = |detail: String| QuiesceError::Command { what, argv: argv.to_vec(), detail };
    let (prog, args) = argv.split_first().ok_or_else(|| err("empty command".into()))?;
    let out = tokio::process::Command::new(prog)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(err(format!("{}: {}", out.status, stderr.trim())))
    }
}

/// Sends one guest-agent command after a `guest-sync` handshake (which flushes
/// any stale reply left in the channel) and checks it returned.
async fn guest_agent(socket: &PathBuf, command: &str) -> Result<(), String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| e.to_string())?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let id = std::process::id() as u64 * 1000 + (crate::replica::now_ms() % 1000);
    w.write_all(format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{id}}}}}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the guest agent closed the connection")?;
        if line.len() > 64 << 10 {
            return Err("reply too long".into());
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("unreadable reply: {e}"))?;
        if v["return"].as_u64() == Some(id) {
            break;
        }
    }
    w.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let line =
        lines.next_line().await.map_err(|e| e.to_string())?.ok_or("the guest agent closed the connection")?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("unreadable reply: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(format!("{command}: {}", e["desc"].as_str().unwrap_or("failed")));
    }
    v.get("return").map(|_| ()).ok_or_else(|| format!("{command}: no return in {line}"))
}
