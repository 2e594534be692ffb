//! `make bench-cache` (e2e/bench/cache.sh runs these, release build, one at a time):
//! - `quality`: the semantic layer (the real model and the guard) over the fow-cache pairs
//!   (600 question pairs, half of them traps, and 240 conversation pairs; CC BY 4.0), per
//!   threshold: the share of hits that are wrong answers, and the hit rate on pairs that
//!   share an answer; with the model alone for comparison; on a held-out half (odd lines)
//!   apart from the half whose refusals are listed for tuning the guard. Fails when false
//!   hits reach 1% of hits at 0.95.
//! - `embedding`: the model alone embedding one text at a time (9 and 20 words).
//! - `embedding_cpu`: CPU time per text of the gateway's forward pass and of candle's
//!   `BertModel`, a sentence alone and in a batch of 32.
//! - `index`: the index's lookup at 2k, 10k and 100k entries (approximate and exact, with
//!   recall), and memory per entry.
//! - `latency`: exact and semantic hits through the gateway (HTTP on loopback, the mock
//!   provider behind it).
//!
//! Ignored in `make test`: they need the data set (FLOODGATE_FOW_DATA, fetched by the
//! script) and a release build to mean anything.

#![cfg(test)]

use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use floodgate_proxy::cache::key::Key;
use floodgate_proxy::cache::semantic::embed::{
    DIM, Embedder, Model, Pass, cosine, default_dir, one_thread,
};
use floodgate_proxy::cache::semantic::guard;
use floodgate_proxy::cache::semantic::index::{Index, Params, entry_bytes};
use floodgate_proxy::route::Dispatcher;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn data_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("FLOODGATE_FOW_DATA").expect(
            "FLOODGATE_FOW_DATA: the fow_cache/data directory (e2e/bench/cache.sh fetches it)",
        ),
    )
}

