//! The end-to-end scenarios, each run against every mode of the marketplace.
//! Every check is what a user of the API would look at: the order's status, the user's
//! credits, the stock, the deliveries, the dead letters.

use crate::TestApi as _;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Marketplace, user};

const FINAL: Duration = Duration::from_secs(10);

fn order(username: &str, price: i64, amount: i64) -> Value {
    json!({"username": username, "price": price, "amount": amount})
}

/// Places a legacy order and checks its final status and the books it leaves.
async fn case(m: &Marketplace, body: Value, expected: &str, debit: i64, tokens: i64) -> String {
    let name = body["username"].as_str().unwrap().to_owned();
    let credits_before = m.credits(&name).await.unwrap_or(500);
    let stock_before = m.stock().await;
    let id = m.order(&body).await;
    let done = m.wait_final(&id, FINAL).await;
    assert_eq!(done["status"], expected, "{body}");
    if expected == "TIMEOUT" {
        // The stalled step acts late; wait until it has, then check it was undone.
        m.eventually(FINAL, "the stalled step's late answer", || async {
            let (_, saga) = m.get(&format!("/api/v1/sagas/{id}")).await;
            saga["log"]
                .as_array()?
                .iter()
                .any(|e| e["event"].as_str().is_some_and(|s| s.starts_with("late:")))
                .then_some(())
        })
        .await;
    }
    assert_eq!(
        credits_before - m.credits(&name).await.unwrap_or(500),
        debit,
        "credits after {body}"
    );
    assert_eq!(stock_before - m.stock().await, tokens, "stock after {body}");
    let active = m.active_deliveries(&name).await;
    assert_eq!(
        active.contains(&id),
        expected == "SUCCESS",
        "active delivery after {body}: {active:?}"
    );
    id
}

/// Every case of the legacy contract, by status and by money, stock and deliveries.
pub async fn legacy_contract(m: &Marketplace) {
    let ok = case(m, order(&user("ok"), 10, 2), "SUCCESS", 20, 2).await;
    case(m, order(&user("poor"), 520, 1), "INSUFFICIENT_FUND", 0, 0).await;
    case(
        m,
        order(&user("greedy"), 0, 1000),
        "INSUFFICIENT_INVENTORY",
        0,
        0,
    )
    .await;
    for step in ["payment", "inventory", "deliver"] {
        let mut body = order(&user(&format!("kill-{step}")), 5, 4);
        body[format!("kill_{step}")] = json!(true);
        case(m, body, "UNKNOWN", 0, 0).await;
        let mut body = order(&user(&format!("slow-{step}")), 5, 4);
        body[format!("timeout_{step}")] = json!(true);
        case(m, body, "TIMEOUT", 0, 0).await;
    }
    // kill_create: an error, and the order is never stored.
    let (_, before) = m.get("/api/all-transaction").await;
    let mut body = order(&user("never"), 1, 1);
    body["kill_create"] = json!(true);
    let (status, err) = m.post("/api/purchase", &body).await;
    assert_eq!(status, 500, "{err}");
    let (_, after) = m.get("/api/all-transaction").await;
    assert_eq!(before, after, "kill_create stored nothing");
    // all-transaction: oldest first, the newest last, with the legacy fields.
    let list = after.as_array().unwrap();
    let last = list.last().unwrap();
    for field in ["id", "username", "amount", "status"] {
        assert!(!last[field].is_null(), "{field} in {last}");
    }
    if m.namespace.starts_with("e2e_") {
        assert_eq!(list.len(), 9);
        assert_eq!(list[0]["id"], ok.as_str());
    }
}

/// The legacy clients' timing: final within 0.5 s of the POST, TIMEOUT within 2 s (idle).
pub async fn legacy_timing(m: &Marketplace) {
    // Warm the connection pools: the contract is about a running system.
    let warm = m.order(&order(&user("warm"), 1, 1)).await;
    m.wait_final(&warm, FINAL).await;
    for (flag, limit) in [
        (None, Duration::from_millis(500)),
        (Some("kill_inventory"), Duration::from_millis(500)),
        (Some("timeout_inventory"), Duration::from_secs(2)),
    ] {
        let mut body = order(&user("clock"), 1, 1);
        if let Some(flag) = flag {
            body[flag] = json!(true);
        }
        let started = Instant::now();
        let id = m.order(&body).await;
        let done = m.wait_final(&id, FINAL).await;
        let took = started.elapsed();
        assert!(
            took <= limit,
            "{flag:?}: final ({}) after {took:?}, contract says {limit:?}",
            done["status"]
        );
    }
}

