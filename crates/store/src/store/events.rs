//! Container and service events: what agents report about the containers on their hosts.
//!
//! An event is stored `requested`; the server's event worker claims it (`creating`),
//! reconciles the instance it names and marks it `created`. Events pending on a host are
//! capped (`container.event.max.size`): the cap is checked by the insert itself, so a burst
//! of posts cannot slip past it on SQLite, and overshoots by at most the concurrent posts on
//! PostgreSQL.

use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, FromRow};

use super::resource::{
    Filter, FilterOp, FilterValue, Page, ResourceRow, bind_values, conditions, select_list,
};
use super::{Pool, Store, now_millis};
use crate::db::args;
use crate::model::{Resource, ResourceKind};
use crate::{Error, Result};

/// The two event tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `container_event`: a container started, stopped, died or was destroyed.
    Container,
    /// `service_event`: a health report about an instance.
    Service,
}

impl EventKind {
    /// The table.
    pub fn table(self) -> &'static str {
        match self {
            EventKind::Container => "container_event",
            EventKind::Service => "service_event",
        }
    }
}

/// A `container_event` or `service_event` row; the fields the other kind lacks are `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// Which table.
    pub kind: EventKind,
    /// Database id.
    pub id: i64,
    /// The project.
    pub account_id: Option<i64>,
    /// `requested`, `creating` or `created`.
    pub state: String,
    /// When it was posted (epoch ms).
    pub created: i64,
    /// Free-form data (`dockerInspect`, what the reconciliation found).
    pub data: Value,
    /// The host it happened on.
    pub host_id: Option<i64>,
    /// Container events: the container as the agent names it.
    pub external_id: Option<String>,
    /// Container events: `start`, `stop`, `die`, `destroy`.
    pub external_status: Option<String>,
    /// Container events: the image or source.
    pub external_from: Option<String>,
    /// When it happened according to the agent (epoch seconds, as Docker reports it).
    pub external_timestamp: Option<i64>,
    /// Container events: the host uuid the agent reported.
    pub reported_host_uuid: Option<String>,
    /// Service events: the instance the report is about.
    pub instance_id: Option<i64>,
    /// Service events: the health check.
    pub healthcheck_uuid: Option<String>,
    /// Service events: `healthy`, `unhealthy`, `initializing`, …
    pub reported_health: Option<String>,
    /// Service events: a description.
    pub description: Option<String>,
}

#[derive(FromRow)]
struct EventRow {
    id: i64,
    account_id: Option<i64>,
    state: String,
    created: i64,
    data: Option<String>,
    host_id: Option<i64>,
    external_id: Option<String>,
    external_status: Option<String>,
    external_from: Option<String>,
    external_timestamp: Option<i64>,
    reported_host_uuid: Option<String>,
    instance_id: Option<i64>,
    healthcheck_uuid: Option<String>,
    reported_health: Option<String>,
    description: Option<String>,
}

const CONTAINER_COLUMNS: &str = "id, account_id, state, created, data, host_id, external_id, external_status, \
    external_from, external_timestamp, reported_host_uuid, CAST(NULL AS BIGINT) AS instance_id, \
    CAST(NULL AS TEXT) AS healthcheck_uuid, CAST(NULL AS TEXT) AS reported_health, CAST(NULL AS TEXT) AS description";
const SERVICE_COLUMNS: &str = "id, account_id, state, created, data, host_id, CAST(NULL AS TEXT) AS external_id, \
    CAST(NULL AS TEXT) AS external_status, CAST(NULL AS TEXT) AS external_from, external_timestamp, \
    CAST(NULL AS TEXT) AS reported_host_uuid, instance_id, healthcheck_uuid, reported_health, description";

fn columns(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Container => CONTAINER_COLUMNS,
        EventKind::Service => SERVICE_COLUMNS,
    }
}

