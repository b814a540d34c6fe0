#!/usr/bin/env bash
# Benchmark scenarios, written into BENCHMARKS.md with the machine, versions and commit.
#
#   bench/run.sh                  # one process per service (release build), all durability on
#   BENCH_MODE=up bench/run.sh    # every service in one process
#   BENCH_MODE=embedded bench/run.sh  # `ldt up` on SQLite files and the in-process bus
#   BENCH_DURATION=60 BENCH_RATES="300 1000 2000" bench/run.sh
#   BENCH_RATES="c128" bench/run.sh   # closed loop: 128 clients, each sending its next order
#                                 # when the last one is answered (the peak, `ldt bench
#                                 # --concurrency 128`); per-order figures over what was final
#   BENCH_FLOOR=0 bench/run.sh    # without the floor (below)
#   BENCH_SERVER_BIN=/tmp/ldt-before BENCH_LABEL=e7e30dd bench/run.sh
#                                 # the services from another build (the code before a change),
#                                 # driven and checked by this build's `ldt bench`
#
# In split mode it first measures the machine's floor at 300 orders/s (bench/limits.sh:
# pgbench and the bare broker-hop probe, about two minutes) and puts it under the table: the
# same build's latency moves with the host and the hour, and the floor moves with it.
#
# Starts the marketplace itself in a fresh namespace on the local RabbitMQ and PostgreSQL
# (or, embedded, in a fresh data directory),
# warms up, runs `ldt bench` at each rate (open loop), samples every process's RSS, checks
# the invariants after each run, and purges the namespace at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${BENCH_MODE:-split}
duration=${BENCH_DURATION:-60}
rates=${BENCH_RATES:-"300 1000 2000"}
out=${BENCH_OUT:-BENCHMARKS.md}
ns="bench_$(date +%s)"
work=$(mktemp -d -t ldt-bench.XXXXXX)
credits=1000000000

[ "$mode" = embedded ] || scripts/ensure-services.sh
cargo build --release --locked --bin ldt
bin=target/release/ldt
server=${BENCH_SERVER_BIN:-$bin}
[ -x "$server" ] || { echo "bench: BENCH_SERVER_BIN=$server is not an executable" >&2; exit 2; }
if [ "$mode" = split ] && [ "${BENCH_FLOOR:-1}" != 0 ]; then
  echo "bench: the machine's floor at 300/s (bench/limits.sh)" >&2
  # Not a reason to give up the run (no pgbench here, say): the table goes without it.
  LIMITS_RATES=300 bench/limits.sh >"$work/floor.md" || {
    echo "bench: the floor could not be measured (see above); going on without it" >&2
    : >"$work/floor.md"
  }
fi

export LDT_NAMESPACE=$ns LDT_INITIAL_CREDITS=$credits LDT_INITIAL_STOCK=0 RUST_LOG=warn
if [ "$mode" = embedded ]; then
  unset LDT_AMQP_URL LDT_DATABASE_URL
  export LDT_DATA_DIR="$work/data"
