//! `ldt bench`: a load generator against any running marketplace.
//!
//! Open loop (`--rate`): order *i* is due at `start + i / rate` and is sent then whether or not
//! earlier ones have answered; its HTTP latency counts from when it was due, so a stalled
//! server shows up in the figures instead of slowing the generator (no coordinated omission).
//! Closed loop (`--concurrency`): that many clients, each sending its next order when the last
//! one answered.
//!
//! Saga latency comes from the orders' own server-side timestamps (`finished_at_ms −
//! created_at_ms`), read once after the run — not by polling every order. Afterwards the
//! invariants are checked through the API ([`ldt_testkit::check`]); a broken one fails the run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Mutex;

use crate::probe::MachineProbe;
use ldt_testkit::check::{Checker, Endpoints};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Base URL of the marketplace (its order API; and every other API unless overridden).
    #[arg(long, env = "LDT_BENCH_URL", default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Base URL of one service's API, when the services are not behind one address
    /// (`payment=http://127.0.0.1:8102`); repeatable.
    #[arg(long = "service-url", value_parser = parse_service_url)]
    pub service_urls: Vec<(String, String)>,
    /// Open loop: orders per second.
    #[arg(long, conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop: concurrent clients.
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// Orders to send (default 1000 unless --duration is given).
    #[arg(long)]
    pub orders: Option<u64>,
    /// How long to send, in seconds (instead of --orders).
    #[arg(long, conflicts_with = "orders")]
    pub duration: Option<f64>,
    /// Distinct users.
    #[arg(long, default_value_t = 100)]
    pub users: u64,
    /// Share of orders with a `kill` fault (spread over the steps).
    #[arg(long, default_value_t = 0.0)]
    pub kill_share: f64,
    /// Share of orders with a `timeout` fault (spread over the steps).
    #[arg(long, default_value_t = 0.0)]
    pub timeout_share: f64,
    /// Share of orders that cost more than a user's initial credits.
    #[arg(long, default_value_t = 0.0)]
    pub insufficient_funds_share: f64,
    /// Share of orders that ask for more tokens than there are.
    #[arg(long, default_value_t = 0.0)]
    pub insufficient_stock_share: f64,
    /// Initial credits of a user on the marketplace under test (for the money invariant).
    #[arg(long, env = "LDT_INITIAL_CREDITS", default_value_t = 500)]
    pub initial_credits: i64,
    /// Bearer token for the restock before the run, when the marketplace has one.
    #[arg(long, env = "LDT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Skip the invariant check (e.g. against a marketplace others are using).
    #[arg(long)]
    pub no_check: bool,
    /// How long to wait for the orders to be final after sending.
    #[arg(long, default_value_t = 120)]
    pub settle_timeout_s: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Seconds of warm-up load (not measured) before the run.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
}

fn parse_service_url(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected service=url")?;
    if !["order", "payment", "inventory", "delivery", "dead-letter"].contains(&k) {
        return Err(format!("unknown service {k:?}"));
    }
    Ok((k.to_owned(), v.trim_end_matches('/').to_owned()))
}

