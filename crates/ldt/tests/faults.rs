//! The fault matrix, one fault class per test: the marketplace (every service, in this
//! process) talks to the real RabbitMQ and PostgreSQL through TCP proxies that can freeze,
//! stall, cut and slow its connections, while a stream of orders (kill and timeout faults
//! and insufficient funds among them) keeps coming. After each fault:
//!
//! - every accepted order is final, and the four invariants hold (money, stock, delivery,
//!   nothing pending or missing) — no message was dropped;
//! - the marketplace recovered by itself: an order placed when the fault ends is final within
//!   the stated time (printed, for the README's reliability table).
//!
//! These tests disturb the shared broker and database server (a memory alarm, a restart), so
//! they take turns, and they are a test binary of their own (cargo runs binaries one at a
//! time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{ALL, TestApp, amqp_url, database_url, spawn_with};
use ldt_runtime::configuration::Settings;
use ldt_testkit::check::{Checker, Endpoints};
use ldt_testkit::client::{Api, OrderStream, eventually};
use ldt_testkit::proxy::FaultProxy;
use serde_json::json;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The heartbeat of the services' broker connections here: a frozen broker is noticed
/// within two to two and a half of them.
const HEARTBEAT_S: u64 = 2;

/// The marketplace behind its proxies.
struct Rig {
    app: TestApp,
    api: Api,
    broker: FaultProxy,
    db: FaultProxy,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

fn host_port(url: &str, default_port: u16) -> SocketAddr {
    let u = url::Url::parse(url).unwrap();
    let host = u.host_str().unwrap();
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{}", u.port().unwrap_or(default_port))
        .parse()
        .unwrap()
}

/// The same URL at another port.
fn through(url: &str, port: u16) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_host(Some("127.0.0.1")).unwrap();
    u.set_port(Some(port)).unwrap();
    u.to_string()
}

impl Rig {
    async fn start(extra: &[&str]) -> Rig {
        let turn = SERIAL.lock().await;
        // `LDT_TEST_LOG=1`: the marketplace's log on stderr (with --nocapture).
        if std::env::var_os("LDT_TEST_LOG").is_some() {
            ldt_runtime::telemetry::init_plain(ldt_runtime::telemetry::LogFormat::Text);
        }
        let broker = FaultProxy::start(host_port(&amqp_url(), 5672))
            .await
            .unwrap();
        let db = FaultProxy::start(host_port(&database_url(), 5432))
            .await
            .unwrap();
        let mut amqp = through(&amqp_url(), broker.port());
        amqp.push_str(&format!(
            "{}heartbeat={HEARTBEAT_S}",
            if amqp.contains('?') { "&" } else { "?" }
        ));
        let pg = through(&database_url(), db.port());
        let namespace = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut args = vec![
            "ldt",
            "--amqp-url",
            &amqp,
            "--database-url",
            &pg,
            "--http-addr",
            "127.0.0.1:0",
            "--namespace",
            &namespace,
            "--startup-timeout-s",
            "20",
            "--queue-expires-ms",
            "600000",
            "--step-timeout-ms",
            "1000",
            "--db-pool-size",
            "6",
        ];
        args.extend_from_slice(extra);
        let settings = Settings::try_parse_from(args).unwrap();
        let mut direct = settings.clone();
        direct.amqp_url = Some(amqp_url());
        direct.database_url = Some(database_url());
        let mut app = spawn_with(&ALL, settings).await;
        app.cleanup = Some(direct);
        let api = Api::new(&app.base);
        Rig {
            app,
            api,
            broker,
            db,
            _turn: turn,
        }
    }

