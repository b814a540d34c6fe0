#!/usr/bin/env bash
# What this machine's PostgreSQL and RabbitMQ cost on their own, under the traffic an order
# makes, so that the marketplace's figures (bench/run.sh) can be read against a floor:
#
#   - pgbench: durable single-row inserts, each its own transaction (an order makes seven),
#     at the rate 300 orders/s asks for, then as fast as 8 clients go;
#   - the hop probe (crates/tools/examples/hop_probe.rs): chains of 6 broker hops (an order's
#     hops), each a persistent message published with a confirm and acked, without and with
#     one durable insert per hop: what an order costs at the least, with no HTTP, JSON,
#     tracing, outbox or saga logic.
#
#   bench/limits.sh                 # prints a Markdown table
#   LIMITS_RATES="300 1000" LIMITS_DURATION=30 bench/limits.sh
#
# CPU is sampled (bench/cpu.py) over the middle of each run, in % of one core.
set -euo pipefail
cd "$(dirname "$0")/.."
rates=${LIMITS_RATES:-"300 1000"}
duration=${LIMITS_DURATION:-30}
db_url=${LDT_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
amqp_url=${LDT_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
scripts/ensure-services.sh
cargo build --release --locked -p ldt-tools --example hop_probe
probe=target/release/examples/hop_probe
work=$(mktemp -d -t ldt-limits.XXXXXX)
db="limits_$(date +%s)"
psql_() { psql "$db_url/${1}" -v ON_ERROR_STOP=1 -Atq -c "$2"; }
cleanup() { psql_ postgres "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# Samples the CPU over the middle half of a run of $1 seconds into $2.
sample() { ( sleep "$(( $1 / 4 ))"; bench/cpu.py "$(( $1 / 2 ))" >"$2" ) & }
# bench/cpu.py prints `group cpu% switches/s`: the CPU is the next to last column.
cpu_of() { awk -v g="$2" '$0 ~ "^"g" " {print $(NF-1)}' "$1" | head -1; }
total_of() { awk '/^total/ {print $(NF-1)}' "$1"; }

echo "| run | rate | latency p50 / p99 (ms) | done/s | PostgreSQL % | RabbitMQ % | client % | machine % |"
echo "|---|---|---|---|---|---|---|---|"

psql_ postgres "CREATE DATABASE $db"
psql_ "$db" "CREATE TABLE t (id BIGSERIAL PRIMARY KEY, payload TEXT NOT NULL)"
echo "INSERT INTO t (payload) VALUES (repeat('x', 300));" >"$work/insert.sql"
for rate in $rates; do
  tps=$(( rate * 7 ))
  sample "$duration" "$work/cpu"
  pgbench -n -c 6 -j 2 -T "$duration" -R "$tps" -f "$work/insert.sql" "$db_url/$db" >"$work/pgbench" 2>&1
  wait
  lat=$(awk '/latency average/ {print $4}' "$work/pgbench")
  done_=$(awk -F'[ =]+' '/^tps/ {printf "%d", $2}' "$work/pgbench")
  echo "| pgbench: durable 1-row inserts (7 per order), 6 clients | $tps/s | avg $lat | $done_ | $(cpu_of "$work/cpu" postgresql) | – | $(cpu_of "$work/cpu" pgbench) | $(total_of "$work/cpu") |"
done
sample "$duration" "$work/cpu"
pgbench -n -c 8 -j 2 -T "$duration" -f "$work/insert.sql" "$db_url/$db" >"$work/pgbench" 2>&1
wait
lat=$(awk '/latency average/ {print $4}' "$work/pgbench")
done_=$(awk -F'[ =]+' '/^tps/ {printf "%d", $2}' "$work/pgbench")
echo "| pgbench: the same, as fast as 8 clients go | – | avg $lat | $done_ | $(cpu_of "$work/cpu" postgresql) | – | $(cpu_of "$work/cpu" pgbench) | $(total_of "$work/cpu") |"

for rate in $rates; do
  for with_db in no yes; do
    extra=(); what="6 broker hops"
    if [ "$with_db" = yes ]; then extra=(--database-url "$db_url"); what="6 hops + a durable insert each"; fi
    sample "$duration" "$work/cpu"
    "$probe" --amqp-url "$amqp_url" --rate "$rate" --hops 6 --duration "$duration" "${extra[@]}" >"$work/probe"
    wait
    read -r p50 p99 completed <<<"$(python3 -c "import json,sys; d=json.load(open('$work/probe')); print(d['p50_ms'], d['p99_ms'], d['completed'])")"
    echo "| hop probe: $what | $rate chains/s | $p50 / $p99 | $(( completed / duration )) | $(cpu_of "$work/cpu" postgresql) | $(cpu_of "$work/cpu" rabbitmq) | $(cpu_of "$work/cpu" hop_probe) | $(total_of "$work/cpu") |"
  done
done
