//! Pools' live figures without Redis: scraped from the gateway replicas' own `/metrics`
//! (`--admin-listen`), when the operator has no `--redis-url`.
//!
//! Each pool reconcile (every [`crate::pool::USAGE_REFRESH`]) lists the gateway's Ready pods
//! ([`Targets::Pods`]) or takes fixed addresses ([`Targets::Urls`]), and reads from each:
//! - `floodgate_key_budget_utilization{pool,provider,key}`: the share of the key's request
//!   budget this replica used in its window; times the key's `rpm`, the requests it counted.
//!   A provider's `usedRpm` is that summed over its keys and the replicas (without Redis each
//!   replica keeps its own windows);
//! - `floodgate_circuit_state{pool,provider}` (0 closed, 1 half-open, 2 open): summed as the
//!   Redis figures are ([`crate::usage::sum_circuits`]): the worst, and the replicas open.
//!
//! The figures are per pool name: the gateway labels its series with the pool's name, not its
//! namespace. A replica that cannot be scraped, or does not answer within [`SCRAPE_TIMEOUT`],
//! fails the read (partial sums would pass for low use). So does a selector that matches no
//! pod ([`Error::NoGatewayPods`]: a wrong `--gateway-metrics-selector`, or no gateway there)
//! or matches no Ready one ([`Error::NoReadyGatewayPods`]): nothing to read is not "no use".

use crate::error::{Error, Result};
use crate::usage::{PoolCircuits, ProviderUsage, sum_circuits};
use floodgate_crds::pool::AIProviderPoolSpec;
use floodgate_crds::redis_keys::CIRCUIT_STATES;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long one replica's scrape (connect, request, body) may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The gateway's metric of each key's budget in use.
pub const KEY_UTILIZATION: &str = "floodgate_key_budget_utilization";
/// The gateway's metric of each provider's circuit.
pub const CIRCUIT_STATE: &str = "floodgate_circuit_state";

/// Where the gateway's replicas serve `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// The Ready pods matching `selector` in `namespace`, on `port` (at least one must).
    Pods {
        /// The gateway's namespace.
        namespace: String,
        /// A label selector of its pods, e.g. `app.kubernetes.io/component=gateway`.
        selector: String,
        /// Their `--admin-listen` port.
        port: u16,
    },
    /// Fixed base URLs, one per replica (`http://10.0.0.5:9090`).
    Urls(Vec<String>),
}

/// Reads the gateway replicas' metrics.
#[derive(Clone)]
pub struct Scraper {
    client: Client,
    targets: Targets,
}

impl std::fmt::Debug for Scraper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraper")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

/// One replica's figures, from its exposition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaFigures {
    /// Budget utilization per `(pool, provider, key)`.
    pub utilization: BTreeMap<(String, String, String), f64>,
    /// Circuit state (one of [`CIRCUIT_STATES`]) per pool, then provider.
    pub circuits: BTreeMap<String, BTreeMap<String, String>>,
}

impl Scraper {
    /// A scraper of `targets`, listing pods with `client`.
    pub fn new(client: Client, targets: Targets) -> Self {
        Self { client, targets }
    }

    /// Every replica's figures now.
    pub async fn scrape(&self) -> Result<Vec<ReplicaFigures>> {
        let urls = match &self.targets {
            Targets::Urls(urls) => urls.clone(),
            Targets::Pods {
                namespace,
                selector,
                port,
            } => {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
                let listed = pods.list(&ListParams::default().labels(selector)).await?;
                let urls: Vec<String> = listed
                    .items
                    .iter()
                    .filter(|p| is_ready(p))
                    .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                    .map(|ip| match ip.parse::<std::net::IpAddr>() {
                        Ok(std::net::IpAddr::V6(v6)) => format!("http://[{v6}]:{port}"),
                        _ => format!("http://{ip}:{port}"),
                    })
                    .collect();
                // Nothing to scrape is not "no use": a wrong selector, or a gateway down,
                // would otherwise read as an idle pool.
                if listed.items.is_empty() {
                    return Err(Error::NoGatewayPods {
                        namespace: namespace.clone(),
                        selector: selector.clone(),
                    });
                }
                if urls.is_empty() {
                    return Err(Error::NoReadyGatewayPods {
                        namespace: namespace.clone(),
                        selector: selector.clone(),
                        matched: listed.items.len(),
                    });
                }
                urls
            }
        };
        let mut replicas = Vec::with_capacity(urls.len());
        for url in &urls {
            let text = fetch(url)
                .await
                .map_err(|why| Error::Scrape(format!("{url}: {why}")))?;
            replicas.push(parse(&text));
        }
        Ok(replicas)
    }

