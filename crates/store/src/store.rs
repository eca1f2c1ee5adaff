//! The [`Store`] handle and its queries.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, FromRow};

use crate::db::Tx;
use crate::model::{Account, AccountKind, Credential, CredentialKind, NewKey, Resource};
use crate::secret::{self, SecretHash};
use crate::writer::{Job, Writer, WriterOptions, WriterStats};
use crate::{Error, Result};

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite, a file in the data directory, WAL.
    Sqlite,
    /// PostgreSQL, shared by several server nodes.
    Postgres,
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `sqlite://<path>` or `postgres://…`.
    pub url: String,
    /// The most connections the pool opens.
    pub max_connections: u32,
    /// PostgreSQL only: the schema to work in (tests use one schema each).
    pub pg_schema: Option<String>,
    /// How the writer batches.
    pub writer: WriterOptions,
}

impl StoreOptions {
    /// The embedded store: a SQLite file.
    pub fn sqlite_file(path: &Path) -> Self {
        StoreOptions {
            url: format!("sqlite://{}", path.display()),
            max_connections: 4,
            pg_schema: None,
            writer: WriterOptions::default(),
        }
    }

    /// A store at a URL.
    pub fn url(url: impl Into<String>) -> Self {
        StoreOptions {
            url: url.into(),
            max_connections: 8,
            pg_schema: None,
            writer: WriterOptions::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Pool {
    /// A write transaction (see [`Tx`]).
    pub(crate) async fn begin_write(&self) -> Result<Tx> {
        Ok(match self {
            Pool::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            Pool::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }
}

/// Runs the same code against whichever pool the store holds; SQL text is shared because
/// SQLite accepts `$1…$N` placeholders.
macro_rules! dispatch {
    ($self:ident, $pool:ident => $body:expr) => {
        match &$self.pool {
            $crate::store::Pool::Sqlite($pool) => $body,
            $crate::store::Pool::Postgres($pool) => $body,
        }
    };
}

mod changes;
mod cleanup;
mod cluster;
mod events;
mod process;
pub(crate) mod resource;
mod service;
pub(crate) mod write;

pub use changes::{CHANGE_LOG_LOCK, ChangeBounds, ChangeRow, ChangeScope, NewChange};
pub use cleanup::{CLEANUP_STEPS, CleanupAge, CleanupStep, StepResult};
pub use cluster::{LEADER_DUTY, NodeInfo, NodeRow};
pub use events::{
    EventFilter, EventKind, EventRecord, HostLookup, NewContainerEvent, NewServiceEvent,
    PostEventError,
};

pub use process::{
    EngineGauges, ExecutionRecord, ExecutionRow, Finish, IdempotencyKey, Idempotent, ProcessFilter,
    ProcessInstance, ProcessSummary, ScheduleError, Scheduled,
};
pub use resource::{Filter, FilterOp, FilterValue, ListQuery, Page, Registered};
pub use service::ServiceContainer;
pub use write::{
    AGENT_NOT_ACTIVE, ClaimRequest, Claimed, FinishItem, HostAgent, InstanceAgentKey, NO_HOST,
    NO_HOST_MESSAGE, NewCreate, NewProcess, PlacementError, ProgressItem, Step, Waiting,
    backoff_millis, wakes_waiting,
};

/// A cheap-clone handle to the database, and to its writer.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    writer: Writer,
}

/// What [`Store::bootstrap`] found or made.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// The admin account.
    pub admin: Account,
    /// The `Default` project.
    pub default_project: Account,
    /// A key generated for the admin on this start (the first start without configured keys).
    pub generated_admin_key: Option<NewKey>,
}

#[derive(FromRow)]
pub(crate) struct AccountRow {
    id: i64,
    name: Option<String>,
    kind: String,
    uuid: String,
    state: String,
    created: i64,
    project_id: Option<i64>,
    agent_id: Option<i64>,
    external_id: Option<String>,
}

impl TryFrom<AccountRow> for Account {
    type Error = Error;
    fn try_from(row: AccountRow) -> Result<Self> {
        Ok(Account {
            id: row.id,
            name: row.name,
            kind: row.kind.parse().map_err(Error::Corrupt)?,
            uuid: row.uuid,
            state: row.state,
            created: row.created,
            project_id: row.project_id,
            agent_id: row.agent_id,
            role: row
                .external_id
                .as_deref()
                .and_then(|text| text.strip_prefix("role:"))
                .map(str::to_owned),
        })
    }
}

#[derive(FromRow)]
pub(crate) struct CredentialRow {
    id: i64,
    name: Option<String>,
    description: Option<String>,
    kind: String,
    state: String,
    created: i64,
    account_id: i64,
    public_value: String,
}

impl TryFrom<CredentialRow> for Credential {
    type Error = Error;
    fn try_from(row: CredentialRow) -> Result<Self> {
        Ok(Credential {
            id: row.id,
            name: row.name,
            description: row.description,
            kind: row.kind.parse().map_err(Error::Corrupt)?,
            state: row.state,
            created: row.created,
            account_id: row.account_id,
            public_value: row.public_value,
        })
    }
}

#[derive(FromRow)]
struct KeyLookupRow {
    #[sqlx(flatten)]
    credential: CredentialRow,
    secret_value: String,
    #[sqlx(flatten)]
    account: AccountLookupRow,
}

#[derive(FromRow)]
struct AccountLookupRow {
    a_id: i64,
    a_name: Option<String>,
    a_kind: String,
    a_uuid: String,
    a_state: String,
    a_created: i64,
    a_project_id: Option<i64>,
    a_agent_id: Option<i64>,
    a_external_id: Option<String>,
}

pub(crate) const ACCOUNT_COLUMNS: &str =
    "id, name, kind, uuid, state, created, project_id, agent_id, external_id";
pub(crate) const CREDENTIAL_COLUMNS: &str =
    "id, name, description, kind, state, created, account_id, public_value";

/// PostgreSQL ends a session that stays this long (ms) inside a transaction without sending
/// a statement. A node stopped mid-transaction (paused, frozen VM) would otherwise keep its
/// row locks until it resumes: the other nodes' claims skip those rows and their sweep of the
/// dead node waits on them, delaying their own heartbeats past their TTL. Below the node TTL
/// (seconds), the locks are gone before any node needs them; a live node never idles that
/// long between the statements of a transaction.
const IDLE_IN_TRANSACTION_TIMEOUT_MILLIS: &str = "1000";

impl Store {
    /// Opens the store and applies the migrations.
    pub async fn connect(options: &StoreOptions) -> Result<Store> {
        let url = options.url.as_str();
        let pool = if url.starts_with("sqlite:") {
            let connect = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // With WAL, NORMAL loses no committed transaction when the process dies
                // (kill -9); only an OS crash or power loss can lose the last ones.
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(options.max_connections.max(1))
                .connect_with(connect)
                .await?;
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
            Pool::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            // A stopped node's open transaction must not hold its locks for long.
            let mut connect = PgConnectOptions::from_str(url)?.options([(
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION_TIMEOUT_MILLIS,
            )]);
            if let Some(schema) = &options.pg_schema {
                connect = connect.options([("search_path", schema.as_str())]);
            }
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections.max(1))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(connect)
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Pool::Postgres(pool)
        } else {
            return Err(Error::UnsupportedUrl(url.to_owned()));
        };
        let writer = Writer::start(pool.clone(), options.writer);
        Ok(Store { pool, writer })
    }

    /// The writer's counters.
    pub fn writer_stats(&self) -> &WriterStats {
        self.writer.stats()
    }

    /// Which database this store runs on.
    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Closes every connection; on SQLite this checkpoints the WAL into the database file.
    pub async fn close(&self) {
        dispatch!(self, pool => pool.close().await)
    }

    /// Makes sure a fresh data directory has its admin account, the `Default` project and an
    /// admin key. With `admin_key` given, that pair becomes (or stays) the admin's key; without
    /// it, a key is generated only when the admin has none.
    pub async fn bootstrap(&self, admin_key: Option<(&str, &str)>) -> Result<Bootstrap> {
        // One transaction: two servers starting on one database make one admin and one key.
        let mut tx = self.pool.begin_write().await?;
        let admin = match first_account_in(&mut tx, AccountKind::Admin).await? {
            Some(admin) => admin,
            None => {
                write::insert_account(&mut tx, AccountKind::Admin, "admin", None, None, None)
                    .await?
            }
        };
        let default_project = match first_account_in(&mut tx, AccountKind::Project).await? {
            Some(project) => project,
            None => {
                write::insert_account(&mut tx, AccountKind::Project, "Default", None, None, None)
                    .await?
            }
        };
        let mut generated_admin_key = None;
        match admin_key {
            Some((access_key, secret_key)) => {
                let hashed = secret::hash_hex(secret_key);
                let existing: Option<(i64, i64)> = tx
                    .fetch_optional(
                        "SELECT id, account_id FROM credential WHERE public_value = $1",
                        crate::db::args![access_key],
                    )
                    .await?;
                match existing {
                    Some((_, owner)) if owner != admin.id => {
                        return Err(Error::Conflict(format!(
                            "access key {access_key} belongs to another account"
                        )));
                    }
                    Some((id, _)) => {
                        let changed = tx
                            .execute(
                                "UPDATE credential SET secret_value = $1, state = 'active', removed = NULL WHERE id = $2",
                                crate::db::args![hashed, id],
                            )
                            .await?;
                        if changed != 1 {
                            return Err(Error::Conflict(format!("credential {id} vanished")));
                        }
                    }
                    None => {
                        tx.execute(
                            "INSERT INTO credential (name, kind, uuid, state, created, account_id, public_value, secret_value) \
                             VALUES ('admin', $1, $2, 'active', $3, $4, $5, $6)",
                            crate::db::args![
                                CredentialKind::ApiKey.as_str(),
                                uuid::Uuid::new_v4().to_string(),
                                now_millis(),
                                admin.id,
                                access_key,
                                hashed
                            ],
                        )
                        .await?;
                    }
                }
            }
            None => {
                let active: Option<(i64,)> = tx
                    .fetch_optional(
                        "SELECT id FROM credential WHERE account_id = $1 AND state = 'active' LIMIT 1",
                        crate::db::args![admin.id],
                    )
                    .await?;
                if active.is_none() {
                    generated_admin_key = Some(
                        write::rotate_key(&mut tx, admin.id, CredentialKind::ApiKey, "admin")
                            .await?,
                    );
                }
            }
        }
        tx.commit().await?;
        Ok(Bootstrap {
            admin,
            default_project,
            generated_admin_key,
        })
    }

    /// Creates an account.
    pub async fn create_account(
        &self,
        kind: AccountKind,
        name: &str,
        project_id: Option<i64>,
    ) -> Result<Account> {
        let sql = format!(
            "INSERT INTO account (name, kind, uuid, state, created, project_id) \
             VALUES ($1, $2, $3, 'active', $4, $5) RETURNING {ACCOUNT_COLUMNS}"
        );
        let uuid = uuid::Uuid::new_v4().to_string();
        let row: AccountRow = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str()))
            .bind(name).bind(kind.as_str()).bind(&uuid).bind(now_millis()).bind(project_id)
            .fetch_one(pool).await?);
        row.try_into()
    }

    /// An account by id (removed ones included).
    pub async fn get_account(&self, id: i64) -> Result<Option<Account>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM account WHERE id = $1");
        let row: Option<AccountRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(id).fetch_optional(pool).await?);
        row.map(Account::try_from).transpose()
    }

    /// Accounts of a kind that are not removed, oldest first.
    pub async fn list_accounts(&self, kind: AccountKind) -> Result<Vec<Account>> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS} FROM account WHERE kind = $1 AND removed IS NULL ORDER BY id"
        );
        let rows: Vec<AccountRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(kind.as_str()).fetch_all(pool).await?);
        rows.into_iter().map(Account::try_from).collect()
    }

    /// Creates a key for an account, with a fresh access key and secret.
    pub async fn create_key(
        &self,
        account_id: i64,
        kind: CredentialKind,
        name: Option<&str>,
        description: Option<&str>,
    ) -> Result<NewKey> {
        let access_key = secret::new_access_key();
        let secret_value = secret::new_secret_key();
        let credential = self
            .insert_key(
                account_id,
                kind,
                name,
                description,
                &access_key,
                &secret::hash_hex(&secret_value),
            )
            .await?;
        Ok(NewKey {
            credential,
            secret_value,
        })
    }

    async fn insert_key(
        &self,
        account_id: i64,
        kind: CredentialKind,
        name: Option<&str>,
        description: Option<&str>,
        access_key: &str,
        secret_hash_hex: &str,
    ) -> Result<Credential> {
        let sql = format!(
            "INSERT INTO credential (name, description, kind, uuid, state, created, account_id, public_value, secret_value) \
             VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $8) RETURNING {CREDENTIAL_COLUMNS}"
        );
        let uuid = uuid::Uuid::new_v4().to_string();
        let row: CredentialRow = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str()))
            .bind(name).bind(description).bind(kind.as_str()).bind(&uuid).bind(now_millis())
            .bind(account_id).bind(access_key).bind(secret_hash_hex)
            .fetch_one(pool).await?);
        row.try_into()
    }

    /// Keys, of one account or of all; newest last.
    pub async fn list_keys(&self, account_id: Option<i64>) -> Result<Vec<Credential>> {
        let sql = format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM credential WHERE ($1 IS NULL OR account_id = $1) ORDER BY id"
        );
        let rows: Vec<CredentialRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(account_id).fetch_all(pool).await?);
        rows.into_iter().map(Credential::try_from).collect()
    }

    /// A key by id.
    pub async fn get_key(&self, id: i64) -> Result<Option<Credential>> {
        let sql = format!("SELECT {CREDENTIAL_COLUMNS} FROM credential WHERE id = $1");
        let row: Option<CredentialRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(id).fetch_optional(pool).await?);
        row.map(Credential::try_from).transpose()
    }

    /// Moves a key to `removed`: it no longer authenticates.
    pub async fn remove_key(&self, id: i64) -> Result<Option<Credential>> {
        let sql = format!(
            "UPDATE credential SET state = 'removed', removed = $1 WHERE id = $2 RETURNING {CREDENTIAL_COLUMNS}"
        );
        let row: Option<CredentialRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(now_millis()).bind(id).fetch_optional(pool).await?);
        row.map(Credential::try_from).transpose()
    }

    /// The active key with this access key, its secret digest and its active account: what
    /// authentication needs, in one query.
    pub async fn lookup_key(
        &self,
        access_key: &str,
    ) -> Result<Option<(Credential, SecretHash, Account)>> {
        let sql = "SELECT c.id, c.name, c.description, c.kind, c.state, c.created, c.account_id, c.public_value, \
                   c.secret_value, a.id AS a_id, a.name AS a_name, a.kind AS a_kind, a.uuid AS a_uuid, \
                   a.state AS a_state, a.created AS a_created, a.project_id AS a_project_id, a.agent_id AS a_agent_id, a.external_id AS a_external_id \
                   FROM credential c JOIN account a ON a.id = c.account_id \
                   WHERE c.public_value = $1 AND c.state = 'active' AND a.state = 'active' AND a.removed IS NULL";
        let row: Option<KeyLookupRow> = dispatch!(self, pool => sqlx::query_as(sql).bind(access_key).fetch_optional(pool).await?);
        let Some(row) = row else { return Ok(None) };
        let digest = secret::parse_hex(&row.secret_value).ok_or_else(|| {
            Error::Corrupt(format!(
                "credential {} has a malformed digest",
                row.credential.id
            ))
        })?;
        let account = AccountRow {
            id: row.account.a_id,
            name: row.account.a_name,
            kind: row.account.a_kind,
            uuid: row.account.a_uuid,
            state: row.account.a_state,
            created: row.account.a_created,
            project_id: row.account.a_project_id,
            agent_id: row.account.a_agent_id,
            external_id: row.account.a_external_id,
        };
        Ok(Some((
            row.credential.try_into()?,
            digest,
            account.try_into()?,
        )))
    }

    /// Creates an agent in a project, with its own agent account and `agentApiKey`: what
    /// registration does, and what tests use to get an agent key.
    pub async fn create_agent(
        &self,
        project_id: i64,
        name: &str,
        uri: Option<&str>,
    ) -> Result<(i64, Account, NewKey)> {
        let mut tx = self.pool.begin_write().await?;
        let (agent_id,): (i64,) = tx
            .fetch_one(
                "INSERT INTO agent (name, kind, uuid, state, created, account_id, uri) \
                 VALUES ($1, 'agent', $2, 'active', $3, $4, $5) RETURNING id",
                crate::db::args![
                    name,
                    uuid::Uuid::new_v4().to_string(),
                    now_millis(),
                    project_id,
                    uri
                ],
            )
            .await?;
        let account = write::insert_account(
            &mut tx,
            AccountKind::Agent,
            name,
            Some(project_id),
            Some(agent_id),
            None,
        )
        .await?;
        let key = write::rotate_key(&mut tx, account.id, CredentialKind::AgentApiKey, name).await?;
        tx.commit().await?;
        Ok((agent_id, account, key))
    }

    /// Every setting stored in the database, as `(name, value)`.
    pub async fn list_settings(&self) -> Result<Vec<(String, String)>> {
        Ok(
            dispatch!(self, pool => sqlx::query_as("SELECT name, value FROM setting ORDER BY name")
            .fetch_all(pool).await?),
        )
    }

    /// Stores a setting's value.
    pub async fn put_setting(&self, name: &str, value: &str) -> Result<()> {
        dispatch!(self, pool => sqlx::query(
            "INSERT INTO setting (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(name).bind(value).execute(pool).await?.rows_affected());
        Ok(())
    }

    /// Removes a setting's stored value; returns whether there was one.
    pub async fn delete_setting(&self, name: &str) -> Result<bool> {
        let result = dispatch!(self, pool => sqlx::query("DELETE FROM setting WHERE name = $1")
            .bind(name).execute(pool).await?.rows_affected());
        Ok(result > 0)
    }

    /// The number of rows in a table, for tests and the soak benchmark.
    pub async fn count_rows(&self, table: &str) -> Result<i64> {
        if !table.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(Error::Conflict(format!("not a table name: {table:?}")));
        }
        let sql = format!("SELECT COUNT(*) FROM {table}");
        Ok(
            dispatch!(self, pool => sqlx::query_scalar(AssertSqlSafe(sql.as_str())).fetch_one(pool).await?),
        )
    }
}

pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn first_account_in(tx: &mut Tx, kind: AccountKind) -> Result<Option<Account>> {
    let sql = format!(
        "SELECT {ACCOUNT_COLUMNS} FROM account WHERE kind = $1 AND removed IS NULL ORDER BY id LIMIT 1"
    );
    let row: Option<AccountRow> = tx
        .fetch_optional(&sql, crate::db::args![kind.as_str()])
        .await?;
    row.map(Account::try_from).transpose()
}

/// The engine's writes, through the writer: each call is answered once its batch committed.
impl Store {
    /// Creates a resource with its plan (`new.steps`): hops applied, the pending step
    /// scheduled, in one transaction.
    pub async fn create_and_schedule(&self, new: NewCreate) -> Result<Scheduled> {
        self.writer
            .submit(|answer| Job::Create(new, answer))
            .await?
    }

    /// [`Store::create_and_schedule`] once per idempotency key: the key is recorded in the
    /// same transaction as the resource and its processes.
    pub async fn create_and_schedule_once(
        &self,
        new: NewCreate,
        key: &IdempotencyKey<'_>,
    ) -> Result<Idempotent> {
        let key = key.into();
        self.writer
            .submit(|answer| Job::CreateOnce(new, key, answer))
            .await?
    }

    /// Checks the resource's state, cancels or refuses what is pending on it, applies the
    /// plan's hops and schedules its pending step: one transaction.
    pub async fn schedule(&self, new: NewProcess) -> Result<Scheduled, ScheduleError> {
        self.writer
            .submit(|answer| Job::Schedule(new, answer))
            .await?
    }

    /// Claims ready processes with a lease, with what their attempts need.
    pub async fn claim(&self, request: ClaimRequest) -> Result<Vec<Claimed>> {
        self.writer
            .submit(|answer| Job::Claim(request, answer))
            .await?
    }

    /// Ends an attempt: records it, and moves the process and the resource on, if the node
    /// still holds the process in the same attempt. Returns the resource as it now is, or
    /// `None` when nothing of the resource changed (canceled, taken over, or moved meanwhile).
    pub async fn finish(&self, item: FinishItem) -> Result<Option<Resource>> {
        self.writer
            .submit(|answer| Job::Finish(Box::new(item), answer))
            .await?
    }

    /// Applies an agent's progress to the resource while the attempt holds its lease; returns
    /// the resource if it changed.
    pub async fn set_progress(&self, item: ProgressItem) -> Result<Option<Resource>> {
        self.writer
            .submit(|answer| Job::Progress(item, answer))
            .await?
    }

    /// Extends the leases of everything `node` is running.
    pub async fn renew_leases(&self, node: &str, lease_until: i64) -> Result<u64> {
        let node = node.to_owned();
        self.writer
            .submit(|answer| Job::Renew(node, lease_until, answer))
            .await?
    }
}
