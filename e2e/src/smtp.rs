//! A local SMTP sink for the job email tests: a small server on a free loopback port that
//! speaks EHLO, STARTTLS (rustls with ring, a CA and a `localhost` certificate made here with
//! rcgen), AUTH PLAIN and AUTH LOGIN, MAIL/RCPT/DATA, RSET, NOOP and QUIT, and records what it
//! was sent.
//!
//! It behaves as a submission server that protects credentials: before STARTTLS it refuses
//! AUTH and MAIL (`530`), so a client that logs in or sends over plain text gets nothing
//! through. With [`SinkOptions::starttls`] off it never offers STARTTLS (a server a careful
//! client must refuse to talk to).

use anyhow::{Context as _, Result};
use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};

/// One message the sink accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Mail {
    /// Who logged in to send it.
    pub user: String,
    /// `MAIL FROM` address.
    pub from: String,
    /// `RCPT TO` addresses.
    pub to: Vec<String>,
    /// The message as sent after `DATA` (headers and body), dot-unstuffed.
    pub data: String,
    /// Whether it came over TLS (always, as the sink refuses MAIL before STARTTLS).
    pub tls: bool,
}

/// One AUTH command.
#[derive(Debug, Clone, PartialEq)]
pub struct Login {
    /// The user name given (empty when the AUTH was refused before TLS).
    pub user: String,
    /// Whether the user and password were right.
    pub accepted: bool,
    /// Whether it came over TLS.
    pub tls: bool,
}

/// How the sink behaves.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// The login it accepts.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Whether STARTTLS is offered.
    pub starttls: bool,
}

#[derive(Debug, Default)]
struct Log {
    mails: Vec<Mail>,
    logins: Vec<Login>,
    /// Commands refused because TLS was not on (AUTH, MAIL).
    refused_plain: usize,
}

