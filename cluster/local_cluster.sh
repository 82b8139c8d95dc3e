#!/usr/bin/env bash
# Start / stop a LOCAL multi-node Ray cluster on this machine (loopback), for development and tests.
#
#   cluster/local_cluster.sh start [--workers N] [--cpus-per-node C] [--state-dir DIR]
#   cluster/local_cluster.sh status [--state-dir DIR]
#   cluster/local_cluster.sh stop  [--state-dir DIR]
#   cluster/local_cluster.sh env   [--state-dir DIR]     # print the env file to source
#   cluster/local_cluster.sh add-node [--ip 127.0.0.3] [--cpus-per-node C] [--state-dir DIR]
#   cluster/local_cluster.sh kill-node N|NODE_ID [--state-dir DIR]  # SIGKILL a worker node
#
# One head node (GCS, dashboard, Ray Jobs) plus N worker nodes, each a separate `ray start`
# (separate raylet, object store and node id) on the same host, with Ray token authentication on.
# `start` waits until every node is ALIVE in the GCS and writes "$STATE_DIR/cluster.env":
#
#   RAY_AUTH_MODE=token                 RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token
#   RAY_ADDRESS=<ip>:<gcs port>         LOCAL_RAY_GCS_ADDRESS=<ip>:<gcs port>
#   LOCAL_RAY_DASHBOARD_URL=http://127.0.0.1:<dashboard port>
#   LOCAL_RAY_NUM_NODES, LOCAL_RAY_NODE_IP, LOCAL_RAY_STATE_DIR, LOCAL_RAY_TEMP_DIR
#
# `source "$STATE_DIR/cluster.env"` and then `ray.init()` / `ray.init(address=$RAY_ADDRESS)` or a
# JobSubmissionClient($LOCAL_RAY_DASHBOARD_URL) reach the cluster with the token.
#
# `stop` never calls `ray stop`: that command kills EVERY Ray process of the machine (other
# people's clusters and `ray.init()` sessions included). Each node is started in its own
# session (setsid); `stop` terminates exactly the processes of the sessions recorded in the
# state folder, any process whose command line names this cluster's private temp dir, and their
# descendants (Ray starts each job's driver in a session of its own), SIGTERM first, SIGKILL
# after a grace period. It is idempotent.
#
# `add-node` joins one more worker node (its own free ports and temp dir); with --ip 127.0.0.3
# (any other loopback address) Ray sees it as a second host, as on a multi-machine cluster,
# while it still shares this disk. `kill-node` SIGKILLs every process of one worker node at
# once, as when a machine is lost; export RAY_health_check_period_ms=1000 and
# RAY_health_check_failure_threshold=3 before `start` to have the GCS notice within seconds.
#
# Environment (all optional):
#   LOCAL_RAY_STATE_DIR        state folder (default /tmp/simpo-sweep-local-ray-$UID)
#   LOCAL_RAY_WORKERS          worker nodes (default 1)           [--workers]
#   LOCAL_RAY_CPUS_PER_NODE    CPUs per node, head included (default 1)  [--cpus-per-node]
#   LOCAL_RAY_HEAD_CPUS        CPUs of the head node (default: LOCAL_RAY_CPUS_PER_NODE)
#   LOCAL_RAY_NODE_IP          node address (default 127.0.0.2, see below)
#   LOCAL_RAY_PORT_BASE        first port of the block this cluster uses (default: a free block
#                              in 20000-32000 is picked); layout below
#   LOCAL_RAY_GCS_PORT / LOCAL_RAY_DASHBOARD_PORT / LOCAL_RAY_CLIENT_PORT   override single ports
#   LOCAL_RAY_WORKER_PORTS     worker-process ports per node (default 100)
#   LOCAL_RAY_OBJECT_STORE_MB  object store per node in MiB (default 512)
#   LOCAL_RAY_TEMP_DIR         Ray temp dir of the head; worker node i uses its w<i>/ (default:
#                              mktemp -d /tmp/rlc.XXXXXX; keep it short, Unix socket paths under
#                              it are limited to 107 bytes)
#   LOCAL_RAY_START_TIMEOUT    seconds to wait for all nodes (default 180)
#   LOCAL_RAY_STOP_GRACE       seconds between SIGTERM and SIGKILL on stop (default 3)
#   LOCAL_RAY_KEEP_LOGS=1      keep the Ray temp dir (logs) after stop
#   RAY_BIN                    the `ray` executable (default: .venv/bin/ray of this repo, else PATH)
#
# Port layout from BASE: BASE+0 GCS, BASE+1 dashboard, BASE+2 Ray Client server; node i (0 = head)
# uses BASE+10+10*i .. +5 (node manager, object manager, dashboard agent http, dashboard agent
# grpc, runtime env agent, metrics export); worker processes of node i use
# [W0 + i*LOCAL_RAY_WORKER_PORTS, W0 + (i+1)*LOCAL_RAY_WORKER_PORTS - 1], W0 = BASE+10+10*(N+1).
#
# Why 127.0.0.2 and not 127.0.0.1: Ray 2.60's `ray start` (and ray.init(address=...)) rewrite the
# literal loopback names "127.0.0.1"/"localhost"/"::1" into the host's primary interface address
# (ray._private.services.resolve_ip_for_localhost). Any other 127.x.y.z address is kept as is and
# is still the loopback interface on Linux, so the whole cluster talks over loopback.
# Ray binds its GCS / raylet gRPC servers to all interfaces regardless; the token protects them.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

