//! PostgreSQL plumbing shared by every service: create the service's own database on the
//! configured server when missing, migrate it, and map driver errors to something a caller
//! can act on.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgPool};

pub type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

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
    #[error("migrating database {db} failed: {source}")]
    Migrate {
        db: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

/// A database name we are willing to splice into `CREATE DATABASE`.
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

/// Creates `db_name` on the server unless it exists. Safe when several replicas race.
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

/// Drops `db_name` (test clean-up), disconnecting anyone still on it.
pub async fn drop_database(server_url: &str, db_name: &str) -> Result<(), DbError> {
    if !is_safe_identifier(db_name) {
        return Err(DbError::BadUrl(format!("unsafe database name {db_name:?}")));
    }
    let mut conn = server_options(server_url)?
        .database("postgres")
        .connect()
        .await
        .map_err(|e| DbError::Unreachable(e.to_string()))?;
    let sql = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
    sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await?;
    let _ = conn.close().await;
    Ok(())
}

/// Opens a pool on the service's own database, creating and migrating it first.
pub async fn open(
    server_url: &str,
    db_name: &str,
    migrator: &Migrator,
    pool_size: u32,
) -> Result<PgPool, DbError> {
    ensure_database(server_url, db_name).await?;
    let options = server_options(server_url)?
        .database(db_name)
        .application_name("ldt");
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| DbError::Unreachable(e.to_string()))?;
    // sqlx takes an advisory lock around migrations: two replicas starting together apply
    // each migration once.
    migrator
        .run(&pool)
        .await
        .map_err(|source| DbError::Migrate {
            db: db_name.to_owned(),
            source,
        })?;
    Ok(pool)
}

/// A client span for a piece of database work (OpenTelemetry database conventions), e.g.
/// `db_span(&pool, "ledger")` around the statements that handle one message.
pub fn span(pool: &PgPool, summary: &'static str) -> tracing::Span {
    let options = pool.connect_options();
    tracing::info_span!(
        "db",
        otel.name = summary,
        otel.kind = "client",
        db.system.name = "postgresql",
        db.namespace = options.get_database().unwrap_or_default(),
        db.query.summary = summary,
        server.address = options.get_host(),
        server.port = options.get_port(),
    )
}

/// Whether the error is a check-constraint or numeric-range violation: the request asked
/// for something the data does not allow (e.g. stock that would overflow).
pub fn is_out_of_range(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("22003") | Some("23514")))
}