/// Many simultaneous orders: one user never goes below zero, the stock is never oversold.
pub async fn concurrency(m: &Marketplace) {
    let name = user("rush");
    let ids = futures_join(m, (0..20).map(|_| order(&name, 100, 1)).collect()).await;
    let mut success = 0;
    for id in &ids {
        match m.wait_final(id, FINAL).await["status"].as_str().unwrap() {
            "SUCCESS" => success += 1,
            "INSUFFICIENT_FUND" => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(success, 5, "500 credits pay for five orders of 100");
    assert_eq!(m.credits(&name).await, Some(0));
    assert_eq!(m.active_deliveries(&name).await.len(), 5);

    // Stock: free tokens (price 0) so only the stock limits; more asked than there is.
    let available = m.stock().await;
    let per_order = (available / 10).max(1);
    let orders: Vec<Value> = (0..15)
        .map(|i| order(&user(&format!("grab{i}")), 0, per_order))
        .collect();
    let ids = futures_join(m, orders).await;
    let mut success = 0;
    for id in &ids {
        match m.wait_final(id, FINAL).await["status"].as_str().unwrap() {
            "SUCCESS" => success += 1,
            "INSUFFICIENT_INVENTORY" => {}
            other => panic!("unexpected {other}"),
        }
    }
    let expected = (available / per_order).min(15);
    assert_eq!(success, expected);
    assert_eq!(m.stock().await, available - expected * per_order);
    assert!(m.stock().await >= 0);
}

pub async fn futures_join(m: &Marketplace, bodies: Vec<Value>) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let client = m.client.clone();
        let url = m.url("/api/purchase/");
        tasks.spawn(async move {
            let resp = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let v: Value = resp.json().await.unwrap();
            (i, v["id"].as_str().unwrap().to_owned())
        });
    }
    let mut ids = tasks.join_all().await;
    ids.sort();
    ids.into_iter().map(|(_, id)| id).collect()
}

/// A step stalled past its deadline: other orders pass it, and its late effect is undone.
pub async fn stalled_step(m: &Marketplace) {
    let slow_user = user("stall");
    let mut slow = order(&slow_user, 50, 2);
    slow["timeout_payment"] = json!(true);
    let stock = m.stock().await;
    let slow_id = m.order(&slow).await;
    let fast_id = m.order(&order(&user("pass"), 1, 1)).await;
    let fast = m.wait_final(&fast_id, FINAL).await;
    assert_eq!(fast["status"], "SUCCESS");
    let slow_done = m.wait_final(&slow_id, FINAL).await;
    assert_eq!(slow_done["status"], "TIMEOUT");
    assert!(fast["finished_at_ms"].as_i64() < slow_done["finished_at_ms"].as_i64());
    // After the stall the debit comes in late and is refused: the money never leaves.
    m.eventually(FINAL, "the late debit", || async {
        let (_, saga) = m.get(&format!("/api/v1/sagas/{slow_id}")).await;
        saga["log"]
            .as_array()?
            .iter()
            .any(|e| e["event"].as_str().is_some_and(|s| s.starts_with("late:")))
            .then_some(())
    })
    .await;
    assert_eq!(m.credits(&slow_user).await.unwrap_or(500), 500);
    assert_eq!(m.stock().await, stock - 1);
}

