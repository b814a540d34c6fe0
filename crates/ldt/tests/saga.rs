//! The saga end to end in one process against the real RabbitMQ and PostgreSQL: every case
//! of the legacy contract, checked by status and by the money, stock and deliveries after.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use ldt_testkit::client::TestApi as _;

use std::time::Duration;

use common::{ALL, Stack, TestApp, order_body, spawn_on, user};
use serde_json::json;

const FINAL: Duration = Duration::from_secs(10);

/// Places an order, waits for its final status, and checks what it left behind.
async fn check_case(
    app: &TestApp,
    body: serde_json::Value,
    expected: &str,
    expected_debit: i64,
    expected_tokens: i64,
) {
    let username = body["username"].as_str().unwrap().to_owned();
    let credits_before = app.credits(&username).await.unwrap_or(500);
    let stock_before = app.stock().await;
    let id = app.order(body.clone()).await;
    let order = app.wait_final(&id, FINAL).await;
    assert_eq!(order["status"], expected, "{body}");
    // A stalled step acts late: wait until the orchestrator saw its (refused) late answer, so
    // the books are checked after everything the order will ever do.
    if expected == "TIMEOUT" {
        app.eventually(FINAL, "the late answer of the stalled step", || async {
            let (_, saga) = app.get(&format!("/api/v1/sagas/{id}")).await;
            saga["log"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["event"].as_str().unwrap().starts_with("late: refused"))
                .then_some(())
        })
        .await;
    }
    let credits_after = app.credits(&username).await.unwrap_or(500);
    assert_eq!(
        credits_before - credits_after,
        expected_debit,
        "credits after {body}"
    );
    assert_eq!(
        stock_before - app.stock().await,
        expected_tokens,
        "stock after {body}"
    );
    let delivered = app.active_deliveries(&username).await;
    if expected == "SUCCESS" {
        assert!(
            delivered.contains(&id),
            "SUCCESS order {id} has an active delivery"
        );
    } else {
        assert!(
            !delivered.contains(&id),
            "{expected} order {id} has no active delivery"
        );
    }
}

async fn every_legacy_case_ends_with_its_status_and_balanced_books(stack: Stack) {
    every_legacy_case(stack, &[]).await;
}

async fn every_legacy_case_ends_right_when_the_orchestrator_opens_the_saga(stack: Stack) {
    every_legacy_case(stack, &["--order-opens-saga", "false"]).await;
}

/// lapin's own I/O thread per connection, as before the loop ran on the runtime by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_legacy_case_ends_right_with_the_amqp_io_loop_on_its_own_thread() {
    every_legacy_case(Stack::Servers, &["--amqp-io-loop", "thread"]).await;
}

async fn every_legacy_case(stack: Stack, extra: &[&str]) {
    // The slip's deadline is 3 × 400 ms; the stalled step acts after it.
    let mut args = vec!["--step-timeout-ms", "400", "--stall-ms", "1500"];
    args.extend_from_slice(extra);
    let app = spawn_on(stack, &ALL, &args).await;
    check_case(&app, order_body(&user("ok"), 10, 2), "SUCCESS", 20, 2).await;
    check_case(
        &app,
        order_body(&user("poor"), 520, 1),
        "INSUFFICIENT_FUND",
        0,
        0,
    )
    .await;
    check_case(
        &app,
        order_body(&user("greedy"), 0, 1000),
        "INSUFFICIENT_INVENTORY",
        0,
        0,
    )
    .await;
    for step in ["payment", "inventory", "deliver"] {
        let mut body = order_body(&user(&format!("kill-{step}")), 7, 3);
        body[format!("kill_{step}")] = json!(true);
        check_case(&app, body, "UNKNOWN", 0, 0).await;
        let mut body = order_body(&user(&format!("slow-{step}")), 7, 3);
        body[format!("timeout_{step}")] = json!(true);
        check_case(&app, body, "TIMEOUT", 0, 0).await;
    }
    // kill_create: an error, and no order stored.
    let (_, before) = app.get("/api/all-transaction").await;
    let mut body = order_body(&user("never"), 1, 1);
    body["kill_create"] = json!(true);
    let (status, err) = app.purchase(body).await;
    assert_eq!(status, 500, "{err}");
    assert_eq!(err["error"], "injected_fault");
    let (_, after) = app.get("/api/all-transaction").await;
    assert_eq!(
        before.as_array().unwrap().len(),
        after.as_array().unwrap().len()
    );
}

