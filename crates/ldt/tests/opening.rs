//! How a saga opens. By default (`--order-opens-saga`) the order service sends its first
//! command (the routing slip) in the transaction that stores the order, with the saga's
//! opening (the order's terms), and holds its `OrderPlaced` back for half a step timeout. A step carries the opening on to its
//! answer, so the orchestrator starts the saga from the answer; the order service drops the
//! held `OrderPlaced` unsent when the order is final first, and sends it after the hold when
//! not (a stalled slip: the orchestrator then knows of the saga well before its deadline).
//! With `--order-opens-saga false` the orchestrator sends the slip when the `OrderPlaced`
//! comes; a step's answer without an opening that reaches the orchestrator before the
//! `OrderPlaced` waits for it. The tests play the other services on the real broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use ldt_testkit::client::TestApi as _;

use std::time::Duration;

use common::{Driver, Stack, counter, next_for, order_body, spawn_on, user};
use ldt_contract::{Envelope, FaultPlan, Message, Opened, OrderStatus, Service, Step, StepOutcome};
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

/// The orchestrator on its own, a driver playing the other services, and what it sends
/// payment and the order service.
async fn orchestrator_alone(
    stack: Stack,
) -> (
    common::TestApp,
    Driver,
    ldt_runtime::bus::Subscription,
    ldt_runtime::bus::Subscription,
) {
    let app = spawn_on(stack, &[Service::Orchestrator], &[]).await;
    let driver = Driver::new(&app);
    let (payment, order) = (
        driver.listen(Service::Payment).await,
        driver.listen(Service::Order).await,
    );
    (app, driver, payment, order)
}

async fn the_order_service_sends_the_first_command_and_later_the_order_placed_of_a_saga_that_does_not_end(
    stack: Stack,
) {
    let (app, mut payment, mut orchestrator) =
        order_service_alone(stack, &["--order-opens-saga"]).await;
    let name = user("open");
    let id = app.order(order_body(&name, 7, 3)).await;
    let debit = next_for(&mut payment, &id).await;
    let opened = debit
        .opened
        .clone()
        .expect("the debit carries the saga's opening");
    assert_eq!(
        (opened.username.as_str(), opened.price, opened.amount),
        (name.as_str(), 7, 3)
    );
    assert_eq!(opened.faults, FaultPlan::default());
    assert!(opened.placed_ms > 0, "{opened:?}");
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
    // Nothing finishes the order here: its `OrderPlaced` comes after the hold.
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
    assert_eq!(
        placed.id.to_string(),
        id,
        "an OrderPlaced's id is its order's"
    );
}

async fn an_order_final_within_the_hold_never_sends_its_order_placed(stack: Stack) {
    // A hold of a second (half the step timeout), so the order is final well within it.
    let (app, mut payment, mut orchestrator) =
        order_service_alone(stack, &["--order-opens-saga", "--step-timeout-ms", "2000"]).await;
    let id = app.order(order_body(&user("held"), 2, 1)).await;
    let debit = next_for(&mut payment, &id).await;
    // The orchestrator's word, as if it had started the saga from the last step's answer.
    Driver::new(&app)
        .send(&Envelope::new(
            debit.order_id,
            0,
            Message::OrderFinished {
                status: OrderStatus::Success,
            },
        ))
        .await;
    let order = app.wait_final(&id, Duration::from_secs(10)).await;
    assert_eq!(order["status"], "SUCCESS", "{order}");
    // Longer than the hold and the sweep's half second after it, twice over.
    let later = tokio::time::timeout(Duration::from_secs(3), orchestrator.next()).await;
    assert!(
        later.is_err(),
        "the OrderPlaced of an order already final was sent: {:?}",
        later.map(|m| m.map(|m| m.map(|m| String::from_utf8_lossy(&m.payload).into_owned())))
    );
}

async fn without_the_option_the_order_service_leaves_the_first_command_to_the_orchestrator(
    stack: Stack,
) {
    let (app, mut payment, mut orchestrator) =
        order_service_alone(stack, &["--order-opens-saga", "false"]).await;
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
    common::nothing_comes(&mut payment, "a Debit from the order service").await;
}

async fn an_answer_that_comes_before_its_order_placed_waits_for_the_saga(stack: Stack) {
    let (app, driver, mut payment, mut order) = orchestrator_alone(stack).await;
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
            ldt_runtime::db::now_ms(),
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
    common::nothing_comes(&mut payment, "a Debit from the orchestrator").await;
}

/// An opening as the order service makes it, for `name` buying one token at `price`.
fn opening_of(name: &str, price: i64) -> Opened {
    Opened {
        username: name.to_owned(),
        price,
        amount: 1,
        faults: FaultPlan::default(),
        placed_ms: ldt_runtime::db::now_ms(),
    }
}

