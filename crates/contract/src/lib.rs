//! The wire contract between the services: message envelopes, the saga's steps, statuses,
//! the per-order fault plan and the queue names.
//!
//! Everything that crosses the broker is an [`Envelope`] serialised as JSON. The envelope is
//! versioned (`v`) and its body is an internally tagged enum (`"type": "debit"`), so a new
//! message kind or a new version can be added without breaking a consumer that is still on
//! the old code: an unknown type or version is a *poison* message and is parked as a dead
//! letter instead of crashing the consumer.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The envelope version this build writes and understands.
pub const ENVELOPE_VERSION: u16 = 1;

/// The most credits a user and the most tokens the stock can hold (10^15): far beyond any
/// real balance, and far enough below `i64::MAX` that no sum of them can overflow.
pub const MAX_QUANTITY: i64 = 1_000_000_000_000_000;

/// AMQP header carrying the W3C trace context of the message's producer.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The saga's forward steps, in the order the orchestrator runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Payment,
    Inventory,
    Delivery,
}

impl Step {
    pub const ALL: [Step; 3] = [Step::Payment, Step::Inventory, Step::Delivery];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Payment => "payment",
            Step::Inventory => "inventory",
            Step::Delivery => "delivery",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|step| step.as_str() == s)
    }

    /// Position in the saga, 0-based.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn next(self) -> Option<Step> {
        Step::ALL.get(self.index() + 1).copied()
    }

    /// The service (and so the queue) that performs this step.
    pub fn service(self) -> Service {
        match self {
            Step::Payment => Service::Payment,
            Step::Inventory => Service::Inventory,
            Step::Delivery => Service::Delivery,
        }
    }
}

/// The final (and the initial) status of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Pending,
    Success,
    InsufficientFund,
    InsufficientInventory,
    Timeout,
    Unknown,
    /// An operator cancelled the order before its saga ended; every step it took is undone.
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 7] = [
        OrderStatus::Pending,
        OrderStatus::Success,
        OrderStatus::InsufficientFund,
        OrderStatus::InsufficientInventory,
        OrderStatus::Timeout,
        OrderStatus::Unknown,
        OrderStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Success => "SUCCESS",
            OrderStatus::InsufficientFund => "INSUFFICIENT_FUND",
            OrderStatus::InsufficientInventory => "INSUFFICIENT_INVENTORY",
            OrderStatus::Timeout => "TIMEOUT",
            OrderStatus::Unknown => "UNKNOWN",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<OrderStatus> {
        OrderStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        self != OrderStatus::Pending
    }
}

/// What a request asks a step to do wrong, for testing the saga's failure paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The step's handler fails: the order ends `UNKNOWN`.
    Kill,
    /// The step stalls past its deadline: the order ends `TIMEOUT`; the late effect is undone.
    Timeout,
}

/// The per-step fault plan of one order (`{"payment": "kill", "delivery": "timeout"}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultPlan {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Fault>,
}

impl FaultPlan {
    pub fn for_step(&self, step: Step) -> Option<Fault> {
        match step {
            Step::Payment => self.payment,
            Step::Inventory => self.inventory,
            Step::Delivery => self.delivery,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.payment.is_none() && self.inventory.is_none() && self.delivery.is_none()
    }
}

/// How a step (or a compensation) ended, as the step service reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// The action took effect.
    Done,
    /// The business rule said no: not enough credits, or not enough stock.
    Insufficient,
    /// The handler failed (an injected `kill`): no effect.
    Failed,
    /// The action arrived after its compensation and was refused: no effect.
    Refused,
}

/// One message on the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope version; see [`ENVELOPE_VERSION`].
    pub v: u16,
    /// Unique per message (UUID v7); duplicates of one message share it.
    pub id: Uuid,
    pub order_id: Uuid,
    /// When the producer committed the message, milliseconds since the Unix epoch.
    pub at_ms: i64,
    #[serde(flatten)]
    pub body: Message,
    /// The routing slip: the commands still to run after this one, in order. A step whose
    /// action succeeds sends the first of them on itself, with the rest, instead of
    /// answering the orchestrator; the last step (or a step that fails) answers it. Absent
    /// from replies and compensations, and ignored by a receiver that predates it (its
    /// orchestrator then sends each next command itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub then: Vec<Message>,
    /// The saga's opening, when the order service opened it (`--order-opens-saga`): the
    /// order's terms and when it was placed. The order service puts it on the saga's first
    /// command and on a cancellation; a step copies it onto what it sends on (the slip's next
    /// command, its answer). So the orchestrator can start the saga from the first answer it
    /// gets, without waiting for an `OrderPlaced` the order service holds back (and drops
    /// once the order is final). Absent otherwise, and ignored by a receiver that predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened: Option<Opened>,
}

