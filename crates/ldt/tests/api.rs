//! Bad HTTP input gets a 4xx with a JSON error naming the problem, and changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{ALL, Stack, spawn_on};
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
    // A missing content type is a clear error too.
    let resp = app
        .client
        .post(app.url("/api/purchase/"))
        .body("{}")
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

on_every_stack!(
    bad_orders_are_rejected_with_a_reason_and_store_nothing,
    health_openapi_and_swagger_are_served,
    restock_adds_to_the_stock,
    a_full_marketplace_sheds_new_orders_with_retry_after,
    concurrent_orders_never_overshoot_the_admission_limit,
    a_burst_of_orders_is_stored_once_each_and_completes,
    production_settings_guard_admin_endpoints_and_refuse_fault_flags,
);
