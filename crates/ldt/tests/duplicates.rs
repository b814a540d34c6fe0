//! Every message type delivered twice has one effect. The test plays the step services (or
//! the orchestrator) on the real broker; the service under test consumes with prefetch 1, so
//! its queue is processed in order and a later message is a barrier for the earlier ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use ldt_testkit::client::TestApi as _;

use std::time::Duration;

use common::{Driver, Stack, next, next_for, order_body, spawn_on, user};
use ldt_contract::{Envelope, FaultPlan, Message, OrderStatus, Service, Step, StepOutcome};
use uuid::Uuid;

async fn orchestrator_inputs_delivered_twice_drive_the_saga_once(stack: Stack) {
    let app = spawn_on(stack, &[Service::Orchestrator], &["--prefetch", "1"]).await;
    let driver = Driver::new(&app);
    let (mut payment, mut inventory, mut delivery, mut order) = (
        driver.listen(Service::Payment).await,
        driver.listen(Service::Inventory).await,
        driver.listen(Service::Delivery).await,
        driver.listen(Service::Order).await,
    );
    let id = Uuid::now_v7();
    let placed = Envelope::new(
        id,
        0,
        Message::OrderPlaced {
            username: "twice".into(),
            price: 3,
            amount: 2,
            faults: FaultPlan::default(),
            slip_sent: false,
        },
    );
    driver.send_twice(&placed).await;
    let debit = next(&mut payment).await;
    assert!(matches!(debit.body, Message::Debit { total: 6, .. }));
    // The debit carries the rest of the saga as its routing slip.
    assert!(
        matches!(
            debit.then.as_slice(),
            [
                Message::Reserve { amount: 2, .. },
                Message::Deliver { amount: 2, .. }
            ]
        ),
        "{debit:?}"
    );
    // The test's steps answer instead of sending the slip on (as a step that predates slips
    // would): the orchestrator sends the rest of the slip itself, once per step.
    for (step, sub) in [
        (Step::Payment, &mut inventory),
        (Step::Inventory, &mut delivery),
    ] {
        let answer = Envelope::new(
            id,
            0,
            Message::StepResult {
                step,
                outcome: StepOutcome::Done,
            },
        );
        driver.send_twice(&answer).await;
        let cmd = next(sub).await;
        assert_eq!(cmd.order_id, id);
    }
    driver
        .send_twice(&Envelope::new(
            id,
            0,
            Message::StepResult {
                step: Step::Delivery,
                outcome: StepOutcome::Done,
            },
        ))
        .await;
    let finished = next(&mut order).await;
    assert_eq!(
        finished.body,
        Message::OrderFinished {
            status: OrderStatus::Success
        }
    );
    // The duplicates were processed before the barrier: an answer for a step long done.
    let barrier = Envelope::new(
        id,
        0,
        Message::Compensated {
            step: Step::Payment,
        },
    );
    driver.send_twice(&barrier).await;
    let (_, saga) = app
        .eventually(
            Duration::from_secs(10),
            "the barrier in the saga log",
            || async {
                let (_, saga) = app.get(&format!("/api/v1/sagas/{id}")).await;
                let seen = saga["log"]
                    .as_array()?
                    .iter()
                    .filter(|e| e["kind"] == "compensated")
                    .count();
                (seen == 2).then_some(((), saga))
            },
        )
        .await;
    let log = saga["log"].as_array().unwrap();
    let count = |kind: &str, event: &str| {
        log.iter()
            .filter(|e| e["kind"] == kind && e["event"].as_str().unwrap().starts_with(event))
            .count()
    };
    for kind in ["debit", "reserve", "deliver"] {
        assert_eq!(count(kind, "sent"), 1, "{kind} sent once: {saga}");
    }
    assert_eq!(count("order_placed", "duplicate"), 1, "{saga}");
    assert_eq!(count("step_result", "late: done"), 3, "{saga}");
    assert_eq!(count("order_finished", "SUCCESS"), 1, "{saga}");
    assert_eq!(saga["status"], "SUCCESS");
    // Exactly one OrderFinished went out, and nothing else follows it.
    common::nothing_comes(&mut order, "a second OrderFinished").await;
}

async fn compensation_answers_delivered_twice_advance_once(stack: Stack) {
    let app = spawn_on(stack, &[Service::Orchestrator], &["--prefetch", "1"]).await;
    let driver = Driver::new(&app);
    let (mut payment, mut inventory, mut order) = (
        driver.listen(Service::Payment).await,
        driver.listen(Service::Inventory).await,
        driver.listen(Service::Order).await,
    );
    let id = Uuid::now_v7();
    driver
        .send_twice(&Envelope::new(
            id,
            0,
            Message::OrderPlaced {
                username: "comp".into(),
                price: 1,
                amount: 1,
                faults: FaultPlan::default(),
                slip_sent: false,
            },
        ))
        .await;
    next(&mut payment).await;
    driver
        .send_twice(&Envelope::new(
            id,
            0,
            Message::StepResult {
                step: Step::Payment,
                outcome: StepOutcome::Done,
            },
        ))
        .await;
    next(&mut inventory).await;
    driver
        .send_twice(&Envelope::new(
            id,
            0,
            Message::StepResult {
                step: Step::Inventory,
                outcome: StepOutcome::Insufficient,
            },
        ))
        .await;
    assert_eq!(next(&mut payment).await.body, Message::Refund);
    driver
        .send_twice(&Envelope::new(
            id,
            0,
            Message::Compensated {
                step: Step::Payment,
            },
        ))
        .await;
    assert_eq!(
        next(&mut order).await.body,
        Message::OrderFinished {
            status: OrderStatus::InsufficientInventory
        }
    );
    common::nothing_comes(&mut order, "a second OrderFinished").await;
    common::nothing_comes(&mut payment, "a second Refund").await;
}

async fn order_finished_delivered_twice_sets_the_status_once(stack: Stack) {
    let app = spawn_on(stack, &[Service::Order], &["--prefetch", "1"]).await;
    let driver = Driver::new(&app);
    let mut placed = driver.listen(Service::Orchestrator).await;
    let id = app.order(order_body(&user("fin"), 1, 1)).await;
    let env = next(&mut placed).await;
    assert_eq!(env.order_id.to_string(), id);
    assert!(matches!(env.body, Message::OrderPlaced { .. }));
    let oid = env.order_id;
    driver
        .send_twice(&Envelope::new(
            oid,
            0,
            Message::OrderFinished {
                status: OrderStatus::Success,
            },
        ))
        .await;
    let first = app.wait_final(&id, Duration::from_secs(10)).await;
    // A conflicting late duplicate, then a barrier: an order finishing on the same queue.
    driver
        .send_twice(&Envelope::new(
            oid,
            0,
            Message::OrderFinished {
                status: OrderStatus::Unknown,
            },
        ))
        .await;
    let other = app.order(order_body(&user("barrier"), 1, 1)).await;
    let other_env = next_for(&mut placed, &other).await;
    driver
        .send_twice(&Envelope::new(
            other_env.order_id,
            0,
            Message::OrderFinished {
                status: OrderStatus::Timeout,
            },
        ))
        .await;
    app.wait_final(&other, Duration::from_secs(10)).await;
    let (_, after) = app.get(&format!("/api/v1/orders/{id}")).await;
    assert_eq!(after["status"], "SUCCESS");
    assert_eq!(after["finished_at_ms"], first["finished_at_ms"]);
}

on_every_stack!(
    orchestrator_inputs_delivered_twice_drive_the_saga_once,
    compensation_answers_delivered_twice_advance_once,
    order_finished_delivered_twice_sets_the_status_once,
);
