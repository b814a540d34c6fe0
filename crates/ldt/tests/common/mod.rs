//! Test harness: `spawn_app()` starts the chosen services in this process on port 0, in a
//! fresh namespace (their own databases and queues on the real PostgreSQL and RabbitMQ), and
//! purges the namespace when the test is done. `spawn_on(Stack::Embedded, …)` starts them on
//! the embedded stack instead (SQLite files and the in-process bus, in a fresh directory):
//! the suites that run on both are the store conformance suite.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

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

/// The sum of a counter's series whose labels include `label`, in a Prometheus exposition.
pub fn counter(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
    /// Stops the services gracefully (the databases and queues stay until drop).
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
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
        use ldt_testkit::client::TestApi as _;
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl ldt_testkit::client::TestApi for TestApp {
    fn http(&self) -> &reqwest::Client {
        &self.client
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

/// Plays the other services on the bus: publishes their messages to a service under test
/// and reads what it sends them.
pub struct Driver {
    pub bus: ldt_runtime::bus::Bus,
    pub queues: ldt_contract::Queues,
    /// The orchestrator's queue, when the driver plays the orchestrator.
    answers: Option<ldt_runtime::bus::Subscription>,
}

impl Driver {
    pub fn new(app: &TestApp) -> Driver {
        Driver {
            bus: app.bus.clone(),
            queues: ldt_contract::Queues::new(&app.settings.namespace),
            answers: None,
        }
    }

    /// A driver that plays the orchestrator: the step services' answers come to it.
    pub async fn orchestrator(app: &TestApp) -> Driver {
        let mut driver = Driver::new(app);
        driver.answers = Some(driver.listen(Service::Orchestrator).await);
        driver
    }

    /// Publishes `env` to the service it is for.
    pub async fn send(&self, env: &ldt_contract::Envelope) {
        self.send_raw(env.body.destination(), env.to_json(), &env.id.to_string())
            .await;
    }

    /// Publishes `env` twice in one batch, as a relay that crashed after publishing would.
    pub async fn send_twice(&self, env: &ldt_contract::Envelope) {
        let out = self.outgoing(env.body.destination(), env.to_json(), &env.id.to_string());
        self.bus.publish(&[out.clone(), out]).await.unwrap();
    }

    /// Publishes any bytes to a service's queue, as a broken producer would.
    pub async fn send_raw(&self, to: Service, payload: Vec<u8>, id: &str) {
        let out = self.outgoing(to, payload, id);
        self.bus.publish(&[out]).await.unwrap();
    }

    fn outgoing(&self, to: Service, payload: Vec<u8>, id: &str) -> ldt_runtime::bus::Outgoing {
        ldt_runtime::bus::Outgoing {
            queue: self.queues.of(to),
            message_id: id.to_owned(),
            payload,
            headers: vec![],
        }
    }

    /// Subscribes to a service's queue, to read what the service under test sends it.
    pub async fn listen(&self, service: Service) -> ldt_runtime::bus::Subscription {
        self.bus
            .subscribe(&self.queues.of(service), 100)
            .await
            .unwrap()
    }

    /// The next answer to the orchestrator (see [`Driver::orchestrator`]).
    pub async fn answer(&mut self) -> ldt_contract::Envelope {
        next(
            self.answers
                .as_mut()
                .expect("a driver playing the orchestrator"),
        )
        .await
    }
}

/// The next message on `sub` (acked), within 10 s.
pub async fn next(sub: &mut ldt_runtime::bus::Subscription) -> ldt_contract::Envelope {
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a message within 10 s")
        .unwrap()
        .unwrap();
    msg.ack().await.unwrap();
    ldt_contract::Envelope::from_json(&msg.payload).unwrap()
}

/// The next message on `sub` about `order_id` (acked), within 10 s each: delivery is at
/// least once, and a redelivered message about an earlier order is not the one a test waits
/// for.
pub async fn next_for(
    sub: &mut ldt_runtime::bus::Subscription,
    order_id: &str,
) -> ldt_contract::Envelope {
    loop {
        let env = next(sub).await;
        if env.order_id.to_string() == order_id {
            return env;
        }
    }
}

/// Asserts that nothing comes on `sub` within 300 ms: `what` was not sent (a duplicate, a
/// command sent twice). A wait for an absence, so it can only catch what arrives within it.
pub async fn nothing_comes(sub: &mut ldt_runtime::bus::Subscription, what: &str) {
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "{what}"
    );
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
