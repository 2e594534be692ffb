//! Validation of Floodgate resources with the same rules the Kubernetes API server applies.
//!
//! There is one implementation of the rules: the generated CRD schema. [`validate_object`]
//! applies its defaults, checks it structurally ([`schema`]: types, required fields, enums,
//! ranges, lengths, patterns, unknown fields), then evaluates its CEL `x-kubernetes-validations`
//! rules with kube-cel, and finally deserializes the typed resource. The proxy runs it on
//! standalone config files; the operator's admission path runs it too; the API server runs the
//! same schema. Errors name the field (`spec.providers[0].keys[1].rpm`) and never echo string
//! values, which may be secrets pasted in the wrong place.

pub mod schema;

use crate::Kind;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// One problem with one field of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.providers[0].keys[1].rpm`; empty for the whole object.
    pub field: String,
    /// What is wrong, without echoing string values.
    pub message: String,
}

impl FieldError {
    /// A new error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// The openAPIV3Schema of a kind, generated once.
pub fn schema_of(kind: Kind) -> &'static Value {
    static SCHEMAS: OnceLock<BTreeMap<Kind, Value>> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        Kind::ALL
            .into_iter()
            .map(|k| {
                let schema = k
                    .crd()
                    .spec
                    .versions
                    .into_iter()
                    .next()
                    .and_then(|v| v.schema)
                    .and_then(|s| s.open_api_v3_schema)
                    .and_then(|s| serde_json::to_value(s).ok())
                    .unwrap_or(Value::Null);
                (k, schema)
            })
            .collect()
    });
    schemas.get(&kind).unwrap_or(&Value::Null)
}

/// Validates a whole manifest (`apiVersion`, `kind`, `metadata`, `spec`) of `kind` and returns
/// the typed resource with schema defaults applied, or every problem found.
pub fn validate_object<T: DeserializeOwned>(
    kind: Kind,
    object: &Value,
) -> Result<T, Vec<FieldError>> {
    let schema = schema_of(kind);
    let defaulted = kube::core::cel::apply_defaults(schema, object);
    let mut errors = validate_metadata(&defaulted);
    errors.extend(schema::check(schema, &defaulted));
    if !errors.is_empty() {
        // CEL rules assume a well-typed object, as on the API server; report the structural
        // problems first.
        return Err(errors);
    }
    if let Err(cel_errors) = kube::core::cel::Validator::new().validate(schema, &defaulted, None) {
        return Err(cel_errors
            .iter()
            .map(|e| FieldError::new(e.field_path.clone(), e.message.clone()))
            .collect());
    }
    serde_path_to_error::deserialize(&defaulted).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        vec![FieldError::new(field, e.into_inner().to_string())]
    })
}

/// `metadata.name` is required and must be a DNS-1123 subdomain, as for every Kubernetes object.
fn validate_metadata(object: &Value) -> Vec<FieldError> {
    let name = object.pointer("/metadata/name");
    match name {
        None => vec![FieldError::new("metadata.name", "Required value")],
        Some(Value::String(name)) if is_dns_subdomain(name) => Vec::new(),
        Some(Value::String(_)) => vec![FieldError::new(
            "metadata.name",
            "must be a lowercase RFC 1123 subdomain: lower-case alphanumerics, '-' or '.', \
             starting and ending with an alphanumeric, at most 253 characters",
        )],
        Some(_) => vec![FieldError::new("metadata.name", "must be a string")],
    }
}

/// Whether `s` is a DNS-1123 subdomain (the rule for object names).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests;
