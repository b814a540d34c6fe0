//! Property tests of the saga: a simulated world of three step services (each with the
//! ledger semantics of `step.rs`: idempotent actions, tombstones, compensations that may
//! fail for good a few times) and a network that reorders, duplicates and loses messages,
//! driven by a script of random choices. Whatever the script, every saga ends in one final
//! status with its books right; on the way no event is applied twice to any effect, a late
//! answer changes nothing, and the compensations go strictly last step first.

use super::*;
use ldt_contract::FaultPlan;
use proptest::prelude::*;

const POLICY: Policy = Policy {
    step_timeout_ms: 100,
    max_backoff_ms: 1_000,
    report_after_attempts: 3,
};

/// What a step service remembers of the order (its ledger row).
#[derive(Debug, Clone, Default)]
struct Ledger {
    /// The action's outcome, once claimed; `Refused` for a tombstone.
    outcome: Option<StepOutcome>,
    compensated: bool,
    /// The next compensations that fail for good before one succeeds.
    failures_left: u8,
}

/// A message in flight.
#[derive(Debug, Clone)]
enum InFlight {
    /// A command to a step service, with the rest of its slip.
    ToStep { step: Step, cmd: Command },
    /// An answer to the orchestrator.
    ToSaga(Event),
}

/// A script of choices; past its end the world behaves: no losses, no duplicates, every
/// message delivered in order, operators retry what is stuck.
struct Script<'a> {
    choices: &'a [u8],
    at: usize,
}

impl Script<'_> {
    fn next(&mut self) -> Option<u8> {
        let c = self.choices.get(self.at).copied();
        self.at += 1;
        c
    }
}

struct World {
    saga: Saga,
    ledgers: [Ledger; 3],
    net: Vec<InFlight>,
    now: i64,
    /// The steps of the compensations sent, in order.
    compensations_sent: Vec<Step>,
    /// The steps whose compensation the saga accepted, in order.
    compensations_done: Vec<Step>,
    status_seen: Option<OrderStatus>,
    events: usize,
}

fn step_of(body: &Message) -> Option<(Step, bool)> {
    match body {
        Message::Debit { .. } => Some((Step::Payment, false)),
        Message::Reserve { .. } => Some((Step::Inventory, false)),
        Message::Deliver { .. } => Some((Step::Delivery, false)),
        Message::Refund => Some((Step::Payment, true)),
        Message::Release => Some((Step::Inventory, true)),
        Message::CancelDelivery => Some((Step::Delivery, true)),
        _ => None,
    }
}

impl World {
    fn new(choices: &mut Script<'_>) -> World {
        let terms = Terms {
            username: "ann".into(),
            price: 2,
            amount: 3,
            faults: FaultPlan::default(),
        };
        let (saga, fx) = start(Uuid::nil(), terms, Opening::Orchestrator, &POLICY, 0);
        let mut ledgers: [Ledger; 3] = Default::default();
        for l in &mut ledgers {
            // Mostly none; sometimes a compensation fails for good once or twice.
            l.failures_left = match choices.next() {
                Some(c) if c % 8 == 0 => 1 + c / 128,
                _ => 0,
            };
        }
        let mut world = World {
            saga,
            ledgers,
            net: Vec::new(),
            now: 0,
            compensations_sent: Vec::new(),
            compensations_done: Vec::new(),
            status_seen: None,
            events: 0,
        };
        world.send(fx);
        world
    }

    fn send(&mut self, fx: Effects) {
        for line in &fx.log {
            if line.kind == LogKind::Compensated && line.event == "done" {
                self.compensations_done.push(line.step);
            }
        }
        for cmd in fx.send {
            match step_of(&cmd.body) {
                Some((step, compensation)) => {
                    if compensation {
                        self.compensations_sent.push(step);
                    }
                    self.net.push(InFlight::ToStep { step, cmd });
                }
                None => assert!(
                    matches!(cmd.body, Message::OrderFinished { .. }),
                    "the saga sends commands and its end only: {cmd:?}"
                ),
            }
        }
    }

