//! The order service's tables: `orders` and its outbox. Its writes go in with their outbox
//! rows (a new order with its `OrderPlaced`, and perhaps the saga's first command); its reads
//! serve the API.

use ldt_contract::OrderStatus;
use ldt_runtime::db::{Conn, Pool};
use sqlx::Row;
use uuid::Uuid;

use ldt_runtime::outbox::{self, OutboxBatch};

use super::domain::{FaultSource, Order};

pub static MIGRATORS: ldt_runtime::db::Migrators = ldt_runtime::db::Migrators {
    postgres: sqlx::migrate!("./migrations/order"),
    sqlite: sqlx::migrate!("./migrations-sqlite/order"),
};

const ORDER_COLUMNS: &str = "orders (id, username, price, amount, faults, status, created_ms, \
                             idempotency_key, request_hash, fault_source, trace_id)";

/// A new order and its messages, as the intake writes them.
pub struct Placement {
    pub id: String,
    pub username: String,
    pub price: i64,
    pub amount: i64,
    pub faults: String,
    pub fault_source: Option<&'static str>,
    pub trace_id: Option<String>,
    pub created_ms: i64,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    /// Its messages to send at once: its `OrderPlaced`, or, if the order service opens
    /// sagas, the saga's first command.
    pub messages: Vec<ldt_runtime::outbox::OutboxRow>,
    /// A message held back from the relay, and for how long from when it is written
    /// ([`outbox::held_created_ms`]): the `OrderPlaced` of an order whose saga this service
    /// opens, dropped by [`finish`] when the order is final first.
    pub held: Option<(ldt_runtime::outbox::OutboxRow, std::time::Duration)>,
    /// The request's database span, for an order written on its own.
    pub span: tracing::Span,
}

impl Placement {
    /// Binds the order's columns, in the order of `ORDER_COLUMNS` (a new order is PENDING).
    fn bind_columns<'q>(&'q self, query: outbox::Query<'q>) -> outbox::Query<'q> {
        query
            .bind(&self.id)
            .bind(&self.username)
            .bind(self.price)
            .bind(self.amount)
            .bind(&self.faults)
            .bind(OrderStatus::Pending.as_str())
            .bind(self.created_ms)
            .bind(&self.idempotency_key)
            .bind(&self.request_hash)
            .bind(self.fault_source)
            .bind(&self.trace_id)
    }
}

/// PostgreSQL: new orders and their messages in one statement, which commits by itself (one
/// round trip instead of a transaction's four): the ids of the orders stored (the others'
/// idempotency keys were taken, and nothing of them was written) and their outbox rows as
/// written.
pub async fn insert_all(
    conn: &mut Conn,
    group: &[&Placement],
) -> Result<(std::collections::HashSet<String>, OutboxBatch), sqlx::Error> {
    // The orders' eleven parameters each, then their messages' four each (a held one's five,
    // with its own `created_ms`); a message's row comes from the orders the insert returned
    // (by its order's id, with its `created_ms`), so a refused order writes none.
    let mut sql = format!("WITH o AS (INSERT INTO {ORDER_COLUMNS} ");
    let mut next = ldt_runtime::db::push_values(&mut sql, 1, 11, group.len());
    sql.push_str(" ON CONFLICT (idempotency_key) DO NOTHING RETURNING id) ");
    let mut rows = Vec::new();
    for (i, p) in group.iter().enumerate() {
        let order = 1 + 11 * i;
        for _ in &p.messages {
            rows.push(format!(
                "SELECT ${next}, ${}, ${}, ${}, ${} FROM o WHERE o.id = ${order}",
                next + 1,
                next + 2,
                next + 3,
                order + 6
            ));
            next += 4;
        }
        if p.held.is_some() {
            rows.push(format!(
                "SELECT ${next}, ${}, ${}, ${}, ${} FROM o WHERE o.id = ${order}",
                next + 1,
                next + 2,
                next + 3,
                next + 4
            ));
            next += 5;
        }
    }
    sql.push_str(&outbox::insert_from(&rows.join(" UNION ALL ")));
    sql.push_str(" RETURNING id, message_id");
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for p in group {
        query = p.bind_columns(query);
    }
    // A held message's hold runs from now, not from when its order came in (it may have
    // waited for its group).
    let now = ldt_runtime::db::now_ms();
    for p in group {
        for message in &p.messages {
            query = message.bind_columns(query);
        }
        if let Some((message, hold)) = &p.held {
            query = message
                .bind_columns(query)
                .bind(outbox::held_created_ms(now, *hold));
        }
    }
    let written = query.fetch_all(&mut *conn).await?;
    // Each row's id by its message id: an insert's rows come back in no promised order.
    let mut ids = std::collections::HashMap::with_capacity(written.len());
    for row in &written {
        ids.insert(row.try_get::<String, _>(1)?, row.try_get::<i64, _>(0)?);
    }
    let mut stored = std::collections::HashSet::with_capacity(group.len());
    let mut outbox = OutboxBatch::default();
    for p in group {
        // Every order has its `OrderPlaced`: one whose rows are missing was refused.
        let Some(first) = p.messages.first() else {
            continue;
        };
        if !ids.contains_key(&first.message_id) {
            continue;
        }
        for message in &p.messages {
            let id = ids.get(&message.message_id).copied().ok_or_else(|| {
                sqlx::Error::Protocol(format!(
                    "the outbox row of message {} was not returned by its insert",
                    message.message_id
                ))
            })?;
            outbox.push_written(id, message.clone());
        }
        stored.insert(p.id.clone());
    }
    Ok((stored, outbox))
}

