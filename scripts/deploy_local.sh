#!/usr/bin/env bash
# A real Flower deployment of phalanx on this machine, over loopback (127.0.0.1) only:
# a SuperLink (TLS with certificates made here, SuperNode authentication), N SuperNodes (one per
# client organisation, each with its own signing key), the run submitted with `flwr run`, and
# everything this script started stopped at the end (also on Ctrl-C or an error).
#
#   scripts/deploy_local.sh                        # 5 nodes, TLS, node authentication
#   scripts/deploy_local.sh --nodes 3 --insecure   # plain HTTP, no node authentication
#   scripts/deploy_local.sh --fault 2:nan --fault 3:forge-replay --kill-node 4 --kill-round 2
#
# Options: --nodes N (5), --workdir DIR (a new temporary folder), --experiment FILE (the app's
# experiment.yaml), --insecure (no TLS, no node auth), --no-auth (TLS without node auth),
# --fault I:KIND (node I sends nan | forge | replay | forge-replay), --kill-node I and
# --kill-round R (node I stalls in round R and is killed mid-round), --limit S (seconds any
# process may live, 900), --keep (leave the workdir).
#
# What each party runs is marked OPERATOR, SERVER, CLIENT ORG and RESEARCHER below; on separate
# machines each runs only its own part, with its own files (see README, "Deploy across
# organisations"). Flower facts this relies on (flwr 1.42): the Flower executables start each
# other by name, so the venv's bin goes first on PATH; connections live in $FLWR_HOME/config.toml;
# a ClientApp process must check in with its SuperNode within 30 s of the task being claimed, or
# it gets "401 Runtime task-token authentication failed" -- keep the machine's load low.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PHALANX_VENV:-$ROOT/.venv}"
NODES=5 WORK="" EXPERIMENT="" TLS=1 AUTH=1 LIMIT=900 KEEP=0 KILL_NODE="" KILL_ROUND=2
declare -A FAULT=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --workdir) WORK="$2"; shift 2 ;;
    --experiment) EXPERIMENT="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --insecure) TLS=0 AUTH=0; shift ;;
    --no-auth) AUTH=0; shift ;;
    --fault) FAULT["${2%%:*}"]="${2#*:}"; shift 2 ;;
    --kill-node) KILL_NODE="$2"; shift 2 ;;
    --kill-round) KILL_ROUND="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "deploy_local.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x "$VENV/bin/flower-superlink" ] || { echo "deploy_local.sh: no Flower in $VENV (make setup)" >&2; exit 2; }
export PATH="$VENV/bin:$PATH" PYTHONUNBUFFERED=1
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"  # ClientApp 0.2 s after its task (Flower: 1 s)
[ -n "$WORK" ] || WORK="$(mktemp -d "${TMPDIR:-/tmp}/phalanx-deploy.XXXXXX")"
mkdir -p "$WORK/logs" && WORK="$(cd "$WORK" && pwd)"
export FLWR_HOME="$WORK/flwr-home"
T0=$(date +%s)
PIDS=()

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# start NAME CMD...: in its own process group, bounded by `timeout`, output in logs/NAME.log
start() {
  local name="$1"; shift
  setsid timeout --signal=TERM --kill-after=10 "$LIMIT" "$@" >"$WORK/logs/$name.log" 2>&1 &
  PIDS+=($!)
  echo "  started $name (pid $!)"
}
# Flower processes this run started: in our process groups, or naming our workdir or one of our ports
ours() {
  ps -eo pid=,args= | grep -E "flwr-|flower-" | grep -v grep | while read -r pid args; do
    for port in ${PORTS:-}; do
      case " $args " in *"127.0.0.1:$port "*|*" --port $port "*) echo "$pid $args"; continue 2 ;; esac
    done
    case "$args" in *"$WORK"*) echo "$pid $args" ;; esac
  done
}
cleanup() {
  local rc=$? left="" _
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 3
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 1 15); do  # a SuperExec and the apps it started live in sessions of their own
    left="$(ours)"
    [ -n "$left" ] || break
    echo "$left" | while read -r pid _; do kill -KILL "$pid" 2>/dev/null || true; done
    sleep 1
  done
  if [ -n "$left" ]; then echo "processes left behind:"; echo "$left"; rc=1; else echo "stopped everything this script started"; fi
  [ "$KEEP" = 1 ] || [ $rc != 0 ] || rm -rf "$WORK"
  [ $rc = 0 ] || echo "files kept in $WORK"
  exit $rc
}
trap cleanup EXIT INT TERM

LINK_PORT="$(free_port)"
PORTS="$LINK_PORT"
echo "workdir $WORK; SuperLink on 127.0.0.1:$LINK_PORT; $NODES nodes; TLS $TLS, node auth $AUTH"

