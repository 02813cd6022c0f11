//! Quiescing the guest for application-consistent points: a command pair run
//! on the node, or the QEMU guest agent's `guest-fsfreeze-freeze` /
//! `guest-fsfreeze-thaw` over its unix socket. The freeze covers only the cut
//! (rotating every disk's log), never hashing or shipping.
//!
//! Every step is bounded: a guest agent that does not answer `guest-sync`
//! within [`SYNC_TIMEOUT`] was asked nothing (no thaw is needed), one that
//! does not answer the freeze or thaw within [`REPLY_TIMEOUT`] may have acted
//! on it (the caller thaws, and keeps thawing until a thaw succeeds).

use std::{path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

/// How long a freeze or thaw command may run before it counts as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest agent may take to answer `guest-sync` (connect
/// included): past it, it is not there (qemu-ga not running in the guest).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest agent may take to answer a freeze or thaw.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Nothing reached the guest: connecting or `guest-sync` failed.
    #[error("the guest agent at {} did not answer: {detail}", socket.display())]
    NotAnswering { socket: PathBuf, detail: String },
    /// The command was sent; its answer failed or never came.
    #[error("guest agent at {}: {detail}", socket.display())]
    GuestAgent { socket: PathBuf, detail: String },
}

impl QuiesceError {
    /// Whether the guest may have acted on the step (so a failed freeze
    /// still needs its thaw).
    pub fn reached_guest(&self) -> bool {
        !matches!(self, Self::NotAnswering { .. })
    }
}

impl Quiesce {
    pub async fn freeze(&self) -> Result<(), QuiesceError> {
        self.step("freeze").await
    }

    /// Thaws; called after every freeze that may have reached the guest,
    /// even a failed one.
    pub async fn thaw(&self) -> Result<(), QuiesceError> {
        self.step("thaw").await
    }

    async fn step(&self, what: &'static str) -> Result<(), QuiesceError> {
        match self {
            Self::Command { freeze, thaw } => {
                let argv = if what == "freeze" { freeze } else { thaw };
                tokio::time::timeout(COMMAND_TIMEOUT, run_command(what, argv)).await.unwrap_or_else(|_| {
                    Err(QuiesceError::Command {
                        what,
                        argv: argv.clone(),
                        detail: format!("took longer than {COMMAND_TIMEOUT:?}"),
                    })
                })
            }
            Self::GuestAgent { socket } => {
                let cmd = if what == "freeze" { "guest-fsfreeze-freeze" } else { "guest-fsfreeze-thaw" };
                guest_agent(socket, cmd).await
            }
        }
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
/// any stale reply left in the channel and shows the agent is there) and
/// checks it returned.
async fn guest_agent(socket: &PathBuf, command: &str) -> Result<(), QuiesceError> {
    let absent = |detail: String| QuiesceError::NotAnswering { socket: socket.clone(), detail };
    let failed = |detail: String| QuiesceError::GuestAgent { socket: socket.clone(), detail };
    let id = std::process::id() as u64 * 1000 + (crate::replica::now_ms() % 1000);
    let sync = async {
        let stream = UnixStream::connect(socket).await.map_err(|e| e.to_string())?;
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r);
        w.write_all(format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{id}}}}}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let v = reply(&mut lines).await?;
            if v["return"].as_u64() == Some(id) {
                return Ok((lines, w));
            }
        }
    };
    let (mut lines, mut w) = tokio::time::timeout(SYNC_TIMEOUT, sync)
        .await
        .map_err(|_| {
            absent(format!(
                "no answer to guest-sync within {SYNC_TIMEOUT:?} (is qemu-ga running in the guest?)"
            ))
        })?
        .map_err(absent)?;
    let answer = async {
        w.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let v = reply(&mut lines).await?;
        if let Some(e) = v.get("error") {
            return Err(format!("{command}: {}", e["desc"].as_str().unwrap_or("failed")));
        }
        v.get("return").map(|_| ()).ok_or_else(|| format!("{command}: no return in {v}"))
    };
    tokio::time::timeout(REPLY_TIMEOUT, answer)
        .await
        .map_err(|_| failed(format!("no answer to {command} within {REPLY_TIMEOUT:?}")))?
        .map_err(failed)
}

/// The guest agent's next reply line, parsed. The guest writes what comes
/// back: a line is read only up to [`MAX_REPLY`] bytes.
async fn reply(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Result<serde_json::Value, String> {
    let mut line = Vec::new();
    let n = (&mut *r).take(MAX_REPLY + 1).read_until(b'\n', &mut line).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the guest agent closed the connection".into());
    }
    if line.len() as u64 > MAX_REPLY {
        return Err(format!("reply longer than {MAX_REPLY} bytes"));
    }
    serde_json::from_slice(&line).map_err(|e| format!("unreadable reply: {e}"))
}

/// The longest reply line accepted from the guest agent.
const MAX_REPLY: u64 = 64 << 10;

#[cfg(test)]
mod tests {
    use tokio::net::UnixListener;

    use super::*;

    /// A peer on the guest agent's socket that answers `guest-sync` when
    /// `sync` is set, then reads and never answers; or sends `junk`.
    async fn peer(dir: &std::path::Path, sync: bool, junk: Option<Vec<u8>>) -> PathBuf {
        let path = dir.join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            let first = lines.next_line().await.unwrap().unwrap();
            let v: serde_json::Value = serde_json::from_str(&first).unwrap();
            if let Some(junk) = junk {
                w.write_all(&junk).await.unwrap();
            } else if sync {
                let id = &v["arguments"]["id"];
                w.write_all(format!("{{\"return\": {id}}}\n").as_bytes()).await.unwrap();
            }
            while let Ok(Some(_)) = lines.next_line().await {}
        });
        path
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_guest_agent_is_asked_nothing_within_the_sync_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quiesce::GuestAgent { socket: peer(dir.path(), false, None).await };
        let started = tokio::time::Instant::now();
        let e = q.freeze().await.unwrap_err();
        assert!(!e.reached_guest(), "{e}");
        assert!(e.to_string().contains("no answer to guest-sync within 5s"), "{e}");
        assert_eq!(started.elapsed(), SYNC_TIMEOUT);

        let gone = Quiesce::GuestAgent { socket: dir.path().join("absent.sock") };
        let e = gone.freeze().await.unwrap_err();
        assert!(!e.reached_guest() && e.to_string().contains("No such file"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_freeze_sent_but_not_answered_may_have_reached_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quiesce::GuestAgent { socket: peer(dir.path(), true, None).await };
        let e = q.freeze().await.unwrap_err();
        assert!(e.reached_guest(), "{e}");
        assert!(e.to_string().contains("no answer to guest-fsfreeze-freeze within 10s"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hostile_reply_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quiesce::GuestAgent { socket: peer(dir.path(), false, Some(vec![b'x'; 1 << 20])).await };
        let e = q.freeze().await.unwrap_err();
        assert!(e.to_string().contains("reply longer than 65536 bytes"), "{e}");
    }
}
