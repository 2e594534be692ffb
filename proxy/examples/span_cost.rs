//! Throwaway: per-request cost of the request + upstream spans.
#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]
use floodgate_proxy::telemetry::{self, TARGET};
use std::time::Instant;
use tracing::field::Empty;

fn one(model: &str, base: &str) {
    let span = tracing::info_span!(target: TARGET, "chat", otel.kind = "server", otel.status_code = Empty,
        gen_ai.operation.name = "chat", gen_ai.request.model = Empty, http.request.method = "POST",
        http.route = "/v1/chat/completions", http.response.status_code = Empty, error.type = Empty,
        floodgate.provider = Empty, floodgate.key = Empty, floodgate.attempts = Empty);
    let _g = span.enter();
    let up = tracing::info_span!(target: TARGET, "upstream", otel.name = Empty, otel.kind = "client",
        otel.status_code = Empty, gen_ai.operation.name = "chat", gen_ai.provider.name = "openai",
        gen_ai.request.model = model, server.address = Empty, floodgate.provider = "openai",
        floodgate.key = "primary", error.type = Empty, gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty);
    if !up.is_disabled() {
        up.record("otel.name", format!("chat {model}").as_str());
        up.record("server.address", telemetry::host_of(base));
    }
    {
        let _u = up.enter();
        let cur = tracing::Span::current();
        if !cur.is_disabled() {
            up.record("gen_ai.usage.input_tokens", 6i64);
            up.record("gen_ai.usage.output_tokens", 10i64);
        }
    }
    drop(up);
    if !span.is_disabled() {
        span.record("http.response.status_code", 200i64);
        span.record("gen_ai.request.model", model);
        span.record("floodgate.provider", "openai");
        span.record("floodgate.key", "primary");
        span.record("floodgate.attempts", 1i64);
    }
}

fn main() {
    let endpoint = std::env::args().nth(1);
    let _t = telemetry::init(telemetry::Options {
        json: true,
        otlp_endpoint: endpoint,
        service_name: "bench".into(),
    })
    .unwrap();
    let n: u32 = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1_000_000);
    for _ in 0..n / 10 {
        one("gpt-4o", "http://127.0.0.1:1/v1");
    }
    let t = Instant::now();
    for _ in 0..n {
        one("gpt-4o", "http://127.0.0.1:1/v1");
    }
    println!(
        "{:.1} ns per request",
        t.elapsed().as_nanos() as f64 / f64::from(n)
    );
}
