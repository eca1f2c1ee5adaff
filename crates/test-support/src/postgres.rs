//! The PostgreSQL fixture: `DROVER_TEST_POSTGRES_URL`, a fresh schema per test (in-process
//! servers and stores) or a fresh database (a server in a child process).

use sqlx::Connection;

/// The variable that names the test database (`.ci/run` sets it).
pub const URL_VAR: &str = "DROVER_TEST_POSTGRES_URL";

/// The PostgreSQL URL to test against, or `None` when `DROVER_TEST_POSTGRES_URL` is unset.
///
/// A PostgreSQL test never passes silently: when the variable is unset this panics if `CI` is
/// set ("PostgreSQL suite required in CI"), and otherwise prints a `SKIP` line to stderr naming
/// `what` was skipped.
pub fn url(what: &str) -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let ci = std::env::var("CI").unwrap_or_default();
            if !ci.is_empty() && ci != "false" && ci != "0" {
                panic!("PostgreSQL suite required in CI: {URL_VAR} is not set ({what})");
            }
            // Straight to stderr: the test harness captures `eprintln!` of passing tests.
            use std::io::Write;
            let test = std::thread::current().name().unwrap_or("?").to_owned();
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: {test} ({what}) on PostgreSQL: {URL_VAR} is not set (.ci/run sets it)"
            );
            None
        }
    }
}

/// A fresh schema in the test database, for a server or store in this process.
#[derive(Debug, Clone)]
pub struct Schema {
    /// The database URL.
    pub url: String,
    /// The schema's name (`<prefix>_<uuid>`).
    pub name: String,
}

impl Schema {
    /// Creates a schema named `<prefix>_<uuid>`; `None` (with a skip line, or a panic in CI)
    /// when PostgreSQL is not configured. `what` names the test for that line.
    pub async fn create(prefix: &str, what: &str) -> Option<Schema> {
        let url = url(what)?;
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .unwrap_or_else(|error| panic!("PostgreSQL at {URL_VAR} must be reachable: {error}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        Some(Schema { url, name })
    }

    /// A connection of its own with `search_path` set to the schema.
    pub async fn connect(&self) -> sqlx::PgConnection {
        let mut conn = sqlx::PgConnection::connect(&self.url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET search_path TO {}",
            self.name
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        conn
    }
}

/// A fresh database in the test server, for a server in a child process (which cannot be
/// told a schema); dropped (`WITH (FORCE)`) by [`Database::drop_now`].
#[derive(Debug)]
pub struct Database {
    /// The URL of the new database.
    pub url: String,
    name: String,
    admin_url: String,
}

impl Database {
    /// Creates `<prefix>_<uuid>`; `None` (with a skip line, or a panic in CI) when PostgreSQL is
    /// not configured.
    pub async fn create(prefix: &str, what: &str) -> Option<Database> {
        let admin_url = url(what)?;
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|error| panic!("PostgreSQL at {URL_VAR} must be reachable: {error}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("{URL_VAR} has no database name"),
        };
        Some(Database {
            url,
            name,
            admin_url,
        })
    }

    /// Drops the database (any connection left is closed by force).
    pub async fn drop_now(self) {
        let mut conn = sqlx::PgConnection::connect(&self.admin_url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;
    }
}