/// SQLite: new orders and their messages in the transaction `tx`: the ids of those stored
/// (the others' idempotency keys were taken) and their outbox rows as written.
pub async fn insert_group(
    tx: &mut Conn,
    group: &[&Placement],
) -> Result<(std::collections::HashSet<String>, OutboxBatch), sqlx::Error> {
    let mut sql =
        ldt_runtime::db::multi_row_insert(&format!("INSERT INTO {ORDER_COLUMNS}"), 11, group.len());
    sql.push_str(" ON CONFLICT (idempotency_key) DO NOTHING RETURNING id");
    let mut query = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*tx, sql)));
    for p in group {
        query = p.bind_columns(query);
    }
    let stored = query
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| row.try_get::<String, _>("id"))
        .collect::<Result<std::collections::HashSet<String>, _>>()?;
    let (mut outbox, mut held, mut hold) = (
        OutboxBatch::default(),
        OutboxBatch::default(),
        std::time::Duration::ZERO,
    );
    for p in group.iter().filter(|p| stored.contains(&p.id)) {
        for message in &p.messages {
            outbox.push_row(message.clone());
        }
        if let Some((message, held_for)) = &p.held {
            held.push_row(message.clone());
            hold = *held_for;
        }
    }
    outbox.write(tx).await?;
    // The group's held messages with one statement (they share the service's hold).
    if !held.unwritten().is_empty() {
        let created_ms = outbox::held_created_ms(ldt_runtime::db::now_ms(), hold);
        held.write_created(tx, created_ms).await?;
    }
    Ok((stored, outbox))
}

/// Moves PENDING orders to their final status, with one statement (which commits by
/// itself); returns the orders moved, as they are now. A duplicate finds its order final
/// and changes nothing. With `drop_held`, the orders' held-back `OrderPlaced`s (their
/// message id is the order's) leave the outbox unsent: the saga is over, and the
/// orchestrator learnt of it from its answers (on SQLite, with a second statement in a
/// transaction).
pub async fn finish(
    conn: &mut Conn,
    finished: &[(Uuid, OrderStatus)],
    now: i64,
    drop_held: bool,
) -> Result<Vec<Order>, sqlx::Error> {
    let sqlite = ldt_runtime::db::conn_is_sqlite(conn);
    let mut sql = ldt_runtime::db::multi_row_insert(
        "WITH v (id, status, finished_ms) AS (",
        3,
        finished.len(),
    );
    if drop_held && !sqlite {
        sql.push_str("), d AS (DELETE FROM outbox WHERE message_id IN (SELECT id FROM v)");
    }
    sql.push_str(
        ") UPDATE orders SET status = v.status, finished_ms = v.finished_ms FROM v \
         WHERE orders.id = v.id AND orders.status = 'PENDING' \
         RETURNING orders.id, orders.username, orders.price, orders.amount, orders.faults, \
         orders.status, orders.created_ms, orders.finished_ms, orders.fault_source, orders.trace_id",
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*conn, sql)));
    for (order_id, status) in finished {
        query = query
            .bind(order_id.to_string())
            .bind(status.as_str())
            .bind(now);
    }
    if !(drop_held && sqlite) {
        let rows = query.fetch_all(&mut *conn).await?;
        return rows.iter().map(order_from_row).collect();
    }
    // SQLite has no delete inside a `WITH`: a transaction of two statements, one commit.
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let rows = query.fetch_all(&mut *tx).await?;
    let sql = format!(
        "DELETE FROM outbox WHERE message_id IN ({})",
        ldt_runtime::db::placeholders(1, finished.len())
    );
    let mut delete = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&tx, sql)));
    for (order_id, _) in finished {
        delete = delete.bind(order_id.to_string());
    }
    delete.execute(&mut *tx).await?;
    tx.commit().await?;
    rows.iter().map(order_from_row).collect()
}

/// The order, and if it is PENDING, its cancellation in the outbox (written in one
/// transaction with the read, so a cancel is never sent for an order already final).
pub async fn request_cancel(
    pool: &Pool,
    id: Uuid,
    cancel: impl FnOnce(&Order) -> ldt_runtime::outbox::OutboxRow,
) -> Result<Option<(Order, Option<OutboxBatch>)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(row) = sqlx::query("SELECT * FROM orders WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Ok(None);
    };
    let order = order_from_row(&row)?;
    if order.status.is_final() {
        tx.rollback().await?;
        return Ok(Some((order, None)));
    }
    let mut outbox = OutboxBatch::default();
    outbox.push_row(cancel(&order));
    outbox.write(&mut tx).await?;
    tx.commit().await?;
    Ok(Some((order, Some(outbox))))
}

