//! The marketplace's four invariants, checked from the outside through the services' own HTTP APIs
//! (so it works against any running marketplace, whatever its shape):
//!
//! 1. money: for every user, initial credits − credits = Σ price × amount of its SUCCESS orders;
//! 2. stock: initial + restocked − available = Σ amount of SUCCESS orders;
//! 3. delivery: exactly one active delivery per SUCCESS order, none for any other order;
//! 4. no order is PENDING (after waiting for them), and no order that was accepted is missing.
//!
//! Used by `ldt chaos` and `ldt bench` after their runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use serde::Deserialize;

/// Where each service's API answers (all the same for `ldt up` or behind an ingress).
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub order: String,
    pub payment: String,
    pub inventory: String,
    pub delivery: String,
    pub dead_letter: String,
}

impl Endpoints {
    pub fn single(base: &str) -> Endpoints {
        let base = base.trim_end_matches('/').to_owned();
        Endpoints {
            order: base.clone(),
            payment: base.clone(),
            inventory: base.clone(),
            delivery: base.clone(),
            dead_letter: base,
        }
    }
}

/// An order as the order service reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct OrderRecord {
    pub id: String,
    pub username: String,
    pub price: i64,
    pub amount: i64,
    pub status: String,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

#[derive(Deserialize)]
struct Page {
    orders: Vec<OrderRecord>,
    next: Option<i64>,
}

#[derive(Deserialize)]
struct Inventory {
    available: i64,
    initial: i64,
    restocked: i64,
}

#[derive(Deserialize)]
struct Delivery {
    order_id: String,
    status: String,
}

pub struct Checker {
    pub client: reqwest::Client,
    pub endpoints: Endpoints,
    /// The credits every user started with.
    pub initial_credits: i64,
}

/// One invariant's verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        write!(f, "invariant {:<9} {mark} {}", self.name, self.detail)
    }
}

/// What the check found.
#[derive(Debug, Clone)]
pub struct Report {
    pub orders: usize,
    pub by_status: BTreeMap<String, usize>,
    pub dead_letters: usize,
    pub verdicts: Vec<Verdict>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.verdicts.iter().all(|v| v.ok)
    }
}

impl Checker {
    pub fn new(endpoints: Endpoints, initial_credits: i64) -> Checker {
        Checker {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            endpoints,
            initial_credits,
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, url: String) -> anyhow::Result<Option<T>> {
        let resp = self
            .client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            bail!("GET {url}: {}", resp.status());
        }
        Ok(Some(
            resp.json()
                .await
                .with_context(|| format!("GET {url}: body"))?,
        ))
    }

