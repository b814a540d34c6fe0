//! Command line and environment configuration.
//!
//! Every setting is a flag with an `LDT_*` environment fallback, so the same binary is
//! configured by flags on a laptop and by a ConfigMap on Kubernetes.

use std::time::Duration;

use clap::{Args, Parser};

use ldt_contract::Service;

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address the HTTP API listens on, `HOST:PORT` (a name like `localhost` or an IP
    /// address; port 0 picks a free port).
    #[arg(long, env = "LDT_HTTP_ADDR", default_value = "127.0.0.1:8000", value_parser = parse_listen_addr, help_heading = "HTTP")]
    pub http_addr: String,

    /// A request's headers must arrive in full within this long of the server waiting for
    /// them (so a kept-alive connection idle this long is closed too).
    #[arg(long, env = "LDT_HTTP_HEADER_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..), help_heading = "HTTP")]
    pub http_header_timeout_s: u64,

    /// A request's body must arrive in full within this long (else 408).
    #[arg(long, env = "LDT_HTTP_BODY_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..), help_heading = "HTTP")]
    pub http_body_timeout_s: u64,

    /// A connection that moves no byte either way for this long is closed.
    #[arg(long, env = "LDT_HTTP_IDLE_TIMEOUT_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..), help_heading = "HTTP")]
    pub http_idle_timeout_s: u64,

    /// Connections served at once; more wait to be accepted.
    #[arg(long, env = "LDT_HTTP_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..), help_heading = "HTTP")]
    pub http_max_connections: u32,

    /// Largest request body, in bytes (else 413).
    #[arg(long, env = "LDT_HTTP_MAX_BODY_BYTES", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..), help_heading = "HTTP")]
    pub http_max_body_bytes: u32,

    /// Most headers a request may carry (else 431).
    #[arg(long, env = "LDT_HTTP_MAX_HEADERS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10000), help_heading = "HTTP")]
    pub http_max_headers: u32,

    /// RabbitMQ URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`. Unset: `ldt up` uses its
    /// in-process bus (journaled in the data directory); `ldt serve` needs a broker.
    #[arg(
        long,
        env = "LDT_AMQP_URL",
        hide_env_values = true,
        help_heading = "Broker and databases"
    )]
    pub amqp_url: Option<String>,

    /// PostgreSQL server URL, e.g. `postgres://postgres@127.0.0.1:5432`; each service keeps
    /// its own database on it (`<namespace>_payment`, …), created and migrated on start.
    /// Unset: each service keeps an embedded SQLite file in the data directory.
    #[arg(
        long,
        env = "LDT_DATABASE_URL",
        hide_env_values = true,
        help_heading = "Broker and databases"
    )]
    pub database_url: Option<String>,

    /// A database server of its own for one service, as `SERVICE=URL` (repeat it, or
    /// separate them with commas), overriding --database-url for that service; so are
    /// `LDT_DATABASE_URL_<SERVICE>` variables (`LDT_DATABASE_URL_PAYMENT=postgres://…`).
    #[arg(
        long = "service-database-url",
        env = "LDT_SERVICE_DATABASE_URLS",
        value_delimiter = ',',
        value_parser = parse_service_database_url,
        hide_env_values = true,
        help_heading = "Broker and databases"
    )]
    pub service_database_urls: Vec<(Service, String)>,

    /// Where the embedded mode keeps its files (one SQLite database per service and the
    /// in-process bus's journal), when no database or broker URL is given.
    #[arg(
        long,
        env = "LDT_DATA_DIR",
        default_value = "ldt-data",
        help_heading = "Embedded mode"
    )]
    pub data_dir: std::path::PathBuf,

    /// Keep the embedded databases and bus in memory only: nothing is written to disk and
    /// everything is gone when the process stops.
    #[arg(long, env = "LDT_EPHEMERAL", help_heading = "Embedded mode",
          num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub ephemeral: bool,

    /// Ready messages each queue of the in-process bus holds before it refuses publishes
    /// (the outboxes keep the rest and retry).
    #[arg(long, env = "LDT_BUS_CAPACITY", default_value_t = crate::bus::embedded::DEFAULT_CAPACITY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..), help_heading = "Embedded mode")]
    pub bus_capacity: usize,

    /// Prefix of every database and queue name, so several marketplaces can share one broker
    /// and one database server.
    #[arg(long, env = "LDT_NAMESPACE", default_value = "ldt", value_parser = parse_namespace, help_heading = "Broker and databases")]
    pub namespace: String,

    /// Credits a user gets the first time they are seen (at most 10^15).
    #[arg(long, env = "LDT_INITIAL_CREDITS", default_value_t = 500, value_parser = clap::value_parser!(i64).range(0..=ldt_contract::MAX_QUANTITY), help_heading = "The marketplace")]
    pub initial_credits: i64,

    /// Token stock, seeded once when the inventory database is created (a restart does not
    /// reset it); at most 10^15.
    #[arg(long, env = "LDT_INITIAL_STOCK", default_value_t = 500, value_parser = clap::value_parser!(i64).range(0..=ldt_contract::MAX_QUANTITY), help_heading = "The marketplace")]
    pub initial_stock: i64,

    /// Each step's share of an order's deadline: the orchestrator waits this long per step on
    /// the routing slip for the saga's answer before the order ends TIMEOUT.
    #[arg(long, env = "LDT_STEP_TIMEOUT_MS", default_value_t = DEFAULT_STEP_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..), help_heading = "The marketplace")]
    pub step_timeout_ms: u64,

    /// How long a step injected with a `timeout` fault stalls before it acts (late).
    /// Defaults to one step timeout more than the whole slip's deadline; a stall shorter
    /// than that deadline (3 × the step timeout) lets the order succeed late instead.
    #[arg(long, env = "LDT_STALL_MS", help_heading = "Testing")]
    pub stall_ms: Option<u64>,

    /// Threads of this process's async runtime. By default one when the process runs one
    /// service (`ldt serve <service>`: a split deployment's processes share a machine's cores,
    /// and one thread each hands work from thread to thread less — BENCHMARKS.md), one per
    /// core when it runs several (`ldt up`) or `TOKIO_WORKER_THREADS` says otherwise.
    #[arg(long, env = "LDT_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024), help_heading = "Throughput")]
    pub worker_threads: Option<u16>,

    /// Messages each consumer may hold unacknowledged (AMQP prefetch).
    #[arg(long, env = "LDT_PREFETCH", default_value_t = 200, value_parser = clap::value_parser!(u16).range(1..), help_heading = "Throughput")]
    pub prefetch: u16,

    /// Batches of deliveries each consumer handles at once (each in one transaction).
    /// Deliveries arriving meanwhile gather into the next batch, so a busy service commits
    /// fewer, larger transactions. One measured best (BENCHMARKS.md).
    #[arg(long, env = "LDT_BATCHES_IN_FLIGHT", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..), help_heading = "Throughput")]
    pub batches_in_flight: u16,

    /// How long a consumer may wait for more deliveries to join a small batch, in
    /// milliseconds, when its queue is busy (deliveries a moment apart): fewer, larger
    /// transactions and bundles, at up to this much latency a hop. Never when the queue is
    /// idle (the last delivery came more than twice this long before). 0: never.
    #[arg(long, env = "LDT_LINGER_MS", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=100), help_heading = "Throughput")]
    pub linger_ms: u16,

    /// How long the order service may hold a new order for others to join its group commit,
    /// in milliseconds, while orders come in fast (less than twice this apart): the group
    /// then travels the whole saga together, one transaction and one bundle a hop, so every
    /// hop's fixed costs are shared. A group is written as soon as it holds the orders this
    /// long brings at the recent pace (three at 300/s with 10 ms), without waiting out the
    /// rest; when this long brings half a full group of sixteen (800/s with 10 ms), the group
    /// is held for all sixteen, up to twice this long. Never when orders come slower (a lone
    /// order is written at once). 0: never.
    /// Default: 10 on PostgreSQL, 5 on SQLite (whose hops cost less, so that sharing them is
    /// worth less latency).
    #[arg(long, env = "LDT_INTAKE_LINGER_MS", value_parser = clap::value_parser!(u16).range(0..=1000), help_heading = "Throughput")]
    pub intake_linger_ms: Option<u16>,

    /// The order service sends each saga's first command (the routing slip) in the
    /// transaction that stores the order, with the saga's opening (the order's terms), and
    /// holds the order's `OrderPlaced` back for half a step timeout. The steps carry the
    /// opening on to their answers, so the orchestrator starts the saga from the first answer
    /// it gets; the `OrderPlaced` of an order final within the hold is dropped unsent. Five
    /// broker messages an order instead of six, and one orchestrator transaction instead of
    /// two (BENCHMARKS.md, fifteenth sitting). Upgrade the orchestrators first: one from
    /// before openings waits for the held `OrderPlaced` to finish each order. `false`: the
    /// order service sends `OrderPlaced` at once and the orchestrator sends the slip.
    #[arg(long, env = "LDT_ORDER_OPENS_SAGA", default_value = "true", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new(),
          action = clap::ArgAction::Set, help_heading = "Throughput")]
    pub order_opens_saga: bool,

    /// Tries of a message that fails the same way (a constraint violated, a bug) before it is
    /// parked as a dead letter; a compensation parked so makes its saga stuck until an
    /// operator retries it. A database or broker out of reach is retried for ever.
    #[arg(long, env = "LDT_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..), help_heading = "The marketplace")]
    pub max_attempts: u32,

    /// Most messages for one queue a service's outbox relay sends as one broker message (a
    /// bundle; the receiver takes it apart). The broker's cost is per message, so bundles
    /// free CPU under load; when idle, messages go one by one anyway. 1 sends no bundles: use
    /// it while replicas of a version older than bundles still consume (they would park a
    /// bundle as a dead letter).
    #[arg(long, env = "LDT_BUNDLE_MAX", default_value_t = DEFAULT_BUNDLE_MAX, value_parser = clap::value_parser!(u16).range(1..=1000), help_heading = "Throughput")]
    pub bundle_max: u16,

    /// Orders allowed in flight (PENDING) before new ones are refused with 503 and
    /// `Retry-After`: bounds the backlog, so accepted orders stay fast under overload.
    #[arg(long, env = "LDT_MAX_PENDING", default_value_t = DEFAULT_MAX_PENDING, value_parser = clap::value_parser!(i64).range(1..), help_heading = "Throughput")]
    pub max_pending: i64,

    /// Adaptive admission (off by default): the order service admits about this much work
    /// (completion rate × this), at least 256 orders and at most --max-pending, and refuses
    /// the rest with 503 — accepted orders stay fast under overload, at the price of
    /// shedding near the knee. 0: the limit is --max-pending.
    #[arg(
        long,
        env = "LDT_TARGET_LATENCY_MS",
        default_value_t = 0,
        help_heading = "Throughput"
    )]
    pub target_latency_ms: u64,

    /// How long a new order may wait at the door for a place in flight before it is refused
    /// with 503: under a flood, clients that would retry at once wait for the next order to
    /// finish instead (each refusal costs the client and the server an HTTP round trip for
    /// nothing). 0: refused at once.
    #[arg(long, env = "LDT_ADMISSION_WAIT_MS", default_value_t = DEFAULT_ADMISSION_WAIT_MS, value_parser = clap::value_parser!(u64).range(0..=60_000), help_heading = "Throughput")]
    pub admission_wait_ms: u64,

    /// Connections in each service's database pool.
    #[arg(long, env = "LDT_DB_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Broker and databases")]
    pub db_pool_size: u32,

    /// How long to keep retrying the broker and the databases at start before giving up.
    #[arg(
        long,
        env = "LDT_STARTUP_TIMEOUT_S",
        default_value_t = 30,
        help_heading = "Broker and databases"
    )]
    pub startup_timeout_s: u64,

    /// Delete the namespace's queues after this long unused (AMQP `x-expires`); for tests.
    #[arg(long, env = "LDT_QUEUE_EXPIRES_MS", hide = true)]
    pub queue_expires_ms: Option<u32>,

    /// RabbitMQ queue type for the marketplace's queues (the dead-letter queue included):
    /// `quorum` replicates them across a cluster's nodes.
    #[arg(long, env = "LDT_QUEUE_TYPE", value_enum, default_value_t = crate::bus::message::QueueType::Classic, help_heading = "Broker and databases")]
    pub queue_type: crate::bus::message::QueueType,

    /// Where each RabbitMQ connection's I/O loop runs: `runtime`, as a task on this process's
    /// async runtime, or `thread`, on a thread of its own (lapin's default), which hands every
    /// frame between that thread and the runtime's. `runtime` wakes threads less
    /// (BENCHMARKS.md); a task that blocked the runtime would hold up its connections too.
    #[arg(long, env = "LDT_AMQP_IO_LOOP", value_enum, default_value_t = crate::bus::message::AmqpIoLoop::Runtime, help_heading = "Broker and databases")]
    pub amqp_io_loop: crate::bus::message::AmqpIoLoop,

    /// Accept per-request fault injection (`kill_*`, `timeout_*`, `faults`). Turn it off in
    /// production: requests carrying faults are then rejected with 422.
    #[arg(long, env = "LDT_FAULT_INJECTION", default_value = "true", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new(),
          action = clap::ArgAction::Set, help_heading = "Operations")]
    pub fault_injection: bool,

    /// When set, admin endpoints (restock, dead-letter replay, saga retry, order cancel,
    /// fault flags) require
    /// `Authorization: Bearer <token>`.
    #[arg(
        long,
        env = "LDT_ADMIN_TOKEN",
        hide_env_values = true,
        help_heading = "Operations"
    )]
    pub admin_token: Option<String>,

    /// Abort the process at a named point (`<service>.before_commit|after_commit|after_publish`)
    /// the first time it is reached; for crash testing.
    #[arg(long, env = "LDT_CRASH_POINT", value_parser = crate::crash::parse, help_heading = "Testing")]
    pub crash_point: Option<crate::crash::CrashPoint>,

    /// Publish every Nth outbox message twice (0: never); for testing idempotency.
    #[arg(
        long,
        env = "LDT_CHAOS_DUPLICATE_EVERY",
        default_value_t = 0,
        hide = true
    )]
    pub chaos_duplicate_every: u64,

    /// Where a service this process does not run answers, as `SERVICE=URL` (repeat it, or
    /// separate them with commas): the console and the API of this process then reach it
    /// too, so one address serves everything in split mode.
    #[arg(long = "service-url", env = "LDT_SERVICE_URLS", value_delimiter = ',', value_parser = parse_service_url, help_heading = "Operations")]
    pub service_urls: Vec<(Service, String)>,

    /// A link from an order in the console to its trace, `{trace_id}` standing for the
    /// order's trace id (e.g. Jaeger's `http://127.0.0.1:16686/trace/{trace_id}`).
    #[arg(long, env = "LDT_TRACE_URL_TEMPLATE", help_heading = "Operations")]
    pub trace_url_template: Option<String>,

    /// Log format: one human-readable line per event, or one JSON object.
    #[arg(long, env = "LDT_LOG_FORMAT", value_enum, default_value_t = crate::telemetry::LogFormat::Text, help_heading = "Operations")]
    pub log_format: crate::telemetry::LogFormat,
}

