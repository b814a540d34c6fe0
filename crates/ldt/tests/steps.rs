//! The step services' contract, driven message by message over the real broker: the test
//! plays the orchestrator, publishing commands and reading the answers from its queue.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use ldt_testkit::client::TestApi as _;

use std::time::Duration;

use common::{Driver, Stack, spawn_on};
use ldt_contract::{Envelope, Message, Queues, Service, Step, StepOutcome};
use ldt_runtime::bus::Outgoing;
use ldt_runtime::consumer::{ORIGIN_QUEUE_HEADER, REASON_HEADER};
use uuid::Uuid;

/// The orders answered, reading answers until `n` orders have one (a duplicate answer
/// counts once), each of them a success.
async fn successes(driver: &mut Driver, n: usize) -> std::collections::HashSet<Uuid> {
    let mut answered = std::collections::HashSet::new();
    while answered.len() < n {
        let a = driver.answer().await;
        assert!(
            matches!(
                a.body,
                Message::StepResult {
                    outcome: StepOutcome::Done,
                    ..
                }
            ),
            "{:?}",
            a.body
        );
        answered.insert(a.order_id);
    }
    answered
}

/// `env` as a message to the payment service, with an id of its own.
fn to_payment(driver: &Driver, env: &Envelope) -> Outgoing {
    Outgoing {
        queue: driver.queues.of(Service::Payment),
        message_id: Uuid::now_v7().to_string(),
        payload: env.to_json(),
        headers: vec![],
    }
}

fn debit(order: Uuid, user: &str, total: i64) -> Envelope {
    Envelope::new(
        order,
        0,
        Message::Debit {
            username: user.into(),
            total,
            fault: None,
        },
    )
}

async fn a_debit_after_the_timeout_is_refunded_and_one_after_its_refund_is_refused(stack: Stack) {
    let app = spawn_on(stack, &[Service::Payment, Service::DeadLetter], &[]).await;
    let mut driver = Driver::orchestrator(&app).await;

    // The debit completes after the orchestrator recorded TIMEOUT (it sends the refund then):
    // the refund gives the money back.
    let late = Uuid::now_v7();
    driver.send(&debit(late, "late", 120)).await;
    let a = driver.answer().await;
    assert_eq!(
        (a.order_id, a.body),
        (
            late,
            Message::StepResult {
                step: Step::Payment,
                outcome: StepOutcome::Done
            }
        )
    );
    assert_eq!(app.credits("late").await, Some(380));
    driver.send(&Envelope::new(late, 0, Message::Refund)).await;
    assert_eq!(
        driver.answer().await.body,
        Message::Compensated {
            step: Step::Payment
        }
    );
    assert_eq!(app.credits("late").await, Some(500));

    // The refund overtakes the stalled debit: the debit is refused when it finally arrives.
    let overtaken = Uuid::now_v7();
    driver
        .send(&Envelope::new(overtaken, 0, Message::Refund))
        .await;
    assert_eq!(
        driver.answer().await.body,
        Message::Compensated {
            step: Step::Payment
        }
    );
    driver.send(&debit(overtaken, "overtaken", 120)).await;
    let a = driver.answer().await;
    assert_eq!(
        a.body,
        Message::StepResult {
            step: Step::Payment,
            outcome: StepOutcome::Refused
        }
    );
    assert_eq!(
        app.credits("overtaken").await,
        None,
        "a refused debit creates no user and takes nothing"
    );
}

