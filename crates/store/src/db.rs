//! Plain functions over either backend: a write transaction ([`Tx`]), a read connection
//! ([`Conn`]), and [`Arg`], one bind value type for both.
//!
//! Query code is written once, as ordinary `async fn`s that take `&mut Tx` (so `?` and early
//! returns mean what they say); only the SQL text may differ per backend, chosen with
//! [`Tx::backend`]. SQLite accepts `$1…$N` placeholders, so most SQL text is shared.
//!
//! Set-based statements take their rows as one JSON array bound as text: SQLite reads it with
//! `json_each`, PostgreSQL with `json_to_recordset`/`json_array_elements_text`. One statement
//! (prepared once and cached per connection, whatever the number of rows) then writes a whole
//! batch: the writer's cost per batch does not grow with statements per item.

use sqlx::postgres::{PgRow, Postgres};
use sqlx::sqlite::{Sqlite, SqliteRow};
use sqlx::{AssertSqlSafe, Database, Encode, FromRow, Type};

use crate::Result;
use crate::store::Backend;

/// One bind value: every column drover binds is an integer or text (JSON is text).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    /// `BIGINT`, or NULL.
    Int(Option<i64>),
    /// `TEXT`, or NULL.
    Text(Option<String>),
}

impl From<i64> for Arg {
    fn from(value: i64) -> Self {
        Arg::Int(Some(value))
    }
}

impl From<Option<i64>> for Arg {
    fn from(value: Option<i64>) -> Self {
        Arg::Int(value)
    }
}

impl From<&str> for Arg {
    fn from(value: &str) -> Self {
        Arg::Text(Some(value.to_owned()))
    }
}

impl From<String> for Arg {
    fn from(value: String) -> Self {
        Arg::Text(Some(value))
    }
}

impl From<&String> for Arg {
    fn from(value: &String) -> Self {
        Arg::Text(Some(value.clone()))
    }
}

impl From<Option<&str>> for Arg {
    fn from(value: Option<&str>) -> Self {
        Arg::Text(value.map(str::to_owned))
    }
}

impl From<Option<String>> for Arg {
    fn from(value: Option<String>) -> Self {
        Arg::Text(value)
    }
}

/// `args![a, b, c]`: a `Vec<Arg>` from values that convert into [`Arg`].
macro_rules! args {
    ($($value:expr),* $(,)?) => {
        vec![$($crate::db::Arg::from($value)),*]
    };
}
pub(crate) use args;

impl<DB: Database> Type<DB> for Arg
where
    i64: Type<DB>,
    String: Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <i64 as Type<DB>>::type_info()
    }

    fn compatible(_: &DB::TypeInfo) -> bool {
        true
    }
}

impl<'q, DB: Database> Encode<'q, DB> for Arg
where
    i64: Type<DB>,
    String: Type<DB>,
    Option<i64>: Encode<'q, DB>,
    Option<String>: Encode<'q, DB>,
{
    fn encode_by_ref(
        &self,
        buf: &mut <DB as Database>::ArgumentBuffer,
    ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        match self {
            Arg::Int(value) => value.encode_by_ref(buf),
            Arg::Text(value) => value.encode_by_ref(buf),
        }
    }

    fn produces(&self) -> Option<DB::TypeInfo> {
        Some(match self {
            Arg::Int(_) => <i64 as Type<DB>>::type_info(),
            Arg::Text(_) => <String as Type<DB>>::type_info(),
        })
    }
}

/// A row type both backends can decode.
pub(crate) trait Row:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}

impl<T> Row for T where T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{}

