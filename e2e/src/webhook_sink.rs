//! A webhook receiver for the durability tests that tells a delivery its sender waited for
//! apart from one its sender abandoned. It speaks HTTP/1.1 itself (keep-alive, bodies by
//! `content-length`) on a free loopback port and holds each POST for a while before it
//! answers 200, watching the connection meanwhile: a sender that goes away first (the kernel
//! closes a SIGKILLed process's sockets) leaves an *abandoned* delivery, never counted as
//! received. So "received once" means what a sender can know: answered 2xx while it waited.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// One POST: its headers and body.
pub type Delivery = (HeaderMap, Bytes);

#[derive(Debug, Default)]
struct Seen {
    /// Arrived, being held.
    holding: usize,
    /// Answered 200 while their sender waited.
    answered: Vec<Delivery>,
    /// Whose sender went away before the answer.
    abandoned: Vec<Delivery>,
}

/// The receiver; stops when dropped.
#[derive(Debug)]
pub struct HoldingReceiver {
    url: String,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldingReceiver {
    /// Starts a receiver that holds each POST `hold` before answering it.
    pub async fn start(hold: Duration) -> std::io::Result<HoldingReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, hold, shared.clone()));
            }
        });
        Ok(HoldingReceiver { url, seen, task })
    }

    /// Where to POST.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// POSTs arrived and not yet answered or abandoned.
    pub fn holding(&self) -> usize {
        self.lock().holding
    }

    /// POSTs answered 200 while their sender waited, in the order answered.
    pub fn answered(&self) -> Vec<Delivery> {
        self.lock().answered.clone()
    }

    /// POSTs whose sender went away before the answer.
    pub fn abandoned(&self) -> Vec<Delivery> {
        self.lock().abandoned.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for HoldingReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection: each request held `hold`, then answered, unless the sender closes first.
async fn serve(mut stream: TcpStream, hold: Duration, seen: Arc<Mutex<Seen>>) {
    let lock = || seen.lock().unwrap_or_else(|p| p.into_inner());
    let mut buf = Vec::new();
    while let Some(delivery) = read_request(&mut stream, &mut buf).await {
        lock().holding += 1;
        let gone = tokio::select! {
            () = tokio::time::sleep(hold) => false,
            () = closed(&mut stream, &mut buf) => true,
        };
        let answered = !gone
            && stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .is_ok();
        let mut s = lock();
        s.holding -= 1;
        if answered {
            s.answered.push(delivery);
        } else {
            s.abandoned.push(delivery);
            return;
        }
    }
}

/// Resolves when the peer closes the connection; what it sends meanwhile is kept in `buf`.
async fn closed(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads into `buf` until it holds `n` bytes; `None` when the connection ends first.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Option<()> {
    let mut chunk = [0u8; 4096];
    while buf.len() < n {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(got) => buf.extend_from_slice(&chunk[..got]),
        }
    }
    Some(())
}

/// The next request on the connection (its head and `content-length` body), consumed from
/// `buf`; `None` when the connection ends or the request is not one we read.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Delivery> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let more = buf.len() + 1;
        fill(stream, buf, more).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).ok()?.to_owned();
    let mut headers = HeaderMap::new();
    for line in head.lines().skip(1) {
        let (name, value) = line.split_once(':')?;
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
            HeaderValue::from_str(value.trim()).ok()?,
        );
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let start = head_end + 4;
    fill(stream, buf, start + length).await?;
    let body = Bytes::copy_from_slice(&buf[start..start + length]);
    buf.drain(..start + length);
    Some((headers, body))
}
