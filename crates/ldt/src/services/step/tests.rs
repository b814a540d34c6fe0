//! The one-statement path of the step services on PostgreSQL: what it writes when SQL can
//! decide a batch, and that it writes nothing when it cannot (the batch then takes the
//! transaction path, which the API and step tests cover on both stacks).

use std::time::Duration;

use ldt_contract::{Envelope, Message, Queues, StepOutcome};
use ldt_runtime::crash::Crash;
use ldt_runtime::db::{Backend, Held, Migrators};
use ldt_runtime::outbox::OutboxSignal;
use uuid::Uuid;

use super::{Action, OneStatement, StepEffect, StepService};
use crate::services::delivery::Deliveries;
use crate::services::inventory::Stock;
use crate::services::payment::Credits;

struct Fixture<E: StepEffect> {
    service: StepService<E>,
    backend: Backend,
    db: String,
}

impl<E: StepEffect> Fixture<E> {
    async fn new(effect: E, migrators: &Migrators) -> Fixture<E> {
        let server_url = std::env::var("LDT_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let backend = Backend::Postgres { server_url };
        let db = format!("unit_{}_{}", Uuid::now_v7().simple(), E::STEP.as_str());
        let pool = ldt_runtime::db::open(&backend, &db, migrators, 4)
            .await
            .expect("the test PostgreSQL server (scripts/test.sh starts it)");
        let (signal, _) = OutboxSignal::new();
        let one_statement: Option<OneStatement> = effect.one_statement();
        let service = StepService {
            effect,
            conns: Held::new(&pool, 2),
            pool,
            one_statement,
            queues: Queues::new("unit"),
            signal,
            stall: Duration::from_secs(1),
            crash: Crash::for_service(None, E::STEP.service()),
            metrics: Default::default(),
        };
        Fixture {
            service,
            backend,
            db,
        }
    }

    async fn run(&self, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&self.service.pool)
            .await
            .unwrap();
    }

    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.service.pool)
            .await
            .unwrap()
    }

    /// The actions with one statement: `Some` with an outcome each when it wrote them.
    async fn act(&self, actions: &[(Uuid, Action)]) -> Option<Vec<bool>> {
        let span = tracing::Span::none();
        let work: Vec<(Uuid, &Action, &tracing::Span)> =
            actions.iter().map(|(id, a)| (*id, a, &span)).collect();
        let outcomes = self.service.act_in_one_statement(&work).await?;
        Some(outcomes.iter().map(Result::is_ok).collect())
    }

    /// Each order's ledger outcome, in the order given ("-" when it has no row).
    async fn ledger(&self, orders: &[Uuid]) -> Vec<String> {
        let mut outcomes = Vec::new();
        for id in orders {
            let outcome: Option<String> =
                sqlx::query_scalar("SELECT outcome FROM ledger WHERE order_id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&self.service.pool)
                    .await
                    .unwrap();
            outcomes.push(outcome.unwrap_or_else(|| "-".into()));
        }
        outcomes
    }

    /// The message the outbox holds for an order.
    async fn reply(&self, order_id: Uuid) -> Message {
        let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM outbox")
            .fetch_all(&self.service.pool)
            .await
            .unwrap();
        let replies: Vec<Envelope> = payloads
            .iter()
            .map(|p| Envelope::from_json(p).unwrap())
            .filter(|env| env.order_id == order_id)
            .collect();
        assert_eq!(replies.len(), 1, "one reply for {order_id}");
        replies[0].body.clone()
    }

    async fn drop(self) {
        let pool = self.service.pool.clone();
        drop(self.service);
        pool.close().await;
        ldt_runtime::db::drop_database(&self.backend, &self.db)
            .await
            .unwrap();
    }
}

/// A plain action whose slip goes on to `then` when it succeeds.
fn action(username: Option<&str>, quantity: i64, then: Vec<Message>) -> (Uuid, Action) {
    (
        Uuid::now_v7(),
        Action {
            username: username.map(str::to_owned),
            quantity,
            fault: None,
            then,
            opened: None,
        },
    )
}

fn reserve() -> Vec<Message> {
    vec![Message::Reserve {
        amount: 1,
        fault: None,
    }]
}

