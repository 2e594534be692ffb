//! A real Kubernetes control plane for end-to-end tests: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok fake nodes, run on loopback by
//! `e2e/cluster.sh` from binaries that `e2e/tools.sh` builds.
//!
//! One cluster serves a whole test run; each test gets a fresh namespace ([`TestNamespace`]),
//! deleted when the guard drops, on failure too. Which cluster [`Cluster::get`] uses:
//!
//! 1. `FLOODGATE_E2E_KUBECONFIG`, when set (`make e2e` sets it to the cluster it started and
//!    stops). It must answer, or every test fails saying so: a harness told which cluster to
//!    use never quietly uses another.
//! 2. Otherwise the cluster of `make cluster-up` (`$FLOODGATE_CLUSTER_DIR/kubeconfig`, by default
//!    `~/.cache/floodgate/cluster/kubeconfig`), when it answers: the quick loop while writing
//!    tests.
//! 3. Otherwise the test process starts a private cluster (`~/.cache/floodgate/e2e-auto-<pid>`,
//!    about 15 s) and a detached watchdog that runs `cluster.sh down` as soon as the process
//!    exits, however it exits (pass, panic, abort, SIGKILL): Rust runs no destructors for
//!    statics at exit, and a watchdog also covers the deaths no destructor would see. Set
//!    `FLOODGATE_E2E_AUTOSTART=0` to fail instead.
//!
//! No container ever runs: kwok marks scheduled pods Running and Ready without a kubelet or
//! a container runtime. The suite therefore covers the API server's behaviour (schema, CEL
//! rules, defaults, status subresource, printer columns, watches, RBAC objects, controllers
//! creating ReplicaSets and Pods, scheduling onto GPU nodes) but not images, container
//! processes, probes, Services' traffic, DNS, or volumes.

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{Condition, await_condition, conditions};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use std::ffi::OsStr;
use std::fmt::Debug;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How long one kubectl call may take before it is killed.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
/// The label every test namespace carries, to find leftovers by hand.
pub const NAMESPACE_LABEL: &str = "floodgate.dev/e2e";

/// What can go wrong setting up or driving the cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable cluster, or its tools are missing.
    #[error("e2e cluster: {0}")]
    Setup(String),
    /// A child process could not be started.
    #[error("cannot run {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A wait ran out of time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
    },
    /// A kube API call failed.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// The kubeconfig could not be read.
    #[error(transparent)]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// A condition wait failed.
    #[error(transparent)]
    Wait(#[from] kube::runtime::wait::Error),
}

/// Result with the harness [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The cluster of this test run.
#[derive(Debug)]
pub struct Cluster {
    kubeconfig: PathBuf,
    bin: PathBuf,
    root: PathBuf,
}

/// The output of a finished command.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The output if the command succeeded, else an [`Error::Command`] with its stderr.
    pub fn ok(self) -> Result<Output> {
        if self.success() {
            Ok(self)
        } else {
            Err(Error::Command {
                command: self.command,
                status: self.status,
                stderr: self.stderr,
            })
        }
    }
}

