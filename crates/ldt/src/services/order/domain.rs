//! What an order is and what a request for one must be: the order as the API shows it, and
//! the checks a request passes before anything is stored.

use ldt_contract::{Fault, FaultPlan, OrderStatus};
use ldt_runtime::http::ApiError;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest accepted username, in characters.
pub const MAX_USERNAME: usize = 64;

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub username: String,
    pub price: i64,
    pub amount: i64,
    pub status: OrderStatus,
    pub faults: FaultPlan,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
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
        let name_len = username.chars().count();
        if username.trim().is_empty() {
            return Err(ApiError::Invalid("username must not be empty".into()));
        }
        if name_len > MAX_USERNAME {
            return Err(ApiError::Invalid(format!(
                "username is {name_len} characters long; at most {MAX_USERNAME} are allowed"
            )));
        }
        if username.chars().any(char::is_control) {
            return Err(ApiError::Invalid(
                "username must not contain control characters".into(),
            ));
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
    pub username: String,
    pub price: i64,
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
    pub username: String,
    /// Price of one token, in credits (≥ 0).
    pub price: i64,
    /// Number of tokens (> 0).
    pub amount: i64,
    /// Per-step fault plan, for testing the failure paths.
    #[serde(default)]
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
            ("ann", i64::MAX, 2, "overflows"),
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
