#!/usr/bin/env bash
# Runs the whole marketplace in one process (`ldt up`) on the local RabbitMQ and PostgreSQL,
# starting or installing them first when needed. Arguments go to `ldt up` (see --help).
# (Without a broker or database, `cargo run --release -- up` runs the embedded mode.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
export LDT_AMQP_URL=${LDT_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export LDT_DATABASE_URL=${LDT_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
exec cargo run --locked --release --bin ldt -- up "$@"
