//! drover's store: one schema and one interface over embedded SQLite and PostgreSQL.
//!
//! # Layout
//! - [`Store`]: a cheap-clone handle around a pool of either kind; every query is written once
//!   (SQLite accepts PostgreSQL's `$1…$N` placeholders) and dispatched to the pool in use.
//! - [`secret`]: generation and hashing of API keys; secrets are stored as SHA-256 only.
//! - `migrations/sqlite`, `migrations/postgres`: the schema, one migration set per backend,
//!   embedded in the binary and applied on connect.
//! - [`model`]: the rows this crate reads and writes.
//!
//! **Invariant:** all SQL lives in this crate. Nothing here knows about HTTP or WebSockets.

mod db;
pub mod model;
pub mod secret;
mod store;
mod writer;

pub use model::{
    Account, AccountKind, Credential, CredentialKind, NewKey, NewResource, Resource, ResourceKind,
};
pub use store::{
    AGENT_NOT_ACTIVE, ClaimRequest, Claimed, FinishItem, HostAgent, InstanceAgentKey, NO_HOST,
    NO_HOST_MESSAGE, NewCreate, PlacementError, ProgressItem, Step, Waiting, backoff_millis,
    wakes_waiting,
};
pub use store::{
    Backend, Bootstrap, CLEANUP_STEPS, CleanupAge, CleanupStep, EngineGauges, EventFilter,
    EventKind, EventRecord, ExecutionRecord, ExecutionRow, Filter, FilterOp, FilterValue, Finish,
    HostLookup, IdempotencyKey, Idempotent, ListQuery, NewContainerEvent, NewProcess,
    NewServiceEvent, Page, PostEventError, ProcessFilter, ProcessInstance, ProcessSummary,
    Registered, ScheduleError, Scheduled, ServiceContainer, StepResult, Store, StoreOptions,
};
pub use store::{CHANGE_LOG_LOCK, ChangeBounds, ChangeRow, ChangeScope, NewChange};
pub use store::{LEADER_DUTY, NodeInfo, NodeRow};
pub use writer::{WriterOptions, WriterStats};

/// What the store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database answered with an error, or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL is not one this store understands.
    #[error("unsupported database url {0:?}: use sqlite:// or postgres://")]
    UnsupportedUrl(String),
    /// A row the operation needs does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The operation conflicts with what is stored (e.g. a duplicate key).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A stored value could not be read back.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl Error {
    /// Whether the database refused a write because it would duplicate a unique key (e.g. a
    /// second live container in a service's slot).
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, Error::Database(sqlx::Error::Database(error)) if error.is_unique_violation())
    }
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