/// A write transaction: `BEGIN IMMEDIATE` on SQLite (the write lock is taken up front, so a
/// read-then-write never fails to upgrade), a plain `BEGIN` on PostgreSQL (row locks do that
/// job). Dropped without [`Tx::commit`], it rolls back.
#[derive(Debug)]
pub(crate) enum Tx {
    Sqlite(sqlx::Transaction<'static, Sqlite>),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

impl Tx {
    pub(crate) fn backend(&self) -> Backend {
        match self {
            Tx::Sqlite(_) => Backend::Sqlite,
            Tx::Postgres(_) => Backend::Postgres,
        }
    }

    /// Runs a statement; yields the rows it changed.
    pub(crate) async fn execute(&mut self, sql: &str, args: Vec<Arg>) -> Result<u64> {
        Ok(match self {
            Tx::Sqlite(tx) => bind(sqlx::query(AssertSqlSafe(sql)), args)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            Tx::Postgres(tx) => bind(sqlx::query(AssertSqlSafe(sql)), args)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
        })
    }

    /// Every row a statement yields.
    pub(crate) async fn fetch_all<T: Row>(&mut self, sql: &str, args: Vec<Arg>) -> Result<Vec<T>> {
        Ok(match self {
            Tx::Sqlite(tx) => {
                bind_as(sqlx::query_as(AssertSqlSafe(sql)), args)
                    .fetch_all(&mut **tx)
                    .await?
            }
            Tx::Postgres(tx) => {
                bind_as(sqlx::query_as(AssertSqlSafe(sql)), args)
                    .fetch_all(&mut **tx)
                    .await?
            }
        })
    }

    /// The first row a statement yields, if any.
    pub(crate) async fn fetch_optional<T: Row>(
        &mut self,
        sql: &str,
        args: Vec<Arg>,
    ) -> Result<Option<T>> {
        Ok(match self {
            Tx::Sqlite(tx) => {
                bind_as(sqlx::query_as(AssertSqlSafe(sql)), args)
                    .fetch_optional(&mut **tx)
                    .await?
            }
            Tx::Postgres(tx) => {
                bind_as(sqlx::query_as(AssertSqlSafe(sql)), args)
                    .fetch_optional(&mut **tx)
                    .await?
            }
        })
    }

    /// The one row a statement must yield.
    pub(crate) async fn fetch_one<T: Row>(&mut self, sql: &str, args: Vec<Arg>) -> Result<T> {
        Ok(match self {
            Tx::Sqlite(tx) => {
                bind_as(sqlx::query_as(AssertSqlSafe(sql)), args)
                    .fetch_one(&mut **tx)
                    .await?
            }
            Tx::Postgres(tx) => {
                bind_as(sqlx::query_as(AssertSqlSafe(sql)), args)
                    .fetch_one(&mut **tx)
                    .await?
            }
        })
    }

    /// Commits.
    pub(crate) async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(tx) => tx.commit().await?,
            Tx::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// `FROM <rows>` for a set-based statement: the JSON array bound at `$param`, as a row
    /// source named `v` with the given typed columns, e.g. `[("id", "BIGINT"), ("name", "TEXT")]`.
    pub(crate) fn json_rows(&self, param: usize, columns: &[(&str, &str)]) -> String {
        json_rows(self.backend(), param, columns)
    }

    /// `(SELECT …)` of the integers in the JSON array bound at `$param`, for `id IN …`.
    pub(crate) fn json_ids(&self, param: usize) -> String {
        json_ids(self.backend(), param)
    }
}

/// See [`Tx::json_ids`].
pub(crate) fn json_ids(backend: Backend, param: usize) -> String {
    match backend {
        Backend::Sqlite => format!("(SELECT value FROM json_each(${param}))"),
        Backend::Postgres => {
            format!(
                "(SELECT CAST(value AS BIGINT) FROM json_array_elements_text(CAST(${param} AS JSON)))"
            )
        }
    }
}

/// See [`Tx::json_rows`].
pub(crate) fn json_rows(backend: Backend, param: usize, columns: &[(&str, &str)]) -> String {
    match backend {
        Backend::Sqlite => {
            let list: Vec<String> = columns
                .iter()
                .map(|(name, _)| format!("j.value ->> '{name}' AS {name}"))
                .collect();
            format!("(SELECT {} FROM jsonb_each(${param}) j) v", list.join(", "))
        }
        Backend::Postgres => {
            let list: Vec<String> = columns
                .iter()
                .map(|(name, kind)| format!("{name} {kind}"))
                .collect();
            format!(
                "json_to_recordset(CAST(${param} AS JSON)) AS v({})",
                list.join(", ")
            )
        }
    }
}

fn bind<'q, DB: Database>(
    mut query: sqlx::query::Query<'q, DB, <DB as Database>::Arguments>,
    args: Vec<Arg>,
) -> sqlx::query::Query<'q, DB, <DB as Database>::Arguments>
where
    Arg: Encode<'q, DB> + Type<DB>,
{
    for arg in args {
        query = query.bind(arg);
    }
    query
}

fn bind_as<'q, DB: Database, O>(
    mut query: sqlx::query::QueryAs<'q, DB, O, <DB as Database>::Arguments>,
    args: Vec<Arg>,
) -> sqlx::query::QueryAs<'q, DB, O, <DB as Database>::Arguments>
where
    Arg: Encode<'q, DB> + Type<DB>,
{
    for arg in args {
        query = query.bind(arg);
    }
    query
}
