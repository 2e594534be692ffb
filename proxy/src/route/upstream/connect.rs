//! Opening a connection to a provider: TCP, then TLS for an `https` URL, both within the
//! pool's `connectMs`, and a failure told apart by the phase it happened in. Once the TCP
//! connection is open, whatever ends the connect (a reset, an end of stream, rustls naming
//! the problem, or the time running out) ended the TLS handshake: a server that resets the
//! client hello is a `tls` failure, never a `connect` one, however the kernel words it.

use crate::providers::ProviderError;
use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream client: hyper's pooled client over TCP or TLS.
pub(in crate::route) type Http = Client<Timed<HttpsConnector<Tcp<HttpConnector>>>, Full<Bytes>>;

tokio::task_local! {
    /// Whether the TCP connection of the connect being polled (by [`Timed`]) is open: set by
    /// [`Tcp`], read by [`Timed`] when the connect fails.
    static OPENED: Arc<AtomicBool>;
}

/// A client for provider calls: pooled keep-alive connections (idle ones closed after 90 s),
/// Nagle off (a request is one write, and small SSE frames should not wait), TLS by rustls
/// with the platform's verifier (HTTP/2 where the provider offers it), and `connect` as the
/// bound on opening a connection, TLS handshake included, so an unreachable provider fails
/// over after `timeouts.connectMs`, not after the whole request's time. Redirects are not
/// followed: a provider's key travels in headers (`x-api-key`, `x-goog-api-key`) that a
/// redirect to another host would carry along; a 3xx is the provider's answer, classified
/// like any other.
pub(in crate::route) fn client(connect: Duration) -> Result<Http, rustls::Error> {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(Tcp(tcp));
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(Timed {
            inner: https,
            limit: connect,
        }))
}

/// A TCP connector that notes, for the [`Timed`] connect polling it, when its connection is
/// open.
#[derive(Clone, Debug)]
pub(in crate::route) struct Tcp<C>(C);

impl<C> tower::Service<http::Uri> for Tcp<C>
where
    C: tower::Service<http::Uri>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, C::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let stream = connecting.await?;
            // Outside a `Timed` connect there is no one to tell.
            let _ = OPENED.try_with(|opened| opened.store(true, Ordering::Release));
            Ok(stream)
        })
    }
}

/// A connector whose connections must be open (TCP and TLS) within `limit`. Past it the
/// attempt fails with an I/O error of kind `TimedOut`; any failure once the TCP connection
/// was open (the time running out included) is wrapped in a [`Handshake`].
#[derive(Clone, Debug)]
pub(in crate::route) struct Timed<C> {
    inner: C,
    limit: Duration,
}

impl<C> tower::Service<http::Uri> for Timed<C>
where
    C: tower::Service<http::Uri> + Send,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let opened = Arc::new(AtomicBool::new(false));
        let connecting = OPENED.scope(opened.clone(), self.inner.call(uri));
        let limit = self.limit;
        Box::pin(async move {
            let error: BoxError = match tokio::time::timeout(limit, connecting).await {
                Ok(Ok(connection)) => return Ok(connection),
                Ok(Err(e)) => e.into(),
                Err(_) if opened.load(Ordering::Acquire) => Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no TLS handshake within the connect timeout",
                )),
                Err(_) => Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no connection within the connect timeout",
                )),
            };
            if opened.load(Ordering::Acquire) {
                let handshake: BoxError = Box::new(Handshake(error));
                return Err(handshake);
            }
            Err(error)
        })
    }
}

