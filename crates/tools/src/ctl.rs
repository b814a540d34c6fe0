//! `ldt orders`, `ldt sagas`, `ldt dead-letters`: a running marketplace operated from the
//! command line, through its HTTP API (the same the console uses). Human tables by default,
//! `--json` for scripts; the admin token for the actions that need it.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

/// Which marketplace, and how to talk to it.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The marketplace's address (`ldt up`, an ingress, or any process run with
    /// `--service-url` for the others).
    #[arg(
        long,
        env = "LDT_URL",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    pub url: String,
    /// The admin token, for the actions that change something.
    #[arg(long, env = "LDT_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub admin_token: Option<String>,
    /// JSON as the API answers it, instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum OrdersCmd {
    /// The most recent orders, newest first.
    List {
        /// Only orders with this status (e.g. PENDING, TIMEOUT).
        #[arg(long)]
        status: Option<String>,
        /// Only this user's orders.
        #[arg(long)]
        username: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=10000))]
        limit: i64,
    },
    /// One order and its saga's timeline.
    Show { id: String },
    /// Cancel a PENDING order: every step it took is undone and it ends CANCELLED.
    Cancel { id: String },
}

#[derive(Debug, Clone, Subcommand)]
pub enum SagasCmd {
    /// Sagas whose compensation cannot succeed until an operator retries it.
    Stuck,
    /// Sagas compensating for longer than a threshold.
    Compensating {
        /// Unchanged for at least this many seconds.
        #[arg(long, default_value_t = 10)]
        older_than_s: u64,
    },
    /// Try a stuck (or unanswered) compensation again, once its cause is mended.
    Retry { order_id: String },
}

#[derive(Debug, Clone, Subcommand)]
pub enum DeadLettersCmd {
    /// Parked messages, oldest first.
    List {
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10000))]
        limit: i64,
    },
    /// Send a parked message back to the queue it came from.
    Replay { id: String },
}

struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    fn new(target: &Target) -> Client {
        Client {
            base: target.url.trim_end_matches('/').to_owned(),
            token: target.admin_token.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap_or_default(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if method == reqwest::Method::POST {
            req = req.json(&serde_json::json!({}));
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("no answer from {}", self.base))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body["message"].as_str().unwrap_or("no message");
            if status == reqwest::StatusCode::UNAUTHORIZED {
                bail!("{status}: {message} (pass --admin-token or set LDT_ADMIN_TOKEN)");
            }
            bail!("{status}: {message}");
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path).await
    }

    async fn post(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path).await
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A table with aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// A wall-clock time (UTC) for milliseconds since the Unix epoch: `2026-12-05 14:03:07.123Z`.
pub fn wall_clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn faults(order: &Value) -> String {
    let Some(map) = order["faults"].as_object() else {
        return String::new();
    };
    let mut parts: Vec<String> = map
        .iter()
        .map(|(k, v)| format!("{k}:{}", text(v)))
        .collect();
    if order["fault_source"] == "flags" {
        parts.push("(flags)".into());
    }
    parts.join(" ")
}

fn duration(order: &Value) -> String {
    match (
        order["created_at_ms"].as_i64(),
        order["finished_at_ms"].as_i64(),
    ) {
        (Some(c), Some(f)) => format!("{} ms", f.saturating_sub(c)),
        _ => "—".into(),
    }
}

pub async fn orders(target: &Target, cmd: OrdersCmd) -> anyhow::Result<()> {
    let client = Client::new(target);
    match cmd {
        OrdersCmd::List {
            status,
            username,
            limit,
        } => {
            let mut path = format!("/api/v1/orders?newest_first=true&limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={}", s.to_uppercase()));
            }
            if let Some(u) = username {
                path.push_str(&format!("&username={}", ldt_testkit::check::urlencode(&u)));
            }
            let page = client.get(&path).await?;
            if target.json {
                print_json(&page);
                return Ok(());
            }
            let rows = page["orders"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|o| {
                    vec![
                        text(&o["id"]),
                        text(&o["username"]),
                        format!("{} × {}", text(&o["price"]), text(&o["amount"])),
                        text(&o["status"]),
                        faults(o),
                        o["created_at_ms"]
                            .as_i64()
                            .map(wall_clock)
                            .unwrap_or_default(),
                        duration(o),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "USER",
                        "PRICE × AMOUNT",
                        "STATUS",
                        "FAULTS",
                        "CREATED",
                        "TOOK"
                    ],
                    rows
                )
            );
        }
        OrdersCmd::Show { id } => {
            let order = client.get(&format!("/api/v1/orders/{id}")).await?;
            let saga = client.get(&format!("/api/v1/sagas/{id}")).await.ok();
            if target.json {
                print_json(&serde_json::json!({"order": order, "saga": saga}));
                return Ok(());
            }
            println!("order     {}", text(&order["id"]));
            println!("user      {}", text(&order["username"]));
            println!(
                "price     {} × {}",
                text(&order["price"]),
                text(&order["amount"])
            );
            println!("status    {}", text(&order["status"]));
            let f = faults(&order);
            if !f.is_empty() {
                println!("faults    {f}");
            }
            if let Some(c) = order["created_at_ms"].as_i64() {
                println!("created   {}", wall_clock(c));
            }
            if let Some(f) = order["finished_at_ms"].as_i64() {
                println!("finished  {} (took {})", wall_clock(f), duration(&order));
            }
            let Some(saga) = saga else {
                println!("saga      not started yet");
                return Ok(());
            };
            println!("saga      {}", text(&saga["phase"]));
            if let Some(p) = saga["pending_compensations"]
                .as_array()
                .filter(|p| !p.is_empty())
            {
                println!(
                    "pending   {}",
                    p.iter().map(text).collect::<Vec<_>>().join(", ")
                );
            }
            if saga["stuck_reason"].is_string() {
                println!("STUCK     {}", text(&saga["stuck_reason"]));
            }
            let log = saga["log"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let first = log.first().and_then(|e| e["at_ms"].as_i64()).unwrap_or(0);
            let rows = log
                .iter()
                .map(|e| {
                    let at = e["at_ms"].as_i64().unwrap_or(0);
                    vec![
                        wall_clock(at),
                        format!("+{} ms", at.saturating_sub(first)),
                        text(&e["step"]),
                        text(&e["kind"]),
                        text(&e["event"]),
                    ]
                })
                .collect();
            println!();
            print!("{}", table(&["AT", "", "STEP", "KIND", "EVENT"], rows));
        }
        OrdersCmd::Cancel { id } => {
            let order = client.post(&format!("/api/v1/orders/{id}/cancel")).await?;
            if target.json {
                print_json(&order);
            } else {
                println!(
                    "cancellation of order {} requested; it ends CANCELLED once its steps are undone",
                    text(&order["id"])
                );
            }
        }
    }
    Ok(())
}