impl EventRow {
    fn into_record(self, kind: EventKind) -> EventRecord {
        EventRecord {
            kind,
            id: self.id,
            account_id: self.account_id,
            state: self.state,
            created: self.created,
            data: self
                .data
                .as_deref()
                .and_then(|text| serde_json::from_str(text).ok())
                .unwrap_or_else(|| Value::Object(Map::new())),
            host_id: self.host_id,
            external_id: self.external_id,
            external_status: self.external_status,
            external_from: self.external_from,
            external_timestamp: self.external_timestamp,
            reported_host_uuid: self.reported_host_uuid,
            instance_id: self.instance_id,
            healthcheck_uuid: self.healthcheck_uuid,
            reported_health: self.reported_health,
            description: self.description,
        }
    }
}

/// A container event to store.
#[derive(Debug, Clone, Default)]
pub struct NewContainerEvent {
    /// The project of the host.
    pub account_id: Option<i64>,
    /// The host it happened on (already checked to be the poster's).
    pub host_id: i64,
    /// The container as the agent names it (`1i42`, or the instance's external id).
    pub external_id: String,
    /// `start`, `stop`, `die`, `destroy`.
    pub external_status: String,
    /// The image or source.
    pub external_from: Option<String>,
    /// When it happened (epoch seconds).
    pub external_timestamp: Option<i64>,
    /// The host uuid the agent reported.
    pub reported_host_uuid: Option<String>,
    /// Extra data (`dockerInspect`).
    pub data: Map<String, Value>,
}

/// A health report to store.
#[derive(Debug, Clone, Default)]
pub struct NewServiceEvent {
    /// The project of the host.
    pub account_id: Option<i64>,
    /// The host the report comes from.
    pub host_id: i64,
    /// The instance it is about.
    pub instance_id: Option<i64>,
    /// The health check.
    pub healthcheck_uuid: Option<String>,
    /// `healthy`, `unhealthy`, `initializing`, …
    pub reported_health: String,
    /// When it was observed (epoch seconds).
    pub external_timestamp: Option<i64>,
    /// A description.
    pub description: Option<String>,
    /// Extra data.
    pub data: Map<String, Value>,
}

/// Why an event was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PostEventError {
    /// The host already has `limit` events waiting to be handled.
    #[error("host has {pending} events waiting to be handled (limit {limit})")]
    TooMany {
        /// Events pending on the host.
        pending: i64,
        /// The limit in effect.
        limit: i64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] Error),
}

impl From<sqlx::Error> for PostEventError {
    fn from(error: sqlx::Error) -> Self {
        PostEventError::Store(Error::from(error))
    }
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this project's.
    pub account_id: Option<i64>,
    /// Conditions on columns.
    pub filters: Vec<Filter>,
    /// Rows after this id.
    pub marker: Option<i64>,
    /// Page size.
    pub limit: i64,
}