/// A step that succeeds sends the next command of its routing slip on, with the rest of the
/// slip, and answers nobody; a step that does not succeed answers the orchestrator and sends
/// nothing on; the slip's last step answers the orchestrator.
async fn a_step_sends_its_slip_on_only_when_it_succeeds(stack: Stack) {
    let app = spawn_on(stack, &[Service::Payment, Service::Delivery], &[]).await;
    let mut driver = Driver::orchestrator(&app).await;
    let mut inventory = driver
        .bus
        .subscribe(&driver.queues.of(Service::Inventory), 100)
        .await
        .unwrap();
    let reserve = Message::Reserve {
        amount: 2,
        fault: None,
    };
    let deliver = Message::Deliver {
        username: "slip".into(),
        amount: 2,
        fault: None,
    };
    let (paid, broke) = (Uuid::now_v7(), Uuid::now_v7());
    // Twice: a duplicate sends the slip on again (the next step ignores it), and takes
    // nothing more.
    let mut slip = debit(paid, "slip", 300);
    slip.then = vec![reserve.clone(), deliver.clone()];
    for _ in 0..2 {
        driver.send(&slip).await;
        let msg = tokio::time::timeout(Duration::from_secs(10), inventory.next())
            .await
            .expect("the slip sent on within 10 s")
            .unwrap()
            .unwrap();
        msg.ack().await.unwrap();
        let sent_on = Envelope::from_json(&msg.payload).unwrap();
        assert_eq!(sent_on.order_id, paid);
        assert_eq!(sent_on.body, reserve);
        assert_eq!(sent_on.then, vec![deliver.clone()]);
    }
    assert_eq!(app.credits("slip").await, Some(200));
    // Not enough credits left: the orchestrator hears of it, inventory does not.
    let mut refused = debit(broke, "slip", 300);
    refused.then = vec![reserve.clone(), deliver.clone()];
    driver.send(&refused).await;
    let a = driver.answer().await;
    assert_eq!(
        (a.order_id, a.body),
        (
            broke,
            Message::StepResult {
                step: Step::Payment,
                outcome: StepOutcome::Insufficient
            }
        )
    );
    // The slip's last step answers the orchestrator. It is also the barrier: the inventory
    // queue (filled before it) holds nothing about the refused debit.
    let mut last = Envelope::new(paid, 0, deliver.clone());
    last.then = Vec::new();
    driver.send(&last).await;
    let a = driver.answer().await;
    assert_eq!(
        (a.order_id, a.body),
        (
            paid,
            Message::StepResult {
                step: Step::Delivery,
                outcome: StepOutcome::Done
            }
        )
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1), inventory.next())
            .await
            .is_err(),
        "nothing sent on after the refused debit"
    );
    assert_eq!(app.credits("slip").await, Some(200));
}

async fn duplicates_have_one_effect_and_get_the_first_answer(stack: Stack) {
    let app = spawn_on(
        stack,
        &[Service::Payment, Service::Inventory, Service::Delivery],
        &[],
    )
    .await;
    let mut driver = Driver::orchestrator(&app).await;
    let order = Uuid::now_v7();
    let cmds = [
        debit(order, "dup", 100),
        Envelope::new(
            order,
            0,
            Message::Reserve {
                amount: 4,
                fault: None,
            },
        ),
        Envelope::new(
            order,
            0,
            Message::Deliver {
                username: "dup".into(),
                amount: 4,
                fault: None,
            },
        ),
    ];
    for cmd in &cmds {
        driver.send(cmd).await;
        driver.send(cmd).await;
        let first = driver.answer().await;
        let second = driver.answer().await;
        assert_eq!(first.body, second.body, "{cmd:?}");
        assert!(
            matches!(
                first.body,
                Message::StepResult {
                    outcome: StepOutcome::Done,
                    ..
                }
            ),
            "{first:?}"
        );
    }
    assert_eq!(app.credits("dup").await, Some(400));
    assert_eq!(app.stock().await, 496);
    assert_eq!(app.active_deliveries("dup").await, [order.to_string()]);
    for undo in [Message::CancelDelivery, Message::Release, Message::Refund] {
        let env = Envelope::new(order, 0, undo);
        driver.send(&env).await;
        driver.send(&env).await;
        assert!(matches!(
            driver.answer().await.body,
            Message::Compensated { .. }
        ));
        assert!(matches!(
            driver.answer().await.body,
            Message::Compensated { .. }
        ));
    }
    assert_eq!(app.credits("dup").await, Some(500), "refunded once");
    assert_eq!(app.stock().await, 500, "released once");
    assert!(app.active_deliveries("dup").await.is_empty());
}

