//! Black-box end-to-end harness for the Late-Day Tokens Marketplace.
//!
//! It knows nothing of the services' code: it talks HTTP to a marketplace (and, for the
//! poison-message case only, drops a raw message on the broker the way a buggy producer
//! would). With `E2E_BASE_URL` set it tests that running marketplace; otherwise it starts the
//! `ldt` binary itself — `ldt up`, or one `ldt serve <service>` process per service — in a
//! fresh namespace on the local RabbitMQ and PostgreSQL, and purges that namespace after.
//!
//! Settings: `E2E_BASE_URL` (an external marketplace; its namespace in `E2E_NAMESPACE`,
//! default `ldt`), `LDT_BIN` (the binary; default: `ldt` next to the test executable's
//! target directory), `LDT_AMQP_URL`, `LDT_DATABASE_URL` (passed through to the processes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod scenarios;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How the marketplace under test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `ldt up`: every service in one process.
    Up,
    /// `ldt serve <service>`: one process per service.
    Split,
    /// Two `ldt serve <service>` processes of every service, competing for the same queues
    /// (requests go to the first of each pair; both consume).
    Replicas,
}

pub const SERVICES: [&str; 6] = [
    "order",
    "orchestrator",
    "payment",
    "inventory",
    "delivery",
    "dead-letter",
];

/// Which service answers a path (what the Traefik ingress does in Kubernetes).
fn owner(path: &str) -> &'static str {
    let p = path.trim_start_matches('/');
    if p.starts_with("api/v1/sagas") {
        "orchestrator"
    } else if p.starts_with("api/v1/users") {
        "payment"
    } else if p.starts_with("api/v1/inventory") {
        "inventory"
    } else if p.starts_with("api/v1/deliveries") {
        "delivery"
    } else if p.starts_with("api/v1/dead-letters") {
        "dead-letter"
    } else {
        "order"
    }
}

pub struct Marketplace {
    pub mode: Mode,
    pub namespace: String,
    pub amqp_url: String,
    pub client: reqwest::Client,
    /// Base URL per service (all the same in `up` mode or against an external marketplace).
    bases: BTreeMap<&'static str, String>,
    children: Vec<Child>,
    owned: bool,
}

/// The `ldt` binary under test.
pub fn ldt_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("LDT_BIN") {
        return PathBuf::from(bin);
    }
    // target/<profile>/deps/e2e-… → target/<profile>/ldt
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("ldt")
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

impl Marketplace {
    /// The marketplace to test: the external one, or a fresh one in `mode`.
    pub async fn start(mode: Mode) -> Marketplace {
        Self::start_with(mode, &[]).await
    }

