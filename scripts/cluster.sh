#!/usr/bin/env bash
# A local stand-in for a production deployment's broker and database, on this one machine:
#
#   - a three-node RabbitMQ cluster: nodes ldt-c1..3@localhost, AMQP on 127.0.0.1:5681..5683,
#     Erlang distribution on 25681..25683, data under /var/lib/ldt-cluster/rabbit-N, joined
#     with `rabbitmqctl join_cluster`;
#   - a PostgreSQL primary (127.0.0.1:5442, cluster "ldt_primary") with a synchronous
#     streaming standby (127.0.0.1:5443, "ldt_standby", made by `pg_basebackup -R`): a commit
#     returns once the standby has it.
#
# None of it touches the RabbitMQ (5672) and PostgreSQL (5432) the other tests use.
#
#   scripts/cluster.sh up       start what is missing (idempotent)
#   scripts/cluster.sh down     stop and delete all of it (nothing left behind)
#   scripts/cluster.sh status   what runs, the broker cluster's members, the replication state
#   scripts/cluster.sh env      the LDT_AMQP_URL and LDT_DATABASE_URL that reach it
#
# Needs root (or sudo), RabbitMQ and PostgreSQL installed (scripts/ensure-services.sh does it).
set -euo pipefail

BASE=/var/lib/ldt-cluster
NODES=(1 2 3)
AMQP_PORT0=5680 DIST_PORT0=25680
PG_VERSION=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
PRIMARY=ldt_primary STANDBY=ldt_standby
PRIMARY_PORT=5442 STANDBY_PORT=5443