/// Each step's share of an order's deadline by default: three steps make 1.5 s, within the
/// legacy contract's "a timed-out order is final within 2 s" (compensations included).
pub const DEFAULT_STEP_TIMEOUT_MS: u64 = 500;

/// How long a new order waits at the door by default when the marketplace is full: orders
/// finish every fraction of a millisecond under a flood, so a place comes up long before
/// this; a marketplace that is stalled still answers 503 within a twentieth of a second.
pub const DEFAULT_ADMISSION_WAIT_MS: u64 = 50;

/// Orders in flight by default before new ones are shed: enough that a sustainable load is
/// not shed, few enough that under overload the accepted orders stay fast (a bigger backlog
/// only adds waiting). How 400 was chosen: BENCHMARKS.md, "Where the defaults come from".
pub const DEFAULT_MAX_PENDING: i64 = 400;

/// Default `--intake-linger-ms` on PostgreSQL and on SQLite: how they were chosen,
/// BENCHMARKS.md ("Where the defaults come from").
pub const DEFAULT_INTAKE_LINGER_MS: u16 = 10;
pub const DEFAULT_INTAKE_LINGER_MS_SQLITE: u16 = 5;

/// Default `--bundle-max`: a consumer's batch takes up to 100 deliveries, so a bundle fits in one.
pub const DEFAULT_BUNDLE_MAX: u16 = 64;

