#!/usr/bin/env bash
# A Flower deployment of `sflllm train` on this machine (127.0.0.1), with the built-in demo model and data:
#   scripts/local-deployment.sh OUTDIR [--clients 3] [--rounds 2] [--config FILE.yaml]
# makes throw-away certificates and SuperNode keys, starts a SuperLink (TLS, SuperNode authentication,
# no runtime dependency installation) and one SuperNode per client (TLS, node key), registers the
# keys, runs the app (flwr run ... --stream) and writes OUTDIR/metrics.json, config.yaml and the
# checkpoints as `sflllm train --clients N --rounds R --output OUTDIR` does (same result).
# Every process it starts is stopped by its process-group id on exit, failure or Ctrl-C.
# Needs: pip install "sflllm[flower]", openssl, ssh-keygen.  docs/deployment.md has the two-machine steps.
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [--clients N] [--rounds R] [--config FILE.yaml]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
OUT=$1; shift
CLIENTS=3; ROUNDS=2; CONFIG=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --clients) [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || usage; CLIENTS=$2; shift 2 ;;
    --rounds) [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || usage; ROUNDS=$2; shift 2 ;;
    --config) [[ $# -ge 2 && -f $2 ]] || usage; CONFIG=$(realpath "$2"); shift 2 ;;
    *) usage ;;
  esac
done
if [[ -e $OUT && -n $(ls -A "$OUT" 2>/dev/null) ]]; then
  echo "error: output $OUT exists and is not empty; choose a new directory" >&2; exit 2
fi
for tool in flower-superlink flower-supernode flwr openssl ssh-keygen python3; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (pip install \"sflllm[flower]\"; openssl; ssh-keygen)" >&2; exit 2; }
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(realpath -m "$OUT")
[[ -d $REPO/src/sflllm ]] && export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's sflllm
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sflllm-deployment.XXXXXX")
export FLWR_HOME=$WORK/flwr-home  # Flower's config and installed apps: nothing under ~/.flwr
PIDS=()

# PID and its descendants (Flower starts its SuperExec, ServerApp and ClientApp processes in sessions of their own)
tree() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$child"; done
  echo "$1"
}

cleanup() {
  local status=$? pid left
  trap - EXIT INT TERM
  local all=()
  for pid in "${PIDS[@]}"; do all+=($(tree "$pid")); done
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done  # each started process group
  for pid in "${all[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 100); do
    left=0
    for pid in "${all[@]}"; do ps -o stat= -p "$pid" 2>/dev/null | grep -qv Z && left=1; done  # alive, not a zombie
    [[ $left -eq 0 ]] && break
    sleep 0.1
  done
  for pid in "${all[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $status -ne 0 ]]; then
    echo "deployment failed (exit $status); logs:" >&2
    for log in "$WORK"/logs/*.log; do [[ -f $log ]] && { echo "--- $log (last 20 lines)" >&2; tail -n 20 "$log" >&2; }; done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start CMD... in its own process group (its children too), logging to $WORK/logs/NAME.log
start() {
  local name=$1; shift
  setsid "$@" >"$WORK/logs/$name.log" 2>&1 &
  PIDS+=($!)
}

free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_port() {  # wait_port PORT NAME
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "error: $2 did not open port $1 within 30 s" >&2; return 1
}

mkdir -p "$WORK/certs" "$WORK/keys" "$WORK/logs" "$FLWR_HOME"
# throw-away certificates: a CA, and a certificate for 127.0.0.1 signed by it (the SuperLink's)
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=sflllm local CA" \
  -keyout "$WORK/certs/ca.key" -out "$WORK/certs/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$WORK/certs/server.key" -out "$WORK/certs/server.csr" 2>/dev/null
printf "subjectAltName=IP:127.0.0.1,DNS:localhost\n" >"$WORK/certs/san.ext"
openssl x509 -req -in "$WORK/certs/server.csr" -CA "$WORK/certs/ca.pem" -CAkey "$WORK/certs/ca.key" \
  -CAcreateserial -days 2 -extfile "$WORK/certs/san.ext" -out "$WORK/certs/server.pem" 2>/dev/null
# one SuperNode key pair per client (ECDSA P-384, OpenSSH format, as `flwr supernode register` expects)
for ((k = 0; k < CLIENTS; k++)); do
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "sflllm-client-$k" -f "$WORK/keys/client$k"
done

read -r -a PORTS <<<"$(free_ports $((CLIENTS + 1)))"
LINK=127.0.0.1:${PORTS[0]}
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local"

[superlink.local]
address = "$LINK"
root-certificates = "$WORK/certs/ca.pem"
EOF

start superlink flower-superlink --port "${PORTS[0]}" --ssl-ca-certfile "$WORK/certs/ca.pem" \
  --ssl-certfile "$WORK/certs/server.pem" --ssl-keyfile "$WORK/certs/server.key" \
  --enable-supernode-auth --disable-runtime-dependency-installation
wait_port "${PORTS[0]}" SuperLink
for ((k = 0; k < CLIENTS; k++)); do
  flwr supernode register "$WORK/keys/client$k.pub" local >"$WORK/logs/register$k.log" 2>&1 \
    || { cat "$WORK/logs/register$k.log" >&2; exit 1; }
  start "supernode$k" flower-supernode --superlink "$LINK" --root-certificates "$WORK/certs/ca.pem" \
    --auth-supernode-private-key "$WORK/keys/client$k" --port "${PORTS[k + 1]}" \
    --node-config "partition-id=$k num-partitions=$CLIENTS"
done
echo "SuperLink on $LINK (TLS, SuperNode authentication), $CLIENTS SuperNodes; logs in $WORK/logs"

mkdir -p "$OUT"
RUN_CONFIG="output-dir=\"$OUT\" clients=$CLIENTS rounds=$ROUNDS config-file=\"$CONFIG\""
flwr run "$REPO/flower-app" local --stream --run-config "$RUN_CONFIG"
python3 - "$OUT/metrics.json" <<'EOF'
import json, sys
try:
    metrics = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"error: the run wrote no readable {sys.argv[1]}: {e}")
if metrics.get("final") is None:
    sys.exit(f"error: the run did not finish: {sys.argv[1]} has {len(metrics.get('rounds', []))} rounds and no final metrics")
EOF
echo "results in $OUT/ (metrics.json, config.yaml, *.safetensors)"
