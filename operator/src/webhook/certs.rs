//! The webhook's TLS material: a CA of its own and a serving certificate it signs, made by the
//! operator ([`generate`]), kept in a Secret so that every operator replica serves the same one,
//! and made again [`RENEW_BEFORE`] the serving certificate expires ([`needs_rotation`]). The CA
//! goes into the MutatingWebhookConfiguration's `caBundle`; after a rotation the bundle holds
//! the new CA and the one it replaced, so the API server trusts the replicas that still serve
//! the old certificate until they reload (within [`super::RELOAD_EVERY`]).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use std::net::IpAddr;
use std::time::Duration;

/// How long a generated certificate is valid.
pub const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long before it expires a certificate is replaced.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A CA and the serving certificate it signed, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The CA certificate (for `caBundle`).
    pub ca_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// The serving certificate's private key.
    pub key_pem: String,
    /// When the serving certificate expires (Unix seconds).
    pub not_after: i64,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("Bundle")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Why TLS material could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Generating or signing failed.
    #[error("cannot generate the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The PEM could not be read.
    #[error("cannot read the webhook certificate: {0}")]
    Pem(String),
}

/// A new CA and serving certificate for `hosts` (DNS names, or IP addresses), valid from a day
/// ago (clock skew) for `validity` from `now_unix`, rounded down to whole days.
pub fn generate(hosts: &[String], now_unix: i64, validity: Duration) -> Result<Bundle, CertError> {
    let (not_before, _) = day(now_unix - 86_400);
    let (not_after, not_after_unix) =
        day(now_unix.saturating_add(i64::try_from(validity.as_secs()).unwrap_or(i64::MAX)));

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "floodgate-webhook-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let (ips, names): (Vec<&String>, Vec<&String>) =
        hosts.iter().partition(|h| h.parse::<IpAddr>().is_ok());
    let mut leaf = CertificateParams::new(names.into_iter().cloned().collect::<Vec<_>>())?;
    for ip in ips {
        if let Ok(ip) = ip.parse::<IpAddr>() {
            leaf.subject_alt_names.push(SanType::IpAddress(ip));
        }
    }
    leaf.distinguished_name
        .push(DnType::CommonName, "floodgate-webhook");
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(Bundle {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: not_after_unix,
    })
}

/// Whether a certificate expiring at `not_after` (Unix s) is due for replacement at `now`.
pub fn needs_rotation(not_after: i64, now_unix: i64) -> bool {
    let renew = i64::try_from(RENEW_BEFORE.as_secs()).unwrap_or(i64::MAX);
    now_unix >= not_after.saturating_sub(renew)
}

/// The start of the UTC day of `unix` seconds, as rcgen's time and as Unix seconds.
fn day(unix: i64) -> (time::OffsetDateTime, i64) {
    let start = unix - unix.rem_euclid(86_400);
    let at = time::OffsetDateTime::from_unix_timestamp(start)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    (at, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_due_exactly_thirty_days_before_expiry() {
        let not_after = 1_000_000_000;
        let renew = RENEW_BEFORE.as_secs() as i64;
        assert!(!needs_rotation(not_after, not_after - renew - 1));
        assert!(needs_rotation(not_after, not_after - renew));
        assert!(needs_rotation(not_after, not_after + 5));
    }

    #[test]
    fn generates_a_ca_and_a_serving_certificate_for_names_and_addresses() {
        let now = 1_764_500_000; // 2025-11-30T10:53:20Z
        let b = generate(
            &["floodgate-webhook.ops.svc".into(), "127.0.0.1".into()],
            now,
            VALIDITY,
        )
        .unwrap();
        assert!(b.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(b.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(b.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_ne!(b.ca_pem, b.cert_pem);
        // 2026-11-30T00:00:00Z: whole days.
        assert_eq!(b.not_after, 1_796_000_000 - 1_796_000_000 % 86_400);
        assert!(!format!("{b:?}").contains("PRIVATE"));
        // rustls accepts them.
        super::super::server::certified_key(&b.cert_pem, &b.key_pem).unwrap();
    }
}
