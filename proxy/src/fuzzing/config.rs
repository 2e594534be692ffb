//! The standalone configuration loader: one manifest file of multi-document YAML.

use std::path::Path;

use crate::config::load::{Loaded, check_duplicates, parse_file};
use crate::config::secrets::SecretSources;
use crate::config::{Config, ConfigError};

/// Shortest secret value checked for leaks: shorter ones turn up in messages by chance.
const MIN_SECRET_LEN: usize = 12;

/// A manifest file as `load_config` reads it: documents parsed and validated (schema and
/// CEL rules), names checked for duplicates, and, when all are valid, resolved with the
/// file's own Secrets. No error or warning may hold a secret's value.
pub fn config_load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut loaded = Loaded::default();
    let mut errors: Vec<ConfigError> = Vec::new();
    parse_file(Path::new("fuzz.yaml"), text, &mut loaded, &mut errors);
    check_duplicates(&loaded.resources, &mut errors);
    let secrets: Vec<String> = loaded
        .secrets
        .values()
        .map(|s| s.expose().to_owned())
        .collect();
    let mut messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    messages.append(&mut loaded.warnings);
    if errors.is_empty() {
        let sources = SecretSources {
            manifests: loaded.secrets,
            ..SecretSources::default()
        };
        match Config::resolve(loaded.resources, &sources) {
            Ok(config) => {
                let _ = config.models();
            }
            Err(e) => messages.extend(e.0.iter().map(ToString::to_string)),
        }
    }
    for secret in secrets.iter().filter(|s| is_only_a_value(s, text)) {
        for message in &messages {
            assert!(
                !message.contains(secret.as_str()),
                "a secret value reached a message: {message:?}"
            );
        }
    }
}

/// Whether `secret` can be told apart from the file's names: long, written once, and not
/// reachable through a YAML alias (which could make the same text a name as well).
fn is_only_a_value(secret: &str, text: &str) -> bool {
    secret.len() >= MIN_SECRET_LEN && text.matches(secret).count() == 1 && !text.contains('*')
}
