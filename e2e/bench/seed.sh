#!/usr/bin/env bash
# `make bench` (last part) or `make bench-seed`: the seed's scenario, measured. The example pool
# of examples/scaling-500rpm (Claude 3 x 20, Gemini 5 x 60, GPT-4 2 x 200 = 760 RPM of raw
# capacity) on the mock providers, which enforce every key's limit over real 60 s windows; the
# local models (Llama, Mistral, CodeLlama, 2 replicas x 4 parallel each) on the mock's Ollama
# API; the example's routing rules, cache (exact, semantic with all-MiniLM-L6-v2 at 0.95,
# templates, dedup; in memory) and tiers (free answered within 60 s here). Open-loop load of
# BENCH_SEED_RPM (default 3,000: more than the ~2,130 RPM the seed expects the gateway to
# serve, so that what it serves within target is measured, not what was offered) split
# 10/20/30/40 over enterprise/pro/basic/free, for BENCH_SEED_SECONDS (default 180), with the
# workload of e2e/bench/seed_workload.py (Zipf-like repeats, paraphrases, concurrent
# duplicates, 40% simple prompts; its docstring says how it is built).
#
# Prints, per tier, the RPM offered and the RPM answered within the tier's target (enterprise
# 1 s, pro 2 s, basic 5 s, free 60 s, whole response at the client); the share answered by the
# cache (exact, semantic, template), dedup, local models and premium providers; and the
# multiplier over raw capacity (RPM served within target / 760 RPM; the seed expects about
# 2.8x). Without the embedding model (`make model`) the semantic layer is off (said so).
# Fails (non-zero exit) on a request lost, an upstream 429, or a key over its limit in any
# 60 s window. Everything on 127.0.0.1; everything started is stopped at the end.
#
#   BENCH_SEED_SECONDS  seconds of load (default 180; at least 180 for the scenario)
#   BENCH_SEED_RPM      offered load in requests per minute (default 3000)
#   BENCH_PROXY_BIN     the proxy binary (default: the release build of this tree)
#   BENCH_OUT           where results go (default $CACHE/bench): seed.txt, and the gateway's
#                       log as seed-proxy.log
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH_NAME=bench-seed
# shellcheck source=e2e/bench/lib.sh
source e2e/bench/lib.sh

CACHE=${CACHE:-$HOME/.cache/floodgate}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
CARGO=${CARGO:-cargo}
SECONDS_OF_LOAD=${BENCH_SEED_SECONDS:-180}
LOAD_RPM=${BENCH_SEED_RPM:-3000}
OUT=${BENCH_OUT:-$CACHE/bench}
BIN=$CARGO_TARGET_DIR/release
PROXY_BIN=${BENCH_PROXY_BIN:-$BIN/floodgate-proxy}
# Upstream latency of the mocks (model names `...-slow-<ms>`, see e2e/src/mock/faults.rs).
PREMIUM_MS=${BENCH_SEED_PREMIUM_MS:-300}
LOCAL_MS=${BENCH_SEED_LOCAL_MS:-500}

echo "bench-seed: building release binaries"
"$CARGO" build -q --release -p floodgate-proxy --bin floodgate-proxy \
  -p floodgate-e2e --bin mock-providers --bin tierload

mkdir -p "$OUT"
work=$(mktemp -d "$OUT/seed.XXXXXX")

# The example pool's keys and limits (examples/scaling-500rpm/10-pools.yaml).
keys=(claude-1=20 claude-2=20 claude-3=20 gemini-1=60 gemini-2=60 gemini-3=60 gemini-4=60
  gemini-5=60 openai-1=200 openai-2=200)
rpm_args=()
for k in "${keys[@]}"; do rpm_args+=(--rpm "seed-${k%=*}=${k#*=}"); done
RUST_LOG=warn,mock_providers=info NO_COLOR=1 \
  "$BIN/mock-providers" --listen 127.0.0.1:0 --quiet --window-ms 60000 "${rpm_args[@]}" \
  >"$work/mock.log" 2>&1 &
mock_pid=$!
pids+=("$mock_pid")
mock_url=$(address_from_log "$mock_pid" "$work/mock.log" 'http://127\.0\.0\.1:[0-9]+')

mkdir -p "$work/config"
sed -e "s|@MOCK@|$mock_url|g" -e "s|@PMS@|$PREMIUM_MS|g" -e "s|@LMS@|$LOCAL_MS|g" \
  >"$work/config/gateway.yaml" <<'YAML'
