#!/usr/bin/env bash
# A throwaway Kubernetes control plane on loopback, without Docker or a container runtime:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (which fakes the
# nodes and turns scheduled pods Running/Ready). Binaries come from e2e/tools.sh.
#
# Usage: e2e/cluster.sh up|down|status|env
#   up      start everything on free 127.0.0.1 ports, create 4 fake nodes (two plain, and
#           a GPU pool of two nodes with nvidia.com/gpu: 8 each, labelled
#           nvidia.com/gpu.present=true and tainted nvidia.com/gpu=present:NoSchedule as GPU
#           nodes usually are) and a default StorageClass `standard` whose claims the
#           controller manager's hostPath provisioner binds (volumes under
#           /tmp/hostpath_pv/, deleted with their claims), wait until the cluster is usable;
#           no-op if already up
#   down    stop every process of the cluster and remove its state (safe to repeat)
#   status  show the processes and the cluster health; exit 1 when not healthy
#   env     print `export KUBECONFIG=...; export PATH=...` for eval
# Environment:
#   FLOODGATE_CLUSTER_DIR  state dir (default $HOME/.cache/floodgate/cluster): kubeconfig,
#                          pids, logs/*.log, certs/, etcd/
#   FLOODGATE_CACHE        tools cache root (default $HOME/.cache/floodgate)
#   FLOODGATE_BIN          binaries (default $FLOODGATE_CACHE/bin)
#   FLOODGATE_UP_TIMEOUT   seconds each wait of `up` may take (default 120)
set -euo pipefail

CACHE=${FLOODGATE_CACHE:-$HOME/.cache/floodgate}
BIN=${FLOODGATE_BIN:-$CACHE/bin}
DIR=${FLOODGATE_CLUSTER_DIR:-$CACHE/cluster}
STAGES=${FLOODGATE_KWOK_STAGES:-$CACHE/share/kwok/stages.yaml}
TIMEOUT=${FLOODGATE_UP_TIMEOUT:-120}
MARKER=.floodgate-cluster
SERVICE_CIDR=10.96.0.0/16
POD_CIDR=10.244.0.0/16
# Stop order: clients first, etcd last.
COMPONENTS=(kwok kube-scheduler kube-controller-manager kube-apiserver etcd)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now_ms() { date +%s%3N; }
T0=$(now_ms)

alive() { # alive PID: running and not a zombie
	local st
	[[ -r /proc/$1/stat ]] || return 1
	st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
	[[ -n $st && $st != Z ]]
}
ours() { # ours PID: the process was started by this harness for $DIR (guards against pid reuse)
	local cmdline
	alive "$1" && cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) && [[ $cmdline == *"$DIR/"* ]]
}

pid_of() { [[ -f $DIR/pids ]] && awk -v n="$1" '$1 == n { print $2 }' "$DIR/pids" | tail -1; }