fn saga_rows(page: &Value) -> Vec<Vec<String>> {
    page["sagas"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| {
            vec![
                text(&s["order_id"]),
                text(&s["phase"]),
                s["pending_compensations"]
                    .as_array()
                    .map(|p| p.iter().map(text).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
                text(&s["attempts"]),
                s["updated_at_ms"]
                    .as_i64()
                    .map(wall_clock)
                    .unwrap_or_default(),
                text(&s["stuck_reason"]),
            ]
        })
        .collect()
}

pub async fn sagas(target: &Target, cmd: SagasCmd) -> anyhow::Result<()> {
    let client = Client::new(target);
    let path = match cmd {
        SagasCmd::Stuck => "/api/v1/sagas?state=stuck&limit=1000".to_owned(),
        SagasCmd::Compensating { older_than_s } => format!(
            "/api/v1/sagas?phase=compensating&older_than_ms={}&limit=1000",
            older_than_s.saturating_mul(1000)
        ),
        SagasCmd::Retry { order_id } => {
            let saga = client
                .post(&format!("/api/v1/sagas/{order_id}/retry"))
                .await?;
            if target.json {
                print_json(&saga);
            } else {
                println!(
                    "the compensation of order {order_id} is sent again ({} still to apply)",
                    saga["pending_compensations"]
                        .as_array()
                        .map(|p| p.iter().map(text).collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                );
            }
            return Ok(());
        }
    };
    let page = client.get(&path).await?;
    if target.json {
        print_json(&page);
        return Ok(());
    }
    let rows = saga_rows(&page);
    if rows.is_empty() {
        println!("none");
    } else {
        print!(
            "{}",
            table(
                &[
                    "ORDER",
                    "PHASE",
                    "PENDING",
                    "TRIES",
                    "CHANGED",
                    "STUCK BECAUSE"
                ],
                rows
            )
        );
    }
    Ok(())
}

pub async fn dead_letters(target: &Target, cmd: DeadLettersCmd) -> anyhow::Result<()> {
    let client = Client::new(target);
    match cmd {
        DeadLettersCmd::List { limit } => {
            let letters = client
                .get(&format!("/api/v1/dead-letters?limit={limit}"))
                .await?;
            if target.json {
                print_json(&letters);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = letters
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|l| {
                    vec![
                        text(&l["id"]),
                        text(&l["origin_queue"]),
                        l["parked_at_ms"]
                            .as_i64()
                            .map(wall_clock)
                            .unwrap_or_default(),
                        text(&l["times_parked"]),
                        l["replayed_at_ms"]
                            .as_i64()
                            .map(wall_clock)
                            .unwrap_or_else(|| "—".into()),
                        text(&l["reason"]).chars().take(80).collect(),
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!("none");
            } else {
                print!(
                    "{}",
                    table(
                        &["ID", "FROM", "PARKED", "TIMES", "REPLAYED", "REASON"],
                        rows
                    )
                );
            }
        }
        DeadLettersCmd::Replay { id } => {
            let letter = client
                .post(&format!("/api/v1/dead-letters/{id}/replay"))
                .await?;
            if target.json {
                print_json(&letter);
            } else {
                println!(
                    "dead letter {} sent back to {}",
                    text(&letter["id"]),
                    text(&letter["origin_queue"])
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_times_are_utc_with_milliseconds() {
        assert_eq!(wall_clock(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(wall_clock(1_796_446_383_999), "2026-12-05 04:53:03.999Z");
        assert_eq!(wall_clock(951_782_400_000), "2000-02-29 00:00:00.000Z");
    }

    #[test]
    fn tables_align_their_columns() {
        let t = table(
            &["A", "LONGER"],
            vec![
                vec!["xyz".into(), "1".into()],
                vec!["k".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nk    22\n");
    }
}