/// A connect that failed once its TCP connection was open: in its TLS handshake (the only
/// step after it).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake: {0}")]
pub(in crate::route) struct Handshake(#[source] BoxError);

/// A failure to open a connection: the TLS handshake's (rustls named the problem, or the
/// connection failed once open) or the TCP connection's.
pub(in crate::route) fn connect_error(e: &(dyn std::error::Error + 'static)) -> ProviderError {
    // The innermost I/O error says what happened to the socket.
    let mut io_kind = None;
    let mut handshake = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return ProviderError::Tls(tls.to_string());
        }
        handshake |= err.is::<Handshake>();
        source = match err.downcast_ref::<std::io::Error>() {
            Some(io) => {
                io_kind = Some(io.kind());
                // `io::Error::source` skips the error it wraps: descend into that one.
                io.get_ref()
                    .map(|inner| inner as &(dyn std::error::Error + 'static))
            }
            None => err.source(),
        };
    }
    use std::io::ErrorKind as Kind;
    if handshake {
        let what = match io_kind {
            Some(Kind::UnexpectedEof | Kind::BrokenPipe) => {
                "the server closed the connection during the handshake".to_owned()
            }
            Some(Kind::ConnectionReset | Kind::ConnectionAborted) => {
                "the server reset the connection during the handshake".to_owned()
            }
            Some(Kind::TimedOut) => "no TLS handshake within the connect timeout".to_owned(),
            Some(kind) => kind.to_string(),
            None => "the connection failed during the handshake".to_owned(),
        };
        return ProviderError::Tls(what);
    }
    match io_kind {
        Some(Kind::ConnectionRefused) => ProviderError::Connect("connection refused".to_owned()),
        Some(Kind::TimedOut) => {
            ProviderError::Connect("no connection within the connect timeout".to_owned())
        }
        Some(kind) => ProviderError::Connect(kind.to_string()),
        None => ProviderError::Connect("unreachable".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use tower::{Service as _, ServiceExt as _};

    const LIMIT: Duration = Duration::from_millis(500);

    /// What a fake connect does: its TCP connection opens after a delay or fails (`Err`),
    /// then its handshake fails with `then` (`None`: never ends).
    #[derive(Clone, Copy)]
    struct Script {
        tcp: Result<Duration, ErrorKind>,
        then: Option<ErrorKind>,
    }

    /// Connects as `script` says under [`Timed`] and [`Tcp`], as the client does; the error
    /// classified, and how long it took.
    async fn connect(script: Script) -> (ProviderError, Duration) {
        let tcp = Tcp(tower::service_fn(move |_: http::Uri| async move {
            match script.tcp {
                Ok(after) => {
                    tokio::time::sleep(after).await;
                    Ok(())
                }
                Err(kind) => Err(std::io::Error::from(kind)),
            }
        }));
        let handshake = tower::service_fn(move |uri: http::Uri| {
            let mut tcp = tcp.clone();
            async move {
                tcp.call(uri).await?;
                match script.then {
                    Some(kind) => Err(std::io::Error::other(std::io::Error::from(kind))),
                    None => std::future::pending().await,
                }
            }
        });
        let mut timed = Timed {
            inner: handshake,
            limit: LIMIT,
        };
        let started = tokio::time::Instant::now();
        let uri: http::Uri = "https://provider.test/".parse().unwrap();
        let failed: Result<(), BoxError> = timed.ready().await.unwrap().call(uri).await;
        (connect_error(&*failed.unwrap_err()), started.elapsed())
    }

    /// The time running out after the TCP connection opened ran out in the TLS handshake;
    /// before it, in the TCP connect. Exactly at the limit either way.
    #[tokio::test(start_paused = true)]
    async fn the_connect_timeout_is_told_apart_by_the_phase_it_ran_out_in() {
        let (error, took) = connect(Script {
            tcp: Ok(LIMIT - Duration::from_millis(1)),
            then: None,
        })
        .await;
        assert_eq!(took, LIMIT);
        assert_eq!(error.metric_label(), "tls", "{error}");
        assert!(error.to_string().contains("no TLS handshake"), "{error}");
        let (error, took) = connect(Script {
            tcp: Ok(LIMIT + Duration::from_millis(1)),
            then: None,
        })
        .await;
        assert_eq!(took, LIMIT);
        assert_eq!(error.metric_label(), "connect", "{error}");
    }

    /// A reset or a closed pipe once the TCP connection is open is the handshake's failure;
    /// the same kinds before it are the TCP connect's.
    #[tokio::test(start_paused = true)]
    async fn a_reset_after_the_tcp_connection_opened_is_a_tls_failure() {
        for kind in [
            ErrorKind::ConnectionReset,
            ErrorKind::BrokenPipe,
            ErrorKind::UnexpectedEof,
        ] {
            let opened = Script {
                tcp: Ok(Duration::from_millis(1)),
                then: Some(kind),
            };
            let (error, _) = connect(opened).await;
            assert_eq!(error.metric_label(), "tls", "{kind:?}: {error}");
            let (error, _) = connect(Script {
                tcp: Err(kind),
                then: None,
            })
            .await;
            assert_eq!(error.metric_label(), "connect", "{kind:?}: {error}");
        }
        let (error, _) = connect(Script {
            tcp: Err(ErrorKind::ConnectionRefused),
            then: None,
        })
        .await;
        assert_eq!(
            error.to_string(),
            "could not connect to upstream: connection refused"
        );
    }
}
