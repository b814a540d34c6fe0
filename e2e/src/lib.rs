//! Black-box end-to-end harness for the Late-Day Tokens Marketplace.
//!
//! It knows nothing of the services' code: it talks HTTP to a marketplace (and, for the
//! poison-message case only, drops a raw message on the broker the way a buggy producer
//! would). With `E2E_BASE_URL` set it tests that running marketplace; otherwise it starts the
//! `ldt` binary itself — `ldt up`, or one `ldt serve <service>` process per service — in a
//! fresh namespace on the local RabbitMQ and PostgreSQL, or embedded (SQLite files in a
//! fresh directory and the in-process bus), and purges that namespace after.
//!
//! Settings: `E2E_BASE_URL` (an external marketplace; its namespace in `E2E_NAMESPACE`,
//! default `ldt`), `LDT_BIN` (the binary; default: `ldt` next to the test executable's
//! target directory), `LDT_AMQP_URL`, `LDT_DATABASE_URL` (passed through to the processes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod scenarios;

pub use ldt_testkit::client::TestApi;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How the marketplace under test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `ldt up` on RabbitMQ and PostgreSQL: every service in one process.
    Up,
    /// `ldt serve <service>`: one process per service.
    Split,
    /// Two `ldt serve <service>` processes of every service, competing for the same queues
    /// (requests go to the first of each pair; both consume).
    Replicas,
    /// `ldt up` with nothing configured: SQLite files and the in-process bus.
    Embedded,
    /// `ldt up` on RabbitMQ with SQLite files.
    BrokerWithSqlite,
    /// `ldt up` on PostgreSQL with the in-process bus.
    PostgresWithEmbeddedBus,
}

impl Mode {
    /// Whether the marketplace talks over RabbitMQ (so a raw message can be dropped on it).
    pub fn has_broker(self) -> bool {
        !matches!(self, Mode::Embedded | Mode::PostgresWithEmbeddedBus)
    }

    fn has_postgres(self) -> bool {
        !matches!(self, Mode::Embedded | Mode::BrokerWithSqlite)
    }

    /// Whether its processes keep files in a data directory.
    fn has_data_dir(self) -> bool {
        !self.has_broker() || !self.has_postgres()
    }
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
    /// The processes' environment (`None`: removed).
    env: Vec<(String, Option<String>)>,
    /// The `ldt` binary the processes run.
    bin: PathBuf,
    owned: bool,
}

