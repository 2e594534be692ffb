//! Where API keys come from in standalone mode: Secret manifests beside the config, environment
//! variables, or a directory laid out like a mounted Secret (`DIR/<secret>/<key>`).

use crate::secret::SecretString;
use std::collections::HashMap;
use std::path::PathBuf;

/// Looks up one key of one Secret.
pub trait SecretLookup: Send + Sync {
    /// The value of `key` in Secret `name`, if known.
    fn lookup(&self, name: &str, key: &str) -> Option<SecretString>;
}

/// The environment variable that overrides `key` of Secret `name`:
/// `FLOODGATE_SECRET_<NAME>_<KEY>`, upper-cased, every other character as `_`.
pub fn env_var_name(name: &str, key: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("FLOODGATE_SECRET_{}_{}", clean(name), clean(key))
}

/// Secret sources in order of precedence: environment, secrets directory, Secret manifests.
/// `Debug` shows which variables are set, never their values.
#[derive(Clone, Default)]
pub struct SecretSources {
    /// A snapshot of the environment (tests pass their own; the binary passes `std::env::vars`).
    pub env: HashMap<String, String>,
    /// A directory holding `<secret>/<key>` files, as a mounted Secret volume does.
    pub dir: Option<PathBuf>,
    /// Values from `kind: Secret` manifests, keyed by (secret, key).
    pub manifests: HashMap<(String, String), SecretString>,
}

impl std::fmt::Debug for SecretSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut env: Vec<&String> = self.env.keys().collect();
        env.sort();
        f.debug_struct("SecretSources")
            .field("env", &env)
            .field("dir", &self.dir)
            .field("manifests", &self.manifests.len())
            .finish()
    }
}

impl SecretLookup for SecretSources {
    fn lookup(&self, name: &str, key: &str) -> Option<SecretString> {
        if let Some(v) = self
            .env
            .get(&env_var_name(name, key))
            .filter(|v| !v.is_empty())
        {
            return Some(SecretString::new(v.as_str()));
        }
        if let Some(dir) = &self.dir
            && let Ok(v) = std::fs::read_to_string(dir.join(name).join(key))
        {
            return Some(SecretString::new(v.trim_end_matches(['\n', '\r'])));
        }
        self.manifests
            .get(&(name.to_owned(), key.to_owned()))
            .cloned()
    }
}
