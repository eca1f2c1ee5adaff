//! Resources of every kind: one row shape over six tables.

use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, FromRow};

use super::write::{self, NewCreate, Step};
use super::{Store, now_millis};
use crate::db::args;
use crate::model::{NewResource, Resource, ResourceKind};
use crate::{Error, Result};

pub(crate) const REFERENCE_COLUMNS: [&str; 5] = [
    "host_id",
    "agent_id",
    "stack_id",
    "service_id",
    "instance_id",
];

/// The select list of a kind: common columns, and NULL for references the table lacks.
pub(crate) fn select_list(kind: ResourceKind, alias: &str) -> String {
    let mut out = format!(
        "{alias}.id, {alias}.name, {alias}.account_id, {alias}.kind, {alias}.uuid, {alias}.description, \
         {alias}.state, {alias}.transitioning, {alias}.transitioning_message, {alias}.transitioning_progress, \
         {alias}.created, {alias}.removed, {alias}.data"
    );
    for column in REFERENCE_COLUMNS {
        if kind.has_column(column) {
            out.push_str(&format!(", {alias}.{column}"));
        } else {
            out.push_str(&format!(", CAST(NULL AS BIGINT) AS {column}"));
        }
    }
    if kind == ResourceKind::Agent {
        out.push_str(&format!(", {alias}.last_ping"));
    } else {
        out.push_str(", CAST(NULL AS BIGINT) AS last_ping");
    }
    out
}

#[derive(FromRow)]
pub(crate) struct ResourceRow {
    id: i64,
    name: Option<String>,
    account_id: Option<i64>,
    kind: String,
    uuid: String,
    description: Option<String>,
    state: String,
    transitioning: String,
    transitioning_message: Option<String>,
    transitioning_progress: Option<i32>,
    created: i64,
    removed: Option<i64>,
    data: Option<String>,
    host_id: Option<i64>,
    agent_id: Option<i64>,
    stack_id: Option<i64>,
    service_id: Option<i64>,
    instance_id: Option<i64>,
    last_ping: Option<i64>,
}

impl ResourceRow {
    pub(crate) fn into_resource(self, kind: ResourceKind) -> Result<Resource> {
        let data = match self.data.as_deref() {
            None | Some("") => Map::new(),
            Some(text) => match serde_json::from_str(text) {
                Ok(Value::Object(map)) => map,
                _ => {
                    return Err(Error::Corrupt(format!(
                        "{} {} has malformed data",
                        kind.table(),
                        self.id
                    )));
                }
            },
        };
        Ok(Resource {
            kind,
            id: self.id,
            name: self.name,
            account_id: self.account_id,
            sub_kind: self.kind,
            uuid: self.uuid,
            description: self.description,
            state: self.state,
            transitioning: self.transitioning,
            transitioning_message: self.transitioning_message,
            transitioning_progress: self.transitioning_progress.map(i64::from),
            created: self.created,
            removed: self.removed,
            data,
            host_id: self.host_id,
            agent_id: self.agent_id,
            stack_id: self.stack_id,
            service_id: self.service_id,
            instance_id: self.instance_id,
            last_ping: self.last_ping,
        })
    }
}

/// A comparison in a list filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterOp {
    /// `=`.
    Eq,
    /// `<>` (or `IS NOT NULL` for a null value).
    Ne,
    /// SQL `LIKE`.
    Like,
    /// `IS NULL`.
    Null,
    /// `IS NOT NULL`.
    NotNull,
}

/// A filter value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterValue {
    /// A text column.
    Text(String),
    /// An integer column.
    Int(i64),
}

/// One condition on a column; the caller has checked the column name against its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The column.
    pub column: &'static str,
    /// The comparison.
    pub op: FilterOp,
    /// The value (ignored for `Null` and `NotNull`).
    pub value: FilterValue,
}

/// A page of a list: the rows, and whether more follow.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The rows.
    pub data: Vec<T>,
    /// The marker (last id) to ask for the next page with, when there is one.
    pub next_marker: Option<i64>,
}

