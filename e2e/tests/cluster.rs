//! The marketplace outgrowing one machine, on this one: `scripts/cluster.sh` starts a
//! three-node RabbitMQ cluster and a PostgreSQL primary with a synchronous standby (their own
//! ports and directories, away from the broker and database the other tests use), and two
//! processes of every service run on it with quorum queues, the database reached through a
//! TCP proxy that stands in for the Kubernetes Service CloudNativePG moves to a new primary.
//!
//! While orders come at 200/s (kill and timeout faults and insufficient funds among them):
//! the RabbitMQ node leading the most queues is SIGKILLed, then restarted; another node is
//! SIGKILLed; then the PostgreSQL primary is SIGKILLed, the standby promoted and the proxy
//! switched to it. Afterwards every accepted order is final, the four invariants hold, and
//! the order API refused only with 503 (never 500) — while no primary existed. It prints how
//! long each fault took to recover from (an order placed after it, final).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{Marketplace, Mode};
use ldt_testkit::check::{Checker, Endpoints};
use ldt_testkit::client::{Api, OrderStream, eventually};
use ldt_testkit::proxy::FaultProxy;
use serde_json::json;

const NODES: [u16; 3] = [1, 2, 3];
const PRIMARY_PORT: u16 = 5442;
const STANDBY_PORT: u16 = 5443;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh")
}