dump_logs() {
	local f
	for f in "$DIR"/logs/*.log; do
		[[ -f $f ]] || continue
		log "--- last lines of $f"
		tail -n 15 "$f" >&2 || true
	done
}

# wait_for DESCRIPTION COMMAND...: poll until COMMAND succeeds; fail fast if a component died.
wait_for() {
	local what=$1; shift
	local deadline=$(($(date +%s) + TIMEOUT)) c p
	until "$@" >/dev/null 2>&1; do
		for c in "${COMPONENTS[@]}"; do
			p=$(pid_of "$c")
			if [[ -n $p ]] && ! alive "$p"; then
				dump_logs
				die "$c (pid $p) exited while waiting for $what; see $DIR/logs/$c.log"
			fi
		done
		if (($(date +%s) > deadline)); then
			dump_logs
			die "timed out after ${TIMEOUT}s waiting for $what"
		fi
		sleep 0.2
	done
	log "$what: ok (+$(($(now_ms) - T0))ms)"
}

free_ports() { # free_ports N: N distinct free loopback ports (all held open while picking)
	python3 - "$1" <<-'EOF'
		import socket, sys
		socks = []
		for _ in range(int(sys.argv[1])):
		    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
		    s.bind(("127.0.0.1", 0))
		    socks.append(s)
		print(" ".join(str(s.getsockname()[1]) for s in socks))
	EOF
}

start() { # start NAME COMMAND...: run detached in its own session, record the pid
	local name=$1; shift
	setsid "$@" </dev/null >"$DIR/logs/$name.log" 2>&1 &
	echo "$name $!" >>"$DIR/pids"
}

write_kubeconfig() { # write_kubeconfig FILE USER TOKEN
	local ca
	ca=$(base64 -w0 <"$DIR/certs/ca.crt")
	cat >"$1" <<-EOF
		apiVersion: v1
		kind: Config
		clusters:
		- name: floodgate-e2e
		  cluster:
		    server: https://127.0.0.1:$API_PORT
		    certificate-authority-data: $ca
		users:
		- name: $2
		  user:
		    token: $3
		contexts:
		- name: floodgate-e2e
		  context:
		    cluster: floodgate-e2e
		    user: $2
		    namespace: default
		current-context: floodgate-e2e
	EOF
	chmod 600 "$1"
}

gen_certs() {
	local c=$DIR/certs
	mkdir -p "$c"
	(
		cd "$c"
		openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
			-subj "/CN=floodgate-e2e-ca" 2>/dev/null
		openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
			-subj "/CN=kube-apiserver" 2>/dev/null
		cat >apiserver.ext <<-EOF
			basicConstraints=CA:FALSE
			keyUsage=critical,digitalSignature,keyEncipherment
			extendedKeyUsage=serverAuth
			subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
		EOF
		openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
			-out apiserver.crt -days 3650 -extfile apiserver.ext 2>/dev/null
		openssl genrsa -out sa.key 2048 2>/dev/null
		openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
		chmod 600 ./*.key
	)
}

readyz() {
	local out
	out=$(curl -fsS --max-time 2 --cacert "$DIR/certs/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
		"https://127.0.0.1:$API_PORT/readyz") && [[ $out == ok ]]
}
kc() { "$BIN/kubectl" --kubeconfig="$DIR/kubeconfig" "$@"; }

load_state() {
	# shellcheck disable=SC1091
	[[ -f $DIR/state ]] && source "$DIR/state"
}

healthy() {
	load_state || return 1
	local c p
	for c in "${COMPONENTS[@]}"; do
		p=$(pid_of "$c"); [[ -n $p ]] && alive "$p" || return 1
	done
	readyz
}

fake_node() { # fake_node NAME [GPUS]: a GPU node is labelled and tainted as GPU pools are
	local gpu_label="" gpu_res="" spec="{}"
	if [[ -n ${2:-} ]]; then
		gpu_label=$'\n'"    nvidia.com/gpu.present: \"true\""
		gpu_res=$'\n'"    nvidia.com/gpu: \"$2\""
		spec="{taints: [{key: nvidia.com/gpu, value: present, effect: NoSchedule}]}"
	fi
	cat <<-EOF
		---
		apiVersion: v1
		kind: Node
		metadata:
		  name: $1
		  annotations:
		    kwok.x-k8s.io/node: fake
		    node.alpha.kubernetes.io/ttl: "0"
		  labels:
		    type: kwok
		    kubernetes.io/arch: amd64
		    kubernetes.io/os: linux
		    kubernetes.io/hostname: $1
		    node-role.kubernetes.io/agent: ""$gpu_label
		spec: $spec
		status:
		  capacity:
		    cpu: "32"
		    memory: 256Gi
		    pods: "110"$gpu_res
		  allocatable:
		    cpu: "32"
		    memory: 256Gi
		    pods: "110"$gpu_res
		  nodeInfo:
		    architecture: amd64
		    operatingSystem: linux
	EOF
}

# The default StorageClass: kube-controller-manager's hostPath provisioner
# (--enable-hostpath-provisioner) makes a volume for each claim at once and deletes it with
# the claim, so claims bind without a CSI driver (kwok mounts nothing anyway).
storage_class() {
	cat <<-EOF
		---
		apiVersion: storage.k8s.io/v1
		kind: StorageClass
		metadata:
		  name: standard
		  annotations:
		    storageclass.kubernetes.io/is-default-class: "true"
		provisioner: kubernetes.io/host-path
		reclaimPolicy: Delete
		volumeBindingMode: Immediate
	EOF
}

nodes_ready() {
	local n
	n=$(kc get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c '^True$')
	((n >= 4))
}

cmd_up() {
	local b
	T0=$(now_ms)
	for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
		[[ -x $BIN/$b ]] || die "$BIN/$b missing: run e2e/tools.sh first"
	done
	[[ -f $STAGES ]] || die "$STAGES missing: run e2e/tools.sh first"
	command -v openssl >/dev/null || die "openssl is needed"
	command -v python3 >/dev/null || die "python3 is needed"

	if [[ -f $DIR/pids ]]; then
		if healthy; then
			log "already up: export KUBECONFIG=$DIR/kubeconfig"
			return 0
		fi
		log "stale cluster state in $DIR: cleaning it up"
		cmd_down
	fi
	if [[ -e $DIR && ! -f $DIR/$MARKER ]] && [[ -n $(ls -A "$DIR" 2>/dev/null) ]]; then
		die "$DIR exists, is not empty and is not a floodgate cluster dir"
	fi
	mkdir -p "$DIR/logs" "$DIR/etcd"
	chmod 700 "$DIR" "$DIR/etcd"
	touch "$DIR/$MARKER"
	: >"$DIR/pids"

	local ports
	read -r -a ports <<<"$(free_ports 5)"
	ETCD_PORT=${ports[0]} ETCD_PEER_PORT=${ports[1]} API_PORT=${ports[2]}
	KCM_PORT=${ports[3]} SCHED_PORT=${ports[4]}
	ADMIN_TOKEN=$(openssl rand -hex 24)
	local kcm_token sched_token
	kcm_token=$(openssl rand -hex 24)
	sched_token=$(openssl rand -hex 24)
	cat >"$DIR/state" <<-EOF
		ETCD_PORT=$ETCD_PORT
		ETCD_PEER_PORT=$ETCD_PEER_PORT
		API_PORT=$API_PORT
		KCM_PORT=$KCM_PORT
		SCHED_PORT=$SCHED_PORT
		ADMIN_TOKEN=$ADMIN_TOKEN
	EOF

	gen_certs
	cat >"$DIR/tokens.csv" <<-EOF
		$ADMIN_TOKEN,floodgate-admin,floodgate-admin,"system:masters"
		$kcm_token,system:kube-controller-manager,system:kube-controller-manager
		$sched_token,system:kube-scheduler,system:kube-scheduler
	EOF
	chmod 600 "$DIR/tokens.csv"
	write_kubeconfig "$DIR/kubeconfig" floodgate-admin "$ADMIN_TOKEN"
	write_kubeconfig "$DIR/kube-controller-manager.kubeconfig" system:kube-controller-manager "$kcm_token"
	write_kubeconfig "$DIR/kube-scheduler.kubeconfig" system:kube-scheduler "$sched_token"

	local e=http://127.0.0.1:$ETCD_PORT p=http://127.0.0.1:$ETCD_PEER_PORT
	start etcd "$BIN/etcd" --name=floodgate --data-dir="$DIR/etcd" \
		--listen-client-urls="$e" --advertise-client-urls="$e" \
		--listen-peer-urls="$p" --initial-advertise-peer-urls="$p" \
		--initial-cluster="floodgate=$p" --initial-cluster-state=new \
		--unsafe-no-fsync --log-level=warn
	wait_for "etcd" curl -fsS --max-time 2 "$e/health"

	local c=$DIR/certs
	start kube-apiserver "$BIN/kube-apiserver" \
		--etcd-servers="$e" \
		--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
		--cert-dir="$c" --tls-cert-file="$c/apiserver.crt" --tls-private-key-file="$c/apiserver.key" \
		--client-ca-file="$c/ca.crt" --token-auth-file="$DIR/tokens.csv" \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-account-key-file="$c/sa.pub" --service-account-signing-key-file="$c/sa.key" \
		--service-cluster-ip-range="$SERVICE_CIDR" \
		--authorization-mode=Node,RBAC --allow-privileged=true --profiling=false \
		--endpoint-reconciler-type=none
	wait_for "kube-apiserver /readyz" readyz

	local k=$DIR/kube-controller-manager.kubeconfig
	start kube-controller-manager "$BIN/kube-controller-manager" \
		--kubeconfig="$k" --authentication-kubeconfig="$k" --authorization-kubeconfig="$k" \
		--authentication-skip-lookup=true \
		--bind-address=127.0.0.1 --secure-port="$KCM_PORT" --leader-elect=false \
		--use-service-account-credentials=true \
		--service-account-private-key-file="$c/sa.key" --root-ca-file="$c/ca.crt" \
		--cluster-signing-cert-file="$c/ca.crt" --cluster-signing-key-file="$c/ca.key" \
		--service-cluster-ip-range="$SERVICE_CIDR" --profiling=false \
		--enable-hostpath-provisioner
	k=$DIR/kube-scheduler.kubeconfig
	start kube-scheduler "$BIN/kube-scheduler" \
		--kubeconfig="$k" --authentication-kubeconfig="$k" --authorization-kubeconfig="$k" \
		--authentication-skip-lookup=true \
		--bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --leader-elect=false --profiling=false
	# kwok: no --node-port/--server-address, so it opens no port of its own.
	start kwok "$BIN/kwok" --kubeconfig="$DIR/kubeconfig" --config="$STAGES" \
		--manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
		--cidr="$POD_CIDR" --node-ip=127.0.0.1 --node-lease-duration-seconds=40

	# GPUs for the 500 RPM example (3 models x 2 replicas x 1 GPU) beside the other tests'.
	{
		fake_node kwok-node-0
		fake_node kwok-node-1
		fake_node kwok-gpu-node-0 8
		fake_node kwok-gpu-node-1 8
		storage_class
	} >"$DIR/nodes.yaml"
	kc apply -f "$DIR/nodes.yaml" >/dev/null
	wait_for "namespace default" kc get namespace default
	wait_for "serviceaccount default/default" kc get serviceaccount default -n default
	wait_for "4 Ready fake nodes" nodes_ready

	log "up in $(($(now_ms) - T0))ms: export KUBECONFIG=$DIR/kubeconfig (apiserver https://127.0.0.1:$API_PORT)"
}

cmd_down() {
	if [[ ! -d $DIR ]]; then
		log "not running ($DIR does not exist)"
		return 0
	fi
	[[ -f $DIR/$MARKER ]] || die "$DIR is not a floodgate cluster dir; not touching it"
	local c p pids=() deadline
	for c in "${COMPONENTS[@]}"; do
		while read -r p; do
			[[ -n $p ]] || continue
			if ours "$p"; then
				# Each component leads its own process group (setsid): signal the group.
				kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
				pids+=("$p")
			fi
		done < <([[ -f $DIR/pids ]] && awk -v n="$c" '$1 == n { print $2 }' "$DIR/pids")
	done
	deadline=$(($(date +%s) + 15))
	for p in "${pids[@]}"; do
		while alive "$p"; do
			if (($(date +%s) > deadline)); then
				log "pid $p did not stop on SIGTERM: killing it"
				kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true
				sleep 0.2
				break
			fi
			sleep 0.1
		done
	done
	rm -rf -- "$DIR"
	log "down"
}

cmd_status() {
	if [[ ! -f $DIR/pids ]]; then
		echo "down ($DIR has no cluster)"
		return 1
	fi
	load_state || true
	local c p ok=0
	for c in "${COMPONENTS[@]}"; do
		p=$(pid_of "$c")
		if [[ -n $p ]] && alive "$p"; then echo "$c: running (pid $p)"; else echo "$c: NOT running"; ok=1; fi
	done
	if readyz 2>/dev/null; then echo "kube-apiserver: https://127.0.0.1:$API_PORT ready"; else echo "kube-apiserver: not ready"; ok=1; fi
	echo "kubeconfig: $DIR/kubeconfig"
	if ((ok == 0)); then kc get nodes -o wide 2>/dev/null || true; fi
	return $ok
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
env) echo "export KUBECONFIG=$DIR/kubeconfig; export PATH=$BIN:\$PATH" ;;
*) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
