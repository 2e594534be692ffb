//! `loadgen`: a small HTTP/1.1 load generator for `make bench`, loopback only.
//!
//! ```text
//! loadgen --url http://127.0.0.1:8080/v1/chat/completions --rate 1000 --duration 10 \
//!         --connections 16 --pid proxy=1234 --pid mock=5678
//! ```
//!
//! Each of `--connections` keep-alive connections sends one request at a time. Without
//! `--rate` the load is closed-loop (each connection sends its next request as soon as the last
//! answer is read: maximum throughput). With `--rate R` it is open-loop: a pacer thread issues
//! a ticket every 1/R s and latency is measured from the moment the ticket was issued, so
//! time spent waiting for a free connection counts (no coordinated omission, as in wrk2).
//! Latencies go into an HDR histogram (microseconds, 3 significant digits).
//!
//! For every `--pid NAME=PID` the CPU time (utime + stime from `/proc/PID/stat`) used during the
//! run and the resident memory at its end are reported, as is the whole machine's busy CPU, so a
//! reader can see what the load generator and the mock cost on the same cores.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};
use tokio::task::{JoinHandle, JoinSet};

/// Longest run accepted, so a typo cannot load the machine for an hour.
const MAX_DURATION_S: f64 = 600.0;
/// Most requests accepted in one run.
const MAX_REQUESTS: u64 = 50_000_000;
/// Kernel clock ticks per second in `/proc/PID/stat` (USER_HZ, 100 on every Linux ABI we run on).
const USER_HZ: u64 = 100;
/// Histogram range: 1 µs to 120 s.
const HIST_MAX_US: u64 = 120_000_000;

/// HTTP load generator for the Floodgate benchmarks (127.0.0.1 only).
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// Target URL; its host must be a loopback address.
    #[arg(long)]
    url: String,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Stop issuing requests after this many seconds (default 10 when --requests is not given).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Open-loop target rate in requests per second (default: closed loop, as fast as it goes).
    #[arg(long, value_name = "REQ_PER_S")]
    rate: Option<f64>,
    /// Model in the default chat-completions body.
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// Ask for a streamed (SSE) answer; the body must then end with `data: [DONE]`.
    #[arg(long)]
    stream: bool,
    /// Request body (JSON) instead of the default chat completion.
    #[arg(long)]
    body: Option<String>,
    /// Extra request header `NAME: VALUE` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Process to report CPU time and memory of, `NAME=PID` (repeatable).
    #[arg(long = "pid", value_name = "NAME=PID")]
    pids: Vec<String>,
    /// Tokio worker threads of the load generator itself.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// A label for this run, echoed in the report.
    #[arg(long, default_value = "run")]
    label: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What every connection needs to build and send requests.
#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    authority: HeaderValue,
    path: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    stream: bool,
    timeout: Duration,
}

/// When to stop issuing requests.
#[derive(Debug)]
struct Budget {
    deadline: Instant,
    max_requests: u64,
    issued: AtomicU64,
}

impl Budget {
    /// Claims the next request of a closed-loop run; false once the run is over.
    fn take(&self) -> bool {
        Instant::now() < self.deadline
            && self.issued.fetch_add(1, Ordering::Relaxed) < self.max_requests
    }
}

/// One connection's results, merged at the end.
#[derive(Debug)]
struct Tally {
    latency: Histogram<u64>,
    first_chunk: Histogram<u64>,
    ok: u64,
    errors: u64,
    reconnects: u64,
    /// Non-2xx statuses seen, with counts.
    statuses: Vec<(u16, u64)>,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

impl Tally {
    fn new() -> Result<Self> {
        Ok(Self {
            latency: Histogram::new_with_bounds(1, HIST_MAX_US, 3)?,
            first_chunk: Histogram::new_with_bounds(1, HIST_MAX_US, 3)?,
            ok: 0,
            errors: 0,
            reconnects: 0,
            statuses: Vec::new(),
            first_error: None,
            last_done: None,
        })
    }

    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }

    fn status(&mut self, status: u16) {
        match self.statuses.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => self.statuses.push((status, 1)),
        }
    }

    fn merge(&mut self, other: Tally) -> Result<()> {
        self.latency.add(&other.latency)?;
        self.first_chunk.add(&other.first_chunk)?;
        self.ok += other.ok;
        self.errors += other.errors;
        self.reconnects += other.reconnects;
        for (status, n) in other.statuses {
            for _ in 0..n {
                self.status(status);
            }
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.last_done = self.last_done.max(other.last_done);
        Ok(())
    }
}

/// A keep-alive HTTP/1.1 connection; the task driving it is aborted on drop.
#[derive(Debug)]
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Conn {
    async fn open(target: &Target) -> Result<Self> {
        let stream = TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { sender, driver })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// What one request came to.
#[derive(Debug)]
enum Outcome {
    Ok { first_chunk: Duration },
    Status(u16),
    BadBody(&'static str),
}

/// CPU and memory of one process, sampled from `/proc`.
#[derive(Debug, Clone, Serialize)]
struct ProcessReport {
    name: String,
    pid: u32,
    cpu_ms: f64,
    cpu_ms_per_request: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
}

/// The whole run, as printed.
#[derive(Debug, Serialize)]
struct Report {
    label: String,
    url: String,
    mode: String,
    stream: bool,
    connections: usize,
    target_rate: Option<f64>,
    seconds: f64,
    ok: u64,
    errors: u64,
    reconnects: u64,
    statuses: Vec<(u16, u64)>,
    first_error: Option<String>,
    req_per_s: f64,
    latency_ms: Percentiles,
    first_chunk_ms: Option<Percentiles>,
    processes: Vec<ProcessReport>,
    machine_busy_cores: Option<f64>,
    /// Cores' worth of time the hypervisor gave to other guests while this one wanted it:
    /// latency measured under high steal says more about the host than about the proxy.
    machine_steal_cores: Option<f64>,
    cores: usize,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let target = Arc::new(target(&args)?);
    let pids = parse_pids(&args.pids)?;
    ensure!(
        (1..=4096).contains(&args.connections),
        "--connections must be between 1 and 4096"
    );
    ensure!(
        (1..=64).contains(&args.threads),
        "--threads must be between 1 and 64"
    );
    if let Some(rate) = args.rate {
        ensure!(
            rate > 0.0 && rate <= 1_000_000.0,
            "--rate must be in (0, 1000000]"
        );
    }
    let duration = match (args.duration, args.requests) {
        (Some(d), _) => d,
        (None, Some(_)) => MAX_DURATION_S,
        (None, None) => 10.0,
    };
    ensure!(
        duration > 0.0 && duration <= MAX_DURATION_S,
        "--duration must be in (0, {MAX_DURATION_S}] seconds"
    );
    let max_requests = args.requests.unwrap_or(MAX_REQUESTS);
    ensure!(
        (1..=MAX_REQUESTS).contains(&max_requests),
        "--requests must be between 1 and {MAX_REQUESTS}"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let report = runtime.block_on(run(
        &args,
        target,
        &pids,
        Duration::from_secs_f64(duration),
        max_requests,
    ))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        out.write_all(render(&report).as_bytes())?;
    }
    if report.ok == 0 {
        bail!(
            "no request succeeded ({})",
            report
                .first_error
                .as_deref()
                .unwrap_or("no request was sent")
        );
    }
    Ok(())
}

/// Parses the URL, refusing anything but a loopback host, and builds the request parts.
fn target(args: &Args) -> Result<Target> {
    let uri: Uri = args.url.parse().context("--url is not a valid URL")?;
    ensure!(
        uri.scheme_str() == Some("http"),
        "--url must be plain http://"
    );
    let host = uri.host().context("--url has no host")?;
    let ip: IpAddr = match host.trim_start_matches('[').trim_end_matches(']') {
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        other => other
            .parse()
            .with_context(|| format!("--url host `{other}` is not an IP address"))?,
    };
    ensure!(
        ip.is_loopback(),
        "--url must point at a loopback address (127.0.0.1), not {ip}"
    );
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri.authority().context("--url has no authority")?.as_str();
    let path: Uri = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .context("--url path")?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("--header `{h}` must be `NAME: VALUE`"))?;
        headers.push((
            HeaderName::from_bytes(name.trim().as_bytes()).context("--header name")?,
            HeaderValue::from_str(value.trim()).context("--header value")?,
        ));
    }
    let body = match &args.body {
        Some(body) => body.clone(),
        None => serde_json::json!({
            "model": args.model,
            "stream": args.stream,
            "messages": [{"role": "user", "content": "Say hello to the benchmark in one line."}],
        })
        .to_string(),
    };
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        authority: HeaderValue::from_str(authority)?,
        path,
        headers,
        body: Bytes::from(body),
        stream: args.stream,
        timeout: Duration::from_millis(args.timeout_ms),
    })
}

