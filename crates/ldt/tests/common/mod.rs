//! Test harness: `spawn_app()` starts the chosen services in this process on port 0, in a
//! fresh namespace (their own databases and queues on the real PostgreSQL and RabbitMQ), and
//! purges the namespace when the test is done. `spawn_on(Stack::Embedded, …)` starts them on
//! the embedded stack instead (SQLite files and the in-process bus, in a fresh directory):
//! the suites that run on both are the store conformance suite.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use ldt::startup::Application;
use ldt_contract::Service;
use ldt_runtime::configuration::Settings;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestApp {
    pub base: String,
    pub settings: Settings,
    /// The services' own bus, to talk to them the way other services do.
    pub bus: ldt_runtime::bus::Bus,
    pub client: reqwest::Client,
    /// What the clean-up purges with, when not `settings` (a test that reaches the servers
    /// through a proxy purges directly).
    pub cleanup: Option<Settings>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The real RabbitMQ and PostgreSQL these tests run against.
pub fn amqp_url() -> String {
    std::env::var("LDT_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn database_url() -> String {
    std::env::var("LDT_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// What the services run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// The real RabbitMQ and PostgreSQL.
    Servers,
    /// SQLite files and the in-process bus (`ldt up` with nothing configured).
    Embedded,
}

pub fn test_settings(extra: &[&str]) -> Settings {
    settings_on(Stack::Servers, extra)
}

pub fn settings_on(stack: Stack, extra: &[&str]) -> Settings {
    let namespace = format!("t_{}", uuid::Uuid::new_v4().simple());
    let (amqp, db) = (amqp_url(), database_url());
    let dir = std::env::temp_dir()
        .join(format!("ldt-test-{namespace}"))
        .display()
        .to_string();
    let mut args = vec!["ldt"];
    match stack {
        Stack::Servers => args.extend(["--amqp-url", &amqp, "--database-url", &db]),
        Stack::Embedded => args.extend(["--data-dir", &dir]),
    }
    args.extend([
        "--http-addr",
        "127.0.0.1:0",
        "--namespace",
        &namespace,
        "--startup-timeout-s",
        "10",
        "--queue-expires-ms",
        "600000",
    ]);
    args.extend_from_slice(extra);
    Settings::try_parse_from(args).expect("test settings parse")
}

pub async fn spawn_app(services: &[Service], extra: &[&str]) -> TestApp {
    spawn_with(services, test_settings(extra)).await
}

pub async fn spawn_on(stack: Stack, services: &[Service], extra: &[&str]) -> TestApp {
    spawn_with(services, settings_on(stack, extra)).await
}

pub async fn spawn_with(services: &[Service], settings: Settings) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = Application::build(services, settings.clone(), listener)
        .await
        .expect("marketplace starts against the local RabbitMQ and PostgreSQL");
    let addr = app.local_addr().unwrap();
    let bus = app.bus();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    TestApp {
        base: format!("http://{addr}"),
        settings,
        bus,
        client: reqwest::Client::new(),
        cleanup: None,
        stop: Some(stop),
        server: Some(server),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Stops the services gracefully (the databases and queues stay until drop).
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }

    pub async fn purchase(&self, body: Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url("/api/purchase/"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Places an order through the legacy API and returns its id.
    pub async fn order(&self, body: Value) -> String {
        let (status, order) = self.purchase(body).await;
        assert_eq!(status, 200, "{order}");
        order["id"].as_str().unwrap().to_owned()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
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

    pub async fn status_of(&self, body: Value) -> String {
        let id = self.order(body).await;
        let order = self.wait_final(&id, Duration::from_secs(10)).await;
        order["status"].as_str().unwrap().to_owned()
    }

    /// Credits of a user; `None` if never seen.
    pub async fn credits(&self, user: &str) -> Option<i64> {
        let (status, body) = self.get(&format!("/api/v1/users/{user}")).await;
        match status {
            200 => Some(body["credits"].as_i64().unwrap()),
            404 => None,
            other => panic!("GET user: {other} {body}"),
        }
    }

    pub async fn stock(&self) -> i64 {
        let (status, body) = self.get("/api/v1/inventory").await;
        assert_eq!(status, 200, "{body}");
        body["available"].as_i64().unwrap()
    }

    /// Deliveries of a user that are active (DELIVERED).
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

    pub async fn dead_letters(&self) -> Vec<Value> {
        let (status, body) = self.get("/api/v1/dead-letters").await;
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().clone()
    }

    /// A connection pool on a service's own database, for a test that must do what the API
    /// refuses (break the data, to see the marketplace cope).
    pub async fn db(&self, service: Service) -> ldt_runtime::db::Pool {
        ldt_runtime::db::open(
            &self.settings.backend(),
            &self.settings.database_name(service),
            ldt::services::migrators(service),
            1,
        )
        .await
        .unwrap()
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// POSTs `body` (JSON) and returns the status and the body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
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

/// A unique username for one test.
pub fn user(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

pub fn order_body(username: &str, price: i64, amount: i64) -> Value {
    json!({"username": username, "price": price, "amount": amount})
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let settings = self
            .cleanup
            .clone()
            .unwrap_or_else(|| self.settings.clone());
        clean_up(async move {
            // Give the stopped services a moment to release their connections.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Err(e) = ldt_runtime::namespace::purge(&settings).await {
                eprintln!(
                    "purging test namespace {} failed: {e:#}",
                    settings.namespace
                );
            }
            if settings.uses_data_dir() {
                let _ = std::fs::remove_dir_all(&settings.data_dir);
            }
        });
    }
}

/// Runs async clean-up from a `Drop`, which runs inside the test's runtime: on a thread with
/// a runtime of its own, waiting for it to finish.
pub fn clean_up(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work);
    })
    .join();
}

/// Runs each named scenario (an `async fn(Stack)`) on the real servers and on the embedded
/// stack, as `<scenario>::servers` and `<scenario>::embedded`.
#[macro_export]
macro_rules! on_every_stack {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn servers() {
                    super::$scenario(super::common::Stack::Servers).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    super::$scenario(super::common::Stack::Embedded).await;
                }
            }
        )*
    };
}

/// Services every full-marketplace test runs.
pub const ALL: [Service; 6] = Service::ALL;
