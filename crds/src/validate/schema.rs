//! Structural validation of a value against an OpenAPI v3 CRD schema, as the Kubernetes API
//! server does it before running CEL rules: types, `nullable`, `required`, `enum`, numeric
//! ranges (with OpenAPI 3.0 boolean `exclusiveMinimum`/`exclusiveMaximum`), string lengths and
//! patterns, array sizes, and unknown fields (kubectl's default strict field validation).

use super::FieldError;
use regex::Regex;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Every structural problem of `value` against `schema`, in document order.
pub fn check(schema: &Value, value: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    walk(schema, value, &mut String::new(), &mut errors);
    errors
}

fn walk(schema: &Value, value: &Value, path: &mut String, errors: &mut Vec<FieldError>) {
    let Some(schema) = schema.as_object() else {
        return;
    };
    if value.is_null() {
        if !schema
            .get("nullable")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            errors.push(FieldError::new(path.clone(), "must not be null"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    if let Some(ty) = ty
        && !type_matches(ty, value)
    {
        errors.push(FieldError::new(
            path.clone(),
            format!("must be of type {ty}, got {}", type_name(value)),
        ));
        return;
    }
    check_enum(schema, value, path, errors);
    match value {
        Value::Object(fields) => check_object(schema, fields, path, errors),
        Value::Array(items) => check_array(schema, items, path, errors),
        Value::String(s) => check_string(schema, s, path, errors),
        Value::Number(n) => check_number(schema, n.as_f64().unwrap_or(f64::NAN), path, errors),
        Value::Bool(_) | Value::Null => {}
    }
}

fn type_matches(ty: &str, value: &Value) -> bool {
    match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => true,
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check_enum(
    schema: &Map<String, Value>,
    value: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let Some(allowed) = schema.get("enum").and_then(Value::as_array) else {
        return;
    };
    if !allowed.contains(value) {
        let list: Vec<String> = allowed
            .iter()
            .map(|v| {
                v.as_str()
                    .map_or_else(|| v.to_string(), |s| format!("\"{s}\""))
            })
            .collect();
        errors.push(FieldError::new(
            path,
            format!("Unsupported value: supported values: {}", list.join(", ")),
        ));
    }
}

fn check_object(
    schema: &Map<String, Value>,
    fields: &Map<String, Value>,
    path: &mut String,
    errors: &mut Vec<FieldError>,
) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !fields.contains_key(name) {
                errors.push(FieldError::new(join(path, name), "Required value"));
            }
        }
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    for (name, field) in fields {
        // The API server implies these at the root of every object; metadata is checked apart.
        if path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        let len = path.len();
        push_field(path, name);
        match (properties.and_then(|p| p.get(name)), additional) {
            (Some(sub), _) => walk(sub, field, path, errors),
            (None, Some(sub)) if sub.is_object() => walk(sub, field, path, errors),
            (None, _) if preserve || properties.is_none() => {}
            (None, _) => errors.push(FieldError::new(
                path.clone(),
                unknown_field_message(name, path),
            )),
        }
        path.truncate(len);
    }
}

/// Unknown fields are refused, as kubectl's strict field validation does; one that looks like
/// an inline credential gets a message saying how keys are given instead.
fn unknown_field_message(name: &str, path: &str) -> String {
    let lower = name.to_ascii_lowercase();
    let credential = [
        "key", "apikey", "api_key", "token", "secret", "value", "password",
    ]
    .iter()
    .any(|c| lower == *c || lower.ends_with("key") || lower.ends_with("token"));
    if credential || path.contains(".keys[") {
        "unknown field: API keys are never written inline; reference a Secret with \
         secretRef: {name, key}"
            .to_owned()
    } else {
        "unknown field".to_owned()
    }
}

fn check_array(
    schema: &Map<String, Value>,
    items: &[Value],
    path: &mut String,
    errors: &mut Vec<FieldError>,
) {
    let len = items.len() as u64;
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && len < min
    {
        errors.push(FieldError::new(
            path.clone(),
            format!("must have at least {min} items"),
        ));
    }
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && len > max
    {
        errors.push(FieldError::new(
            path.clone(),
            format!("must have at most {max} items, has {len}"),
        ));
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            let at = path.len();
            path.push_str(&format!("[{i}]"));
            walk(item_schema, item, path, errors);
            path.truncate(at);
        }
    }
}

fn check_string(schema: &Map<String, Value>, s: &str, path: &str, errors: &mut Vec<FieldError>) {
    let chars = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        errors.push(FieldError::new(
            path,
            format!("must be at least {min} characters long"),
        ));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        errors.push(FieldError::new(
            path,
            format!("must be at most {max} characters long"),
        ));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match compiled(pattern) {
            Some(re) if !re.is_match(s) => {
                errors.push(FieldError::new(
                    path,
                    format!("must match the pattern {pattern}"),
                ));
            }
            Some(_) => {}
            None => errors.push(FieldError::new(
                path,
                format!("schema pattern {pattern} does not compile"),
            )),
        }
    }
}

fn check_number(schema: &Map<String, Value>, n: f64, path: &str, errors: &mut Vec<FieldError>) {
    let flag = |k: &str| schema.get(k).and_then(Value::as_bool).unwrap_or(false);
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        if flag("exclusiveMinimum") && n <= min {
            errors.push(FieldError::new(
                path,
                format!("must be greater than {min}, got {n}"),
            ));
        } else if n < min {
            errors.push(FieldError::new(
                path,
                format!("must be greater than or equal to {min}, got {n}"),
            ));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        if flag("exclusiveMaximum") && n >= max {
            errors.push(FieldError::new(
                path,
                format!("must be less than {max}, got {n}"),
            ));
        } else if n > max {
            errors.push(FieldError::new(
                path,
                format!("must be less than or equal to {max}, got {n}"),
            ));
        }
    }
}

/// Compiled schema patterns, shared: the same few patterns are checked on every document.
fn compiled(pattern: &str) -> Option<Regex> {
    static CACHE: OnceLock<Mutex<HashMap<String, Option<Regex>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    cache
        .entry(pattern.to_owned())
        .or_insert_with(|| Regex::new(pattern).ok())
        .clone()
}

fn join(path: &str, name: &str) -> String {
    let mut p = path.to_owned();
    push_field(&mut p, name);
    p
}

fn push_field(path: &mut String, name: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(name);
}
