//! Database plumbing shared by every service. One SQL code path serves two backends through
//! sqlx's `Any` driver: PostgreSQL (a server; each service gets its own database on it,
//! created and migrated on start) and SQLite (embedded; one file per service under a data
//! directory, or in memory). The few statements whose syntax differs are written once per
//! backend as a [`Sql`] pair; everything else is portable SQL.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor};

/// Whether `e` says the database is out of reach or busy for now (a restart, a failover, a
/// connection cut, a deadlock), so that the same work can succeed later, rather than that
/// the work itself is wrong.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|code| {
            // 08: connection; 25006: a write on a standby (mid-failover); 40001
            // serialization, 40P01 deadlock; 53: out of resources; 55P03 lock not available;
            // 57P0x: shut down, restarting, starting up.
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(
                    &*code,
                    "25006" | "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03"
                )
        }),
        _ => false,
    }
}

/// A service's connection pool, whichever the backend.
pub type Pool = sqlx::AnyPool;
/// One connection (or an open transaction, which derefs to one).
pub type Conn = sqlx::AnyConnection;
pub type DbRow = sqlx::any::AnyRow;

/// Milliseconds since the Unix epoch: every timestamp in every database.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL is invalid: {0}")]
    BadUrl(String),
    #[error("cannot reach the database server: {0}")]
    Unreachable(String),
    #[error("cannot open the database file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("migrating database {db} failed: {source}")]
    Migrate {
        db: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

/// Where the services keep their data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A PostgreSQL server (URL without a database name): one database per service on it.
    Postgres { server_url: String },
    /// Embedded SQLite: one file per service in `dir`, or in memory when `dir` is `None`.
    Sqlite { dir: Option<PathBuf> },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Postgres { .. } => "postgresql",
            Backend::Sqlite { .. } => "sqlite",
        }
    }

    /// Where a service's database lives, for messages.
    pub fn describe(&self, db_name: &str) -> String {
        match self {
            Backend::Postgres { server_url } => {
                format!("database {db_name} at {}", crate::urls::redact(server_url))
            }
            Backend::Sqlite { dir: Some(dir) } => {
                format!("SQLite database {}", sqlite_path(dir, db_name).display())
            }
            Backend::Sqlite { dir: None } => format!("in-memory SQLite database {db_name}"),
        }
    }
}

/// A statement whose syntax differs between the backends.
pub struct Sql {
    pub postgres: &'static str,
    pub sqlite: &'static str,
}

impl Sql {
    /// The statement in the dialect of the connection it will run on.
    pub fn on(&self, conn: &Conn) -> &'static str {
        if is_sqlite_name(conn.backend_name()) {
            self.sqlite
        } else {
            self.postgres
        }
    }
}

/// The backend a connection talks to.
pub fn conn_is_sqlite(conn: &Conn) -> bool {
    is_sqlite_name(conn.backend_name())
}

/// `sql` as it is to be sent on `conn`. SQLite takes `$1`, `$2`, … as *named* parameters,
/// and sqlx binds each one by asking SQLite for its name, which SQLite finds by searching
/// the statement's names one by one: a multi-row insert of a thousand parameters cost more
/// to bind than to run (at `ldt up`'s peak, 9.8 % of its CPU against 14.4 %). Anonymous `?`
/// parameters are bound by position without that search, so on SQLite a statement whose
/// placeholders are `$1`, `$2`, … each once and in that order is sent with `?` instead.
/// Any other statement (a placeholder used twice, PostgreSQL) goes as written.
pub fn for_conn(conn: &Conn, sql: String) -> String {
    if conn_is_sqlite(conn) {
        for_sqlite(sql)
    } else {
        sql
    }
}

/// [`for_conn`] for a statement that only ever runs on SQLite.
pub fn for_sqlite(sql: String) -> String {
    positional(&sql).unwrap_or(sql)
}

/// `sql` with `$1`, `$2`, … (outside quotes) turned into `?`, if they appear once each and in
/// order; `None` otherwise.
fn positional(sql: &str) -> Option<String> {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let (mut expected, mut quote, mut copied, mut i) = (1usize, None::<u8>, 0, 0);
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b'?' => return None,
            None if b == b'$' => {
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .count();
                let n: usize = sql.get(i + 1..i + 1 + digits)?.parse().ok()?;
                if n != expected {
                    return None;
                }
                expected += 1;
                out.push_str(&sql[copied..i]);
                out.push('?');
                i += 1 + digits;
                copied = i;
                continue;
            }
            None => {}
        }
        i += 1;
    }
    out.push_str(&sql[copied..]);
    Some(out)
}