/// What to list.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// Only rows of this project.
    pub account_id: Option<i64>,
    /// Conditions, all of which must hold.
    pub filters: Vec<Filter>,
    /// Rows after this id.
    pub marker: Option<i64>,
    /// The most rows.
    pub limit: i64,
}

/// Appends `WHERE`-clause conditions with numbered placeholders starting at `first`.
pub(super) fn conditions(filters: &[Filter], first: usize) -> (String, Vec<FilterValue>) {
    let mut sql = String::new();
    let mut values = Vec::new();
    for filter in filters {
        let placeholder = first + values.len();
        let clause = match filter.op {
            FilterOp::Null => format!(" AND {} IS NULL", filter.column),
            FilterOp::NotNull => format!(" AND {} IS NOT NULL", filter.column),
            FilterOp::Eq => format!(" AND {} = ${placeholder}", filter.column),
            FilterOp::Ne => format!(
                " AND ({} <> ${placeholder} OR {} IS NULL)",
                filter.column, filter.column
            ),
            FilterOp::Like => format!(" AND {} LIKE ${placeholder}", filter.column),
        };
        if !matches!(filter.op, FilterOp::Null | FilterOp::NotNull) {
            values.push(filter.value.clone());
        }
        sql.push_str(&clause);
    }
    (sql, values)
}

macro_rules! bind_values {
    ($query:expr, $values:expr) => {{
        let mut query = $query;
        for value in $values {
            query = match value {
                FilterValue::Text(text) => query.bind(text.clone()),
                FilterValue::Int(number) => query.bind(*number),
            };
        }
        query
    }};
}
pub(super) use bind_values;