impl Cluster {
    /// The cluster of this test run, found or started once per process (see the module docs).
    pub async fn get() -> Result<&'static Cluster> {
        static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
        // Finding or starting the cluster blocks (kubectl, cluster.sh); keep it off the
        // runtime's thread. Tests running in parallel wait on the same OnceLock.
        let cluster = tokio::task::spawn_blocking(|| {
            CLUSTER.get_or_init(|| Cluster::find_or_start().map_err(|e| e.to_string()))
        })
        .await
        .map_err(|e| Error::Setup(format!("cluster setup panicked: {e}")))?;
        cluster.as_ref().map_err(|e| Error::Setup(e.clone()))
    }

    /// The kubeconfig of the cluster (token auth, CA data inline).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory holding kubectl, helm and the control-plane binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The repository root, for manifests (`crds/manifests`, `examples/`).
    pub fn repo_root(&self) -> &Path {
        &self.root
    }

    /// A new client for the cluster. Each test makes its own: a client belongs to the tokio
    /// runtime it was made on, and every `#[tokio::test]` has its own runtime.
    pub async fn client(&self) -> Result<Client> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Runs kubectl against the cluster and captures its output, whatever its exit status.
    pub async fn kubectl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kubectl_with_stdin(args, None).await
    }

    /// Runs kubectl with `stdin` as its standard input (for `-f -`).
    pub async fn kubectl_stdin<I, S>(&self, args: I, stdin: &str) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kubectl_with_stdin(args, Some(stdin)).await
    }

    async fn kubectl_with_stdin<I, S>(&self, args: I, stdin: Option<&str>) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let command = format!(
            "kubectl {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut cmd = tokio::process::Command::new(self.bin.join("kubectl"));
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(&args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let spawn_error = |source| Error::Spawn {
            command: command.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_error)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A kubectl that exits without reading its input reports why on stderr: keep
            // that rather than the broken pipe. Dropping the pipe closes its stdin.
            let _ = pipe.write_all(text.as_bytes()).await;
        }
        let out = tokio::time::timeout(KUBECTL_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| Error::Timeout {
                what: command.clone(),
                timeout: KUBECTL_TIMEOUT,
            })?
            .map_err(spawn_error)?;
        Ok(Output {
            command,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Installs the generated CRDs (`crds/manifests/`) with server-side apply and waits until
    /// each is Established; returns their names. Idempotent: tests call it freely.
    pub async fn install_crds(&self) -> Result<Vec<String>> {
        let dir = self.root.join("crds/manifests");
        let out = self
            .kubectl([
                OsStr::new("apply"),
                OsStr::new("--server-side"),
                OsStr::new("--force-conflicts"),
                OsStr::new("--field-manager=floodgate-e2e"),
                OsStr::new("-o"),
                OsStr::new("name"),
                OsStr::new("-f"),
                dir.as_os_str(),
            ])
            .await?
            .ok()?;
        let names: Vec<String> = out
            .stdout
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("customresourcedefinition.apiextensions.k8s.io/")
            })
            .map(str::to_owned)
            .collect();
        if names.is_empty() {
            return Err(Error::Setup(format!(
                "no CRD applied from {}",
                dir.display()
            )));
        }
        let crds: Api<CustomResourceDefinition> = Api::all(self.client().await?);
        for name in &names {
            wait_for_condition(
                &crds,
                name,
                conditions::is_crd_established(),
                Duration::from_secs(30),
            )
            .await?;
        }
        Ok(names)
    }

    /// A fresh namespace named after `prefix`, deleted when the guard drops.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let name = unique_name(prefix);
        let namespaces: Api<Namespace> = Api::all(self.client().await?);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(NAMESPACE_LABEL.to_owned(), "true".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(TestNamespace {
            name,
            kubectl: self.bin.join("kubectl"),
            kubeconfig: self.kubeconfig.clone(),
            keep: std::env::var_os("FLOODGATE_E2E_KEEP_NAMESPACES").is_some_and(|v| v == "1"),
        })
    }

    fn find_or_start() -> Result<Cluster> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::Setup("no repository root above e2e/".into()))?;
        let cache = std::env::var_os("FLOODGATE_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/floodgate")))
            .ok_or_else(|| Error::Setup("neither FLOODGATE_CACHE nor HOME is set".into()))?;
        let bin =
            std::env::var_os("FLOODGATE_BIN").map_or_else(|| cache.join("bin"), PathBuf::from);
        let cluster = |kubeconfig: PathBuf| Cluster {
            kubeconfig,
            bin: bin.clone(),
            root: root.clone(),
        };
        if let Some(kubeconfig) = std::env::var_os("FLOODGATE_E2E_KUBECONFIG") {
            let c = cluster(PathBuf::from(kubeconfig));
            return match c.probe() {
                Ok(()) => Ok(c),
                Err(why) => Err(Error::Setup(format!(
                    "FLOODGATE_E2E_KUBECONFIG={} does not answer: {why}",
                    c.kubeconfig.display()
                ))),
            };
        }
        let dev_dir = std::env::var_os("FLOODGATE_CLUSTER_DIR")
            .map_or_else(|| cache.join("cluster"), PathBuf::from);
        let dev = cluster(dev_dir.join("kubeconfig"));
        if dev.kubeconfig.is_file() && dev.probe().is_ok() {
            return Ok(dev);
        }
        if std::env::var_os("FLOODGATE_E2E_AUTOSTART").is_some_and(|v| v == "0") {
            return Err(Error::Setup(
                "no cluster: run `make cluster-up`, or `make e2e`, or unset FLOODGATE_E2E_AUTOSTART".into(),
            ));
        }
        let dir = cache.join(format!("e2e-auto-{}", std::process::id()));
        start_private(&root, &dir)?;
        let c = cluster(dir.join("kubeconfig"));
        c.probe().map_err(Error::Setup)?;
        Ok(c)
    }

    /// Whether the API server answers `/readyz` with the kubeconfig's credentials.
    fn probe(&self) -> Result<(), String> {
        let out = std::process::Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--request-timeout=5s", "get", "--raw=/readyz"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run kubectl from {}: {e}", self.bin.display()))?;
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

