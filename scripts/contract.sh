#!/usr/bin/env bash
# The API contract, proven: the OpenAPI document validated (openapi-spec-validator), then
# schemathesis (`--checks all`, stateful links) against the marketplace on both stacks —
# `ldt up --ephemeral` (embedded), and one process per service on RabbitMQ + PostgreSQL,
# reached through the order service's process (which forwards what the others answer).
# Fails on any failure. The tools come from PyPI into a venv of their own (under target/).
# Run by scripts/test.sh; on its own: scripts/contract.sh [MAX_EXAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-${CONTRACT_MAX_EXAMPLES:-100}}
target=${CARGO_TARGET_DIR:-target}
venv="$target/contract-venv"
# Absolute: it is used from another directory below (CARGO_TARGET_DIR may be either).
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
bin="$target/debug/ldt"
say() { echo "contract: $*" >&2; }

if [ ! -x "$venv/bin/st" ]; then
  say "installing schemathesis and openapi-spec-validator into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    schemathesis==4.32.5 openapi-spec-validator==0.7.2
fi
[ -x "$bin" ] || cargo build --locked --bin ldt

work=$(mktemp -d -t ldt-contract.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # url
  for _ in $(seq 1 150); do
    curl -sf "$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  say "error: $1 did not become ready (logs in $work)"; cat "$work"/*.log >&2 || true; exit 1
}

run_schemathesis() { # label schema base-url
  say "schemathesis on $1 ($examples examples per operation)"
  # The event stream never ends: it has its own test (api.rs); everything else is checked.
  # One worker: with two, schemathesis runs hypothesis in two threads, and CPython 3.11 keeps
  # ast.parse's recursion count in state shared by the interpreter's threads (see
  # cpython#106905), so two threads parsing at once now and then fail inside the tool with
  # "AST constructor recursion depth mismatch" (a clean CI run of 3db88bf did, on
  # GET /api/v1/dead-letters). That failure says nothing about the API; one worker avoids it.
  (cd "$work" && SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$PWD/scripts/schemathesis" \
    "$venv/bin/st" run "$2" --url "$3" --checks all \
      --exclude-path /api/v1/orders/events \
      --max-examples "$examples" --workers 1 --no-color --request-timeout 15 \
      --seed 42 --generation-deterministic)
}

# 1. Embedded.
port=$(free_port)
"$bin" up --ephemeral --http-addr "127.0.0.1:$port" >"$work/embedded.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$port"
curl -sf "http://127.0.0.1:$port/openapi.json" >"$work/openapi.json"
say "validating the OpenAPI document"
"$venv/bin/python" - "$work/openapi.json" <<'PY'
import sys
from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename
spec, _ = read_from_filename(sys.argv[1])
validate(spec)
print("contract: the OpenAPI document is valid", file=sys.stderr)
PY
cp scripts/schemathesis/hooks.py "$work/"
run_schemathesis "ldt up --ephemeral" "$work/openapi.json" "http://127.0.0.1:$port"
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true; pids=()

# 2. One process per service on RabbitMQ + PostgreSQL.
scripts/ensure-services.sh
export LDT_AMQP_URL=${LDT_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export LDT_DATABASE_URL=${LDT_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
namespace="contract_$(date +%s)_$$"
declare -A ports
for s in order orchestrator payment inventory delivery dead-letter; do ports[$s]=$(free_port); done
urls=""
for s in orchestrator payment inventory delivery dead-letter; do urls+="$s=http://127.0.0.1:${ports[$s]},"; done
for s in order orchestrator payment inventory delivery dead-letter; do
  LDT_NAMESPACE=$namespace LDT_QUEUE_EXPIRES_MS=600000 \
    "$bin" serve "$s" --http-addr "127.0.0.1:${ports[$s]}" --service-url "${urls%,}" \
    >"$work/$s.log" 2>&1 &
  pids+=($!)
done
for s in order orchestrator payment inventory delivery dead-letter; do wait_ready "http://127.0.0.1:${ports[$s]}"; done
status=0
run_schemathesis "split mode on RabbitMQ + PostgreSQL" "$work/openapi.json" "http://127.0.0.1:${ports[order]}" || status=$?
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()
LDT_NAMESPACE=$namespace "$bin" purge --yes >/dev/null 2>&1 || say "purging $namespace failed"
[ "$status" = 0 ] || { say "FAILED"; exit "$status"; }
say "passed on both stacks"
