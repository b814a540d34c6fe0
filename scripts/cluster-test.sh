#!/usr/bin/env bash
# The cluster test of the README's "Scaling out" (e2e/tests/cluster.rs): a three-node RabbitMQ
# cluster and a PostgreSQL primary with a synchronous standby (scripts/cluster.sh, their own
# ports and directories), two processes of every service (the release build: twelve service
# processes beside five servers on one machine), orders at 200/s while broker nodes and the
# database primary are SIGKILLed. scripts/test.sh runs it with the rest; this runs it alone.
# Takes about 2 minutes after its builds.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
cargo build --locked --release --bin ldt
cargo test --locked -p e2e --test cluster -- --nocapture "$@"