fn parse_pids(specs: &[String]) -> Result<Vec<(String, u32)>> {
    specs
        .iter()
        .map(|spec| {
            let (name, pid) = spec
                .split_once('=')
                .with_context(|| format!("--pid `{spec}` must be NAME=PID"))?;
            let pid = pid
                .parse()
                .with_context(|| format!("--pid `{spec}`: not a process id"))?;
            Ok((name.to_owned(), pid))
        })
        .collect()
}

async fn run(
    args: &Args,
    target: Arc<Target>,
    pids: &[(String, u32)],
    duration: Duration,
    max_requests: u64,
) -> Result<Report> {
    // Connect everything first, so connection set-up is not part of the measurement.
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(Conn::open(&target).await?);
    }
    let cpu_before = pids
        .iter()
        .map(|(_, pid)| cpu_ms(*pid))
        .collect::<Result<Vec<_>>>()?;
    let machine_before = machine_ticks().ok();
    let start = Instant::now();
    let budget = Arc::new(Budget {
        deadline: start + duration,
        max_requests,
        issued: AtomicU64::new(0),
    });
    let (tickets, pacer) = match args.rate {
        Some(rate) => {
            let (tx, rx) = mpsc::unbounded_channel();
            let budget = budget.clone();
            let pacer = std::thread::Builder::new()
                .name("pacer".to_owned())
                .spawn(move || pace(rate, start, &budget, &tx))?;
            (Some(Arc::new(Mutex::new(rx))), Some(pacer))
        }
        None => (None, None),
    };
    let mut workers = JoinSet::new();
    for conn in conns {
        workers.spawn(worker(
            conn,
            target.clone(),
            budget.clone(),
            tickets.clone(),
        ));
    }
    drop(tickets);
    let mut total = Tally::new()?;
    while let Some(tally) = workers.join_next().await {
        total.merge(tally??)?;
    }
    if let Some(pacer) = pacer
        && pacer.join().is_err()
    {
        bail!("the pacer thread failed");
    }
    let elapsed = total.last_done.unwrap_or(start).duration_since(start);
    let machine = machine_before
        .zip(machine_ticks().ok())
        .and_then(|(before, after)| machine_cores(before, after));
    let machine_busy_cores = machine.map(|(busy, _)| busy);
    let machine_steal_cores = machine.map(|(_, steal)| steal);
    let mut processes = Vec::new();
    for ((name, pid), before) in pids.iter().zip(cpu_before) {
        let cpu = cpu_ms(*pid)? - before;
        let (rss_mib, peak_rss_mib) = rss_mib(*pid)?;
        processes.push(ProcessReport {
            name: name.clone(),
            pid: *pid,
            cpu_ms: cpu,
            cpu_ms_per_request: cpu / (total.ok + total.errors).max(1) as f64,
            rss_mib,
            peak_rss_mib,
        });
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(Report {
        label: args.label.clone(),
        url: args.url.clone(),
        mode: match args.rate {
            Some(_) => "open-loop".to_owned(),
            None => "closed-loop".to_owned(),
        },
        stream: args.stream,
        connections: args.connections,
        target_rate: args.rate,
        seconds: secs,
        ok: total.ok,
        errors: total.errors,
        reconnects: total.reconnects,
        statuses: total.statuses,
        first_error: total.first_error,
        req_per_s: total.ok as f64 / secs,
        latency_ms: Percentiles::of(&total.latency),
        first_chunk_ms: args.stream.then(|| Percentiles::of(&total.first_chunk)),
        processes,
        machine_busy_cores,
        machine_steal_cores,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
    })
}

