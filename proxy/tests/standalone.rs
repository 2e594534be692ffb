//! The standalone proxy end to end: the examples load, the binary serves them, refuses bad
//! config before binding a port, and applies config changes without a restart.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use arc_swap::ArcSwap;
use floodgate_proxy::config::load::load_config;
use floodgate_proxy::config::secrets::SecretSources;
use floodgate_proxy::config::watch::Watcher;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

#[test]
fn every_example_directory_loads() {
    let (config, warnings) =
        load_config(&[example("scaling-500rpm")], SecretSources::default()).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let keys: u32 = config
        .pools
        .iter()
        .flat_map(|p| &p.providers)
        .flat_map(|p| &p.keys)
        .map(|k| k.rpm.get())
        .sum();
    assert_eq!(keys, 760);
    assert_eq!(config.local_models.len(), 3);
    assert_eq!(config.tier_queue.as_ref().unwrap().spec.tiers.len(), 4);
    // The hybrid routing of the scenario: three rules to the local pool, then premium.
    assert_eq!(config.routing.rules.len(), 4);
    assert!(config.routing.rules[..3].iter().all(|r| r.steps.len() == 2));
    let (config, _) = load_config(&[example("standalone")], SecretSources::default()).unwrap();
    assert_eq!(config.pools.len(), 2);
    // Simple and code prompts go to the local models first, then the quickstart pool.
    assert_eq!(config.routing.rules.len(), 3);
    assert_eq!(config.routing.rules[0].steps.len(), 2);
    assert_eq!(config.routing.rules[1].steps.len(), 2);
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_serves_the_standalone_example() {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_floodgate-proxy"))
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(example("standalone"))
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = BufReader::new(child.0.stderr.take().unwrap());
    // The reader ends when the child exits; the child is killed after 60 s at the latest.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listen=").nth(1) {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the proxy never logged its listen address");
    let body = http_get(&addr, "/v1/models");
    assert!(body.contains("\"claude-sonnet-4\""), "{body}");
    assert!(body.contains("\"object\":\"list\""), "{body}");
    assert!(http_get(&addr, "/readyz").contains("ready"));
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[test]
fn the_binary_refuses_bad_config_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let pool = std::fs::read_to_string(example("standalone/gateway.yaml"))
        .unwrap()
        .replace("rpm: 500", "rpm: 0");
    std::fs::write(dir.path().join("gateway.yaml"), pool).unwrap();
    std::fs::copy(
        example("standalone/secrets.yaml"),
        dir.path().join("secrets.yaml"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_floodgate-proxy"))
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "gateway.yaml: document 1 (AIProviderPool/quickstart): spec.providers[0].keys[0].rpm"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("placeholder-openai-key"), "{stderr}");
}

/// Waits up to 10 s for `cond`, polling; never a fixed sleep.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn config_changes_apply_live_and_bad_changes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = dir.path().join("gateway.yaml");
    let original = std::fs::read_to_string(example("standalone/gateway.yaml")).unwrap();
    std::fs::write(&gateway, &original).unwrap();
    std::fs::copy(
        example("standalone/secrets.yaml"),
        dir.path().join("secrets.yaml"),
    )
    .unwrap();
    let paths = vec![dir.path().to_owned()];
    let watcher = Watcher::new(
        paths.clone(),
        SecretSources::default(),
        Duration::from_millis(20),
    );
    let (config, _) = load_config(&paths, SecretSources::default()).unwrap();
    let shared = Arc::new(ArcSwap::from_pointee(config));
    let stats = watcher.stats();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(watcher.run(shared.clone(), cancel.clone()));
    let openai_rpm = |s: &ArcSwap<floodgate_proxy::config::Config>| {
        let config = s.load();
        let pool = config
            .pools
            .iter()
            .find(|p| p.name == "quickstart")
            .unwrap();
        pool.providers[0].keys[0].rpm.get()
    };
    assert_eq!(openai_rpm(&shared), 500);

    std::fs::write(&gateway, original.replace("rpm: 500", "rpm: 7")).unwrap();
    assert!(
        eventually(|| openai_rpm(&shared) == 7).await,
        "a lower limit was not applied"
    );

    std::fs::write(&gateway, original.replace("rpm: 500", "rpm: -3")).unwrap();
    assert!(
        eventually(|| stats.rejected.load(Ordering::Relaxed) == 1).await,
        "the bad change was not seen"
    );
    assert_eq!(
        openai_rpm(&shared),
        7,
        "a rejected change must leave the running config alone"
    );

    std::fs::write(dir.path().join("extra.yaml"), "apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {name: extra}\nspec:\n  providers:\n  - {name: vllm, type: openai-compatible, baseUrl: \"http://127.0.0.1:9\", models: [{name: qwen}]}\n").unwrap();
    std::fs::write(&gateway, &original).unwrap();
    assert!(eventually(|| shared.load().pools.len() == 2 && openai_rpm(&shared) == 500).await);
    cancel.cancel();
    task.await.unwrap();
}
