//! A client of a running marketplace's HTTP API for the tests and the tools: the calls they
//! make (place an order, read it, wait for it to be final), polling with a deadline instead
//! of sleeping, and a stream of orders that keeps going through outages (each order retried
//! with its `Idempotency-Key` until it is accepted or refused for good).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Polls `check` every 20 ms until it gives `Some`, or `Err` with `what` once `within` has
/// passed.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if started.elapsed() >= within {
            return Err(format!("timed out after {within:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A marketplace's API at one base URL (`ldt up`, or an ingress in front of the services).
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            base: base.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `path`: the status and the JSON body (`Null` when it is not JSON); `None` when
    /// no answer came.
    pub async fn get(&self, path: &str) -> Option<(u16, Value)> {
        let resp = self.client.get(self.url(path)).send().await.ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// POST `body` to `path`, with an `Idempotency-Key` when one is given.
    pub async fn post(&self, path: &str, body: &Value, key: Option<&str>) -> Option<(u16, Value)> {
        let mut req = self.client.post(self.url(path)).json(body);
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        let resp = req.send().await.ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// Places an order through the v1 API, retrying (same key) until it is accepted or
    /// refused with a 4xx, or `within` has passed: its id, or the last answer.
    pub async fn place(&self, body: &Value, key: &str, within: Duration) -> Result<String, String> {
        self.place_counting(body, key, within, &Mutex::default())
            .await
    }

    /// [`Api::place`], counting every answer by status in `seen` (0: no answer at all).
    pub async fn place_counting(
        &self,
        body: &Value,
        key: &str,
        within: Duration,
        seen: &Mutex<BTreeMap<u16, u64>>,
    ) -> Result<String, String> {
        let started = Instant::now();
        let mut last = String::from("no answer");
        while started.elapsed() < within {
            let answer = self.post("/api/v1/orders", body, Some(key)).await;
            *seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(answer.as_ref().map_or(0, |(status, _)| *status))
                .or_default() += 1;
            match answer {
                Some((200 | 202, order)) => {
                    if let Some(id) = order["id"].as_str() {
                        return Ok(id.to_owned());
                    }
                    last = format!("an order without an id: {order}");
                }
                Some((status, err)) if (400..500).contains(&status) => {
                    return Err(format!("{status} {err}"));
                }
                Some((status, err)) => last = format!("{status} {err}"),
                None => last = "no answer".into(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("not accepted within {within:?}: {last}"))
    }

    /// An order's current status, if the order service answers.
    pub async fn status(&self, id: &str) -> Option<String> {
        match self.get(&format!("/api/v1/orders/{id}")).await {
            Some((200, order)) => order["status"].as_str().map(str::to_owned),
            _ => None,
        }
    }

    /// Waits until the order is final; its status.
    pub async fn wait_final(&self, id: &str, within: Duration) -> Result<String, String> {
        eventually(within, &format!("order {id} to be final"), || async {
            self.status(id).await.filter(|s| s != "PENDING")
        })
        .await
    }

    /// `/readyz`'s status and body.
    pub async fn ready(&self) -> Option<(u16, Value)> {
        self.get("/readyz").await
    }
}

/// Orders of an [`OrderStream`] in flight at most.
const MAX_IN_FLIGHT: usize = 256;

/// Orders sent at a steady rate in the background, each retried until accepted: what was
/// accepted is what must end final.
pub struct OrderStream {
    accepted: Arc<Mutex<BTreeSet<String>>>,
    refused: Arc<Mutex<Vec<String>>>,
    /// Every answer the stream got, by status (retries included; 0: no answer).
    seen: Arc<Mutex<BTreeMap<u16, u64>>>,
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for OrderStream {
    /// A stream dropped unfinished (a test that failed) stops sending at once.
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl OrderStream {
    /// Starts sending `per_second` orders a second from `users` users (prefixed `prefix`),
    /// a mix of good ones, insufficient funds and, with `faults`, kill and timeout faults.
    pub fn start(api: Api, per_second: u32, prefix: &str, faults: bool) -> OrderStream {
        let accepted = Arc::new(Mutex::new(BTreeSet::new()));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (acc, refs, counts, halt, prefix) = (
            accepted.clone(),
            refused.clone(),
            seen.clone(),
            stop.clone(),
            prefix.to_owned(),
        );
        let task = tokio::spawn(async move {
            let gap = Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)));
            let mut sending = tokio::task::JoinSet::new();
            // A client's connections are finite: while the marketplace cannot answer, the
            // stream waits for one instead of opening thousands (each order is retried for
            // up to two minutes).
            let connections = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
            let mut i: u64 = 0;
            let mut next = tokio::time::Instant::now();
            while !halt.is_cancelled() {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = halt.cancelled() => break,
                }
                let permit = tokio::select! {
                    permit = connections.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    _ = halt.cancelled() => break,
                };
                // After a wait, the rate resumes from now rather than catching up in a burst.
                next = (next + gap).max(tokio::time::Instant::now());
                i += 1;
                let body = order_body(&prefix, i, faults);
                let key = format!("{prefix}-{i}");
                let (api, acc, refs, counts) =
                    (api.clone(), acc.clone(), refs.clone(), counts.clone());
                sending.spawn(async move {
                    let _permit = permit;
                    match api
                        .place_counting(&body, &key, Duration::from_secs(120), &counts)
                        .await
                    {
                        Ok(id) => {
                            acc.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
                        }
                        Err(e) => refs.lock().unwrap_or_else(|e| e.into_inner()).push(e),
                    }
                });
            }
            while sending.join_next().await.is_some() {}
        });
        OrderStream {
            accepted,
            refused,
            seen,
            stop,
            task: Some(task),
        }
    }

    /// Every answer so far, by status (retries included; 0: no answer at all).
    pub fn answers(&self) -> BTreeMap<u16, u64> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops sending, waits for the orders in flight to be answered; the ids accepted and
    /// the answers of those refused.
    pub async fn finish(mut self) -> (BTreeSet<String>, Vec<String>) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let accepted = self
            .accepted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let refused = self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (accepted, refused)
    }
}

/// The `i`-th order of a stream: mostly good; every 7th beyond its user's credits; with
/// faults, every 5th fails a step and every 11th stalls one.
pub fn order_body(prefix: &str, i: u64, faults: bool) -> Value {
    let steps = ["payment", "inventory", "delivery"];
    let step = steps[(i % 3) as usize];
    // 64 users: enough that two replicas' batches seldom wait on the same rows.
    let username = format!("{prefix}-u{}", i % 64);
    let mut body =
        json!({"username": username, "price": 1 + (i % 5) as i64, "amount": 1 + (i % 3) as i64});
    if i.is_multiple_of(7) {
        body["price"] = json!(10_000);
    }
    if faults && i.is_multiple_of(5) {
        body["faults"] = json!({ step: "kill" });
    } else if faults && i.is_multiple_of(11) {
        body["faults"] = json!({ step: "timeout" });
    }
    body
}

/// The calls a test makes against a marketplace's API, for anything that knows where each
/// path is served (one address, or one per service in split mode). A test must not see a
/// connection refused or an unexpected status here, so these panic with what they got.
#[allow(async_fn_in_trait)] // used by tests on their own runtime; no Send bound needed
pub trait TestApi {
    fn http(&self) -> &reqwest::Client;
    /// The full URL of `path`.
    fn url(&self, path: &str) -> String;

    /// GET `path`: the status and the JSON body (`Null` when it is not JSON).
    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http()
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// POST `body` as JSON to `path`: the status and the JSON body.
    async fn post(&self, path: &str, body: impl Borrow<Value>) -> (u16, Value) {
        let resp = self
            .http()
            .post(self.url(path))
            .json(body.borrow())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A legacy purchase: the status and the body.
    async fn purchase(&self, body: impl Borrow<Value>) -> (u16, Value) {
        self.post("/api/purchase/", body).await
    }

    /// Places an order through the legacy API; its id.
    async fn order(&self, body: impl Borrow<Value>) -> String {
        let body = body.borrow();
        let (status, order) = self.purchase(body).await;
        assert_eq!(status, 200, "POST /api/purchase/ {body}: {order}");
        order["id"]
            .as_str()
            .unwrap_or_else(|| panic!("an order without an id: {order}"))
            .to_owned()
    }

    /// Polls the order until it is final (the order as JSON); panics after `within`.
    async fn wait_final(&self, id: &str, within: Duration) -> Value {
        self.eventually(within, &format!("order {id} to be final"), || async {
            let (status, order) = self.get(&format!("/api/v1/orders/{id}")).await;
            assert_eq!(status, 200, "GET order {id}: {order}");
            (order["status"] != "PENDING").then_some(order)
        })
        .await
    }

    /// Places an order and waits for it: its final status.
    async fn status_of(&self, body: impl Borrow<Value>) -> String {
        let id = self.order(body).await;
        let order = self.wait_final(&id, Duration::from_secs(10)).await;
        order["status"].as_str().unwrap_or_default().to_owned()
    }

    /// A user's credits; `None` for a user never seen.
    async fn credits(&self, user: &str) -> Option<i64> {
        let (status, body) = self.get(&format!("/api/v1/users/{user}")).await;
        match status {
            200 => body["credits"].as_i64(),
            404 => None,
            other => panic!("GET /api/v1/users/{user}: {other} {body}"),
        }
    }

    /// The tokens available.
    async fn stock(&self) -> i64 {
        let (status, body) = self.get("/api/v1/inventory").await;
        assert_eq!(status, 200, "GET /api/v1/inventory: {body}");
        body["available"]
            .as_i64()
            .unwrap_or_else(|| panic!("no available stock in {body}"))
    }

    /// Order ids of the user's active (DELIVERED) deliveries.
    async fn active_deliveries(&self, user: &str) -> Vec<String> {
        let (status, body) = self
            .get(&format!("/api/v1/deliveries?username={user}"))
            .await;
        assert_eq!(status, 200, "GET deliveries of {user}: {body}");
        body.as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["status"] == "DELIVERED")
            .filter_map(|d| d["order_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// The parked messages.
    async fn dead_letters(&self) -> Vec<Value> {
        let (status, body) = self.get("/api/v1/dead-letters").await;
        assert_eq!(status, 200, "GET /api/v1/dead-letters: {body}");
        body.as_array().cloned().unwrap_or_default()
    }

    /// Polls `check` until it returns `Some`, or panics after `within`.
    async fn eventually<T, F, Fut>(&self, within: Duration, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        eventually(within, what, check)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}
