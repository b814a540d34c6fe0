//! The saga as a pure function: [`start`] and [`apply`] take a saga and what happened to it,
//! and give back the saga after it and what it wants done — commands to send, log lines,
//! metric events, notices worth a log line. No I/O: the handler reads the saga, calls these,
//! and the store writes the result, so the SQL can change without touching the saga's
//! behaviour, and every transition is tested in milliseconds (see the property tests below).
//!
//! The steps' order and commands are the saga's plan ([`crate::services::plan`]). A saga
//! starts on a routing slip (the debit carries the reserve and the deliver; this service sends
//! it, or with `--order-opens-saga` the order service, made by [`opening`], beside
//! `OrderPlaced`), so a successful saga hears one answer, from the last step. A step that
//! fails ends the slip there, and the steps before it are undone one at a time, the last
//! first. When the deadline passes (one step timeout per step on the
//! slip) the saga cannot know how far the slip got, so it undoes every step on it, the last
//! first: a step that never acted leaves a tombstone that refuses its late command, and
//! compensating in reverse order means a command the slip sends on late finds its step
//! already compensated. A compensation that gets no answer is sent again with backoff; one
//! the step service gave up on (a permanent failure) makes the saga *stuck* until an operator
//! retries it. Whatever arrives for a step the saga has moved past is *late*: logged, and
//! otherwise ignored.

use ldt_contract::{Message, OrderStatus, Step, StepOutcome};
use uuid::Uuid;

pub use crate::services::plan::{Command, Terms, invalid_terms, opening, slip};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The slip is under way.
    Running,
    /// Undoing the steps in `pending`, the head in flight.
    Compensating,
    /// Final: the status is decided and every compensation it needed is applied.
    Done,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Running, Phase::Compensating, Phase::Done];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Compensating => "compensating",
            Phase::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// One saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saga {
    pub order_id: Uuid,
    pub terms: Terms,
    pub phase: Phase,
    /// The step the last forward command went to: the slip runs from there to its end.
    pub step: Step,
    /// The final status, once decided (while compensating, the one it will end with).
    pub status: Option<OrderStatus>,
    /// Compensations still to apply, the one in flight first.
    pub pending: Vec<Step>,
    /// Times the compensation in flight was sent again for want of an answer.
    pub attempts: u32,
    /// Why the compensation in flight cannot succeed, as its step reported; no retries until
    /// an operator asks for one.
    pub stuck: Option<String>,
    /// When the saga is due to act by itself: the slip's deadline while running, the next
    /// try of the compensation in flight while compensating. `None` when nothing is due.
    pub deadline_ms: Option<i64>,
    /// When the saga last changed.
    pub updated_ms: i64,
}

/// What can happen to a saga once it has started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A step answered its command (for a success, only the slip's last step answers).
    Answered { step: Step, outcome: StepOutcome },
    /// A step applied its compensation.
    Compensated { step: Step },
    /// A step gave up on its compensation: it failed in a way retrying will not mend.
    CompensationFailed { step: Step, reason: String },
    /// The deadline the saga set for `due_ms` passed. A deadline the saga has moved since
    /// (a duplicate, a stale timer) changes nothing.
    Deadline { due_ms: i64 },
    /// An operator asks for the compensation in flight to be tried again now (the cause of
    /// its failure is mended).
    Retry,
    /// An operator cancels the order: a running saga undoes every step and ends CANCELLED.
    Cancel,
}

/// The timing rules of a saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Each step's share of the slip's deadline, in ms.
    pub step_timeout_ms: i64,
    /// Longest wait between two tries of an unanswered compensation, in ms.
    pub max_backoff_ms: i64,
    /// Unanswered tries of a compensation after which it is reported (once).
    pub report_after_attempts: u32,
}

impl Policy {
    pub fn new(step_timeout_ms: i64) -> Policy {
        Policy {
            step_timeout_ms,
            max_backoff_ms: 30_000,
            report_after_attempts: 5,
        }
    }

    /// The slip's deadline: a step timeout for each step on it.
    pub fn saga_timeout_ms(&self) -> i64 {
        self.step_timeout_ms
            .saturating_mul(i64::try_from(Step::ALL.len()).unwrap_or(i64::MAX))
    }

    /// How far ahead of the moment it is written a deadline always lies: the slip's
    /// deadline, or the shortest wait before a compensation is sent again, whichever is
    /// shorter. The deadline poller relies on it: a deadline written after it looked cannot
    /// fall due sooner than this after that look.
    pub fn least_deadline_ahead_ms(&self) -> i64 {
        self.saga_timeout_ms().min(self.backoff_ms(0, Uuid::nil()))
    }

