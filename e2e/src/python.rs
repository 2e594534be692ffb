//! The official provider SDKs in Python, run against a gateway as an application would: the
//! scripts in `e2e/python/` in the virtual environment `make python-venv` builds.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// Where `make python-venv` puts the environment's interpreter: `$FLOODGATE_VENV/bin/python`,
/// else `~/.cache/floodgate/venv/bin/python`.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("FLOODGATE_VENV").map_or_else(
        || Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/floodgate/venv"),
        PathBuf::from,
    );
    venv.join("bin/python")
}

/// Runs `e2e/python/<script>` with `args` in the venv, killed after `limit`. The SDKs' HTTP
/// clients honour proxy variables, so they are removed: 127.0.0.1 must be reached directly.
pub async fn run_script(script: &str, args: &[String], limit: Duration) -> anyhow::Result<Output> {
    let python = venv_python();
    anyhow::ensure!(
        python.is_file(),
        "no Python environment with the SDKs at {}: run `make python-venv` \
         (`make unit` and `make test` run it first), or set FLOODGATE_VENV",
        python.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let mut command = tokio::process::Command::new(&python);
    command.arg(&script).args(args).kill_on_drop(true);
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        command.env_remove(var);
    }
    let output = tokio::time::timeout(limit, command.output())
        .await
        .map_err(|_| anyhow::anyhow!("{} did not finish within {limit:?}", script.display()))??;
    Ok(output)
}