die() { echo "local_cluster: error: $*" >&2; exit 1; }
log() { echo "local_cluster: $*" >&2; }

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- arguments
CMD="${1:-}"
[ -n "$CMD" ] || { usage; exit 2; }
shift || true

NODE_ARG=""
ADD_IP=""
WORKERS="${LOCAL_RAY_WORKERS:-1}"
CPUS="${LOCAL_RAY_CPUS_PER_NODE:-1}"
STATE_DIR="${LOCAL_RAY_STATE_DIR:-/tmp/simpo-sweep-local-ray-$(id -u)}"

while [ $# -gt 0 ]; do
    case "$1" in
        --workers) WORKERS="${2:?--workers needs a value}"; shift 2 ;;
        --workers=*) WORKERS="${1#*=}"; shift ;;
        --cpus-per-node) CPUS="${2:?--cpus-per-node needs a value}"; shift 2 ;;
        --cpus-per-node=*) CPUS="${1#*=}"; shift ;;
        --state-dir) STATE_DIR="${2:?--state-dir needs a value}"; shift 2 ;;
        --state-dir=*) STATE_DIR="${1#*=}"; shift ;;
        --ip) ADD_IP="${2:?--ip needs a value}"; shift 2 ;;
        --ip=*) ADD_IP="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        [0-9a-f]*) NODE_ARG="$1"; shift ;;
        *) die "unknown argument: $1" ;;
    esac
done

[[ "$WORKERS" =~ ^[0-9]+$ ]] || die "--workers must be a non-negative integer, got '$WORKERS'"
[[ "$CPUS" =~ ^[0-9]+$ ]] || die "--cpus-per-node must be a non-negative integer, got '$CPUS'"
HEAD_CPUS="${LOCAL_RAY_HEAD_CPUS:-$CPUS}"
[[ "$HEAD_CPUS" =~ ^[0-9]+$ ]] || die "LOCAL_RAY_HEAD_CPUS must be a non-negative integer"

mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
ENV_FILE="$STATE_DIR/cluster.env"
SIDS_FILE="$STATE_DIR/sessions"        # one session id per line (one per node)
META_FILE="$STATE_DIR/meta"            # TEMP_DIR=..., written at start
TOKEN_FILE="$STATE_DIR/auth_token"
LOG_DIR="$STATE_DIR/logs"

if [ -n "${RAY_BIN:-}" ]; then
    RAY="$RAY_BIN"
elif [ -x "$REPO_ROOT/.venv/bin/ray" ]; then
    RAY="$REPO_ROOT/.venv/bin/ray"
else
    RAY="$(command -v ray || true)"
fi
[ -n "$RAY" ] && [ -x "$RAY" ] || die "cannot find the 'ray' executable (set RAY_BIN)"
PY="$(dirname "$RAY")/python"
[ -x "$PY" ] || PY="$(command -v python3)"

