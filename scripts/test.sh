#!/usr/bin/env bash
# The whole test suite: unit, integration (in-process, real RabbitMQ and PostgreSQL) and the
# black-box end-to-end suite (against `ldt up` and against one process per service).
# Starts or installs RabbitMQ and PostgreSQL first when needed. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
# The e2e suite runs the ldt binary itself.
cargo build --locked --bin ldt
cargo test --locked --workspace "$@"