    /// Runs `fault` while orders flow (20 a second), then measures how long an order placed
    /// when the fault is over takes to be final (at most `bound`), and checks the invariants
    /// over every order. Returns the recovery time.
    async fn survive(&self, fault: impl Future<Output = ()>, bound: Duration) -> Duration {
        let prefix = format!("f{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
        let stream = OrderStream::start(self.api.clone(), 20, &prefix, true);
        // Load first, then the fault.
        let warm = eventually(Duration::from_secs(20), "orders flowing", || async {
            let (_, page) = self.api.get("/api/v1/orders?limit=20").await?;
            (page["orders"].as_array()?.len() >= 10).then_some(())
        })
        .await;
        warm.unwrap();
        fault.await;
        let ended = Instant::now();
        let probe = self
            .api
            .place(
                &json!({"username": format!("{prefix}-probe"), "price": 1, "amount": 1}),
                &format!("{prefix}-probe"),
                bound,
            )
            .await
            .unwrap_or_else(|e| {
                panic!("no order accepted within {bound:?} of the fault's end: {e}")
            });
        let status = self
            .api
            .wait_final(&probe, bound.saturating_sub(ended.elapsed()))
            .await
            .unwrap_or_else(|e| panic!("not recovered within {bound:?}: {e}"));
        let recovered = ended.elapsed();
        assert_eq!(status, "SUCCESS", "the probe order after the fault");
        let (accepted, refused) = stream.finish().await;
        assert!(refused.is_empty(), "orders refused for good: {refused:?}");
        assert!(
            accepted.len() >= 10,
            "only {} orders accepted",
            accepted.len()
        );
        self.check(&accepted).await;
        recovered
    }

    /// Every accepted order final, the four invariants.
    async fn check(&self, accepted: &BTreeSet<String>) {
        let checker = Checker::new(Endpoints::single(&self.app.base), 500);
        let orders = checker
            .wait_all_final(Duration::from_secs(60))
            .await
            .unwrap();
        let report = checker.check(&orders, Some(accepted)).await.unwrap();
        for v in &report.verdicts {
            assert!(v.ok, "{v}\n{:?}", report.by_status);
        }
    }
}

fn report(fault: &str, recovered: Duration) {
    println!(
        "fault {fault}: recovered in {:.1} s",
        recovered.as_secs_f64()
    );
}

/// The broker stops answering without closing anything (a frozen VM, a partition): lapin
/// notices the missing heartbeats, the connections are dropped and made again once the
/// broker answers; what was published and not confirmed stays in the outboxes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_broker() {
    let rig = Rig::start(&[]).await;
    let recovered = rig
        .survive(
            async {
                let frozen = Instant::now();
                rig.broker.pause();
                // Found out by the missing heartbeats, while publishes are stuck in the socket.
                let noticed = eventually(
                    Duration::from_secs(4 * HEARTBEAT_S),
                    "a dead broker noticed",
                    || async {
                        let (status, _) = rig.api.ready().await?;
                        (status == 503).then(|| frozen.elapsed())
                    },
                )
                .await
                .unwrap();
                println!("frozen broker noticed after {:.1} s", noticed.as_secs_f64());
                assert!(
                    noticed <= Duration::from_millis(2_500 * HEARTBEAT_S + 500),
                    "noticed after {noticed:?}: more than 2.5 heartbeats"
                );
                tokio::time::sleep(
                    (frozen + Duration::from_secs(4 * HEARTBEAT_S))
                        .saturating_duration_since(Instant::now()),
                )
                .await;
                rig.broker.resume();
            },
            Duration::from_secs(30),
        )
        .await;
    report("frozen broker (4 heartbeats)", recovered);
}

/// The broker connections stall (writes fill the socket buffers) and are then cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_then_cut_broker_connections() {
    let rig = Rig::start(&[]).await;
    let recovered = rig
        .survive(
            async {
                rig.broker.pause();
                tokio::time::sleep(Duration::from_secs(5)).await;
                rig.broker.cut();
                rig.broker.resume();
            },
            Duration::from_secs(30),
        )
        .await;
    report("broker connections stalled 5 s, then cut", recovered);
}

/// The database connections stall and are then cut: transactions fail and are retried, the
/// pools make new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_then_cut_database_connections() {
    let rig = Rig::start(&[]).await;
    let recovered = rig
        .survive(
            async {
                rig.db.pause();
                tokio::time::sleep(Duration::from_secs(5)).await;
                rig.db.cut();
                rig.db.resume();
            },
            Duration::from_secs(30),
        )
        .await;
    report("database connections stalled 5 s, then cut", recovered);
}

/// Puts the broker's memory watermark back when dropped, whatever happened.
struct Watermark(String);

