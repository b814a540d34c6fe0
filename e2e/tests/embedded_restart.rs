//! Orders in flight when the embedded `ldt up` stops — by SIGTERM, and separately by
//! SIGKILL — all reach a final status once it is started again on the same data directory,
//! and the books balance: every user's credits, the stock and the deliveries match exactly
//! the orders that ended SUCCESS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::TestApi as _;
use std::collections::BTreeMap;
use std::time::Duration;

use e2e::{Marketplace, Mode, scenarios::futures_join, user};
use serde_json::{Value, json};

async fn orders_in_flight_survive(signal: &str) {
    let mut m = Marketplace::start(Mode::Embedded).await;
    let initial_stock = m.stock().await;
    let users: Vec<String> = (0..4).map(|_| user("restart")).collect();
    // Plain orders, and orders whose step stalls past its deadline or fails: the stalled
    // ones are certainly still in flight when the signal comes.
    let bodies: Vec<Value> = (0..40)
        .map(|i| {
            let mut body = json!({
                "username": users[i % users.len()],
                "price": 7,
                "amount": 1 + (i % 3) as i64,
            });
            match i % 6 {
                1 => body["timeout_inventory"] = json!(true),
                2 => body["kill_delivery"] = json!(true),
                3 => body["timeout_payment"] = json!(true),
                _ => {}
            }
            body
        })
        .collect();
    // A few orders done before the signal, so the books have something on them whatever
    // the in-flight ones end as (a restart that takes longer than a step's deadline ends
    // those TIMEOUT, which is right).
    let mut bodies = bodies;
    let mut ids = Vec::new();
    for name in &users {
        let body = json!({"username": name, "price": 7, "amount": 2});
        let id = m.order(&body).await;
        assert_eq!(
            m.wait_final(&id, Duration::from_secs(10)).await["status"],
            "SUCCESS"
        );
        ids.push(id);
        bodies.insert(ids.len() - 1, body);
    }
    ids.extend(futures_join(&m, bodies[users.len()..].to_vec()).await);
    let mut pending = 0;
    for id in &ids {
        let (_, order) = m.get(&format!("/api/v1/orders/{id}")).await;
        pending += usize::from(order["status"] == "PENDING");
    }
    assert!(pending > 0, "no order was in flight when the signal came");

    let exit = m.restart(signal).await;
    if signal == "TERM" {
        assert!(exit.success(), "SIGTERM drains and exits cleanly: {exit:?}");
    }

    let mut finals = Vec::new();
    for id in &ids {
        finals.push(m.wait_final(id, Duration::from_secs(30)).await);
    }
    // What the books must say: only SUCCESS orders cost credits and tokens and deliver.
    let mut spent: BTreeMap<&str, i64> = BTreeMap::new();
    let mut delivered: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut tokens = 0;
    for (body, order) in bodies.iter().zip(&finals) {
        let name = body["username"].as_str().unwrap();
        spent.entry(name).or_default();
        delivered.entry(name).or_default();
        if order["status"] == "SUCCESS" {
            let amount = body["amount"].as_i64().unwrap();
            *spent.get_mut(name).unwrap() += 7 * amount;
            tokens += amount;
            delivered
                .get_mut(name)
                .unwrap()
                .push(order["id"].as_str().unwrap().to_owned());
        }
    }
    assert!(
        spent.values().all(|s| *s > 0),
        "every user has a SUCCESS order"
    );
    // Stalled steps act late (after the restart they are redelivered and stall again);
    // their effect is undone or refused, so the books settle on exactly this.
    m.eventually(Duration::from_secs(30), "balanced books", || async {
        for (name, spent) in &spent {
            if m.credits(name).await.unwrap_or(500) != 500 - spent {
                return None;
            }
            let mut active = m.active_deliveries(name).await;
            active.sort();
            let mut expected = delivered[name].clone();
            expected.sort();
            if active != expected {
                return None;
            }
        }
        (m.stock().await == initial_stock - tokens).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_in_flight_at_sigterm_finish_after_a_restart() {
    orders_in_flight_survive("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_in_flight_at_sigkill_finish_after_a_restart() {
    orders_in_flight_survive("KILL").await;
}
