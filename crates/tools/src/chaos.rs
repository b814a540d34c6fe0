//! `ldt chaos`: runs the marketplace as one process per service on the real RabbitMQ and
//! PostgreSQL, sends a stream of orders (with kill/timeout faults and insufficient funds and
//! stock), and meanwhile SIGKILLs and restarts service processes, restarts the broker and has
//! the outbox relays publish duplicates. When the stream is over it waits for every order to be
//! final and checks the invariants from the services' own APIs ([`ldt_testkit::check`]).
//!
//! With `--crash-point service.point` one process aborts at that point the first time it gets
//! there and is restarted without it: the deterministic version of a kill in that window.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, Semaphore};

use ldt_contract::{Queues, Service};
use ldt_runtime::bus::{Bus, Outgoing};
use ldt_testkit::check::{Checker, Endpoints, Verdict};
use ldt_testkit::proxy::FaultProxy;

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// Orders to send.
    #[arg(long, default_value_t = 300)]
    pub orders: u64,
    /// Orders per second (open loop).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Distinct users the orders come from.
    #[arg(long, default_value_t = 20)]
    pub users: u64,
    /// SIGKILLs of random service processes during the stream.
    #[arg(long, default_value_t = 5)]
    pub kills: u32,
    /// Broker restarts during the stream.
    #[arg(long, default_value_t = 1)]
    pub broker_restarts: u32,
    /// Shell command that restarts RabbitMQ.
    #[arg(long, default_value = "rabbitmqctl stop_app && rabbitmqctl start_app")]
    pub broker_restart_cmd: String,
    /// Times the broker freezes (stops answering without closing anything) for 20 s.
    #[arg(long, default_value_t = 0, help_heading = "Network and server faults")]
    pub frozen_broker: u32,
    /// Times the services' broker connections stall for 15 s and are then cut.
    #[arg(long, default_value_t = 0, help_heading = "Network and server faults")]
    pub stalled_broker: u32,
    /// Times the services' database connections stall for 15 s and are then cut.
    #[arg(long, default_value_t = 0, help_heading = "Network and server faults")]
    pub stalled_db: u32,
    /// Broker memory alarms of 15 s (the broker blocks every publishing connection).
    #[arg(long, default_value_t = 0, help_heading = "Network and server faults")]
    pub memory_alarms: u32,
    /// PostgreSQL restarts (`--db-restart-cmd`).
    #[arg(long, default_value_t = 0, help_heading = "Network and server faults")]
    pub db_restarts: u32,
    /// Times every database connection of the marketplace is ended by the server
    /// (`pg_terminate_backend`).
    #[arg(long, default_value_t = 0, help_heading = "Network and server faults")]
    pub db_terminations: u32,
    /// Times a work queue is deleted under load.
    #[arg(long, default_value_t = 0, help_heading = "Network and server faults")]
    pub queue_deletions: u32,
    /// 50 ms ± 20 ms on every broker connection, for the whole run.
    #[arg(long, help_heading = "Network and server faults")]
    pub broker_latency: bool,
    /// Every fault class above this many times, and the broker latency.
    #[arg(long, help_heading = "Network and server faults")]
    pub all_faults: Option<u32>,
    /// Shell command that restarts PostgreSQL.
    #[arg(
        long,
        default_value = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n 1) main restart",
        help_heading = "Network and server faults"
    )]
    pub db_restart_cmd: String,
    /// Every Nth message each outbox relay publishes is published twice (0: never).
    #[arg(long, default_value_t = 10)]
    pub duplicate_every: u64,
    /// Arm a crash point in the process of its service (e.g. `payment.after_commit`).
    #[arg(long, value_parser = ldt_runtime::crash::parse)]
    pub crash_point: Option<ldt_runtime::crash::CrashPoint>,
    /// Unparseable messages to drop on the payment queue (they must all end as dead letters);
    /// each is replayed once after it is parked.
    #[arg(long, default_value_t = 0)]
    pub poison: u64,
    /// Database connections per process (PostgreSQL allows 100 by default, all processes
    /// together).
    #[arg(long, default_value_t = 4)]
    pub db_pool_size: u32,
    /// Each step's share of an order's deadline in the processes under test (longer than
    /// the marketplace's default: kills and broker restarts are expected to be survived).
    #[arg(long, default_value_t = 1000)]
    pub step_timeout_ms: u64,
    /// How long to wait for every order to be final after the stream.
    #[arg(long, default_value_t = 180)]
    pub settle_timeout_s: u64,
    /// PRNG seed (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the namespace's databases and queues afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Where the processes' logs go.
    #[arg(long, default_value = "target/chaos-logs")]
    pub log_dir: PathBuf,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "LDT_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// PostgreSQL server URL.
    #[arg(
        long,
        env = "LDT_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432",
        hide_env_values = true
    )]
    pub database_url: String,
}

