//! Standalone configuration: a directory (or files) of multi-document YAML holding Floodgate
//! resources and Secrets, each validated with the CRD schema and CEL rules.

use super::secrets::SecretSources;
use super::{Config, ConfigError, ConfigErrors, Origin, Resources, Sourced};
use crate::secret::SecretString;
use base64::Engine;
use floodgate_crds::Kind;
use floodgate_crds::validate::validate_object;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// What a set of manifest files holds.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Floodgate resources, validated one by one.
    pub resources: Resources,
    /// Values of `kind: Secret` documents, keyed by (secret, key).
    pub secrets: HashMap<(String, String), SecretString>,
    /// Documents that were skipped, e.g. kinds Floodgate does not read.
    pub warnings: Vec<String>,
}

/// Reads, validates and resolves the configuration at `paths` (files or directories).
pub fn load_config(
    paths: &[PathBuf],
    mut secrets: SecretSources,
) -> Result<(Config, Vec<String>), ConfigErrors> {
    let loaded = load_paths(paths)?;
    secrets.manifests = loaded.secrets;
    let config = Config::resolve(loaded.resources, &secrets)?;
    Ok((config, loaded.warnings))
}

/// The manifest files at `paths`: files as given, directories searched recursively for
/// `*.yaml`/`*.yml`, in a stable (sorted) order.
pub fn config_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ConfigErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        if path.is_dir() {
            collect_yaml(path, &mut files, &mut errors);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            errors.push(file_error(path, "no such file or directory"));
        }
    }
    if files.is_empty() && errors.is_empty() {
        errors.push(ConfigError {
            origin: None,
            resource: None,
            field: String::new(),
            message: format!("no *.yaml or *.yml files found in {}", display_paths(paths)),
        });
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn collect_yaml(dir: &Path, files: &mut Vec<PathBuf>, errors: &mut Vec<ConfigError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return errors.push(file_error(dir, &e.to_string())),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_yaml(&path, files, errors);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(path);
        }
    }
}