fn jsonl(path: PathBuf) -> Vec<Value> {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// One labelled pair: the cached text, the new text, whether earlier turns agree, whether
/// one answer serves both, its category, and whether it is in the held-out half.
struct Pair {
    a: String,
    b: String,
    history_same: bool,
    same_answer: bool,
    category: String,
    held_out: bool,
}

/// Hits, wrong hits (false) and right hits at threshold `t` among the pairs `keep` selects,
/// with the guard or the model alone, and the pairs that share an answer.
fn tally(
    pairs: &[Pair],
    scored: &[(f32, bool)],
    t: f32,
    guarded: bool,
    keep: &dyn Fn(&Pair) -> bool,
) -> (usize, usize, usize, usize) {
    let should = pairs.iter().filter(|p| keep(p) && p.same_answer).count();
    let (mut hits, mut wrong, mut right) = (0, 0, 0);
    for (p, (s, ok)) in pairs.iter().zip(scored) {
        if !keep(p) || !p.history_same || *s < t || (guarded && !ok) {
            continue;
        }
        hits += 1;
        if p.same_answer {
            right += 1
        } else {
            wrong += 1
        }
    }
    (hits, wrong, right, should)
}

fn last_user(messages: &Value) -> String {
    messages.as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn history(messages: &Value) -> Vec<Value> {
    let all = messages.as_array().unwrap();
    all[..all.len() - 1].to_vec()
}

#[test]
#[ignore = "benchmark: make bench-cache"]
fn quality() {
    let dir = data_dir();
    // Every other pair of the file is held out: the guard's rules are to be tuned by reading
    // the tuning half's refusals only (the examples printed below), and judged on the other.
    let mut pairs: Vec<Pair> = jsonl(dir.join("pairs.jsonl"))
        .into_iter()
        .enumerate()
        .map(|(i, v)| Pair {
            a: v["a"].as_str().unwrap().to_owned(),
            b: v["b"].as_str().unwrap().to_owned(),
            history_same: true,
            same_answer: v["same_answer"].as_bool().unwrap(),
            category: v["category"].as_str().unwrap().to_owned(),
            held_out: i % 2 == 1,
        })
        .collect();
    let questions = pairs.len();
    for sub in ["conv-parts", "conv-long"] {
        let mut files: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            for v in jsonl(f) {
                let held_out = pairs.len() % 2 == 1;
                pairs.push(Pair {
                    held_out,
                    a: last_user(&v["a"]),
                    b: last_user(&v["b"]),
                    history_same: history(&v["a"]) == history(&v["b"]),
                    same_answer: v["same_answer"].as_bool().unwrap(),
                    category: format!("conv:{}", v["subtype"].as_str().unwrap()),
                });
            }
        }
    }
    let model = Model::load(&default_dir()).expect("the embedding model (make model)");
    let vocab = model.vocab();
    let texts: Vec<&str> = pairs
        .iter()
        .flat_map(|p| [p.a.as_str(), p.b.as_str()])
        .collect();
    let started = Instant::now();
    let mut vectors = Vec::new();
    for batch in texts.chunks(32) {
        vectors.extend(model.embed(batch).unwrap());
    }
    let took = started.elapsed();
    let scored: Vec<(f32, bool)> = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                cosine(&vectors[2 * i], &vectors[2 * i + 1]),
                guard::check(&p.a, &p.b, &vocab).is_ok(),
            )
        })
        .collect();
    eprintln!(
        "\nsemantic cache quality: fow-cache {} question pairs + {} conversation pairs (CC BY 4.0)",
        questions,
        pairs.len() - questions
    );
    eprintln!(
        "embedded {} texts in {:.1} s ({:.1} ms each, batches of 32); load average {}",
        texts.len(),
        took.as_secs_f64(),
        took.as_secs_f64() * 1e3 / texts.len() as f64,
        load_avg()
    );
    let report = |title: &str, keep: &dyn Fn(&Pair) -> bool| {
        eprintln!("\n{title}");
        eprintln!(
            "threshold | guard: hits  false  false/hits  paraphrase hit rate | model alone: hits  false  false/hits  paraphrase hit rate"
        );
        for t in [
            0.80f32, 0.85, 0.88, 0.90, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98,
        ] {
            let mut row = String::new();
            for guarded in [true, false] {
                let (hits, wrong, right, should) = tally(&pairs, &scored, t, guarded, keep);
                row.push_str(&format!(
                    " | {hits:5} {wrong:6} {:9.1}% {:9.1}% ({right}/{should})",
                    100.0 * wrong as f64 / hits.max(1) as f64,
                    100.0 * right as f64 / should.max(1) as f64
                ));
            }
            eprintln!("     {t:.2}{row}");
        }
    };
    let questions_held_out = |p: &Pair| !p.category.starts_with("conv:") && p.held_out;
    let questions_tuning = |p: &Pair| !p.category.starts_with("conv:") && !p.held_out;
    report(
        "question pairs, held-out half (odd lines of pairs.jsonl; never read to tune the guard):",
        &questions_held_out,
    );
    report(
        "question pairs, tuning half (even lines; its refusals are listed below):",
        &questions_tuning,
    );
    report("question pairs, all (pairs.jsonl):", &|p| {
        !p.category.starts_with("conv:")
    });
    report(
        "conversation pairs (earlier turns must match exactly, then the last message is compared):",
        &|p| p.category.starts_with("conv:"),
    );
    // What the guard refuses among the model's true hits at the default threshold, in the
    // tuning half only: where the paraphrase hit rate is lost.
    let mut reasons: std::collections::BTreeMap<String, Vec<(&str, &str)>> = Default::default();
    for (p, (s, _)) in pairs.iter().zip(&scored) {
        if !p.held_out
            && p.history_same
            && p.same_answer
            && *s >= 0.95
            && let Err(r) = guard::check(&p.a, &p.b, &vocab)
        {
            reasons
                .entry(r.as_str().to_owned())
                .or_default()
                .push((p.a.as_str(), p.b.as_str()));
        }
    }
    eprintln!(
        "\ntrue pairs of the tuning half at >= 0.95 the guard refuses, by reason (three examples each):"
    );
    for (reason, examples) in &reasons {
        eprintln!("  {reason}: {}", examples.len());
        for (a, b) in examples.iter().take(3) {
            eprintln!("    {a:?} / {b:?}");
        }
    }
    // Per category at the default threshold.
    eprintln!("\nat 0.95 by category: pairs, hits with the guard, hits by the model alone");
    let mut cats: Vec<&str> = pairs.iter().map(|p| p.category.as_str()).collect();
    cats.sort();
    cats.dedup();
    for c in cats {
        let of: Vec<_> = pairs
            .iter()
            .zip(&scored)
            .filter(|(p, _)| p.category == c)
            .collect();
        let guarded = of
            .iter()
            .filter(|(p, (s, ok))| p.history_same && *s >= 0.95 && *ok)
            .count();
        let alone = of
            .iter()
            .filter(|(p, (s, _))| p.history_same && *s >= 0.95)
            .count();
        eprintln!("  {c:32} {:4} {guarded:4} {alone:4}", of.len());
    }
    // The target, enforced (a regression fails `make bench-cache`): false hits under 1% of
    // hits at the default threshold, on the held-out half and on every pair.
    for (what, keep) in [
        (
            "held-out question pairs",
            &questions_held_out as &dyn Fn(&Pair) -> bool,
        ),
        ("all pairs", &|_: &Pair| true),
    ] {
        let (hits, wrong, _, _) = tally(&pairs, &scored, 0.95, true, keep);
        assert!(
            wrong * 100 < hits.max(1),
            "{what}: {wrong} false hits of {hits} at 0.95 (target under 1%)"
        );
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn summary(name: &str, mut times: Vec<Duration>) {
    times.sort();
    eprintln!(
        "{name:28} n={:5}  p50 {:7.2} ms  p90 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms",
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        percentile(&times, 0.99),
        percentile(&times, 1.0)
    );
}

/// A deterministic pseudo-random generator (xorshift) of unit vectors.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.next() + 0.5) * n as f32) as usize % n
    }

    fn unit(&mut self) -> Vec<f32> {
        normalised((0..DIM).map(|_| self.next()).collect())
    }

    /// A unit vector at cosine about `cos` to the unit vector `to`.
    fn near(&mut self, to: &[f32], cos: f32) -> Vec<f32> {
        let noise = self.unit();
        let side = (1.0 - cos * cos).sqrt();
        normalised(
            to.iter()
                .zip(&noise)
                .map(|(a, n)| a * cos + n * side)
                .collect(),
        )
    }
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.iter_mut().for_each(|a| *a /= n);
    v
}