    /// Applies an event, checking on the way what must hold of every transition.
    fn apply(&mut self, event: Event) {
        self.events += 1;
        let before = self.saga.clone();
        let late = matches!(event, Event::Answered { step, .. }
            if before.phase != Phase::Running || step.index() < before.step.index());
        let (after, fx) = apply(&before, event.clone(), &POLICY, self.now);
        // The deadline poller sleeps on this: a deadline set now is never nearer.
        if let Some(due) = after
            .deadline_ms
            .filter(|_| after.deadline_ms != before.deadline_ms)
        {
            assert!(
                due >= self.now + POLICY.least_deadline_ahead_ms(),
                "{event:?} set a deadline {} ms ahead",
                due - self.now
            );
        }
        if late {
            assert_eq!(after, before, "a late answer changes nothing: {event:?}");
            assert!(fx.send.is_empty());
        }
        // The same event again changes nothing and sends nothing.
        let (again, fx_again) = apply(&after, event.clone(), &POLICY, self.now);
        assert_eq!(again, after, "{event:?} applied twice changed the saga");
        assert!(
            fx_again.send.is_empty(),
            "{event:?} applied twice sent {fx_again:?}"
        );
        // A decided status never changes.
        if let Some(seen) = self.status_seen {
            assert_eq!(
                after.status,
                Some(seen),
                "the status changed after {event:?}"
            );
        }
        self.status_seen = after.status;
        if after.phase == Phase::Done {
            assert!(after.status.is_some_and(|s| s.is_final()));
            assert!(after.pending.is_empty() && after.deadline_ms.is_none());
        }
        self.saga = after;
        self.send(fx);
    }

    /// A step service handles a command, as `step.rs` does.
    fn handle(&mut self, step: Step, cmd: Command, outcome_choice: u8) {
        let ledger = &mut self.ledgers[step.index()];
        let reply = if step_of(&cmd.body).is_some_and(|(_, comp)| comp) {
            if ledger.failures_left > 0 {
                ledger.failures_left -= 1;
                Event::CompensationFailed {
                    step,
                    reason: "constraint violated".into(),
                }
            } else {
                if ledger.outcome.is_none() {
                    // Before its action: a tombstone refuses the action when it comes.
                    ledger.outcome = Some(StepOutcome::Refused);
                }
                ledger.compensated = true;
                Event::Compensated { step }
            }
        } else {
            let outcome = *ledger.outcome.get_or_insert(match outcome_choice % 10 {
                0 => StepOutcome::Insufficient,
                1 => StepOutcome::Failed,
                _ => StepOutcome::Done,
            });
            match (outcome, cmd.then.split_first()) {
                // A success sends the slip on (again, for a duplicate).
                (StepOutcome::Done, Some((next, rest))) => {
                    let (next_step, _) = step_of(next).unwrap_or((step, false));
                    self.net.push(InFlight::ToStep {
                        step: next_step,
                        cmd: Command {
                            body: next.clone(),
                            then: rest.to_vec(),
                        },
                    });
                    return;
                }
                _ => Event::Answered { step, outcome },
            }
        };
        self.net.push(InFlight::ToSaga(reply));
    }

    fn deliver(&mut self, i: usize, outcome_choice: u8) {
        match self.net.remove(i) {
            InFlight::ToStep { step, cmd } => self.handle(step, cmd, outcome_choice),
            InFlight::ToSaga(event) => self.apply(event),
        }
    }

    fn fire_deadline(&mut self) {
        if let Some(due) = self.saga.deadline_ms {
            self.now = self.now.max(due);
            self.apply(Event::Deadline { due_ms: due });
        }
    }

    /// One move of the script: deliver, duplicate, lose or reorder a message, let time pass
    /// to the deadline, or have an operator act.
    fn step_with(&mut self, c: u8, d: u8) {
        self.now += i64::from(c % 7);
        match c % 16 {
            0 => self.fire_deadline(),
            1 if !self.net.is_empty() => {
                // Lost.
                let i = usize::from(d) % self.net.len();
                self.net.remove(i);
            }
            2 if !self.net.is_empty() => {
                // Duplicated.
                let i = usize::from(d) % self.net.len();
                let copy = self.net[i].clone();
                self.net.push(copy);
            }
            3 => self.apply(Event::Retry),
            4 => self.apply(Event::Cancel),
            _ if !self.net.is_empty() => {
                let i = usize::from(d) % self.net.len();
                self.deliver(i, c / 16);
            }
            _ => self.fire_deadline(),
        }
    }

    /// Past the script: messages in order, deadlines when nothing is in flight, a retry when
    /// the saga is stuck.
    fn settle(&mut self) {
        let mut moves = 0;
        while self.saga.phase != Phase::Done {
            moves += 1;
            assert!(moves < 10_000, "the saga never ended: {:?}", self.saga);
            if !self.net.is_empty() {
                self.deliver(0, 5);
            } else if self.saga.stuck.is_some() {
                self.apply(Event::Retry);
            } else {
                assert!(
                    self.saga.deadline_ms.is_some(),
                    "a saga waiting for nothing: {:?}",
                    self.saga
                );
                self.fire_deadline();
            }
        }
        // Whatever is still in flight arrives late, and changes nothing.
        while !self.net.is_empty() {
            self.deliver(0, 5);
        }
    }

    fn check_books(&self) {
        let status = self.saga.status;
        for step in Step::ALL {
            let l = &self.ledgers[step.index()];
            let active = l.outcome == Some(StepOutcome::Done) && !l.compensated;
            assert_eq!(
                active,
                status == Some(OrderStatus::Success),
                "{step:?} is {} for an order ending {status:?}",
                if active { "in effect" } else { "not in effect" },
            );
        }
    }