impl Store {
    /// A resource by id (removed ones included).
    pub async fn get_resource(&self, kind: ResourceKind, id: i64) -> Result<Option<Resource>> {
        let sql = format!(
            "SELECT {} FROM {} r WHERE r.id = $1",
            select_list(kind, "r"),
            kind.table()
        );
        let row: Option<ResourceRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(id).fetch_optional(pool).await?);
        row.map(|row| row.into_resource(kind)).transpose()
    }

    /// Resources of one kind by id, in one query (removed ones included; ids that do not
    /// exist are left out).
    pub async fn get_resources(&self, kind: ResourceKind, ids: &[i64]) -> Result<Vec<Resource>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {} FROM {} r WHERE r.id IN {}",
            select_list(kind, "r"),
            kind.table(),
            crate::db::json_ids(self.backend(), 1)
        );
        let ids = serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_owned());
        let rows: Vec<ResourceRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(&ids).fetch_all(pool).await?);
        rows.into_iter()
            .map(|row| row.into_resource(kind))
            .collect()
    }

    /// Resources of a kind, oldest first, filtered and paged.
    pub async fn list_resources(
        &self,
        kind: ResourceKind,
        query: &ListQuery,
    ) -> Result<Page<Resource>> {
        let (clause, values) = conditions(&query.filters, 4);
        let sql = format!(
            "SELECT {} FROM {} r WHERE ($1 IS NULL OR r.account_id = $1) AND r.id > $2{clause} ORDER BY r.id LIMIT $3",
            select_list(kind, "r"),
            kind.table()
        );
        let limit = query.limit.clamp(1, 1000);
        let rows: Vec<ResourceRow> = dispatch!(self, pool => {
            let base = sqlx::query_as(AssertSqlSafe(sql.as_str()))
                .bind(query.account_id)
                .bind(query.marker.unwrap_or(0))
                .bind(limit + 1);
            bind_values!(base, &values).fetch_all(pool).await?
        });
        let mut data = rows
            .into_iter()
            .map(|row| row.into_resource(kind))
            .collect::<Result<Vec<_>>>()?;
        let next_marker = if data.len() as i64 > limit {
            data.truncate(limit as usize);
            data.last().map(|resource| resource.id)
        } else {
            None
        };
        Ok(Page { data, next_marker })
    }

    /// Writes a resource's name and description (when given) and merges `fields` into its
    /// data, in one transaction on the row as it is now (what others wrote to other keys
    /// meanwhile stays), without touching its state.
    pub async fn update_resource_fields(
        &self,
        kind: ResourceKind,
        id: i64,
        name: Option<&str>,
        description: Option<&str>,
        fields: &Map<String, Value>,
    ) -> Result<Option<Resource>> {
        self.write_fields(kind, id, name, description, fields, false)
            .await
    }

    /// Writes `name` and `description` (when given) and merges `fields` into the row's data,
    /// reading and writing in one transaction (the row locked on PostgreSQL), so that fields
    /// others write meanwhile stay. With `only_if_changed`, nothing is written and `None` is
    /// returned when the data already had those values.
    pub(super) async fn write_fields(
        &self,
        kind: ResourceKind,
        id: i64,
        name: Option<&str>,
        description: Option<&str>,
        fields: &Map<String, Value>,
        only_if_changed: bool,
    ) -> Result<Option<Resource>> {
        let table = kind.table();
        let mut tx = self.pool.begin_write().await?;
        let lock = match tx.backend() {
            super::Backend::Postgres => " FOR UPDATE",
            super::Backend::Sqlite => "",
        };
        let row: Option<(Option<String>,)> = tx
            .fetch_optional(
                &format!("SELECT data FROM {table} WHERE id = $1{lock}"),
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
        let mut changed = false;
        for (key, value) in fields {
            if data.get(key) != Some(value) {
                data.insert(key.clone(), value.clone());
                changed = true;
            }
        }
        if only_if_changed && !changed {
            return Ok(None);
        }
        tx.execute(
            &format!(
                "UPDATE {table} SET name = COALESCE($1, name), description = COALESCE($2, description), data = $3 WHERE id = $4"
            ),
            args![name, description, Value::Object(data).to_string(), id],
        )
        .await?;
        tx.commit().await?;
        self.get_resource(kind, id).await
    }

    /// Inserts a resource in a given state, with no process (tests; the API creates
    /// resources through [`Store::create_and_schedule`]).
    pub async fn insert_resource(
        &self,
        kind: ResourceKind,
        new: &NewResource,
        state: &str,
    ) -> Result<Resource> {
        let mut tx = self.pool.begin_write().await?;
        let resource = super::write::insert_resource(&mut tx, kind, new, state).await?;
        tx.commit().await?;
        Ok(resource)
    }
}

/// What registering an agent made.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The agent.
    pub agent: Resource,
    /// Its host.
    pub host: Resource,
    /// The agent's account.
    pub account: crate::model::Account,
    /// Its new `agentApiKey` (older ones are revoked).
    pub key: crate::model::NewKey,
    /// Whether the agent was new (its create processes were scheduled).
    pub created: bool,
}