/// `n` entries in one partition, one topic per 50 entries (each at cosine ~0.7 to its
/// topic's centre, ~0.5 to the others of its topic, as one tenant's prompts embed): build
/// time, lookup time approximate and exact, recall@1 of the approximate lookup against the
/// exact one for 500 queries near a stored entry (cosine 0.90-0.99), and the share of the
/// exact candidates at or above 0.95 it returns.
fn index_at(n: usize) {
    let mut rng = Rng(42);
    // Approximate at every size (the default scans partitions of up to 8,192 entries whole).
    let mut index = Index::with_params(Params {
        exact_max: 0,
        ..Params::default()
    });
    let partition = Key([7; 32]);
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let text = "How do I report a missed bin collection in my area?";
    let topics = (n / 50).max(1);
    let centres: Vec<Vec<f32>> = (0..topics).map(|_| rng.unit()).collect();
    let mut vectors = Vec::with_capacity(n);
    for _ in 0..n {
        let c = &centres[rng.below(topics)];
        vectors.push(rng.near(c, 0.7));
    }
    let rss = rss_bytes();
    let started = Instant::now();
    for (i, v) in vectors.iter().enumerate() {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64).to_le_bytes());
        index.insert(partition, Key(k), text.to_owned(), v, far);
    }
    let built = started.elapsed();
    let grown = rss_bytes().saturating_sub(rss);
    let now = tokio::time::Instant::now();
    let (mut approx, mut exact) = (Vec::new(), Vec::new());
    let (mut same, mut asked, mut above, mut above_found) = (0, 0, 0, 0);
    for _ in 0..500 {
        let of = rng.below(n);
        let cos = 0.90 + 0.09 * (rng.next() + 0.5);
        let q = rng.near(&vectors[of], cos);
        let t = Instant::now();
        let a = index.search(&partition, &q, 0.8, now, 8);
        approx.push(t.elapsed());
        let t = Instant::now();
        let e = index.search_exact(&partition, &q, 0.8, now, 8);
        exact.push(t.elapsed());
        if let Some(best) = e.first() {
            asked += 1;
            same += usize::from(a.first().map(|c| c.key) == Some(best.key));
        }
        for c in e.iter().filter(|c| c.similarity >= 0.95) {
            above += 1;
            above_found += usize::from(a.iter().any(|x| x.key == c.key));
        }
    }
    eprintln!(
        "index, {n} entries in one partition: built in {:.0} ms ({:.1} us an insert)",
        built.as_secs_f64() * 1e3,
        built.as_secs_f64() * 1e6 / n as f64
    );
    summary(&format!("  approximate lookup, {n}"), approx);
    summary(&format!("  exact scan, {n}"), exact);
    eprintln!(
        "  recall@1 against the exact scan {:.4} ({same}/{asked}); candidates >= 0.95 found {:.4} ({above_found}/{above})",
        same as f64 / asked.max(1) as f64,
        above_found as f64 / above.max(1) as f64
    );
    eprintln!(
        "  memory: {} B per entry counted ({} B vector + text + {} B overhead); RSS grew {:.0} B per entry",
        index.bytes() / index.len(),
        DIM * 4,
        entry_bytes("") - DIM * 4,
        grown as f64 / n as f64
    );
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(0)
        * 4096
}