# ---------------------------------------------------------------- process helpers
# PIDs (one per line) of live, non-zombie processes that belong to this cluster: those whose
# session id is one of ours (argument 1; default: every recorded session), those whose command
# line names our private Ray temp dir, and every descendant of those. Descendants matter: Ray
# starts each job's driver (the entrypoint) in a session of its own. Reads /proc only.
cluster_pids() {
    local sids="${1:-}" tmp=""
    if [ -z "$sids" ]; then
        [ -f "$SIDS_FILE" ] && sids="$(tr '\n' ' ' < "$SIDS_FILE")"
        [ -f "$META_FILE" ] && tmp="$(sed -n 's/^TEMP_DIR=//p' "$META_FILE")"
    fi
    [ -n "$sids$tmp" ] || return 0
    "$PY" - "$sids" "$tmp" <<'EOF'
import os, sys
sids = {int(s) for s in sys.argv[1].split()}
tmp = sys.argv[2].encode()
me = os.getpid()
parents, hits = {}, set()
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == me:
        continue
    pid = int(name)
    try:
        with open(f"/proc/{name}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        # fields after the ")" closing the command name: state ppid pgrp session ...
        rest = stat[stat.rindex(")") + 2 :].split()
        state, ppid, sid = rest[0], int(rest[1]), int(rest[3])
        if state == "Z":
            continue
        parents[pid] = ppid
        hit = sid in sids
        if not hit and tmp:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                hit = tmp in f.read()
        if hit:
            hits.add(pid)
    except (OSError, ValueError, IndexError):
        continue
grown = True
while grown:
    grown = False
    for pid, ppid in parents.items():
        if pid not in hits and ppid in hits:
            hits.add(pid)
            grown = True
for pid in sorted(hits):
    print(pid)
EOF
}

is_running() {
    [ -f "$SIDS_FILE" ] || return 1
    [ -n "$(cluster_pids)" ]
}

# ---------------------------------------------------------------- stop
do_stop() {
    local grace="${LOCAL_RAY_STOP_GRACE:-3}" pids t0
    t0=$(date +%s.%N)
    if [ ! -f "$SIDS_FILE" ] && [ ! -f "$META_FILE" ]; then
        log "no local cluster recorded in $STATE_DIR (nothing to stop)"
        rm -f "$ENV_FILE"
        return 0
    fi
    pids="$(cluster_pids)"
    if [ -n "$pids" ]; then
        log "stopping $(echo "$pids" | wc -l) processes (SIGTERM)"
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        local deadline=$(( $(date +%s) + grace ))
        while [ "$(date +%s)" -lt "$deadline" ]; do
            pids="$(cluster_pids)"
            [ -z "$pids" ] && break
            sleep 0.5
        done
        pids="$(cluster_pids)"
        if [ -n "$pids" ]; then
            log "killing $(echo "$pids" | wc -l) remaining processes (SIGKILL)"
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do
                [ -z "$(cluster_pids)" ] && break
                sleep 0.3
            done
        fi
    fi
    pids="$(cluster_pids)"
    [ -z "$pids" ] || die "processes still alive after SIGKILL: $(echo $pids)"
    local tmp=""
    [ -f "$META_FILE" ] && tmp="$(sed -n 's/^TEMP_DIR=//p' "$META_FILE")"
    if [ -n "$tmp" ] && [ -d "$tmp" ] && [ "${LOCAL_RAY_KEEP_LOGS:-0}" != "1" ]; then
        rm -rf "$tmp"
    fi
    rm -f "$ENV_FILE" "$SIDS_FILE" "$META_FILE" "$TOKEN_FILE"
    log "stopped in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
}