/// The events of a saga's log, as the API shows it.
async fn saga_log(app: &common::TestApp, id: Uuid) -> Vec<String> {
    let (status, saga) = app.get(&format!("/api/v1/sagas/{id}")).await;
    assert_eq!(status, 200, "{saga}");
    saga["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect()
}

async fn an_answer_carrying_its_opening_starts_the_saga_at_once(stack: Stack) {
    let (app, driver, mut payment, mut order) = orchestrator_alone(stack).await;
    let (id, name) = (Uuid::now_v7(), user("opened"));
    // The slip ran to its end; the order service still holds the OrderPlaced back.
    let mut answer = Envelope::new(
        id,
        0,
        Message::StepResult {
            step: Step::Delivery,
            outcome: StepOutcome::Done,
        },
    );
    let opened = opening_of(&name, 4);
    answer.opened = Some(opened.clone());
    driver.send(&answer).await;
    assert_eq!(
        next_for(&mut order, &id.to_string()).await.body,
        Message::OrderFinished {
            status: OrderStatus::Success
        }
    );
    let metrics = app.metrics().await;
    let early = |outcome: &str| {
        counter(
            &metrics,
            "ldt_saga_early_events_total",
            &format!("outcome=\"{outcome}\""),
        )
    };
    assert_eq!(early("started"), 1.0, "{metrics}");
    assert_eq!(
        early("given_back") + early("applied"),
        0.0,
        "no wait for the saga"
    );
    let log = saga_log(&app, id).await;
    assert!(
        log.contains(&"sent (slip: reserve, deliver) by the order service".to_owned()),
        "{log:?}"
    );
    // The held-back OrderPlaced, sent after all (the order was slow to be final), changes
    // nothing.
    let mut placed = Envelope::new(
        id,
        opened.placed_ms,
        Message::OrderPlaced {
            username: name,
            price: 4,
            amount: 1,
            faults: FaultPlan::default(),
            slip_sent: true,
        },
    );
    placed.id = id;
    driver.send(&placed).await;
    app.eventually(
        Duration::from_secs(10),
        "the late OrderPlaced ignored",
        || async {
            saga_log(&app, id)
                .await
                .contains(&"duplicate (ignored)".to_owned())
                .then_some(())
        },
    )
    .await;
    let (_, saga) = app.get(&format!("/api/v1/sagas/{id}")).await;
    assert_eq!(saga["status"], "SUCCESS", "{saga}");
    assert_eq!(saga["created_at_ms"], opened.placed_ms, "{saga}");
    common::nothing_comes(&mut order, "a second OrderFinished").await;
    common::nothing_comes(&mut payment, "a Debit from the orchestrator").await;
}

async fn a_failure_carrying_its_opening_starts_the_saga_and_undoes_the_steps_before(stack: Stack) {
    let (_app, driver, mut payment, mut order) = orchestrator_alone(stack).await;
    let id = Uuid::now_v7();
    // Paid, then out of stock: the orchestrator has not heard of the saga yet.
    let mut answer = Envelope::new(
        id,
        0,
        Message::StepResult {
            step: Step::Inventory,
            outcome: StepOutcome::Insufficient,
        },
    );
    answer.opened = Some(opening_of(&user("short"), 9));
    driver.send(&answer).await;
    assert_eq!(
        next_for(&mut payment, &id.to_string()).await.body,
        Message::Refund
    );
    driver
        .send(&Envelope::new(
            id,
            0,
            Message::Compensated {
                step: Step::Payment,
            },
        ))
        .await;
    assert_eq!(
        next_for(&mut order, &id.to_string()).await.body,
        Message::OrderFinished {
            status: OrderStatus::InsufficientInventory
        }
    );
}

async fn an_order_takes_five_broker_messages(stack: Stack) {
    let app = spawn_on(stack, &common::ALL, &["--step-timeout-ms", "2000"]).await;
    let published =
        || async { counter(&app.metrics().await, "ldt_bus_messages_published_total", "") };
    let before = published().await;
    // One at a time, so no two share a broker message.
    for _ in 0..3 {
        let id = app.order(order_body(&user("five"), 1, 1)).await;
        let order = app.wait_final(&id, Duration::from_secs(10)).await;
        assert_eq!(order["status"], "SUCCESS", "{order}");
    }
    // Debit, reserve, deliver, the answer, the final status: no OrderPlaced.
    assert_eq!(published().await - before, 15.0);
}

on_every_stack!(
    an_order_takes_five_broker_messages,
    the_order_service_sends_the_first_command_and_later_the_order_placed_of_a_saga_that_does_not_end,
    an_order_final_within_the_hold_never_sends_its_order_placed,
    an_answer_carrying_its_opening_starts_the_saga_at_once,
    a_failure_carrying_its_opening_starts_the_saga_and_undoes_the_steps_before,
    without_the_option_the_order_service_leaves_the_first_command_to_the_orchestrator,
    an_answer_that_comes_before_its_order_placed_waits_for_the_saga,
);