#[tokio::test]
async fn debits_of_known_users_once_each_are_decided_by_one_statement() {
    let fx = Fixture::new(
        Credits { initial: 100 },
        &crate::services::payment::MIGRATORS,
    )
    .await;
    fx.run(
        "INSERT INTO users (username, credits, created_ms) \
         VALUES ('ann', 100, 0), ('bob', 5, 0), ('cy', 100, 0)",
    )
    .await;
    let batch = [
        action(Some("ann"), 30, reserve()),
        action(Some("bob"), 10, reserve()),
        action(Some("cy"), 100, reserve()),
    ];
    assert_eq!(fx.act(&batch).await, Some(vec![true; 3]));
    let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        fx.ledger(&ids).await,
        ["SUCCESS", "INSUFFICIENT_FUND", "SUCCESS"]
    );
    for (user, left) in [("ann", 70), ("bob", 5), ("cy", 0)] {
        let sql = format!("SELECT credits FROM users WHERE username = '{user}'");
        assert_eq!(fx.scalar(&sql).await, left, "{user}'s credits");
    }
    // A success sends the slip on; a refusal answers the orchestrator.
    assert!(matches!(fx.reply(ids[0]).await, Message::Reserve { .. }));
    assert_eq!(
        fx.reply(ids[1]).await,
        Message::StepResult {
            step: ldt_contract::Step::Payment,
            outcome: StepOutcome::Insufficient
        }
    );
    assert!(matches!(fx.reply(ids[2]).await, Message::Reserve { .. }));

    // The same batch again (a redelivery) fails on its ledger rows and changes nothing.
    assert_eq!(fx.act(&batch).await, None);
    assert_eq!(
        fx.scalar("SELECT sum(credits)::bigint FROM users").await,
        75
    );
    assert_eq!(fx.scalar("SELECT count(*) FROM outbox").await, 3);
    fx.drop().await;
}

#[tokio::test]
async fn debits_one_statement_cannot_decide_write_nothing() {
    let fx = Fixture::new(
        Credits { initial: 100 },
        &crate::services::payment::MIGRATORS,
    )
    .await;
    fx.run("INSERT INTO users (username, credits, created_ms) VALUES ('ann', 100, 0)")
        .await;
    // A user twice: the second debit must see the first.
    let twice = [
        action(Some("ann"), 60, reserve()),
        action(Some("ann"), 60, reserve()),
    ];
    // A user first seen, who must be created first.
    let new = [
        action(Some("ann"), 10, reserve()),
        action(Some("dan"), 10, reserve()),
    ];
    for batch in [&twice[..], &new[..]] {
        assert_eq!(fx.act(batch).await, None);
        let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
        assert_eq!(fx.ledger(&ids).await, ["-", "-"]);
    }
    assert_eq!(
        fx.scalar("SELECT credits FROM users WHERE username = 'ann'")
            .await,
        100
    );
    assert_eq!(fx.scalar("SELECT count(*) FROM users").await, 1);
    assert_eq!(fx.scalar("SELECT count(*) FROM outbox").await, 0);
    fx.drop().await;
}

#[tokio::test]
async fn reservations_take_one_statement_when_the_stock_covers_the_whole_batch() {
    let fx = Fixture::new(Stock, &crate::services::inventory::MIGRATORS).await;
    fx.run("INSERT INTO stock (id, initial, available) VALUES (1, 10, 10)")
        .await;
    let available = "SELECT available FROM stock WHERE id = 1";
    let covered = [action(None, 4, vec![]), action(None, 4, vec![])];
    assert_eq!(fx.act(&covered).await, Some(vec![true; 2]));
    assert_eq!(fx.scalar(available).await, 2);
    // 1 + 2 > 2: one after the other, the first fits and the second not; SQL leaves it to
    // the transaction path.
    let beyond = [action(None, 1, vec![]), action(None, 2, vec![])];
    assert_eq!(fx.act(&beyond).await, None);
    assert_eq!(fx.scalar(available).await, 2);
    // One alone beyond the stock is refused.
    let alone = [action(None, 3, vec![])];
    assert_eq!(fx.act(&alone).await, Some(vec![true]));
    assert_eq!(fx.scalar(available).await, 2);
    let ids: Vec<Uuid> = covered
        .iter()
        .chain(&beyond)
        .chain(&alone)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        fx.ledger(&ids).await,
        ["SUCCESS", "SUCCESS", "-", "-", "INSUFFICIENT_INVENTORY"]
    );
    assert_eq!(
        fx.reply(ids[4]).await,
        Message::StepResult {
            step: ldt_contract::Step::Inventory,
            outcome: StepOutcome::Insufficient
        }
    );
    fx.drop().await;
}

#[tokio::test]
async fn deliveries_are_recorded_and_answered_by_one_statement() {
    let fx = Fixture::new(Deliveries, &crate::services::delivery::MIGRATORS).await;
    let batch = [
        action(Some("ann"), 3, vec![]),
        action(Some("bob"), 2, vec![]),
    ];
    assert_eq!(fx.act(&batch).await, Some(vec![true; 2]));
    let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
    assert_eq!(fx.ledger(&ids).await, ["SUCCESS", "SUCCESS"]);
    for id in ids {
        assert_eq!(
            fx.reply(id).await,
            Message::StepResult {
                step: ldt_contract::Step::Delivery,
                outcome: StepOutcome::Done
            }
        );
    }
    fx.drop().await;
}
