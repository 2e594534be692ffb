//! `tierload`: open-loop mixed-tier load for the tier scenario of `make bench`, loopback only.
//!
//! ```text
//! tierload --url http://127.0.0.1:8080 --duration 180 \
//!          --tier enterprise=sk-demo-enterprise:2 --tier free=sk-demo-free:8
//! ```
//!
//! Each `--tier NAME=KEY:RATE` sends RATE requests per second with `Authorization: Bearer KEY`,
//! evenly spaced, each on its own connection from a shared pool, never waiting for an earlier
//! answer (open loop: a slow answer does not slow the arrivals). After `--duration` it stops
//! sending and waits for every request still out (at most `--timeout` each). Every request ends
//! as an answer (2xx), a refusal (429 with `retry-after`), another error status, or *lost*
//! (no HTTP answer at all: a reset, a timeout). It prints, per tier, p50 and p99 of the queue
//! wait the gateway reports (`x-floodgate-queue-ms`) over the answered requests, refusals and
//! losses, as a table and as one JSON line (`--json`). Each request carries `x-request-id:
//! tierload-<tier>-<n>`; a lost one is named on stderr, so the gateway's logs can be searched,
//! and with `--refusals FILE` every refused one is named in FILE, with when it was sent, how
//! long the refusal took and the `retry-after` it carried (a refusal at once is a full queue
//! or a turn that could not come in time; one after the tier's wait limit, its deadline).
//!
//! With `--respond-async NAME` that tier's requests carry `Prefer: respond-async` (RFC 7240):
//! a gateway with async jobs hands a request it cannot answer within its wait limit over as a
//! job (202 and a `Location`); such a request is counted *deferred*, with how long the hand-over
//! took (`defer_ms_max`), not answered, and its queue wait is not in the percentiles.
//!
//! With `--prompts FILE` (JSON lines `{"tier": NAME, "model": M, "messages": [...]}`) each
//! tier sends its own lines in file order, wrapping around, instead of one fixed prompt; and
//! it also counts who answered (the `x-floodgate-cache` outcome when the cache did, else
//! `local` or `premium` from the last step of `x-floodgate-chain`), and, with
//! `--target NAME=MS`, the answers whose whole response came within the tier's target.

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest run accepted.
const MAX_DURATION_S: f64 = 900.0;

/// Mixed-tier open-loop load generator (127.0.0.1 only).
#[derive(Debug, Parser)]
#[command(name = "tierload", version)]
struct Args {
    /// The gateway's base URL; its host must be a loopback address.
    #[arg(long)]
    url: String,
    /// Seconds of sending.
    #[arg(long, default_value_t = 180.0)]
    duration: f64,
    /// A tier's load: `NAME=CLIENT_KEY:REQ_PER_S` (repeatable).
    #[arg(long = "tier", value_name = "NAME=KEY:RATE", required = true)]
    tiers: Vec<String>,
    /// Model of the chat completions sent.
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// Longest a single request may take before it counts as lost, in seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Also print the summary as one JSON line, prefixed with `JSON `.
    #[arg(long)]
    json: bool,
    /// The requests to send: JSON lines `{"tier", "model", "messages"}` (see the docs above).
    #[arg(long, value_name = "FILE")]
    prompts: Option<std::path::PathBuf>,
    /// A tier's latency target, `NAME=MS` (repeatable): answers within it are counted.
    #[arg(long = "target", value_name = "NAME=MS")]
    targets: Vec<String>,
    /// Names every refused request in this file, a line each.
    #[arg(long, value_name = "FILE")]
    refusals: Option<std::path::PathBuf>,
    /// A tier whose requests carry `Prefer: respond-async` (repeatable): a 202 counts as
    /// deferred.
    #[arg(long = "respond-async", value_name = "NAME")]
    respond_async: Vec<String>,
}

/// One line of `--prompts`.
#[derive(Debug, serde::Deserialize)]
struct PromptLine {
    tier: String,
    model: String,
    messages: serde_json::Value,
}

#[derive(Debug, Clone)]
struct TierLoad {
    name: String,
    key: String,
    rate: f64,
}