impl Store {
    /// Stores a container event `requested`, unless `max_pending` events already wait on
    /// its host.
    pub async fn post_container_event(
        &self,
        new: &NewContainerEvent,
        max_pending: i64,
    ) -> std::result::Result<EventRecord, PostEventError> {
        let sql = format!(
            "INSERT INTO container_event (account_id, kind, state, created, data, external_id, external_status, \
             external_from, external_timestamp, reported_host_uuid, host_id) \
             SELECT $1, 'containerEvent', 'requested', $2, $3, $4, $5, $6, $7, $8, $9 \
             WHERE (SELECT COUNT(*) FROM container_event WHERE host_id = $9 AND state IN ('requested', 'creating')) < $10 \
             RETURNING {CONTAINER_COLUMNS}"
        );
        let data = Value::Object(new.data.clone()).to_string();
        let row: Option<EventRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str()))
            .bind(new.account_id).bind(now_millis()).bind(&data).bind(&new.external_id)
            .bind(&new.external_status).bind(&new.external_from).bind(new.external_timestamp)
            .bind(&new.reported_host_uuid).bind(new.host_id).bind(max_pending)
            .fetch_optional(pool).await?);
        match row {
            Some(row) => Ok(row.into_record(EventKind::Container)),
            None => Err(PostEventError::TooMany {
                pending: self
                    .pending_events(EventKind::Container, new.host_id)
                    .await?,
                limit: max_pending,
            }),
        }
    }

    /// Stores a health report `requested`, unless `max_pending` reports already wait on its
    /// host.
    pub async fn post_service_event(
        &self,
        new: &NewServiceEvent,
        max_pending: i64,
    ) -> std::result::Result<EventRecord, PostEventError> {
        let sql = format!(
            "INSERT INTO service_event (name, kind, uuid, description, state, created, data, account_id, host_id, \
             healthcheck_uuid, instance_id, reported_health, external_timestamp) \
             SELECT NULL, 'serviceEvent', $1, $2, 'requested', $3, $4, $5, $6, $7, $8, $9, $10 \
             WHERE (SELECT COUNT(*) FROM service_event WHERE host_id = $6 AND state IN ('requested', 'creating')) < $11 \
             RETURNING {SERVICE_COLUMNS}"
        );
        let data = Value::Object(new.data.clone()).to_string();
        let row: Option<EventRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str()))
            .bind(uuid::Uuid::new_v4().to_string()).bind(&new.description).bind(now_millis()).bind(&data)
            .bind(new.account_id).bind(new.host_id).bind(&new.healthcheck_uuid).bind(new.instance_id)
            .bind(&new.reported_health).bind(new.external_timestamp).bind(max_pending)
            .fetch_optional(pool).await?);
        match row {
            Some(row) => Ok(row.into_record(EventKind::Service)),
            None => Err(PostEventError::TooMany {
                pending: self.pending_events(EventKind::Service, new.host_id).await?,
                limit: max_pending,
            }),
        }
    }

    /// Events of a host still `requested` or `creating`.
    pub async fn pending_events(&self, kind: EventKind, host_id: i64) -> Result<i64> {
        let sql = format!(
            "SELECT COUNT(*) FROM {} WHERE host_id = $1 AND state IN ('requested', 'creating')",
            kind.table()
        );
        Ok(
            dispatch!(self, pool => sqlx::query_scalar(AssertSqlSafe(sql.as_str())).bind(host_id).fetch_one(pool).await?),
        )
    }

    /// Claims up to `limit` `requested` events, oldest first, moving them to `creating`.
    pub async fn claim_events(&self, kind: EventKind, limit: i64) -> Result<Vec<EventRecord>> {
        let lock = match self.pool {
            Pool::Sqlite(_) => "",
            Pool::Postgres(_) => " FOR UPDATE SKIP LOCKED",
        };
        let table = kind.table();
        let sql = format!(
            "UPDATE {table} SET state = 'creating' WHERE id IN (SELECT id FROM {table} WHERE state = 'requested' \
             ORDER BY id LIMIT $1{lock}) RETURNING {}",
            columns(kind)
        );
        let rows: Vec<EventRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str()))
            .bind(limit).fetch_all(pool).await?);
        let mut events: Vec<EventRecord> =
            rows.into_iter().map(|row| row.into_record(kind)).collect();
        // RETURNING gives no order guarantee; a host's events are handled in the order posted.
        events.sort_by_key(|event| event.id);
        Ok(events)
    }

    /// Puts events left `creating` by a server that stopped back to `requested` (at start).
    pub async fn requeue_events(&self, kind: EventKind) -> Result<u64> {
        let sql = format!(
            "UPDATE {} SET state = 'requested' WHERE state = 'creating'",
            kind.table()
        );
        Ok(
            dispatch!(self, pool => sqlx::query(AssertSqlSafe(sql.as_str())).execute(pool).await?.rows_affected()),
        )
    }

    /// Marks an event handled, recording what its reconciliation did in `data.result`.
    pub async fn finish_event(&self, kind: EventKind, id: i64, data: &Value) -> Result<()> {
        let sql = format!(
            "UPDATE {} SET state = 'created', data = $1 WHERE id = $2 AND state = 'creating'",
            kind.table()
        );
        dispatch!(self, pool => sqlx::query(AssertSqlSafe(sql.as_str())).bind(data.to_string()).bind(id)
            .execute(pool).await?.rows_affected());
        Ok(())
    }

    /// One event.
    pub async fn get_event(&self, kind: EventKind, id: i64) -> Result<Option<EventRecord>> {
        let sql = format!(
            "SELECT {} FROM {} WHERE id = $1",
            columns(kind),
            kind.table()
        );
        let row: Option<EventRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str()))
            .bind(id).fetch_optional(pool).await?);
        Ok(row.map(|row| row.into_record(kind)))
    }

    /// Events, filtered and paged, oldest first.
    pub async fn list_events(
        &self,
        kind: EventKind,
        filter: &EventFilter,
    ) -> Result<Page<EventRecord>> {
        let mut filters = filter.filters.clone();
        if let Some(account) = filter.account_id {
            filters.push(Filter {
                column: "account_id",
                op: FilterOp::Eq,
                value: FilterValue::Int(account),
            });
        }
        let (clause, values) = conditions(&filters, 3);
        let sql = format!(
            "SELECT {} FROM {} WHERE id > $1{clause} ORDER BY id LIMIT $2",
            columns(kind),
            kind.table()
        );
        let limit = filter.limit.clamp(1, 1000);
        let rows: Vec<EventRow> = dispatch!(self, pool => {
            let base = sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(filter.marker.unwrap_or(0)).bind(limit + 1);
            bind_values!(base, &values).fetch_all(pool).await?
        });
        let mut data: Vec<EventRecord> =
            rows.into_iter().map(|row| row.into_record(kind)).collect();
        let next_marker = if data.len() as i64 > limit {
            data.truncate(limit as usize);
            data.last().map(|event| event.id)
        } else {
            None
        };
        Ok(Page { data, next_marker })
    }

    /// The instance on `host_id` that a container event names: by drover id (`instance_id`)
    /// or by the instance's external id. Removed instances are not matched.
    pub async fn instance_on_host(
        &self,
        host_id: i64,
        instance_id: Option<i64>,
        external_id: &str,
    ) -> Result<Option<Resource>> {
        let sql = format!(
            "SELECT {} FROM instance r WHERE r.host_id = $1 AND r.removed IS NULL AND (r.id = $2 OR r.external_id = $3) \
             ORDER BY r.id LIMIT 1",
            select_list(ResourceKind::Instance, "r")
        );
        let row: Option<ResourceRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str()))
            .bind(host_id).bind(instance_id.unwrap_or(-1)).bind(external_id).fetch_optional(pool).await?);
        row.map(|row| row.into_resource(ResourceKind::Instance))
            .transpose()
    }

    /// Moves an instance from one of `from` to `to` on an agent's word, setting `fields` in its
    /// data (how it ended: `agentState`, `exitCode`, `finishedAt`, `agentMessage`) in the same
    /// transaction, but only when no process holds it and none ended after `reported_at`: a
    /// process knows better than a report that it raced with. Returns the instance if it moved.
    pub async fn settle_instance(
        &self,
        id: i64,
        from: &[&str],
        to: &str,
        reported_at: i64,
        fields: &Map<String, Value>,
    ) -> Result<Option<Resource>> {
        let mut tx = self.pool.begin_write().await?;
        let lock = match tx.backend() {
            super::Backend::Postgres => " FOR UPDATE",
            super::Backend::Sqlite => "",
        };
        let row: Option<(Option<String>,)> = tx
            .fetch_optional(
                &format!("SELECT data FROM instance WHERE id = $1{lock}"),
                args![id],
            )
            .await?;
        let Some((text,)) = row else {
            return Ok(None);
        };
        let mut data: Map<String, Value> = text
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_default();
        for (key, value) in fields {
            data.insert(key.clone(), value.clone());
        }
        let placeholders: Vec<String> =
            (0..from.len()).map(|idx| format!("${}", idx + 5)).collect();
        let sql = format!(
            "UPDATE instance SET state = $1, transitioning = 'no', transitioning_message = NULL, data = $4 \
             WHERE id = $2 AND removed IS NULL AND state IN ({}) AND NOT EXISTS (SELECT 1 FROM process_instance p \
             WHERE p.resource_type = 'instance' AND p.resource_id = $2 AND (p.end_time IS NULL OR p.end_time > $3)) \
             RETURNING {}",
            if placeholders.is_empty() {
                "NULL".to_owned()
            } else {
                placeholders.join(", ")
            },
            select_list(ResourceKind::Instance, "instance")
        );
        let mut values = args![to, id, reported_at, Value::Object(data).to_string()];
        values.extend(from.iter().map(|state| crate::db::Arg::from(*state)));
        let Some(row) = tx.fetch_optional::<ResourceRow>(&sql, values).await? else {
            return Ok(None);
        };
        let resource = row.into_resource(ResourceKind::Instance)?;
        tx.commit().await?;
        Ok(Some(resource))
    }

    /// The host a report names: one of `agent_id`'s hosts, by drover id, uuid or the agent's
    /// registration key. `Ok(Err(owner))` when the host exists but belongs to another agent.
    pub async fn host_for_report(
        &self,
        agent_id: i64,
        host_id: Option<i64>,
        uuid: Option<&str>,
    ) -> Result<HostLookup> {
        let candidates: Vec<(i64, Option<i64>, Option<i64>)> = match (host_id, uuid) {
            (None, None) => dispatch!(self, pool => sqlx::query_as(
                "SELECT id, agent_id, account_id FROM host WHERE agent_id = $1 AND removed IS NULL ORDER BY id")
                .bind(agent_id).fetch_all(pool).await?),
            (host_id, uuid) => dispatch!(self, pool => sqlx::query_as(
                "SELECT h.id, h.agent_id, h.account_id FROM host h LEFT JOIN agent a ON a.id = h.agent_id \
                 WHERE h.removed IS NULL AND (h.id = $1 OR h.uuid = $2 OR a.external_id = $2) ORDER BY h.id")
                .bind(host_id.unwrap_or(-1)).bind(uuid.unwrap_or("")).fetch_all(pool).await?),
        };
        if let Some((id, _, account_id)) = candidates
            .iter()
            .find(|(_, owner, _)| *owner == Some(agent_id))
        {
            return Ok(HostLookup::Found {
                host_id: *id,
                account_id: *account_id,
            });
        }
        Ok(match candidates.first() {
            Some((id, _, _)) if host_id.is_some() || uuid.is_some() => {
                HostLookup::NotYours { host_id: *id }
            }
            _ => HostLookup::Unknown,
        })
    }

    /// Merges `fields` into an instance's data (a health report); returns the instance if it
    /// changed.
    pub async fn merge_instance_data(
        &self,
        id: i64,
        fields: &Map<String, Value>,
    ) -> Result<Option<Resource>> {
        let Some(instance) = self.get_resource(ResourceKind::Instance, id).await? else {
            return Ok(None);
        };
        let mut data = instance.data.clone();
        let before = data.clone();
        for (key, value) in fields {
            data.insert(key.clone(), value.clone());
        }
        if data == before {
            return Ok(None);
        }
        self.update_resource_fields(ResourceKind::Instance, id, None, None, fields)
            .await
    }
}

/// Whose host a report names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostLookup {
    /// One of the agent's hosts.
    Found {
        /// The host.
        host_id: i64,
        /// Its project.
        account_id: Option<i64>,
    },
    /// A host of another agent.
    NotYours {
        /// The host.
        host_id: i64,
    },
    /// No such host (or, with nothing named, the agent has none).
    Unknown,
}