    fn check_compensation_order(&self) {
        // Sent: last step first, each step's retries together, never back to a later step.
        let mut firsts: Vec<Step> = Vec::new();
        for s in &self.compensations_sent {
            if firsts.last() != Some(s) {
                firsts.push(*s);
            }
        }
        assert!(
            firsts.windows(2).all(|w| w[0].index() > w[1].index()),
            "compensations sent out of order: {:?}",
            self.compensations_sent
        );
        assert!(
            self.compensations_done
                .windows(2)
                .all(|w| w[0].index() > w[1].index()),
            "compensations applied out of order or twice: {:?}",
            self.compensations_done
        );
    }
}

fn run(choices: &[u8]) -> World {
    let mut script = Script { choices, at: 0 };
    let mut world = World::new(&mut script);
    while let (Some(c), Some(d)) = (script.next(), script.next()) {
        if world.saga.phase == Phase::Done && world.net.is_empty() {
            break;
        }
        world.step_with(c, d);
    }
    world.settle();
    world
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Whatever happens on the way, the saga ends with a final status, what is in effect
    /// matches it, and compensations run strictly last first, each applied at most once.
    /// (Every transition on the way is checked in `World::apply`: a late answer changes
    /// nothing, an event applied twice changes nothing, a decided status stays.)
    #[test]
    fn every_saga_ends_final_with_its_books_right(choices in prop::collection::vec(any::<u8>(), 0..240)) {
        let world = run(&choices);
        prop_assert!(world.saga.status.is_some_and(|s| s.is_final()));
        world.check_books();
        world.check_compensation_order();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// A deadline that is not the saga's own (stale, early, or already handled) changes
    /// nothing, in any state.
    #[test]
    fn a_stale_or_early_deadline_changes_nothing(
        choices in prop::collection::vec(any::<u8>(), 0..120),
        skew in 1i64..10_000,
    ) {
        let mut script = Script { choices: &choices, at: 0 };
        let mut world = World::new(&mut script);
        while let (Some(c), Some(d)) = (script.next(), script.next()) {
            world.step_with(c, d);
            let saga = world.saga.clone();
            let stale = saga.deadline_ms.map_or(world.now, |due| due - skew);
            let (after, fx) = apply(&saga, Event::Deadline { due_ms: stale }, &POLICY, world.now);
            prop_assert_eq!(&after, &saga);
            prop_assert!(fx.send.is_empty());
            if let Some(due) = saga.deadline_ms.filter(|due| *due > world.now) {
                let (after, _) = apply(&saga, Event::Deadline { due_ms: due }, &POLICY, world.now);
                prop_assert_eq!(after, saga, "a deadline not yet due fired");
            }
        }
    }
}

#[test]
fn a_successful_slip_sends_one_command_and_hears_one_answer() {
    let terms = Terms {
        username: "ann".into(),
        price: 2,
        amount: 3,
        faults: FaultPlan::default(),
    };
    let (saga, fx) = start(Uuid::nil(), terms, Opening::Orchestrator, &POLICY, 1_000);
    assert_eq!(saga.deadline_ms, Some(1_300));
    assert_eq!(fx.send.len(), 1);
    assert_eq!(
        fx.send[0].body,
        Message::Debit {
            username: "ann".into(),
            total: 6,
            fault: None
        }
    );
    assert_eq!(fx.send[0].then.len(), 2);
    assert_eq!(fx.log[0].event, "sent (slip: reserve, deliver)");
    let done = Event::Answered {
        step: Step::Delivery,
        outcome: StepOutcome::Done,
    };
    let (saga, fx) = apply(&saga, done, &POLICY, 1_020);
    assert_eq!(saga.phase, Phase::Done);
    assert_eq!(saga.status, Some(OrderStatus::Success));
    assert_eq!(
        fx.send[0].body,
        Message::OrderFinished {
            status: OrderStatus::Success
        }
    );
    assert_eq!(
        fx.metrics,
        vec![MetricEvent::StepLatency {
            step: Step::Delivery,
            outcome: StepOutcome::Done,
            ms: 20
        }]
    );
}

#[test]
fn a_saga_the_order_service_opened_sends_nothing_and_runs_as_one_the_orchestrator_opened() {
    let terms = Terms {
        username: "ann".into(),
        price: 2,
        amount: 3,
        faults: FaultPlan::default(),
    };
    let (by_us, ours) = start(
        Uuid::nil(),
        terms.clone(),
        Opening::Orchestrator,
        &POLICY,
        1_000,
    );
    let (saga, fx) = start(
        Uuid::nil(),
        terms.clone(),
        Opening::OrderService,
        &POLICY,
        1_000,
    );
    assert!(fx.send.is_empty(), "{fx:?}");
    assert_eq!(
        fx.log[0].event,
        "sent (slip: reserve, deliver) by the order service"
    );
    // The same saga, deadline and all; and the command the order service sent is the one
    // the orchestrator would have.
    assert_eq!(saga, by_us);
    assert_eq!(vec![opening(&terms)], ours.send);
    // An answer from any step on the slip moves it on as usual: here, a refusal at inventory
    // (the slip got that far before the orchestrator heard of the saga) is undone.
    let refused = Event::Answered {
        step: Step::Inventory,
        outcome: StepOutcome::Insufficient,
    };
    let (after, fx) = apply(&saga, refused, &POLICY, 1_010);
    assert_eq!(after.phase, Phase::Compensating);
    assert_eq!(fx.send[0].body, Message::Refund);
}

#[test]
fn a_stuck_compensation_waits_for_an_operator_and_then_goes_on() {
    let mut world = run(&[]);
    assert_eq!(world.saga.status, Some(OrderStatus::Success));
    // A saga failing at delivery (payment and inventory acted), whose release fails for good.
    let terms = world.saga.terms.clone();
    let (saga, _) = start(Uuid::nil(), terms, Opening::Orchestrator, &POLICY, 0);
    for step in [Step::Payment, Step::Inventory] {
        world.ledgers[step.index()] = Ledger {
            outcome: Some(StepOutcome::Done),
            ..Ledger::default()
        };
    }
    world.ledgers[Step::Delivery.index()] = Ledger {
        outcome: Some(StepOutcome::Failed),
        ..Ledger::default()
    };
    let failed = Event::Answered {
        step: Step::Delivery,
        outcome: StepOutcome::Failed,
    };
    let (saga, fx) = apply(&saga, failed, &POLICY, 10);
    assert_eq!(saga.pending, vec![Step::Inventory, Step::Payment]);
    assert_eq!(fx.send[0].body, Message::Release);
    let broken = Event::CompensationFailed {
        step: Step::Inventory,
        reason: "CHECK violated".into(),
    };
    let (saga, fx) = apply(&saga, broken, &POLICY, 20);
    assert_eq!(saga.stuck.as_deref(), Some("CHECK violated"));
    assert_eq!(saga.deadline_ms, None, "no retries by itself");
    assert!(saga.retryable());
    assert_eq!(
        fx.notices,
        vec![Notice::Stuck {
            step: Step::Inventory,
            reason: "CHECK violated".into()
        }]
    );
    let (saga, fx) = apply(&saga, Event::Retry, &POLICY, 30);
    assert_eq!(saga.stuck, None);
    assert_eq!(fx.send[0].body, Message::Release);
    world.status_seen = saga.status;
    world.saga = saga;
    world.net.clear();
    world.send(fx);
    world.settle();
    assert_eq!(world.saga.status, Some(OrderStatus::Unknown));
    world.check_books();
}

#[test]
fn cancel_undoes_every_step_of_a_running_saga_and_nothing_else() {
    let terms = Terms {
        username: "ann".into(),
        price: 2,
        amount: 3,
        faults: FaultPlan::default(),
    };
    let (saga, _) = start(Uuid::nil(), terms, Opening::Orchestrator, &POLICY, 0);
    assert!(saga.cancellable());
    let (saga, fx) = apply(&saga, Event::Cancel, &POLICY, 5);
    assert_eq!(saga.status, Some(OrderStatus::Cancelled));
    assert_eq!(
        saga.pending,
        vec![Step::Delivery, Step::Inventory, Step::Payment]
    );
    assert_eq!(fx.send[0].body, Message::CancelDelivery);
    assert!(!saga.cancellable());
    let (again, fx) = apply(&saga, Event::Cancel, &POLICY, 6);
    assert_eq!(again, saga);
    assert!(fx.send.is_empty());
}

#[test]
fn compensation_retries_back_off_and_are_spread_over_sagas() {
    let ids: Vec<Uuid> = (0..1_000u128)
        .map(|i| Uuid::from_u128(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)))
        .collect();
    for attempts in 0..8 {
        // Four step timeouts, doubled per try, at most `max_backoff_ms`: then ±25 %.
        let nominal = (400i64 << attempts).min(POLICY.max_backoff_ms);
        let waits: Vec<i64> = ids
            .iter()
            .map(|id| POLICY.backoff_ms(attempts, *id))
            .collect();
        let (lo, hi) = (*waits.iter().min().unwrap(), *waits.iter().max().unwrap());
        assert!(
            lo >= nominal * 3 / 4 && hi <= nominal * 5 / 4,
            "try {attempts}: {lo}..{hi} ms around {nominal}"
        );
        // Sagas that failed together do not all send again together.
        assert!(hi - lo >= nominal * 2 / 5, "try {attempts}: {lo}..{hi} ms");
    }
}