/// The index alone: one partition (the worst case: one tenant, one model, one system
/// prompt) of 2k, 10k and 100k entries grouped by topic as real prompts are, searched
/// approximately (nearest lists) and exactly (every entry), with the share of queries near
/// a stored prompt whose best match the approximate lookup finds.
#[test]
#[ignore = "benchmark: make bench-cache"]
fn index() {
    eprintln!(
        "\nsemantic index (release build; load average {} at start)",
        load_avg()
    );
    for n in [2_000usize, 10_000, 100_000] {
        index_at(n);
    }
}

/// The model on its thread, one text at a time as a lone lookup sends it (the wait for the
/// vector included): a sentence of 9 words (the latency test's paraphrase) and one of 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench-cache"]
async fn embedding() {
    let model = Model::load(&default_dir()).expect("the embedding model (make model)");
    let embedder = Embedder::start(model).unwrap();
    eprintln!(
        "\nembedding one text (release build; load average {} at start)",
        load_avg()
    );
    for text in [SHORT, LONG] {
        for _ in 0..20 {
            embedder.embed(text.to_owned()).await.unwrap();
        }
        let mut times = Vec::new();
        for _ in 0..300 {
            let started = Instant::now();
            embedder.embed(text.to_owned()).await.unwrap();
            times.push(started.elapsed());
        }
        summary(&format!("{} words", text.split_whitespace().count()), times);
    }
    eprintln!("load average at the end: {}", load_avg());
}

/// CPU time of this process so far, every thread's (the scheduler's count, in ns, from
/// /proc/self/task/*/schedstat): on a shared machine far steadier than wall time, which
/// counts the time other processes hold the cores.
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU and wall milliseconds per call of `f` over `n` calls (after 3 unmeasured).
fn per_call(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..3 {
        f();
    }
    let (cpu, wall) = (cpu_ns(), Instant::now());
    for _ in 0..n {
        f();
    }
    (
        (cpu_ns() - cpu) as f64 / 1e6 / n as f64,
        wall.elapsed().as_secs_f64() * 1e3 / n as f64,
    )
}