/// Issues one ticket (its issue time) every 1/`rate` seconds until the budget runs out.
/// A plain thread: `thread::sleep` wakes within tens of microseconds, tokio's timer only to
/// the millisecond, which would blur sub-millisecond latencies at 1,000 req/s.
fn pace(rate: f64, start: Instant, budget: &Budget, tickets: &mpsc::UnboundedSender<Instant>) {
    let interval = 1.0 / rate;
    for i in 0..budget.max_requests {
        let due = start + Duration::from_secs_f64(i as f64 * interval);
        if due >= budget.deadline {
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // Measured from when the request was due to go, or later if this thread woke late:
        // the pacer's own lateness is the generator's fault, not the server's.
        if tickets.send(Instant::now().max(due)).is_err() {
            break;
        }
        budget.issued.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends requests on one connection until the run is over, reconnecting after a failure.
async fn worker(
    conn: Conn,
    target: Arc<Target>,
    budget: Arc<Budget>,
    tickets: Option<Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>>,
) -> Result<Tally> {
    let mut tally = Tally::new()?;
    let mut conn = Some(conn);
    loop {
        let issued = match &tickets {
            Some(rx) => match rx.lock().await.recv().await {
                Some(t) => t,
                None => break,
            },
            None if budget.take() => Instant::now(),
            None => break,
        };
        let open = match conn.take() {
            Some(c) => c,
            None => {
                tally.reconnects += 1;
                match Conn::open(&target).await {
                    Ok(c) => c,
                    Err(e) => {
                        tally.error(format!("{e:#}"));
                        continue;
                    }
                }
            }
        };
        let result = tokio::time::timeout(target.timeout, send(open, &target, issued)).await;
        let done = Instant::now();
        tally.last_done = Some(done);
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        tally.latency.saturating_record(us(done - issued));
        match result {
            Ok(Ok((c, Outcome::Ok { first_chunk }))) => {
                tally.ok += 1;
                tally.first_chunk.saturating_record(us(first_chunk));
                conn = Some(c);
            }
            Ok(Ok((c, Outcome::Status(status)))) => {
                tally.status(status);
                tally.error(format!("HTTP status {status}"));
                conn = Some(c);
            }
            Ok(Ok((c, Outcome::BadBody(why)))) => {
                tally.error(why.to_owned());
                conn = Some(c);
            }
            Ok(Err(e)) => tally.error(format!("{e:#}")),
            Err(_) => tally.error(format!("timed out after {:?}", target.timeout)),
        }
    }
    Ok(tally)
}

/// One request on `conn`, the whole body read. Gives the connection back for reuse.
async fn send(mut conn: Conn, target: &Target, issued: Instant) -> Result<(Conn, Outcome)> {
    conn.sender.ready().await.context("connection closed")?;
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(target.path.clone())
        .header(HOST, target.authority.clone())
        .header(CONTENT_TYPE, "application/json");
    for (name, value) in &target.headers {
        request = request.header(name, value);
    }
    let response = conn
        .sender
        .send_request(request.body(Full::new(target.body.clone()))?)
        .await
        .context("sending the request")?;
    let status = response.status();
    let mut body = response.into_body();
    let mut first_chunk = None;
    let mut tail = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the body")?;
        if let Some(data) = frame.data_ref() {
            first_chunk.get_or_insert_with(|| issued.elapsed());
            if target.stream {
                // Keep only the last bytes: enough to find the final `data: [DONE]`.
                tail.extend_from_slice(data);
                let cut = tail.len().saturating_sub(64);
                tail.drain(..cut);
            }
        }
    }
    let outcome = if !status.is_success() {
        Outcome::Status(status.as_u16())
    } else if target.stream && !tail.trim_ascii_end().ends_with(b"data: [DONE]") {
        Outcome::BadBody("stream did not end with data: [DONE]")
    } else {
        Outcome::Ok {
            first_chunk: first_chunk.unwrap_or_else(|| issued.elapsed()),
        }
    };
    Ok((conn, outcome))
}

/// CPU time (user + system) a process has used so far, in milliseconds.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (is process {pid} running?)"))?;
    // Fields after the `(comm)`, which may itself hold spaces: state is field 3, utime 14,
    // stime 15 (proc(5)), so indexes 11 and 12 here.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<u64>()
            .context("unexpected /proc/PID/stat")
    };
    Ok((ticks(11)? + ticks(12)?) as f64 * 1000.0 / USER_HZ as f64)
}