/// How one request ended.
#[derive(Debug, Clone, Copy)]
enum End {
    Answered {
        queue_ms: u64,
        total_ms: u64,
        by: &'static str,
    },
    /// Handed over as a job (202), after how long.
    Deferred {
        after_ms: u64,
    },
    /// A 429: after how long, and its `retry-after` (seconds) if it had one.
    Refused {
        after_ms: u64,
        retry_after: Option<u64>,
    },
    Status(u16),
    /// Why: `timeout`, `connect`, `body` (the answer broke off) or `request`.
    Lost(&'static str),
}

#[derive(Debug, Default, Serialize)]
struct TierSummary {
    sent: u64,
    answered: u64,
    /// Handed over as jobs (202, `--respond-async`).
    deferred: u64,
    /// The longest a hand-over took, in milliseconds.
    defer_ms_max: Option<u64>,
    refused: u64,
    other_status: u64,
    /// The other statuses, by code.
    other_codes: BTreeMap<u16, u64>,
    lost: u64,
    /// The lost requests by why.
    lost_by: BTreeMap<&'static str, u64>,
    queue_ms_p50: Option<u64>,
    queue_ms_p99: Option<u64>,
    queue_ms_max: Option<u64>,
    /// Answers by who gave them: a cache outcome (`exact`, `dedup`, `template`, `stale`,
    /// `semantic`, ...), `local`, `premium` or `job` (handed over, 202).
    served_by: BTreeMap<&'static str, u64>,
    /// Answers whose whole response came within the tier's `--target`.
    within_target: u64,
    /// Whole-response time of the answers, p50 and p99.
    total_ms_p50: Option<u64>,
    total_ms_p99: Option<u64>,
}

/// Who answered, from the response headers.
fn served_by(headers: &reqwest::header::HeaderMap, status: u16) -> &'static str {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    if status == 202 {
        return "job";
    }
    match get("x-floodgate-cache") {
        "exact" => return "exact",
        "dedup" => return "dedup",
        "template" => return "template",
        "stale" => return "stale",
        // The semantic layer (being built): counted here once it answers.
        "semantic" => return "semantic",
        _ => {}
    }
    let last_ok = get("x-floodgate-chain")
        .split(',')
        .rev()
        .find(|step| step.ends_with("=ok"))
        .unwrap_or("");
    if last_ok.starts_with("local:") {
        "local"
    } else {
        "premium"
    }
}

fn parse_tier(text: &str) -> Result<TierLoad> {
    let (name, rest) = text
        .split_once('=')
        .with_context(|| format!("--tier {text:?}: expected NAME=KEY:RATE"))?;
    let (key, rate) = rest
        .rsplit_once(':')
        .with_context(|| format!("--tier {text:?}: expected NAME=KEY:RATE"))?;
    let rate: f64 = rate
        .parse()
        .with_context(|| format!("--tier {text:?}: RATE is not a number"))?;
    ensure!(
        rate > 0.0 && rate <= 10_000.0,
        "--tier {text:?}: RATE must be in (0, 10000]"
    );
    Ok(TierLoad {
        name: name.to_owned(),
        key: key.to_owned(),
        rate,
    })
}

fn check_loopback(url: &str) -> Result<()> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("--url {url:?}"))?;
    let host = parsed.host_str().unwrap_or_default();
    let ip: IpAddr = host
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .with_context(|| format!("--url host {host:?} must be a loopback IP address"))?;
    ensure!(
        ip.is_loopback(),
        "--url host {host} is not a loopback address"
    );
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