/// A saga's opening as the order service made it: what the orchestrator needs to start the
/// saga from an answer (see [`Envelope::opened`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {
    pub username: String,
    pub price: i64,
    pub amount: i64,
    #[serde(default)]
    pub faults: FaultPlan,
    /// When the order was placed, milliseconds since the Unix epoch: the saga's deadline
    /// runs from here.
    pub placed_ms: i64,
}

/// The saga's messages. Commands go to a step service (from the orchestrator, or from the
/// step before on a routing slip); replies go back to the orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// order → orchestrator: a new order was stored as PENDING.
    OrderPlaced {
        username: String,
        price: i64,
        amount: i64,
        #[serde(default)]
        faults: FaultPlan,
        /// The order service sent the saga's first command, with its routing slip, in the
        /// same transaction as this message: the orchestrator starts the saga without sending
        /// it. Absent (false) from an order service that predates it. An orchestrator that
        /// predates it sends the command again, and the step's ledger answers the duplicate.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        slip_sent: bool,
    },
    /// order (opening the saga, with the routing slip) or orchestrator → payment: debit
    /// `total` credits from `username`.
    Debit {
        username: String,
        total: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fault: Option<Fault>,
    },
    /// orchestrator → payment: undo the debit of this order (or refuse it if it comes later).
    Refund,
    /// orchestrator or payment (on the slip) → inventory: reserve `amount` tokens.
    Reserve {
        amount: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fault: Option<Fault>,
    },
    /// orchestrator → inventory: undo the reservation of this order.
    Release,
    /// orchestrator or inventory (on the slip) → delivery: deliver `amount` tokens to `username`.
    Deliver {
        username: String,
        amount: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fault: Option<Fault>,
    },
    /// orchestrator → delivery: cancel the delivery of this order.
    CancelDelivery,
    /// step service → orchestrator: how the step's action ended (for a success, only the
    /// slip's last step answers).
    StepResult { step: Step, outcome: StepOutcome },
    /// step service → orchestrator: the step's compensation has been applied.
    Compensated { step: Step },
    /// step service → orchestrator: the step's compensation failed in a way retrying will
    /// not mend (it is parked as a dead letter); the saga waits for an operator.
    CompensationFailed { step: Step, reason: String },
    /// order → orchestrator: an operator cancels the order (a running saga is undone and
    /// ends CANCELLED; one that has failed or finished already is left as it is).
    CancelOrder,
    /// orchestrator → order: the saga is over; every compensation it needed is applied.
    OrderFinished { status: OrderStatus },
}

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::OrderPlaced { .. } => "order_placed",
            Message::Debit { .. } => "debit",
            Message::Refund => "refund",
            Message::Reserve { .. } => "reserve",
            Message::Release => "release",
            Message::Deliver { .. } => "deliver",
            Message::CancelDelivery => "cancel_delivery",
            Message::StepResult { .. } => "step_result",
            Message::Compensated { .. } => "compensated",
            Message::CompensationFailed { .. } => "compensation_failed",
            Message::CancelOrder => "cancel_order",
            Message::OrderFinished { .. } => "order_finished",
        }
    }

    /// The service whose queue this message goes to.
    pub fn destination(&self) -> Service {
        match self {
            Message::OrderPlaced { .. }
            | Message::StepResult { .. }
            | Message::Compensated { .. }
            | Message::CompensationFailed { .. }
            | Message::CancelOrder => Service::Orchestrator,
            Message::Debit { .. } | Message::Refund => Service::Payment,
            Message::Reserve { .. } | Message::Release => Service::Inventory,
            Message::Deliver { .. } | Message::CancelDelivery => Service::Delivery,
            Message::OrderFinished { .. } => Service::Order,
        }
    }

    /// The compensation command that undoes `step`.
    pub fn compensation(step: Step) -> Message {
        match step {
            Step::Payment => Message::Refund,
            Step::Inventory => Message::Release,
            Step::Delivery => Message::CancelDelivery,
        }
    }
}