    /// The wait before the compensation in flight is sent again, after `attempts` tries:
    /// four step timeouts, doubling with each try up to `max_backoff_ms`, spread ±25 % by the
    /// order's id. A compensation goes unanswered far more often because its step is slow (a
    /// backlog in its queue after an outage) than because it was lost; sending it again soon
    /// only lengthens that backlog, and thousands of sagas compensating after one outage
    /// would otherwise all send again in the same instant.
    pub fn backoff_ms(&self, attempts: u32, order_id: Uuid) -> i64 {
        let wait = self
            .step_timeout_ms
            .saturating_mul(4)
            .saturating_mul(1i64 << attempts.min(20))
            .min(self.max_backoff_ms);
        // 0.75 + 0.5 × (the id's low 16 bits / 2^16): random bits in a v4 or v7 UUID.
        let spread = i64::from(order_id.as_u128() as u16);
        wait.saturating_mul(3 * 65_536 + 2 * spread) / (4 * 65_536)
    }
}

/// What a log line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKind {
    OrderPlaced,
    Debit,
    Reserve,
    Deliver,
    Refund,
    Release,
    CancelDelivery,
    StepResult,
    Compensated,
    CompensationFailed,
    Deadline,
    Retry,
    Cancel,
    OrderFinished,
}

impl LogKind {
    pub const ALL: [LogKind; 14] = [
        LogKind::OrderPlaced,
        LogKind::Debit,
        LogKind::Reserve,
        LogKind::Deliver,
        LogKind::Refund,
        LogKind::Release,
        LogKind::CancelDelivery,
        LogKind::StepResult,
        LogKind::Compensated,
        LogKind::CompensationFailed,
        LogKind::Deadline,
        LogKind::Retry,
        LogKind::Cancel,
        LogKind::OrderFinished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LogKind::OrderPlaced => "order_placed",
            LogKind::Debit => "debit",
            LogKind::Reserve => "reserve",
            LogKind::Deliver => "deliver",
            LogKind::Refund => "refund",
            LogKind::Release => "release",
            LogKind::CancelDelivery => "cancel_delivery",
            LogKind::StepResult => "step_result",
            LogKind::Compensated => "compensated",
            LogKind::CompensationFailed => "compensation_failed",
            LogKind::Deadline => "deadline",
            LogKind::Retry => "retry",
            LogKind::Cancel => "cancel",
            LogKind::OrderFinished => "order_finished",
        }
    }

    pub fn parse(s: &str) -> Option<LogKind> {
        LogKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kind of a command's line.
    fn of_command(step: Step) -> LogKind {
        match step {
            Step::Payment => LogKind::Debit,
            Step::Inventory => LogKind::Reserve,
            Step::Delivery => LogKind::Deliver,
        }
    }

    fn of_compensation(step: Step) -> LogKind {
        match step {
            Step::Payment => LogKind::Refund,
            Step::Inventory => LogKind::Release,
            Step::Delivery => LogKind::CancelDelivery,
        }
    }
}

/// One line of the saga's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub step: Step,
    pub kind: LogKind,
    pub event: String,
}

/// What the metrics should count.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricEvent {
    /// A step answered `ms` after the command (or slip) it answered was sent.
    StepLatency {
        step: Step,
        outcome: StepOutcome,
        ms: i64,
    },
    Compensated {
        step: Step,
    },
    CompensationRetried {
        step: Step,
    },
    TimedOut {
        step: Step,
    },
}

/// What deserves a line in the service's log (once, not at every retry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The deadline passed: the order ends TIMEOUT.
    TimedOut { step: Step },
    /// A compensation has gone unanswered this many times (it is still retried).
    Unanswered { step: Step, attempts: u32 },
    /// A compensation cannot succeed: the saga waits for an operator.
    Stuck { step: Step, reason: String },
    /// An operator retried a compensation.
    Retried { step: Step },
    /// An operator cancelled the order.
    Cancelled,
}

/// What a transition wants done.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    pub send: Vec<Command>,
    pub log: Vec<LogLine>,
    pub metrics: Vec<MetricEvent>,
    pub notices: Vec<Notice>,
}

impl Effects {
    fn log(&mut self, step: Step, kind: LogKind, event: impl Into<String>) {
        self.log.push(LogLine {
            step,
            kind,
            event: event.into(),
        });
    }
}

impl Saga {
    /// Whether an operator's retry would do something: the compensation in flight is stuck,
    /// or has gone unanswered at least once.
    pub fn retryable(&self) -> bool {
        self.phase == Phase::Compensating && (self.stuck.is_some() || self.attempts > 0)
    }

    /// Whether the saga can still be cancelled (it has not failed or finished already).
    pub fn cancellable(&self) -> bool {
        self.phase == Phase::Running
    }
}

/// The log line of a slip sent: its first command, and those it carries.
fn slip_sent(cmd: &Command) -> String {
    if cmd.then.is_empty() {
        return "sent".into();
    }
    let rest: Vec<&str> = cmd.then.iter().map(Message::kind).collect();
    format!("sent (slip: {})", rest.join(", "))
}