apiVersion: v1
kind: Secret
metadata: {name: seed-keys}
stringData:
  claude-1: seed-claude-1
  claude-2: seed-claude-2
  claude-3: seed-claude-3
  gemini-1: seed-gemini-1
  gemini-2: seed-gemini-2
  gemini-3: seed-gemini-3
  gemini-4: seed-gemini-4
  gemini-5: seed-gemini-5
  openai-1: seed-openai-1
  openai-2: seed-openai-2
  enterprise: sk-seed-enterprise
  pro: sk-seed-pro
  basic: sk-seed-basic
  free: sk-seed-free
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {name: premium}
spec:
  strategy: least-loaded
  providers:
  - name: claude
    type: anthropic
    baseUrl: "@MOCK@"
    models: [{name: claude-sonnet-4-slow-@PMS@, alias: smart, inputPer1M: 3.0, outputPer1M: 15.0}]
    keys:
    - {name: claude-1, secretRef: {name: seed-keys, key: claude-1}, rpm: 20}
    - {name: claude-2, secretRef: {name: seed-keys, key: claude-2}, rpm: 20}
    - {name: claude-3, secretRef: {name: seed-keys, key: claude-3}, rpm: 20}
  - name: gemini
    type: gemini
    baseUrl: "@MOCK@"
    models: [{name: gemini-2.5-flash-slow-@PMS@, alias: smart, inputPer1M: 0.3, outputPer1M: 2.5}]
    keys:
    - {name: gemini-1, secretRef: {name: seed-keys, key: gemini-1}, rpm: 60}
    - {name: gemini-2, secretRef: {name: seed-keys, key: gemini-2}, rpm: 60}
    - {name: gemini-3, secretRef: {name: seed-keys, key: gemini-3}, rpm: 60}
    - {name: gemini-4, secretRef: {name: seed-keys, key: gemini-4}, rpm: 60}
    - {name: gemini-5, secretRef: {name: seed-keys, key: gemini-5}, rpm: 60}
  - name: gpt4
    type: openai
    baseUrl: "@MOCK@"
    models: [{name: gpt-4o-slow-@PMS@, alias: smart, inputPer1M: 2.5, outputPer1M: 10.0}]
    keys:
    - {name: openai-1, secretRef: {name: seed-keys, key: openai-1}, rpm: 200}
    - {name: openai-2, secretRef: {name: seed-keys, key: openai-2}, rpm: 200}
  fallback: [claude, gemini, gpt4]
  maxAttempts: 3
  circuitBreaker: {failureThreshold: 5, openSeconds: 60}
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {name: local}
spec:
  providers:
  - {name: llama, type: ollama, localModel: llama, models: [{name: "llama3.1-8b-slow-@LMS@"}]}
  - {name: mistral, type: ollama, localModel: mistral, models: [{name: "mistral-7b-slow-@LMS@"}]}
  - {name: codellama, type: ollama, localModel: codellama, models: [{name: "codellama-13b-slow-@LMS@"}]}
---
apiVersion: floodgate.dev/v1alpha1
kind: LocalModelDeployment
metadata: {name: llama, annotations: {floodgate.dev/endpoint: "@MOCK@"}}
spec:
  model: "llama3.1:8b"
  classes: [simple, medium]
  replicas: 2
  ollama: {numParallel: 4}
  autoscaling: {minReplicas: 2, maxReplicas: 20, queueDepth: 100, latencyMs: 2000, cooldownSeconds: 300}
---
apiVersion: floodgate.dev/v1alpha1
kind: LocalModelDeployment
metadata: {name: mistral, annotations: {floodgate.dev/endpoint: "@MOCK@"}}
spec:
  model: "mistral:7b"
  classes: [simple]
  replicas: 2
  ollama: {numParallel: 4}
  autoscaling: {minReplicas: 2, maxReplicas: 20, queueDepth: 100, latencyMs: 2000, cooldownSeconds: 300}
---
apiVersion: floodgate.dev/v1alpha1
kind: LocalModelDeployment
metadata: {name: codellama, annotations: {floodgate.dev/endpoint: "@MOCK@"}}
spec:
  model: "codellama:13b"
  classes: [code]
  replicas: 2
  ollama: {numParallel: 4}
  autoscaling: {minReplicas: 2, maxReplicas: 20, queueDepth: 100, latencyMs: 2000, cooldownSeconds: 300}