    /// Like [`start`](Self::start), with extra environment for the processes (ignored for an
    /// external marketplace).
    pub async fn start_with(mode: Mode, env: &[(&str, &str)]) -> Marketplace {
        let amqp_url = env_or("LDT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        if let Ok(base) = std::env::var("E2E_BASE_URL") {
            let base = base.trim_end_matches('/').to_owned();
            return Marketplace {
                mode,
                namespace: env_or("E2E_NAMESPACE", "ldt"),
                amqp_url,
                client,
                bases: SERVICES.iter().map(|s| (*s, base.clone())).collect(),
                children: Vec::new(),
                owned: false,
            };
        }
        let namespace = format!("e2e_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let bin = ldt_bin();
        assert!(
            bin.exists(),
            "the ldt binary is not at {} (build it with `cargo build --bin ldt`, or set LDT_BIN)",
            bin.display()
        );
        let groups: Vec<Vec<&'static str>> = match mode {
            Mode::Up => vec![vec![]],
            Mode::Split => SERVICES.iter().map(|s| vec![*s]).collect(),
            Mode::Replicas => SERVICES
                .iter()
                .chain(SERVICES.iter())
                .map(|s| vec![*s])
                .collect(),
        };
        // PostgreSQL allows 100 connections in all; tests run two marketplaces at a time.
        let pool = match mode {
            Mode::Up => "8",
            Mode::Split => "4",
            Mode::Replicas => "2",
        };
        let mut market = Marketplace {
            mode,
            namespace: namespace.clone(),
            amqp_url,
            client,
            bases: BTreeMap::new(),
            children: Vec::new(),
            owned: true,
        };
        let mut pending = Vec::new();
        for group in groups {
            let mut cmd = Command::new(&bin);
            if group.is_empty() {
                cmd.arg("up");
            } else {
                cmd.arg("serve").args(&group);
            }
            cmd.env("LDT_NAMESPACE", &namespace)
                .env("LDT_HTTP_ADDR", "127.0.0.1:0")
                .env("LDT_QUEUE_EXPIRES_MS", "600000")
                .env("LDT_DB_POOL_SIZE", pool)
                .env("RUST_LOG", env_or("E2E_LOG", "warn"))
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let mut child = cmd.spawn().expect("ldt starts");
            let stdout = child.stdout.take().unwrap();
            market.children.push(child);
            pending.push((group, stdout));
        }
        for (group, stdout) in pending {
            let mut lines = BufReader::new(stdout).lines();
            let base = tokio::time::timeout(Duration::from_secs(60), async {
                while let Some(line) = lines.next_line().await.unwrap() {
                    if let Some(rest) = line.strip_prefix("ldt ready: ") {
                        return rest.trim_end_matches("/docs").to_owned();
                    }
                }
                panic!("ldt exited before it was ready (see its log above)");
            })
            .await
            .expect("ldt ready within 60 s");
            // Keep draining stdout so the process never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            if group.is_empty() {
                for s in SERVICES {
                    market.bases.insert(s, base.clone());
                }
            } else {
                market.bases.entry(group[0]).or_insert(base);
            }
        }
        market
    }

    /// The base URL of one service's API.
    pub fn base(&self, service: &str) -> &str {
        &self.bases[service]
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.bases[owner(path)], path)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Legacy purchase; returns the new order's id.
    pub async fn purchase(&self, body: &Value) -> String {
        let (status, order) = self.post("/api/purchase/", body).await;
        assert_eq!(status, 200, "POST /api/purchase/ {body}: {order}");
        order["id"].as_str().unwrap().to_owned()
    }

    /// Polls the order until it is final; panics after `within`.
    pub async fn wait_final(&self, id: &str, within: Duration) -> Value {
        let started = Instant::now();
        loop {
            let (status, order) = self.get(&format!("/api/v1/orders/{id}")).await;
            assert_eq!(status, 200, "{order}");
            if order["status"] != "PENDING" {
                return order;
            }
            assert!(
                started.elapsed() < within,
                "order {id} still PENDING after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A user's credits; `None` for a user never seen.
    pub async fn credits(&self, user: &str) -> Option<i64> {
        let (status, body) = self.get(&format!("/api/v1/users/{user}")).await;
        match status {
            200 => Some(body["credits"].as_i64().unwrap()),
            404 => None,
            other => panic!("GET /api/v1/users/{user}: {other} {body}"),
        }
    }

    pub async fn stock(&self) -> i64 {
        let (status, body) = self.get("/api/v1/inventory").await;
        assert_eq!(status, 200, "{body}");
        body["available"].as_i64().unwrap()
    }

    /// Order ids of the user's active (DELIVERED) deliveries.
    pub async fn active_deliveries(&self, user: &str) -> Vec<String> {
        let (status, body) = self
            .get(&format!("/api/v1/deliveries?username={user}"))
            .await;
        assert_eq!(status, 200, "{body}");
        body.as_array()
            .unwrap()
            .iter()
            .filter(|d| d["status"] == "DELIVERED")
            .map(|d| d["order_id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Drops a raw message on one of the marketplace's queues, as a broken producer would.
    pub async fn publish_raw(&self, service: &str, message_id: &str, payload: &[u8]) {
        use lapin::options::BasicPublishOptions;
        use lapin::{BasicProperties, Connection, ConnectionProperties};
        let conn = Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        let queue = format!("{}.{}", self.namespace, service);
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                payload,
                BasicProperties::default().with_message_id(message_id.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        let _ = conn.close(200, "done".into()).await;
    }

    /// Polls `check` until it returns `Some`, or panics after `within`.
    pub async fn eventually<T, F, Fut>(&self, within: Duration, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let started = Instant::now();
        loop {
            if let Some(v) = check().await {
                return v;
            }
            assert!(started.elapsed() < within, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Marketplace {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        // Purge the namespace with the binary itself: this package knows no SQL.
        let purged = std::process::Command::new(ldt_bin())
            .args(["purge", "--yes", "--namespace", &self.namespace])
            .stdout(Stdio::null())
            .status();
        if !matches!(purged, Ok(s) if s.success()) {
            eprintln!(
                "e2e: purging namespace {} failed: {purged:?}",
                self.namespace
            );
        }
    }
}

/// A unique username.
pub fn user(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Defines the suite's tests for one mode.
#[macro_export]
macro_rules! suite {
    ($mode:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn legacy_contract_statuses_and_books() {
            $crate::scenarios::legacy_contract(&$crate::Marketplace::start($mode).await).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn legacy_timing_on_an_idle_marketplace() {
            $crate::scenarios::legacy_timing(&$crate::Marketplace::start($mode).await).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_orders_never_overdraw_or_oversell() {
            $crate::scenarios::concurrency(&$crate::Marketplace::start($mode).await).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_stalled_step_holds_up_nobody_and_its_late_effect_is_undone() {
            $crate::scenarios::stalled_step(&$crate::Marketplace::start($mode).await).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn poison_messages_are_parked_and_the_service_keeps_working() {
            $crate::scenarios::poison(&$crate::Marketplace::start($mode).await).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn bad_input_is_rejected_and_changes_nothing() {
            $crate::scenarios::bad_input(&$crate::Marketplace::start($mode).await).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn v1_api_docs_and_health() {
            $crate::scenarios::v1_api(&$crate::Marketplace::start($mode).await).await;
        }
    };
}