# ---------------------------------------------------------------- ports
# First port of a block of $1 consecutive ports free on loopback and on all interfaces.
free_block() {
    "$PY" - "$1" <<'EOF'
import random, socket, sys
size = int(sys.argv[1])
def free(port):
    for host in ("0.0.0.0", "127.0.0.1"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((host, port))
        except OSError:
            return False
        finally:
            s.close()
    return True
# below the Linux ephemeral range (32768+) so random client ports do not land in the block
lo, hi = 20000, 32000 - size
for _ in range(200):
    base = random.randrange(lo, hi)
    if all(free(p) for p in range(base, base + size)):
        print(base)
        break
else:
    sys.exit("no free block of %d ports found in %d-32000" % (size, lo))
EOF
}

pick_ports() {
    local n_nodes=$1 per=$2
    local size=$(( 10 + 10 * n_nodes + per * n_nodes ))
    if [ -n "${LOCAL_RAY_PORT_BASE:-}" ]; then
        BASE="$LOCAL_RAY_PORT_BASE"
    else
        BASE="$(free_block "$size")" || die "could not find free ports"
    fi
    GCS_PORT="${LOCAL_RAY_GCS_PORT:-$BASE}"
    DASH_PORT="${LOCAL_RAY_DASHBOARD_PORT:-$((BASE + 1))}"
    CLIENT_PORT="${LOCAL_RAY_CLIENT_PORT:-$((BASE + 2))}"
    WORKER_PORT0=$(( BASE + 10 + 10 * n_nodes ))
}

node_port_args() {  # node index -> ray start port flags
    local i=$1 p=$(( BASE + 10 + 10 * $1 ))
    local wmin=$(( WORKER_PORT0 + i * WORKER_PORTS ))
    local wmax=$(( wmin + WORKER_PORTS - 1 ))
    echo "--node-manager-port $p --object-manager-port $((p + 1))" \
        "--dashboard-agent-listen-port $((p + 2)) --dashboard-agent-grpc-port $((p + 3))" \
        "--runtime-env-agent-port $((p + 4)) --metrics-export-port $((p + 5))" \
        "--min-worker-port $wmin --max-worker-port $wmax"
}

# Launch one `ray start` in a new session; records the session id; waits for it to return.
launch_node() {
    local name=$1; shift
    local logf="$LOG_DIR/$name.log"
    setsid "$RAY" start "$@" >"$logf" 2>&1 </dev/null &
    local pid=$!
    # setsid execs in place (the background child is not a group leader): pid == session id
    echo "$pid" >> "$SIDS_FILE"
    if ! wait "$pid"; then
        log "'ray start' for $name failed; last lines of $logf:"
        tail -n 30 "$logf" >&2 || true
        return 1
    fi
}

# wait_alive GCS_ADDRESS DASHBOARD_URL NODES TIMEOUT: until the GCS lists NODES nodes as ALIVE
# and the dashboard answers with the token.
wait_alive() {
    "$PY" - "$@" <<'EOF'
import os, sys, time, urllib.request
addr, dash, want, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
from ray._raylet import GcsClient
token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
deadline = time.time() + timeout
alive = -1
while time.time() < deadline:
    try:
        nodes = GcsClient(address=addr).get_all_node_info(timeout=5)
        alive = sum(1 for n in nodes.values() if n.state == 0)  # GcsNodeState.ALIVE == 0
        if alive >= want:
            req = urllib.request.Request(dash + "/api/version",
                                         headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(f"timed out after {timeout:.0f}s: {alive} of {want} nodes alive")
EOF
}

# ---------------------------------------------------------------- start
do_start() {
    local t0 n_nodes
    t0=$(date +%s.%N)
    if is_running; then
        log "a local cluster is already running from $STATE_DIR; reusing it"
        cat "$ENV_FILE"
        return 0
    fi
    if [ -f "$SIDS_FILE" ] || [ -f "$META_FILE" ]; then
        log "cleaning up a dead cluster recorded in $STATE_DIR"
        do_stop
    fi
    n_nodes=$(( WORKERS + 1 ))
    NODE_IP="${LOCAL_RAY_NODE_IP:-127.0.0.2}"
    WORKER_PORTS="${LOCAL_RAY_WORKER_PORTS:-100}"
    local obj_mb="${LOCAL_RAY_OBJECT_STORE_MB:-512}"
    local timeout="${LOCAL_RAY_START_TIMEOUT:-180}"
    pick_ports "$n_nodes" "$WORKER_PORTS"

    TEMP_DIR="${LOCAL_RAY_TEMP_DIR:-$(mktemp -d /tmp/rlc.XXXXXX)}"
    mkdir -p "$TEMP_DIR" "$LOG_DIR"
    [ "${#TEMP_DIR}" -le 40 ] || log "warning: LOCAL_RAY_TEMP_DIR is long (${#TEMP_DIR} chars); Ray's Unix sockets under it may exceed 107 bytes"
    : > "$SIDS_FILE"
    printf 'TEMP_DIR=%s\nBASE=%s\nNODES=%s\n' "$TEMP_DIR" "$BASE" "$n_nodes" > "$META_FILE"

    # Token auth: a random 256-bit token in the state folder, read by every Ray process through
    # RAY_AUTH_TOKEN_PATH (`ray get-auth-token --generate` only writes ~/.ray/auth_token, which
    # is shared by everything the user runs; a per-cluster file is what a test wants).
    (umask 077; "$PY" -c 'import secrets,sys; sys.stdout.write(secrets.token_hex(32))' > "$TOKEN_FILE")
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
    unset RAY_AUTH_TOKEN RAY_ADDRESS
    export RAY_USAGE_STATS_ENABLED=0
    # Ray Jobs run their entrypoint with the head's environment: put this Ray's Python
    # environment first on PATH so `python` / `simpo-sweep` in an entrypoint resolve to it.
    PATH="$(dirname "$RAY"):$PATH"
    export PATH

    local obj=$(( obj_mb * 1024 * 1024 ))
    log "starting head at $NODE_IP:$GCS_PORT (dashboard http://127.0.0.1:$DASH_PORT), $WORKERS worker node(s), temp dir $TEMP_DIR"
    # shellcheck disable=SC2046
    if ! launch_node head --head --node-ip-address "$NODE_IP" --port "$GCS_PORT" \
        --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --include-dashboard true \
        --ray-client-server-port "$CLIENT_PORT" \
        --num-cpus "$HEAD_CPUS" --num-gpus 0 --object-store-memory "$obj" \
        --temp-dir "$TEMP_DIR" --disable-usage-stats $(node_port_args 0); then
        do_stop || true
        die "head node failed to start"
    fi
    local t_head; t_head=$(date +%s.%N)

    # Worker nodes one after the other (two `ray start` at once time out on Ray 2.60), each with a
    # temp dir of its own under $TEMP_DIR, as on separate machines. Sharing the head's would share
    # its session's runtime_resources/: the runtime-env agent of one node then deletes a job's
    # working_dir that is another node's driver's current directory when its own use of it
    # ends (the driver fails with FileNotFoundError from os.getcwd()).
    local i
    for (( i = 1; i <= WORKERS; i++ )); do
        # shellcheck disable=SC2046
        if ! launch_node "worker$i" --address "$NODE_IP:$GCS_PORT" --node-ip-address "$NODE_IP" \
            --num-cpus "$CPUS" --num-gpus 0 --object-store-memory "$obj" \
            --temp-dir "$TEMP_DIR/w$i" --disable-usage-stats \
            $(node_port_args "$i"); then
            do_stop || true
            die "worker node $i failed to start"
        fi
    done

    # Wait until the GCS lists every node as ALIVE (and the dashboard answers with the token).
    if ! wait_alive "$NODE_IP:$GCS_PORT" "http://127.0.0.1:$DASH_PORT" "$n_nodes" "$timeout"; then
        do_stop || true
        die "cluster did not come up"
    fi

    {
        echo "# written by cluster/local_cluster.sh start; source it to reach the cluster"
        echo "export RAY_AUTH_MODE=token"
        echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
        echo "export RAY_ADDRESS=$NODE_IP:$GCS_PORT"
        echo "export LOCAL_RAY_GCS_ADDRESS=$NODE_IP:$GCS_PORT"
        echo "export LOCAL_RAY_DASHBOARD_URL=http://127.0.0.1:$DASH_PORT"
        echo "export LOCAL_RAY_NUM_NODES=$n_nodes"
        echo "export LOCAL_RAY_NODE_IP=$NODE_IP"
        echo "export LOCAL_RAY_STATE_DIR=$STATE_DIR"
        echo "export LOCAL_RAY_TEMP_DIR=$TEMP_DIR"
    } > "$ENV_FILE.tmp"
    mv "$ENV_FILE.tmp" "$ENV_FILE"
    local t1; t1=$(date +%s.%N)
    log "$n_nodes nodes alive; head up in $(awk -v a="$t0" -v b="$t_head" 'BEGIN{printf "%.1f", b-a}') s, all in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s"
    log "env file: $ENV_FILE"
    cat "$ENV_FILE"
}

# Add one worker node to the running cluster (node index = nodes so far). --ip gives it another
# loopback address (127.0.0.3, ...): Ray then sees a second host, as on a real multi-machine
# cluster, while the disk is still shared.
do_add_node() {
    local ip="${ADD_IP:-}" index base gcs dash n_nodes
    is_running || die "no local cluster running from $STATE_DIR"
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    unset RAY_AUTH_TOKEN RAY_ADDRESS
    gcs="$LOCAL_RAY_GCS_ADDRESS"
    dash="$LOCAL_RAY_DASHBOARD_URL"
    ip="${ip:-$LOCAL_RAY_NODE_IP}"
    TEMP_DIR="$LOCAL_RAY_TEMP_DIR"
    WORKER_PORTS="${LOCAL_RAY_WORKER_PORTS:-100}"
    index="$(wc -l < "$SIDS_FILE")"
    base="$(free_block $(( 10 + WORKER_PORTS )))" || die "could not find free ports"
    export RAY_USAGE_STATS_ENABLED=0
    PATH="$(dirname "$RAY"):$PATH"
    export PATH
    log "adding worker node $index at $ip ($CPUS CPUs)"
    if ! launch_node "worker$index" --address "$gcs" --node-ip-address "$ip" \
        --num-cpus "$CPUS" --num-gpus 0 \
        --object-store-memory $(( ${LOCAL_RAY_OBJECT_STORE_MB:-512} * 1024 * 1024 )) \
        --temp-dir "$TEMP_DIR/w$index" --disable-usage-stats \
        --node-manager-port "$base" --object-manager-port $((base + 1)) \
        --dashboard-agent-listen-port $((base + 2)) --dashboard-agent-grpc-port $((base + 3)) \
        --runtime-env-agent-port $((base + 4)) --metrics-export-port $((base + 5)) \
        --min-worker-port $((base + 10)) --max-worker-port $((base + 10 + WORKER_PORTS - 1)); then
        die "worker node $index failed to start"
    fi
    n_nodes=$(( LOCAL_RAY_NUM_NODES + 1 ))
    wait_alive "$gcs" "$dash" "$n_nodes" "${LOCAL_RAY_START_TIMEOUT:-180}" \
        || die "worker node $index did not join"
    sed -i "s/^export LOCAL_RAY_NUM_NODES=.*/export LOCAL_RAY_NUM_NODES=$n_nodes/" "$ENV_FILE"
    log "worker node $index alive at $ip; $n_nodes nodes"
}

# Simulate the loss of a machine: SIGKILL every process of worker node N (raylet, agents, the
# Ray workers it started and their children) at once. The GCS marks the node dead after its
# health checks fail (RAY_health_check_period_ms x RAY_health_check_failure_threshold, 3 s x 5
# by default; export smaller values before `start` to notice it sooner).
# N is a worker node's number (1 = the first worker, in start / add-node order) or its Ray node
# id (56 hex digits, as the state API and dashboard show it).
do_kill_node() {
    local index="$1" sid pids pid
    [ -f "$SIDS_FILE" ] || die "no local cluster recorded in $STATE_DIR"
    if [[ "$index" =~ ^[0-9a-f]{56}$ ]]; then
        sid=""
        for pid in $(cluster_pids); do  # the raylet started with --node_id=<id>, and its session
            if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--node_id=$index"; then
                sid="$(awk '{print $6}' "/proc/$pid/stat")"
                break
            fi
        done
        [ -n "$sid" ] || die "no running node with id $index in this cluster"
        [ "$sid" != "$(head -n 1 "$SIDS_FILE")" ] || die "node $index is the head; kill-node takes worker nodes"
    else
        [[ "$index" =~ ^[1-9][0-9]*$ ]] || die "kill-node needs a worker node number >= 1 (node 0 is the head) or a node id"
        sid="$(sed -n "$((index + 1))p" "$SIDS_FILE")"
        [ -n "$sid" ] || die "no worker node $index in $STATE_DIR (workers: $(( $(wc -l < "$SIDS_FILE") - 1 )))"
    fi
    pids="$(cluster_pids "$sid")"
    if [ -z "$pids" ]; then
        log "worker node $index is not running"
        return 0
    fi
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    for _ in $(seq 1 50); do
        [ -z "$(cluster_pids "$sid")" ] && break
        sleep 0.1
    done
    [ -z "$(cluster_pids "$sid")" ] || die "worker node $index: processes still alive after SIGKILL"
    # LOCAL_RAY_NUM_NODES counts the nodes alive: a node added later must not wait for this one.
    if [ -f "$ENV_FILE" ]; then
        local n_nodes
        n_nodes="$(sed -n 's/^export LOCAL_RAY_NUM_NODES=//p' "$ENV_FILE")"
        sed -i "s/^export LOCAL_RAY_NUM_NODES=.*/export LOCAL_RAY_NUM_NODES=$(( n_nodes - 1 ))/" "$ENV_FILE"
    fi
    log "killed worker node $index ($(echo "$pids" | wc -l) processes)"
}

do_status() {
    if is_running; then
        echo "running ($(cluster_pids | wc -l) processes), state $STATE_DIR"
        [ -f "$ENV_FILE" ] && cat "$ENV_FILE"
        return 0
    fi
    echo "not running (state $STATE_DIR)"
    return 1
}

case "$CMD" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    kill-node) do_kill_node "$NODE_ARG" ;;
    add-node) do_add_node ;;
    env) [ -f "$ENV_FILE" ] && cat "$ENV_FILE" || die "no env file at $ENV_FILE (cluster not started?)" ;;
    -h|--help|help) usage ;;
    *) usage; exit 2 ;;
esac