/// `$first, $first+1, …` (`n` placeholders), for an `IN (…)` list.
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_sqlite_name(backend_name: &str) -> bool {
    backend_name.eq_ignore_ascii_case("sqlite")
}

/// The migrations of one service, written once per backend (SQLite lacks `BIGSERIAL`,
/// `BYTEA`, `BOOLEAN`; PostgreSQL's migrations, once applied, are never edited): from
/// `migrations/<service>` and `migrations-sqlite/<service>`.
pub struct Migrators {
    pub postgres: Migrator,
    pub sqlite: Migrator,
}

/// A database name we are willing to splice into `CREATE DATABASE` or a file name.
fn is_safe_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn server_options(server_url: &str) -> Result<PgConnectOptions, DbError> {
    PgConnectOptions::from_str(server_url).map_err(|e| DbError::BadUrl(e.to_string()))
}

/// Creates `db_name` on the PostgreSQL server unless it exists. Safe when replicas race.
pub async fn ensure_database(server_url: &str, db_name: &str) -> Result<(), DbError> {
    if !is_safe_identifier(db_name) {
        return Err(DbError::BadUrl(format!("unsafe database name {db_name:?}")));
    }
    let mut conn = server_options(server_url)?
        .database("postgres")
        .connect()
        .await
        .map_err(|e| DbError::Unreachable(e.to_string()))?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(db_name)
        .fetch_optional(&mut conn)
        .await?;
    if exists.is_none() {
        let sql = format!("CREATE DATABASE \"{db_name}\"");
        match sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await {
            Ok(_) => {}
            // 42P04 duplicate_database, 23505 unique_violation on pg_database: another
            // replica created it between our check and our CREATE.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let _ = conn.close().await;
    Ok(())
}

/// Drops a service's database (purge, test clean-up), disconnecting anyone still on it;
/// whether there was one to drop.
pub async fn drop_database(backend: &Backend, db_name: &str) -> Result<bool, DbError> {
    if !is_safe_identifier(db_name) {
        return Err(DbError::BadUrl(format!("unsafe database name {db_name:?}")));
    }
    match backend {
        Backend::Postgres { server_url } => {
            let mut conn = server_options(server_url)?
                .database("postgres")
                .connect()
                .await
                .map_err(|e| DbError::Unreachable(e.to_string()))?;
            let existed: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                    .bind(db_name)
                    .fetch_optional(&mut conn)
                    .await?;
            let sql = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
            sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await?;
            let _ = conn.close().await;
            Ok(existed.is_some())
        }
        Backend::Sqlite { dir: Some(dir) } => {
            let mut existed = false;
            for suffix in ["db", "db-wal", "db-shm"] {
                let path = dir.join(format!("{db_name}.{suffix}"));
                match std::fs::remove_file(&path) {
                    Ok(()) => existed = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(DbError::File {
                            path: path.display().to_string(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
            Ok(existed)
        }
        Backend::Sqlite { dir: None } => Ok(false),
    }
}

/// WAL pages past which a SQLite commit checkpoints by itself. SQLite's default, 1,000, has
/// the commit that crosses it copy the whole WAL into the database and sync it before it
/// returns: at 300 orders/s one of the seven databases of `ldt up` did so every 150–200 ms
/// and held its service's only connection for up to 10 ms, which made a tenth of the orders
/// 8–20 ms slower (BENCHMARKS.md). [`checkpoint_sqlite`] does that work on a connection of its
/// own; this is only for when it falls far behind.
pub const SQLITE_AUTOCHECKPOINT_BACKSTOP: u32 = 10_000;

/// How soon the checkpointer looks again after it found new WAL pages, and when it found
/// none.
const CHECKPOINT_BUSY: Duration = Duration::from_millis(200);
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// Copies a SQLite database's WAL into the database until `stop`, on a connection of its
/// own, so that no commit of the service's connection waits for it. A passive checkpoint
/// takes no lock a writer waits for: the service's commits go on meanwhile, and the WAL
/// starts over from its beginning at the first commit after a checkpoint has copied it all.
/// Looks again soon while pages come in, once a second while none do.
pub async fn checkpoint_sqlite(
    path: PathBuf,
    what: String,
    stop: tokio_util::sync::CancellationToken,
) {
    use sqlx::ConnectOptions;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
    let mut conn = tokio::select! {
        conn = options.connect() => match conn {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(db = %what, error = %e, "cannot open a connection for WAL checkpoints; SQLite's own checkpoints take over");
                return;
            }
        },
        _ = stop.cancelled() => return,
    };
    // (frames in the WAL, frames copied) at the last look.
    let mut last = (-1, -1);
    loop {
        let looked: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut conn)
                .await;
        let wait = match looked {
            Ok((_, frames, copied)) if (frames, copied) == last => CHECKPOINT_IDLE,
            Ok((_, frames, copied)) => {
                last = (frames, copied);
                CHECKPOINT_BUSY
            }
            Err(e) => {
                tracing::warn!(db = %what, error = %e, "WAL checkpoint failed; trying again later");
                CHECKPOINT_IDLE
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => break,
        }
    }
    let _ = sqlx::Connection::close(conn).await;
}

/// The file of a service's SQLite database, when it has one (not in memory, not PostgreSQL).
pub fn sqlite_file(backend: &Backend, db_name: &str) -> Option<PathBuf> {
    match backend {
        Backend::Sqlite { dir: Some(dir) } => Some(sqlite_path(dir, db_name)),
        _ => None,
    }
}

fn sqlite_path(dir: &std::path::Path, db_name: &str) -> PathBuf {
    dir.join(format!("{db_name}.db"))
}

/// Prepared statements kept per PostgreSQL connection (sqlx's default is 100).
const STATEMENT_CACHE: usize = 500;

/// Opens a pool on the service's own database, creating and migrating it first.
pub async fn open(
    backend: &Backend,
    db_name: &str,
    migrators: &Migrators,
    pool_size: u32,
) -> Result<Pool, DbError> {
    sqlx::any::install_default_drivers();
    if !is_safe_identifier(db_name) {
        return Err(DbError::BadUrl(format!("unsafe database name {db_name:?}")));
    }
    let (pool, migrator) = match backend {
        Backend::Postgres { server_url } => {
            ensure_database(server_url, db_name).await?;
            let mut url = server_options(server_url)?
                .database(db_name)
                .application_name("ldt")
                // Multi-row statements come in a shape per row count: keep them all prepared.
                .statement_cache_capacity(STATEMENT_CACHE)
                .to_url_lossy();
            // The URL sqlx builds leaves the startup options out, so they go in by hand.
            url.query_pairs_mut()
                .append_pair("options", SESSION_SETTINGS);
            let options = AnyConnectOptions::from_str(url.as_str())
                .map_err(|e| DbError::BadUrl(e.to_string()))?;
            let pool = AnyPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(|e| DbError::Unreachable(e.to_string()))?;
            (pool, &migrators.postgres)
        }
        Backend::Sqlite { dir } => (open_sqlite(dir.as_ref(), db_name).await?, &migrators.sqlite),
    };
    // sqlx takes an advisory lock around PostgreSQL migrations: two replicas starting
    // together apply each migration once.
    migrator
        .run(&pool)
        .await
        .map_err(|source| DbError::Migrate {
            db: db_name.to_owned(),
            source,
        })?;
    Ok(pool)
}

/// Settings every service's PostgreSQL session starts with.
///
/// `random_page_cost`: the server's default (4, a spinning disk's seek) prices an index probe
/// at four sequential page reads, so a batch of 64 sagas updated by key was planned as a hash
/// join over a sequential scan of the whole table up to some ten thousand sagas (7 ms a
/// statement, where 64 probes take a fraction of one). A service's working set is in memory,
/// where a probe costs about what a sequential read does: 1.1, the usual setting for SSDs.
const SESSION_SETTINGS: &str = "-c random_page_cost=1.1";

/// One connection per SQLite database: SQLite has one writer at a time anyway, and a single
/// connection turns what would be `SQLITE_BUSY` failures into a queue for the connection.
/// In WAL mode with `synchronous = NORMAL` a commit survives the process being killed (it
/// is in the WAL, in the OS's cache); only a power loss can take back the last commits.
/// The WAL is copied into the database by [`checkpoint_sqlite`], not by the commits (SQLite's
/// automatic checkpoint is left only as a backstop: see [`SQLITE_AUTOCHECKPOINT_BACKSTOP`]).
async fn open_sqlite(dir: Option<&PathBuf>, db_name: &str) -> Result<Pool, DbError> {
    let url = match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| DbError::File {
                path: dir.display().to_string(),
                reason: e.to_string(),
            })?;
            let path = sqlite_path(dir, db_name);
            let path = path.to_str().ok_or_else(|| DbError::File {
                path: path.display().to_string(),
                reason: "the path is not valid UTF-8".into(),
            })?;
            format!("sqlite://{path}?mode=rwc")
        }
        None => "sqlite::memory:".to_owned(),
    };
    let options = AnyConnectOptions::from_str(&url).map_err(|e| DbError::BadUrl(e.to_string()))?;
    AnyPoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        // An in-memory database lives as long as its connection: never recycle it.
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn, _| {
            Box::pin(async move {
                let pragmas = format!(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON; \
                     PRAGMA wal_autocheckpoint = {SQLITE_AUTOCHECKPOINT_BACKSTOP};"
                );
                conn.execute(AssertSqlSafe(pragmas)).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|e| DbError::File {
            path: url.clone(),
            reason: e.to_string(),
        })
}

/// Connections a hot path keeps checked out of its pool between uses.
///
/// sqlx pings a connection each time it goes back into its pool, and by default each time it
/// comes out: two round trips, and two wake-ups of a PostgreSQL backend, around every
/// transaction. At a few hundred small transactions a second on two cores those wake-ups
/// cost more than the transactions. A connection kept here skips both. One whose work did
/// not end well (an error, a transaction left open) is not kept: it goes back to the pool,
/// whose ping finds out whether it is still alive and rolls back what it left open, and so
/// do all the idle kept ones: work that failed may mean the database restarted, which ends
/// every connection at once. (The price: after a database restart, the first use of a kept
/// connection fails; its message is redelivered, or its request answered with a 500. The
/// others are pinged by the pool and replaced before they are used.)
///
/// SQLite keeps nothing here: its pool has one connection, which everyone shares.
pub struct Held {
    pool: Pool,
    idle: std::sync::Mutex<Vec<sqlx::pool::PoolConnection<sqlx::Any>>>,
    keep: usize,
}

impl Held {
    /// Keeps up to `keep` idle connections of `pool` (none for SQLite, nor for a pool too
    /// small to lend any without starving its other users).
    pub fn new(pool: &Pool, keep: usize) -> Held {
        let lendable = (pool.options().get_max_connections() as usize).saturating_sub(4);
        let keep = if is_sqlite(pool) {
            0
        } else {
            keep.min(lendable)
        };
        Held {
            pool: pool.clone(),
            idle: std::sync::Mutex::new(Vec::with_capacity(keep)),
            keep,
        }
    }

    /// A kept connection, or one from the pool when none is idle.
    pub async fn get(&self) -> Result<HeldConn<'_>, sqlx::Error> {
        let kept = match self.idle.lock() {
            Ok(mut idle) => idle.pop(),
            Err(_) => None,
        };
        let conn = match kept {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(HeldConn {
            held: self,
            conn: Some(conn),
            reusable: false,
        })
    }
}

/// A connection from [`Held`]; kept again when dropped only if [`HeldConn::reuse`] was called.
pub struct HeldConn<'a> {
    held: &'a Held,
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    reusable: bool,
}

impl HeldConn<'_> {
    /// The work done on this connection ended well (committed, nothing left open): it may be
    /// kept for the next use.
    pub fn reuse(&mut self) {
        self.reusable = true;
    }
}

impl std::ops::Deref for HeldConn<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        // Present from creation until drop.
        self.conn.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for HeldConn<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for HeldConn<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if !self.reusable {
            // Back to the pool with it, to be pinged before they are lent again.
            let kept = match self.held.idle.lock() {
                Ok(mut idle) => std::mem::take(&mut *idle),
                Err(_) => Vec::new(),
            };
            drop(kept);
            return;
        }
        if let Ok(mut idle) = self.held.idle.lock()
            && idle.len() < self.held.keep
        {
            idle.push(conn);
        }
    }
}

/// The backend a pool talks to.
pub fn is_sqlite(pool: &Pool) -> bool {
    pool.connect_options().database_url.scheme() == "sqlite"
}

/// A client span for a piece of database work (OpenTelemetry database conventions), e.g.
/// `db::span(&pool, "ledger")` around the statements that handle one message.
pub fn span(pool: &Pool, summary: &'static str) -> tracing::Span {
    let options = pool.connect_options();
    let url = &options.database_url;
    let sqlite = url.scheme() == "sqlite";
    let namespace = if sqlite {
        url.path().rsplit('/').next().unwrap_or_default().to_owned()
    } else {
        url.path().trim_start_matches('/').to_owned()
    };
    tracing::info_span!(
        "db",
        otel.name = summary,
        otel.kind = "client",
        db.system.name = if sqlite { "sqlite" } else { "postgresql" },
        db.namespace = namespace,
        db.query.summary = summary,
        server.address = url.host_str().unwrap_or_default(),
        server.port = url.port(),
    )
}

/// `<head> VALUES ($1, …, $cols), (…), …` for `rows` rows: a multi-row insert whose SQL
/// depends only on its shape (so prepared statements are reused). Portable to both backends.
pub fn multi_row_insert(head: &str, cols: usize, rows: usize) -> String {
    let mut sql = String::with_capacity(head.len() + 8 + rows * cols * 5);
    sql.push_str(head);
    sql.push(' ');
    push_values(&mut sql, 1, cols, rows);
    sql
}

/// Appends `VALUES ($first, …), (…), …` (`rows` rows of `cols` placeholders) to `sql`;
/// returns the number of the next placeholder.
pub fn push_values(sql: &mut String, first: usize, cols: usize, rows: usize) -> usize {
    sql.push_str("VALUES ");
    let mut n = first - 1;
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            n += 1;
            sql.push('$');
            sql.push_str(&n.to_string());
        }
        sql.push(')');
    }
    n + 1
}

