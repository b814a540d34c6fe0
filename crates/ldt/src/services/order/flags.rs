//! Runtime fault flags, like the OpenTelemetry Demo's feature flags: "payment fails 10 %",
//! "inventory stalls 5 %". A new order that carries no fault of its own draws its faults
//! from them, step by step; the order then shows them (`fault_source: "flags"`). The flags
//! live in the order service's database, so every replica applies the same; each reads them
//! again every second. With `--fault-injection false` they are all zero and cannot be set.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ldt_contract::{Fault, FaultPlan, Step};
use ldt_runtime::db::Pool;
use serde::{Deserialize, Serialize};
use sqlx::Row;

/// How often a replica reads the flags again.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// One step's flags, in percent of new orders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepFlags {
    /// Share of orders whose step fails (as a `kill` fault would).
    #[schema(minimum = 0, maximum = 100, example = 10)]
    #[serde(deserialize_with = "ldt_runtime::http::integer::u8")]
    pub fail_percent: u8,
    /// Share of orders whose step stalls past its deadline (as a `timeout` fault would).
    #[schema(minimum = 0, maximum = 100, example = 0)]
    #[serde(deserialize_with = "ldt_runtime::http::integer::u8")]
    pub stall_percent: u8,
}

/// Every step's flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Flags {
    #[serde(default, deserialize_with = "ldt_runtime::http::object")]
    pub payment: StepFlags,
    #[serde(default, deserialize_with = "ldt_runtime::http::object")]
    pub inventory: StepFlags,
    #[serde(default, deserialize_with = "ldt_runtime::http::object")]
    pub delivery: StepFlags,
}

impl Flags {
    fn of(&self, step: Step) -> StepFlags {
        match step {
            Step::Payment => self.payment,
            Step::Inventory => self.inventory,
            Step::Delivery => self.delivery,
        }
    }

    fn set(&mut self, step: Step, flags: StepFlags) {
        match step {
            Step::Payment => self.payment = flags,
            Step::Inventory => self.inventory = flags,
            Step::Delivery => self.delivery = flags,
        }
    }

    pub fn is_off(&self) -> bool {
        *self == Flags::default()
    }

    /// Why these flags cannot be set, if they cannot.
    pub fn invalid(&self) -> Option<String> {
        Step::ALL.iter().find_map(|&step| {
            let f = self.of(step);
            (f.fail_percent > 100 || f.stall_percent > 100)
                .then(|| format!("{}: a percentage is between 0 and 100", step.as_str()))
        })
    }

    /// The faults drawn for one new order: per step, `kill` with the fail share, else
    /// `timeout` with the stall share. `draw` gives a number in 0..100 for each try.
    pub fn draw(&self, mut draw: impl FnMut() -> u8) -> FaultPlan {
        let mut plan = FaultPlan::default();
        for step in Step::ALL {
            let f = self.of(step);
            let fault = if f.fail_percent > 0 && draw() < f.fail_percent {
                Some(Fault::Kill)
            } else if f.stall_percent > 0 && draw() < f.stall_percent {
                Some(Fault::Timeout)
            } else {
                None
            };
            match step {
                Step::Payment => plan.payment = fault,
                Step::Inventory => plan.inventory = fault,
                Step::Delivery => plan.delivery = fault,
            }
        }
        plan
    }
}

/// The flags as this replica last read them.
#[derive(Clone, Default)]
pub struct FlagsCache(Arc<RwLock<Flags>>);

impl FlagsCache {
    pub fn get(&self) -> Flags {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn put(&self, flags: Flags) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = flags;
    }

    /// Reads the flags again every second until shutdown.
    pub async fn follow(self, pool: Pool, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            match load(&pool).await {
                Ok(flags) => self.put(flags),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the fault flags; keeping the last")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Stores new flags (and takes them at once here).
    pub async fn store(&self, pool: &Pool, flags: Flags) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        for step in Step::ALL {
            let f = flags.of(step);
            sqlx::query(
                "INSERT INTO fault_flags (step, fail_percent, stall_percent) VALUES ($1, $2, $3) \
                 ON CONFLICT (step) DO UPDATE SET fail_percent = EXCLUDED.fail_percent, \
                 stall_percent = EXCLUDED.stall_percent",
            )
            .bind(step.as_str())
            .bind(i32::from(f.fail_percent))
            .bind(i32::from(f.stall_percent))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.put(flags);
        Ok(())
    }
}

async fn load(pool: &Pool) -> Result<Flags, sqlx::Error> {
    let rows = sqlx::query("SELECT step, fail_percent, stall_percent FROM fault_flags")
        .fetch_all(pool)
        .await?;
    let mut flags = Flags::default();
    for row in rows {
        let step: String = row.try_get("step")?;
        let Some(step) = Step::parse(&step) else {
            continue;
        };
        let pct = |v: i32| u8::try_from(v.clamp(0, 100)).unwrap_or(0);
        flags.set(
            step,
            StepFlags {
                fail_percent: pct(row.try_get("fail_percent")?),
                stall_percent: pct(row.try_get("stall_percent")?),
            },
        );
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_draw_faults_in_their_shares() {
        let mut flags = Flags::default();
        assert_eq!(
            flags.draw(|| 0),
            FaultPlan::default(),
            "no flags, no faults"
        );
        flags.payment.fail_percent = 10;
        flags.delivery.stall_percent = 100;
        let mut n = 0u32;
        let mut next = || {
            n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            ((n >> 16) % 100) as u8
        };
        let plans: Vec<FaultPlan> = (0..10_000).map(|_| flags.draw(&mut next)).collect();
        let killed = plans
            .iter()
            .filter(|p| p.payment == Some(Fault::Kill))
            .count();
        assert!((800..1200).contains(&killed), "{killed} of 10,000 at 10 %");
        assert!(plans.iter().all(|p| p.delivery == Some(Fault::Timeout)));
        assert!(plans.iter().all(|p| p.inventory.is_none()));
        let mut bad = Flags::default();
        bad.inventory.stall_percent = 101;
        assert!(bad.invalid().is_some());
        assert!(flags.invalid().is_none());
    }
}
