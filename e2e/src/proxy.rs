//! The `floodgate-proxy` binary as a child process of a test: started on an ephemeral port
//! (read back from its JSON log), its log kept for assertions, killed when dropped.

use crate::cluster::{Error, Result, wait_for};
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long the proxy may take to log its listen address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running proxy.
#[derive(Debug)]
pub struct ProxyProcess {
    child: tokio::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    /// Reads the log until the process closes its stderr.
    log_reader: Option<tokio::task::JoinHandle<()>>,
}

impl ProxyProcess {
    /// Starts the proxy binary ([`binary`]) with `args` (plus `--listen 127.0.0.1:0
    /// --admin-listen 127.0.0.1:0 --log-json`) and the extra environment `env`; returns once it listens.
    pub async fn start<I, S>(args: I, env: &[(&str, &OsStr)]) -> Result<ProxyProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let bin = binary().await?;
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-json",
        ])
        .args(args)
        .env_remove("FLOODGATE_LISTEN")
        .env_remove("FLOODGATE_ADMIN_LISTEN")
        .env_remove("FLOODGATE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            command: bin.display().to_string(),
            source,
        })?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let log_reader = child
            .stderr
            .take()
            .map(|stderr| tokio::spawn(collect_log(stderr, log.clone(), addr_tx)));
        let (addr, admin) = match tokio::time::timeout(START_TIMEOUT, addr_rx).await {
            Ok(Ok(addrs)) => addrs,
            _ => {
                let _ = child.start_kill();
                return Err(Error::Setup(format!(
                    "floodgate-proxy did not log its listen address within {START_TIMEOUT:?}; its log:\n{}",
                    lines(&log).join("\n")
                )));
            }
        };
        Ok(ProxyProcess {
            child,
            addr,
            admin,
            log,
            log_reader,
        })
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADMIN{path}`: the admin listener (`/metrics`).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Every log line so far (JSON, one object per line).
    pub fn log(&self) -> Vec<String> {
        lines(&self.log)
    }

    /// Waits until a log line contains `needle`; returns that line.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        wait_for(
            &format!("a proxy log line containing {needle:?}"),
            timeout,
            || async { Ok(lines(&self.log).into_iter().find(|l| l.contains(needle))) },
        )
        .await
    }

    /// Asks the proxy to shut down as Kubernetes does (SIGTERM), and waits up to `timeout` for
    /// it to drain and exit; returns its exit status.
    pub async fn terminate(self, timeout: Duration) -> Result<std::process::ExitStatus> {
        self.send_sigterm().await?;
        self.wait_exit(timeout).await
    }

    /// Sends SIGTERM (again, if need be) without waiting.
    pub async fn send_sigterm(&self) -> Result<()> {
        self.signal("-TERM").await
    }

    /// Stops the process with SIGSTOP, as when its machine stalls: its connections stay open
    /// and it does nothing until [`ProxyProcess::resume`].
    pub async fn pause(&self) -> Result<()> {
        self.signal("-STOP").await
    }

    /// Continues a paused process (SIGCONT).
    pub async fn resume(&self) -> Result<()> {
        self.signal("-CONT").await
    }

    async fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| Error::Setup("floodgate-proxy has already exited".into()))?;
        let sent = tokio::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await
            .map_err(|source| Error::Spawn {
                command: format!("kill {signal} floodgate-proxy"),
                source,
            })?;
        if !sent.success() {
            return Err(Error::Setup(format!("kill {signal} {pid} failed ({sent})")));
        }
        Ok(())
    }

    /// [`ProxyProcess::terminate`], then waits (up to `timeout` again) until its log has been
    /// read to the end; returns the exit status and the whole log, the lines written while
    /// shutting down included.
    pub async fn terminate_with_log(
        mut self,
        timeout: Duration,
    ) -> Result<(std::process::ExitStatus, Vec<String>)> {
        let reader = self.log_reader.take();
        let log = self.log.clone();
        let status = self.terminate(timeout).await?;
        if let Some(reader) = reader {
            tokio::time::timeout(timeout, reader)
                .await
                .map_err(|_| Error::Timeout {
                    what: "the proxy's log to end after its exit".into(),
                    timeout,
                })?
                .map_err(|e| Error::Setup(format!("the log reader failed: {e}")))?;
        }
        Ok((status, lines(&log)))
    }

    /// Waits up to `timeout` for the process to exit; returns its exit status.
    pub async fn wait_exit(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.map_err(|source| Error::Spawn {
                command: "wait for floodgate-proxy".into(),
                source,
            }),
            Err(_) => Err(Error::Timeout {
                what: "floodgate-proxy to exit after SIGTERM".into(),
                timeout,
            }),
        }
    }

    /// Stops the process and waits for it to exit.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.child.start_kill();
        self.child
            .wait()
            .await
            .map(drop)
            .map_err(|source| Error::Spawn {
                command: "wait for floodgate-proxy".into(),
                source,
            })
    }
}

fn lines(log: &Mutex<Vec<String>>) -> Vec<String> {
    log.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

async fn collect_log(
    stderr: tokio::process::ChildStderr,
    log: Arc<Mutex<Vec<String>>>,
    addr_tx: tokio::sync::oneshot::Sender<(SocketAddr, SocketAddr)>,
) {
    let mut addr_tx = Some(addr_tx);
    let mut reader = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        if addr_tx.is_some()
            && let Some(addr) = listen_addrs(&line)
            && let Some(tx) = addr_tx.take()
        {
            let _ = tx.send(addr);
        }
        log.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(line);
    }
}

/// The `listen` and `admin_listen` fields of the proxy's "serving" JSON log line.
fn listen_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let field = |name: &str| -> Option<SocketAddr> {
        value
            .pointer(&format!("/fields/{name}"))?
            .as_str()?
            .parse()
            .ok()
    };
    Some((field("listen")?, field("admin_listen")?))
}

/// The proxy binary: `FLOODGATE_PROXY_BIN` when set (`make e2e` builds it first), else built
/// once per test process with `cargo build -p floodgate-proxy --bin floodgate-proxy`, so a test
/// run by hand never uses a stale binary.
pub async fn binary() -> Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = tokio::task::spawn_blocking(|| {
        BINARY.get_or_init(|| find_or_build().map_err(|e| e.to_string()))
    })
    .await
    .map_err(|e| Error::Setup(format!("building floodgate-proxy panicked: {e}")))?;
    found.clone().map_err(Error::Setup)
}

fn find_or_build() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("FLOODGATE_PROXY_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(Error::Setup(format!(
                "FLOODGATE_PROXY_BIN={} does not exist",
                bin.display()
            )))
        };
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(&cargo)
        .args([
            "build",
            "-p",
            "floodgate-proxy",
            "--bin",
            "floodgate-proxy",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| Error::Spawn {
            command: "cargo build -p floodgate-proxy".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "cargo build -p floodgate-proxy failed ({})",
            out.status
        )));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.pointer("/target/name").and_then(|n| n.as_str()) == Some("floodgate-proxy"))
        .find_map(|v| {
            v.get("executable")
                .and_then(|e| e.as_str())
                .map(PathBuf::from)
        })
        .ok_or_else(|| {
            Error::Setup("cargo build did not report the floodgate-proxy executable".into())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listen_address_is_read_from_the_json_log() {
        let line = r#"{"timestamp":"t","level":"INFO","fields":{"message":"floodgate-proxy serving","listen":"127.0.0.1:41234","admin_listen":"127.0.0.1:41235","models":0},"target":"floodgate_proxy"}"#;
        assert_eq!(
            listen_addrs(line),
            Some((
                "127.0.0.1:41234".parse().unwrap(),
                "127.0.0.1:41235".parse().unwrap()
            ))
        );
        assert_eq!(listen_addrs("not json"), None);
    }
}