/// The default stall of a `timeout` fault, in step timeouts: past the deadline of a slip of
/// every step (one step timeout each), so the stalled order ends TIMEOUT.
const STALL_IN_STEP_TIMEOUTS: u64 = ldt_contract::Step::ALL.len() as u64 + 1;

impl Settings {
    /// The runtime's threads for a process running `services` services: `--worker-threads`;
    /// else one for a single service unless `TOKIO_WORKER_THREADS` is set (`tokio_env`);
    /// `None`: tokio's default, one per core (or `TOKIO_WORKER_THREADS`).
    pub fn runtime_threads(&self, services: usize, tokio_env: bool) -> Option<usize> {
        match self.worker_threads {
            Some(n) => Some(usize::from(n)),
            None if services == 1 && !tokio_env => Some(1),
            None => None,
        }
    }

    pub fn step_timeout(&self) -> Duration {
        Duration::from_millis(self.step_timeout_ms)
    }

    pub fn stall(&self) -> Duration {
        Duration::from_millis(
            self.stall_ms
                .unwrap_or_else(|| self.step_timeout_ms.saturating_mul(STALL_IN_STEP_TIMEOUTS)),
        )
    }

    pub fn admission_wait(&self) -> Duration {
        Duration::from_millis(self.admission_wait_ms)
    }

