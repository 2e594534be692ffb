//! Where a tenant's webhook may point: not at the gateway's own network.
//!
//! A job's `notify.webhook` is a tenant's input, and the gateway POSTs to it from inside the
//! cluster: left unchecked, a tenant could make it call internal services (server-side
//! request forgery). By default such a URL is refused when the job is submitted if its host
//! is an address in a private, loopback, link-local, shared, multicast or unspecified range
//! (or `localhost`), and again at delivery: a host name is resolved by [`PublicResolver`],
//! which refuses names that resolve to such addresses, so a name cannot be re-pointed
//! (DNS rebinding) between the check and the POST. `--job-webhook-private-addresses` lifts
//! both checks (a gateway whose tenants are trusted, or tests whose receiver is on
//! 127.0.0.1). The TierQueue's own webhook URL is the operator's, not a tenant's, and is
//! not checked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether `ip` is in a range a tenant's webhook may not reach.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped().or_else(|| embedded_v4(v6)) {
            Some(v4) => is_internal_v4(v4) || is_internal_v6(v6),
            None => is_internal_v6(v6),
        },
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        // 0.0.0.0/8 ("this network"), 100.64.0.0/10 (shared, carrier NAT), 192.0.0.0/24
        // (protocol assignments), 198.18.0.0/15 (benchmarking), 240.0.0.0/4 (reserved).
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (18..20).contains(&b))
        || a >= 240
}

/// The IPv4 address inside a NAT64 address of the well-known prefix (`64:ff9b::/96`) or an
/// IPv4-compatible one (`::a.b.c.d`): a NAT64 gateway or a dual stack reaches it.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = || {
        let [.., a, b, c, d] = ip.octets();
        Ipv4Addr::new(a, b, c, d)
    };
    let nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0];
    let compatible = s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified();
    (nat64 || compatible).then(v4)
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // fc00::/7 (unique local), fe80::/10 (link-local), 64:ff9b:1::/48 (local NAT64).
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || (first == 0x64 && ip.segments()[1] == 0xff9b && ip.segments()[2] == 1)
}

/// Why a webhook URL is refused (for the 400's message and the delivery's record).
pub fn check(url: &str, allow_internal: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|_| "must be an http(s) URL".to_owned())?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("must be an http(s) URL".to_owned());
    }
    let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
        return Err("must be an http(s) URL".to_owned());
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let internal = match bare.parse::<IpAddr>() {
        Ok(ip) => is_internal(ip),
        Err(_) => {
            let name = bare.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    };
    if internal && !allow_internal {
        return Err(
            "must not point at a private, loopback or link-local address (the gateway's own network)"
                .to_owned(),
        );
    }
    Ok(())
}

/// A resolver for tenants' webhooks: a name that resolves to any internal address is refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublicResolver;

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() || addrs.iter().any(|a| is_internal(a.ip())) {
                let refused: Box<dyn std::error::Error + Send + Sync> =
                    format!("{host} resolves to an internal address").into();
                return Err(refused);
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges_are_refused_and_public_ones_pass() {
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://172.31.255.255/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[64:ff9b::a00:1]/",
            "http://[::10.0.0.1]/",
            "http://localhost:9000/",
            "http://api.localhost/",
            "http://LOCALHOST./",
        ] {
            assert!(check(url, false).is_err(), "{url} refused");
            assert_eq!(check(url, true), Ok(()), "{url} allowed by the opt-in");
        }
        for url in [
            "https://hooks.example.com/x",
            "http://8.8.8.8/",
            "http://172.32.0.1/",
            "http://100.128.0.1/",
            "http://[2001:4860::8888]/",
            "http://[64:ff9b::808:808]/",
        ] {
            assert_eq!(check(url, false), Ok(()), "{url}");
        }
        assert!(check("ftp://example.com/", true).is_err());
        assert!(check("not a url", true).is_err());
    }

    #[tokio::test]
    async fn the_resolver_refuses_a_name_that_resolves_inside() {
        use reqwest::dns::Resolve as _;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(PublicResolver.resolve(name).await.is_err());
    }
}