/// Who sends a new saga's first command (its routing slip).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// The orchestrator, as the saga starts (the default; and for an order service that
    /// predates `slip_sent`).
    Orchestrator,
    /// The order service (`--order-opens-saga`), in the transaction that stored the order
    /// and its `OrderPlaced` ([`opening`]): the slip is on its way while the orchestrator
    /// learns of the saga, one hop off every order's path.
    OrderService,
}

/// A new saga: running, its slip sent from the first step (by the orchestrator, unless the
/// order service sent it already), its deadline set.
pub fn start(
    order_id: Uuid,
    terms: Terms,
    opened_by: Opening,
    policy: &Policy,
    now: i64,
) -> (Saga, Effects) {
    let first = Step::ALL[0];
    let cmd = opening(&terms);
    let mut fx = Effects::default();
    match opened_by {
        Opening::Orchestrator => {
            fx.log(first, LogKind::of_command(first), slip_sent(&cmd));
            fx.send.push(cmd);
        }
        Opening::OrderService => fx.log(
            first,
            LogKind::of_command(first),
            format!("{} by the order service", slip_sent(&cmd)),
        ),
    }
    let saga = Saga {
        order_id,
        terms,
        phase: Phase::Running,
        step: first,
        status: None,
        pending: Vec::new(),
        attempts: 0,
        stuck: None,
        deadline_ms: Some(now.saturating_add(policy.saga_timeout_ms())),
        updated_ms: now,
    };
    (saga, fx)
}

/// The saga after `event`, and what it wants done. A saga the event does not change comes
/// back equal (its `updated_ms` too), with at most a log line saying what was ignored.
pub fn apply(saga: &Saga, event: Event, policy: &Policy, now: i64) -> (Saga, Effects) {
    let mut next = saga.clone();
    let mut fx = Effects::default();
    match event {
        Event::Answered { step, outcome } => {
            on_answer(&mut next, step, outcome, policy, now, &mut fx)
        }
        Event::Compensated { step } => on_compensated(&mut next, step, policy, now, &mut fx),
        Event::CompensationFailed { step, reason } => {
            on_compensation_failed(&mut next, step, reason, &mut fx)
        }
        Event::Deadline { due_ms } => on_deadline(&mut next, due_ms, policy, now, &mut fx),
        Event::Retry => {
            if next.retryable()
                && let Some(&head) = next.pending.first()
            {
                next.stuck = None;
                next.attempts = 0;
                fx.log(head, LogKind::Retry, "retried by an operator");
                fx.notices.push(Notice::Retried { step: head });
                send_head_compensation(&mut next, policy, now, &mut fx);
            }
        }
        Event::Cancel => {
            if next.cancellable() {
                fx.log(next.step, LogKind::Cancel, "cancelled by an operator");
                fx.notices.push(Notice::Cancelled);
                fail(
                    &mut next,
                    OrderStatus::Cancelled,
                    every_step_last_first(),
                    policy,
                    now,
                    &mut fx,
                );
            }
        }
    }
    if next != *saga {
        next.updated_ms = now;
    }
    (next, fx)
}

/// Every step of the slip, the last first: what a deadline or a cancel undoes.
fn every_step_last_first() -> Vec<Step> {
    Step::ALL.iter().rev().copied().collect()
}

fn label(outcome: StepOutcome) -> &'static str {
    match outcome {
        StepOutcome::Done => "done",
        StepOutcome::Insufficient => "insufficient",
        StepOutcome::Failed => "failed",
        StepOutcome::Refused => "refused",
    }
}

fn on_answer(
    saga: &mut Saga,
    step: Step,
    outcome: StepOutcome,
    policy: &Policy,
    now: i64,
    fx: &mut Effects,
) {
    // While the slip runs, any step on it from the last command's on may be the one that
    // answers; anything else is late.
    if saga.phase != Phase::Running || step.index() < saga.step.index() {
        fx.log(
            step,
            LogKind::StepResult,
            format!("late: {} (ignored)", label(outcome)),
        );
        return;
    }
    fx.log(step, LogKind::StepResult, label(outcome));
    fx.metrics.push(MetricEvent::StepLatency {
        step,
        outcome,
        ms: now.saturating_sub(saga.updated_ms),
    });
    let done_before: Vec<Step> = Step::ALL[..step.index()].iter().rev().copied().collect();
    match outcome {
        StepOutcome::Done => match step.next() {
            // A step that answered instead of sending the slip on (one that predates slips):
            // the rest of the slip goes from here, within the same deadline.
            Some(next) => {
                saga.step = next;
                let cmd = slip(&saga.terms, next);
                fx.log(next, LogKind::of_command(next), slip_sent(&cmd));
                fx.send.push(cmd);
            }
            None => {
                saga.status = Some(OrderStatus::Success);
                finish(saga, fx);
            }
        },
        StepOutcome::Insufficient => {
            let status = match step {
                Step::Payment => OrderStatus::InsufficientFund,
                Step::Inventory => OrderStatus::InsufficientInventory,
                Step::Delivery => OrderStatus::Unknown,
            };
            fail(saga, status, done_before, policy, now, fx);
        }
        StepOutcome::Failed | StepOutcome::Refused => {
            fail(saga, OrderStatus::Unknown, done_before, policy, now, fx);
        }
    }
}

