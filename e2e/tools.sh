#!/usr/bin/env bash
# Builds the pinned binaries the e2e cluster harness needs into $FLOODGATE_CACHE/bin
# (default $HOME/.cache/floodgate/bin): kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, helm and kwok. Everything comes from the Go module proxy
# and is built from source (no prebuilt downloads). Idempotent: a tool whose stamp file
# ($BIN/.stamps/<tool>) already holds the pinned version is skipped, so bumping a version
# below rebuilds just that tool.
#
# Usage: e2e/tools.sh [--force]      (prints the versions and the time taken at the end)
#   FLOODGATE_CACHE   cache root (default $HOME/.cache/floodgate)
#   BUILD_NICE        nice level of the builds (default 10)
set -euo pipefail

# Pinned versions. K8S_VERSION must match the k8s-openapi feature (v1_34); ETCD_VERSION is
# the etcd that this Kubernetes release pins in its go.mod (go.etcd.io/etcd/*/v3).
K8S_VERSION=1.34.4
ETCD_VERSION=3.6.4
HELM_VERSION=3.22.0
KWOK_VERSION=0.8.0

CACHE=${FLOODGATE_CACHE:-$HOME/.cache/floodgate}
BIN=$CACHE/bin
STAMPS=$BIN/.stamps
WORK=$CACHE/k8stools
NICE=(nice -n "${BUILD_NICE:-10}")
FORCE=0
[[ ${1:-} == --force ]] && FORCE=1

