//! The saga's plan: the command of each step for an order's terms, in the order the steps run
//! ([`Step::ALL`]), and the routing slip that carries them. The orchestrator starts and
//! resumes sagas by it; with `--order-opens-saga` the order service opens each saga with it
//! ([`opening`]), so the slip is on its way while the orchestrator learns of the saga. A step
//! service knows only its own effect.

use ldt_contract::{FaultPlan, Message, Step};

/// What an order asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    pub username: String,
    pub price: i64,
    pub amount: i64,
    pub faults: FaultPlan,
}

/// A command to send: its body and, for a routing slip, the commands after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub body: Message,
    pub then: Vec<Message>,
}

/// The command of `step` for these terms.
pub fn command_body(terms: &Terms, step: Step) -> Message {
    let fault = terms.faults.for_step(step);
    match step {
        // Validated by the order service and again when the saga started: the product fits.
        Step::Payment => Message::Debit {
            username: terms.username.clone(),
            total: terms.price.checked_mul(terms.amount).unwrap_or(i64::MAX),
            fault,
        },
        Step::Inventory => Message::Reserve {
            amount: terms.amount,
            fault,
        },
        Step::Delivery => Message::Deliver {
            username: terms.username.clone(),
            amount: terms.amount,
            fault,
        },
    }
}

/// The command of `from` carrying the commands of the steps after it as its routing slip.
pub fn slip(terms: &Terms, from: Step) -> Command {
    Command {
        body: command_body(terms, from),
        then: Step::ALL[from.index() + 1..]
            .iter()
            .map(|&step| command_body(terms, step))
            .collect(),
    }
}

/// A saga's first command, carrying the rest of the saga as its routing slip: what opens it.
/// The orchestrator sends it as it starts the saga, or, with `--order-opens-saga`, the order
/// service beside `OrderPlaced`.
pub fn opening(terms: &Terms) -> Command {
    slip(terms, Step::ALL[0])
}

/// Why terms cannot start a saga, if they cannot.
pub fn invalid_terms(terms: &Terms) -> Option<String> {
    let (price, amount) = (terms.price, terms.amount);
    if price < 0 || amount <= 0 || price.checked_mul(amount).is_none() || terms.username.is_empty()
    {
        return Some(format!(
            "invalid terms (price {price}, amount {amount}, username {:?})",
            terms.username
        ));
    }
    None
}
