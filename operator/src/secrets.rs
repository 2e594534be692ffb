//! Which Secrets and keys exist, as far as the resources need to know: the names of the keys
//! holding a non-empty value, never the values. Nothing here logs or stores a secret value.

use crate::error::Result;
use floodgate_crds::SecretKeyRef;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use std::collections::{BTreeMap, BTreeSet};

/// The Secrets of one namespace that some resource references: name -> keys with a non-empty
/// value. A Secret that does not exist is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretIndex(BTreeMap<String, BTreeSet<String>>);

/// What became of one secret reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The Secret has the key, with a non-empty value.
    Found,
    /// No Secret of that name.
    SecretNotFound,
    /// The Secret exists but lacks the key (or its value is empty).
    KeyNotFound,
}

impl SecretIndex {
    /// Reads the Secrets named in `names` from `namespace`, keeping only their key names.
    pub async fn load(
        client: &Client,
        namespace: &str,
        names: impl IntoIterator<Item = String>,
    ) -> Result<Self> {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let mut index = SecretIndex::default();
        for name in names.into_iter().collect::<BTreeSet<_>>() {
            if let Some(secret) = api.get_opt(&name).await? {
                index.insert(&name, non_empty_keys(&secret));
            }
        }
        Ok(index)
    }

    /// Records Secret `name` with `keys`.
    pub fn insert(&mut self, name: &str, keys: impl IntoIterator<Item = String>) {
        self.0.insert(name.to_owned(), keys.into_iter().collect());
    }

    /// What `reference` resolves to.
    pub fn resolve(&self, reference: &SecretKeyRef) -> Resolution {
        match self.0.get(&reference.name) {
            None => Resolution::SecretNotFound,
            Some(keys) if keys.contains(&reference.key) => Resolution::Found,
            Some(_) => Resolution::KeyNotFound,
        }
    }
}

/// The keys of `secret` whose value is not empty (`data`; `stringData` is write-only).
pub fn non_empty_keys(secret: &Secret) -> impl Iterator<Item = String> + '_ {
    secret
        .data
        .iter()
        .flatten()
        .filter(|(_, v)| !v.0.is_empty())
        .map(|(k, _)| k.clone())
}

/// A sentence naming the unresolved references among `refs` (`what` says whose each is),
/// listing at most five, e.g. `Secret "claude-keys" has no key "key3" (claude/claude-3)`.
pub fn describe_unresolved<'a>(
    index: &SecretIndex,
    refs: impl IntoIterator<Item = (String, &'a SecretKeyRef)>,
) -> Option<String> {
    let problems: Vec<String> = refs
        .into_iter()
        .filter_map(|(what, r)| match index.resolve(r) {
            Resolution::Found => None,
            Resolution::SecretNotFound => Some(format!("Secret {:?} not found ({what})", r.name)),
            Resolution::KeyNotFound => Some(format!(
                "Secret {:?} has no key {:?} or it is empty ({what})",
                r.name, r.key
            )),
        })
        .collect();
    if problems.is_empty() {
        return None;
    }
    let shown = problems.len().min(5);
    let mut text = problems[..shown].join("; ");
    if problems.len() > shown {
        text.push_str(&format!("; and {} more", problems.len() - shown));
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn key_ref(name: &str, key: &str) -> SecretKeyRef {
        SecretKeyRef {
            name: name.into(),
            key: key.into(),
        }
    }

    #[test]
    fn resolves_found_missing_secret_missing_key_and_empty_value() {
        let secret = Secret {
            data: Some(
                [
                    ("key1".to_owned(), ByteString(b"sk-1".to_vec())),
                    ("empty".to_owned(), ByteString(Vec::new())),
                ]
                .into(),
            ),
            ..Secret::default()
        };
        let mut index = SecretIndex::default();
        index.insert("keys", non_empty_keys(&secret));
        assert_eq!(index.resolve(&key_ref("keys", "key1")), Resolution::Found);
        assert_eq!(
            index.resolve(&key_ref("keys", "key2")),
            Resolution::KeyNotFound
        );
        assert_eq!(
            index.resolve(&key_ref("keys", "empty")),
            Resolution::KeyNotFound
        );
        assert_eq!(
            index.resolve(&key_ref("other", "key1")),
            Resolution::SecretNotFound
        );
    }

    #[test]
    fn the_description_names_secret_and_key_and_caps_the_list() {
        let mut index = SecretIndex::default();
        index.insert("keys", ["key1".to_owned()]);
        let refs: Vec<SecretKeyRef> = (0..8).map(|i| key_ref("keys", &format!("k{i}"))).collect();
        let text = describe_unresolved(
            &index,
            refs.iter()
                .enumerate()
                .map(|(i, r)| (format!("p/key-{i}"), r)),
        )
        .unwrap();
        assert!(
            text.starts_with(r#"Secret "keys" has no key "k0" or it is empty (p/key-0)"#),
            "{text}"
        );
        assert!(text.ends_with("; and 3 more"), "{text}");
        let found = key_ref("keys", "key1");
        assert_eq!(
            describe_unresolved(&index, [("x".to_owned(), &found)]),
            None
        );
    }
}