/// A boolean column: PostgreSQL's `BOOLEAN`, or SQLite's 0/1 integer.
pub fn get_bool(row: &DbRow, column: &str) -> Result<bool, sqlx::Error> {
    use sqlx::Row;
    match row.try_get::<bool, _>(column) {
        Ok(b) => Ok(b),
        Err(sqlx::Error::ColumnDecode { .. }) => Ok(row.try_get::<i64, _>(column)? != 0),
        Err(e) => Err(e),
    }
}

/// Whether the error is a check-constraint or numeric-range violation: the request asked
/// for something the data does not allow (e.g. stock that would overflow).
pub fn is_out_of_range(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("22003") | Some("23514"))
                || matches!(d.kind(), sqlx::error::ErrorKind::CheckViolation)
        }
        _ => false,
    }
}

/// How often a service looks at its tables' change counters when the server's autovacuum is
/// off. Looking is one read of `pg_stat_user_tables`; work follows only past a threshold.
const LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The tables of this database that need a `VACUUM` or an `ANALYZE`.
/// - `VACUUM` by autovacuum's default rule: dead rows past 50 + 20 % of the rows.
/// - `ANALYZE` when the table has changed by more than its size since the last one (50 +
///   100 % of the rows; a never-analyzed table counts as empty), and only a table never
///   analyzed or of at least 1,000 rows. What the statistics are for here is the choice
///   between a sequential scan and an index, which changes while a table grows from nothing
///   and then no more: analyzing at each doubling catches that with a handful of `ANALYZE`s.
///   Autovacuum's 10 % rule, checked every 2 s, analyzed every growing table every few
///   seconds (a noticeable share of PostgreSQL's CPU, plus replanning every cached statement
///   of the table after each) and the outbox, always nearly empty and never read by a cached
///   plan that could go wrong, at every round.
const DUE_FOR_MAINTENANCE: &str = "\
    SELECT name, due_vacuum, due_analyze FROM ( \
        SELECT s.relname::text AS name, \
               s.n_dead_tup > 50 + 0.2 * GREATEST(c.reltuples, 0) AS due_vacuum, \
               s.n_mod_since_analyze > 50 + GREATEST(c.reltuples, 0) \
                 AND (s.n_live_tup >= 1000 \
                      OR (s.last_analyze IS NULL AND s.last_autoanalyze IS NULL)) AS due_analyze \
          FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
         WHERE s.schemaname = current_schema()) t \
     WHERE due_vacuum OR due_analyze";