fn on_compensated(saga: &mut Saga, step: Step, policy: &Policy, now: i64, fx: &mut Effects) {
    if saga.phase != Phase::Compensating || saga.pending.first() != Some(&step) {
        fx.log(step, LogKind::Compensated, "duplicate (ignored)");
        return;
    }
    fx.log(step, LogKind::Compensated, "done");
    fx.metrics.push(MetricEvent::Compensated { step });
    saga.pending.remove(0);
    saga.attempts = 0;
    saga.stuck = None;
    if saga.pending.is_empty() {
        finish(saga, fx);
    } else {
        send_head_compensation(saga, policy, now, fx);
    }
}

fn on_compensation_failed(saga: &mut Saga, step: Step, reason: String, fx: &mut Effects) {
    if saga.phase != Phase::Compensating
        || saga.pending.first() != Some(&step)
        || saga.stuck.is_some()
    {
        fx.log(
            step,
            LogKind::CompensationFailed,
            format!("{reason} (ignored)"),
        );
        return;
    }
    fx.log(
        step,
        LogKind::CompensationFailed,
        format!("stuck: {reason}"),
    );
    fx.notices.push(Notice::Stuck {
        step,
        reason: reason.clone(),
    });
    saga.stuck = Some(reason);
    // No more tries by itself: the cause has to be mended first.
    saga.deadline_ms = None;
}

fn on_deadline(saga: &mut Saga, due_ms: i64, policy: &Policy, now: i64, fx: &mut Effects) {
    if saga.deadline_ms != Some(due_ms) || due_ms > now {
        return;
    }
    match saga.phase {
        Phase::Running => {
            fx.log(saga.step, LogKind::Deadline, "timeout");
            fx.notices.push(Notice::TimedOut { step: saga.step });
            fx.metrics.push(MetricEvent::TimedOut { step: saga.step });
            // Whichever step stalled may still act: undo every step the slip could have
            // reached, the last first.
            fail(
                saga,
                OrderStatus::Timeout,
                every_step_last_first(),
                policy,
                now,
                fx,
            );
        }
        Phase::Compensating => {
            let Some(&head) = saga.pending.first() else {
                saga.deadline_ms = None;
                return;
            };
            saga.attempts = saga.attempts.saturating_add(1);
            fx.log(head, LogKind::Deadline, format!("retry #{}", saga.attempts));
            fx.metrics
                .push(MetricEvent::CompensationRetried { step: head });
            if saga.attempts == policy.report_after_attempts {
                fx.notices.push(Notice::Unanswered {
                    step: head,
                    attempts: saga.attempts,
                });
            }
            send_head_compensation(saga, policy, now, fx);
        }
        Phase::Done => saga.deadline_ms = None,
    }
}

/// Decides the status and moves to compensating `undo` (or straight to done when there is
/// nothing to undo).
fn fail(
    saga: &mut Saga,
    status: OrderStatus,
    undo: Vec<Step>,
    policy: &Policy,
    now: i64,
    fx: &mut Effects,
) {
    saga.status = Some(status);
    saga.attempts = 0;
    saga.stuck = None;
    if undo.is_empty() {
        finish(saga, fx);
        return;
    }
    saga.phase = Phase::Compensating;
    saga.pending = undo;
    send_head_compensation(saga, policy, now, fx);
}

fn send_head_compensation(saga: &mut Saga, policy: &Policy, now: i64, fx: &mut Effects) {
    if let Some(&head) = saga.pending.first() {
        fx.log(head, LogKind::of_compensation(head), "sent");
        fx.send.push(Command {
            body: Message::compensation(head),
            then: Vec::new(),
        });
        saga.deadline_ms =
            Some(now.saturating_add(policy.backoff_ms(saga.attempts, saga.order_id)));
    }
}

fn finish(saga: &mut Saga, fx: &mut Effects) {
    let status = saga.status.unwrap_or(OrderStatus::Unknown);
    saga.phase = Phase::Done;
    saga.pending.clear();
    saga.stuck = None;
    saga.deadline_ms = None;
    fx.log(saga.step, LogKind::OrderFinished, status.as_str());
    fx.send.push(Command {
        body: Message::OrderFinished { status },
        then: Vec::new(),
    });
}

#[cfg(test)]
mod tests;
