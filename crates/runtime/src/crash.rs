//! Crash points: `LDT_CRASH_POINT=payment.after_commit` makes the payment service abort the
//! first time it reaches that point, so each window of the at-least-once pipeline can be
//! tested deterministically:
//!
//! - `before_commit` — a handler (or the order API) has done its work in a transaction that
//!   is not committed: nothing happened; the message is redelivered (the request fails).
//! - `after_commit` — the state change and its outgoing messages are committed, but the
//!   incoming message is not acked and the outbox not yet published: on restart the message is
//!   redelivered (a duplicate, answered from the ledger) and the relay publishes the outbox.
//! - `after_publish` — the relay's batch is confirmed by the broker but its outbox rows are not
//!   yet deleted: on restart they are published again (duplicates the receivers ignore).

use std::fmt;
use std::str::FromStr;

use ldt_contract::Service;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    BeforeCommit,
    AfterCommit,
    AfterPublish,
}

impl Point {
    pub const ALL: [Point; 3] = [Point::BeforeCommit, Point::AfterCommit, Point::AfterPublish];

    pub fn as_str(self) -> &'static str {
        match self {
            Point::BeforeCommit => "before_commit",
            Point::AfterCommit => "after_commit",
            Point::AfterPublish => "after_publish",
        }
    }
}

/// A configured crash point: a service and a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashPoint {
    pub service: Service,
    pub point: Point,
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.service.as_str(), self.point.as_str())
    }
}

/// Parses `service.point`.
pub fn parse(s: &str) -> Result<CrashPoint, String> {
    let (service, point) = s.split_once('.').ok_or_else(|| {
        format!("a crash point is service.point, e.g. payment.after_commit; got {s:?}")
    })?;
    let service = <Service as clap::ValueEnum>::from_str(service, true)
        .map_err(|_| format!("unknown service {service:?} in crash point"))?;
    let point = Point::ALL
        .into_iter()
        .find(|p| p.as_str() == point)
        .ok_or_else(|| {
            format!("unknown point {point:?}: one of before_commit, after_commit, after_publish")
        })?;
    Ok(CrashPoint { service, point })
}

impl FromStr for CrashPoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// The crash point armed for one service (or none); cheap to copy into every handler.
#[derive(Debug, Clone, Copy, Default)]
pub struct Crash {
    armed: Option<CrashPoint>,
}

impl Crash {
    pub fn for_service(configured: Option<CrashPoint>, service: Service) -> Crash {
        Crash {
            armed: configured.filter(|c| c.service == service),
        }
    }

    /// Aborts the process if `point` is armed: a crash, not a shutdown — nothing is flushed.
    pub fn at(&self, point: Point) {
        if let Some(armed) = self.armed
            && armed.point == point
        {
            eprintln!("ldt: crash point {armed} reached: aborting");
            std::process::abort();
        }
    }

    /// Commits `tx` with the commit's crash points around it.
    pub async fn commit(&self, tx: sqlx::Transaction<'_, sqlx::Any>) -> Result<(), sqlx::Error> {
        self.at(Point::BeforeCommit);
        tx.commit().await?;
        self.at(Point::AfterCommit);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_service_and_point() {
        let c = parse("dead-letter.after_publish").unwrap();
        assert_eq!(
            (c.service, c.point),
            (Service::DeadLetter, Point::AfterPublish)
        );
        assert_eq!(c.to_string(), "dead-letter.after_publish");
        assert!(parse("payment").is_err());
        assert!(parse("billing.after_commit").is_err());
        assert!(parse("payment.whenever").is_err());
    }

    #[test]
    fn only_the_named_service_is_armed() {
        let c = parse("payment.before_commit").ok();
        assert!(Crash::for_service(c, Service::Payment).armed.is_some());
        assert!(Crash::for_service(c, Service::Order).armed.is_none());
    }
}