impl Envelope {
    pub fn new(order_id: Uuid, at_ms: i64, body: Message) -> Envelope {
        Envelope {
            v: ENVELOPE_VERSION,
            id: Uuid::now_v7(),
            order_id,
            at_ms,
            body,
            then: Vec::new(),
            opened: None,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising these plain types cannot fail: no maps with non-string keys, no
        // custom Serialize impls.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a message, rejecting unknown versions with a reason fit for a dead letter.
    pub fn from_json(bytes: &[u8]) -> Result<Envelope, String> {
        #[derive(Deserialize)]
        struct Version {
            v: Option<u16>,
        }
        // The envelope first: a message is parsed once on its way through (the version alone
        // is read only to say why one could not be).
        let malformed = match serde_json::from_slice::<Envelope>(bytes) {
            Ok(env) if env.v == ENVELOPE_VERSION => return Ok(env),
            Ok(env) => return Err(format!("unsupported envelope version {}", env.v)),
            Err(e) => e,
        };
        let version: Version =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JSON envelope: {e}"))?;
        match version.v {
            Some(ENVELOPE_VERSION) => Err(format!("malformed envelope: {malformed}")),
            Some(other) => Err(format!("unsupported envelope version {other}")),
            None => Err("envelope has no version field `v`".into()),
        }
    }
}

/// The services (roles) one `ldt` process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Service {
    Order,
    Orchestrator,
    Payment,
    Inventory,
    Delivery,
    DeadLetter,
}

impl Service {
    pub const ALL: [Service; 6] = [
        Service::Order,
        Service::Orchestrator,
        Service::Payment,
        Service::Inventory,
        Service::Delivery,
        Service::DeadLetter,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Order => "order",
            Service::Orchestrator => "orchestrator",
            Service::Payment => "payment",
            Service::Inventory => "inventory",
            Service::Delivery => "delivery",
            Service::DeadLetter => "dead-letter",
        }
    }

    /// Database-name-safe form (`dead_letter`).
    pub fn db_suffix(self) -> &'static str {
        match self {
            Service::DeadLetter => "dead_letter",
            other => other.as_str(),
        }
    }
}

/// Queue names, all under one namespace so that several marketplaces (or tests) can share
/// one broker without seeing each other's messages.
#[derive(Debug, Clone)]
pub struct Queues {
    namespace: String,
}

impl Queues {
    pub fn new(namespace: &str) -> Queues {
        Queues {
            namespace: namespace.to_owned(),
        }
    }

    /// The work queue a service consumes.
    pub fn of(&self, service: Service) -> String {
        format!("{}.{}", self.namespace, service.as_str())
    }

    pub fn dead_letters(&self) -> String {
        self.of(Service::DeadLetter)
    }

    /// Every queue of the namespace, for declaring and for cleaning up.
    pub fn all(&self) -> Vec<String> {
        Service::ALL.iter().map(|s| self.of(*s)).collect()
    }
}

// ---- usernames ----------------------------------------------------------------------------

/// Longest accepted username, in characters.
pub const MAX_USERNAME: usize = 64;

/// The characters no username may hold: Unicode's control (Cc), format (Cf), line separator
/// (Zl) and paragraph separator (Zp) characters — zero-width spaces and joiners, bidi
/// overrides, a byte-order mark — with which one name can pass for another.
pub const INVISIBLE: &[(char, char)] = &[
    ('\u{0000}', '\u{001F}'),
    ('\u{007F}', '\u{009F}'),
    ('\u{00AD}', '\u{00AD}'),
    ('\u{0600}', '\u{0605}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{06DD}', '\u{06DD}'),
    ('\u{070F}', '\u{070F}'),
    ('\u{0890}', '\u{0891}'),
    ('\u{08E2}', '\u{08E2}'),
    ('\u{180E}', '\u{180E}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{2028}', '\u{202E}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFF9}', '\u{FFFB}'),
    ('\u{110BD}', '\u{110BD}'),
    ('\u{110CD}', '\u{110CD}'),
    ('\u{13430}', '\u{1343F}'),
    ('\u{1BCA0}', '\u{1BCA3}'),
    ('\u{1D173}', '\u{1D17A}'),
    ('\u{E0001}', '\u{E0001}'),
    ('\u{E0020}', '\u{E007F}'),
];