---
apiVersion: floodgate.dev/v1alpha1
kind: RoutingPolicy
metadata: {name: hybrid}
spec:
  premiumPool: premium
  rules:
  - name: free-simple
    match: {tiers: [free], classes: [simple]}
    targets: [{localModel: mistral}, {pool: premium, model: smart}]
  - name: basic-medium
    match: {tiers: [basic], classes: [medium]}
    targets: [{localModel: llama}, {pool: premium, model: smart}]
  - name: code-local
    match: {tiers: [free, basic], classes: [code]}
    targets: [{localModel: codellama}, {pool: premium, model: smart}]
  - name: premium
    targets: [{pool: premium}]
---
apiVersion: floodgate.dev/v1alpha1
kind: CachePolicy
metadata: {name: default}
spec:
  exact: {ttlSeconds: 3600}
  semantic: {ttlSeconds: 3600, threshold: 0.95}
  templates:
    ttlSeconds: 86400
    items:
    - name: greeting
      pattern: "(?i)^(hi|hello|hey)[!. ]*$"
      response: "Hello! How can I help you today?"
    - name: business-hours
      pattern: "(?i)^what are your (business|opening) hours\\??$"
      response: "We are open Monday to Friday, 9:00 to 17:00 CET."
  dedup: {windowSeconds: 5}
  scope: tenant
  backend: memory
---
apiVersion: floodgate.dev/v1alpha1
kind: TierQueue
metadata: {name: tiers}
spec:
  defaultTier: free
  tiers:
  - {name: enterprise, class: priority, weight: 10, maxWaitMs: 1000}
  - {name: pro, class: priority, weight: 10, maxWaitMs: 2000}
  - {name: basic, class: standard, weight: 5, maxWaitMs: 5000}
  - {name: free, class: batch, weight: 1, maxWaitMs: 60000, batch: {size: 10, intervalSeconds: 5}}
YAML
for t in enterprise pro basic free; do
  printf -- '---\napiVersion: floodgate.dev/v1alpha1\nkind: Tenant\nmetadata: {name: seed-%s}\n' "$t"
  printf 'spec:\n  tier: %s\n  keys: [{name: seed, secretRef: {name: seed-keys, key: %s}}]\n' "$t" "$t"
done >>"$work/config/gateway.yaml"

# The capacity report needs the admin token.
admin_token=seed-admin-$$
FLOODGATE_ADMIN_TOKEN=$admin_token env -u RUST_LOG "$PROXY_BIN" --config "$work/config" \
  --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --watch-interval-ms 0 \
  --embedding-model-dir "$CACHE/models/all-MiniLM-L6-v2" >"$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