else
  export LDT_AMQP_URL=${LDT_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
  export LDT_DATABASE_URL=${LDT_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
fi
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$bin" purge --yes --namespace "$ns" >/dev/null 2>&1 || true
}
trap cleanup EXIT

declare -A port=([order]=18100 [orchestrator]=18101 [payment]=18102 [inventory]=18103 [delivery]=18104 [dead-letter]=18105)
if [ "$mode" = up ] || [ "$mode" = embedded ]; then
  LDT_HTTP_ADDR=127.0.0.1:18100 "$server" up >"$work/up.log" 2>&1 &
  pids+=($!); echo "up $!" >"$work/pids"
  urls=()
else
  : >"$work/pids"
  for s in order orchestrator payment inventory delivery dead-letter; do
    LDT_HTTP_ADDR=127.0.0.1:${port[$s]} "$server" serve "$s" >"$work/$s.log" 2>&1 &
    pids+=($!); echo "$s $!" >>"$work/pids"
  done
  urls=(--service-url payment=http://127.0.0.1:18102 --service-url inventory=http://127.0.0.1:18103
        --service-url delivery=http://127.0.0.1:18104 --service-url dead-letter=http://127.0.0.1:18105)
fi
for p in 18100 $( [ "$mode" = split ] && echo 18101 18102 18103 18104 18105 ); do
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$p/readyz" >/dev/null && break; sleep 0.2; done
done

# Peak RSS of every process, sampled every second while the scenarios run.
( while true; do
    while read -r name pid; do
      rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
      echo "$name $rss"
    done <"$work/pids" >>"$work/rss"
    sleep 1
  done ) &
sampler=$!
pids+=($sampler)

# PostgreSQL checkpoints so far (none in embedded mode): one inside a run explains a hiccup
# in its tail.
checkpoints() {
  [ "$mode" = embedded ] && return 0
  psql "${LDT_DATABASE_URL%/}/postgres" -Atc \
    "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter" 2>/dev/null || true
}

# Messages the services published so far (`metric`: every message, or broker messages, where a
# bundle counts once), and PostgreSQL's committed transactions and WAL flushes (none in
# embedded mode): per order in the table.
published() {
  local metric=$1 total=0 p n
  for p in 18100 $( [ "$mode" = split ] && echo 18101 18102 18103 18104 18105 ); do
    n=$(curl -sf "http://127.0.0.1:$p/metrics" | awk -v m="$metric" '$1 ~ "^" m "({|$)" {s += $NF} END {printf "%d", s}')
    total=$(( total + ${n:-0} ))
  done
  echo "$total"
}
pg_counters() {
  [ "$mode" = embedded ] && return 0
  psql "${LDT_DATABASE_URL%/}/postgres" -Atc \
    "SELECT (SELECT sum(xact_commit) FROM pg_stat_database), (SELECT wal_sync FROM pg_stat_wal)" 2>/dev/null || true
}

# The broker's fsyncs so far (RabbitMQ's own count, `io_sync`): a persistent message is synced
# to disk before it is confirmed, so they are the broker's share of what durability costs.
# Read with rabbitmqctl, so only when the broker runs on this machine; empty otherwise.
broker_syncs() {
  [ "$mode" = embedded ] && return 0
  case "${LDT_AMQP_URL#*://}" in
    *@127.0.0.1:*|*@127.0.0.1/*|*@localhost:*|*@localhost/*|127.0.0.1*|localhost*) ;;
    *) return 0 ;;
  esac
  command -v rabbitmqctl >/dev/null 2>&1 || return 0
  timeout 30 rabbitmqctl -q eval \
    'proplists:get_value({io_sync, count}, file_handle_cache_stats:get()).' 2>/dev/null |
    tr -dc '0-9' || true
}

common=(--url http://127.0.0.1:18100 "${urls[@]}" --users 1000 --initial-credits "$credits" --json)
echo "bench: warming up (10 s at 200/s)" >&2
"$bin" bench "${common[@]}" --rate 200 --duration 10 --no-check >/dev/null
results=()
for rate in $rates; do
  d=$duration
  if [[ $rate == c* ]]; then
    load=(--concurrency "${rate#c}")
    echo "bench: closed loop, ${rate#c} clients for $d s" >&2
  else
    load=(--rate "$rate")
    [ "$rate" -ge 2000 ] && d=$(( duration < 30 ? duration : 30 ))
    echo "bench: $rate orders/s for $d s" >&2
  fi
  : >"$work/rss"
  before=$(checkpoints)
  msgs_before=$(published ldt_messages_published_total)
  bus_before=$(published ldt_bus_messages_published_total)
  batches_before=$(published ldt_consumer_batches_total)
  pg_before=$(pg_counters)
  syncs_before=$(broker_syncs)
  # CPU of every process over the run's middle (its first and last 5 s left out).
  ( sleep 5; python3 bench/cpu.py $(( d > 15 ? d - 10 : d / 2 )) >"$work/cpu-$rate" ) &
  cpu=$!
  "$bin" bench "${common[@]}" "${load[@]}" --duration "$d" --settle-timeout-s 300 >"$work/bench-$rate.json" || true
  wait "$cpu" || true
  after=$(checkpoints)
  echo $(( $(published ldt_messages_published_total) - msgs_before )) >"$work/messages-$rate"
  echo $(( $(published ldt_bus_messages_published_total) - bus_before )) >"$work/broker-$rate"
  echo $(( $(published ldt_consumer_batches_total) - batches_before )) >"$work/batches-$rate"
  pg_after=$(pg_counters)
  if [ -n "$pg_before" ] && [ -n "$pg_after" ]; then
    echo $(( ${pg_after%%|*} - ${pg_before%%|*} )) >"$work/commits-$rate"
    echo $(( ${pg_after##*|} - ${pg_before##*|} )) >"$work/walsyncs-$rate"
  fi
  [ -n "$before" ] && [ -n "$after" ] && echo $(( after - before )) >"$work/checkpoints-$rate"
  syncs_after=$(broker_syncs)
  if [ -n "$syncs_before" ] && [ -n "$syncs_after" ]; then
    echo $(( syncs_after - syncs_before )) >"$work/brokersyncs-$rate"
  fi
  cp "$work/rss" "$work/rss-$rate"
  results+=("$rate")
done
kill "$sampler" 2>/dev/null || true

BENCH_LABEL=${BENCH_LABEL:-} python3 bench/render.py "$work" "$mode" "$out" "${results[@]}"