fn cluster(cmd: &str) -> String {
    let out = Command::new(script())
        .arg(cmd)
        .output()
        .expect("scripts/cluster.sh runs");
    assert!(
        out.status.success(),
        "scripts/cluster.sh {cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The release build of `ldt` (`scripts/cluster-test.sh` makes it): three broker nodes, two
/// database servers and twelve service processes share this machine's cores, and the debug
/// build's services alone would take most of them at 200 orders/s.
fn release_bin() -> String {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/cluster-… → target/release/ldt
    let bin = exe.ancestors().nth(3).unwrap().join("release").join("ldt");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build --release --bin ldt` (scripts/cluster-test.sh builds it)",
        bin.display()
    );
    bin.display().to_string()
}

fn node(n: u16) -> String {
    format!("ldt-c{n}@localhost")
}

/// The Erlang VM of RabbitMQ node `n`.
fn node_pid(n: u16) -> String {
    std::fs::read_to_string(format!("/var/lib/ldt-cluster/rabbit-{n}/pid"))
        .expect("the node's pid file")
        .trim()
        .to_owned()
}

fn kill9(pid: &str) {
    let status = Command::new("kill").args(["-9", pid]).status().unwrap();
    assert!(status.success(), "kill -9 {pid}");
}

/// How many of the namespace's queues each node leads, asked of a running node.
fn leaders(ask: u16, namespace: &str) -> BTreeMap<u16, usize> {
    let out = Command::new("rabbitmqctl")
        .args(["-n", &node(ask), "-q", "list_queues", "name", "leader"])
        .args(["--formatter", "json"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queues: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut count = BTreeMap::new();
    for q in queues {
        let ours = q["name"]
            .as_str()
            .is_some_and(|n| n.starts_with(&format!("{namespace}.")));
        if let (true, Some(leader)) = (ours, q["leader"].as_str())
            && let Some(n) = NODES.iter().find(|n| leader == node(**n))
        {
            *count.entry(*n).or_insert(0) += 1;
        }
    }
    count
}

/// Every queue's leader, depth, unacked deliveries and consumers, and every channel's
/// unacked deliveries, asked of the first node that answers: what a stalled saga is waiting
/// on, and whether the consumers hold what the queues count as unacked.
fn queue_states() -> String {
    let ask = |n: u16, what: &[&str]| {
        let out = Command::new("rabbitmqctl")
            .args(["-n", &node(n), "-q"])
            .args(what)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    for n in NODES {
        let queues = [
            "list_queues",
            "name",
            "leader",
            "members",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ];
        if let Some(queues) = ask(n, &queues) {
            let channels = [
                "list_channels",
                "name",
                "messages_unacknowledged",
                "prefetch_count",
                "consumer_count",
            ];
            let channels = ask(n, &channels).unwrap_or_default();
            return format!("{queues}\nchannels:\n{channels}");
        }
    }
    "no node answered".into()
}

fn postgres(port: u16, sql: &str) -> Option<String> {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-Atqc",
            sql,
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .unwrap()
}

/// The cluster torn down when the test ends, however it ends.
struct Teardown;

impl Drop for Teardown {
    fn drop(&mut self) {
        // `LDT_KEEP_CLUSTER=1` leaves it up, its logs to read, for a failure to be looked into.
        if std::env::var_os("LDT_KEEP_CLUSTER").is_some() {
            return;
        }
        let _ = Command::new(script()).arg("down").output();
    }
}

/// How long an order placed now takes to be final: the time to recover from what just
/// happened.
async fn recovery(api: &Api, what: &str, i: u32) -> Duration {
    let started = Instant::now();
    let body = json!({"username": format!("probe-{i}"), "price": 1, "amount": 1});
    let id = api
        .place(
            &body,
            &format!("probe-{i}-{}", uuid::Uuid::new_v4()),
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("after {what}: the probe order was not accepted: {e}"));
    if let Err(e) = api.wait_final(&id, Duration::from_secs(60)).await {
        println!(
            "cluster: the broker's view of the queues:\n{}",
            queue_states()
        );
        panic!("after {what}: {e}");
    }
    let took = started.elapsed();
    println!(
        "cluster: {what}: an order placed right after was final in {:.1} s",
        took.as_secs_f64()
    );
    took
}

// With the default 500 ms step timeout this passed 9 of 10 runs on this 2-core machine, with a
// long tail of recovery (up to 50 s): every saga in flight when a node went timed out, and the
// compensations that doubled the work behind them outgrew what the machine drained while
// orders kept coming. With the 2 s step timeout it still failed about one run in twenty: after
// a node loss a step's batches kept failing on actions already in its ledger (redelivered,
// republished, or arriving after their compensation) and fell to one transaction per message,
// each waiting for the synchronous standby, so the step fell behind its queue for good. A
// failed batch is now done again as a batch, those actions answered from the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_marketplace_survives_losing_broker_nodes_and_its_database_primary() {
    // A fresh cluster: an earlier run may have left a promoted standby behind.
    cluster("down");
    let _teardown = Teardown;
    cluster("up");
    let db_proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], PRIMARY_PORT)))
        .await
        .unwrap();
    let amqp: Vec<String> = NODES
        .iter()
        .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=5", 5680 + n))
        .collect();
    let amqp = amqp.join(",");
    let db = format!("postgres://postgres@127.0.0.1:{}", db_proxy.port());
    let bin = release_bin();
    let m = Marketplace::start_with(
        Mode::Replicas,
        &[
            ("LDT_AMQP_URL", amqp.as_str()),
            ("LDT_DATABASE_URL", db.as_str()),
            ("LDT_QUEUE_TYPE", "quorum"),
            ("LDT_DB_POOL_SIZE", "8"),
            ("LDT_BIN", bin.as_str()),
            // Every order is taken in, however slow the sagas get while a node is lost:
            // load shedding (503 at the door) would hide whether anything else answers 503.
            ("LDT_MAX_PENDING", "1000000"),
            // Enough tokens that most sagas go all the way to delivery.
            ("LDT_INITIAL_STOCK", "1000000"),
            ("LDT_STARTUP_TIMEOUT_S", "60"),
            // A replicated broker's deadline (the prod overlay's too): with the default 500 ms
            // a step, the seconds a node loss costs time out every saga in flight, and their
            // compensations (three commands and three answers each) double the work behind
            // them while orders keep coming at 200/s, so the backlog outgrows what the
            // machine drains and every later order times out too, until the load stops.
            ("LDT_STEP_TIMEOUT_MS", "2000"),
        ],
    )
    .await;
    let api = Api::new(m.base("order"));
    let stream = OrderStream::start(api.clone(), 200, "cluster", true);
    let started = Instant::now();
    let at = |s: u64| async move {
        tokio::time::sleep(
            (started + Duration::from_secs(s)).saturating_duration_since(Instant::now()),
        )
        .await
    };
    let mut times = Vec::new();

    // 1. The node leading the most queues dies.
    at(8).await;
    let counts = leaders(1, &m.namespace);
    let first = counts
        .iter()
        .max_by_key(|(_, c)| **c)
        .map_or(1, |(n, _)| *n);
    println!("cluster: queue leaders {counts:?}; killing {}", node(first));
    kill9(&node_pid(first));
    times.push((
        "RabbitMQ node with the most leaders SIGKILLed",
        recovery(&api, "node killed", 1).await,
    ));

    // 2. It comes back.
    at(20).await;
    cluster("up");
    times.push((
        "the node restarted",
        recovery(&api, "node restarted", 2).await,
    ));

    // 3. Another node dies (the cluster keeps a majority).
    at(30).await;
    let second = NODES.iter().copied().find(|n| *n != first).unwrap();
    let ask = NODES.iter().copied().find(|n| *n != second).unwrap();
    println!(
        "cluster: queue leaders {:?}; killing {}",
        leaders(ask, &m.namespace),
        node(second)
    );
    kill9(&node_pid(second));
    times.push((
        "another RabbitMQ node SIGKILLed",
        recovery(&api, "second node killed", 3).await,
    ));

    // 4. The database primary dies; the standby is promoted and the proxy follows it.
    at(42).await;
    let version = pg_version();
    let postmaster = std::fs::read_to_string(format!(
        "/var/lib/postgresql/{version}/ldt_primary/postmaster.pid"
    ))
    .unwrap();
    let before_failover = stream.answers();
    assert_eq!(
        before_failover.get(&503),
        None,
        "503s while the database was up: {before_failover:?}"
    );
    let killed = Instant::now();
    kill9(postmaster.lines().next().unwrap().trim());
    let promoted = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            "ldt_standby",
            "promote",
        ])
        .status()
        .unwrap();
    assert!(promoted.success(), "pg_ctlcluster promote");
    eventually(Duration::from_secs(30), "the standby promoted", || async {
        (postgres(STANDBY_PORT, "SELECT pg_is_in_recovery()").as_deref() == Some("f")).then_some(())
    })
    .await
    .unwrap();
    db_proxy.retarget(SocketAddr::from(([127, 0, 0, 1], STANDBY_PORT)));
    db_proxy.cut();
    let without_primary = killed.elapsed();
    println!(
        "cluster: no primary for {:.1} s (kill, promote, switch)",
        without_primary.as_secs_f64()
    );
    times.push((
        "PostgreSQL primary SIGKILLed, standby promoted",
        recovery(&api, "failover", 4).await,
    ));
    // Connections to the dead primary still in the pools fail on their next use: a few
    // seconds' grace, then no more 503s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_failover = stream.answers();
    let window = killed.elapsed();

    // The rest of the minute under load, then the books.
    at(60).await;
    let answers = stream.answers();
    let (accepted, refused) = stream.finish().await;
    println!(
        "cluster: {} orders accepted; answers by status {answers:?}; every 503 within {:.1} s \
         of the primary's loss",
        accepted.len(),
        window.as_secs_f64()
    );
    assert_eq!(
        answers.get(&503),
        after_failover.get(&503),
        "503s after the failover was over: {answers:?}"
    );
    assert!(refused.is_empty(), "orders refused for good: {refused:?}");
    assert_eq!(
        answers.get(&500),
        None,
        "a 500 from the order API: {answers:?}"
    );
    for status in answers.keys() {
        assert!(
            matches!(status, 200 | 202 | 503 | 0),
            "unexpected answer {status}: {answers:?}"
        );
    }
    let endpoints = Endpoints {
        order: m.base("order").to_owned(),
        payment: m.base("payment").to_owned(),
        inventory: m.base("inventory").to_owned(),
        delivery: m.base("delivery").to_owned(),
        dead_letter: m.base("dead-letter").to_owned(),
    };
    let checker = Checker::new(endpoints, 500);
    let orders = checker
        .wait_all_final(Duration::from_secs(120))
        .await
        .unwrap();
    let report = checker.check(&orders, Some(&accepted)).await.unwrap();
    for v in &report.verdicts {
        println!("cluster: {v}");
    }
    assert!(report.ok(), "{:?}", report.by_status);
    for (what, took) in &times {
        println!(
            "cluster: recovered from {what} in {:.1} s",
            took.as_secs_f64()
        );
    }
}