/// Starts a cluster in `dir` for this process only, with a watchdog that stops it when the
/// process exits. The watchdog starts first, so that even a death during `up` is cleaned up.
fn start_private(root: &Path, dir: &Path) -> Result<()> {
    let script = root.join("e2e/cluster.sh");
    let tools = root.join("e2e/tools.sh");
    eprintln!(
        "floodgate-e2e: no running cluster; starting a private one in {} (stopped at exit)",
        dir.display()
    );
    let watchdog = "tail --pid=\"$1\" -f /dev/null; exec bash \"$2\" down";
    std::process::Command::new("setsid")
        .args(["bash", "-c", watchdog, "floodgate-e2e-watchdog"])
        .arg(std::process::id().to_string())
        .arg(&script)
        .env("FLOODGATE_CLUSTER_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| Error::Spawn {
            command: "setsid bash -c <watchdog>".into(),
            source,
        })?;
    for (what, args) in [
        ("tools.sh", vec![tools.as_os_str()]),
        ("cluster.sh up", vec![script.as_os_str(), OsStr::new("up")]),
    ] {
        // Their progress goes to our stderr, which the test harness shows on failure.
        let status = std::process::Command::new("bash")
            .args(args)
            .env("FLOODGATE_CLUSTER_DIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|source| Error::Spawn {
                command: what.into(),
                source,
            })?;
        if !status.success() {
            return Err(Error::Setup(format!("{what} failed ({status})")));
        }
    }
    Ok(())
}

/// `floodgate-<prefix>-<random>`, a valid namespace name (DNS label, at most 63 characters).
fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    clean.truncate(40);
    let clean = clean.trim_matches('-');
    // RandomState is seeded randomly per process; mixing in a counter makes names unique
    // within it.
    let suffix =
        RandomState::new().hash_one((std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    format!("fg-{clean}-{:06x}", suffix & 0xff_ffff)
}

/// A namespace for one test. Dropping it deletes the namespace (without waiting for its
/// contents to go), also when the test panics. `FLOODGATE_E2E_KEEP_NAMESPACES=1` keeps the
/// namespaces of failed tests for a look with kubectl.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    keep: bool,
}

impl TestNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.keep && std::thread::panicking() {
            eprintln!(
                "floodgate-e2e: keeping namespace {} of the failed test",
                self.name
            );
            return;
        }
        // Synchronous on purpose: Drop cannot await, and a task spawned here could die with
        // the test's runtime before it ran.
        let deleted = std::process::Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
                "--request-timeout=10s",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match deleted {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "floodgate-e2e: could not delete namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!(
                "floodgate-e2e: could not delete namespace {}: {e}",
                self.name
            ),
        }
    }
}

/// Polls `check` until it returns `Some`, with a short backoff (50 ms doubling to 500 ms),
/// failing with [`Error::Timeout`] after `timeout`. An error from `check` ends the wait at once;
/// a check that can fail transiently should map that to `Ok(None)`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                what: what.to_owned(),
                timeout,
            });
        }
        tokio::time::sleep(delay.min(left)).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Waits, by watching, until object `name` of `api` meets `condition`; returns it.
pub async fn wait_for_condition<K>(
    api: &Api<K>,
    name: &str,
    condition: impl Condition<K>,
    timeout: Duration,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let what = format!("{} {name}", K::kind(&Default::default()));
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, condition)).await {
        Ok(Ok(Some(object))) => Ok(object),
        Ok(Ok(None)) => Err(Error::Setup(format!(
            "{what} was deleted while waiting for it"
        ))),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Error::Timeout { what, timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_valid_and_unique() {
        let a = unique_name("Printer_Columns: show status!");
        let b = unique_name("Printer_Columns: show status!");
        assert_ne!(a, b);
        for name in [&a, &b, &unique_name(&"x".repeat(100))] {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
            assert!(!name.ends_with('-') && name.starts_with("fg-"), "{name}");
        }
    }

    #[tokio::test]
    async fn wait_for_times_out_naming_what_it_waited_for() {
        let err = wait_for("nothing", Duration::from_millis(120), || async {
            Ok::<Option<()>, Error>(None)
        })
        .await
        .unwrap_err();
        assert!(
            matches!(err, Error::Timeout { ref what, .. } if what == "nothing"),
            "{err}"
        );
        let mut calls = 0;
        let v = wait_for("the third call", Duration::from_secs(5), || {
            calls += 1;
            let done = calls >= 3;
            async move { Ok(done.then_some(calls)) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }
}
