#!/usr/bin/env bash
# The whole test suite: unit and property tests, integration (in-process, real RabbitMQ and
# PostgreSQL), the fault matrix, the black-box end-to-end suite (against `ldt up` and against
# one process per service, the console in a headless Chromium among them), and the API
# contract (the OpenAPI document validated, schemathesis on both stacks).
# Starts or installs RabbitMQ, PostgreSQL and Chromium first when needed. Extra arguments go
# to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
scripts/ensure-browser.sh
# The e2e suite runs the ldt binary itself; the cluster test (e2e/tests/cluster.rs: three
# broker nodes, two database servers and twelve service processes on this machine) runs the
# release build.
cargo build --locked --bin ldt
cargo build --locked --release --bin ldt
cargo test --locked --workspace "$@"
scripts/contract.sh