    pub fn target_latency(&self) -> Duration {
        Duration::from_millis(self.target_latency_ms)
    }

    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.startup_timeout_s)
    }

    /// The database of one service on the configured server (or its SQLite file's name).
    pub fn database_name(&self, service: Service) -> String {
        format!("{}_{}", self.namespace, service.db_suffix())
    }

    /// Where the services keep their data: PostgreSQL when a URL is set, else SQLite.
    pub fn backend(&self) -> crate::db::Backend {
        self.backend_of(self.database_url.as_ref())
    }

    /// Where one service keeps its data: its own server when one is set for it
    /// (--service-database-url), else as every service does ([`Settings::backend`]).
    pub fn backend_for(&self, service: Service) -> crate::db::Backend {
        let own = self
            .service_database_urls
            .iter()
            .rev()
            .find(|(s, _)| *s == service)
            .map(|(_, url)| url);
        self.backend_of(own.or(self.database_url.as_ref()))
    }

    /// Adds the `LDT_DATABASE_URL_<SERVICE>` variables of `env` to the per-service database
    /// servers (a flag given for the same service wins).
    pub fn with_service_database_urls_from(
        mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, String> {
        let mut found = Vec::new();
        for (key, url) in env {
            let Some(name) = key.strip_prefix("LDT_DATABASE_URL_") else {
                continue;
            };
            let service = <Service as clap::ValueEnum>::from_str(&name.replace('_', "-"), true)
                .map_err(|_| format!("{key}: no service is called {:?}", name.to_lowercase()))?;
            found.push((service, url));
        }
        // The flags come last, so they win.
        found.append(&mut self.service_database_urls);
        self.service_database_urls = found;
        Ok(self)
    }

    fn backend_of(&self, url: Option<&String>) -> crate::db::Backend {
        match url {
            Some(url) => crate::db::Backend::Postgres {
                server_url: url.clone(),
            },
            None if self.ephemeral => crate::db::Backend::Sqlite { dir: None },
            None => crate::db::Backend::Sqlite {
                dir: Some(self.data_dir.clone()),
            },
        }
    }

    /// The in-process bus's journal file (`None`: a broker is configured, or `--ephemeral`).
    pub fn bus_journal(&self) -> Option<std::path::PathBuf> {
        (self.amqp_url.is_none() && !self.ephemeral)
            .then(|| self.data_dir.join(format!("{}_bus.db", self.namespace)))
    }

    /// Whether anything is kept in the data directory (so it must not be shared by two
    /// processes).
    pub fn uses_data_dir(&self) -> bool {
        !self.ephemeral
            && (self.amqp_url.is_none()
                || Service::ALL
                    .iter()
                    .any(|s| matches!(self.backend_for(*s), crate::db::Backend::Sqlite { .. })))
    }
}