async fn one(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &str,
    id: &str,
    respond_async: bool,
) -> End {
    let started = Instant::now();
    let mut request = client
        .post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("x-request-id", id)
        .header("content-type", "application/json");
    if respond_async {
        request = request.header("prefer", "respond-async");
    }
    let sent = request.body(body.to_owned()).send().await;
    let response = match sent {
        Ok(response) => response,
        Err(e) if e.is_timeout() => return End::Lost("timeout"),
        Err(e) if e.is_connect() => return End::Lost("connect"),
        Err(_) => return End::Lost("request"),
    };
    let status = response.status().as_u16();
    let queue_ms = response
        .headers()
        .get("x-floodgate-queue-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let by = served_by(response.headers(), status);
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    // The whole body must arrive for the answer to count.
    if let Err(e) = response.bytes().await {
        return End::Lost(if e.is_timeout() { "timeout" } else { "body" });
    }
    match status {
        202 if respond_async => End::Deferred {
            after_ms: started.elapsed().as_millis() as u64,
        },
        200..=299 => End::Answered {
            queue_ms: queue_ms.unwrap_or(0),
            total_ms: started.elapsed().as_millis() as u64,
            by,
        },
        429 => End::Refused {
            after_ms: started.elapsed().as_millis() as u64,
            retry_after,
        },
        other => End::Status(other),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    check_loopback(&args.url)?;
    // One crypto provider for the process (ring, the workspace's), as reqwest needs one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    ensure!(
        args.duration > 0.0 && args.duration <= MAX_DURATION_S,
        "--duration must be in (0, {MAX_DURATION_S}]"
    );
    let tiers: Vec<TierLoad> = args
        .tiers
        .iter()
        .map(|t| parse_tier(t))
        .collect::<Result<_>>()?;
    let url = format!("{}/v1/chat/completions", args.url.trim_end_matches('/'));
    let fixed = serde_json::json!({
        "model": args.model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    })
    .to_string();
    // Each tier's bodies, sent in order and wrapping around.
    let mut bodies: Vec<Vec<String>> = vec![Vec::new(); tiers.len()];
    if let Some(path) = &args.prompts {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--prompts {}", path.display()))?;
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let p: PromptLine = serde_json::from_str(line)
                .with_context(|| format!("--prompts {} line {}", path.display(), n + 1))?;
            let Some(ti) = tiers.iter().position(|t| t.name == p.tier) else {
                bail!("--prompts line {}: tier {:?} has no --tier", n + 1, p.tier);
            };
            bodies[ti].push(
                serde_json::json!({"model": p.model, "messages": p.messages, "max_tokens": 16})
                    .to_string(),
            );
        }
    }
    let mut targets: BTreeMap<String, u64> = BTreeMap::new();
    for t in &args.targets {
        let (name, ms) = t
            .split_once('=')
            .and_then(|(n, ms)| Some((n, ms.parse::<u64>().ok()?)))
            .with_context(|| format!("--target {t:?}: expected NAME=MS"))?;
        targets.insert(name.to_owned(), ms);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(args.timeout))
        .pool_idle_timeout(Duration::from_secs(5))
        .build()?;
    let ends: Arc<Mutex<Vec<(usize, End)>>> = Arc::default();
    let refusals: Arc<Mutex<Vec<String>>> = Arc::default();
    let start = Instant::now();
    let stop = start + Duration::from_secs_f64(args.duration);
    let mut pacers = Vec::new();
    for (ti, tier) in tiers.iter().enumerate() {
        let (client, url, ends, key) =
            (client.clone(), url.clone(), ends.clone(), tier.key.clone());
        let refusals = refusals.clone();
        let name = tier.name.clone();
        let own = std::mem::take(&mut bodies[ti]);
        let own: Arc<Vec<String>> = Arc::new(if own.is_empty() {
            vec![fixed.clone()]
        } else {
            own
        });
        let every = Duration::from_secs_f64(1.0 / tier.rate);
        let respond_async = args.respond_async.contains(&tier.name);
        pacers.push(tokio::spawn(async move {
            let mut requests = tokio::task::JoinSet::new();
            // Tiers start out of phase, so that their arrivals interleave.
            let mut next = tokio::time::Instant::from_std(start) + every.mul_f64(ti as f64 / 7.0);
            let mut n = 0;
            while next.into_std() < stop {
                tokio::time::sleep_until(next).await;
                let body = own[n % own.len()].clone();
                n += 1;
                let (client, url, ends, key) =
                    (client.clone(), url.clone(), ends.clone(), key.clone());
                let refusals = refusals.clone();
                let id = format!("tierload-{name}-{n}");
                requests.spawn(async move {
                    let sent = start.elapsed();
                    let end = one(&client, &url, &key, &body, &id, respond_async).await;
                    if let End::Lost(why) = end {
                        // The id is the gateway's request id: its logs name it.
                        eprintln!(
                            "lost: {id} sent at {:.1} s, {why} after {:.1} s",
                            sent.as_secs_f64(),
                            start.elapsed().saturating_sub(sent).as_secs_f64()
                        );
                    }
                    if let End::Refused {
                        after_ms,
                        retry_after,
                    } = end
                    {
                        let retry = retry_after.map_or_else(|| "-".to_owned(), |s| s.to_string());
                        refusals.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                            "{id} sent at {:.3} s, refused after {after_ms} ms, retry-after {retry} s",
                            sent.as_secs_f64()
                        ));
                    }
                    ends.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((ti, end));
                });
                next += every;
            }
            while requests.join_next().await.is_some() {}
        }));
    }
    for pacer in pacers {
        pacer.await.context("a pacer panicked")?;
    }
    let ends = std::mem::take(&mut *ends.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some(path) = &args.refusals {
        let mut lines = std::mem::take(&mut *refusals.lock().unwrap_or_else(|p| p.into_inner()));
        lines.sort();
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).with_context(|| format!("--refusals {}", path.display()))?;
    }
    let mut summaries: BTreeMap<String, TierSummary> = BTreeMap::new();
    for (ti, tier) in tiers.iter().enumerate() {
        let mut waits: Vec<u64> = Vec::new();
        let mut totals: Vec<u64> = Vec::new();
        let mut s = TierSummary::default();
        let target = targets.get(&tier.name).copied();
        for (_, end) in ends.iter().filter(|(i, _)| *i == ti) {
            s.sent += 1;
            match *end {
                End::Answered {
                    queue_ms,
                    total_ms,
                    by,
                } => {
                    s.answered += 1;
                    waits.push(queue_ms);
                    totals.push(total_ms);
                    *s.served_by.entry(by).or_default() += 1;
                    if target.is_some_and(|t| total_ms <= t) {
                        s.within_target += 1;
                    }
                }
                End::Deferred { after_ms } => {
                    s.deferred += 1;
                    s.defer_ms_max = Some(s.defer_ms_max.map_or(after_ms, |m| m.max(after_ms)));
                }
                End::Refused { .. } => s.refused += 1,
                End::Status(code) => {
                    s.other_status += 1;
                    *s.other_codes.entry(code).or_default() += 1;
                }
                End::Lost(why) => {
                    s.lost += 1;
                    *s.lost_by.entry(why).or_default() += 1;
                }
            }
        }
        waits.sort_unstable();
        s.queue_ms_p50 = percentile(&waits, 50.0);
        s.queue_ms_p99 = percentile(&waits, 99.0);
        s.queue_ms_max = waits.last().copied();
        totals.sort_unstable();
        s.total_ms_p50 = percentile(&totals, 50.0);
        s.total_ms_p99 = percentile(&totals, 99.0);
        summaries.insert(tier.name.clone(), s);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut table = String::new();
    table.push_str("tier          sent  answered  deferred  refused  other  lost  wait p50 ms  wait p99 ms  wait max ms\n");
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for (name, s) in &summaries {
        table.push_str(&format!(
            "{name:<12} {:>5} {:>9} {:>9} {:>8} {:>6} {:>5} {:>12} {:>12} {:>12}\n",
            s.sent,
            s.answered,
            s.deferred,
            s.refused,
            s.other_status,
            s.lost,
            ms(s.queue_ms_p50),
            ms(s.queue_ms_p99),
            ms(s.queue_ms_max)
        ));
    }
    let lost: u64 = summaries.values().map(|s| s.lost).sum();
    eprint!("{table}");
    eprintln!(
        "run: {elapsed:.1} s in all ({:.0} s of sending); lost: {lost}",
        args.duration
    );
    if args.json {
        let line = serde_json::json!({"elapsed_s": elapsed, "tiers": summaries});
        eprintln!("JSON {line}");
    }
    if summaries.values().all(|s| s.sent == 0) {
        bail!("no request was sent");
    }
    Ok(())
}