say() { echo "cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root to run: $*"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
node() { echo "ldt-c$1@localhost"; }
ctl() { # node-number args...: rabbitmqctl against one of our nodes, as the rabbitmq user
  local n=$1; shift
  as_root runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq /usr/lib/rabbitmq/bin/rabbitmqctl -n "$(node "$n")" "$@"
}
wait_for() { # what seconds command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 "$((secs * 5))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "$what not ready within $secs s"
}

rabbit_up() {
  local n=$1 dir="$BASE/rabbit-$1"
  if ctl "$n" status >/dev/null 2>&1; then return 0; fi
  as_root mkdir -p "$dir/mnesia" "$dir/log"
  cat <<EOF | as_root tee "$dir/rabbitmq.conf" >/dev/null
listeners.tcp.local = 127.0.0.1:$((AMQP_PORT0 + n))
loopback_users = none
cluster_partition_handling = pause_minority
EOF
  echo "[]." | as_root tee "$dir/enabled_plugins" >/dev/null
  as_root chown -R rabbitmq:rabbitmq "$dir"
  say "starting RabbitMQ node $(node "$n") on 127.0.0.1:$((AMQP_PORT0 + n))"
  # One scheduler each and no busy-waiting: three nodes share two cores with everything else.
  as_root runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq \
    RABBITMQ_NODENAME="$(node "$n")" \
    RABBITMQ_DIST_PORT=$((DIST_PORT0 + n)) \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none" \
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached
  wait_for "RabbitMQ node $(node "$n")" 60 ctl "$n" await_startup
}

rabbit_join() {
  local n=$1
  if ctl "$n" cluster_status --formatter json 2>/dev/null | grep -q "\"$(node 1)\""; then return 0; fi
  say "joining $(node "$n") to $(node 1)"
  # (rabbitmqctl reports the node's restart on stderr as warnings; they are expected here.)
  ctl "$n" stop_app >/dev/null 2>&1
  ctl "$n" reset >/dev/null 2>&1
  ctl "$n" join_cluster "$(node 1)" >/dev/null 2>&1 || die "$(node "$n") could not join $(node 1)"
  ctl "$n" start_app >/dev/null 2>&1
}

pg_exists() { [ -d "/etc/postgresql/$PG_VERSION/$1" ]; }
pg_running() { pg_lsclusters -h 2>/dev/null | awk -v c="$1" '$2 == c && $4 ~ /^online/ { found = 1 } END { exit !found }'; }
pg_ctl() { as_root pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$@"; }
psql_at() { as_root runuser -u postgres -- psql -h 127.0.0.1 -p "$1" -U postgres -Atqc "$2"; }

# A cluster with a configuration but no data (a base backup that never finished, a drop
# that left our conf.d file behind) is removed, to be made again from scratch.
pg_forget_if_broken() {
  if pg_exists "$1" && ! [ -f "/var/lib/postgresql/$PG_VERSION/$1/PG_VERSION" ]; then
    as_root rm -rf "/etc/postgresql/$PG_VERSION/$1" "/var/lib/postgresql/$PG_VERSION/$1"
  fi
}

postgres_up() {
  [ -n "$PG_VERSION" ] || die "PostgreSQL is not installed (scripts/ensure-services.sh installs it)"
  pg_forget_if_broken "$PRIMARY"
  if ! pg_exists "$PRIMARY"; then
    say "creating the PostgreSQL primary $PRIMARY on 127.0.0.1:$PRIMARY_PORT"
    as_root pg_createcluster "$PG_VERSION" "$PRIMARY" -p "$PRIMARY_PORT" -- --auth=trust >/dev/null
    # In the cluster's own config (not postgresql.auto.conf, which pg_basebackup copies): a
    # standby promoted to primary must not wait for a standby of its own.
    cat <<EOF | as_root tee "/etc/postgresql/$PG_VERSION/$PRIMARY/conf.d/ldt.conf" >/dev/null
listen_addresses = '127.0.0.1'
max_connections = 300
wal_level = replica
max_wal_senders = 5
synchronous_standby_names = '$STANDBY'
synchronous_commit = on
EOF
  fi
  pg_running "$PRIMARY" || pg_ctl "$PRIMARY" start
  wait_for "PostgreSQL primary" 30 psql_at "$PRIMARY_PORT" "SELECT 1"
  pg_forget_if_broken "$STANDBY"
  if ! pg_exists "$STANDBY"; then
    say "creating the synchronous standby $STANDBY on 127.0.0.1:$STANDBY_PORT (pg_basebackup -R)"
    as_root pg_createcluster "$PG_VERSION" "$STANDBY" -p "$STANDBY_PORT" -- --auth=trust >/dev/null
    cat <<EOF | as_root tee "/etc/postgresql/$PG_VERSION/$STANDBY/conf.d/ldt.conf" >/dev/null
listen_addresses = '127.0.0.1'
max_connections = 300
hot_standby = on
EOF
    local data="/var/lib/postgresql/$PG_VERSION/$STANDBY"
    as_root rm -rf "$data"
    as_root install -d -o postgres -g postgres -m 700 "$data"
    as_root runuser -u postgres -- pg_basebackup -D "$data" -R -X stream \
      -d "host=127.0.0.1 port=$PRIMARY_PORT user=postgres application_name=$STANDBY"
  fi
  pg_running "$STANDBY" || pg_ctl "$STANDBY" start
  wait_for "the standby streaming synchronously" 30 standby_in_sync
}

standby_in_sync() {
  [ "$(psql_at "$PRIMARY_PORT" "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$STANDBY'")" = sync ]
}

up() {
  command -v rabbitmq-server >/dev/null || die "RabbitMQ is not installed (scripts/ensure-services.sh installs it)"
  as_root mkdir -p "$BASE"
  for n in "${NODES[@]}"; do rabbit_up "$n"; done
  for n in "${NODES[@]:1}"; do rabbit_join "$n"; done
  postgres_up
  status
}

down() {
  for n in "${NODES[@]}"; do
    local dir="$BASE/rabbit-$n"
    if [ -f "$dir/pid" ]; then
      local pid
      pid=$(cat "$dir/pid" 2>/dev/null || true)
      ctl "$n" stop >/dev/null 2>&1 || true
      [ -n "$pid" ] && as_root kill -9 "$pid" 2>/dev/null || true
    fi
  done
  # A node killed with SIGKILL leaves no pid file behind to find it by.
  as_root pkill -9 -f -- "-sname ldt-c[0-9]@localhost|nodename ldt-c[0-9]@localhost|ldt-c[0-9]@localhost" 2>/dev/null || true
  for c in "$STANDBY" "$PRIMARY"; do
    if pg_exists "$c"; then
      say "dropping PostgreSQL cluster $c"
      pg_ctl "$c" stop -m immediate >/dev/null 2>&1 || true
      as_root pg_dropcluster "$PG_VERSION" "$c" >/dev/null 2>&1 || true
      # pg_dropcluster leaves a directory holding files it did not make (our conf.d file).
      as_root rm -rf "/etc/postgresql/$PG_VERSION/$c" "/var/lib/postgresql/$PG_VERSION/$c"
    fi
  done
  as_root rm -rf "$BASE"
  say "down: nothing left"
}

status() {
  for n in "${NODES[@]}"; do
    if ctl "$n" status >/dev/null 2>&1; then
      echo "rabbitmq $(node "$n")  127.0.0.1:$((AMQP_PORT0 + n))  running"
    else
      echo "rabbitmq $(node "$n")  127.0.0.1:$((AMQP_PORT0 + n))  down"
    fi
  done
  for c in "$PRIMARY:$PRIMARY_PORT" "$STANDBY:$STANDBY_PORT"; do
    local name=${c%%:*} port=${c##*:}
    if pg_exists "$name" && pg_running "$name"; then
      local role
      role=$(psql_at "$port" "SELECT CASE WHEN pg_is_in_recovery() THEN 'standby' ELSE 'primary' END" 2>/dev/null || echo "?")
      echo "postgres $name  127.0.0.1:$port  $role"
    elif pg_exists "$name"; then
      echo "postgres $name  127.0.0.1:$port  down"
    else
      echo "postgres $name  127.0.0.1:$port  absent"
    fi
  done
  if pg_exists "$PRIMARY" && pg_running "$PRIMARY"; then
    psql_at "$PRIMARY_PORT" "SELECT 'replication ' || application_name || ' ' || state || ' ' || sync_state FROM pg_stat_replication" 2>/dev/null || true
  fi
}

env_vars() {
  local urls=()
  for n in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$((AMQP_PORT0 + n))/%2f"); done
  (IFS=,; echo "LDT_AMQP_URL=${urls[*]}")
  echo "LDT_DATABASE_URL=postgres://postgres@127.0.0.1:$PRIMARY_PORT"
  echo "LDT_QUEUE_TYPE=quorum"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) env_vars ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
