//! A real redis-server for tests, on a free loopback port, stopped on drop.
//!
//! The binary is `$FLOODGATE_REDIS_SERVER` (set by `make unit`), else the one `make redis`
//! unpacks into `$HOME/.cache/floodgate/redis`, else `redis-server` on the `PATH`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a redis-server may take to say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// A running redis-server, without persistence unless started with a data directory
/// ([`RedisServer::start_in`]), open to anyone unless started with a password
/// ([`RedisServer::start_with_password`]).
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    options: Options,
    child: Option<Child>,
}

/// How a [`RedisServer`] runs, kept for its restarts.
#[derive(Debug, Clone, Default)]
struct Options {
    /// Where `dump.rdb` is loaded from and saved to.
    dir: Option<PathBuf>,
    /// What clients must `AUTH` with (`requirepass`).
    password: Option<String>,
}

impl RedisServer {
    /// Starts a redis-server on a free port of 127.0.0.1.
    pub async fn start() -> anyhow::Result<RedisServer> {
        Self::start_with(Options::default()).await
    }

    /// Starts a redis-server that loads `dir/dump.rdb` if there is one and writes it on
    /// [`RedisServer::save`] only (no automatic snapshots, no append-only file): a restart
    /// on the same directory, or a second server on it, comes back with the data of the
    /// last save, as after a restart with persistence or a failover to a replica that had
    /// not caught up.
    pub async fn start_in(dir: &std::path::Path) -> anyhow::Result<RedisServer> {
        Self::start_with(Options {
            dir: Some(dir.to_path_buf()),
            password: None,
        })
        .await
    }

    /// Starts a redis-server whose clients must log in with `password`; [`RedisServer::url`]
    /// carries it.
    pub async fn start_with_password(password: &str) -> anyhow::Result<RedisServer> {
        Self::start_with(Options {
            dir: None,
            password: Some(password.to_owned()),
        })
        .await
    }

    async fn start_with(options: Options) -> anyhow::Result<RedisServer> {
        // The port may be taken between choosing and binding it: try a few.
        let mut last = None;
        for _ in 0..5 {
            let port = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?
                .local_addr()?
                .port();
            match spawn(port, &options).await {
                Ok(child) => {
                    return Ok(RedisServer {
                        port,
                        options,
                        child: Some(child),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    /// `redis://127.0.0.1:PORT`, or `redis://:PASSWORD@127.0.0.1:PORT` for a server with a
    /// password.
    pub fn url(&self) -> String {
        match &self.options.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The port it listens on (kept across [`RedisServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL: as if its machine died) and waits for it to exit.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Stops the server with SIGSTOP: connections stay open and nothing is answered, as
    /// when its machine stalls. [`RedisServer::resume`] continues it.
    pub async fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP").await
    }

    /// Continues a paused server (SIGCONT).
    pub async fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT").await
    }

    async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .ok_or_else(|| anyhow::anyhow!("redis-server is not running"))?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed ({status})");
        Ok(())
    }

    /// Starts the server again on the same port, killing the running one if any: empty,
    /// or with the data of its directory's last save ([`RedisServer::start_in`]).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.child = Some(spawn(self.port, &self.options).await?);
        Ok(())
    }

    /// Writes the data set to its directory (`SAVE`, in RESP on a connection of its own);
    /// only for a server with one.
    pub async fn save(&self) -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        anyhow::ensure!(
            self.options.dir.is_some() && self.options.password.is_none(),
            "SAVE is for a redis-server with a data directory and no password"
        );
        let mut conn = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).await?;
        conn.write_all(b"*1\r\n$4\r\nSAVE\r\n").await?;
        let mut answer = [0u8; 5];
        conn.read_exact(&mut answer).await?;
        anyhow::ensure!(
            &answer == b"+OK\r\n",
            "SAVE failed: {}",
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// The redis-server binary to run.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FLOODGATE_REDIS_SERVER") {
        return PathBuf::from(path);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let cached = PathBuf::from(home).join(".cache/floodgate/redis/bin/redis-server");
        if cached.exists() {
            return cached;
        }
    }
    PathBuf::from("redis-server")
}

async fn spawn(port: u16, options: &Options) -> anyhow::Result<Child> {
    let bin = binary();
    let mut command = Command::new(&bin);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"]);
    if let Some(dir) = &options.dir {
        command
            .arg("--dir")
            .arg(dir)
            .args(["--dbfilename", "dump.rdb"]);
    }
    if let Some(password) = &options.password {
        command.args(["--requirepass", password]);
    }
    let mut child = command
        .args(["--loglevel", "notice", "--logfile", ""])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run {}: {e}; run `make redis` or set FLOODGATE_REDIS_SERVER",
                bin.display()
            )
        })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("redis-server: no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(READY_WITHIN, async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("Ready to accept connections") {
                return Ok(true);
            }
        }
        Ok::<_, std::io::Error>(false)
    })
    .await;
    match ready {
        Ok(Ok(true)) => {
            // Keep reading its log so that a full pipe never blocks it.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(child)
        }
        _ => {
            let _ = child.kill().await;
            anyhow::bail!("redis-server on port {port} did not become ready")
        }
    }
}