addr=$(address_from_log "$proxy_pid" "$work/proxy.log" 'listen=127\.0\.0\.1:[0-9]+')
admin=$(address_from_log "$proxy_pid" "$work/proxy.log" 'admin_listen="?127\.0\.0\.1:[0-9]+')
proxy_url=http://${addr#listen=}
admin=${admin#admin_listen=}
admin_url=http://${admin#\"}
curl -sf --max-time 2 --retry 20 --retry-connrefused --retry-delay 0 "$proxy_url/readyz" >/dev/null

# The load, in requests per second, split 10/20/30/40; each tier's share of the workload.
rate() { python3 -c "print(round($LOAD_RPM / 60 * $1, 3))"; }
count() { python3 -c "import math; print(math.ceil($LOAD_RPM / 60 * $1 * $SECONDS_OF_LOAD) + 1)"; }
python3 e2e/bench/seed_workload.py "$work/prompts.jsonl" \
  "enterprise=$(count 0.1)" "pro=$(count 0.2)" "basic=$(count 0.3)" "free=$(count 0.4)"
echo "bench-seed: raw capacity 760 RPM; load $LOAD_RPM RPM for $SECONDS_OF_LOAD s;" \
  "load average $(cut -d' ' -f1-3 /proc/loadavg) (mock $mock_url, proxy $proxy_url)"
"$BIN/tierload" --url "$proxy_url" --duration "$SECONDS_OF_LOAD" --json --timeout 120 \
  --prompts "$work/prompts.jsonl" \
  --target enterprise=1000 --target pro=2000 --target basic=5000 --target free=60000 \
  --tier "enterprise=sk-seed-enterprise:$(rate 0.1)" \
  --tier "pro=sk-seed-pro:$(rate 0.2)" \
  --tier "basic=sk-seed-basic:$(rate 0.3)" \
  --tier "free=sk-seed-free:$(rate 0.4)" 2>&1 | tee "$work/tierload.txt"

# The gateway's log, for what it said about lost or late requests (tierload names them).
cp "$work/proxy.log" "$OUT/seed-proxy.log"
curl -sf --max-time 5 "$mock_url/_mock/counts" >"$work/counts.json"
curl -sf --max-time 5 -H "authorization: Bearer $admin_token" "$admin_url/admin/capacity" \
  >"$work/capacity.json" || echo '{}' >"$work/capacity.json"
semantic=on
if grep -q 'semantic cache is OFF' "$work/proxy.log"; then semantic=off; fi
python3 - "$work/counts.json" "$work/tierload.txt" "$work/capacity.json" "$SECONDS_OF_LOAD" \
  "$(cut -d' ' -f1-3 /proc/loadavg)" "$LOAD_RPM" "$semantic" <<'PY' | tee "$OUT/seed.txt"
import json, sys
counts = json.load(open(sys.argv[1]))
keys = counts if isinstance(counts, list) else counts.get("keys", counts)
text = open(sys.argv[2]).read()
capacity = json.load(open(sys.argv[3]))
minutes = float(sys.argv[4]) / 60
print(text.split("JSON ")[0].rstrip())
run = json.loads(text.split("JSON ")[1].splitlines()[0])
RAW = 760
offered_rpm = float(sys.argv[6])
SPLIT = {"enterprise": 0.1, "pro": 0.2, "basic": 0.3, "free": 0.4}
print(f"\nseed scenario: raw provider capacity {RAW} RPM; offered {offered_rpm:.0f} RPM;"
      f" load average at the end {sys.argv[5]}")
print("tier          offered RPM  answered  within target  RPM served within target  p50 ms  p99 ms")
within_total = 0
by = {}
answered = 0
for name in ("enterprise", "pro", "basic", "free"):
    t = run["tiers"].get(name)
    if not t:
        continue
    within_total += t["within_target"]
    answered += t["answered"]
    for k, v in t["served_by"].items():
        by[k] = by.get(k, 0) + v
    print(f"{name:<12} {offered_rpm * SPLIT[name]:>12.0f} {t['answered']:>9} {t['within_target']:>14}"
          f" {t['within_target'] / minutes:>25.0f} {t['total_ms_p50'] or 0:>7} {t['total_ms_p99'] or 0:>7}")
effective = within_total / minutes
share = lambda *k: sum(by.get(x, 0) for x in k) / max(answered, 1)
print(f"answered by: cache {share('exact', 'template', 'stale', 'semantic'):.1%} "
      f"(exact {share('exact'):.1%}, template {share('template'):.1%}, "
      f"semantic {share('semantic'):.1%}, semantic layer {sys.argv[7]}), dedup {share('dedup'):.1%}, "
      f"local {share('local'):.1%}, premium {share('premium'):.1%}"
      + (f", handed to jobs {share('job'):.1%}" if by.get('job') else ""))
premium = by.get("premium", 0)
print(f"RPM served within target: {effective:.0f} of {offered_rpm:.0f} offered"
      f" = {effective / RAW:.2f}x raw capacity (the seed expects about 2.8x)")
if premium:
    print(f"answers per premium call: {answered / premium:.2f}"
          f" (the multiplier the shares imply at full premium use)")
if capacity:
    print(f"/admin/capacity: raw {capacity.get('raw_rpm', {}).get('total')} RPM, "
          f"effective {capacity.get('effective_rpm', 0):.0f} ({capacity.get('multiplier', 0):.2f}x)")
limited = sum(k.get("rate_limited", 0) for k in keys)
print(f"upstream: {sum(k.get('requests', 0) for k in keys)} requests, {limited} answered 429")
over = []
for k in keys:
    if k["limit"]:
        print(f"  key {k['key']}: busiest 60 s window {k['max_in_window']} of limit {k['limit']}")
        if k["max_in_window"] > k["limit"]:
            over.append(k["key"])
lost = sum(t["lost"] for t in run["tiers"].values())
why = {}
for t in run["tiers"].values():
    for k, v in t.get("lost_by", {}).items():
        why[k] = why.get(k, 0) + v
problems = [f"{lost} request(s) lost (by why: {why})"] if lost else []
problems += [f"{limited} upstream 429(s)"] if limited else []
problems += [f"keys over their limit: {', '.join(over)}"] if over else []
if problems:
    print("bench-seed FAILED: " + "; ".join(problems))
    sys.exit(1)
PY
echo "bench-seed: written to $OUT/seed.txt"