/// The embedding's CPU time per text, this gateway's forward pass (`Pass::Own`, the
/// default) against candle-transformers' `BertModel` (`Pass::Candle`), in rounds that
/// alternate them (the machine's load drifts): one sentence on one thread, as a lone
/// lookup runs on the model's thread; and a batch of 32 on every core, as a burst runs.
#[test]
#[ignore = "benchmark: make bench-cache"]
fn embedding_cpu() {
    let dir = default_dir();
    let passes = [Pass::Own, Pass::Candle];
    let models: Vec<Model> = passes
        .iter()
        .map(|p| Model::load_with(&dir, *p).expect("the embedding model (make model)"))
        .collect();
    let alone = one_thread().unwrap();
    let batch: Vec<String> = (0..32)
        .map(|i| format!("{} number {i}", if i % 2 == 0 { SHORT } else { LONG }))
        .collect();
    let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
    eprintln!(
        "
embedding CPU per text, ms (release build; process CPU time; load average {} at start)",
        load_avg()
    );
    eprintln!(
        "round  pass    | 9 words alone: cpu  wall | 20 words alone: cpu  wall | batch of 32: cpu  wall (per text)"
    );
    let mut cpu: Vec<Vec<[f64; 3]>> = vec![Vec::new(); passes.len()];
    for round in 1..=3 {
        for (k, (pass, model)) in passes.iter().zip(&models).enumerate() {
            let short = per_call(100, || {
                alone.install(|| model.embed(&[SHORT]).unwrap());
            });
            let long = per_call(100, || {
                alone.install(|| model.embed(&[LONG]).unwrap());
            });
            let (bc, bw) = per_call(5, || {
                model.embed(&batch).unwrap();
            });
            let batched = (bc / 32.0, bw / 32.0);
            eprintln!(
                "{round:5}  {:7} | {:18.2} {:5.2} | {:19.2} {:5.2} | {:16.2} {:5.2}",
                format!("{pass:?}"),
                short.0,
                short.1,
                long.0,
                long.1,
                batched.0,
                batched.1
            );
            cpu[k].push([short.0, long.0, batched.0]);
        }
    }
    let median = |k: usize, i: usize| {
        let mut v: Vec<f64> = cpu[k].iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (i, case) in ["9 words alone", "20 words alone", "batch of 32"]
        .iter()
        .enumerate()
    {
        eprintln!(
            "median CPU per text, {case}: Own {:.2} ms, Candle {:.2} ms (Own/Candle {:.2})",
            median(0, i),
            median(1, i),
            median(0, i) / median(1, i)
        );
    }
    eprintln!("load average at the end: {}", load_avg());
}

/// The paraphrase of the latency test's stored prompt (9 words).
const SHORT: &str = "how do I report a missed bin collection please";
/// A sentence of 20 words.
const LONG: &str = "Could you tell me how I should report a missed bin collection on my street \
                    to the council this week?";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench-cache"]
async fn latency() {
    eprintln!(
        "\ncache latency (release build; load average {} at start)",
        load_avg()
    );
    // Through the gateway: exact hits and semantic hits (a paraphrase, embedded each time).
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n\
         \x20 providers:\n\
         \x20 - {{name: up, type: openai, baseUrl: \"{}\", models: [{{name: gpt-4o}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000000}}]}}\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: cache}}\nspec:\n\
         \x20 exact: {{ttlSeconds: 3600}}\n\
         \x20 semantic: {{ttlSeconds: 3600, threshold: 0.95}}\n",
        mock.base_url()
    );
    let mut cache = None;
    let gw = Gateway::start_configured(
        &yaml,
        Dispatcher::new(Duration::from_secs(60), Duration::from_secs(10)).unwrap(),
        |s| cache = Some(s.cache.clone()),
    )
    .await
    .unwrap();
    let cache = cache.unwrap();
    cache.prepare(&gw.dispatcher.config());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cache.semantic().ready() {
        assert!(Instant::now() < deadline, "the model did not load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url());
    let ask = |p: &str| json!({"model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": p}]});
    let send = |body: Value| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let started = Instant::now();
            let r = client.post(&url).json(&body).send().await.unwrap();
            let cache = r
                .headers()
                .get("x-floodgate-cache")
                .map(|v| v.to_str().unwrap().to_owned());
            r.bytes().await.unwrap();
            (started.elapsed(), cache.unwrap_or_default())
        }
    };
    let original = "How do I report a missed bin collection?";
    assert_eq!(send(ask(original)).await.1, "miss");
    while cache.semantic().index().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..50 {
        send(ask(original)).await;
    }
    let mut exact = Vec::new();
    for _ in 0..2000 {
        let (t, c) = send(ask(original)).await;
        assert_eq!(c, "exact");
        exact.push(t);
    }
    summary("exact hit through the proxy", exact);
    let mut semantic = Vec::new();
    for i in 0..300 {
        // Each a different wording (the paraphrase is not stored, so it is embedded each
        // time); every one a hit.
        let p = if i % 2 == 0 {
            SHORT
        } else {
            "How do I report a missed bin collection"
        };
        let (t, c) = send(ask(p)).await;
        assert_eq!(c, "semantic", "{p}");
        semantic.push(t);
    }
    summary("semantic hit through the proxy", semantic);
    eprintln!("load average at the end: {}", load_avg());
}