/// Commands published together reach the service together, so they are handled in batches:
/// duplicates inside a batch, and refunds racing their debit, must come out as they do one
/// message at a time.
async fn a_burst_with_duplicates_and_racing_refunds_has_one_effect_per_order(stack: Stack) {
    let app = spawn_on(stack, &[Service::Payment], &[]).await;
    let mut driver = Driver::orchestrator(&app).await;
    let mut burst = Vec::new();
    let mut duplicated = Vec::new();
    let mut raced = Vec::new();
    for i in 0..40 {
        let order = Uuid::now_v7();
        let cmd = debit(order, &format!("burst{i}"), 10);
        burst.push(cmd.clone());
        burst.push(cmd);
        duplicated.push(order);
    }
    for i in 0..5 {
        let order = Uuid::now_v7();
        burst.push(Envelope::new(order, 0, Message::Refund));
        burst.push(debit(order, &format!("raced{i}"), 10));
        raced.push(order);
    }
    let out: Vec<Outgoing> = burst.iter().map(|env| to_payment(&driver, env)).collect();
    driver.bus.publish(&out).await.unwrap();

    let mut results: std::collections::HashMap<Uuid, Vec<StepOutcome>> =
        std::collections::HashMap::new();
    let mut compensated = 0;
    for _ in 0..burst.len() {
        let a = driver.answer().await;
        match a.body {
            Message::StepResult { outcome, .. } => {
                results.entry(a.order_id).or_default().push(outcome)
            }
            Message::Compensated { .. } => compensated += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(compensated, 5);
    for (i, order) in duplicated.iter().enumerate() {
        assert_eq!(
            results.get(order).cloned().unwrap_or_default(),
            [StepOutcome::Done, StepOutcome::Done],
            "both copies of {order} get the first answer"
        );
        assert_eq!(
            app.credits(&format!("burst{i}")).await,
            Some(490),
            "burst{i} debited once"
        );
    }
    // Handled concurrently, a refund and its debit may go either way round; either way the
    // money ends where it started.
    for (i, order) in raced.iter().enumerate() {
        let answers = results.get(order).cloned().unwrap_or_default();
        let credits = app.credits(&format!("raced{i}")).await;
        match answers.as_slice() {
            [StepOutcome::Refused] => assert_eq!(credits, None, "refused: nothing taken"),
            [StepOutcome::Done] => assert_eq!(credits, Some(500), "debited, then refunded"),
            other => panic!("answers for {order}: {other:?}"),
        }
    }
}

/// Debits and reservations that arrive together are decided together: each sees the ones
/// before it, so a burst beyond a user's credits or beyond the stock takes exactly what they
/// cover, never more, and refuses the rest.
async fn bursts_beyond_the_credits_and_the_stock_take_exactly_what_they_cover(stack: Stack) {
    let app = spawn_on(stack, &[Service::Payment, Service::Inventory], &[]).await;
    let mut driver = Driver::orchestrator(&app).await;
    let stock = app.stock().await;
    assert_eq!(stock, 500, "the test's initial stock");
    let mut burst = Vec::new();
    let mut spender = std::collections::HashSet::new();
    for i in 0..20 {
        let order = Uuid::now_v7();
        spender.insert(order);
        burst.push(debit(order, "spender", 60));
        burst.push(debit(Uuid::now_v7(), &format!("bystander{i}"), 60));
        burst.push(Envelope::new(
            Uuid::now_v7(),
            0,
            Message::Reserve {
                amount: 70,
                fault: None,
            },
        ));
    }
    let out: Vec<Outgoing> = burst
        .iter()
        .map(|env| Outgoing {
            queue: driver.queues.of(env.body.destination()),
            message_id: env.id.to_string(),
            payload: env.to_json(),
            headers: vec![],
        })
        .collect();
    driver.bus.publish(&out).await.unwrap();

    let mut counts: std::collections::BTreeMap<(&str, String), usize> = Default::default();
    for _ in 0..burst.len() {
        let a = driver.answer().await;
        let Message::StepResult { step, outcome } = a.body else {
            panic!("unexpected answer {:?}", a.body);
        };
        let who = match step {
            Step::Inventory => "stock",
            _ if spender.contains(&a.order_id) => "spender",
            _ => "bystander",
        };
        *counts.entry((who, format!("{outcome:?}"))).or_default() += 1;
    }
    let count = |who: &'static str, outcome: StepOutcome| {
        counts
            .get(&(who, format!("{outcome:?}")))
            .copied()
            .unwrap_or(0)
    };
    // 8 × 60 = 480 ≤ 500 < 9 × 60.
    assert_eq!(count("spender", StepOutcome::Done), 8, "{counts:?}");
    assert_eq!(
        count("spender", StepOutcome::Insufficient),
        12,
        "{counts:?}"
    );
    assert_eq!(app.credits("spender").await, Some(20));
    assert_eq!(count("bystander", StepOutcome::Done), 20, "{counts:?}");
    for i in 0..20 {
        assert_eq!(app.credits(&format!("bystander{i}")).await, Some(440));
    }
    // 7 × 70 = 490 ≤ 500 < 8 × 70.
    assert_eq!(count("stock", StepOutcome::Done), 7, "{counts:?}");
    assert_eq!(count("stock", StepOutcome::Insufficient), 13, "{counts:?}");
    assert_eq!(app.stock().await, 10);
}

/// Compensations that arrive together (after an outage, thousands of sagas compensate at
/// once, with retries beside the first tries) are applied together: each successful action
/// undone exactly once, several of one user's refunds summed right, the stock given back
/// whole, and an order whose action never came tombstoned so that its late action is refused.
async fn a_burst_of_compensations_undoes_each_order_once(stack: Stack) {
    let app = spawn_on(stack, &[Service::Payment, Service::Inventory], &[]).await;
    let mut driver = Driver::orchestrator(&app).await;
    let queues = driver.queues.clone();
    let publish = |envs: &[Envelope]| -> Vec<Outgoing> {
        envs.iter()
            .map(|env| Outgoing {
                queue: queues.of(env.body.destination()),
                message_id: Uuid::now_v7().to_string(),
                payload: env.to_json(),
                headers: vec![],
            })
            .collect()
    };
    let users = ["refund-a", "refund-b", "refund-c"];
    let mut done = Vec::new();
    let mut actions = Vec::new();
    for i in 0..12 {
        let order = Uuid::now_v7();
        actions.push(debit(order, users[i % users.len()], 7));
        actions.push(Envelope::new(
            order,
            0,
            Message::Reserve {
                amount: 3,
                fault: None,
            },
        ));
        done.push(order);
    }
    driver.bus.publish(&publish(&actions)).await.unwrap();
    for _ in 0..actions.len() {
        let a = driver.answer().await;
        assert!(
            matches!(
                a.body,
                Message::StepResult {
                    outcome: StepOutcome::Done,
                    ..
                }
            ),
            "{:?}",
            a.body
        );
    }
    assert_eq!(app.credits("refund-a").await, Some(500 - 4 * 7));
    assert_eq!(app.stock().await, 500 - 12 * 3);

    // Every compensation twice, and three for orders whose actions never came.
    let never: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let mut undo = Vec::new();
    for order in done.iter().chain(&never) {
        for _ in 0..2 {
            undo.push(Envelope::new(*order, 0, Message::Refund));
            undo.push(Envelope::new(*order, 0, Message::Release));
        }
    }
    driver.bus.publish(&publish(&undo)).await.unwrap();
    let mut compensated: std::collections::HashMap<(Uuid, Step), usize> = Default::default();
    for _ in 0..undo.len() {
        let a = driver.answer().await;
        let Message::Compensated { step } = a.body else {
            panic!("unexpected answer {:?}", a.body);
        };
        *compensated.entry((a.order_id, step)).or_default() += 1;
    }
    for order in done.iter().chain(&never) {
        for step in [Step::Payment, Step::Inventory] {
            assert_eq!(
                compensated.get(&(*order, step)),
                Some(&2),
                "{order} at {step:?}"
            );
        }
    }
    for user in users {
        assert_eq!(
            app.credits(user).await,
            Some(500),
            "{user} refunded once per order"
        );
    }
    assert_eq!(app.stock().await, 500, "every reservation released once");

    // The actions of the tombstoned orders, late: refused, without effect.
    let late: Vec<Envelope> = never
        .iter()
        .map(|order| debit(*order, "refund-a", 7))
        .collect();
    driver.bus.publish(&publish(&late)).await.unwrap();
    for _ in 0..late.len() {
        let a = driver.answer().await;
        assert!(
            matches!(
                a.body,
                Message::StepResult {
                    outcome: StepOutcome::Refused,
                    ..
                }
            ),
            "{:?}",
            a.body
        );
    }
    assert_eq!(app.credits("refund-a").await, Some(500));
}

/// Answers the bus refuses (their queue is full) are not lost: they stay in the service's
/// outbox and its sweep publishes them once there is room. (The in-process bus is the one
/// with a configurable bound; the relay is the same on both stacks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_the_bus_refuses_stay_in_the_outbox_until_there_is_room() {
    let app = spawn_on(
        Stack::Embedded,
        &[Service::Payment],
        &["--bus-capacity", "4"],
    )
    .await;
    let queues = Queues::new(&app.settings.namespace);
    let orders: Vec<Uuid> = (0..12).map(|_| Uuid::now_v7()).collect();
    // Nobody reads the answers yet: after four, the answers' queue refuses the rest. The
    // commands go in as the payment service makes room in its own queue.
    for (i, order) in orders.iter().enumerate() {
        let env = debit(*order, &format!("patient{i}"), 10);
        let out = Outgoing {
            queue: queues.of(Service::Payment),
            message_id: env.id.to_string(),
            payload: env.to_json(),
            headers: vec![],
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match app.bus.publish(std::slice::from_ref(&out)).await {
                Ok(()) => break,
                Err(e) if e.is_refused() && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("publishing command {i}: {e}"),
            }
        }
    }
    // Every debit is taken, whether or not its answer could be published.
    for i in 0..orders.len() {
        let user = format!("patient{i}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app.credits(&user).await != Some(490) {
            assert!(std::time::Instant::now() < deadline, "{user} not debited");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut driver = Driver::orchestrator(&app).await;
    let answered = successes(&mut driver, orders.len()).await;
    assert_eq!(answered, orders.into_iter().collect());
}

async fn poison_messages_are_parked_and_replayable_and_the_service_keeps_working(stack: Stack) {
    let app = spawn_on(stack, &[Service::Payment, Service::DeadLetter], &[]).await;
    let mut driver = Driver::orchestrator(&app).await;
    let order = Uuid::now_v7();
    let wrong_version =
        format!(r#"{{"v":9,"id":"{order}","order_id":"{order}","at_ms":0,"type":"refund"}}"#);
    let poison: [(&str, Vec<u8>); 4] = [
        ("garbage", b"\x00\xffnot json".to_vec()),
        ("wrong-version", wrong_version.into_bytes()),
        (
            "wrong-service",
            Envelope::new(order, 0, Message::Release).to_json(),
        ),
        ("negative", debit(order, "neg", -5).to_json()),
    ];
    for (id, payload) in &poison {
        driver.send_raw(Service::Payment, payload.clone(), id).await;
    }
    let parked = app
        .eventually(Duration::from_secs(10), "four dead letters", || async {
            let dl = app.dead_letters().await;
            (dl.len() == 4).then_some(dl)
        })
        .await;
    for (id, _) in &poison {
        let letter = parked.iter().find(|d| d["id"] == *id).unwrap();
        assert_eq!(letter["origin_queue"], driver.queues.of(Service::Payment));
        assert!(!letter["reason"].as_str().unwrap().is_empty());
    }
    // Still working.
    driver.send(&debit(Uuid::now_v7(), "fine", 1)).await;
    assert!(matches!(
        driver.answer().await.body,
        Message::StepResult {
            outcome: StepOutcome::Done,
            ..
        }
    ));
    assert_eq!(app.credits("neg").await, None);
    // A replay sends it back to where it came from; still poison, it is parked again.
    let resp = app
        .client
        .post(app.url("/api/v1/dead-letters/garbage/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    app.eventually(
        Duration::from_secs(10),
        "the replayed letter parked again",
        || async {
            let dl = app.dead_letters().await;
            dl.iter()
                .any(|d| d["id"] == "garbage" && d["times_parked"] == 2)
                .then_some(())
        },
    )
    .await;
    let resp = app
        .client
        .post(app.url("/api/v1/dead-letters/nope/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

/// A bundle parked whole, as a replica from before bundles parks one during a rollout,
/// becomes one dead letter per part, each with where it came from and why; replayed, each
/// is handled.
async fn a_bundle_parked_whole_becomes_one_replayable_dead_letter_per_part(stack: Stack) {
    let app = spawn_on(stack, &[Service::Payment, Service::DeadLetter], &[]).await;
    let mut driver = Driver::orchestrator(&app).await;
    let payment = driver.queues.of(Service::Payment);
    let debits = [
        debit(Uuid::now_v7(), "bundled-a", 3),
        debit(Uuid::now_v7(), "bundled-b", 4),
    ];
    let parts: Vec<Outgoing> = debits
        .iter()
        .map(|env| Outgoing {
            queue: payment.clone(),
            message_id: env.id.to_string(),
            payload: env.to_json(),
            headers: vec![],
        })
        .collect();
    let bundle = Outgoing::bundle(&payment, &parts).unwrap();
    let mut headers = bundle.headers.clone();
    headers.push((ORIGIN_QUEUE_HEADER.to_owned(), payment.clone()));
    headers.push((REASON_HEADER.to_owned(), "not an envelope".to_owned()));
    let parked = Outgoing {
        queue: driver.queues.dead_letters(),
        message_id: "a-bundle".to_owned(),
        payload: bundle.payload,
        headers,
    };
    driver.bus.publish(&[parked]).await.unwrap();
    let ids: Vec<String> = debits.iter().map(|d| d.id.to_string()).collect();
    let letters = app
        .eventually(
            Duration::from_secs(10),
            "a dead letter per part",
            || async {
                let dl = app.dead_letters().await;
                ids.iter()
                    .map(|id| dl.iter().find(|d| d["id"] == id.as_str()).cloned())
                    .collect::<Option<Vec<_>>>()
            },
        )
        .await;
    for letter in &letters {
        assert_eq!(letter["origin_queue"], payment.as_str(), "{letter}");
        assert_eq!(letter["reason"], "not an envelope", "{letter}");
    }
    for id in &ids {
        let resp = app
            .client
            .post(app.url(&format!("/api/v1/dead-letters/{id}/replay")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let answered = successes(&mut driver, 2).await;
    assert_eq!(answered, debits.iter().map(|d| d.order_id).collect());
}

/// After a broker node is lost, duplicates and actions that come after their compensation are
/// everywhere. A batch holding some beside new actions is still applied as a batch, those
/// answered from the ledger: a step that fell to one transaction per message (as it did)
/// fell behind its queue, and the sagas waiting on it timed out, which made more of them.
async fn a_batch_with_actions_already_in_the_ledger_is_still_applied_as_a_batch(stack: Stack) {
    let app = spawn_on(stack, &[Service::Payment], &[]).await;
    let mut driver = Driver::orchestrator(&app).await;
    let seen: Vec<Envelope> = (0..10)
        .map(|i| debit(Uuid::now_v7(), &format!("seen{i}"), 10))
        .collect();
    for cmd in &seen {
        driver.send(cmd).await;
    }
    successes(&mut driver, seen.len()).await;
    // A refund before its debit: the debit, when it comes, is refused.
    let late = Uuid::now_v7();
    driver.send(&Envelope::new(late, 0, Message::Refund)).await;
    assert!(matches!(
        driver.answer().await.body,
        Message::Compensated { .. }
    ));

    // One bundle, so that it is one batch: the ten again, the late debit, ten new debits and
    // one of those twice.
    let fresh: Vec<Envelope> = (0..10)
        .map(|i| debit(Uuid::now_v7(), &format!("fresh{i}"), 10))
        .collect();
    let late_debit = debit(late, "late", 10);
    let parts: Vec<Outgoing> = seen
        .iter()
        .chain(&fresh)
        .chain([&late_debit, &fresh[0]])
        .map(|env| to_payment(&driver, env))
        .collect();
    let bundle = Outgoing::bundle(&driver.queues.of(Service::Payment), &parts).unwrap();
    driver.bus.publish(&[bundle]).await.unwrap();

    let mut results: std::collections::HashMap<Uuid, Vec<StepOutcome>> =
        std::collections::HashMap::new();
    for _ in 0..parts.len() {
        let a = driver.answer().await;
        match a.body {
            Message::StepResult { outcome, .. } => {
                results.entry(a.order_id).or_default().push(outcome)
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    for (i, cmd) in seen.iter().enumerate() {
        assert_eq!(results[&cmd.order_id], [StepOutcome::Done], "seen{i}");
        assert_eq!(
            app.credits(&format!("seen{i}")).await,
            Some(490),
            "seen{i} debited once"
        );
    }
    for (i, cmd) in fresh.iter().enumerate() {
        let copies = if i == 0 { 2 } else { 1 };
        assert_eq!(
            results[&cmd.order_id],
            vec![StepOutcome::Done; copies],
            "fresh{i}"
        );
        assert_eq!(
            app.credits(&format!("fresh{i}")).await,
            Some(490),
            "fresh{i} debited once"
        );
    }
    assert_eq!(results[&late], [StepOutcome::Refused]);
    assert_eq!(
        app.credits("late").await,
        None,
        "the late debit took nothing"
    );

    // The batch failed on the rows it found taken, and was done again as a batch.
    let metrics = app.metrics().await;
    let failed = |then: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("ldt_step_batches_failed_total{")
                    && l.contains(&format!("then=\"{then}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    };
    assert_eq!(
        failed("answered_from_ledger").as_deref(),
        Some("1"),
        "{metrics}"
    );
    assert_eq!(failed("one_at_a_time"), None, "{metrics}");
}

on_every_stack!(
    a_debit_after_the_timeout_is_refunded_and_one_after_its_refund_is_refused,
    a_step_sends_its_slip_on_only_when_it_succeeds,
    duplicates_have_one_effect_and_get_the_first_answer,
    a_burst_with_duplicates_and_racing_refunds_has_one_effect_per_order,
    bursts_beyond_the_credits_and_the_stock_take_exactly_what_they_cover,
    a_burst_of_compensations_undoes_each_order_once,
    poison_messages_are_parked_and_replayable_and_the_service_keeps_working,
    a_bundle_parked_whole_becomes_one_replayable_dead_letter_per_part,
    a_batch_with_actions_already_in_the_ledger_is_still_applied_as_a_batch,
);
