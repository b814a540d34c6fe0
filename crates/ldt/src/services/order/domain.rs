//! What an order is and what a request for one must be: the order as the API shows it, and
//! the checks a request passes before anything is stored.

use ldt_contract::{Fault, FaultPlan, OrderStatus};
use ldt_runtime::http::ApiError;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Highest price of one token, in credits: with [`MAX_AMOUNT`], an order's total fits in 64
/// bits (and passes any user's credits, at most 10^15, by far).
pub const MAX_PRICE: i64 = 1_000_000_000_000;

/// Most tokens in one order.
pub const MAX_AMOUNT: i64 = 1_000_000;

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub username: String,
    pub price: i64,
    pub amount: i64,
    pub status: OrderStatus,
    pub faults: FaultPlan,
    /// Where the faults came from, when there are any.
    pub fault_source: Option<FaultSource>,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    /// The trace the order runs in (W3C trace id), when tracing is on.
    pub trace_id: Option<String>,
}

/// Where an order's faults came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FaultSource {
    /// The request asked for them.
    Request,
    /// The runtime fault flags drew them (`PUT /api/v1/faults`).
    Flags,
}

impl FaultSource {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultSource::Request => "request",
            FaultSource::Flags => "flags",
        }
    }

    pub fn parse(s: &str) -> Option<FaultSource> {
        [FaultSource::Request, FaultSource::Flags]
            .into_iter()
            .find(|f| f.as_str() == s)
    }
}

/// A validated order request.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOrder {
    pub username: String,
    pub price: i64,
    pub amount: i64,
    pub faults: FaultPlan,
    /// `kill_create`: the order is never stored.
    pub kill_create: bool,
}

impl NewOrder {
    pub fn validate(
        username: String,
        price: i64,
        amount: i64,
        faults: FaultPlan,
        kill_create: bool,
    ) -> Result<NewOrder, ApiError> {
        if let Some(problem) = ldt_contract::username_problem(&username) {
            return Err(ApiError::Invalid(problem));
        }
        if price < 0 {
            return Err(ApiError::Invalid(format!(
                "price must not be negative, got {price}"
            )));
        }
        if amount <= 0 {
            return Err(ApiError::Invalid(format!(
                "amount must be positive, got {amount}"
            )));
        }
        if price > MAX_PRICE {
            return Err(ApiError::Invalid(format!(
                "price must be at most {MAX_PRICE}, got {price}"
            )));
        }
        if amount > MAX_AMOUNT {
            return Err(ApiError::Invalid(format!(
                "amount must be at most {MAX_AMOUNT} tokens, got {amount}"
            )));
        }
        // Below both maxima the product fits in 64 bits; checked all the same.
        if price.checked_mul(amount).is_none() {
            return Err(ApiError::Invalid(format!(
                "price × amount ({price} × {amount}) overflows a 64-bit integer"
            )));
        }
        Ok(NewOrder {
            username,
            price,
            amount,
            faults,
            kill_create,
        })
    }

    /// Stable digest of what the request asks for, to recognise a retry of it.
    pub fn fingerprint(&self) -> String {
        format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.username,
            self.price,
            self.amount,
            serde_json::to_string(&self.faults).unwrap_or_default(),
            self.kill_create
        )
    }
}

/// What `POST /api/purchase/` accepts (the legacy contract).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct LegacyPurchase {
    /// Who buys: 1 to 64 characters, not only whitespace, with no control, format or
    /// separator characters (they let one name pass for another).
    #[schema(min_length = 1, max_length = 64, example = "ann")]
    pub username: String,
    /// Price of one token, in credits.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64, example = 10)]
    #[serde(deserialize_with = "ldt_runtime::http::integer::i64")]
    pub price: i64,
    /// Number of tokens.
    #[schema(minimum = 1, maximum = 1_000_000, example = 2)]
    #[serde(deserialize_with = "ldt_runtime::http::integer::i64")]
    pub amount: i64,
    #[serde(default)]
    pub kill_create: bool,
    #[serde(default)]
    pub kill_payment: bool,
    #[serde(default)]
    pub timeout_payment: bool,
    #[serde(default)]
    pub kill_inventory: bool,
    #[serde(default)]
    pub timeout_inventory: bool,
    #[serde(default)]
    pub kill_deliver: bool,
    #[serde(default)]
    pub timeout_deliver: bool,
}