/// A running sink; it stops when dropped.
#[derive(Debug)]
pub struct SmtpSink {
    addr: SocketAddr,
    ca_pem: String,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpSink {
    /// Starts a sink on a free loopback port.
    pub async fn start(options: SinkOptions) -> Result<SmtpSink> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (ca_pem, acceptor) = tls_acceptor()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let log: Arc<Mutex<Log>> = Arc::default();
        let shared = log.clone();
        let options = Arc::new(options);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = shared.clone();
                let acceptor = acceptor.clone();
                let options = options.clone();
                tokio::spawn(async move {
                    let _ = session(stream, acceptor, &options, &log).await;
                });
            }
        });
        Ok(SmtpSink {
            addr,
            ca_pem,
            log,
            task,
        })
    }

    /// `localhost:<port>`: the name its certificate carries.
    pub fn server(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// The PEM of the CA that signed its certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The messages accepted so far.
    pub fn mails(&self) -> Vec<Mail> {
        self.lock().mails.clone()
    }

    /// The AUTH commands so far.
    pub fn logins(&self) -> Vec<Login> {
        self.lock().logins.clone()
    }

    /// How many AUTH or MAIL commands were refused for coming before STARTTLS.
    pub fn refused_plain(&self) -> usize {
        self.lock().refused_plain
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A CA and a `localhost` certificate it signed: the CA's PEM and an acceptor serving the
/// certificate.
fn tls_acceptor() -> Result<(String, tokio_rustls::TlsAcceptor)> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "floodgate e2e smtp ca");
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow::anyhow!("the sink's key: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)
    .context("the sink's certificate")?;
    Ok((
        ca_cert.pem(),
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    ))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection: plain until STARTTLS, then the rest over TLS.
async fn session(
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    options: &SinkOptions,
    log: &Mutex<Log>,
) -> Result<()> {
    let mut plain = BufReader::new(stream);
    plain.get_mut().write_all(b"220 sink ESMTP\r\n").await?;
    if commands(&mut plain, false, options, log).await?.is_none() {
        return Ok(());
    }
    let tls = acceptor.accept(plain.into_inner()).await?;
    let mut tls = BufReader::new(tls);
    commands(&mut tls, true, options, log).await?;
    Ok(())
}

/// Reads one line (without its CRLF); `None` at the end of the stream.
async fn line<S: Io>(s: &mut BufReader<S>) -> Result<Option<String>> {
    let mut buf = String::new();
    if s.read_line(&mut buf).await? == 0 {
        return Ok(None);
    }
    Ok(Some(buf.trim_end_matches(['\r', '\n']).to_owned()))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default()
}

/// Serves commands until QUIT or the end of the stream (`None`), or STARTTLS (`Some(())`:
/// the caller upgrades the connection).
async fn commands<S: Io>(
    s: &mut BufReader<S>,
    tls: bool,
    options: &SinkOptions,
    log: &Mutex<Log>,
) -> Result<Option<()>> {
    let lock = || log.lock().unwrap_or_else(|p| p.into_inner());
    let mut user: Option<String> = None;
    let mut from = String::new();
    let mut to = Vec::new();
    while let Some(cmd) = line(s).await? {
        let upper = cmd.to_ascii_uppercase();
        let verb = upper
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        let reply: String = match verb.as_str() {
            "EHLO" | "HELO" => {
                let mut r = "250-sink\r\n".to_owned();
                if options.starttls && !tls {
                    r.push_str("250-STARTTLS\r\n");
                }
                r.push_str("250-AUTH PLAIN LOGIN\r\n250 8BITMIME");
                r
            }
            "STARTTLS" if options.starttls && !tls => {
                s.get_mut().write_all(b"220 2.0.0 ready\r\n").await?;
                s.get_mut().flush().await?;
                return Ok(Some(()));
            }
            "AUTH" | "MAIL" if !tls => {
                lock().refused_plain += 1;
                if verb == "AUTH" {
                    lock().logins.push(Login {
                        user: String::new(),
                        accepted: false,
                        tls,
                    });
                }
                "530 5.7.0 Must issue a STARTTLS command first".to_owned()
            }
            "AUTH" => {
                let words: Vec<&str> = cmd.split_whitespace().collect();
                let (u, p) = match words.get(1).map(|m| m.to_ascii_uppercase()).as_deref() {
                    Some("PLAIN") => {
                        let given = match words.get(2) {
                            Some(g) => (*g).to_owned(),
                            None => {
                                s.get_mut().write_all(b"334 \r\n").await?;
                                line(s).await?.unwrap_or_default()
                            }
                        };
                        let plain = b64(&given);
                        let mut parts = plain.split('\0');
                        let _authz = parts.next();
                        (
                            parts.next().unwrap_or_default().to_owned(),
                            parts.next().unwrap_or_default().to_owned(),
                        )
                    }
                    Some("LOGIN") => {
                        s.get_mut().write_all(b"334 VXNlcm5hbWU6\r\n").await?;
                        let u = b64(&line(s).await?.unwrap_or_default());
                        s.get_mut().write_all(b"334 UGFzc3dvcmQ6\r\n").await?;
                        let p = b64(&line(s).await?.unwrap_or_default());
                        (u, p)
                    }
                    _ => (String::new(), String::new()),
                };
                let accepted = u == options.user && p == options.password;
                lock().logins.push(Login {
                    user: u.clone(),
                    accepted,
                    tls,
                });
                if accepted {
                    user = Some(u);
                    "235 2.7.0 Authentication successful".to_owned()
                } else {
                    "535 5.7.8 Authentication credentials invalid".to_owned()
                }
            }
            "MAIL" if user.is_none() => "530 5.7.0 Authentication required".to_owned(),
            "MAIL" => {
                from = address(&cmd);
                to.clear();
                "250 2.1.0 OK".to_owned()
            }
            "RCPT" => {
                to.push(address(&cmd));
                "250 2.1.5 OK".to_owned()
            }
            "DATA" if to.is_empty() => "503 5.5.1 RCPT first".to_owned(),
            "DATA" => {
                s.get_mut()
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let mut data = String::new();
                while let Some(l) = line(s).await? {
                    if l == "." {
                        break;
                    }
                    data.push_str(l.strip_prefix('.').unwrap_or(&l));
                    data.push_str("\r\n");
                }
                lock().mails.push(Mail {
                    user: user.clone().unwrap_or_default(),
                    from: std::mem::take(&mut from),
                    to: std::mem::take(&mut to),
                    data,
                    tls,
                });
                "250 2.0.0 OK queued".to_owned()
            }
            "RSET" => {
                from.clear();
                to.clear();
                "250 2.0.0 OK".to_owned()
            }
            "NOOP" => "250 2.0.0 OK".to_owned(),
            "QUIT" => {
                s.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(None);
            }
            _ => "502 5.5.2 Command not recognized".to_owned(),
        };
        s.get_mut().write_all(reply.as_bytes()).await?;
        s.get_mut().write_all(b"\r\n").await?;
        s.get_mut().flush().await?;
    }
    Ok(None)
}

/// The address in `MAIL FROM:<a>` or `RCPT TO:<a>`.
fn address(cmd: &str) -> String {
    let start = cmd.find('<').map_or(0, |i| i + 1);
    let end = cmd[start..].find('>').map_or(cmd.len(), |i| start + i);
    cmd[start..end].to_owned()
}
