#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ answer on their local ports: starts them when installed
# but stopped, installs them with apt on Debian/Ubuntu when missing, and otherwise stops
# with a clear message. Used by scripts/up.sh and scripts/test.sh.
set -euo pipefail

PG_HOST=127.0.0.1 PG_PORT=5432 AMQP_PORT=5672
say() { echo "ensure-services: $*" >&2; }
die() { say "error: $*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root to run: $*"; fi; }
wait_port() { # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
  die "$1 did not come up on port $2 within $3 s"
}

apt_install() {
  command -v apt-get >/dev/null || return 1
  say "installing $* with apt"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
  if port_open "$PG_PORT"; then return 0; fi
  local fresh=0
  if ! command -v pg_ctlcluster >/dev/null && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt_install postgresql || die "PostgreSQL is not installed and this is not a Debian/Ubuntu machine: install PostgreSQL and start it on $PG_HOST:$PG_PORT (or set LDT_DATABASE_URL)"
    fresh=1
  fi
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$version" ] || die "PostgreSQL is installed but has no cluster under /etc/postgresql"
  if [ "$fresh" = 1 ]; then
    # A fresh Debian cluster asks for passwords on TCP; this local development cluster trusts
    # loopback connections, as LDT_DATABASE_URL's default (postgres://postgres@127.0.0.1) expects.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
    || as_root pg_ctlcluster "$version" main start 2>/dev/null \
    || as_root service postgresql start \
    || die "could not start PostgreSQL"
  wait_port PostgreSQL "$PG_PORT" 30
}

ensure_rabbitmq() {
  if port_open "$AMQP_PORT"; then return 0; fi
  if ! command -v rabbitmq-server >/dev/null; then
    apt_install rabbitmq-server || die "RabbitMQ is not installed and this is not a Debian/Ubuntu machine: install RabbitMQ and start it on 127.0.0.1:$AMQP_PORT (or set LDT_AMQP_URL)"
  fi
  say "starting RabbitMQ"
  as_root rabbitmq-server -detached 2>/dev/null || as_root service rabbitmq-server start || die "could not start RabbitMQ"
  wait_port RabbitMQ "$AMQP_PORT" 90
}

ensure_postgres
ensure_rabbitmq
say "PostgreSQL on :$PG_PORT and RabbitMQ on :$AMQP_PORT are up"
