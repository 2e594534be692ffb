//! Applying configuration changes without a restart: the config files (and the secrets
//! directory) are polled; a valid change replaces the configuration for new requests, an
//! invalid one is logged and the running configuration keeps serving.

use super::Config;
use super::load::{config_files, load_config};
use super::secrets::SecretSources;
use arc_swap::ArcSwap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where a new configuration goes. The dispatcher builds its routing view from it and swaps
/// both at once (`route::Dispatcher`); a plain `ArcSwap<Config>` just stores it.
pub trait ConfigSink: Send + Sync + 'static {
    /// Serves `config` from now on.
    fn apply(&self, config: Config);
}

impl ConfigSink for ArcSwap<Config> {
    fn apply(&self, config: Config) {
        self.store(Arc::new(config));
    }
}

/// The receiver of every configuration change.
pub type SharedConfig = Arc<dyn ConfigSink>;

/// Counts of reload outcomes, for metrics and tests.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Changes applied.
    pub applied: AtomicU64,
    /// Changes refused because they were invalid.
    pub rejected: AtomicU64,
}

/// Polls the configuration files and applies valid changes.
#[derive(Debug)]
pub struct Watcher {
    paths: Vec<PathBuf>,
    secrets: SecretSources,
    interval: Duration,
    stats: Arc<ReloadStats>,
    last: u64,
}

impl Watcher {
    /// A watcher of `paths`, resolving secrets from `secrets`, polling every `interval`.
    ///
    /// The files are fingerprinted now: create the watcher before loading the configuration it
    /// guards, so that a change made in between is not missed.
    pub fn new(paths: Vec<PathBuf>, secrets: SecretSources, interval: Duration) -> Self {
        let last = fingerprint(&paths, secrets.dir.as_deref());
        Self {
            paths,
            secrets,
            interval,
            stats: Arc::default(),
            last,
        }
    }

    /// Reload outcome counters.
    pub fn stats(&self) -> Arc<ReloadStats> {
        self.stats.clone()
    }

    /// Runs until `cancel` fires, applying each valid change to `shared`.
    ///
    /// Reading and hashing the files, validating (CEL rules included) and building the
    /// routing view run on the blocking pool, never on the runtime that runs this task: in
    /// the binary that runtime also carries every Redis admission, which must not wait
    /// behind configuration work.
    pub async fn run(self, shared: SharedConfig, cancel: CancellationToken) {
        let this = Arc::new(self);
        let mut last = this.last;
        // What the previous look saw: a change is applied once the files have stayed the same
        // across two looks an interval apart, so that a file being written is not applied
        // half-way (a writer that pauses longer than an interval still can be: rename into place).
        let mut seen = last;
        let mut ticker = tokio::time::interval(this.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let (watcher, sink) = (this.clone(), shared.clone());
            let checked =
                tokio::task::spawn_blocking(move || watcher.check(last, seen, &*sink)).await;
            match checked {
                Ok((applied, now)) => (last, seen) = (applied, now),
                Err(e) => tracing::error!(error = %e, "configuration check failed"),
            }
        }
    }

    /// One look at the files: if they changed since `last` (the fingerprint last applied or
    /// rejected) and are the same as the previous look saw (`seen`), loads and applies them.
    /// Returns the fingerprint now last applied or rejected, and the one seen now. Blocking.
    fn check(&self, last: u64, seen: u64, sink: &dyn ConfigSink) -> (u64, u64) {
        let now = fingerprint(&self.paths, self.secrets.dir.as_deref());
        if now == last || now != seen {
            // Unchanged, or changed since the previous look: still being written, perhaps.
            return (last, now);
        }
        match load_config(&self.paths, self.secrets.clone()) {
            Ok((config, _warnings)) => {
                sink.apply(config);
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!("configuration change applied");
            }
            Err(errors) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%errors, "configuration change rejected; the previous configuration keeps serving");
            }
        }
        (now, now)
    }
}

/// A hash of the names and contents of every config file and secret file: cheap for the few
/// small files a gateway has, and immune to coarse or unchanged modification times.
fn fingerprint(paths: &[PathBuf], secrets_dir: Option<&Path>) -> u64 {
    let mut hasher = DefaultHasher::new();
    let mut files = config_files(paths).unwrap_or_default();
    if let Some(dir) = secrets_dir {
        collect_files(dir, &mut files);
    }
    for file in files {
        file.hash(&mut hasher);
        std::fs::read(&file).ok().hash(&mut hasher);
    }
    hasher.finish()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: keys}\nstringData: {a: sk-a}\n---\n\
        apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {name: pool}\nspec:\n\
        \x20 providers:\n\
        \x20 - {name: openai, type: openai, baseUrl: \"http://127.0.0.1:9\", models: [{name: m}], \
        keys: [{secretRef: {name: keys, key: a}, rpm: 10}]}\n";

    /// The pools of each configuration applied, in order.
    #[derive(Default)]
    struct Applied(std::sync::Mutex<Vec<usize>>);

    impl ConfigSink for Applied {
        fn apply(&self, config: Config) {
            self.0.lock().unwrap().push(config.pools.len());
        }
    }

    #[test]
    fn a_change_is_applied_once_it_holds_still_and_an_empty_file_never() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pool.yaml");
        std::fs::write(&file, POOL).unwrap();
        let watcher = Watcher::new(
            vec![dir.path().to_owned()],
            SecretSources::default(),
            Duration::from_secs(1),
        );
        let applied = Applied::default();
        let start = watcher.last;
        // Unchanged: nothing to do.
        assert_eq!(watcher.check(start, start, &applied), (start, start));
        // A second pool appears: the first look only notes the change...
        std::fs::write(
            dir.path().join("other.yaml"),
            POOL.replace("{name: pool}", "{name: other}")
                .replace("{name: keys}", "{name: keys2}")
                .replace("name: keys, key", "name: keys2, key"),
        )
        .unwrap();
        let (last, seen) = watcher.check(start, start, &applied);
        assert_eq!(last, start);
        assert_ne!(seen, start);
        assert!(applied.0.lock().unwrap().is_empty(), "applied half-way");
        // ... the next, with the files unchanged, applies it.
        let (last, seen) = watcher.check(last, seen, &applied);
        assert_eq!(last, seen);
        assert_eq!(*applied.0.lock().unwrap(), vec![2]);
        // The file is truncated (being rewritten) and stays so: refused, never applied.
        std::fs::write(dir.path().join("other.yaml"), "").unwrap();
        let (last, seen) = watcher.check(last, seen, &applied);
        let (last, seen) = watcher.check(last, seen, &applied);
        assert_eq!(last, seen);
        assert_eq!(
            *applied.0.lock().unwrap(),
            vec![2],
            "the empty file was applied"
        );
        assert_eq!(watcher.stats.rejected.load(Ordering::Relaxed), 1);
    }
}