impl Settings {
    /// Settings from command-line arguments as `ldt up` takes them (the first is the program's
    /// name), with the `LDT_*` environment behind them.
    pub fn try_parse_from<I, T>(args: I) -> Result<Settings, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Up {
            #[command(flatten)]
            settings: Settings,
        }
        Up::try_parse_from(args).map(|up| up.settings)
    }
}

/// `HOST:PORT`, the host a name or an IP address (`[::1]:8000` for IPv6).
fn parse_listen_addr(s: &str) -> Result<String, String> {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(s.to_owned());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| {
        format!("expected HOST:PORT, e.g. 127.0.0.1:8000 or localhost:8000; got {s:?}")
    })?;
    port.parse::<u16>()
        .map_err(|_| format!("{port:?} is not a port (0–65535)"))?;
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !name_ok {
        return Err(format!("{host:?} is not a host name or an IP address"));
    }
    Ok(s.to_owned())
}

impl Settings {
    /// The HTTP server's limits.
    pub fn http_limits(&self) -> crate::server::Limits {
        crate::server::Limits {
            header_timeout: Duration::from_secs(self.http_header_timeout_s),
            idle_timeout: Duration::from_secs(self.http_idle_timeout_s),
            max_connections: self.http_max_connections as usize,
            max_headers: self.http_max_headers as usize,
        }
    }

