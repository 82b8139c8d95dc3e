#!/usr/bin/env bash
# MLflow tracking server on a machine of its own (a VM next to a `ray up` cluster, or this
# machine for the local loopback cluster): a database for runs, params and metrics, and an
# artifact store the server proxies, so Ray workers need only HTTP access to it (no database
# driver, no bucket credentials). On Kubernetes use cluster/mlflow/kubernetes.yaml instead.
#
#   cluster/mlflow/server.sh [--host ADDR] [--port PORT] [--workers N]
#
# Environment (all optional):
#   MLFLOW_BACKEND_STORE_URI      the database: postgresql://db-host:5432/mlflow (user and
#                                 password from PGUSER / PGPASSWORD or ~/.pgpass, never in the
#                                 URI), mysql+pymysql://..., or the default
#                                 sqlite:///$MLFLOW_SERVER_ROOT/mlflow.db (one machine only)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go: s3://bucket/mlflow-artifacts (credentials
#                                 from the usual AWS variables / instance profile), gs://...,
#                                 or the default $MLFLOW_SERVER_ROOT/artifacts
#   MLFLOW_SERVER_ROOT            folder of the default SQLite file and artifacts
#                                 (default ./mlflow-server)
#   MLFLOW_ALLOWED_HOSTS          extra host names to accept, comma-separated (MLflow >= 3.5
#                                 accepts only localhost and private IPs in the Host header):
#                                 the DNS name Ray workers use, e.g. "mlflow.internal"
#   MLFLOW_EXECUTABLE             the `mlflow` to run (default: .venv/bin/mlflow of this
#                                 repository, else PATH)
#   MLFLOW_AUTH                   "basic": MLflow's basic-auth app (`--app-name basic-auth`, needs
#                                 the mlflow[auth] extra); then these must be set, from a secret
#                                 store or a Kubernetes Secret, never written in a file here:
#                                   MLFLOW_AUTH_ADMIN_PASSWORD      the admin's first password
#                                   MLFLOW_FLASK_SERVER_SECRET_KEY  the CSRF key (same on every
#                                                                   replica)
#                                 and optionally MLFLOW_AUTH_ADMIN_USERNAME (default admin) and
#                                 MLFLOW_AUTH_DATABASE_URI (users and permissions; default
#                                 sqlite:///$MLFLOW_SERVER_ROOT/basic_auth.db). Sweeps then pass
#                                 MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  default false here: MLflow's server-side jobs (GenAI
#                                 evaluation, trace roll-ups) start seven worker processes that
#                                 experiment tracking does not use
#
# Defaults: --host 0.0.0.0 (every interface: Ray workers on other machines must reach it; keep
# the port behind the cluster's security group / firewall), --port 5000, --workers 2.
# Ray workers then use `tracking.tracking_uri: http://<this machine's private IP>:5000`.
# The server runs in the foreground (exec); run it under systemd, tmux or nohup.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

die() { echo "mlflow server: error: $*" >&2; exit 1; }

HOST=0.0.0.0
PORT=5000
WORKERS=2
while [ $# -gt 0 ]; do
    case "$1" in
        --host) HOST="${2:?--host needs a value}"; shift 2 ;;
        --port) PORT="${2:?--port needs a value}"; shift 2 ;;
        --workers) WORKERS="${2:?--workers needs a value}"; shift 2 ;;
        -h|--help) sed -n '2,41p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"

if [ -n "${MLFLOW_EXECUTABLE:-}" ]; then
    MLFLOW="$MLFLOW_EXECUTABLE"
elif [ -x "$REPO_ROOT/.venv/bin/mlflow" ]; then
    MLFLOW="$REPO_ROOT/.venv/bin/mlflow"
else
    MLFLOW="$(command -v mlflow || true)"
fi
[ -n "$MLFLOW" ] && [ -x "$MLFLOW" ] || die "cannot find the 'mlflow' executable (set MLFLOW_EXECUTABLE)"

ROOT="${MLFLOW_SERVER_ROOT:-./mlflow-server}"
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$ROOT/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$ROOT/artifacts}"
case "$BACKEND" in
    *://*:*@*) die "MLFLOW_BACKEND_STORE_URI carries a password; give it through PGPASSWORD / ~/.pgpass instead" ;;
esac

args=(
    server
    --backend-store-uri "$BACKEND"
    --artifacts-destination "$ARTIFACTS"
    --serve-artifacts
    --host "$HOST"
    --port "$PORT"
    --workers "$WORKERS"
)
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
    # Giving --allowed-hosts replaces MLflow's defaults: keep localhost and the private ranges,
    # and accept every extra name with and without a port (the Host header carries the port).
    allowed="localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*"
    for second in $(seq 16 31); do allowed+=",172.$second.*"; done
    IFS=',' read -r -a extra <<< "$MLFLOW_ALLOWED_HOSTS"
    for name in "${extra[@]}"; do
        name="${name// /}"
        [ -n "$name" ] || continue
        allowed+=",$name"
        [[ "$name" == *:* ]] || allowed+=",$name:*"
    done
    args+=(--allowed-hosts "$allowed")
fi

case "${MLFLOW_AUTH:-}" in
    "") ;;
    basic)
        [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] || die "MLFLOW_AUTH=basic needs MLFLOW_AUTH_ADMIN_PASSWORD (the admin's first password)"
        [ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || die "MLFLOW_AUTH=basic needs MLFLOW_FLASK_SERVER_SECRET_KEY (e.g. openssl rand -hex 32)"
        # The auth app's settings; the password stays in the environment, not in this file.
        AUTH_CONFIG="$ROOT/basic_auth.ini"
        umask 077
        cat > "$AUTH_CONFIG" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$ROOT/basic_auth.db}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
        export MLFLOW_AUTH_CONFIG_PATH="$AUTH_CONFIG"
        args+=(--app-name basic-auth)
        ;;
    *) die "MLFLOW_AUTH must be empty or 'basic', got '$MLFLOW_AUTH'" ;;
esac

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

echo "mlflow server: backend ${BACKEND%%://*}://..., artifacts $ARTIFACTS, auth ${MLFLOW_AUTH:-none}, http://$HOST:$PORT" >&2
exec "$MLFLOW" "${args[@]}"