/// Resident and peak resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// Clock ticks of all CPUs, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy)]
struct Ticks {
    busy: u64,
    steal: u64,
    total: u64,
}

fn machine_ticks() -> Result<Ticks> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let at = |i: usize| values.get(i).copied().unwrap_or(0);
    let total: u64 = values.iter().take(8).sum();
    Ok(Ticks {
        busy: total - at(3) - at(4),
        steal: at(7),
        total,
    })
}

/// Average number of cores busy, and of cores taken by the hypervisor (steal: this virtual
/// machine wanted to run but the host ran something else), between two samples.
fn machine_cores(before: Ticks, after: Ticks) -> Option<(f64, f64)> {
    let total = after.total.checked_sub(before.total)?;
    let busy = after.busy.checked_sub(before.busy)?;
    let steal = after.steal.checked_sub(before.steal)?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    (total > 0).then(|| {
        (
            busy as f64 / total as f64 * cores,
            steal as f64 / total as f64 * cores,
        )
    })
}

/// The human-readable report.
fn render(r: &Report) -> String {
    let mut s = String::new();
    let rate = r
        .target_rate
        .map_or("max rate".to_owned(), |rate| format!("{rate} req/s"));
    let _ = writeln!(
        s,
        "{}: {} {} ({}), {} connections, {}, {:.1} s",
        r.label,
        r.url,
        if r.stream {
            "streamed"
        } else {
            "non-streaming"
        },
        r.mode,
        r.connections,
        rate,
        r.seconds
    );
    let _ = writeln!(
        s,
        "  requests: {} ok, {} errors, {} reconnects; achieved {:.0} req/s",
        r.ok, r.errors, r.reconnects, r.req_per_s
    );
    if let Some(e) = &r.first_error {
        let _ = writeln!(s, "  first error: {e}; statuses: {:?}", r.statuses);
    }
    let p = |name: &str, p: &Percentiles, s: &mut String| {
        let _ = writeln!(
            s,
            "  {name} ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
            p.p50, p.p90, p.p99, p.p999, p.max, p.mean
        );
    };
    p("latency", &r.latency_ms, &mut s);
    if let Some(fc) = &r.first_chunk_ms {
        p("first chunk", fc, &mut s);
    }
    for proc in &r.processes {
        let _ = writeln!(
            s,
            "  {} (pid {}): cpu {:.0} ms = {:.4} ms/request; rss {:.1} MiB (peak {:.1} MiB)",
            proc.name,
            proc.pid,
            proc.cpu_ms,
            proc.cpu_ms_per_request,
            proc.rss_mib,
            proc.peak_rss_mib
        );
    }
    if let Some(busy) = r.machine_busy_cores {
        let steal = r.machine_steal_cores.unwrap_or(0.0);
        let _ = writeln!(
            s,
            "  machine: {busy:.2} of {} cores busy, {steal:.2} stolen by the host",
            r.cores
        );
    }
    s
}