impl Store {
    /// Registers the agent of a host identified by `key` in a project, in one transaction:
    /// the first time, creates the agent and its host with their plans (`agent_steps`,
    /// `host_steps`: the create processes), and the agent's account; every time, issues a
    /// fresh `agentApiKey` and revokes the older ones, so a re-registration of the same host is
    /// the same agent. Whatever an earlier registration left (no host, no account) is made.
    #[allow(clippy::too_many_arguments)]
    pub async fn register_agent(
        &self,
        project_id: i64,
        key: &str,
        name: &str,
        host_data: Map<String, Value>,
        agent_steps: &[Step],
        host_steps: &[Step],
        node: &str,
    ) -> Result<Registered> {
        let mut tx = self.pool.begin_write().await?;
        let lock = match tx.backend() {
            super::Backend::Postgres => " FOR UPDATE",
            super::Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT {} FROM agent r WHERE r.external_id = $1 AND r.account_id = $2 AND r.removed IS NULL \
             ORDER BY r.id LIMIT 1{lock}",
            select_list(ResourceKind::Agent, "r")
        );
        let existing: Option<ResourceRow> = tx.fetch_optional(&sql, args![key, project_id]).await?;
        let (agent, created) = match existing {
            Some(row) => (row.into_resource(ResourceKind::Agent)?, false),
            None => {
                let new_agent = NewCreate {
                    kind: ResourceKind::Agent,
                    resource: NewResource {
                        name: Some(name.to_owned()),
                        sub_kind: "agent".into(),
                        account_id: Some(project_id),
                        external_id: Some(key.to_owned()),
                        ..NewResource::default()
                    },
                    steps: agent_steps.to_vec(),
                    node: node.to_owned(),
                };
                let made = write::create(&mut tx, &[&new_agent]).await?;
                let agent = made
                    .into_iter()
                    .next()
                    .ok_or(Error::NotFound("agent"))?
                    .resource;
                (agent, true)
            }
        };
        let sql = format!(
            "SELECT {} FROM host r WHERE r.agent_id = $1 AND r.removed IS NULL ORDER BY r.id LIMIT 1",
            select_list(ResourceKind::Host, "r")
        );
        let host: Option<ResourceRow> = tx.fetch_optional(&sql, args![agent.id]).await?;
        let host = match host {
            Some(row) => row.into_resource(ResourceKind::Host)?,
            None => {
                let new_host = NewCreate {
                    kind: ResourceKind::Host,
                    resource: NewResource {
                        name: Some(name.to_owned()),
                        sub_kind: "host".into(),
                        account_id: Some(project_id),
                        agent_id: Some(agent.id),
                        data: host_data,
                        ..NewResource::default()
                    },
                    steps: host_steps.to_vec(),
                    node: node.to_owned(),
                };
                write::create(&mut tx, &[&new_host])
                    .await?
                    .into_iter()
                    .next()
                    .ok_or(Error::NotFound("host"))?
                    .resource
            }
        };
        let account: Option<(i64,)> = tx
            .fetch_optional(
                "SELECT id FROM account WHERE agent_id = $1 AND kind = 'agent' ORDER BY id LIMIT 1",
                args![agent.id],
            )
            .await?;
        let account_id = match account {
            Some((id,)) => id,
            None => {
                write::insert_account(
                    &mut tx,
                    crate::model::AccountKind::Agent,
                    name,
                    Some(project_id),
                    Some(agent.id),
                    None,
                )
                .await?
                .id
            }
        };
        let key = write::rotate_key(
            &mut tx,
            account_id,
            crate::model::CredentialKind::AgentApiKey,
            name,
        )
        .await?;
        tx.commit().await?;
        let account = self
            .get_account(account_id)
            .await?
            .ok_or(Error::NotFound("account"))?;
        Ok(Registered {
            agent,
            host,
            account,
            key,
            created,
        })
    }

    /// Moves a resource from one of `from` to `to` without a process (the ping monitor's
    /// agent and host states); returns it if it moved. An agent or host that became active
    /// wakes, in the same transaction, what waits for it (see [`crate::wakes_waiting`]).
    pub async fn set_state(
        &self,
        kind: ResourceKind,
        id: i64,
        from: &[&str],
        to: &str,
    ) -> Result<Option<Resource>> {
        let placeholders: Vec<String> =
            (0..from.len()).map(|idx| format!("${}", idx + 3)).collect();
        let table = kind.table();
        let sql = format!(
            "UPDATE {table} SET state = $1, transitioning = 'no', transitioning_message = NULL \
             WHERE id = $2 AND state IN ({}) RETURNING {}",
            if placeholders.is_empty() {
                "NULL".to_owned()
            } else {
                placeholders.join(", ")
            },
            select_list(kind, table)
        );
        let mut values = args![to, id];
        values.extend(from.iter().map(|state| crate::db::Arg::from(*state)));
        let mut tx = self.pool.begin_write().await?;
        let Some(row) = tx.fetch_optional::<ResourceRow>(&sql, values).await? else {
            return Ok(None);
        };
        let resource = row.into_resource(kind)?;
        if write::wakes_waiting(kind, to) {
            write::wake_waiting(&mut tx, kind, id, resource.account_id, now_millis()).await?;
        }
        tx.commit().await?;
        Ok(Some(resource))
    }

