//! The floor under the saga's latency on this machine: a bare chain of broker hops, each a
//! persistent message published with a confirm and acked after it is handled, and
//! optionally one durable single-statement PostgreSQL commit per hop — what every hop of an
//! order costs at least, without HTTP, JSON, tracing, outboxes or saga logic.
//!
//! ```text
//! cargo run --release --example hop_probe -- --rate 300 --hops 6 --duration 30
//! cargo run --release --example hop_probe -- --rate 300 --hops 6 --duration 30 \
//!     --database-url postgres://postgres@127.0.0.1:5432
//! ```
//!
//! A chain starts at the given arrival rate (open loop); each hop runs in a connection of its
//! own (as each service has its own), handles deliveries concurrently (up to the prefetch),
//! and the last hop records the chain's latency. `bench/limits.sh` runs it beside `pgbench`
//! and samples the CPU.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use ldt_runtime::bus::{AmqpOptions, Bus, Outgoing};
use tokio::sync::Mutex;

#[derive(Parser)]
struct Args {
    /// Chains started per second.
    #[arg(long, default_value_t = 300)]
    rate: u64,
    /// Hops per chain (an order takes 6).
    #[arg(long, default_value_t = 6)]
    hops: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    #[arg(
        long,
        env = "LDT_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// With a PostgreSQL server: one durable insert (its own transaction) per hop, in a
    /// database made for the run and dropped after it.
    #[arg(long)]
    database_url: Option<String>,
    /// Messages each hop's consumer may hold unacknowledged.
    #[arg(long, default_value_t = 200)]
    prefetch: u16,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.hops >= 1 && args.rate >= 1,
        "--hops and --rate must be positive"
    );
    let run = format!("probe_{}", now_us());
    let queues: Vec<String> = (0..args.hops).map(|i| format!("{run}.hop{i}")).collect();
    let options = || AmqpOptions {
        expires_ms: Some(60_000),
        ..AmqpOptions::default()
    };
    let db = match &args.database_url {
        Some(url) => Some(Database::create(url, &run).await?),
        None => None,
    };
    let latencies = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for hop in 0..args.hops {
        // A connection per hop, as each service has its own.
        let bus = Bus::amqp_with(&args.amqp_url, queues.clone(), options())
            .await
            .context("connecting to RabbitMQ")?;
        let next = queues.get(hop + 1).cloned();
        // Connections kept between inserts, as the services' hot paths keep them.
        let pool = match &db {
            Some(db) => Some(Arc::new(ldt_runtime::db::Held::new(&db.pool().await?, 4))),
            None => None,
        };
        let mut sub = bus.subscribe(&queues[hop], args.prefetch).await?;
        let (latencies, done) = (latencies.clone(), done.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = sub.next().await {
                let (bus, next, pool) = (bus.clone(), next.clone(), pool.clone());
                let (latencies, done) = (latencies.clone(), done.clone());
                tokio::spawn(async move {
                    if let Some(pool) = &pool
                        && let Err(e) = insert(pool, hop, &msg.payload).await
                    {
                        eprintln!("insert failed: {e}");
                    }
                    match next {
                        Some(queue) => {
                            let out = Outgoing {
                                queue,
                                message_id: msg.message_id.clone().unwrap_or_default(),
                                payload: msg.payload.clone(),
                                headers: Vec::new(),
                            };
                            if let Err(e) = bus.publish(std::slice::from_ref(&out)).await {
                                eprintln!("publish failed: {e}");
                            }
                        }
                        None => {
                            let mut started = [0u8; 8];
                            started.copy_from_slice(&msg.payload[..8]);
                            let took = now_us().saturating_sub(u64::from_le_bytes(started));
                            let _ = latencies.lock().await.record(took.max(1));
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    let _ = msg.ack().await;
                });
            }
        });
    }

    // Open loop: chain n starts at n / rate, whether or not earlier ones are done.
    let producer = Bus::amqp_with(&args.amqp_url, queues.clone(), options()).await?;
    let total = args.rate * args.duration;
    let start = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for n in 0..total {
        tokio::time::sleep_until((start + Duration::from_micros(n * 1_000_000 / args.rate)).into())
            .await;
        // About the size of an order's envelope.
        let mut payload = now_us().to_le_bytes().to_vec();
        payload.resize(300, b' ');
        let out = Outgoing {
            queue: queues[0].clone(),
            message_id: format!("{run}-{n}"),
            payload,
            headers: Vec::new(),
        };
        let producer = producer.clone();
        sends.spawn(async move { producer.publish(std::slice::from_ref(&out)).await });
    }
    while sends.join_next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(std::sync::atomic::Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let h = latencies.lock().await;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{{\"rate\": {}, \"hops\": {}, \"database\": {}, \"chains\": {}, \"completed\": {}, \
         \"p50_ms\": {:.1}, \"p90_ms\": {:.1}, \"p99_ms\": {:.1}, \"max_ms\": {:.1}}}",
        args.rate,
        args.hops,
        db.is_some(),
        total,
        h.len(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
    drop(h);
    let _ = producer.delete_queues(&queues).await;
    if let Some(db) = db {
        db.drop().await?;
    }
    Ok(())
}

/// One durable insert, committing by itself.
async fn insert(
    held: &ldt_runtime::db::Held,
    hop: usize,
    payload: &[u8],
) -> Result<(), sqlx::Error> {
    let mut conn = held.get().await?;
    sqlx::query("INSERT INTO hops (hop, payload) VALUES ($1, $2)")
        .bind(hop as i32)
        .bind(payload)
        .execute(&mut *conn)
        .await?;
    conn.reuse();
    Ok(())
}

/// The run's own database on the PostgreSQL server.
struct Database {
    server: String,
    name: String,
}

impl Database {
    async fn create(server: &str, name: &str) -> anyhow::Result<Database> {
        let db = Database {
            server: server.trim_end_matches('/').to_owned(),
            name: name.to_owned(),
        };
        let admin = sqlx::PgPool::connect(&format!("{}/postgres", db.server)).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {}", db.name)))
            .execute(&admin)
            .await?;
        admin.close().await;
        let pool = sqlx::PgPool::connect(&format!("{}/{}", db.server, db.name)).await?;
        sqlx::raw_sql(
            "CREATE TABLE hops (id BIGSERIAL PRIMARY KEY, hop INT NOT NULL, payload BYTEA NOT NULL)",
        )
        .execute(&pool)
        .await?;
        pool.close().await;
        Ok(db)
    }

    /// A pool of 8, as each service has.
    async fn pool(&self) -> anyhow::Result<ldt_runtime::db::Pool> {
        sqlx::any::install_default_drivers();
        Ok(sqlx::any::AnyPoolOptions::new()
            .max_connections(8)
            .connect(&format!("{}/{}", self.server, self.name))
            .await?)
    }

    async fn drop(self) -> anyhow::Result<()> {
        let admin = sqlx::PgPool::connect(&format!("{}/postgres", self.server)).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&admin)
        .await?;
        Ok(())
    }
}
