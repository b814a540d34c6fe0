//! How a saga opens. By default the orchestrator sends its first command (the routing slip)
//! when the `OrderPlaced` comes; with `--order-opens-saga` the order service sends it in the
//! transaction that stores the order and its `OrderPlaced`, so the slip does not wait for the
//! orchestrator's hop, and the orchestrator starts the saga (its deadline, its log) without
//! sending the command again. A step's answer that reaches the orchestrator before the
//! `OrderPlaced` waits for it. The test plays the other services on the real broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use ldt_testkit::client::TestApi as _;

use std::time::Duration;

use common::{Driver, Stack, counter, next_for, order_body, spawn_on, user};
use ldt_contract::{Envelope, FaultPlan, Message, OrderStatus, Service, Step, StepOutcome};
use uuid::Uuid;

/// The order service on its own, and what it sends payment and the orchestrator.
async fn order_service_alone(
    stack: Stack,
    extra: &[&str],
) -> (
    common::TestApp,
    ldt_runtime::bus::Subscription,
    ldt_runtime::bus::Subscription,
) {
    let app = spawn_on(stack, &[Service::Order], extra).await;
    let driver = Driver::new(&app);
    let payment = driver.listen(Service::Payment).await;
    let orchestrator = driver.listen(Service::Orchestrator).await;
    (app, payment, orchestrator)
}

async fn the_order_service_sends_the_first_command_with_its_slip_beside_order_placed(stack: Stack) {
    let (app, mut payment, mut orchestrator) =
        order_service_alone(stack, &["--order-opens-saga"]).await;
    let name = user("open");
    let id = app.order(order_body(&name, 7, 3)).await;
    let debit = next_for(&mut payment, &id).await;
    assert_eq!(
        debit.body,
        Message::Debit {
            username: name.clone(),
            total: 21,
            fault: None
        }
    );
    assert_eq!(
        debit.then,
        vec![
            Message::Reserve {
                amount: 3,
                fault: None
            },
            Message::Deliver {
                username: name.clone(),
                amount: 3,
                fault: None
            },
        ]
    );
    let placed = next_for(&mut orchestrator, &id).await;
    assert_eq!(
        placed.body,
        Message::OrderPlaced {
            username: name,
            price: 7,
            amount: 3,
            faults: FaultPlan::default(),
            slip_sent: true,
        }
    );
}

async fn by_default_the_order_service_leaves_the_first_command_to_the_orchestrator(stack: Stack) {
    let (app, mut payment, mut orchestrator) = order_service_alone(stack, &[]).await;
    let name = user("plain");
    let id = app.order(order_body(&name, 7, 3)).await;
    let placed = next_for(&mut orchestrator, &id).await;
    assert_eq!(
        placed.body,
        Message::OrderPlaced {
            username: name,
            price: 7,
            amount: 3,
            faults: FaultPlan::default(),
            slip_sent: false,
        }
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), payment.next())
            .await
            .is_err(),
        "a Debit from the order service"
    );
}

async fn an_answer_that_comes_before_its_order_placed_waits_for_the_saga(stack: Stack) {
    let app = spawn_on(stack, &[Service::Orchestrator], &[]).await;
    let driver = Driver::new(&app);
    let (mut payment, mut order) = (
        driver.listen(Service::Payment).await,
        driver.listen(Service::Order).await,
    );
    let id = Uuid::now_v7();
    // The slip ran to its end before the orchestrator heard of the saga.
    driver
        .send(&Envelope::new(
            id,
            0,
            Message::StepResult {
                step: Step::Delivery,
                outcome: StepOutcome::Done,
            },
        ))
        .await;
    app.eventually(
        Duration::from_secs(10),
        "the early answer tried, waited for and given back",
        || async {
            let metrics = app.metrics().await;
            (counter(&metrics, "ldt_messages_total", "outcome=\"retried\"") >= 1.0
                && counter(
                    &metrics,
                    "ldt_saga_early_events_total",
                    "outcome=\"given_back\"",
                ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    driver
        .send(&Envelope::new(
            id,
            0,
            Message::OrderPlaced {
                username: user("early"),
                price: 1,
                amount: 1,
                faults: FaultPlan::default(),
                slip_sent: true,
            },
        ))
        .await;
    assert_eq!(
        next_for(&mut order, &id.to_string()).await.body,
        Message::OrderFinished {
            status: OrderStatus::Success
        }
    );
    let (status, saga) = app.get(&format!("/api/v1/sagas/{id}")).await;
    assert_eq!(status, 200, "{saga}");
    let log: Vec<&str> = saga["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        log.contains(&"sent (slip: reserve, deliver) by the order service"),
        "{log:?}"
    );
    assert_eq!(
        counter(
            &app.metrics().await,
            "ldt_messages_total",
            "outcome=\"dead_lettered\""
        ),
        0.0
    );
    // The orchestrator did not send the first command again.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), payment.next())
            .await
            .is_err(),
        "a Debit from the orchestrator"
    );
}

on_every_stack!(
    the_order_service_sends_the_first_command_with_its_slip_beside_order_placed,
    by_default_the_order_service_leaves_the_first_command_to_the_orchestrator,
    an_answer_that_comes_before_its_order_placed_waits_for_the_saga,
);