    /// Agents the ping monitor watches: `(agent_id, state, last_ping)`.
    pub async fn agents_to_ping(&self) -> Result<Vec<(i64, String, Option<i64>)>> {
        Ok(dispatch!(self, pool => sqlx::query_as(
            "SELECT id, state, last_ping FROM agent WHERE removed IS NULL \
             AND state IN ('active', 'reconnecting', 'disconnected') \
             AND (uri IS NULL OR uri NOT LIKE 'instance://%') ORDER BY id")
            .fetch_all(pool).await?))
    }

    /// Records a ping answered, and the host facts it reported.
    pub async fn record_ping(
        &self,
        agent_id: i64,
        host_data: Option<&Map<String, Value>>,
    ) -> Result<()> {
        let mut tx = self.pool.begin_write().await?;
        tx.execute(
            "UPDATE agent SET last_ping = $1 WHERE id = $2",
            args![now_millis(), agent_id],
        )
        .await?;
        if let Some(facts) = host_data {
            let hosts: Vec<(i64, Option<String>)> = tx
                .fetch_all(
                    "SELECT id, data FROM host WHERE agent_id = $1 AND removed IS NULL",
                    args![agent_id],
                )
                .await?;
            for (host_id, data) in hosts {
                let mut merged: Map<String, Value> = data
                    .as_deref()
                    .and_then(|text| serde_json::from_str(text).ok())
                    .unwrap_or_default();
                let before = merged.clone();
                for (key, value) in facts {
                    merged.insert(key.clone(), value.clone());
                }
                if merged != before {
                    let text = Value::Object(merged).to_string();
                    tx.execute(
                        "UPDATE host SET data = $1 WHERE id = $2",
                        args![text, host_id],
                    )
                    .await?;
                }
            }
        }
        tx.commit().await
    }

    /// The hosts of an agent.
    pub async fn hosts_of_agent(&self, agent_id: i64) -> Result<Vec<i64>> {
        Ok(dispatch!(self, pool => sqlx::query_scalar(
            "SELECT id FROM host WHERE agent_id = $1 AND removed IS NULL").bind(agent_id).fetch_all(pool).await?))
    }

    /// Running instances on an agent's hosts with no pending process: what a ping's instance
    /// report is reconciled against.
    /// Only instances whose last process ended before `before` count: a ping answered before an
    /// instance started must not stop it.
    pub async fn settled_instances_of_agent(
        &self,
        agent_id: i64,
        before: i64,
    ) -> Result<Vec<Resource>> {
        let sql = format!(
            "SELECT {} FROM instance r JOIN host h ON h.id = r.host_id WHERE h.agent_id = $1 AND r.state = 'running' \
             AND r.removed IS NULL AND NOT EXISTS (SELECT 1 FROM process_instance p WHERE p.resource_type = 'instance' \
             AND p.resource_id = r.id AND (p.end_time IS NULL OR p.end_time >= $2))",
            select_list(ResourceKind::Instance, "r")
        );
        let rows: Vec<ResourceRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(agent_id).bind(before).fetch_all(pool).await?);
        rows.into_iter()
            .map(|row| row.into_resource(ResourceKind::Instance))
            .collect()
    }

    /// Records a container event (e.g. an instance found dead) as already handled.
    pub async fn insert_container_event(
        &self,
        account_id: Option<i64>,
        host_id: Option<i64>,
        external_id: &str,
        external_status: &str,
        data: &Value,
    ) -> Result<i64> {
        Ok(dispatch!(self, pool => sqlx::query_scalar(
            "INSERT INTO container_event (account_id, kind, state, created, data, external_id, external_status, \
             external_from, external_timestamp, host_id) VALUES ($1, 'containerEvent', 'created', $2, $3, $4, $5, 'drover', $2, $6) \
             RETURNING id")
            .bind(account_id).bind(now_millis()).bind(data.to_string()).bind(external_id).bind(external_status).bind(host_id)
            .fetch_one(pool).await?))
    }
}