impl Watermark {
    fn alarm() -> Watermark {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .output()
            .expect("rabbitmqctl runs");
        let was = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let was = if was.parse::<f64>().is_ok() {
            was
        } else {
            "0.4".into()
        };
        set_watermark("0.00001");
        Watermark(was)
    }
}

fn set_watermark(value: &str) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(["set_vm_memory_high_watermark", value])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl runs");
    assert!(
        status.success(),
        "rabbitmqctl set_vm_memory_high_watermark {value}"
    );
}

impl Drop for Watermark {
    fn drop(&mut self) {
        set_watermark(&self.0);
    }
}

/// A memory alarm: the broker blocks every connection that publishes. The services' consumers
/// have a connection of their own, so acks keep flowing; publishes fail at once with the
/// broker's reason (the outboxes keep the rows), and `/readyz` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_memory_alarm() {
    let rig = Rig::start(&[]).await;
    let recovered = rig
        .survive(
            async {
                let alarm = Watermark::alarm();
                let why = eventually(Duration::from_secs(15), "/readyz to say why", || async {
                    let (status, body) = rig.api.ready().await?;
                    (status == 503 && body.to_string().contains("blocks publishing"))
                        .then_some(body)
                })
                .await
                .unwrap();
                println!("readyz during the alarm: {why}");
                tokio::time::sleep(Duration::from_secs(5)).await;
                drop(alarm);
            },
            Duration::from_secs(30),
        )
        .await;
    report("broker memory alarm", recovered);
    let (status, body) = rig.api.ready().await.unwrap();
    assert_eq!(status, 200, "{body}");
}

fn postgres(sql: &str) {
    let status = std::process::Command::new("psql")
        .args([&database_url(), "-qAtc", sql])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("psql runs");
    assert!(status.success(), "psql -c {sql}");
}

/// Every database connection of the marketplace is ended by the server
/// (`pg_terminate_backend`), twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_backends_terminated() {
    let rig = Rig::start(&[]).await;
    let ns = rig.app.settings.namespace.clone();
    let recovered = rig
        .survive(
            async {
                for _ in 0..2 {
                    postgres(&format!(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE datname LIKE '{ns}\\_%'"
                    ));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            Duration::from_secs(30),
        )
        .await;
    report("database backends terminated", recovered);
}

/// The database server restarts (every connection ends; new ones are refused a moment).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart() {
    let rig = Rig::start(&[]).await;
    let recovered = rig
        .survive(
            async {
                let version = std::fs::read_dir("/etc/postgresql")
                    .ok()
                    .and_then(|mut d| d.next())
                    .and_then(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .unwrap_or_else(|| "15".into());
                let status = tokio::process::Command::new("pg_ctlcluster")
                    .args(["--skip-systemctl-redirect", &version, "main", "restart"])
                    .status()
                    .await
                    .expect("pg_ctlcluster runs");
                assert!(status.success(), "pg_ctlcluster restart");
            },
            Duration::from_secs(45),
        )
        .await;
    report("database restart", recovered);
}

/// A work queue is deleted under load: what was in it is lost to the broker (those sagas'
/// deadlines pass and they are compensated), publishes to it come back unroutable and stay
/// in the outboxes, and the queue is declared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_deleted_under_load() {
    let rig = Rig::start(&[]).await;
    let queue = format!("{}.inventory", rig.app.settings.namespace);
    let recovered = rig
        .survive(
            async {
                let bus = ldt_runtime::bus::Bus::amqp(&amqp_url(), Vec::new(), None)
                    .await
                    .unwrap();
                bus.delete_queues(std::slice::from_ref(&queue))
                    .await
                    .unwrap();
            },
            Duration::from_secs(30),
        )
        .await;
    report("a queue deleted under load", recovered);
}

/// 50 ms ± 20 ms on every broker connection, the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latency_on_every_broker_connection() {
    let rig = Rig::start(&[]).await;
    rig.broker
        .set_latency(Duration::from_millis(50), Duration::from_millis(20));
    let recovered = rig
        .survive(
            tokio::time::sleep(Duration::from_secs(5)),
            Duration::from_secs(30),
        )
        .await;
    report("50 ± 20 ms of broker latency", recovered);
}
