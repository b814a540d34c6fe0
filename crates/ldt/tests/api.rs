//! Bad HTTP input gets a 4xx with a JSON error naming the problem, and changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use ldt_testkit::client::TestApi as _;

use common::{ALL, Stack, order_body, spawn_on, user};
use futures_util::FutureExt;
use serde_json::json;
use std::time::Duration;

async fn bad_orders_are_rejected_with_a_reason_and_store_nothing(stack: Stack) {
    let app = spawn_on(stack, &ALL, &[]).await;
    let long = "x".repeat(65);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "/api/purchase/",
            "{not json".into(),
            400,
            "malformed_request",
        ),
        (
            "/api/purchase",
            json!({"price": 1, "amount": 1}).to_string(),
            422,
            "username",
        ),
        (
            "/api/purchase/",
            json!({"username": "a", "price": "1", "amount": 1}).to_string(),
            422,
            "price",
        ),
        (
            "/api/purchase/",
            json!({"username": "a", "price": 1, "amount": 0}).to_string(),
            422,
            "amount",
        ),
        (
            "/api/purchase/",
            json!({"username": "a", "price": 1, "amount": -2}).to_string(),
            422,
            "amount",
        ),
        (
            "/api/purchase/",
            json!({"username": "a", "price": -1, "amount": 1}).to_string(),
            422,
            "price",
        ),
        (
            "/api/purchase/",
            json!({"username": "a", "price": i64::MAX, "amount": 2}).to_string(),
            422,
            "price must be at most",
        ),
        (
            "/api/purchase/",
            json!({"username": "", "price": 1, "amount": 1}).to_string(),
            422,
            "empty",
        ),
        (
            "/api/purchase/",
            json!({"username": long, "price": 1, "amount": 1}).to_string(),
            422,
            "at most",
        ),
        (
            "/api/purchase/",
            json!({"username": "a", "price": 1, "amount": 1e30}).to_string(),
            422,
            "amount",
        ),
        (
            "/api/v1/orders",
            json!({"username": "a", "price": 1, "amount": 1, "faults": {"payment": "explode"}})
                .to_string(),
            422,
            "explode",
        ),
        (
            "/api/v1/orders",
            json!({"username": "a", "price": 1, "amount": 1, "faults": {"shipping": "kill"}})
                .to_string(),
            422,
            "shipping",
        ),
        (
            "/api/v1/orders",
            json!({"username": "a", "price": 1, "amount": 1, "colour": "red"}).to_string(),
            422,
            "colour",
        ),
        (
            "/api/v1/inventory/restock",
            json!({"amount": 0}).to_string(),
            422,
            "positive",
        ),
        (
            "/api/v1/inventory/restock",
            json!({"amount": i64::MAX}).to_string(),
            422,
            "at most 1000000000000000",
        ),
        (
            // The overflow reproduction of the fault-matrix issue: above the documented
            // maximum, whatever the stock now.
            "/api/v1/inventory/restock",
            json!({"amount": 9_223_372_036_854_775_317i64}).to_string(),
            422,
            "at most 1000000000000000",
        ),
        (
            "/api/v1/inventory/restock",
            json!({"amount": ldt_contract::MAX_QUANTITY - 499}).to_string(),
            409,
            "past its maximum",
        ),
    ];
    for (path, body, status, needle) in cases {
        let resp = app
            .client
            .post(app.url(path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path} {body}");
        let err: serde_json::Value = resp.json().await.unwrap();
        let text = err.to_string();
        assert!(
            err["error"].is_string() && err["message"].is_string(),
            "{text}"
        );
        assert!(
            text.contains(needle),
            "{path} {body}: {text} should mention {needle}"
        );
    }
    // Without a content type the body is still read as JSON, and judged as JSON.
    let resp = app
        .client
        .post(app.url("/api/purchase/"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let resp = app
        .client
        .post(app.url("/api/purchase/"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // Nothing was stored, nobody was charged, no stock moved.
    let (_, all) = app.get("/api/all-transaction").await;
    assert_eq!(all, json!([]));
    assert_eq!(app.credits("a").await, None);
    assert_eq!(app.stock().await, 500);
    let (status, err) = app.get("/api/v1/users/nobody").await;
    assert_eq!((status, err["error"].as_str()), (404, Some("not_found")));
    let (status, _) = app.get("/api/v1/orders?status=NOPE").await;
    assert_eq!(status, 422);
    let (status, _) = app.get("/api/v1/orders?limit=0").await;
    assert_eq!(status, 422);
}

async fn health_openapi_and_swagger_are_served(stack: Stack) {
    let app = spawn_on(stack, &ALL, &[]).await;
    assert_eq!(app.get("/healthz").await.0, 200);
    let (status, ready) = app.get("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
    let (status, spec) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/api/purchase/",
        "/api/all-transaction",
        "/api/v1/orders",
        "/api/v1/orders/{id}",
        "/api/v1/sagas/{order_id}",
        "/api/v1/users/{username}",
        "/api/v1/inventory",
        "/api/v1/inventory/restock",
        "/api/v1/deliveries",
        "/api/v1/dead-letters",
        "/api/v1/dead-letters/{id}/replay",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
    let docs = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(
        docs.text().await.unwrap().contains("swagger"),
        "Swagger UI page"
    );
}

async fn restock_adds_to_the_stock(stack: Stack) {
    let app = spawn_on(stack, &ALL, &["--initial-stock", "3"]).await;
    let resp = app
        .client
        .post(app.url("/api/v1/inventory/restock"))
        .json(&json!({"amount": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let inv: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(inv, json!({"available": 10, "initial": 3, "restocked": 7}));
    // Up to the documented maximum, every token ever stocked counted; not one more.
    let max = ldt_contract::MAX_QUANTITY;
    let (status, inv) = app
        .post("/api/v1/inventory/restock", json!({"amount": max - 10}))
        .await;
    assert_eq!(status, 200, "{inv}");
    assert_eq!(inv["available"], json!(max));
    let (status, err) = app
        .post("/api/v1/inventory/restock", json!({"amount": 1}))
        .await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(app.stock().await, max, "a refused restock changes nothing");
}

async fn a_full_marketplace_sheds_new_orders_with_retry_after(stack: Stack) {
    // Three orders stalled at payment fill a marketplace that admits three in flight.
    let app = spawn_on(
        stack,
        &ALL,
        &["--max-pending", "3", "--step-timeout-ms", "3000"],
    )
    .await;
    let post = |key: &'static str, user: &'static str| {
        let req = app
            .client
            .post(app.url("/api/v1/orders"))
            .header("Idempotency-Key", key)
            .json(&json!({"username": user, "price": 1, "amount": 1, "faults": {"payment": "timeout"}}));
        async move { req.send().await.unwrap() }
    };
    let mut first = None;
    for (key, user) in [("a", "u1"), ("b", "u2"), ("c", "u3")] {
        let resp = post(key, user).await;
        assert_eq!(resp.status(), 202);
        first.get_or_insert(resp.json::<serde_json::Value>().await.unwrap());
    }
    let shed = post("d", "u4").await;
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["retry-after"], "1");
    let body: serde_json::Value = shed.json().await.unwrap();
    assert_eq!(body["error"], "overloaded");
    assert!(
        app.metrics()
            .await
            .contains("ldt_admission_waits_total{outcome=\"refused\"} 1"),
        "the refusal is counted"
    );
    // A retry of an order already taken is still answered, with that order.
    let again = post("a", "u1").await;
    assert_eq!(again.status(), 200);
    assert_eq!(
        again.json::<serde_json::Value>().await.unwrap()["id"],
        first.unwrap()["id"]
    );
    // The shed order was not stored.
    let (_, all) = app.get("/api/all-transaction").await;
    assert_eq!(all.as_array().unwrap().len(), 3);
}

async fn a_new_order_waits_at_the_door_for_a_place_to_come_up(stack: Stack) {
    // A marketplace that admits one order in flight, and lets a new one wait up to 20 s for
    // its place: the second order is answered once the first is final, not refused.
    let app = spawn_on(
        stack,
        &ALL,
        &[
            "--max-pending",
            "1",
            "--step-timeout-ms",
            "300",
            "--admission-wait-ms",
            "20000",
        ],
    )
    .await;
    let (status, stalled) = app
        .post(
            "/api/v1/orders",
            json!({"username": user("door"), "price": 1, "amount": 1, "faults": {"payment": "timeout"}}),
        )
        .await;
    assert_eq!(status, 202, "{stalled}");
    let stalled_id = stalled["id"].as_str().unwrap().to_owned();
    let (_, before) = app.get(&format!("/api/v1/orders/{stalled_id}")).await;
    assert_eq!(before["status"], "PENDING", "the first order is in flight");
    let (status, next) = app
        .post("/api/v1/orders", order_body(&user("door"), 1, 1))
        .await;
    assert_eq!(status, 202, "the second order waited for its place: {next}");
    let (_, first) = app.get(&format!("/api/v1/orders/{stalled_id}")).await;
    assert_eq!(
        first["status"], "TIMEOUT",
        "the second order was admitted only once the first was final"
    );
    let next_id = next["id"].as_str().unwrap();
    let done = app.wait_final(next_id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "SUCCESS", "{done}");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("ldt_admission_waits_total{outcome=\"admitted\"} 1"),
        "the wait is counted: {metrics}"
    );
}

async fn concurrent_orders_never_overshoot_the_admission_limit(stack: Stack) {
    // Twenty orders sent at once to a marketplace that admits three in flight: before any of
    // them commits, each would see room, so the place must be taken at the door.
    let app = spawn_on(
        stack,
        &ALL,
        &["--max-pending", "3", "--step-timeout-ms", "5000"],
    )
    .await;
    let statuses = futures_util::future::join_all((0..20).map(|i| {
        app.client
            .post(app.url("/api/v1/orders"))
            .json(&json!({"username": format!("c{i}"), "price": 1, "amount": 1, "faults": {"payment": "timeout"}}))
            .send()
    }))
    .await
    .into_iter()
    .map(|r| r.unwrap().status().as_u16())
    .collect::<Vec<_>>();
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    let shed = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!((accepted, shed), (3, 17), "{statuses:?}");
    let (_, all) = app.get("/api/all-transaction").await;
    assert_eq!(all.as_array().unwrap().len(), 3);
}

async fn a_burst_of_orders_is_stored_once_each_and_completes(stack: Stack) {
    // Sixty orders at once: the intake writes those that arrive together in one
    // transaction. Ten repeat an earlier request's Idempotency-Key, so a group may hold both
    // copies of a key: the order is stored once and both answers carry it.
    let app = spawn_on(stack, &ALL, &[]).await;
    let user = common::user("burst");
    let requests = (0..60).map(|i| {
        let key = format!("k{}", if i < 50 { i } else { i - 50 });
        app.client
            .post(app.url("/api/v1/orders"))
            .header("Idempotency-Key", key.clone())
            .json(&common::order_body(&user, 1, 1))
            .send()
            .map(move |r| (key, r))
    });
    let mut ids_by_key: std::collections::HashMap<String, Vec<(u16, String)>> = Default::default();
    for (key, resp) in futures_util::future::join_all(requests).await {
        let resp = resp.unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        let id = body["id"].as_str().unwrap_or_default().to_owned();
        ids_by_key.entry(key).or_default().push((status, id));
    }
    assert_eq!(ids_by_key.len(), 50);
    for (key, answers) in &ids_by_key {
        let created = answers.iter().filter(|(s, _)| *s == 202).count();
        assert_eq!(created, 1, "{key}: {answers:?}");
        assert!(
            answers
                .iter()
                .all(|(s, id)| (*s == 202 || *s == 200) && *id == answers[0].1),
            "{key}: {answers:?}"
        );
    }
    for answers in ids_by_key.values() {
        let order = app.wait_final(&answers[0].1, Duration::from_secs(30)).await;
        assert_eq!(order["status"], "SUCCESS", "{order}");
    }
    let (_, all) = app.get("/api/all-transaction").await;
    assert_eq!(all.as_array().unwrap().len(), 50);
    assert_eq!(app.credits(&user).await, Some(500 - 50));
}

async fn a_lone_order_is_written_at_once_however_long_the_intake_may_linger(stack: Stack) {
    // The intake may hold an order a whole second for others to join it, but only while
    // orders come in fast: the first one, and one after a lull, are written at once.
    let app = spawn_on(stack, &ALL, &["--intake-linger-ms", "1000"]).await;
    let user = common::user("lone");
    for lull in [false, true] {
        if lull {
            // Longer than twice the linger: the intake no longer counts orders as coming fast.
            tokio::time::sleep(Duration::from_millis(2_100)).await;
        }
        let asked = std::time::Instant::now();
        let id = app.order(common::order_body(&user, 1, 1)).await;
        let took = asked.elapsed();
        let which = if lull {
            "an order after a lull"
        } else {
            "the first order"
        };
        assert!(
            took < Duration::from_millis(500),
            "{which} was answered after {took:?}"
        );
        let order = app.wait_final(&id, Duration::from_secs(30)).await;
        assert_eq!(order["status"], "SUCCESS", "{order}");
    }
}

/// Broker messages the order service has published so far (a bundle counts once).
async fn order_broker_messages(app: &common::TestApp) -> f64 {
    common::counter(
        &app.metrics().await,
        "ldt_bus_messages_published_total",
        "service=\"order\"",
    )
}

async fn orders_coming_in_fast_are_written_and_sent_on_together(stack: Stack) {
    // Twelve orders 10 ms apart, with a linger of a second: the first is written alone (no
    // order came before it), the eleven after it wait for each other and go in one group,
    // whose `OrderPlaced` messages leave in one bundle. Without the linger each would be
    // written, and sent, on its own: twelve broker messages.
    let app = spawn_on(stack, &ALL, &["--intake-linger-ms", "1000"]).await;
    let user = common::user("convoy");
    let before = order_broker_messages(&app).await;
    let requests = (0..12u64).map(|i| {
        let app = &app;
        let user = &user;
        async move {
            tokio::time::sleep(Duration::from_millis(10 * i)).await;
            let resp = app
                .client
                .post(app.url("/api/v1/orders"))
                .json(&common::order_body(user, 1, 1))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 202);
            let body: serde_json::Value = resp.json().await.unwrap();
            body["id"].as_str().unwrap_or_default().to_owned()
        }
    });
    let ids = futures_util::future::join_all(requests).await;
    for id in &ids {
        let order = app.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(order["status"], "SUCCESS", "{order}");
    }
    let sent = order_broker_messages(&app).await - before;
    assert!(
        (1.0..=4.0).contains(&sent),
        "12 orders 10 ms apart left the order service in {sent} broker messages"
    );
    assert_eq!(app.credits(&user).await, Some(500 - 12));
}

async fn orders_fast_enough_for_half_a_full_group_wait_for_a_full_one(stack: Stack) {
    // Thirty-three orders 24 ms apart, with a linger of 300 ms: the linger brings twelve or
    // thirteen of them, more than half of a full group (sixteen), so the intake holds each
    // group for a full one, up to 600 ms (sixteen come within 360 ms). The first goes alone,
    // the other 32 in two groups: three broker messages. Groups of what the linger brings
    // would take four.
    let app = spawn_on(stack, &ALL, &["--intake-linger-ms", "300"]).await;
    let user = common::user("full");
    let before = order_broker_messages(&app).await;
    let start = tokio::time::Instant::now();
    let requests = (0..33u64).map(|i| {
        let app = &app;
        let user = &user;
        async move {
            tokio::time::sleep_until(start + Duration::from_millis(24 * i)).await;
            app.order(common::order_body(user, 1, 1)).await
        }
    });
    let ids = futures_util::future::join_all(requests).await;
    for id in &ids {
        let order = app.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(order["status"], "SUCCESS", "{order}");
    }
    let sent = order_broker_messages(&app).await - before;
    assert!(
        (1.0..=3.0).contains(&sent),
        "33 orders 24 ms apart left the order service in {sent} broker messages"
    );
    assert_eq!(app.credits(&user).await, Some(500 - 33));
}

async fn a_lingering_group_is_written_once_it_holds_what_the_linger_brings(stack: Stack) {
    // Orders 455 ms apart, with a linger of a second: the intake counts them as coming fast,
    // and a linger brings two of them (2.2 to be exact). The group of the second and the
    // third is written when the third comes, 455 ms after the second, not when the linger is
    // over: the second is answered about half a second sooner.
    let app = spawn_on(stack, &ALL, &["--intake-linger-ms", "1000"]).await;
    let user = common::user("early");
    let requests = (0..3u64).map(|i| {
        let app = &app;
        let user = &user;
        async move {
            tokio::time::sleep(Duration::from_millis(455 * i)).await;
            let asked = std::time::Instant::now();
            let id = app.order(common::order_body(user, 1, 1)).await;
            (id, asked.elapsed())
        }
    });
    let answered = futures_util::future::join_all(requests).await;
    let (_, second) = &answered[1];
    assert!(
        *second < Duration::from_millis(750),
        "the first order of a lingering group was answered after {second:?}"
    );
    for (id, _) in &answered {
        let order = app.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(order["status"], "SUCCESS", "{order}");
    }
    assert_eq!(app.credits(&user).await, Some(500 - 3));
}

async fn production_settings_guard_admin_endpoints_and_refuse_fault_flags(stack: Stack) {
    let app = spawn_on(
        stack,
        &ALL,
        &["--admin-token", "s3cret", "--fault-injection", "false"],
    )
    .await;
    let restock = |token: Option<&'static str>| {
        let mut req = app
            .client
            .post(app.url("/api/v1/inventory/restock"))
            .json(&json!({"amount": 5}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(restock(None).await, 401);
    assert_eq!(restock(Some("wrong")).await, 401);
    assert_eq!(restock(Some("s3cret")).await, 200);
    assert_eq!(app.stock().await, 505);
    let resp = app
        .client
        .post(app.url("/api/v1/dead-letters/x/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    for body in [
        json!({"username": "p", "price": 1, "amount": 1, "kill_payment": true}),
        json!({"username": "p", "price": 1, "amount": 1, "kill_create": true}),
    ] {
        let (status, err) = app.purchase(body).await;
        assert_eq!(status, 422, "{err}");
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains("fault injection is disabled"),
            "{err}"
        );
    }
    assert_eq!(
        app.status_of(common::order_body("p", 1, 1)).await,
        "SUCCESS"
    );
}

/// Asserts the answer is `status` with the one error shape, and returns its body.
/// A reader of `/api/v1/orders/events`: its events, as (name, data).
struct Events {
    resp: reqwest::Response,
    buf: String,
}

impl Events {
    async fn open(app: &common::TestApp, query: &str) -> Events {
        let resp = app
            .client
            .get(app.url(&format!("/api/v1/orders/events{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{query}");
        Events {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped).
    async fn next(&mut self) -> (String, serde_json::Value) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if !data.is_empty() {
                    return (name, serde_json::from_str(&data).unwrap());
                }
                continue;
            }
            let chunk = self
                .resp
                .chunk()
                .await
                .unwrap()
                .expect("the stream stays open");
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// The order stream brings every order, created and then final: one `order` event per
/// change, or with `coalesce_ms` one `orders` event per window holding each order once.
async fn the_order_stream_brings_every_change_alone_or_gathered(stack: Stack) {
    let app = spawn_on(stack, &ALL, &[]).await;
    for bad in ["0", "5001", "soon"] {
        let resp = app
            .client
            .get(app.url(&format!("/api/v1/orders/events?coalesce_ms={bad}")))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        assert!(
            status == 400 || status == 422,
            "coalesce_ms={bad}: {status}"
        );
        json_error(resp, status, "coalesce_ms").await;
    }
    let mut single = Events::open(&app, "").await;
    let mut gathered = Events::open(&app, "?coalesce_ms=200").await;
    let user = common::user("stream");
    let mut placed = std::collections::HashSet::new();
    for _ in 0..6 {
        let resp = app
            .client
            .post(app.url("/api/v1/orders"))
            .json(&common::order_body(&user, 1, 1))
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = resp.json().await.unwrap();
        placed.insert(body["id"].as_str().unwrap().to_owned());
    }
    let finals = |seen: &std::collections::HashMap<String, String>| {
        placed
            .iter()
            .all(|id| seen.get(id).is_some_and(|s| s == "SUCCESS"))
    };
    let read = async {
        let mut seen = std::collections::HashMap::new();
        while !finals(&seen) {
            let (name, order) = single.next().await;
            assert_eq!(name, "order", "{order}");
            seen.insert(
                order["id"].as_str().unwrap().to_owned(),
                order["status"].as_str().unwrap().to_owned(),
            );
        }
        let mut seen = std::collections::HashMap::new();
        while !finals(&seen) {
            let (name, orders) = gathered.next().await;
            assert_eq!(name, "orders", "{orders}");
            let orders = orders.as_array().unwrap();
            let ids: std::collections::HashSet<&str> =
                orders.iter().map(|o| o["id"].as_str().unwrap()).collect();
            assert_eq!(
                ids.len(),
                orders.len(),
                "each order once per event: {orders:?}"
            );
            for o in orders {
                seen.insert(
                    o["id"].as_str().unwrap().to_owned(),
                    o["status"].as_str().unwrap().to_owned(),
                );
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("every order seen final on both streams");
}

async fn json_error(resp: reqwest::Response, status: u16, what: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "{what}");
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ctype.starts_with("application/json"), "{what}: {ctype}");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["error"].is_string() && body["message"].is_string(),
        "{what}: {body}"
    );
    body
}

// The rows of the contract issue's table, each answered as expected.
async fn every_bad_request_gets_the_one_error_shape_and_changes_nothing(stack: Stack) {
    let app = spawn_on(stack, &ALL, &[]).await;
    let send = |method: reqwest::Method, path: &str, body: Option<String>| {
        let mut req = app.client.request(method, app.url(path));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        async move { req.send().await.unwrap() }
    };
    use reqwest::Method;

    // A JSON array where an object is expected: 422, not an order read from a sequence.
    for (path, body) in [
        ("/api/purchase/", r#"["bob",1,1]"#),
        ("/api/v1/orders", r#"["bob",1,1]"#),
        ("/api/v1/inventory/restock", "[1]"),
    ] {
        let resp = send(Method::POST, path, Some(body.into())).await;
        json_error(resp, 422, &format!("{path} {body}")).await;
    }
    // Valid JSON of the wrong value: 422; only unparseable JSON is 400.
    for body in [
        r#"{"username":"bob","price":1,"amount":1,"faults":{"payment":1}}"#,
        r#"{"username":"bob","price":1e400,"amount":1}"#,
        r#"{"username":"bob","price":1,"amount":1.5}"#,
    ] {
        let resp = send(Method::POST, "/api/v1/orders", Some(body.into())).await;
        json_error(resp, 422, body).await;
    }
    let resp = send(
        Method::POST,
        "/api/v1/orders",
        Some("{\"username\":".into()),
    )
    .await;
    assert_eq!(
        json_error(resp, 400, "cut JSON").await["error"],
        "malformed_request"
    );
    // A 10 MB body: 413, answered from its Content-Length before a byte of it is read. (Over
    // raw TCP, as curl would see it: reqwest, still sending, reports a broken pipe instead.)
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = app.base.trim_start_matches("http://").to_owned();
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /api/v1/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            10 << 20
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer));
        assert!(read.await.is_ok(), "no answer to a 10 MB Content-Length");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(
            answer.contains(r#""error":"payload_too_large""#),
            "{answer}"
        );
    }
    // Query strings that cannot be read: 422 JSON naming the parameter.
    for path in [
        "/api/v1/orders?limit=abc",
        "/api/v1/orders?limit=1.5",
        "/api/v1/orders?limit=",
        "/api/v1/orders?after=x",
        "/api/v1/orders?limit=1&limit=2",
        "/api/v1/deliveries",
        "/api/v1/deliveries?username=a%00b",
        "/api/v1/orders?username=%E2%80%8B",
        "/api/v1/users/a%00b",
        "/api/v1/sagas?limit=abc",
        "/api/v1/dead-letters?limit=-1",
    ] {
        let resp = send(Method::GET, path, None).await;
        json_error(resp, 422, path).await;
    }
    // Routing: an unknown path, a wrong method (with Allow), a bad escape in a path.
    let resp = send(Method::GET, "/api/v1/nothing-here", None).await;
    assert_eq!(
        json_error(resp, 404, "unknown path").await["error"],
        "not_found"
    );
    let resp = send(Method::DELETE, "/api/v1/orders", None).await;
    let allow = resp.headers().get("allow").cloned();
    json_error(resp, 405, "DELETE /api/v1/orders").await;
    let allow = allow.expect("405 names the allowed methods");
    assert!(allow.to_str().unwrap().contains("POST"), "{allow:?}");
    for path in [
        "/api/v1/users/%FF",
        "/api/v1/orders/%FF",
        "/api/v1/sagas/%FF",
    ] {
        let resp = send(Method::GET, path, None).await;
        let status = resp.status().as_u16();
        assert!(matches!(status, 400 | 404 | 422), "{path}: {status}");
        json_error(resp, status, path).await;
    }
    // Too many headers: 431 JSON.
    let mut req = app.client.get(app.url("/api/v1/inventory"));
    for i in 0..150 {
        req = req.header(format!("x-h{i}"), "v");
    }
    json_error(req.send().await.unwrap(), 431, "150 headers").await;
    // Names made to look like others: control and format characters, separators, blank.
    for name in [
        "\u{200b}\u{200b}",
        "bob\u{202e}",
        "\u{feff}bob",
        "bo\u{2028}b",
        "bo\u{2029}b",
        "b\u{0007}ob",
        "   ",
        "\u{2060}",
    ] {
        let body = json!({"username": name, "price": 1, "amount": 1}).to_string();
        let resp = send(Method::POST, "/api/v1/orders", Some(body)).await;
        let err = json_error(resp, 422, &format!("{name:?}")).await;
        assert!(
            err["message"].as_str().unwrap().contains("username"),
            "{err}"
        );
    }
    // Nothing above stored an order, charged anyone or moved stock.
    let (_, all) = app.get("/api/all-transaction").await;
    assert_eq!(all, json!([]));
    assert_eq!(app.stock().await, 500);
    assert_eq!(app.credits("bob").await, None);

    // A saga is found by its order's id in any case, as the order is.
    let id = app.order(common::order_body("casey", 1, 1)).await;
    app.wait_final(&id, Duration::from_secs(30)).await;
    let upper = id.to_uppercase();
    let (status, order) = app.get(&format!("/api/v1/orders/{upper}")).await;
    assert_eq!(status, 200, "{order}");
    let (status, saga) = app.get(&format!("/api/v1/sagas/{upper}")).await;
    assert_eq!(status, 200, "{saga}");
    assert_eq!(saga["order_id"], json!(id));
}

// Connections that never finish their request are closed on time, and hold nothing up.
async fn slow_connections_are_closed_and_starve_nobody(stack: Stack) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_on(
        stack,
        &ALL,
        &["--http-header-timeout-s", "2", "--http-body-timeout-s", "2"],
    )
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let opened = std::time::Instant::now();
    let mut slow = Vec::new();
    for i in 0..500 {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        // Half of them stop inside the head, half inside a body that never ends.
        let start = if i % 2 == 0 {
            "POST /api/v1/orders HTTP/1.1\r\nHost: x\r\nContent-Ty".to_owned()
        } else {
            "POST /api/v1/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: 100\r\n\r\n{\"username\":"
                .to_owned()
        };
        conn.write_all(start.as_bytes()).await.unwrap();
        slow.push(conn);
    }
    // While they are held, the marketplace answers others at once.
    for _ in 0..5 {
        let asked = std::time::Instant::now();
        let (status, _) = app.get("/readyz").await;
        let took = asked.elapsed();
        assert_eq!(status, 200);
        assert!(took < Duration::from_millis(50), "/readyz took {took:?}");
    }
    let id = app.order(common::order_body("steady", 1, 1)).await;
    let order = app.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(order["status"], "SUCCESS");
    // Each slow connection is closed (a 408 or nothing, then end of stream) soon after its
    // timeout: not before 2 s, and not long after.
    for (i, mut conn) in slow.into_iter().enumerate() {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "slow connection {i} still open 10 s later");
        let text = String::from_utf8_lossy(&rest);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "connection {i}: {text}"
        );
    }
    let all_closed = opened.elapsed();
    assert!(
        all_closed >= Duration::from_secs(2) && all_closed < Duration::from_secs(8),
        "500 slow connections closed after {all_closed:?}"
    );
}

on_every_stack!(
    bad_orders_are_rejected_with_a_reason_and_store_nothing,
    health_openapi_and_swagger_are_served,
    restock_adds_to_the_stock,
    a_full_marketplace_sheds_new_orders_with_retry_after,
    a_new_order_waits_at_the_door_for_a_place_to_come_up,
    concurrent_orders_never_overshoot_the_admission_limit,
    a_burst_of_orders_is_stored_once_each_and_completes,
    a_lone_order_is_written_at_once_however_long_the_intake_may_linger,
    orders_coming_in_fast_are_written_and_sent_on_together,
    a_lingering_group_is_written_once_it_holds_what_the_linger_brings,
    orders_fast_enough_for_half_a_full_group_wait_for_a_full_one,
    production_settings_guard_admin_endpoints_and_refuse_fault_flags,
    every_bad_request_gets_the_one_error_shape_and_changes_nothing,
    slow_connections_are_closed_and_starve_nobody,
    the_order_stream_brings_every_change_alone_or_gathered,
);
