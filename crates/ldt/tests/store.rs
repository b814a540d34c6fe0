//! The store conformance suite, schema level: every service's migrations on every backend
//! (PostgreSQL, SQLite on disk, SQLite in memory), the twin schemas kept identical, and
//! the limits on money and stock enforced the same way. The behaviour of every query, the
//! concurrent ones included, is checked by `api.rs` and `saga.rs`, which run each scenario
//! on both stacks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use ldt_contract::Service;
use ldt_runtime::db::{self, Backend, Pool};
use sqlx::Row;

/// A fresh place for each backend; removed on drop.
struct Places {
    namespace: String,
    dir: std::path::PathBuf,
}

impl Places {
    fn new() -> Places {
        let namespace = format!("t_{}", uuid::Uuid::new_v4().simple());
        let dir = std::env::temp_dir().join(format!("ldt-store-{namespace}"));
        Places { namespace, dir }
    }

    fn backends(&self) -> [Backend; 3] {
        [
            Backend::Postgres {
                server_url: common::database_url(),
            },
            Backend::Sqlite {
                dir: Some(self.dir.clone()),
            },
            Backend::Sqlite { dir: None },
        ]
    }

    fn name(&self, service: Service) -> String {
        format!("{}_{}", self.namespace, service.db_suffix())
    }

    async fn open(&self, backend: &Backend, service: Service) -> Pool {
        db::open(
            backend,
            &self.name(service),
            ldt::services::migrators(service),
            2,
        )
        .await
        .unwrap_or_else(|e| panic!("{} on {backend:?}: {e}", service.as_str()))
    }
}

impl Drop for Places {
    fn drop(&mut self) {
        let names: Vec<String> = Service::ALL.iter().map(|s| self.name(*s)).collect();
        common::clean_up(async move {
            let pg = Backend::Postgres {
                server_url: common::database_url(),
            };
            for name in names {
                let _ = db::drop_database(&pg, &name).await;
            }
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// (table, column) pairs of the service's own tables.
async fn columns(pool: &Pool) -> BTreeSet<(String, String)> {
    let sql = if db::is_sqlite(pool) {
        "SELECT m.name AS t, p.name AS c FROM sqlite_master m JOIN pragma_table_info(m.name) p \
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> '_sqlx_migrations'"
    } else {
        "SELECT CAST(table_name AS TEXT) AS t, CAST(column_name AS TEXT) AS c \
         FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'"
    };
    sqlx::query(sql)
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<String, _>("t"), r.get::<String, _>("c")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_migration_applies_on_every_backend_and_reopening_applies_none() {
    let places = Places::new();
    for backend in places.backends() {
        for service in Service::ALL {
            let pool = places.open(&backend, service).await;
            let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
                .fetch_one(&pool)
                .await
                .unwrap();
            let migrators = ldt::services::migrators(service);
            let expected = match backend {
                Backend::Postgres { .. } => migrators.postgres.iter().count(),
                Backend::Sqlite { .. } => migrators.sqlite.iter().count(),
            };
            assert_eq!(
                applied as usize,
                expected,
                "{} on {backend:?}",
                service.as_str()
            );
            pool.close().await;
            if backend != (Backend::Sqlite { dir: None }) {
                // A restart finds its data and applies nothing twice.
                let again = places.open(&backend, service).await;
                let applied_again: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
                        .fetch_one(&again)
                        .await
                        .unwrap();
                assert_eq!(applied_again, applied);
                again.close().await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_twin_schemas_have_the_same_tables_and_columns() {
    let places = Places::new();
    let [pg, file, _] = places.backends();
    for service in Service::ALL {
        let on_pg = columns(&places.open(&pg, service).await).await;
        let on_sqlite = columns(&places.open(&file, service).await).await;
        assert!(!on_pg.is_empty());
        assert_eq!(on_pg, on_sqlite, "{} schemas differ", service.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_or_negative_stock_is_refused_alike_on_every_backend() {
    let places = Places::new();
    for backend in places.backends() {
        let pool = places.open(&backend, Service::Inventory).await;
        sqlx::query("INSERT INTO stock (id, initial, available) VALUES (1, 10, 10)")
            .execute(&pool)
            .await
            .unwrap();
        // SQLite would silently turn this into a REAL; the schema refuses it instead.
        let overflow = sqlx::query("UPDATE stock SET available = available + $1 WHERE id = 1")
            .bind(i64::MAX)
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(db::is_out_of_range(&overflow), "{backend:?}: {overflow}");
        let negative = sqlx::query("UPDATE stock SET available = available - 11 WHERE id = 1")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(db::is_out_of_range(&negative), "{backend:?}: {negative}");
        let available: i64 = sqlx::query_scalar("SELECT available FROM stock WHERE id = 1")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(
            available, 10,
            "{backend:?}: a refused update changed nothing"
        );
        pool.close().await;
    }
}
