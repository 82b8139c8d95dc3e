#!/usr/bin/env bash
# Start / stop a LOCAL multi-node Ray cluster on this machine (loopback), for development and tests.
#
#   cluster/local_cluster.sh start [--workers N] [--cpus-per-node C] [--state-dir DIR]
#   cluster/local_cluster.sh status [--state-dir DIR]
#   cluster/local_cluster.sh stop  [--state-dir DIR]
#   cluster/local_cluster.sh env   [--state-dir DIR]     # print the env file to source
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
# state folder (plus any process whose command line names this cluster's private temp dir),
# SIGTERM first, SIGKILL after a grace period. It is idempotent.
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
#   LOCAL_RAY_TEMP_DIR         Ray temp dir (default: mktemp -d /tmp/rlc.XXXXXX; keep it short,
#                              Unix socket paths under it are limited to 107 bytes)
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
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- arguments
CMD="${1:-}"
[ -n "$CMD" ] || { usage; exit 2; }
shift || true

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
        -h|--help) usage; exit 0 ;;
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
# PIDs (one per line) of live, non-zombie processes whose session id is one of ours or whose
# command line names our private Ray temp dir. Reads /proc only; matches nothing else.
cluster_pids() {
    local sids="" tmp=""
    [ -f "$SIDS_FILE" ] && sids="$(tr '\n' ' ' < "$SIDS_FILE")"
    [ -f "$META_FILE" ] && tmp="$(sed -n 's/^TEMP_DIR=//p' "$META_FILE")"
    [ -n "$sids$tmp" ] || return 0
    "$PY" - "$sids" "$tmp" <<'EOF'
import os, sys
sids = {int(s) for s in sys.argv[1].split()}
tmp = sys.argv[2]
me = os.getpid()
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) == me:
        continue
    try:
        with open(f"/proc/{name}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        # fields after the ")" closing the command name: state ppid pgrp session ...
        rest = stat[stat.rindex(")") + 2 :].split()
        state, sid = rest[0], int(rest[3])
        if state == "Z":
            continue
        hit = sid in sids
        if not hit and tmp:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                hit = tmp.encode() in f.read()
        if hit:
            print(name)
    except (OSError, ValueError, IndexError):
        continue
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
pick_ports() {
    local n_nodes=$1 per=$2
    local size=$(( 10 + 10 * n_nodes + per * n_nodes ))
    if [ -n "${LOCAL_RAY_PORT_BASE:-}" ]; then
        BASE="$LOCAL_RAY_PORT_BASE"
    else
        BASE="$("$PY" - "$size" <<'EOF'
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
)" || die "could not find free ports"
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

    # Worker nodes one after the other: two `ray start` racing on the same temp dir pick the same
    # "unique" socket / log names (raylet.1, plasma_store.1) and time out (seen on Ray 2.60).
    local i
    for (( i = 1; i <= WORKERS; i++ )); do
        # shellcheck disable=SC2046
        if ! launch_node "worker$i" --address "$NODE_IP:$GCS_PORT" --node-ip-address "$NODE_IP" \
            --num-cpus "$CPUS" --num-gpus 0 --object-store-memory "$obj" \
            --temp-dir "$TEMP_DIR" --include-log-monitor false --disable-usage-stats \
            $(node_port_args "$i"); then
            do_stop || true
            die "worker node $i failed to start"
        fi
    done

    # Wait until the GCS lists every node as ALIVE (and the dashboard answers with the token).
    if ! "$PY" - "$NODE_IP:$GCS_PORT" "http://127.0.0.1:$DASH_PORT" "$n_nodes" "$timeout" <<'EOF'
import sys, time, urllib.request
addr, dash, want, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
from ray._raylet import GcsClient
token = open(__import__("os").environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
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
    then
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
    env) [ -f "$ENV_FILE" ] && cat "$ENV_FILE" || die "no env file at $ENV_FILE (cluster not started?)" ;;
    -h|--help|help) usage ;;
    *) usage; exit 2 ;;
esac