fn legacy_fault(kill: bool, timeout: bool) -> Option<Fault> {
    // A step told both to fail and to stall fails: failing is the earlier event.
    match (kill, timeout) {
        (true, _) => Some(Fault::Kill),
        (false, true) => Some(Fault::Timeout),
        _ => None,
    }
}

impl LegacyPurchase {
    pub fn into_new_order(self) -> Result<NewOrder, ApiError> {
        let faults = FaultPlan {
            payment: legacy_fault(self.kill_payment, self.timeout_payment),
            inventory: legacy_fault(self.kill_inventory, self.timeout_inventory),
            delivery: legacy_fault(self.kill_deliver, self.timeout_deliver),
        };
        NewOrder::validate(
            self.username,
            self.price,
            self.amount,
            faults,
            self.kill_create,
        )
    }
}

/// What `POST /api/v1/orders` accepts.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrder {
    /// Who buys: 1 to 64 characters, not only whitespace, with no control, format or
    /// separator characters (they let one name pass for another).
    #[schema(min_length = 1, max_length = 64, example = "ann")]
    pub username: String,
    /// Price of one token, in credits.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64, example = 10)]
    #[serde(deserialize_with = "ldt_runtime::http::integer::i64")]
    pub price: i64,
    /// Number of tokens.
    #[schema(minimum = 1, maximum = 1_000_000, example = 2)]
    #[serde(deserialize_with = "ldt_runtime::http::integer::i64")]
    pub amount: i64,
    /// Per-step fault plan, for testing the failure paths.
    #[serde(default, deserialize_with = "ldt_runtime::http::object")]
    pub faults: FaultPlan,
    /// Fail before storing the order (the legacy `kill_create`).
    #[serde(default)]
    pub kill_create: bool,
}

pub enum Created {
    New(Order),
    /// A retry with the same idempotency key and body: the original order.
    Replayed(Order),
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn validate(username: &str, price: i64, amount: i64) -> Result<NewOrder, ApiError> {
        NewOrder::validate(username.into(), price, amount, FaultPlan::default(), false)
    }

    #[test]
    fn names_that_pass_for_others_are_refused() {
        for name in [
            "\u{200B}",
            "\u{200B}\u{200C}\u{200D}",
            "ann\u{202E}",
            "\u{FEFF}ann",
            "ann\u{2028}",
            "a\u{E0041}",
            "\u{0007}bell",
            " \t ",
        ] {
            assert!(validate(name, 1, 1).is_err(), "{name:?} was accepted");
        }
        for name in ["ann", "Zoë", "李", "ann smith", "🙂", "a-b_c.d@e"] {
            assert!(validate(name, 1, 1).is_ok(), "{name:?} was refused");
        }
    }

    #[test]
    fn rejects_bad_orders_with_a_reason() {
        assert!(validate("ann", 10, 1).is_ok());
        assert!(validate("ann", 0, 1).is_ok());
        for (name, price, amount, needle) in [
            ("", 1, 1, "empty"),
            ("  ", 1, 1, "empty"),
            (&"x".repeat(65), 1, 1, "at most 64"),
            ("ann", -1, 1, "price"),
            ("ann", 1, 0, "amount"),
            ("ann", 1, -3, "amount"),
            ("ann", i64::MAX, 2, "at most"),
            ("ann", 1, MAX_AMOUNT + 1, "at most"),
        ] {
            let err = validate(name, price, amount).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn legacy_flags_become_a_fault_plan() {
        let body: LegacyPurchase = serde_json::from_str(
            r#"{"username":"a","price":1,"amount":1,"kill_inventory":true,"timeout_deliver":true}"#,
        )
        .unwrap();
        let order = body.into_new_order().unwrap();
        assert_eq!(order.faults.payment, None);
        assert_eq!(order.faults.inventory, Some(Fault::Kill));
        assert_eq!(order.faults.delivery, Some(Fault::Timeout));
    }
}