command -v go >/dev/null || { echo "tools.sh: Go is needed (>= 1.26: helm $HELM_VERSION and kwok $KWOK_VERSION require it)" >&2; exit 1; }
GOV=$(go env GOVERSION); GOV=${GOV#go}; GOMINOR=${GOV#1.}; GOMINOR=${GOMINOR%%.*}
if [[ ${GOV%%.*} != 1 || ${GOMINOR//[^0-9]/} -lt 26 ]] && [[ $(go env GOTOOLCHAIN) == local ]]; then
	echo "tools.sh: Go $GOV is too old (need >= 1.26, or GOTOOLCHAIN=auto)" >&2; exit 1
fi

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -buildvcs=false -trimpath"
mkdir -p "$BIN" "$STAMPS" "$WORK"

log() { printf '[tools] %s\n' "$*" >&2; }
ts() { date +%s; }
fresh() { # fresh TOOL VERSION BINARY...: true when the stamp matches and every binary exists
	local tool=$1 version=$2; shift 2
	((FORCE)) && return 1
	[[ -f $STAMPS/$tool && $(<"$STAMPS/$tool") == "$version" ]] || return 1
	local b; for b in "$@"; do [[ -x $BIN/$b ]] || return 1; done
}
stamp() { printf '%s\n' "$2" >"$STAMPS/$1"; }

T0=$(ts)
declare -A TOOK=()

# --- Kubernetes: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl ---------
# `go install k8s.io/kubernetes/cmd/...@v1.34.x` fails: the release requires its staging
# modules (k8s.io/api, client-go, ...) at v0.0.0 with `=> ./staging/...` replaces, which
# only apply in the main module. So build from a generated wrapper module that requires
# k8s.io/kubernetes and replaces each staging module with its published v0.34.x.
build_kubernetes() {
	local tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
	if fresh kubernetes "v$K8S_VERSION" "${tools[@]}"; then log "kubernetes v$K8S_VERSION up to date"; return; fi
	local t dir=$WORK/kubernetes minor=${K8S_VERSION#*.}; minor=${minor%%.*}
	t=$(ts)
	local staging_version=v0.${K8S_VERSION#*.}
	log "building kubernetes v$K8S_VERSION (${tools[*]})"
	rm -rf "$dir" && mkdir -p "$dir"
	local gomod
	gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
	[[ -f $gomod ]] || { log "no go.mod for k8s.io/kubernetes@v$K8S_VERSION"; exit 1; }
	local staging
	staging=$(awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// { print $1 }' "$gomod" | sort -u)
	[[ -n $staging ]] || { log "no staging replaces found in $gomod"; exit 1; }
	{
		echo "module local/floodgate-k8stools"
		echo
		# Same go/godebug lines as the release, so the binaries get upstream's GODEBUG defaults.
		grep -E '^(go|godebug) ' "$gomod"
		echo
		echo "require k8s.io/kubernetes v$K8S_VERSION"
		echo
		echo "tool ("
		local t2; for t2 in "${tools[@]}"; do echo "	k8s.io/kubernetes/cmd/$t2"; done
		echo ")"
		echo
		echo "replace ("
		local m; for m in $staging; do echo "	$m => $m $staging_version"; done
		echo ")"
	} >"$dir/go.mod"
	(cd "$dir" && "${NICE[@]}" go mod tidy)
	local date v=v$K8S_VERSION ld=(-s -w) p k
	date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		for k in "gitVersion=$v" gitMajor=1 "gitMinor=$minor" gitTreeState=clean "buildDate=$date"; do
			ld+=("-X" "$p.$k")
		done
	done
	local pkgs=(); for t2 in "${tools[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$t2"); done
	(cd "$dir" && "${NICE[@]}" go build -ldflags "${ld[*]}" -o "$BIN/" "${pkgs[@]}")
	stamp kubernetes "v$K8S_VERSION"
	TOOK[kubernetes]=$(($(ts) - t))
}

# --- etcd -------------------------------------------------------------------------------
# server/go.mod has relative replaces (../api, ...), so `go install` is refused; build the
# server module's main package from a wrapper module instead.
build_etcd() {
	if fresh etcd "v$ETCD_VERSION" etcd; then log "etcd v$ETCD_VERSION up to date"; return; fi
	local t dir=$WORK/etcd
	t=$(ts)
	log "building etcd v$ETCD_VERSION"
	rm -rf "$dir" && mkdir -p "$dir"
	cat >"$dir/go.mod" <<-EOF
		module local/floodgate-etcd

		go 1.23.0

		require (
			go.etcd.io/etcd/server/v3 v$ETCD_VERSION
			go.etcd.io/etcd/api/v3 v$ETCD_VERSION
			go.etcd.io/etcd/client/pkg/v3 v$ETCD_VERSION
			go.etcd.io/etcd/client/v3 v$ETCD_VERSION
			go.etcd.io/etcd/pkg/v3 v$ETCD_VERSION
		)

		tool go.etcd.io/etcd/server/v3
	EOF
	(cd "$dir" && "${NICE[@]}" go mod tidy)
	(cd "$dir" && "${NICE[@]}" go build -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3)
	stamp etcd "v$ETCD_VERSION"
	TOOK[etcd]=$(($(ts) - t))
}

# --- helm (v3; no replace directives, so go install works) --------------------------------
build_helm() {
	if fresh helm "v$HELM_VERSION" helm; then log "helm v$HELM_VERSION up to date"; return; fi
	local t
	t=$(ts)
	log "building helm v$HELM_VERSION"
	# Like helm's Makefile, but the offline default capabilities (helm template/lint without a
	# cluster) are our Kubernetes minor instead of helm's client-go minor.
	local minor=${K8S_VERSION#*.} h=helm.sh/helm/v3 ld=(-s -w); minor=${minor%%.*}
	ld+=(-X "$h/internal/version.version=v$HELM_VERSION" -X "$h/internal/version.gitTreeState=clean")
	ld+=(-X "$h/pkg/chartutil.k8sVersionMajor=1" -X "$h/pkg/chartutil.k8sVersionMinor=$minor")
	ld+=(-X "$h/pkg/lint/rules.k8sVersionMajor=1" -X "$h/pkg/lint/rules.k8sVersionMinor=$minor")
	GOBIN=$BIN "${NICE[@]}" go install -ldflags "${ld[*]}" "$h/cmd/helm@v$HELM_VERSION"
	stamp helm "v$HELM_VERSION"
	TOOK[helm]=$(($(ts) - t))
}

# --- kwok (fakes nodes and pod lifecycle; v0.8.0 is the newest whose go.mod accepts Go 1.26) --
# The kwok binary has no built-in stages (it exits with "no stages found"); kwokctl feeds it
# the node-initialize, node-heartbeat-with-lease and pod-{ready,complete,delete} Stages from
# the module's kustomize/stage dirs. Copy those into $CACHE/share/kwok/stages.yaml for
# cluster.sh (--config).
KWOK_STAGES=$CACHE/share/kwok/stages.yaml
build_kwok() {
	if fresh kwok "v$KWOK_VERSION" kwok && [[ -s $KWOK_STAGES ]]; then log "kwok v$KWOK_VERSION up to date"; return; fi
	local t
	t=$(ts)
	log "building kwok v$KWOK_VERSION"
	GOBIN=$BIN "${NICE[@]}" go install \
		-ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
		"sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"
	local src f
	src=$(go mod download -json "sigs.k8s.io/kwok@v$KWOK_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')/kustomize/stage
	mkdir -p "${KWOK_STAGES%/*}"
	for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
		pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
		[[ -f $src/$f ]] || { log "kwok stage $src/$f missing"; exit 1; }
		echo "---"; cat "$src/$f"
	done >"$KWOK_STAGES.tmp"
	mv "$KWOK_STAGES.tmp" "$KWOK_STAGES"
	stamp kwok "v$KWOK_VERSION"
	TOOK[kwok]=$(($(ts) - t))
}

build_kubernetes
build_etcd
build_helm
build_kwok

echo "--- tools in $BIN"
first_line() { local out; out=$("$@" 2>&1) || true; printf '%-24s %s\n' "${1##*/}" "${out%%$'\n'*}"; }
first_line "$BIN/kube-apiserver" --version
first_line "$BIN/kube-controller-manager" --version
first_line "$BIN/kube-scheduler" --version
first_line "$BIN/kubectl" version --client
first_line "$BIN/etcd" --version
first_line "$BIN/helm" version --short
first_line "$BIN/kwok" --version
for k in "${!TOOK[@]}"; do echo "built $k in ${TOOK[$k]}s"; done
echo "total $(($(ts) - T0))s"