/// Whether `c` is one of [`INVISIBLE`].
pub fn is_invisible(c: char) -> bool {
    INVISIBLE.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// The username rule as a regular expression (for the OpenAPI document): 1 to 64 characters,
/// none of them control, format or separator characters, not only whitespace.
pub fn username_pattern() -> String {
    let mut class = String::new();
    for &(lo, hi) in INVISIBLE {
        let esc = |c: char| {
            let n = u32::from(c);
            if n <= 0xFFFF {
                format!("\\u{n:04X}")
            } else {
                // Outside the basic plane a pattern takes the character itself.
                c.to_string()
            }
        };
        class.push_str(&esc(lo));
        if hi != lo {
            class.push('-');
            class.push_str(&esc(hi));
        }
    }
    format!("^[^{class}]*[^\\s{class}][^{class}]*$")
}

/// Why `name` cannot be a username, if it cannot: empty or only whitespace, longer than
/// [`MAX_USERNAME`] characters, or holding one of [`INVISIBLE`].
pub fn username_problem(name: &str) -> Option<String> {
    let len = name.chars().count();
    if name.trim().is_empty() {
        return Some("username must not be empty or only whitespace".into());
    }
    if len > MAX_USERNAME {
        return Some(format!(
            "username is {len} characters long; at most {MAX_USERNAME} are allowed"
        ));
    }
    name.chars().find(|c| is_invisible(*c)).map(|c| {
        format!(
            "username must not contain control, format or separator characters \
             (such as U+{:04X}): they make one name look like another",
            u32::from(c)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_is_tagged() {
        let env = Envelope::new(
            Uuid::now_v7(),
            42,
            Message::Debit {
                username: "ann".into(),
                total: 10,
                fault: Some(Fault::Timeout),
            },
        );
        let json = env.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(r#""type":"debit""#), "{text}");
        assert!(text.contains(r#""v":1"#), "{text}");
        assert_eq!(Envelope::from_json(&json).unwrap(), env);
    }

    #[test]
    fn unknown_version_and_type_are_rejected_with_a_reason() {
        let id = Uuid::now_v7();
        let v2 = format!(r#"{{"v":2,"id":"{id}","order_id":"{id}","at_ms":1,"type":"refund"}}"#);
        assert!(
            Envelope::from_json(v2.as_bytes())
                .unwrap_err()
                .contains("version 2")
        );
        let bad = format!(r#"{{"v":1,"id":"{id}","order_id":"{id}","at_ms":1,"type":"explode"}}"#);
        assert!(
            Envelope::from_json(bad.as_bytes())
                .unwrap_err()
                .contains("malformed")
        );
        // A later version whose body this one cannot read is still refused for its version.
        let v2_unknown =
            format!(r#"{{"v":2,"id":"{id}","order_id":"{id}","at_ms":1,"type":"explode"}}"#);
        assert!(
            Envelope::from_json(v2_unknown.as_bytes())
                .unwrap_err()
                .contains("version 2")
        );
        let unversioned = format!(r#"{{"id":"{id}","order_id":"{id}","at_ms":1,"type":"refund"}}"#);
        assert!(
            Envelope::from_json(unversioned.as_bytes())
                .unwrap_err()
                .contains("no version field")
        );
        assert!(
            Envelope::from_json(b"garbage")
                .unwrap_err()
                .contains("not a JSON envelope")
        );
    }

    #[test]
    fn steps_run_in_order_and_compensate_to_the_right_service() {
        assert_eq!(Step::Payment.next(), Some(Step::Inventory));
        assert_eq!(Step::Delivery.next(), None);
        for step in Step::ALL {
            assert_eq!(Message::compensation(step).destination(), step.service());
        }
    }
}