# ---------------------------------------------------------------- OPERATOR: keys and certificates
# The admin key signs the key registry; the registry holds public keys only; each organisation's
# private key is written into that organisation's own folder and never leaves it.
phalanx keys init --dir "$WORK/server/registry" --admin-key "$WORK/admin/admin.key.pem" >/dev/null
for i in $(seq 0 $((NODES - 1))); do
  phalanx keys generate "org$i" --dir "$WORK/server/registry" --admin-key "$WORK/admin/admin.key.pem" \
    --private-dir "$WORK/clients/org$i" >/dev/null
  [ "$AUTH" = 0 ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "org$i" -f "$WORK/clients/org$i/node_auth"
done
ADMIN_FP="$("$VENV/bin/python" -c 'import sys; from phalanx.keys import KeyRegistry
print(KeyRegistry.open(sys.argv[1]).admin_public_fingerprint)' "$WORK/server/registry")"  # pinned by the server
if [ "$TLS" = 1 ]; then  # a CA, and a server certificate for IP 127.0.0.1
  mkdir -p "$WORK/tls" && cd "$WORK/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=phalanx local CA" \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
    -keyout server.key -out server.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >ext.cnf
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf \
    -out server.crt 2>/dev/null
  chmod 600 ca.key server.key && cd "$ROOT"
fi
mkdir -p "$FLWR_HOME"
{ echo '[superlink]'; echo 'default = "local"'; echo; echo '[superlink.local]'
  echo "address = \"127.0.0.1:$LINK_PORT\""
  if [ "$TLS" = 1 ]; then echo "root-certificates = \"$WORK/tls/ca.crt\""; else echo "insecure = true"; fi
} >"$FLWR_HOME/config.toml"

# ---------------------------------------------------------------- SERVER: the SuperLink
LINK=(flower-superlink --host 127.0.0.1 --port "$LINK_PORT" --disable-runtime-dependency-installation
      --database "$WORK/server/state.db")
if [ "$TLS" = 1 ]; then
  LINK+=(--ssl-certfile "$WORK/tls/server.crt" --ssl-keyfile "$WORK/tls/server.key" --ssl-ca-certfile "$WORK/tls/ca.crt")
else
  LINK+=(--insecure)
fi
[ "$AUTH" = 0 ] || LINK+=(--enable-supernode-auth)
start superlink "${LINK[@]}"
for _ in $(seq 1 240); do
  (exec 3<>"/dev/tcp/127.0.0.1/$LINK_PORT") 2>/dev/null && break
  sleep 0.5
done
if [ "$AUTH" = 1 ]; then  # the operator admits each organisation's node key
  for i in $(seq 0 $((NODES - 1))); do
    flwr supernode register "$WORK/clients/org$i/node_auth.pub" local >"$WORK/logs/register-org$i.log" 2>&1
  done
fi

# ---------------------------------------------------------------- CLIENT ORGS: one SuperNode each
for i in $(seq 0 $((NODES - 1))); do
  port="$(free_port)"; PORTS+=" $port"
  cfg="partition-id=$i num-partitions=$NODES phalanx-client-id=\"org$i\""
  cfg+=" phalanx-private-key=\"$WORK/clients/org$i/org$i.key.pem\""
  [ -z "${FAULT[$i]:-}" ] || cfg+=" phalanx-fault=\"${FAULT[$i]}\""
  [ "$i" != "$KILL_NODE" ] || cfg+=" phalanx-fault=\"hang\" phalanx-fault-round=$KILL_ROUND phalanx-fault-marker=\"$WORK/hang.marker\""
  NODE=(flower-supernode --superlink "127.0.0.1:$LINK_PORT" --host 127.0.0.1 --port "$port" --node-config "$cfg")
  if [ "$TLS" = 1 ]; then NODE+=(--root-certificates "$WORK/tls/ca.crt"); else NODE+=(--insecure); fi
  [ "$AUTH" = 0 ] || NODE+=(--auth-supernode-private-key "$WORK/clients/org$i/node_auth")
  start "supernode-org$i" "${NODE[@]}"
  NODE_PID[$i]=${PIDS[-1]}
done

# ---------------------------------------------------------------- RESEARCHER: submit the run
RC="registry=\"$WORK/server/registry\" registry-seen=\"$WORK/server/registry.seq\" admin-fingerprint=\"$ADMIN_FP\" expected-nodes=$NODES min-nodes=1"
RC+=" round-timeout=180 store=\"$WORK/server/runs.db\" checkpoint=\"$WORK/server/checkpoint.pt\""
RC+=" summary=\"$WORK/summary.json\""
[ -z "$EXPERIMENT" ] || RC+=" experiment=\"$EXPERIMENT\""
echo "submitting: flwr run deploy/flower_app local --stream --run-config '$RC'"
setsid timeout --signal=TERM --kill-after=10 "$LIMIT" flwr run "$ROOT/deploy/flower_app" local --stream \
  --run-config "$RC" >"$WORK/logs/run.log" 2>&1 &
RUN_PID=$!
PIDS+=($RUN_PID)
if [ -n "$KILL_NODE" ]; then  # kill that node, with its ClientApp, mid-round
  while [ ! -e "$WORK/hang.marker" ] && kill -0 "$RUN_PID" 2>/dev/null; do sleep 1; done
  if [ -e "$WORK/hang.marker" ]; then
    kill -KILL -- "-${NODE_PID[$KILL_NODE]}" 2>/dev/null || true
    echo "  killed node org$KILL_NODE mid-round ($(cat "$WORK/hang.marker"))"
  fi
fi
wait "$RUN_PID" || { echo "flwr run failed; see $WORK/logs/run.log"; tail -20 "$WORK/logs/run.log"; exit 1; }

# ---------------------------------------------------------------- what the server recorded
grep -E "phalanx: (run|round)" "$WORK/logs/run.log" | sed 's/^.*phalanx:/  phalanx:/' || true
"$VENV/bin/python" - "$WORK/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"run {s['run_id']}: {s['rounds_done']} of {s['rounds']} rounds, status {s['status']}, "
      f"final model finite: {s.get('final_finite')}")
print("accuracy by round: " + ", ".join(f"{k}: {v:.3f}" for k, v in s["accuracy"].items()))
for h in s["history"]:
    print(f"round {h['round']}: rejected {h['rejections'] or 'none'}; missing nodes {h['missing'] or 'none'}")
EOF
echo "wall time $(( $(date +%s) - T0 )) s; logs in $WORK/logs; results store $WORK/server/runs.db"