    /// How much of a request body the server reads, and for how long.
    pub fn body_limits(&self) -> crate::http::BodyLimits {
        crate::http::BodyLimits {
            max_bytes: self.http_max_body_bytes as usize,
            timeout: Duration::from_secs(self.http_body_timeout_s),
        }
    }
}

/// `SERVICE=VALUE`, the service named as `ldt serve` names it; `example` shows the form.
fn parse_service_pair<'a>(s: &'a str, example: &str) -> Result<(Service, &'a str), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected SERVICE=URL, e.g. {example}; got {s:?}"))?;
    let service = <Service as clap::ValueEnum>::from_str(name.trim(), true)
        .map_err(|_| format!("unknown service {name:?}"))?;
    Ok((service, value.trim()))
}

/// `SERVICE=URL`: where one service answers.
fn parse_service_url(s: &str) -> Result<(Service, String), String> {
    let (service, url) = parse_service_pair(s, "order=http://127.0.0.1:8101")?;
    let url = url.trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 8 {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    }
    Ok((service, url.to_owned()))
}

/// `SERVICE=URL`: the database server of one service (checked at start, with the others).
fn parse_service_database_url(s: &str) -> Result<(Service, String), String> {
    let (service, url) = parse_service_pair(s, "payment=postgres://postgres@db-payment:5432")?;
    Ok((service, url.to_owned()))
}

/// Namespaces end up in database and queue names: keep them to a safe alphabet.
fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 40
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("a namespace is 1–40 characters of a-z, 0-9 and _, starting with a letter".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_contract() {
        let s = Settings::try_parse_from(["ldt"]).unwrap();
        assert_eq!(s.http_addr, "127.0.0.1:8000");
        assert_eq!(s.initial_credits, 500);
        assert_eq!(s.initial_stock, 500);
        assert_eq!(s.step_timeout(), Duration::from_millis(500));
        assert_eq!(s.stall(), Duration::from_millis(2000));
        assert_eq!(s.database_name(Service::DeadLetter), "ldt_dead_letter");
        // No broker or database configured: the embedded mode, kept in ./ldt-data.
        assert_eq!(
            s.backend(),
            crate::db::Backend::Sqlite {
                dir: Some("ldt-data".into())
            }
        );
        assert_eq!(
            s.bus_journal(),
            Some(std::path::PathBuf::from("ldt-data/ldt_bus.db"))
        );
    }

    #[test]
    fn one_service_gets_one_runtime_thread_several_one_per_core_unless_told() {
        let s = Settings::try_parse_from(["ldt"]).unwrap();
        assert_eq!(s.runtime_threads(1, false), Some(1));
        assert_eq!(s.runtime_threads(6, false), None);
        assert_eq!(
            s.runtime_threads(1, true),
            None,
            "TOKIO_WORKER_THREADS decides"
        );
        let s = Settings::try_parse_from(["ldt", "--worker-threads", "3"]).unwrap();
        assert_eq!(s.runtime_threads(1, true), Some(3));
        assert_eq!(s.runtime_threads(6, false), Some(3));
        assert!(Settings::try_parse_from(["ldt", "--worker-threads", "0"]).is_err());
    }

    #[test]
    fn mixed_and_ephemeral_modes() {
        let parse = |args: &[&str]| Settings::try_parse_from(&args[1..]).unwrap();
        let s = parse(&["ldt", "up", "--ephemeral"]);
        assert_eq!(s.backend(), crate::db::Backend::Sqlite { dir: None });
        assert_eq!(s.bus_journal(), None);
        assert!(!s.uses_data_dir());
        let s = parse(&["ldt", "up", "--amqp-url", "amqp://h"]);
        assert!(matches!(
            s.backend(),
            crate::db::Backend::Sqlite { dir: Some(_) }
        ));
        assert_eq!(s.bus_journal(), None);
        let s = parse(&["ldt", "up", "--database-url", "postgres://h"]);
        assert!(matches!(s.backend(), crate::db::Backend::Postgres { .. }));
        assert!(s.bus_journal().is_some());
        let s = parse(&[
            "ldt",
            "up",
            "--database-url",
            "postgres://h",
            "--amqp-url",
            "amqp://h",
        ]);
        assert!(!s.uses_data_dir());
    }
}