/// Messages nobody can process end up in the dead letters; the service keeps working.
pub async fn poison(m: &Marketplace) {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let garbage = format!("garbage-{tag}");
    let unknown = format!("unknown-{tag}");
    m.publish_raw("payment", &garbage, b"{this is not json")
        .await;
    m.publish_raw(
        "inventory",
        &unknown,
        format!(
            r#"{{"v":1,"id":"{0}","order_id":"{0}","at_ms":0,"type":"teleport"}}"#,
            uuid::Uuid::new_v4()
        )
        .as_bytes(),
    )
    .await;
    let letters = m
        .eventually(FINAL, "both dead letters", || async {
            let (_, all) = m.get("/api/v1/dead-letters?limit=1000").await;
            let all = all.as_array()?.clone();
            let found: Vec<Value> = all
                .into_iter()
                .filter(|d| d["id"] == garbage.as_str() || d["id"] == unknown.as_str())
                .collect();
            (found.len() == 2).then_some(found)
        })
        .await;
    for letter in &letters {
        assert!(!letter["reason"].as_str().unwrap().is_empty(), "{letter}");
    }
    // Both services still work.
    case(m, order(&user("after-poison"), 3, 3), "SUCCESS", 9, 3).await;
    // A replay sends it back; it is still poison, so it is parked again.
    let (status, _) = m
        .post(
            &format!("/api/v1/dead-letters/{garbage}/replay"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200);
    m.eventually(FINAL, "the replayed letter parked again", || async {
        let (_, all) = m.get("/api/v1/dead-letters?limit=1000").await;
        all.as_array()?
            .iter()
            .any(|d| d["id"] == garbage.as_str() && d["times_parked"] == 2)
            .then_some(())
    })
    .await;
}

/// Malformed and invalid requests: 4xx, a JSON error naming the problem, nothing stored.
pub async fn bad_input(m: &Marketplace) {
    let name = user("bad");
    let (_, before) = m.get("/api/all-transaction").await;
    let stock = m.stock().await;
    let cases = [
        ("{oops".to_owned(), 400, "malformed"),
        (
            json!({"price": 1, "amount": 1}).to_string(),
            422,
            "username",
        ),
        (
            json!({"username": name, "price": 1}).to_string(),
            422,
            "amount",
        ),
        (
            json!({"username": name, "price": 1, "amount": 0}).to_string(),
            422,
            "amount",
        ),
        (
            json!({"username": name, "price": 1, "amount": -1}).to_string(),
            422,
            "amount",
        ),
        (
            json!({"username": name, "price": -5, "amount": 1}).to_string(),
            422,
            "price",
        ),
        (
            json!({"username": name, "price": i64::MAX, "amount": 3}).to_string(),
            422,
            "at most",
        ),
        (
            json!({"username": "", "price": 1, "amount": 1}).to_string(),
            422,
            "username",
        ),
        (
            json!({"username": "u".repeat(200), "price": 1, "amount": 1}).to_string(),
            422,
            "username",
        ),
    ];
    for (body, status, needle) in cases {
        let resp = m
            .client
            .post(m.url("/api/purchase/"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains(needle)
                || err["error"].as_str().unwrap().contains(needle),
            "{body}: {err} should name {needle}"
        );
    }
    let (_, after) = m.get("/api/all-transaction").await;
    assert_eq!(before, after);
    assert_eq!(m.credits(&name).await, None);
    assert_eq!(m.stock().await, stock);
}

/// The v1 API, its OpenAPI document and Swagger UI, and the health endpoints.
pub async fn v1_api(m: &Marketplace) {
    let name = user("v1");
    let resp = m
        .client
        .post(m.url("/api/v1/orders"))
        .json(&json!({"username": name, "price": 4, "amount": 2, "faults": {"inventory": "kill"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let placed: Value = resp.json().await.unwrap();
    assert_eq!(placed["status"], "PENDING");
    let id = placed["id"].as_str().unwrap();
    assert_eq!(location, format!("/api/v1/orders/{id}"));
    assert_eq!(m.wait_final(id, FINAL).await["status"], "UNKNOWN");
    let (status, saga) = m.get(&format!("/api/v1/sagas/{id}")).await;
    assert_eq!(status, 200);
    let events: Vec<(String, String)> = saga["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(events.contains(&("refund".into(), "sent".into())), "{saga}");
    assert!(
        events.contains(&("compensated".into(), "done".into())),
        "{saga}"
    );
    assert_eq!(m.credits(&name).await, Some(500));
    let (status, page) = m.get(&format!("/api/v1/orders?username={name}")).await;
    assert_eq!(status, 200);
    assert_eq!(page["orders"][0]["id"], id);
    assert_eq!(
        m.get("/api/v1/orders/01900000-0000-7000-8000-000000000000")
            .await
            .0,
        404
    );
    assert_eq!(m.get("/api/v1/users/nobody-at-all").await.0, 404);
    assert_eq!(m.get("/api/v1/sagas/nope").await.0, 404);
    // Restock adds stock.
    let before = m.stock().await;
    let (status, inv) = m
        .post("/api/v1/inventory/restock", &json!({"amount": 5}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(inv["available"].as_i64().unwrap(), before + 5);
    // Docs and health, on every process.
    for service in crate::SERVICES {
        let base = &m.bases[service];
        let spec: Value = m
            .client
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            spec["paths"].as_object().is_some_and(|p| !p.is_empty()),
            "{service}: {spec}"
        );
        let docs = m.client.get(format!("{base}/docs/")).send().await.unwrap();
        assert_eq!(docs.status(), 200);
        assert_eq!(
            m.client
                .get(format!("{base}/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(
            m.client
                .get(format!("{base}/readyz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let (_, spec) = m.get("/openapi.json").await;
    assert!(spec["paths"]["/api/purchase/"].is_object());
}