/// Reads and validates every document of every manifest file at `paths`. All problems are
/// reported together; nothing is returned if there is any.
pub fn load_paths(paths: &[PathBuf]) -> Result<Loaded, ConfigErrors> {
    let files = config_files(paths)?;
    let mut loaded = Loaded::default();
    let mut errors = Vec::new();
    for file in &files {
        match std::fs::read_to_string(file) {
            Ok(text) => parse_file(file, &text, &mut loaded, &mut errors),
            Err(e) => errors.push(file_error(file, &e.to_string())),
        }
    }
    check_duplicates(&loaded.resources, &mut errors);
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Parses the documents of one file into `loaded`, appending problems to `errors`.
pub fn parse_file(file: &Path, text: &str, loaded: &mut Loaded, errors: &mut Vec<ConfigError>) {
    let documents: Vec<Value> = match serde_saphyr::from_multiple(text) {
        Ok(docs) => docs,
        Err(e) => {
            // Without the snippet: it would quote the source line, which may hold a secret.
            return errors.push(file_error(
                file,
                &format!("not valid YAML: {}", e.without_snippet()),
            ));
        }
    };
    if text.trim().is_empty() {
        // An empty file is most often one being written (or truncated): applying it would
        // drop every resource it held. (A file of comments only is taken as meant.)
        return errors.push(file_error(
            file,
            "is empty (being written, or truncated?): remove it, or write its resources",
        ));
    }
    for (i, doc) in documents.into_iter().enumerate() {
        let origin = Origin {
            file: file.to_owned(),
            document: i + 1,
        };
        if doc.is_null() {
            continue;
        }
        parse_document(doc, origin, loaded, errors);
    }
}

fn parse_document(doc: Value, origin: Origin, loaded: &mut Loaded, errors: &mut Vec<ConfigError>) {
    let api_version = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_owned();
    let resource = format!("{kind}/{name}");
    let error = |field: &str, message: String| ConfigError {
        origin: Some(origin.clone()),
        resource: Some(resource.clone()),
        field: field.to_owned(),
        message,
    };
    if !doc.is_object() {
        return errors.push(error(
            "",
            "a document must be a mapping with apiVersion and kind".into(),
        ));
    }
    if api_version.is_empty() || kind.is_empty() {
        return errors.push(error(
            if api_version.is_empty() {
                "apiVersion"
            } else {
                "kind"
            },
            "Required value".into(),
        ));
    }
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    if kind == "Secret" && api_version == "v1" {
        return parse_secret(&doc, &name, &error, loaded, errors);
    }
    if group != floodgate_crds::GROUP {
        loaded.warnings.push(format!(
            "{}: document {}: {resource} ({api_version}) is not a Floodgate resource; ignored",
            origin.file.display(),
            origin.document
        ));
        return;
    }
    let Some(k) = Kind::parse(&kind) else {
        return errors.push(error(
            "kind",
            format!("unknown kind in {}", floodgate_crds::GROUP),
        ));
    };
    if api_version != floodgate_crds::API_VERSION {
        return errors.push(error(
            "apiVersion",
            format!(
                "unsupported version; this gateway reads {}",
                floodgate_crds::API_VERSION
            ),
        ));
    }
    let to_errors = |errs: Vec<floodgate_crds::validate::FieldError>| {
        errs.into_iter().map(|e| error(&e.field, e.message))
    };
    let origin = Some(origin.clone());
    let r = &mut loaded.resources;
    match k {
        Kind::AIProviderPool => match validate_object(k, &doc) {
            Ok(resource) => r.pools.push(Sourced { resource, origin }),
            Err(e) => errors.extend(to_errors(e)),
        },
        Kind::TierQueue => match validate_object(k, &doc) {
            Ok(resource) => r.tier_queues.push(Sourced { resource, origin }),
            Err(e) => errors.extend(to_errors(e)),
        },
        Kind::CachePolicy => match validate_object(k, &doc) {
            Ok(resource) => r.cache_policies.push(Sourced { resource, origin }),
            Err(e) => errors.extend(to_errors(e)),
        },
        Kind::LocalModelDeployment => match validate_object(k, &doc) {
            Ok(resource) => r.local_models.push(Sourced { resource, origin }),
            Err(e) => errors.extend(to_errors(e)),
        },
        Kind::Tenant => match validate_object(k, &doc) {
            Ok(resource) => r.tenants.push(Sourced { resource, origin }),
            Err(e) => errors.extend(to_errors(e)),
        },
        Kind::RoutingPolicy => match validate_object(k, &doc) {
            Ok(resource) => r.routing_policies.push(Sourced { resource, origin }),
            Err(e) => errors.extend(to_errors(e)),
        },
    }
}

fn parse_secret(
    doc: &Value,
    name: &str,
    error: &dyn Fn(&str, String) -> ConfigError,
    loaded: &mut Loaded,
    errors: &mut Vec<ConfigError>,
) {
    for (field, encoded) in [("data", true), ("stringData", false)] {
        let Some(entries) = doc.get(field) else {
            continue;
        };
        let Some(entries) = entries.as_object() else {
            errors.push(error(field, "must be a mapping of key to value".into()));
            continue;
        };
        for (key, value) in entries {
            let path = format!("{field}.{key}");
            let Some(text) = value.as_str() else {
                errors.push(error(&path, "must be a string".into()));
                continue;
            };
            let decoded = if encoded {
                match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
                    Ok(bytes) => String::from_utf8(bytes).ok(),
                    Err(_) => {
                        errors.push(error(&path, "is not valid base64".into()));
                        continue;
                    }
                }
            } else {
                Some(text.to_owned())
            };
            match decoded {
                Some(v) => {
                    loaded
                        .secrets
                        .insert((name.to_owned(), key.clone()), SecretString::new(v));
                }
                None => errors.push(error(&path, "is not valid UTF-8".into())),
            }
        }
    }
}

/// Adds an error for every resource whose kind and name an earlier one already has.
pub(crate) fn check_duplicates(resources: &Resources, errors: &mut Vec<ConfigError>) {
    fn check<T: kube::ResourceExt>(
        items: &[Sourced<T>],
        kind: &str,
        errors: &mut Vec<ConfigError>,
    ) {
        let mut seen = HashSet::new();
        for item in items {
            let name = item.resource.name_any();
            if !seen.insert(name.clone()) {
                errors.push(ConfigError {
                    origin: item.origin.clone(),
                    resource: Some(format!("{kind}/{name}")),
                    field: "metadata.name".into(),
                    message: format!("a {kind} with this name is already defined"),
                });
            }
        }
    }
    check(&resources.pools, "AIProviderPool", errors);
    check(&resources.tier_queues, "TierQueue", errors);
    check(&resources.cache_policies, "CachePolicy", errors);
    check(&resources.local_models, "LocalModelDeployment", errors);
    check(&resources.tenants, "Tenant", errors);
    check(&resources.routing_policies, "RoutingPolicy", errors);
}

fn file_error(path: &Path, message: &str) -> ConfigError {
    ConfigError {
        origin: Some(Origin {
            file: path.to_owned(),
            document: 0,
        }),
        resource: None,
        field: String::new(),
        message: message.to_owned(),
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