async fn a_failure_after_payment_refunds_the_money(stack: Stack) {
    let app = spawn_on(stack, &ALL, &["--initial-stock", "5"]).await;
    // 60 credits are debited, then the inventory has only 5 tokens: the debit is refunded.
    check_case(
        &app,
        order_body(&user("short"), 10, 6),
        "INSUFFICIENT_INVENTORY",
        0,
        0,
    )
    .await;
    check_case(&app, order_body(&user("fits"), 10, 5), "SUCCESS", 50, 5).await;
    // The saga log shows the slip, the step that failed on it, and the compensation of the
    // step before.
    let (_, page) = app
        .get("/api/v1/orders?status=INSUFFICIENT_INVENTORY")
        .await;
    let id = page["orders"][0]["id"].as_str().unwrap();
    let (_, saga) = app.get(&format!("/api/v1/sagas/{id}")).await;
    let kinds: Vec<&str> = saga["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "debit",
            "step_result",
            "refund",
            "compensated",
            "order_finished"
        ],
        "{saga}"
    );
}

async fn compensations_run_in_reverse_order(stack: Stack) {
    let app = spawn_on(stack, &ALL, &[]).await;
    let mut body = order_body(&user("rev"), 1, 1);
    body["kill_deliver"] = json!(true);
    let id = app.order(body).await;
    assert_eq!(app.wait_final(&id, FINAL).await["status"], "UNKNOWN");
    let (_, saga) = app.get(&format!("/api/v1/sagas/{id}")).await;
    let compensations: Vec<(&str, &str)> = saga["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "compensated")
        .map(|e| (e["step"].as_str().unwrap(), e["event"].as_str().unwrap()))
        .collect();
    assert_eq!(
        compensations,
        [("inventory", "done"), ("payment", "done")],
        "{saga}"
    );
    assert_eq!(saga["phase"], "done");
}

async fn concurrent_orders_never_overdraw_a_user(stack: Stack) {
    let app = spawn_on(stack, &ALL, &[]).await;
    let name = user("rush");
    let ids =
        futures_util::future::join_all((0..30).map(|_| app.order(order_body(&name, 100, 1)))).await;
    let mut success = 0;
    for id in &ids {
        match app.wait_final(id, FINAL).await["status"].as_str().unwrap() {
            "SUCCESS" => success += 1,
            "INSUFFICIENT_FUND" => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(success, 5, "500 credits pay for exactly five orders of 100");
    assert_eq!(app.credits(&name).await, Some(0));
    assert_eq!(app.stock().await, 495);
    assert_eq!(app.active_deliveries(&name).await.len(), 5);
}

async fn concurrent_orders_never_oversell_the_stock(stack: Stack) {
    let app = spawn_on(stack, &ALL, &["--initial-stock", "10"]).await;
    let users: Vec<String> = (0..25).map(|i| user(&format!("buyer{i}"))).collect();
    let ids =
        futures_util::future::join_all(users.iter().map(|u| app.order(order_body(u, 1, 1)))).await;
    let mut success = 0;
    for id in &ids {
        match app.wait_final(id, FINAL).await["status"].as_str().unwrap() {
            "SUCCESS" => success += 1,
            "INSUFFICIENT_INVENTORY" => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(success, 10);
    assert_eq!(app.stock().await, 0);
    // Every buyer who did not get tokens got their credit back.
    let mut spent = 0;
    for u in &users {
        spent += 500 - app.credits(u).await.unwrap();
    }
    assert_eq!(spent, 10);
}

async fn a_stalled_step_does_not_hold_up_other_orders(stack: Stack) {
    let app = spawn_on(stack, &ALL, &[]).await;
    let mut slow = order_body(&user("slow"), 1, 1);
    slow["timeout_payment"] = json!(true);
    let slow_id = app.order(slow).await;
    let fast_id = app.order(order_body(&user("fast"), 1, 1)).await;
    let fast = app.wait_final(&fast_id, FINAL).await;
    assert_eq!(fast["status"], "SUCCESS");
    let slow = app.wait_final(&slow_id, FINAL).await;
    assert_eq!(slow["status"], "TIMEOUT");
    assert!(
        fast["finished_at_ms"].as_i64() < slow["finished_at_ms"].as_i64(),
        "the order behind the stalled one finished first: {fast} {slow}"
    );
}

/// Retries of one request racing each other (and other users' orders, so that they are
/// written together): one order, every answer names it, the money moves once.
async fn concurrent_retries_with_one_idempotency_key_make_one_order(stack: Stack) {
    let app = spawn_on(stack, &ALL, &[]).await;
    let name = user("retry");
    let body = json!({"username": name, "price": 7, "amount": 2});
    let retries = (0..20).map(|_| {
        app.client
            .post(app.url("/api/v1/orders"))
            .header("Idempotency-Key", "same-request")
            .json(&body)
            .send()
    });
    let others = (0..20).map(|i| {
        app.client
            .post(app.url("/api/v1/orders"))
            .json(&json!({"username": user(&format!("other{i}")), "price": 1, "amount": 1}))
            .send()
    });
    let (retries, others) = futures_util::future::join(
        futures_util::future::join_all(retries),
        futures_util::future::join_all(others),
    )
    .await;
    let mut ids = std::collections::BTreeSet::new();
    let mut created = 0;
    for resp in retries {
        let resp = resp.unwrap();
        match resp.status().as_u16() {
            202 => created += 1,
            200 => {}
            other => panic!("a retry answered {other}"),
        }
        let order: serde_json::Value = resp.json().await.unwrap();
        ids.insert(order["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(created, 1, "one retry creates the order");
    assert_eq!(ids.len(), 1, "every retry names the same order: {ids:?}");
    for resp in others {
        assert_eq!(resp.unwrap().status(), 202);
    }
    let id = ids.into_iter().next().unwrap();
    assert_eq!(app.wait_final(&id, FINAL).await["status"], "SUCCESS");
    let (_, mine) = app.get(&format!("/api/v1/orders?username={name}")).await;
    assert_eq!(mine["orders"].as_array().unwrap().len(), 1);
    assert_eq!(app.credits(&name).await, Some(500 - 14), "debited once");
}

async fn v1_orders_api_with_location_paging_and_idempotency(stack: Stack) {
    let app = spawn_on(stack, &ALL, &[]).await;
    let name = user("v1");
    let resp = app
        .client
        .post(app.url("/api/v1/orders"))
        .header("Idempotency-Key", "k-1")
        .json(&json!({"username": name, "price": 2, "amount": 3, "faults": {"delivery": "kill"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let order: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(order["status"], "PENDING");
    assert_eq!(
        location,
        format!("/api/v1/orders/{}", order["id"].as_str().unwrap())
    );
    let id = order["id"].as_str().unwrap();
    assert_eq!(app.wait_final(id, FINAL).await["status"], "UNKNOWN");
    // Same key, same body: the original order, no second saga.
    let again = app
        .client
        .post(app.url("/api/v1/orders"))
        .header("Idempotency-Key", "k-1")
        .json(&json!({"username": name, "price": 2, "amount": 3, "faults": {"delivery": "kill"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<serde_json::Value>().await.unwrap()["id"], id);
    // Same key, other body: refused.
    let other = app
        .client
        .post(app.url("/api/v1/orders"))
        .header("Idempotency-Key", "k-1")
        .json(&json!({"username": name, "price": 2, "amount": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 409);
    // Paging by user, oldest first.
    for _ in 0..3 {
        let id = app.order(order_body(&name, 1, 1)).await;
        app.wait_final(&id, FINAL).await;
    }
    let (_, first) = app
        .get(&format!("/api/v1/orders?username={name}&limit=2"))
        .await;
    assert_eq!(first["orders"].as_array().unwrap().len(), 2);
    assert_eq!(first["orders"][0]["id"], id);
    let next = first["next"].as_i64().unwrap();
    let (_, second) = app
        .get(&format!(
            "/api/v1/orders?username={name}&limit=2&after={next}"
        ))
        .await;
    assert_eq!(second["orders"].as_array().unwrap().len(), 2);
    assert!(second["next"].is_null());
    let (_, success) = app
        .get(&format!("/api/v1/orders?username={name}&status=SUCCESS"))
        .await;
    assert_eq!(success["orders"].as_array().unwrap().len(), 3);
    let (status, _) = app
        .get("/api/v1/orders/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(status, 404);
}

/// A compensation that can never succeed (releasing the tokens would overflow the stock,
/// which only a database edited by hand allows) is parked as a dead letter after
/// `--max-attempts` tries, and the saga is listed as stuck with the reason instead of
/// retrying for ever; once the cause is mended, an operator's retry finishes it, books right.
async fn a_compensation_that_cannot_succeed_leaves_its_saga_stuck_until_retried(stack: Stack) {
    let app = spawn_on(
        stack,
        &ALL,
        &["--max-attempts", "3", "--step-timeout-ms", "300"],
    )
    .await;
    let name = user("stuck");
    let (status, order) = app
        .post(
            "/api/v1/orders",
            json!({"username": name, "price": 1, "amount": 10, "faults": {"delivery": "timeout"}}),
        )
        .await;
    assert_eq!(status, 202, "{order}");
    let id = order["id"].as_str().unwrap().to_owned();
    app.eventually(FINAL, "the reservation", || async {
        (app.stock().await == 490).then_some(())
    })
    .await;
    let inventory = app.db(ldt_contract::Service::Inventory).await;
    sqlx::query("UPDATE stock SET available = $1 WHERE id = 1")
        .bind(i64::MAX - 5)
        .execute(&inventory)
        .await
        .unwrap();
    let stuck = app
        .eventually(
            Duration::from_secs(30),
            "the saga listed as stuck",
            || async {
                let (_, page) = app.get("/api/v1/sagas?state=stuck").await;
                page["sagas"]
                    .as_array()?
                    .iter()
                    .find(|s| s["order_id"] == id.as_str())
                    .cloned()
            },
        )
        .await;
    assert_eq!(stuck["phase"], "compensating");
    assert_eq!(
        stuck["pending_compensations"],
        json!(["inventory", "payment"])
    );
    let reason = stuck["stuck_reason"].as_str().unwrap();
    assert!(reason.contains("failed 3 times"), "{stuck}");
    assert!(
        stuck["deadline_at_ms"].is_null(),
        "no retries by itself: {stuck}"
    );
    let (_, order) = app.get(&format!("/api/v1/orders/{id}")).await;
    assert_eq!(order["status"], "PENDING");
    let (_, saga) = app.get(&format!("/api/v1/sagas/{id}")).await;
    assert!(
        saga["log"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "compensation_failed"
                && e["event"].as_str().unwrap().starts_with("stuck: ")),
        "{saga}"
    );
    assert!(
        app.dead_letters().await.iter().any(|l| {
            l["origin_queue"].as_str().unwrap().ends_with(".inventory")
                && l["reason"].as_str().unwrap().contains("failed 3 times")
        }),
        "the release is a dead letter with its reason"
    );
    app.eventually(FINAL, "the stuck gauge", || async {
        app.metrics()
            .await
            .lines()
            .any(|l| l.starts_with("ldt_sagas_stuck") && l.ends_with(" 1"))
            .then_some(())
    })
    .await;
    // Mended: the retry finishes the compensations.
    sqlx::query("UPDATE stock SET available = 490 WHERE id = 1")
        .execute(&inventory)
        .await
        .unwrap();
    let (status, retried) = app
        .post(&format!("/api/v1/sagas/{id}/retry"), json!({}))
        .await;
    assert_eq!(status, 202, "{retried}");
    let order = app.wait_final(&id, FINAL).await;
    assert_eq!(order["status"], "TIMEOUT");
    assert_eq!(app.stock().await, 500);
    assert_eq!(app.credits(&name).await, Some(500));
    assert!(app.active_deliveries(&name).await.is_empty());
    let (status, _) = app
        .post(&format!("/api/v1/sagas/{id}/retry"), json!({}))
        .await;
    assert_eq!(status, 409, "a finished saga has nothing to retry");
    let (_, page) = app.get("/api/v1/sagas?state=stuck").await;
    assert!(page["sagas"].as_array().unwrap().is_empty(), "{page}");
    inventory.close().await;
}

/// Cancelling a running order undoes every step it took and ends it CANCELLED; a final
/// order cannot be cancelled.
async fn a_cancelled_order_is_undone_and_ends_cancelled(stack: Stack) {
    cancelled_order_case(stack, &[]).await;
}

/// The same when the orchestrator opens the saga (`--order-opens-saga false`). (By default
/// the cancellation comes before the held back `OrderPlaced`, a second, half the step
/// timeout, and starts the saga itself.)
async fn a_cancelled_order_is_undone_when_the_orchestrator_opens_the_saga(stack: Stack) {
    cancelled_order_case(stack, &["--order-opens-saga", "false"]).await;
}

async fn cancelled_order_case(stack: Stack, extra: &[&str]) {
    let mut args = vec!["--step-timeout-ms", "2000"];
    args.extend_from_slice(extra);
    let app = spawn_on(stack, &ALL, &args).await;
    let name = user("cancel");
    let (status, order) = app
        .post(
            "/api/v1/orders",
            json!({"username": name, "price": 2, "amount": 3, "faults": {"delivery": "timeout"}}),
        )
        .await;
    assert_eq!(status, 202, "{order}");
    let id = order["id"].as_str().unwrap().to_owned();
    // Paid and reserved; delivery stalls.
    app.eventually(FINAL, "the reservation", || async {
        (app.stock().await == 497).then_some(())
    })
    .await;
    let (status, order) = app
        .post(&format!("/api/v1/orders/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 202, "{order}");
    assert_eq!(order["status"], "PENDING");
    let order = app.wait_final(&id, FINAL).await;
    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(app.credits(&name).await, Some(500));
    assert_eq!(app.stock().await, 500);
    let (_, saga) = app.get(&format!("/api/v1/sagas/{id}")).await;
    let kinds: Vec<&str> = saga["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "sent")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["cancel_delivery", "release", "refund"], "{saga}");
    let (status, _) = app
        .post(&format!("/api/v1/orders/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 409, "a final order cannot be cancelled");
    let (status, _) = app
        .post(
            &format!("/api/v1/orders/{}/cancel", uuid::Uuid::now_v7()),
            json!({}),
        )
        .await;
    assert_eq!(status, 404);
    // The stalled delivery acts late and is refused: nothing is delivered.
    app.eventually(FINAL, "the late delivery refused", || async {
        let (_, saga) = app.get(&format!("/api/v1/sagas/{id}")).await;
        saga["log"]
            .as_array()?
            .iter()
            .any(|e| {
                e["event"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("late: refused"))
            })
            .then_some(())
    })
    .await;
    assert!(app.active_deliveries(&name).await.is_empty());
}

on_every_stack!(
    a_compensation_that_cannot_succeed_leaves_its_saga_stuck_until_retried,
    a_cancelled_order_is_undone_and_ends_cancelled,
    a_cancelled_order_is_undone_when_the_orchestrator_opens_the_saga,
    every_legacy_case_ends_with_its_status_and_balanced_books,
    every_legacy_case_ends_right_when_the_orchestrator_opens_the_saga,
    a_failure_after_payment_refunds_the_money,
    compensations_run_in_reverse_order,
    concurrent_orders_never_overdraw_a_user,
    concurrent_orders_never_oversell_the_stock,
    a_stalled_step_does_not_hold_up_other_orders,
    v1_orders_api_with_location_paging_and_idempotency,
    concurrent_retries_with_one_idempotency_key_make_one_order,
);