/// Whether an order with this id exists.
pub async fn exists(pool: &Pool, id: &str) -> Result<bool, sqlx::Error> {
    Ok(
        sqlx::query_scalar::<_, String>("SELECT status FROM orders WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?
            .is_some(),
    )
}

// The reads.

fn order_from_row(row: &ldt_runtime::db::DbRow) -> Result<Order, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let faults: String = row.try_get("faults")?;
    Ok(Order {
        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(e.into()))?,
        username: row.try_get("username")?,
        price: row.try_get("price")?,
        amount: row.try_get("amount")?,
        status: OrderStatus::parse(&status).ok_or_else(|| {
            sqlx::Error::Decode(format!("bad status {status:?} in orders").into())
        })?,
        faults: serde_json::from_str(&faults).unwrap_or_default(),
        fault_source: row
            .try_get::<Option<String>, _>("fault_source")?
            .as_deref()
            .and_then(FaultSource::parse),
        created_at_ms: row.try_get("created_ms")?,
        finished_at_ms: row.try_get("finished_ms")?,
        trace_id: row.try_get("trace_id")?,
    })
}

/// The order holding an idempotency key, with the fingerprint of the request that made it.
pub async fn find_by_idempotency_key(
    pool: &Pool,
    key: &str,
) -> Result<Option<(Order, Option<String>)>, sqlx::Error> {
    let row = sqlx::query("SELECT * FROM orders WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(pool)
        .await?;
    row.map(|row| Ok((order_from_row(&row)?, row.try_get("request_hash")?)))
        .transpose()
}

pub async fn find_order(pool: &Pool, id: Uuid) -> Result<Option<Order>, sqlx::Error> {
    let row = sqlx::query("SELECT * FROM orders WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(order_from_row).transpose()
}

/// The `limit` most recent orders, oldest first.
pub async fn recent_orders(pool: &Pool, limit: i64) -> Result<Vec<Order>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT * FROM (SELECT * FROM orders ORDER BY seq DESC LIMIT $1) recent ORDER BY seq",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(order_from_row).collect()
}

/// Which orders a page shows.
pub struct OrderFilter<'a> {
    /// Only orders between these cursors (`seq`), exclusive.
    pub after: i64,
    pub before: i64,
    /// Newest first (else oldest first).
    pub newest_first: bool,
    pub username: Option<&'a str>,
    pub status: Option<OrderStatus>,
    /// Only orders created at or after / before this time (ms since the epoch).
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: i64,
}

/// A page of orders (oldest first, or newest first), with the cursor of the next page if
/// there is one.
pub async fn orders_page(
    pool: &Pool,
    filter: OrderFilter<'_>,
) -> Result<(Vec<Order>, Option<i64>), sqlx::Error> {
    const WHERE: &str = "seq > $1 AND seq < $7 AND (CAST($2 AS TEXT) IS NULL OR username = $2) \
         AND (CAST($3 AS TEXT) IS NULL OR status = $3) AND created_ms >= $4 AND created_ms < $5";
    let sql = if filter.newest_first {
        format!("SELECT * FROM orders WHERE {WHERE} ORDER BY seq DESC LIMIT $6")
    } else {
        format!("SELECT * FROM orders WHERE {WHERE} ORDER BY seq LIMIT $6")
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(filter.after)
        .bind(filter.username)
        .bind(filter.status.map(OrderStatus::as_str))
        .bind(filter.since_ms.unwrap_or(i64::MIN))
        .bind(filter.until_ms.unwrap_or(i64::MAX))
        .bind(filter.limit.saturating_add(1))
        .bind(filter.before)
        .fetch_all(pool)
        .await?;
    let page = &rows[..rows.len().min(usize::try_from(filter.limit).unwrap_or(0))];
    let next = if rows.len() > page.len() {
        page.last()
            .map(|r| r.try_get::<i64, _>("seq"))
            .transpose()?
    } else {
        None
    };
    let orders = page.iter().map(order_from_row).collect::<Result<_, _>>()?;
    Ok((orders, next))
}

/// How many orders have each status.
pub async fn counts(pool: &Pool) -> Result<Vec<(OrderStatus, i64)>, sqlx::Error> {
    let rows = sqlx::query("SELECT status, count(*) AS n FROM orders GROUP BY status")
        .fetch_all(pool)
        .await?;
    let mut counts = Vec::with_capacity(rows.len());
    for row in rows {
        let status: String = row.try_get("status")?;
        if let Some(status) = OrderStatus::parse(&status) {
            counts.push((status, row.try_get("n")?));
        }
    }
    Ok(counts)
}