const INITIAL_CREDITS: i64 = 1_000;
/// Below the most tokens one order may ask for (10^6), so an order for more than the stock
/// is possible (it ends INSUFFICIENT_INVENTORY).
const INITIAL_STOCK: i64 = 900_000;

/// A small deterministic PRNG (xorshift64*): chaos runs are reproducible from their seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Proc {
    service: Service,
    port: u16,
    child: Option<Child>,
    crash_point: Option<String>,
    /// Where this incarnation's lines start in the service's log (the log is appended to).
    log_from: u64,
    /// Times this process exited by itself.
    exits: u32,
}

/// The service processes.
struct Fleet {
    bin: PathBuf,
    /// The broker and database as the services reach them: through the fault proxies.
    amqp_url: String,
    database_url: String,
    namespace: String,
    args: ChaosArgs,
    procs: Vec<Proc>,
    /// Processes that exited by themselves (crash points) and were restarted.
    crashes: u32,
}

/// A free port below Linux's ephemeral range (32768–60999), so that no outgoing connection
/// takes it while a killed process is down and the restarted one can listen on it again.
fn free_port(rng: &mut Rng) -> anyhow::Result<u16> {
    for _ in 0..200 {
        let port = 20_000 + rng.below(12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between 20000 and 32000")
}

impl Fleet {
    fn url(&self, service: Service) -> String {
        let port = self
            .procs
            .iter()
            .find(|p| p.service == service)
            .map(|p| p.port)
            .unwrap_or(0);
        format!("http://127.0.0.1:{port}")
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let p = &mut self.procs[i];
        std::fs::create_dir_all(&self.args.log_dir)?;
        let log_path =
            self.args
                .log_dir
                .join(format!("{}-{}.log", self.namespace, p.service.as_str()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        p.log_from = log.metadata()?.len();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg(p.service.as_str())
            .env("LDT_NAMESPACE", &self.namespace)
            .env("LDT_HTTP_ADDR", format!("127.0.0.1:{}", p.port))
            .env("LDT_AMQP_URL", &self.amqp_url)
            .env("LDT_DATABASE_URL", &self.database_url)
            .env("LDT_INITIAL_CREDITS", INITIAL_CREDITS.to_string())
            .env("LDT_INITIAL_STOCK", INITIAL_STOCK.to_string())
            .env("LDT_STEP_TIMEOUT_MS", self.args.step_timeout_ms.to_string())
            .env("LDT_STARTUP_TIMEOUT_S", "120")
            .env("LDT_DB_POOL_SIZE", self.args.db_pool_size.to_string())
            .env(
                "LDT_CHAOS_DUPLICATE_EVERY",
                self.args.duplicate_every.to_string(),
            )
            .env("RUST_LOG", "info,sqlx=warn,amq_protocol=error")
            .env_remove("LDT_CRASH_POINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if let Some(point) = p.crash_point.take() {
            cmd.env("LDT_CRASH_POINT", point);
        }
        p.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", self.bin.display()))?,
        );
        Ok(())
    }

    async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.procs[i].child.take() {
            let _ = child.start_kill(); // SIGKILL
            let _ = child.wait().await;
        }
    }

    /// Restarts processes that exited on their own (crash points).
    fn reap(&mut self) -> anyhow::Result<()> {
        for i in 0..self.procs.len() {
            let status = match self.procs[i].child.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = status {
                self.crashes += 1;
                let p = &mut self.procs[i];
                p.exits += 1;
                eprintln!(
                    "chaos: {} exited by itself ({status}); restarting it",
                    p.service.as_str()
                );
                // Why, while the log is at hand: an armed crash point is one exit, any more
                // is a fault of its own (the logs go when a clean clone does).
                if p.exits <= 3 {
                    let log = self.args.log_dir.join(format!(
                        "{}-{}.log",
                        self.namespace,
                        p.service.as_str()
                    ));
                    eprintln!("{}", log_tail(&log, p.log_from, 20));
                }
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    async fn stop_all(&mut self) {
        for p in &mut self.procs {
            if let Some(pid) = p.child.as_ref().and_then(|c| c.id()) {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for p in &mut self.procs {
            if let Some(mut child) = p.child.take()
                && tokio::time::timeout(Duration::from_secs(30), child.wait())
                    .await
                    .is_err()
            {
                let _ = child.start_kill();
            }
        }
    }
}

async fn wait_ready(client: &reqwest::Client, base: &str, within: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > within {
            bail!("{base} not ready after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Places one order, retrying with its idempotency key until the order service takes it.
async fn submit(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
    deadline: Instant,
) -> anyhow::Result<String> {
    let mut delay = Duration::from_millis(50);
    loop {
        let result = client
            .post(url)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await;
        match result {
            Ok(resp) if resp.status().is_success() => {
                let order: serde_json::Value = resp.json().await?;
                return order["id"]
                    .as_str()
                    .map(str::to_owned)
                    .context("order without id");
            }
            Ok(resp) if resp.status().is_client_error() => {
                bail!(
                    "order {key} rejected: {} {}",
                    resp.status(),
                    resp.text().await.unwrap_or_default()
                )
            }
            _ if Instant::now() > deadline => bail!("order {key} not accepted before the deadline"),
            _ => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

fn order_body(rng: &mut Rng, users: u64) -> serde_json::Value {
    let username = format!("chaos-user-{}", rng.below(users.max(1)));
    let steps = ["payment", "inventory", "delivery"];
    let r = rng.unit();
    let (price, amount, faults) = if r < 0.08 {
        (2, 1, json!({ steps[rng.below(3) as usize]: "kill" }))
    } else if r < 0.13 {
        (2, 1, json!({ steps[rng.below(3) as usize]: "timeout" }))
    } else if r < 0.18 {
        (INITIAL_CREDITS + 1, 1, json!({}))
    } else if r < 0.22 {
        (0, INITIAL_STOCK + 1, json!({}))
    } else {
        (1 + rng.below(5) as i64, 1 + rng.below(3) as i64, json!({}))
    };
    json!({"username": username, "price": price, "amount": amount, "faults": faults})
}

/// Runs the chaos scenario; `Ok(true)` when every invariant held.
pub async fn run(args: ChaosArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    let seed = args
        .seed
        .unwrap_or_else(|| ldt_runtime::db::now_ms().unsigned_abs() | 1);
    let namespace = format!("chaos_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let bin = std::env::current_exe().context("locating the ldt binary")?;
    eprintln!(
        "chaos: namespace {namespace}, seed {seed}, logs in {}",
        args.log_dir.display()
    );
    let mut procs = Vec::new();
    let mut port_rng = Rng(seed ^ std::process::id() as u64 ^ 0x5DEECE66D);
    for service in Service::ALL {
        let crash_point = args
            .crash_point
            .filter(|c| c.service == service)
            .map(|c| c.to_string());
        procs.push(Proc {
            service,
            port: free_port(&mut port_rng)?,
            child: None,
            crash_point,
            log_from: 0,
            exits: 0,
        });
    }
    let proxies = Proxies::start(&args).await?;
    let fleet = Arc::new(Mutex::new(Fleet {
        bin,
        amqp_url: proxies.amqp_url.clone(),
        database_url: proxies.database_url.clone(),
        namespace: namespace.clone(),
        args: args.clone(),
        procs,
        crashes: 0,
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    {
        let mut f = fleet.lock().await;
        for i in 0..f.procs.len() {
            f.spawn(i)?;
        }
    }
    // Up, restarting any that aborts at an armed crash point meanwhile.
    for s in Service::ALL {
        let started = Instant::now();
        loop {
            let url = fleet.lock().await.url(s);
            if wait_ready(&client, &url, Duration::from_millis(500))
                .await
                .is_ok()
            {
                break;
            }
            fleet.lock().await.reap()?;
            if started.elapsed() > Duration::from_secs(60) {
                bail!("{} not ready after 60 s", s.as_str());
            }
        }
    }
    let order_url = format!("{}/api/v1/orders", fleet.lock().await.url(Service::Order));
    // Stopped by SIGTERM or Ctrl-C, still stop the fleet and purge.
    let outcome = tokio::select! {
        outcome = drive(&args, &fleet, &proxies, &client, &order_url, &namespace, seed, started) => outcome,
        _ = ldt_runtime::signal::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    fleet.lock().await.stop_all().await;
    if !args.keep {
        let mut settings = ldt_runtime::configuration::Settings::try_parse_from([
            "ldt",
            "--namespace",
            &namespace,
        ])?;
        settings.amqp_url = Some(args.amqp_url.clone());
        settings.database_url = Some(args.database_url.clone());
        if let Err(e) = ldt_runtime::namespace::purge(&settings).await {
            eprintln!("chaos: purging {namespace} failed: {e:#}");
        }
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &ChaosArgs,
    fleet: &Arc<Mutex<Fleet>>,
    proxies: &Proxies,
    client: &reqwest::Client,
    order_url: &str,
    namespace: &str,
    seed: u64,
    started: Instant,
) -> anyhow::Result<bool> {
    let mut rng = Rng(seed);
    let queues = Queues::new(namespace);
    if args.poison > 0 {
        let bus = Bus::amqp(&args.amqp_url, Vec::new(), None).await?;
        let batch: Vec<Outgoing> = (0..args.poison)
            .map(|i| Outgoing {
                queue: queues.of(Service::Payment),
                message_id: format!("poison-{i}"),
                payload: format!("{{poison #{i}").into_bytes(),
                headers: Vec::new(),
            })
            .collect();
        bus.publish(&batch).await?;
    }

    // The order stream: open loop at the given rate.
    let stream_len = Duration::from_secs_f64(args.orders as f64 / args.rate.max(0.1));
    let deadline = Instant::now() + stream_len + Duration::from_secs(args.settle_timeout_s);
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let failures = Arc::new(AtomicU64::new(0));
    let inflight = Arc::new(Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    let stream_start = Instant::now();
    let bodies: Vec<serde_json::Value> = (0..args.orders)
        .map(|_| order_body(&mut rng, args.users))
        .collect();
    let stream = {
        let client = client.clone();
        let order_url = order_url.to_owned();
        let accepted = accepted.clone();
        let failures = failures.clone();
        let namespace = namespace.to_owned();
        let rate = args.rate.max(0.1);
        tokio::spawn(async move {
            for (i, body) in bodies.into_iter().enumerate() {
                let due = stream_start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let Ok(permit) = inflight.clone().acquire_owned().await else {
                    break;
                };
                let (client, url, accepted, failures) = (
                    client.clone(),
                    order_url.clone(),
                    accepted.clone(),
                    failures.clone(),
                );
                let key = format!("{namespace}-{i}");
                tasks.spawn(async move {
                    match submit(&client, &url, &key, &body, deadline).await {
                        Ok(id) => {
                            accepted.lock().await.insert(id);
                        }
                        Err(e) => {
                            eprintln!("chaos: {e:#}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    drop(permit);
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };

    // The network and server faults, one after the other from the stream's start on.
    let faults = Faults::plan(args, &mut rng);
    let fault_lane = faults.run(args, proxies, namespace, stream_start);

    // The chaos: kills and broker restarts at random moments of the stream, crash-point reaping.
    let mut events: Vec<(Duration, bool)> = Vec::new();
    for _ in 0..args.kills {
        events.push((stream_len.mul_f64(0.05 + 0.85 * rng.unit()), false));
    }
    for b in 0..args.broker_restarts {
        let at = (f64::from(b) + 0.5) / f64::from(args.broker_restarts);
        events.push((stream_len.mul_f64(0.1 + 0.8 * at), true));
    }
    events.sort_by_key(|e| e.0);
    let (mut kills, mut broker_restarts) = (0u32, 0u32);
    for (at, broker) in events {
        while stream_start.elapsed() < at {
            fleet.lock().await.reap()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if broker {
            let t = Instant::now();
            let status = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&args.broker_restart_cmd)
                .stdout(Stdio::null())
                .status()
                .await?;
            if !status.success() {
                bail!("broker restart command failed: {status}");
            }
            broker_restarts += 1;
            eprintln!("chaos: broker restarted in {:.1?}", t.elapsed());
        } else {
            let mut f = fleet.lock().await;
            let i = rng.below(f.procs.len() as u64) as usize;
            f.kill(i).await;
            kills += 1;
            let down = Duration::from_millis(100 + rng.below(900));
            eprintln!(
                "chaos: SIGKILL {} (down {:?})",
                f.procs[i].service.as_str(),
                down
            );
            drop(f);
            tokio::time::sleep(down).await;
            fleet.lock().await.spawn(i)?;
        }
    }
    tokio::pin!(fault_lane);
    let mut fault_counts = None;
    while !stream.is_finished() || fault_counts.is_none() {
        fleet.lock().await.reap()?;
        tokio::select! {
            counts = &mut fault_lane, if fault_counts.is_none() => fault_counts = Some(counts?),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let fault_counts = fault_counts.unwrap_or_default();
    stream.await?;
    let stream_secs = stream_start.elapsed().as_secs_f64();

    // Every process back up, then every order final.
    {
        let mut f = fleet.lock().await;
        f.reap()?;
        for s in Service::ALL {
            wait_ready(client, &f.url(s), Duration::from_secs(120)).await?;
        }
    }
    let (endpoints, dead_letter_url) = {
        let f = fleet.lock().await;
        (
            Endpoints {
                order: f.url(Service::Order),
                payment: f.url(Service::Payment),
                inventory: f.url(Service::Inventory),
                delivery: f.url(Service::Delivery),
                dead_letter: f.url(Service::DeadLetter),
            },
            f.url(Service::DeadLetter),
        )
    };
    let mut parked = Verdict {
        name: "parked",
        ok: true,
        detail: "no poison sent".into(),
    };
    if args.poison > 0 {
        parked = check_poison(client, &dead_letter_url, args.poison, fleet).await?;
    }
    let checker = Checker::new(endpoints, INITIAL_CREDITS);
    let settle = Instant::now();
    let orders = loop {
        fleet.lock().await.reap()?;
        let orders = checker.wait_all_final(Duration::from_secs(2)).await?;
        if orders.iter().all(|o| o.status != "PENDING")
            || settle.elapsed() > Duration::from_secs(args.settle_timeout_s)
        {
            break orders;
        }
    };
    let accepted = accepted.lock().await.clone();
    let mut report = checker.check(&orders, Some(&accepted)).await?;
    report.verdicts.push(parked);
    let crashes = fleet.lock().await.crashes;
    let duplicates = count_in_logs(&args.log_dir, namespace, "chaos: published a duplicate");
    let failed = failures.load(Ordering::Relaxed);
    println!(
        "chaos: {} orders sent at {:.0}/s over {stream_secs:.1} s, {} accepted, {failed} not accepted; {kills} SIGKILLs, {crashes} crash-point aborts, {broker_restarts} broker restarts, {duplicates} duplicate publishes, {} poison messages, {} dead letters",
        args.orders,
        args.rate,
        accepted.len(),
        args.poison,
        report.dead_letters,
    );
    let statuses: Vec<String> = report
        .by_status
        .iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect();
    println!("chaos: statuses {}", statuses.join(" "));
    println!("chaos: faults {fault_counts}");
    for v in &report.verdicts {
        println!("{v}");
    }
    let ok = report.ok() && failed == 0 && args.crash_point.is_none_or(|_| crashes >= 1);
    if args.crash_point.is_some() && crashes == 0 {
        println!("chaos: FAIL the crash point was never reached");
    }
    println!(
        "chaos: {} after {:.1} s (seed {seed})",
        if ok { "PASSED" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    Ok(ok)
}

/// Waits until every poison message is parked, replays each once, and waits until each is
/// parked again.
async fn check_poison(
    client: &reqwest::Client,
    base: &str,
    expected: u64,
    fleet: &Arc<Mutex<Fleet>>,
) -> anyhow::Result<Verdict> {
    #[derive(serde::Deserialize)]
    struct Letter {
        id: String,
        times_parked: i32,
    }
    let list = |client: &reqwest::Client| {
        let url = format!("{base}/api/v1/dead-letters?limit=10000");
        let client = client.clone();
        async move {
            let letters: Vec<Letter> = client.get(url).send().await?.json().await?;
            anyhow::Ok(letters)
        }
    };
    let started = Instant::now();
    let mut replayed = false;
    loop {
        fleet.lock().await.reap()?;
        let letters = list(client).await.unwrap_or_default();
        let poison: Vec<&Letter> = letters
            .iter()
            .filter(|l| l.id.starts_with("poison-"))
            .collect();
        if !replayed && poison.len() as u64 == expected {
            for l in &poison {
                let url = format!("{base}/api/v1/dead-letters/{}/replay", l.id);
                let mut tries = 0;
                while !client
                    .post(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    tries += 1;
                    if tries > 100 {
                        bail!("replaying {} failed", l.id);
                    }
                    fleet.lock().await.reap()?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            replayed = true;
        } else if replayed
            && poison.len() as u64 == expected
            && poison.iter().all(|l| l.times_parked >= 2)
        {
            return Ok(Verdict {
                name: "parked",
                ok: true,
                detail: format!(
                    "all {expected} poison messages parked, replayed, parked again; none lost"
                ),
            });
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Ok(Verdict {
                name: "parked",
                ok: false,
                detail: format!(
                    "{} of {expected} poison messages parked (replayed: {replayed})",
                    poison.len()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `lines` lines of `path` written from byte `from` on, indented, for a report.
fn log_tail(path: &std::path::Path, from: u64, lines: usize) -> String {
    use std::io::{Read, Seek};
    // Only this incarnation's part: a long run's log is large.
    let read = |bytes: &mut Vec<u8>| -> std::io::Result<()> {
        let mut file = std::fs::File::open(path)?;
        file.seek(std::io::SeekFrom::Start(from))?;
        file.read_to_end(bytes)?;
        Ok(())
    };
    let mut bytes = Vec::new();
    if let Err(e) = read(&mut bytes) {
        return format!("    (no log at {}: {e})", path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    if tail.is_empty() {
        return "    (its log is empty)".to_owned();
    }
    tail.iter()
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn count_in_logs(dir: &std::path::Path, namespace: &str, needle: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(namespace))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|text| text.matches(needle).count())
        .sum()
}

/// The broker and the database as the services reach them, through proxies that can freeze,
/// stall, cut and slow every connection.
struct Proxies {
    broker: FaultProxy,
    db: FaultProxy,
    amqp_url: String,
    database_url: String,
}

impl Proxies {
    async fn start(args: &ChaosArgs) -> anyhow::Result<Proxies> {
        let (broker_url, db_url) = (
            url::Url::parse(&args.amqp_url).context("--amqp-url")?,
            url::Url::parse(&args.database_url).context("--database-url")?,
        );
        async fn addr(u: &url::Url, port: u16) -> anyhow::Result<std::net::SocketAddr> {
            let host = match u.host_str() {
                Some("localhost") | None => "127.0.0.1",
                Some(h) => h,
            };
            tokio::net::lookup_host((host, u.port().unwrap_or(port)))
                .await?
                .next()
                .context("resolving a server's address")
        }
        let broker = FaultProxy::start(addr(&broker_url, 5672).await?).await?;
        let db = FaultProxy::start(addr(&db_url, 5432).await?).await?;
        if args.broker_latency || args.all_faults.is_some() {
            broker.set_latency(Duration::from_millis(50), Duration::from_millis(20));
        }
        let through = |u: &url::Url, port: u16| {
            let mut u = u.clone();
            let _ = u.set_host(Some("127.0.0.1"));
            let _ = u.set_port(Some(port));
            u.to_string()
        };
        let mut amqp_url = through(&broker_url, broker.port());
        if !amqp_url.contains("heartbeat=") {
            amqp_url.push_str(if amqp_url.contains('?') { "&" } else { "?" });
            amqp_url.push_str("heartbeat=5");
        }
        Ok(Proxies {
            database_url: through(&db_url, db.port()),
            amqp_url,
            broker,
            db,
        })
    }
}

/// A network or server fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    FrozenBroker,
    StalledBroker,
    StalledDb,
    MemoryAlarm,
    DbRestart,
    DbTermination,
    QueueDeletion,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::FrozenBroker => "frozen broker (20 s)",
            Fault::StalledBroker => "broker connections stalled 15 s, then cut",
            Fault::StalledDb => "database connections stalled 15 s, then cut",
            Fault::MemoryAlarm => "broker memory alarm (15 s)",
            Fault::DbRestart => "PostgreSQL restart",
            Fault::DbTermination => "database backends terminated",
            Fault::QueueDeletion => "a work queue deleted",
        }
    }
}

/// The faults of a run, in the order they come.
struct Faults(Vec<Fault>);

/// How many of each fault a run injected.
#[derive(Default)]
struct FaultCounts(std::collections::BTreeMap<Fault, u32>, bool);

impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() && !self.1 {
            return write!(f, "none");
        }
        let mut parts: Vec<String> = self
            .0
            .iter()
            .map(|(fault, n)| format!("{} ×{n}", fault.name()))
            .collect();
        if self.1 {
            parts.push("50 ± 20 ms broker latency throughout".into());
        }
        write!(f, "{}", parts.join(", "))
    }
}

impl Faults {
    fn plan(args: &ChaosArgs, rng: &mut Rng) -> Faults {
        let all = args.all_faults.unwrap_or(0);
        let mut faults = Vec::new();
        for (fault, n) in [
            (Fault::FrozenBroker, args.frozen_broker),
            (Fault::StalledBroker, args.stalled_broker),
            (Fault::StalledDb, args.stalled_db),
            (Fault::MemoryAlarm, args.memory_alarms),
            (Fault::DbRestart, args.db_restarts),
            (Fault::DbTermination, args.db_terminations),
            (Fault::QueueDeletion, args.queue_deletions),
        ] {
            faults.extend(std::iter::repeat_n(fault, n.max(all) as usize));
        }
        // In a random order (Fisher–Yates with the run's generator).
        for i in (1..faults.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            faults.swap(i, j);
        }
        Faults(faults)
    }

    /// Injects the faults one after the other, a few seconds apart, from the stream's start.
    async fn run(
        self,
        args: &ChaosArgs,
        proxies: &Proxies,
        namespace: &str,
        stream_start: Instant,
    ) -> anyhow::Result<FaultCounts> {
        let mut counts = FaultCounts(
            Default::default(),
            args.broker_latency || args.all_faults.is_some(),
        );
        tokio::time::sleep_until((stream_start + Duration::from_secs(2)).into()).await;
        for fault in self.0 {
            let t = Instant::now();
            match fault {
                Fault::FrozenBroker => {
                    proxies.broker.pause();
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    proxies.broker.resume();
                }
                Fault::StalledBroker => {
                    proxies.broker.pause();
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    proxies.broker.cut();
                    proxies.broker.resume();
                }
                Fault::StalledDb => {
                    proxies.db.pause();
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    proxies.db.cut();
                    proxies.db.resume();
                }
                Fault::MemoryAlarm => {
                    let was = shell_output(
                        "rabbitmqctl eval 'vm_memory_monitor:get_vm_memory_high_watermark().'",
                    )
                    .await
                    .ok()
                    .filter(|v| v.parse::<f64>().is_ok())
                    .unwrap_or_else(|| "0.4".into());
                    shell("rabbitmqctl set_vm_memory_high_watermark 0.00001").await?;
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    shell(&format!("rabbitmqctl set_vm_memory_high_watermark {was}")).await?;
                }
                Fault::DbRestart => shell(&args.db_restart_cmd).await?,
                Fault::DbTermination => {
                    let sql = format!(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE datname LIKE '{namespace}\\_%'"
                    );
                    let status = tokio::process::Command::new("psql")
                        .args([args.database_url.as_str(), "-qAtc", &sql])
                        .stdout(Stdio::null())
                        .status()
                        .await
                        .context("running psql")?;
                    if !status.success() {
                        bail!("psql could not terminate the backends: {status}");
                    }
                }
                Fault::QueueDeletion => {
                    let queues = Queues::new(namespace);
                    let victims = [Service::Payment, Service::Inventory, Service::Delivery];
                    let queue = queues.of(victims[counts.0.len() % victims.len()]);
                    let bus = Bus::amqp(&args.amqp_url, Vec::new(), None).await?;
                    bus.delete_queues(std::slice::from_ref(&queue)).await?;
                }
            }
            *counts.0.entry(fault).or_insert(0) += 1;
            eprintln!("chaos: {} ({:.1?})", fault.name(), t.elapsed());
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        Ok(counts)
    }
}

async fn shell(command: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdout(Stdio::null())
        .status()
        .await
        .with_context(|| format!("running {command}"))?;
    if !status.success() {
        bail!("{command} failed: {status}");
    }
    Ok(())
}

async fn shell_output(command: &str) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .await
        .with_context(|| format!("running {command}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