/// Waits for `ldt ready: <url>/ (console), …` on the process's stdout and returns the base URL; keeps
/// draining stdout after that so the process never blocks on a full pipe.
async fn ready(stdout: tokio::process::ChildStdout) -> String {
    let mut lines = BufReader::new(stdout).lines();
    let base = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("ldt ready: ") {
                let first = rest.split_whitespace().next().unwrap_or(rest);
                return first.trim_end_matches('/').to_owned();
            }
        }
        panic!("ldt exited before it was ready (see its log above)");
    })
    .await
    .expect("ldt ready within 60 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    base
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
                env: Vec::new(),
                bin: ldt_bin(),
                owned: false,
            };
        }
        let namespace = format!("e2e_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        // `LDT_BIN` among `env` picks the binary for this marketplace alone.
        let bin = env
            .iter()
            .find(|(k, _)| *k == "LDT_BIN")
            .map_or_else(ldt_bin, |(_, v)| PathBuf::from(v));
        assert!(
            bin.exists(),
            "the ldt binary is not at {} (build it with `cargo build --bin ldt`, or set LDT_BIN)",
            bin.display()
        );
        // PostgreSQL allows 100 connections in all; tests run two marketplaces at a time.
        let pool = match mode {
            Mode::Split => "4",
            Mode::Replicas => "2",
            _ => "8",
        };
        let mut vars: Vec<(String, Option<String>)> = vec![
            ("LDT_NAMESPACE".into(), Some(namespace.clone())),
            ("LDT_HTTP_ADDR".into(), Some("127.0.0.1:0".into())),
            ("LDT_QUEUE_EXPIRES_MS".into(), Some("600000".into())),
            ("LDT_DB_POOL_SIZE".into(), Some(pool.into())),
            ("RUST_LOG".into(), Some(env_or("E2E_LOG", "warn"))),
            // Unset means embedded: never inherit the caller's choice by accident.
            (
                "LDT_AMQP_URL".into(),
                mode.has_broker().then(|| amqp_url.clone()),
            ),
            (
                "LDT_DATABASE_URL".into(),
                mode.has_postgres()
                    .then(|| env_or("LDT_DATABASE_URL", "postgres://postgres@127.0.0.1:5432")),
            ),
            (
                "LDT_DATA_DIR".into(),
                mode.has_data_dir().then(|| {
                    std::env::temp_dir()
                        .join(format!("ldt-{namespace}"))
                        .display()
                        .to_string()
                }),
            ),
            ("LDT_EPHEMERAL".into(), None),
        ];
        vars.extend(
            env.iter()
                .map(|(k, v)| (k.to_string(), Some(v.to_string()))),
        );
        let mut market = Marketplace {
            mode,
            namespace,
            amqp_url,
            client,
            bases: BTreeMap::new(),
            children: Vec::new(),
            env: vars,
            bin,
            owned: true,
        };
        let groups: Vec<Vec<&'static str>> = match mode {
            Mode::Split => SERVICES.iter().map(|s| vec![*s]).collect(),
            Mode::Replicas => SERVICES
                .iter()
                .chain(SERVICES.iter())
                .map(|s| vec![*s])
                .collect(),
            _ => vec![vec![]],
        };
        let mut pending = Vec::new();
        for group in groups {
            let (child, stdout) = market.spawn(&group);
            market.children.push(child);
            pending.push((group, stdout));
        }
        for (group, stdout) in pending {
            let base = ready(stdout).await;
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

    /// Starts `ldt up` (no services named) or `ldt serve <group>` with the marketplace's
    /// environment.
    fn spawn(&self, group: &[&str]) -> (Child, tokio::process::ChildStdout) {
        let mut cmd = Command::new(&self.bin);
        if group.is_empty() {
            cmd.arg("up");
        } else {
            cmd.arg("serve").args(group);
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("ldt starts");
        let stdout = child.stdout.take().unwrap();
        (child, stdout)
    }

    /// The `ldt` binary with this marketplace's environment (same namespace, data directory,
    /// broker and database), to run another command against it.
    pub fn ldt(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.bin);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd
    }

    /// Stops the single `ldt up` process with `signal` (`TERM` or `KILL`), waits for it to
    /// exit, and starts it again on the same data; returns how the old process exited.
    pub async fn restart(&mut self, signal: &str) -> std::process::ExitStatus {
        assert_eq!(self.children.len(), 1, "restart is for `ldt up`");
        let mut old = self.children.remove(0);
        let pid = old.id().expect("the process is running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -s {signal} {pid}");
        let status = tokio::time::timeout(Duration::from_secs(40), old.wait())
            .await
            .expect("ldt exits within 40 s of the signal")
            .unwrap();
        let (child, stdout) = self.spawn(&[]);
        self.children.push(child);
        let base = ready(stdout).await;
        for s in SERVICES {
            self.bases.insert(s, base.clone());
        }
        status
    }

    /// In split mode: one more process of the order service that reaches every other
    /// service (`--service-url`), so that its console and API serve the whole marketplace
    /// from one address; its base URL.
    pub async fn spawn_gateway(&mut self) -> String {
        let urls: Vec<String> = SERVICES
            .iter()
            .filter(|s| **s != "order")
            .map(|s| format!("{s}={}", self.bases[s]))
            .collect();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["serve", "order", "--service-url", &urls.join(",")]);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("ldt starts");
        let stdout = child.stdout.take().unwrap();
        self.children.push(child);
        ready(stdout).await
    }

    /// The base URL of one service's API.
    pub fn base(&self, service: &str) -> &str {
        &self.bases[service]
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
}

impl ldt_testkit::client::TestApi for Marketplace {
    fn http(&self) -> &reqwest::Client {
        &self.client
    }

    /// Where `path` is served: by the service that owns it.
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.bases[owner(path)], path)
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
        // Wait for the processes to be gone: they hold the data directory's lock.
        for child in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(child.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Purge the namespace with the binary itself: this package knows no SQL.
        let mut purge = std::process::Command::new(ldt_bin());
        purge.args(["purge", "--yes"]).stdout(Stdio::null());
        for (k, v) in &self.env {
            match v {
                Some(v) => purge.env(k, v),
                None => purge.env_remove(k),
            };
        }
        let purged = purge.status();
        if !matches!(purged, Ok(s) if s.success()) {
            eprintln!(
                "e2e: purging namespace {} failed: {purged:?}",
                self.namespace
            );
        }
        if let Some((_, Some(dir))) = self.env.iter().find(|(k, _)| k == "LDT_DATA_DIR") {
            let _ = std::fs::remove_dir_all(dir);
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

/// Defines the suite's tests for one mode; `suite!(mode, broker)` adds the poison-message
/// test, which drops a raw message on RabbitMQ.
#[macro_export]
macro_rules! suite {
    ($mode:expr, broker) => {
        $crate::suite!($mode);
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn poison_messages_are_parked_and_the_service_keeps_working() {
            $crate::scenarios::poison(&$crate::Marketplace::start($mode).await).await;
        }
    };
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
        async fn bad_input_is_rejected_and_changes_nothing() {
            $crate::scenarios::bad_input(&$crate::Marketplace::start($mode).await).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn v1_api_docs_and_health() {
            $crate::scenarios::v1_api(&$crate::Marketplace::start($mode).await).await;
        }
    };
}