impl BenchArgs {
    pub fn endpoints(&self) -> Endpoints {
        let mut e = Endpoints::single(&self.url);
        for (k, v) in &self.service_urls {
            match k.as_str() {
                "order" => e.order = v.clone(),
                "payment" => e.payment = v.clone(),
                "inventory" => e.inventory = v.clone(),
                "delivery" => e.delivery = v.clone(),
                _ => e.dead_letter = v.clone(),
            }
        }
        e
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn from_micros(h: &Histogram<u64>) -> Latency {
        let ms = |v: u64| v as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// A histogram of microseconds from 1 µs to 1 hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable_histogram()))
}

fn unreachable_histogram() -> Histogram<u64> {
    // new(3) only fails for sigfig > 5; kept total to avoid a panic path.
    Histogram::new_with_max(3_600_000_000, 2).unwrap_or_else(|_| {
        Histogram::new_with_bounds(1, 2, 1).unwrap_or_else(|_| std::process::abort())
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    pub offered_rate: Option<f64>,
    pub concurrency: Option<u32>,
    pub sent: u64,
    pub accepted: u64,
    /// Refused at the door (429/503): load shedding, not loss.
    pub shed: u64,
    pub errors: u64,
    pub send_seconds: f64,
    /// Final orders per second, from the first order's creation to the last one's end.
    pub throughput: f64,
    pub statuses: BTreeMap<String, u64>,
    pub http_ms: Latency,
    pub saga_ms: Latency,
    pub lost: u64,
    /// Each invariant checked (money, stock, delivery, final): whether it held, and what was
    /// counted. Empty with `--no-check`.
    pub invariants: BTreeMap<String, Invariant>,
    pub invariants_ok: bool,
    /// The machine's speed just before the measured load ([`crate::probe`]).
    pub machine: MachineProbe,
}

/// One invariant's verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Invariant {
    pub ok: bool,
    pub detail: String,
}

struct Mix {
    users: u64,
    kill: f64,
    timeout: f64,
    funds: f64,
    stock: f64,
    initial_credits: i64,
}

impl Mix {
    fn body(&self, i: u64, stock_now: i64) -> serde_json::Value {
        // A cheap deterministic spread over the order index.
        let r = ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64) / (1u64 << 53) as f64;
        let step = ["payment", "inventory", "delivery"][(i % 3) as usize];
        let username = format!("bench-{}", i % self.users.max(1));
        let mut body = json!({"username": username, "price": 1, "amount": 1});
        let mut edge = self.kill;
        if r < edge {
            body["faults"] = json!({ step: "kill" });
            return body;
        }
        edge += self.timeout;
        if r < edge {
            body["faults"] = json!({ step: "timeout" });
            return body;
        }
        edge += self.funds;
        if r < edge {
            body["price"] = json!(self.initial_credits.saturating_add(1));
            return body;
        }
        edge += self.stock;
        if r < edge {
            // More than the stock, within the most one order may ask for (10^6 tokens);
            // with more in stock than that, the order takes it all and succeeds.
            body["price"] = json!(0);
            body["amount"] = json!(stock_now.saturating_add(1_000).min(1_000_000));
        }
        body
    }
}

struct Shared {
    http: Mutex<Histogram<u64>>,
    accepted: Mutex<BTreeSet<String>>,
    sent: AtomicU64,
    shed: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            http: Mutex::new(histogram()),
            accepted: Mutex::new(BTreeSet::new()),
            sent: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }
}

async fn send_one(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    due: Instant,
    shared: &Shared,
) {
    let result = client.post(url).json(body).send().await;
    let micros = due.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
    shared.sent.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(resp) if resp.status().is_success() => {
            let _ = shared.http.lock().await.record(micros.max(1));
            if let Ok(v) = resp.json::<serde_json::Value>().await
                && let Some(id) = v["id"].as_str()
            {
                shared.accepted.lock().await.insert(id.to_owned());
            }
        }
        Ok(resp) if resp.status() == 429 || resp.status() == 503 => {
            shared.shed.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What the bench shows while it works: a progress bar on a terminal (total, rate, ETA,
/// errors, live p99), a plain line every few seconds otherwise; nothing with `--json`'s
/// quiet phases.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: &'static str,
    total: Option<u64>,
    started: Instant,
    last_line: Instant,
    quiet: bool,
}

impl Progress {
    fn new(label: &'static str, total: Option<u64>, quiet: bool) -> Progress {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = match total {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let template = if total.is_some() {
                "{prefix:>8} [{bar:30}] {pos}/{len} ETA {eta:>3} · {msg}"
            } else {
                "{prefix:>8} {spinner} {pos} in {elapsed} · {msg}"
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            label,
            total,
            started: Instant::now(),
            last_line: Instant::now(),
            quiet,
        }
    }

    fn update(&mut self, done: u64, detail: &str) {
        if self.quiet {
            return;
        }
        if let Some(bar) = &self.bar {
            // Our own rate: indicatif's `per_sec` is unformatted and counts a jump as speed.
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            bar.set_position(done);
            if self.label == "final" {
                bar.set_message(detail.to_owned());
            } else {
                bar.set_message(format!("{:.0}/s · {detail}", done as f64 / secs));
            }
            return;
        }
        if self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            let of = self.total.map(|t| format!("/{t}")).unwrap_or_default();
            eprintln!(
                "bench: {} {done}{of} after {:.0} s · {detail}",
                self.label,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn finish(&self, done: u64, detail: &str) {
        if self.quiet {
            return;
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.finish_with_message(detail.to_owned());
        } else {
            let of = self.total.map(|t| format!("/{t}")).unwrap_or_default();
            eprintln!(
                "bench: {} {done}{of} in {:.1} s · {detail}",
                self.label,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// What the sending phase shows beside its count: errors, shed, the HTTP p99 so far.
async fn sending_detail(shared: &Shared) -> String {
    let p99 = {
        let h = shared.http.lock().await;
        (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1000.0)
    };
    format!(
        "errors {} · shed {} · HTTP p99 {}",
        shared.errors.load(Ordering::Relaxed),
        shared.shed.load(Ordering::Relaxed),
        p99.map(|p| format!("{p:.1} ms"))
            .unwrap_or_else(|| "–".into())
    )
}

/// Says what the bench is doing now (stderr: stdout is the report).
fn stage(what: &str) {
    eprintln!("bench: {what}");
}

/// Sends load for `orders` (or `duration`), returns when every request has answered.
/// How much load: a number of orders or a duration; `warmup` runs quietly with other users.
struct Span {
    orders: Option<u64>,
    duration: Option<Duration>,
    warmup: bool,
}

async fn load(
    args: &BenchArgs,
    endpoints: &Endpoints,
    client: &reqwest::Client,
    span: Span,
    shared: Arc<Shared>,
) -> anyhow::Result<f64> {
    let Span {
        orders,
        duration,
        warmup,
    } = span;
    let (quiet, offset) = if warmup {
        (true, 1u64 << 40)
    } else {
        (args.json, 0)
    };
    let mix = Arc::new(Mix {
        users: args.users,
        kill: args.kill_share,
        timeout: args.timeout_share,
        funds: args.insufficient_funds_share,
        stock: args.insufficient_stock_share,
        initial_credits: args.initial_credits,
    });
    let url = format!("{}/api/v1/orders", endpoints.order);
    let started = Instant::now();
    let within = |i: u64| match (orders, duration) {
        (Some(n), _) => i < n,
        (None, Some(d)) => started.elapsed() < d,
        (None, None) => false,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let status_of = shared.clone();
    // An open loop for a duration knows its total too: rate × duration.
    let expected = orders.or_else(|| {
        let (rate, d) = (args.rate?, duration?);
        Some((rate * d.as_secs_f64()).ceil() as u64)
    });
    let mut bar = Progress::new(if warmup { "warm-up" } else { "sending" }, expected, quiet);
    if let Some(rate) = args.rate {
        let mut i = 0u64;
        while within(i) {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            if duration.is_some() && !within(i) {
                break;
            }
            let (client, url, shared, body) = (
                client.clone(),
                url.clone(),
                shared.clone(),
                mix.body(offset + i, 0),
            );
            tasks.spawn(async move { send_one(&client, &url, &body, due, &shared).await });
            i += 1;
            while tasks.try_join_next().is_some() {}
            if !quiet && i.is_multiple_of(50) {
                bar.update(i, &sending_detail(&status_of).await);
            }
        }
    } else {
        let clients = args.concurrency.unwrap_or(16).max(1);
        let next = Arc::new(AtomicU64::new(0));
        let stop_at = duration.map(|d| started + d);
        for _ in 0..clients {
            let (client, url, shared, next, mix) = (
                client.clone(),
                url.clone(),
                shared.clone(),
                next.clone(),
                mix.clone(),
            );
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if orders.is_some_and(|n| i >= n)
                        || stop_at.is_some_and(|t| Instant::now() >= t)
                    {
                        break;
                    }
                    send_one(
                        &client,
                        &url,
                        &mix.body(offset + i, 0),
                        Instant::now(),
                        &shared,
                    )
                    .await;
                }
            });
        }
        while !tasks.is_empty() {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if !quiet {
                bar.update(
                    shared.sent.load(Ordering::Relaxed),
                    &sending_detail(&shared).await,
                );
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let secs = started.elapsed().as_secs_f64();
    let sent = shared.sent.load(Ordering::Relaxed);
    bar.finish(
        sent,
        &format!(
            "{:.0}/s · {}",
            sent as f64 / secs.max(0.001),
            sending_detail(&shared).await
        ),
    );
    Ok(secs)
}

/// Orders a second no closed loop is expected to exceed, for the restock before one: about
/// three times the fastest flood measured on this machine type (`ldt up`, 5,790/s).
const CLOSED_LOOP_CEILING: f64 = 20_000.0;

pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    if args.rate.is_none() && args.concurrency.is_none() {
        bail!(
            "choose a mode: --rate <orders/s> (open loop) or --concurrency <clients> (closed loop)"
        );
    }
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("--rate must be positive");
    }
    let shares = args.kill_share
        + args.timeout_share
        + args.insufficient_funds_share
        + args.insufficient_stock_share;
    if !(0.0..=1.0).contains(&shares) {
        bail!("the fault and insufficiency shares add up to {shares}, more than 1");
    }
    let endpoints = args.endpoints();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        .build()?;
    let orders = match (args.orders, args.duration) {
        (None, None) => Some(1000),
        (o, _) => o,
    };
    let duration = args.duration.map(Duration::from_secs_f64);

    // Restock first so the stock cannot run out by accident (each normal order takes 1). A
    // closed loop's rate is whatever the marketplace gives: on a fast host the old guess of
    // 1,000/s ran the stock out a third of the way through a flood, and the rest of the run
    // measured refusals instead of orders.
    let per_second = args.rate.unwrap_or(CLOSED_LOOP_CEILING);
    let planned = orders.unwrap_or_else(|| (per_second * args.duration.unwrap_or(60.0)) as u64 * 2);
    let warm_orders = (args.warmup * per_second) as u64;
    let restock_amount = planned.saturating_add(warm_orders).saturating_add(1000);
    stage(&format!(
        "restocking {restock_amount} tokens first, so that the stock cannot run out by accident"
    ));
    let mut restock = client
        .post(format!("{}/api/v1/inventory/restock", endpoints.inventory))
        .json(&json!({"amount": restock_amount}));
    if let Some(token) = &args.admin_token {
        restock = restock.bearer_auth(token);
    }
    let restock = restock.send().await.context("restocking before the run")?;
    if !restock.status().is_success() {
        bail!(
            "restock answered {}: {}",
            restock.status(),
            restock.text().await.unwrap_or_default()
        );
    }

    if args.warmup > 0.0 {
        stage(&format!(
            "warming up for {:.0} s (not measured)",
            args.warmup
        ));
        let shared = Shared::new();
        let span = Span {
            orders: None,
            duration: Some(Duration::from_secs_f64(args.warmup)),
            warmup: true,
        };
        load(&args, &endpoints, &client, span, shared).await?;
    }

    // Right before the load, while the marketplace is idle: what state the machine is in.
    stage("probing the machine's speed (a few seconds)");
    let machine = crate::probe::measure_async().await?;
    stage(&format!(
        "sending {} {}",
        match (orders, duration) {
            (Some(n), _) => format!("{n} orders"),
            (None, Some(d)) => format!("orders for {:.0} s", d.as_secs_f64()),
            (None, None) => "orders".into(),
        },
        match (args.rate, args.concurrency) {
            (Some(r), _) => format!("at {r}/s (open loop)"),
            (_, Some(c)) => format!("from {c} clients (closed loop)"),
            _ => String::new(),
        }
    ));
    let shared = Shared::new();
    let span = Span {
        orders,
        duration,
        warmup: false,
    };
    let send_seconds = load(&args, &endpoints, &client, span, shared.clone()).await?;

    // Wait for our orders to be final, then read their server-side timestamps.
    let checker = Checker::new(endpoints, args.initial_credits);
    let accepted = shared.accepted.lock().await.clone();
    stage(&format!(
        "waiting for {} orders to be final",
        accepted.len()
    ));
    let started = Instant::now();
    let mut bar = Progress::new("final", Some(accepted.len() as u64), args.json);
    let all = loop {
        let all = checker.orders().await?;
        let ours_pending = all
            .iter()
            .filter(|o| o.status == "PENDING" && accepted.contains(&o.id))
            .count();
        let done = (accepted.len() - ours_pending) as u64;
        let detail = format!("{ours_pending} still PENDING");
        if ours_pending == 0 || started.elapsed() > Duration::from_secs(args.settle_timeout_s) {
            bar.finish(done, &detail);
            break all;
        }
        bar.update(done, &detail);
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut saga = histogram();
    let mut statuses = BTreeMap::new();
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    let mut found = 0u64;
    for o in all.iter().filter(|o| accepted.contains(&o.id)) {
        found += 1;
        *statuses.entry(o.status.clone()).or_insert(0) += 1;
        if let Some(done) = o.finished_at_ms {
            let _ = saga.record(
                ((done - o.created_at_ms).max(0) as u64)
                    .saturating_mul(1000)
                    .max(1),
            );
            first = first.min(o.created_at_ms);
            last = last.max(done);
        }
    }
    let finals = saga.len();
    let throughput = if last > first {
        finals as f64 / ((last - first) as f64 / 1000.0)
    } else {
        0.0
    };
    let (invariants, invariants_ok) = if args.no_check {
        (BTreeMap::new(), true)
    } else {
        stage("checking the invariants");
        let report = checker.check(&all, Some(&accepted)).await?;
        let ok = report.ok();
        let verdicts = report
            .verdicts
            .into_iter()
            .map(|v| {
                (
                    v.name.to_owned(),
                    Invariant {
                        ok: v.ok,
                        detail: v.detail,
                    },
                )
            })
            .collect();
        (verdicts, ok)
    };
    let http = shared.http.lock().await;
    Ok(Report {
        mode: if args.rate.is_some() {
            "open".into()
        } else {
            "closed".into()
        },
        offered_rate: args.rate,
        concurrency: args.concurrency,
        sent: shared.sent.load(Ordering::Relaxed),
        accepted: accepted.len() as u64,
        shed: shared.shed.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        send_seconds,
        throughput,
        statuses,
        http_ms: Latency::from_micros(&http),
        saga_ms: Latency::from_micros(&saga),
        lost: accepted.len() as u64 - found,
        invariants,
        invariants_ok,
        machine,
    })
}

impl Report {
    pub fn ok(&self) -> bool {
        self.invariants_ok && self.lost == 0
    }

    pub fn human(&self) -> String {
        let lat = |l: &Latency| {
            format!(
                "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (n={})",
                l.p50, l.p90, l.p99, l.p999, l.max, l.count
            )
        };
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut out = format!(
            "mode            {}{}\nsent            {} in {:.1} s ({:.0}/s)\naccepted        {}   shed (429/503) {}   errors {}   lost {}\nthroughput      {:.1} final orders/s\nstatuses        {}\nHTTP ms         {}\nsaga ms         {}\nmachine         compute {:.1} ms  wake-up round trip {:.1} µs (measured before the run)\n",
            self.mode,
            match (self.offered_rate, self.concurrency) {
                (Some(r), _) => format!(" loop at {r}/s"),
                (_, Some(c)) => format!(" loop, {c} clients"),
                _ => String::new(),
            },
            self.sent,
            self.send_seconds,
            self.sent as f64 / self.send_seconds.max(0.001),
            self.accepted,
            self.shed,
            self.errors,
            self.lost,
            self.throughput,
            statuses.join(" "),
            lat(&self.http_ms),
            lat(&self.saga_ms),
            self.machine.compute_ms,
            self.machine.wake_us,
        );
        if self.invariants.is_empty() {
            out.push_str("invariants      not checked (--no-check)\n");
        }
        // In the order they are defined (money, stock, delivery, final).
        let order = ["money", "stock", "delivery", "final"];
        let mut names: Vec<&String> = self.invariants.keys().collect();
        names.sort_by_key(|n| order.iter().position(|o| o == n).unwrap_or(order.len()));
        for name in names {
            let v = &self.invariants[name];
            let verdict = ldt_testkit::check::Verdict {
                name: order
                    .iter()
                    .find(|o| *o == name)
                    .copied()
                    .unwrap_or("other"),
                ok: v.ok,
                detail: v.detail.clone(),
            };
            out.push_str(&verdict.to_string());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_come_from_the_histogram() {
        let mut h = histogram();
        for ms in 1..=1000u64 {
            h.record(ms * 1000).unwrap();
        }
        let l = Latency::from_micros(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
    }

    #[test]
    fn the_mix_follows_its_shares() {
        let mix = Mix {
            users: 10,
            kill: 0.1,
            timeout: 0.1,
            funds: 0.1,
            stock: 0.1,
            initial_credits: 500,
        };
        let bodies: Vec<serde_json::Value> = (0..10_000).map(|i| mix.body(i, 100)).collect();
        let kills = bodies
            .iter()
            .filter(|b| b["faults"].to_string().contains("kill"))
            .count();
        let poor = bodies.iter().filter(|b| b["price"] == 501).count();
        assert!((800..1200).contains(&kills), "{kills}");
        assert!((800..1200).contains(&poor), "{poor}");
        let users: BTreeSet<String> = bodies
            .iter()
            .map(|b| b["username"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(users.len(), 10);
    }
}