    /// Every order, oldest first.
    pub async fn orders(&self) -> anyhow::Result<Vec<OrderRecord>> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let url = format!(
                "{}/api/v1/orders?limit=10000&after={after}",
                self.endpoints.order
            );
            let page: Page = self.get(url).await?.context("orders list answered 404")?;
            all.extend(page.orders);
            match page.next {
                Some(n) => after = n,
                None => return Ok(all),
            }
        }
    }

    /// Waits until no order is PENDING, or `within` has passed; returns the orders.
    pub async fn wait_all_final(&self, within: Duration) -> anyhow::Result<Vec<OrderRecord>> {
        let started = Instant::now();
        loop {
            match self.orders().await {
                Ok(orders) => {
                    let pending = orders.iter().filter(|o| o.status == "PENDING").count();
                    if pending == 0 || started.elapsed() >= within {
                        return Ok(orders);
                    }
                }
                Err(e) if started.elapsed() >= within => return Err(e),
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Checks the four invariants over `orders`. `accepted` are the ids the caller was told
    /// were stored; each must be among the orders.
    pub async fn check(
        &self,
        orders: &[OrderRecord],
        accepted: Option<&BTreeSet<String>>,
    ) -> anyhow::Result<Report> {
        let mut by_status = BTreeMap::new();
        let mut spent: BTreeMap<&str, i64> = BTreeMap::new();
        let mut success_ids: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut tokens: i64 = 0;
        let mut overflow = false;
        for o in orders {
            *by_status.entry(o.status.clone()).or_insert(0) += 1;
            spent.entry(&o.username).or_insert(0);
            success_ids.entry(&o.username).or_default();
            if o.status == "SUCCESS" {
                let total = o.price.checked_mul(o.amount);
                match total.and_then(|t| spent[o.username.as_str()].checked_add(t)) {
                    Some(s) => {
                        spent.insert(&o.username, s);
                    }
                    None => overflow = true,
                }
                tokens = tokens.checked_add(o.amount).unwrap_or_else(|| {
                    overflow = true;
                    0
                });
                success_ids.entry(&o.username).or_default().insert(&o.id);
            }
        }
        let mut verdicts = Vec::new();

        // 1. money
        let users: Vec<&str> = spent.keys().copied().collect();
        let credits: Vec<anyhow::Result<(String, Option<i64>)>> =
            futures_util::stream::iter(users.iter())
                .map(|u| async move {
                    #[derive(Deserialize)]
                    struct User {
                        credits: i64,
                    }
                    let url = format!("{}/api/v1/users/{}", self.endpoints.payment, urlencode(u));
                    let user: Option<User> = self.get(url).await?;
                    Ok(((*u).to_owned(), user.map(|u| u.credits)))
                })
                .buffer_unordered(16)
                .collect()
                .await;
        let mut money_bad = Vec::new();
        for c in credits {
            let (user, credits) = c?;
            let now = credits.unwrap_or(self.initial_credits);
            let expected = self.initial_credits.checked_sub(spent[user.as_str()]);
            if Some(now) != expected || now < 0 {
                money_bad.push(format!(
                    "{user}: credits {now}, expected {}",
                    expected.map_or_else(|| "overflow".to_owned(), |e| e.to_string())
                ));
            }
        }
        verdicts.push(Verdict {
            name: "money",
            ok: money_bad.is_empty() && !overflow,
            detail: if money_bad.is_empty() {
                format!(
                    "{} users: initial − credits = Σ price × amount of SUCCESS orders",
                    users.len()
                )
            } else {
                format!(
                    "{} users off: {}",
                    money_bad.len(),
                    money_bad
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            },
        });

        // 2. stock
        let inv: Inventory = self
            .get(format!("{}/api/v1/inventory", self.endpoints.inventory))
            .await?
            .context("inventory answered 404")?;
        let reserved = inv
            .initial
            .checked_add(inv.restocked)
            .and_then(|s| s.checked_sub(inv.available));
        verdicts.push(Verdict {
            name: "stock",
            ok: reserved == Some(tokens) && inv.available >= 0,
            detail: format!(
                "initial {} + restocked {} − available {} = {}; SUCCESS orders took {tokens}",
                inv.initial,
                inv.restocked,
                inv.available,
                reserved.map_or_else(|| "overflow".to_owned(), |r| r.to_string())
            ),
        });

        // 3. delivery
        let deliveries: Vec<anyhow::Result<(String, BTreeSet<String>)>> =
            futures_util::stream::iter(users.iter())
                .map(|u| async move {
                    let url = format!(
                        "{}/api/v1/deliveries?username={}&limit=10000",
                        self.endpoints.delivery,
                        urlencode(u)
                    );
                    let list: Vec<Delivery> = self.get(url).await?.unwrap_or_default();
                    let active = list
                        .into_iter()
                        .filter(|d| d.status == "DELIVERED")
                        .map(|d| d.order_id)
                        .collect();
                    Ok(((*u).to_owned(), active))
                })
                .buffer_unordered(16)
                .collect()
                .await;
        let mut delivery_bad = Vec::new();
        let mut active_total = 0;
        for d in deliveries {
            let (user, active) = d?;
            active_total += active.len();
            let want: BTreeSet<String> = success_ids[user.as_str()]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            if active != want {
                let extra = active.difference(&want).count();
                let missing = want.difference(&active).count();
                delivery_bad.push(format!("{user}: {extra} active deliveries without a SUCCESS order, {missing} SUCCESS orders undelivered"));
            }
        }
        let successes = by_status.get("SUCCESS").copied().unwrap_or(0);
        verdicts.push(Verdict {
            name: "delivery",
            ok: delivery_bad.is_empty(),
            detail: if delivery_bad.is_empty() {
                format!("{active_total} active deliveries for {successes} SUCCESS orders, none for the others")
            } else {
                delivery_bad.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            },
        });

        // 4. nothing pending, nothing lost
        let pending = by_status.get("PENDING").copied().unwrap_or(0);
        let missing = match accepted {
            Some(ids) => {
                let known: BTreeSet<&str> = orders.iter().map(|o| o.id.as_str()).collect();
                ids.iter().filter(|id| !known.contains(id.as_str())).count()
            }
            None => 0,
        };
        verdicts.push(Verdict {
            name: "final",
            ok: pending == 0 && missing == 0,
            detail: format!(
                "{} orders, {pending} PENDING, {missing} accepted orders missing",
                orders.len()
            ),
        });

        #[derive(Deserialize)]
        struct Letter {}
        let letters: Vec<Letter> = self
            .get(format!(
                "{}/api/v1/dead-letters?limit=10000",
                self.endpoints.dead_letter
            ))
            .await?
            .unwrap_or_default();
        Ok(Report {
            orders: orders.len(),
            by_status,
            dead_letters: letters.len(),
            verdicts,
        })
    }
}

/// Percent-encodes a path or query component.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_components() {
        assert_eq!(urlencode("ann b/ü"), "ann%20b%2F%C3%BC");
    }

    #[test]
    fn verdicts_print_one_line_each() {
        let v = Verdict {
            name: "money",
            ok: false,
            detail: "x".into(),
        };
        assert_eq!(v.to_string(), "invariant money     FAIL x");
    }
}
