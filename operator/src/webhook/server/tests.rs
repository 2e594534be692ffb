use super::*;

/// An AdmissionReview of creating `pod`, as the API server sends it.
fn review(pod: serde_json::Value) -> AdmissionReview<Pod> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "oldObject": null, "dryRun": false, "options": null
        }
    }))
    .unwrap()
}

#[test]
fn a_pod_on_the_sidecars_port_is_denied_naming_the_container_and_the_way_out() {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "app-", "labels": {"floodgate.dev/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "app:1",
                                 "ports": [{"containerPort": mutate::DEFAULT_PORT}]}]}
    });
    let answer = serde_json::to_value(review_pod(
        review(pod.clone()),
        &Sidecar::default(),
        Scope::Pod,
    ))
    .unwrap();
    let response = &answer["response"];
    assert_eq!(response["allowed"], false, "{answer}");
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains(r#"container "app" already uses port 14080"#)
            && message.contains(mutate::PORT),
        "{message}"
    );
    // Elsewhere the same pod is patched.
    let moved = Sidecar {
        port: 15999,
        ..Sidecar::default()
    };
    let answer = serde_json::to_value(review_pod(review(pod), &moved, Scope::Pod)).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
}

#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_a_client_that_never_finishes_its_handshake() {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        Arc::new(CertSlot::default()),
        Sidecar::default(),
        shutdown.clone(),
        Duration::ZERO,
    ));
    // Connects and says nothing, holding the connection open.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Let the server accept it (the paused clock advances only once everything idles).
    tokio::time::sleep(Duration::from_millis(10)).await;
    let asked = tokio::time::Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("the server returns after shutdown")
        .unwrap();
    assert!(asked.elapsed() < HANDSHAKE_TIMEOUT, "{:?}", asked.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_dropped_at_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(serve(
        listener,
        Arc::new(CertSlot::default()),
        Sidecar::default(),
        shutdown,
        DRAIN,
    ));
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connected = tokio::time::Instant::now();
    // The server closes it: the read ends (EOF or reset) at the timeout, not before.
    let _ = silent.read(&mut [0u8; 16]).await;
    let waited = connected.elapsed();
    assert!(
        waited >= HANDSHAKE_TIMEOUT && waited < HANDSHAKE_TIMEOUT + Duration::from_secs(1),
        "{waited:?}"
    );
}

/// A server on loopback with a certificate for `127.0.0.1`, draining for [`DRAIN`] after
/// `shutdown`; returns its address and a TLS client trusting it.
async fn tls_server(
    shutdown: CancellationToken,
) -> (
    SocketAddr,
    tokio_rustls::TlsConnector,
    tokio::task::JoinHandle<()>,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let bundle = crate::webhook::certs::generate(
        &["127.0.0.1".to_owned()],
        now,
        Duration::from_secs(86_400),
    )
    .unwrap();
    let slot = Arc::new(CertSlot::default());
    slot.set(certified_key(&bundle.cert_pem, &bundle.key_pem).unwrap());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(bundle.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(listener, slot, Sidecar::default(), shutdown, DRAIN));
    (
        addr,
        tokio_rustls::TlsConnector::from(Arc::new(client)),
        server,
    )
}

/// `GET /healthz` on a new TLS connection to `addr`: the response's status line, or why
/// there was none.
async fn new_connection_health(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
) -> Result<String, std::io::Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = tls.connect(name, tcp).await?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

/// After SIGTERM the webhook's pod stays in the Service's endpoints for a while: the webhook
/// answers new connections until the drain ends, and refuses them only after it.
#[tokio::test(start_paused = true)]
async fn after_shutdown_new_connections_are_served_until_the_drain_ends() {
    let shutdown = CancellationToken::new();
    let (addr, tls, server) = tls_server(shutdown.clone()).await;
    assert_eq!(
        new_connection_health(addr, &tls).await.unwrap(),
        "HTTP/1.1 200 OK"
    );
    let asked = tokio::time::Instant::now();
    shutdown.cancel();
    tokio::time::sleep(DRAIN - Duration::from_millis(1)).await;
    assert_eq!(
        new_connection_health(addr, &tls).await.unwrap(),
        "HTTP/1.1 200 OK",
        "a new connection {:?} after shutdown",
        asked.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(2)).await;
    let refused = new_connection_health(addr, &tls).await;
    assert!(refused.is_err(), "{refused:?} after the drain");
    server.await.unwrap();
    assert!(
        asked.elapsed() < DRAIN + SHUTDOWN_GRACE,
        "{:?}",
        asked.elapsed()
    );
}