    /// The live usage and circuits of pool `pool` of `spec`, over every replica.
    pub async fn pool_live(
        &self,
        pool: &str,
        spec: &AIProviderPoolSpec,
    ) -> Result<(ProviderUsage, PoolCircuits)> {
        Ok(pool_figures(&self.scrape().await?, pool, spec))
    }
}

/// Whether `pod` is Ready (and not being deleted).
fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `GET {base}/metrics` over HTTP/1.1, bounded by [`SCRAPE_TIMEOUT`]; the body, or why not.
async fn fetch(base: &str) -> std::result::Result<String, String> {
    let uri: http::Uri = format!("{}/metrics", base.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("not a URL: {e}"))?;
    let authority = uri.authority().ok_or("no host")?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let get = async {
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let request = http::Request::get(uri.path())
            .header(http::header::HOST, authority.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        driver.abort();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, get)
        .await
        .map_err(|_| format!("no answer within {SCRAPE_TIMEOUT:?}"))?
}

/// The figures of one replica's Prometheus text exposition; series of other metrics, and
/// lines that do not parse, are skipped.
pub fn parse(text: &str) -> ReplicaFigures {
    let mut figures = ReplicaFigures::default();
    for line in text.lines() {
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        let label = |key: &str| {
            labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        match name {
            KEY_UTILIZATION => {
                if let (Some(pool), Some(provider), Some(key)) =
                    (label("pool"), label("provider"), label("key"))
                {
                    figures.utilization.insert((pool, provider, key), value);
                }
            }
            CIRCUIT_STATE => {
                let state = CIRCUIT_STATES.get(value as usize).filter(|_| value >= 0.0);
                if let (Some(pool), Some(provider), Some(state)) =
                    (label("pool"), label("provider"), state)
                {
                    figures
                        .circuits
                        .entry(pool)
                        .or_default()
                        .insert(provider, (*state).to_owned());
                }
            }
            _ => {}
        }
    }
    figures
}

/// A sample's labels, unescaped, in order.
type Labels = Vec<(String, String)>;

/// One sample line: `name{k="v",...} value [timestamp]`.
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (mut key, mut value) = (String::new(), String::new());
        let (mut in_value, mut escaped, mut end) = (false, false, None);
        for (i, c) in inner.char_indices() {
            if escaped {
                value.push(if c == 'n' { '\n' } else { c });
                escaped = false;
            } else if in_value && c == '\\' {
                escaped = true;
            } else if in_value && c == '"' {
                labels.push((
                    std::mem::take(&mut key).trim().to_owned(),
                    std::mem::take(&mut value),
                ));
                in_value = false;
            } else if in_value {
                value.push(c);
            } else if c == '}' {
                end = Some(i);
                break;
            } else if c == '"' {
                in_value = true;
            } else if c != '=' && c != ',' {
                key.push(c);
            }
        }
        rest = &inner[end? + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// Pool `pool`'s usage per provider (each key's utilization times its `rpm`, summed over keys
/// and replicas, rounded) and circuits, from every replica's figures.
pub fn pool_figures(
    replicas: &[ReplicaFigures],
    pool: &str,
    spec: &AIProviderPoolSpec,
) -> (ProviderUsage, PoolCircuits) {
    let mut usage = ProviderUsage::new();
    for p in &spec.providers {
        // Key display names as the gateway labels them: the key's name, else
        // `<provider>-<index>`; a keyless provider's budget is its own `rpm`.
        let keys: Vec<(String, u32)> = if p.keys.is_empty() {
            vec![(p.name.clone(), p.rpm.unwrap_or(0))]
        } else {
            p.keys
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let name = k.name.clone().unwrap_or_else(|| format!("{}-{i}", p.name));
                    (name, k.rpm)
                })
                .collect()
        };
        let used: f64 = keys
            .iter()
            .map(|(key, rpm)| {
                let id = (pool.to_owned(), p.name.clone(), key.clone());
                let share: f64 = replicas.iter().filter_map(|r| r.utilization.get(&id)).sum();
                share * f64::from(*rpm)
            })
            .sum();
        // `as` saturates; a share is never negative.
        usage.insert(p.name.clone(), used.round().max(0.0) as u64);
    }
    let circuits = sum_circuits(
        replicas
            .iter()
            .map(|r| r.circuits.get(pool).cloned().unwrap_or_default()),
    );
    (usage, circuits)
}

#[cfg(test)]
mod tests;
