#!/usr/bin/env bash
# Runs the whole marketplace in one process (`ldt up`) on the local RabbitMQ and PostgreSQL,
# starting or installing them first when needed. Arguments go to `ldt up` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
exec cargo run --locked --release --bin ldt -- up "$@"