/// Does autovacuum's work for a service's PostgreSQL database when the server has it turned
/// off, table by table, when each has changed enough (see [`maintain`]). With autovacuum on
/// (the server's default) this does nothing.
pub async fn vacuum_if_autovacuum_is_off(
    pool: Pool,
    service: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let autovacuum: Result<String, _> =
        sqlx::query_scalar("SHOW autovacuum").fetch_one(&pool).await;
    if autovacuum.as_deref().map_or(true, |on| on != "off") {
        return;
    }
    tracing::info!(
        service,
        every = ?LOOK_EVERY,
        "the PostgreSQL server has autovacuum off: this service vacuums and analyzes its own \
         tables"
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOOK_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = maintain(&pool).await {
            tracing::warn!(service, error = %e, "table maintenance failed; trying again later");
        }
    }
}

/// One round of maintenance: `VACUUM` or `ANALYZE` (or both) each table past autovacuum's
/// thresholds, and returns what it ran.
///
/// Both matter for speed, not only for space. The outbox is emptied as fast as it fills and
/// sagas, orders and ledgers are updated several times each: unvacuumed, their dead rows and
/// dead index entries pile up and every scan wades through them. And every prepared
/// statement's generic plan is made once per connection and kept until its table's
/// statistics change: a plan made while `sagas` was nearly empty seq-scans it for each answer
/// until the next `ANALYZE`, and the saga latency creeps up as the table grows. Analyzing as
/// a table grows replaces those plans while the table is still small.
pub async fn maintain(pool: &Pool) -> Result<Vec<String>, sqlx::Error> {
    let due: Vec<(String, bool, bool)> =
        sqlx::query_as(DUE_FOR_MAINTENANCE).fetch_all(pool).await?;
    let mut ran = Vec::with_capacity(due.len());
    for (name, vacuum, analyze) in due {
        let table = format!("\"{}\"", name.replace('"', "\"\""));
        let sql = match (vacuum, analyze) {
            (true, true) => format!("VACUUM (ANALYZE) {table}"),
            (true, false) => format!("VACUUM {table}"),
            _ => format!("ANALYZE {table}"),
        };
        let started = std::time::Instant::now();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(pool)
            .await?;
        tracing::debug!(sql, took = ?started.elapsed(), "maintained");
        ran.push(sql);
    }
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::Held;

    /// A pool on the test PostgreSQL server (the test command makes sure it runs).
    async fn postgres_pool(size: u32) -> super::Pool {
        sqlx::any::install_default_drivers();
        let server = std::env::var("LDT_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        sqlx::any::AnyPoolOptions::new()
            .max_connections(size)
            .connect(&format!("{}/postgres", server.trim_end_matches('/')))
            .await
            .expect("the test PostgreSQL server (scripts/test.sh starts it)")
    }

    fn idle(held: &Held) -> usize {
        held.idle.lock().unwrap().len()
    }

    #[tokio::test]
    async fn held_keeps_only_connections_whose_work_ended_well() {
        let pool = postgres_pool(8).await;
        let held = Held::new(&pool, 2);
        {
            let mut a = held.get().await.unwrap();
            let mut b = held.get().await.unwrap();
            let c = held.get().await.unwrap();
            sqlx::query("SELECT 1").execute(&mut *a).await.unwrap();
            a.reuse();
            b.reuse();
            // `c` failed (it never says so otherwise): back to the pool.
            drop(c);
        }
        assert_eq!(idle(&held), 2);
        {
            // A third one that ended well is not kept either: two is the limit.
            let mut conns = Vec::new();
            for _ in 0..3 {
                conns.push(held.get().await.unwrap());
            }
            assert_eq!(idle(&held), 0, "the kept ones are lent first");
            for conn in &mut conns {
                conn.reuse();
            }
        }
        assert_eq!(idle(&held), 2);
        // The pool never lent more than its size, and got back what was not kept.
        assert!(pool.size() <= 8);
        drop(held);
        pool.close().await;
    }

    /// A database restart ends every connection: the first use of a kept one fails, and the
    /// failure sends the other kept ones back to the pool, whose ping replaces them, so the
    /// uses after it succeed.
    #[tokio::test]
    async fn after_the_database_ends_its_connections_only_the_first_use_fails() {
        let pool = postgres_pool(8).await;
        let held = Held::new(&pool, 3);
        let mut pids = Vec::new();
        {
            let mut conns = Vec::new();
            for _ in 0..3 {
                let mut conn = held.get().await.unwrap();
                let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
                pids.push(pid);
                conn.reuse();
                conns.push(conn);
            }
        }
        assert_eq!(idle(&held), 3);
        // What a restart does to them (only these three: other tests share the server).
        for pid in &pids {
            let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .fetch_one(&pool)
                .await
                .unwrap();
            assert!(ended, "backend {pid} was not running");
        }
        let mut first = held.get().await.unwrap();
        let failed = sqlx::query("SELECT 1").execute(&mut *first).await;
        assert!(
            failed.is_err(),
            "a connection whose backend ended still worked"
        );
        drop(first);
        assert_eq!(
            idle(&held),
            0,
            "the other kept connections went back to the pool"
        );
        for i in 0..3 {
            let mut conn = held.get().await.unwrap();
            let one: i32 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&mut *conn)
                .await
                .unwrap_or_else(|e| panic!("use {} after the first failed: {e}", i + 2));
            assert_eq!(one, 1);
            conn.reuse();
        }
        drop(held);
        pool.close().await;
    }

    #[tokio::test]
    async fn held_keeps_nothing_of_a_small_pool() {
        let pool = postgres_pool(3).await;
        let held = Held::new(&pool, 2);
        let mut conn = held.get().await.unwrap();
        conn.reuse();
        drop(conn);
        assert_eq!(idle(&held), 0);
        pool.close().await;
    }

    /// The service's commits leave the WAL alone (SQLite would copy it into the database at
    /// 1,000 pages, inside a commit): the checkpointer copies it, beside them.
    #[tokio::test]
    async fn the_checkpointer_copies_the_wal_into_the_database_and_commits_do_not() {
        sqlx::any::install_default_drivers();
        let dir = std::env::temp_dir().join(format!("ldt-checkpoint-{}", uuid::Uuid::new_v4()));
        let pool = super::open_sqlite(Some(&dir), "ckpt").await.unwrap();
        sqlx::query("CREATE TABLE t (b BLOB NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        // 6 MB in 600 commits: some 1,500 pages, past SQLite's default of 1,000.
        for _ in 0..600 {
            sqlx::query("INSERT INTO t (b) VALUES (zeroblob(10000))")
                .execute(&pool)
                .await
                .unwrap();
        }
        let file = dir.join("ckpt.db");
        let size = || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        assert!(
            size() < 1_000_000,
            "a commit checkpointed: the database file has {} bytes",
            size()
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let checkpoints = tokio::spawn(super::checkpoint_sqlite(
            file.clone(),
            "the test database".into(),
            stop.clone(),
        ));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while size() < 6_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was not copied within 10 s: the database file has {} bytes",
                size()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, 600);
        stop.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), checkpoints)
            .await
            .expect("the checkpointer stops when told")
            .unwrap();
        pool.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sequential_placeholders_become_positional_for_sqlite_others_stay() {
        assert_eq!(
            super::positional("INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)").as_deref(),
            Some("INSERT INTO t (a, b) VALUES (?, ?), (?, ?)")
        );
        assert_eq!(
            super::positional("UPDATE t SET s = 'PENDING $2', n = $1 WHERE id IN ($2, $3)")
                .as_deref(),
            Some("UPDATE t SET s = 'PENDING $2', n = ? WHERE id IN (?, ?)")
        );
        assert_eq!(super::positional("SELECT 1").as_deref(), Some("SELECT 1"));
        // A placeholder used twice, or out of order, needs its number.
        assert_eq!(super::positional("SELECT $1, $1"), None);
        assert_eq!(super::positional("SELECT $2, $1"), None);
        assert_eq!(super::positional("SELECT $1, ?"), None);
        assert_eq!(super::positional("SELECT $$x$$"), None);
    }

    #[tokio::test]
    async fn a_statement_sent_on_sqlite_with_positional_placeholders_binds_as_numbered() {
        sqlx::any::install_default_drivers();
        let mut conn = <super::Conn as sqlx::Connection>::connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (a INTEGER, b TEXT)")
            .execute(&mut conn)
            .await
            .unwrap();
        let sql = super::multi_row_insert("INSERT INTO t (a, b)", 2, 300);
        let sent = super::for_conn(&conn, sql.clone());
        assert!(!sent.contains('$'), "{sent}");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sent));
        for i in 0..300i64 {
            query = query.bind(i).bind(format!("row {i}"));
        }
        query.execute(&mut conn).await.unwrap();
        let (n, sum, last): (i64, i64, String) =
            sqlx::query_as("SELECT COUNT(*), SUM(a), MAX(b) FROM t WHERE b = 'row ' || a")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!((n, sum, last.as_str()), (300, 299 * 300 / 2, "row 99"));
    }

    #[test]
    fn multi_row_insert_numbers_every_placeholder() {
        assert_eq!(
            super::multi_row_insert("INSERT INTO t (a, b)", 2, 3),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4), ($5, $6)"
        );
        assert_eq!(
            super::multi_row_insert("INSERT INTO t (a)", 1, 1),
            "INSERT INTO t (a) VALUES ($1)"
        );
    }

    #[test]
    fn push_values_numbers_on_from_where_it_starts() {
        let mut sql = String::from("A ");
        let next = super::push_values(&mut sql, 4, 2, 2);
        sql.push_str(" B ");
        let last = super::push_values(&mut sql, next, 1, 1);
        assert_eq!(sql, "A VALUES ($4, $5), ($6, $7) B VALUES ($8)");
        assert_eq!(last, 9);
    }

    /// Runs maintenance rounds until one does `wanted` to table `t`, within a deadline:
    /// a backend reports its counters at the end of a transaction, but not always at once.
    async fn maintain_until(pool: &super::Pool, wanted: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let ran = super::maintain(pool).await.unwrap();
            if ran.iter().any(|sql| sql == wanted) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no round ran {wanted}; the last ran {ran:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// No migrations: these tests make their own tables.
    static NO_MIGRATIONS: super::Migrators = super::Migrators {
        postgres: sqlx::migrate::Migrator::DEFAULT,
        sqlite: sqlx::migrate::Migrator::DEFAULT,
    };

    /// A fresh database opened as a service opens its own, and what drops it.
    async fn fresh_service_database() -> (super::Pool, impl AsyncFnOnce()) {
        let server = std::env::var("LDT_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("ldt_db_test_{}_{nanos}", std::process::id());
        let backend = super::Backend::Postgres { server_url: server };
        let pool = super::open(&backend, &name, &NO_MIGRATIONS, 2)
            .await
            .unwrap();
        let p = pool.clone();
        (pool, async move || {
            p.close().await;
            super::drop_database(&backend, &name).await.unwrap();
        })
    }

    #[tokio::test]
    async fn service_sessions_price_an_index_probe_as_memory_does() {
        let (pool, drop) = fresh_service_database().await;
        let cost: String = sqlx::query_scalar("SHOW random_page_cost")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(cost, "1.1");
        drop().await;
    }

    #[tokio::test]
    async fn maintenance_analyzes_a_table_as_it_grows_and_vacuums_a_churned_one_once() {
        let (pool, drop) = fresh_service_database().await;
        sqlx::raw_sql(
            "CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL); \
                       INSERT INTO t SELECT i, 0 FROM generate_series(1, 200) i",
        )
        .execute(&pool)
        .await
        .unwrap();

        // 200 rows inserted into a never-analyzed table: past 50 + 10 % of none.
        maintain_until(&pool, "ANALYZE \"t\"").await;
        let analyzed: i64 =
            sqlx::query_scalar("SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 't'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(analyzed, 1);

        // 150 updated rows leave 150 dead ones: past 50 + 20 % of 200. A table of 200 rows is
        // vacuumed, not analyzed again: its plans are what they will be.
        sqlx::query("UPDATE t SET v = v + 1 WHERE id <= 150")
            .execute(&pool)
            .await
            .unwrap();
        maintain_until(&pool, "VACUUM \"t\"").await;
        let (dead, vacuums, analyzed): (i64, i64, i64) = sqlx::query_as(
            "SELECT n_dead_tup, vacuum_count, analyze_count FROM pg_stat_user_tables \
             WHERE relname = 't'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!((dead, vacuums, analyzed), (0, 1, 1));

        // Grown tenfold (past 50 + 100 % of 200 changes, and 1,000 rows): analyzed again.
        sqlx::query("INSERT INTO t SELECT i, 0 FROM generate_series(201, 2000) i")
            .execute(&pool)
            .await
            .unwrap();
        maintain_until(&pool, "ANALYZE \"t\"").await;

        // Nothing changed since: the next round leaves the table alone.
        let ran = super::maintain(&pool).await.unwrap();
        assert!(!ran.iter().any(|sql| sql.ends_with("\"t\"")), "{ran:?}");

        drop().await;
    }
}
