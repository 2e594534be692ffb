//! Secret values (API keys) that never reach logs, metrics, status or error messages.

use std::sync::Arc;

/// A secret string. `Debug` and `Display` print `***`; only [`SecretString::expose`] gives the
/// value, at the one place that puts it on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Arc<str>);

impl SecretString {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call only where it is sent upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The SHA-256 digest of a client key: all the gateway keeps of the keys its callers
/// present. Compared in constant time ([`KeyDigest::matches`]); `Debug` prints `***`, since
/// a digest of a short key could be brute-forced.
#[derive(Clone, Copy)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// The digest of `key`.
    pub fn of(key: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// Whether `other` is the same digest, in time independent of where they differ.
    pub fn matches(&self, other: &KeyDigest) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(self.0.ct_eq(&other.0))
    }

    /// The first 8 bytes, to index digests by (a lookup by this leaks nothing of a key: it
    /// is a hash, and the full digest is then compared in constant time).
    pub fn bucket(&self) -> u64 {
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(head)
    }
}

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_only_the_same_key() {
        let a = KeyDigest::of("sk-demo-pro");
        assert!(a.matches(&KeyDigest::of("sk-demo-pro")));
        assert!(!a.matches(&KeyDigest::of("sk-demo-prO")));
        assert!(!a.matches(&KeyDigest::of("sk-demo-pro ")));
        assert!(!a.matches(&KeyDigest::of("")));
        // SHA-256 of "abc" (FIPS 180-2, appendix B.1).
        assert_eq!(
            KeyDigest::of("abc").bucket(),
            u64::from_le_bytes([0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea])
        );
        assert_eq!(format!("{a:?}"), "***");
    }

    #[test]
    fn never_printed() {
        let s = SecretString::new("sk-live-123");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "sk-live-123");
    }
}
