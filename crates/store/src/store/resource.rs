//! Resources of every kind: one row shape over six tables.

use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, FromRow};

use super::{Pool, Store, now_millis};
use crate::model::{NewResource, Resource, ResourceKind};
use crate::{Error, Result};

const REFERENCE_COLUMNS: [&str; 5] = [
    "host_id",
    "agent_id",
    "stack_id",
    "service_id",
    "instance_id",
];

/// The select list of a kind: common columns, and NULL for references the table lacks.
pub(super) fn select_list(kind: ResourceKind, alias: &str) -> String {
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
pub(super) struct ResourceRow {
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
    pub(super) fn into_resource(self, kind: ResourceKind) -> Result<Resource> {
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

    /// Writes a resource's fields (name, description, data) without touching its state.
    pub async fn update_resource_fields(
        &self,
        kind: ResourceKind,
        id: i64,
        name: Option<&str>,
        description: Option<&str>,
        data: &Map<String, Value>,
    ) -> Result<Option<Resource>> {
        let sql = format!(
            "UPDATE {} SET name = COALESCE($1, name), description = COALESCE($2, description), data = $3 WHERE id = $4",
            kind.table()
        );
        let data = Value::Object(data.clone()).to_string();
        dispatch!(self, pool => sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(name).bind(description).bind(&data).bind(id).execute(pool).await?.rows_affected());
        self.get_resource(kind, id).await
    }

    /// Sets a resource's progress message and percentage (from an agent's progress reply).
    pub async fn set_progress(
        &self,
        kind: ResourceKind,
        id: i64,
        message: Option<&str>,
        progress: Option<i64>,
    ) -> Result<()> {
        let sql = format!(
            "UPDATE {} SET transitioning_message = COALESCE($1, transitioning_message), \
             transitioning_progress = COALESCE($2, transitioning_progress) WHERE id = $3 AND transitioning <> 'no'",
            kind.table()
        );
        let progress = progress.map(|p| p.clamp(0, 100) as i32);
        dispatch!(self, pool => sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(message).bind(progress).bind(id).execute(pool).await?.rows_affected());
        Ok(())
    }

    /// Inserts a resource in a given state (used by registration and tests; the API creates
    /// resources through [`Store::create_and_schedule`]).
    pub async fn insert_resource(
        &self,
        kind: ResourceKind,
        new: &NewResource,
        state: &str,
    ) -> Result<Resource> {
        let id: i64 = write_tx!(self, tx => insert_row!(&mut *tx, kind, new, state, "no"));
        self.get_resource(kind, id)
            .await?
            .ok_or(Error::NotFound("resource"))
    }
}

/// The SQL and the reference values to bind after the nine common ones, for inserting a row.
pub(super) fn insert_sql(kind: ResourceKind, new: &NewResource) -> (String, Vec<Option<i64>>) {
    let mut columns = String::from(
        "name, kind, uuid, description, state, transitioning, created, account_id, data, external_id",
    );
    let mut placeholders = String::from("$1, $2, $3, $4, $5, $6, $7, $8, $9, $10");
    let mut refs = Vec::new();
    for (column, value) in [
        ("host_id", new.host_id),
        ("agent_id", new.agent_id),
        ("stack_id", new.stack_id),
        ("service_id", new.service_id),
        ("instance_id", new.instance_id),
    ] {
        if kind.has_column(column) {
            refs.push(value);
            columns.push_str(&format!(", {column}"));
            placeholders.push_str(&format!(", ${}", 10 + refs.len()));
        }
    }
    (
        format!(
            "INSERT INTO {} ({columns}) VALUES ({placeholders}) RETURNING id",
            kind.table()
        ),
        refs,
    )
}

/// Inserts a resource row on a connection or transaction; yields its id.
macro_rules! insert_row {
    ($conn:expr, $kind:expr, $new:expr, $state:expr, $transitioning:expr) => {{
        let (sql, refs) = super::resource::insert_sql($kind, $new);
        let mut query = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
            .bind($new.name.clone())
            .bind($new.sub_kind.clone())
            .bind(uuid::Uuid::new_v4().to_string())
            .bind($new.description.clone())
            .bind($state.to_owned())
            .bind($transitioning.to_owned())
            .bind(now_millis())
            .bind($new.account_id)
            .bind(serde_json::Value::Object($new.data.clone()).to_string())
            .bind($new.external_id.clone());
        for value in refs {
            query = query.bind(value);
        }
        query.fetch_one($conn).await?
    }};
}
pub(super) use insert_row;

impl Store {
    /// The host to place a new instance or volume of a project on: an active host whose agent
    /// is active (or reconnecting), with the fewest live instances. Returns `(host, agent)`.
    pub async fn pick_host(&self, account_id: Option<i64>) -> Result<Option<(i64, i64)>> {
        Ok(dispatch!(self, pool => sqlx::query_as(
            "SELECT h.id, h.agent_id FROM host h JOIN agent a ON a.id = h.agent_id \
             WHERE h.state = 'active' AND a.state IN ('active', 'reconnecting') AND h.removed IS NULL \
             AND ($1 IS NULL OR h.account_id = $1) \
             ORDER BY (SELECT COUNT(*) FROM instance i WHERE i.host_id = h.id AND i.removed IS NULL), h.id LIMIT 1")
            .bind(account_id).fetch_optional(pool).await?))
    }

    /// A host's agent and that agent's state: `(agent_id, state)`.
    pub async fn host_agent(&self, host_id: i64) -> Result<Option<(i64, String)>> {
        Ok(dispatch!(self, pool => sqlx::query_as(
            "SELECT a.id, a.state FROM host h JOIN agent a ON a.id = h.agent_id WHERE h.id = $1")
            .bind(host_id).fetch_optional(pool).await?))
    }
}

impl Store {
    /// Places a resource on a host, unless it is on one already; returns the host it is on.
    /// Written before the first request goes out, so a later remove knows where to go.
    pub async fn assign_host(
        &self,
        kind: ResourceKind,
        id: i64,
        host_id: i64,
    ) -> Result<Option<i64>> {
        if !kind.has_column("host_id") {
            return Ok(None);
        }
        let sql = format!(
            "UPDATE {} SET host_id = COALESCE(host_id, $1) WHERE id = $2 RETURNING host_id",
            kind.table()
        );
        Ok(
            dispatch!(self, pool => sqlx::query_scalar(AssertSqlSafe(sql.as_str()))
            .bind(host_id).bind(id).fetch_optional(pool).await?)
            .flatten(),
        )
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
    /// Registers the agent of a host identified by `key` in a project: the first time, creates
    /// the agent and its host with their create processes, and the agent's account; every
    /// time, issues a fresh `agentApiKey` and revokes the older ones, so a re-registration of
    /// the same host is the same agent.
    pub async fn register_agent(
        &self,
        project_id: i64,
        key: &str,
        name: &str,
        host_data: Map<String, Value>,
        node: &str,
    ) -> Result<Registered> {
        let existing: Option<i64> = dispatch!(self, pool => sqlx::query_scalar(
            "SELECT id FROM agent WHERE external_id = $1 AND account_id = $2 AND removed IS NULL ORDER BY id LIMIT 1")
            .bind(key).bind(project_id).fetch_optional(pool).await?);
        let (agent, host, account, created) = match existing {
            Some(agent_id) => {
                let agent = self
                    .get_resource(ResourceKind::Agent, agent_id)
                    .await?
                    .ok_or(Error::NotFound("agent"))?;
                let host_id: Option<i64> = dispatch!(self, pool => sqlx::query_scalar(
                    "SELECT id FROM host WHERE agent_id = $1 AND removed IS NULL ORDER BY id LIMIT 1")
                    .bind(agent_id).fetch_optional(pool).await?);
                let host = match host_id {
                    Some(id) => self
                        .get_resource(ResourceKind::Host, id)
                        .await?
                        .ok_or(Error::NotFound("host"))?,
                    None => {
                        self.create_host_for(project_id, agent_id, name, host_data, node)
                            .await?
                    }
                };
                let account_id: i64 = dispatch!(self, pool => sqlx::query_scalar(
                    "SELECT id FROM account WHERE agent_id = $1 AND kind = 'agent' ORDER BY id LIMIT 1")
                    .bind(agent_id).fetch_one(pool).await?);
                let account = self
                    .get_account(account_id)
                    .await?
                    .ok_or(Error::NotFound("account"))?;
                dispatch!(self, pool => sqlx::query(
                    "UPDATE credential SET state = 'removed', removed = $1 WHERE account_id = $2 AND state = 'active'")
                    .bind(now_millis()).bind(account_id).execute(pool).await?.rows_affected());
                (agent, host, account, false)
            }
            None => {
                let def_data = Map::new();
                let new_agent = NewResource {
                    name: Some(name.to_owned()),
                    sub_kind: "agent".into(),
                    account_id: Some(project_id),
                    external_id: Some(key.to_owned()),
                    ..NewResource::default()
                };
                let agent = self
                    .create_and_schedule(
                        ResourceKind::Agent,
                        &new_agent,
                        "agent.create",
                        "registering",
                        def_data,
                        node,
                    )
                    .await?
                    .resource;
                let account = self
                    .create_account(crate::model::AccountKind::Agent, name, Some(project_id))
                    .await?;
                dispatch!(self, pool => sqlx::query("UPDATE account SET agent_id = $1 WHERE id = $2")
                    .bind(agent.id).bind(account.id).execute(pool).await?.rows_affected());
                let account = crate::model::Account {
                    agent_id: Some(agent.id),
                    ..account
                };
                let host = self
                    .create_host_for(project_id, agent.id, name, host_data, node)
                    .await?;
                (agent, host, account, true)
            }
        };
        let key = self
            .create_key(
                account.id,
                crate::model::CredentialKind::AgentApiKey,
                Some(name),
                None,
            )
            .await?;
        Ok(Registered {
            agent,
            host,
            account,
            key,
            created,
        })
    }

    async fn create_host_for(
        &self,
        project_id: i64,
        agent_id: i64,
        name: &str,
        data: Map<String, Value>,
        node: &str,
    ) -> Result<Resource> {
        let new_host = NewResource {
            name: Some(name.to_owned()),
            sub_kind: "host".into(),
            account_id: Some(project_id),
            agent_id: Some(agent_id),
            data,
            ..NewResource::default()
        };
        Ok(self
            .create_and_schedule(
                ResourceKind::Host,
                &new_host,
                "host.create",
                "registering",
                Map::new(),
                node,
            )
            .await?
            .resource)
    }

    /// Moves a resource from one of `from` to `to` without a process (the ping monitor's
    /// agent and host states); returns it if it moved.
    pub async fn set_state(
        &self,
        kind: ResourceKind,
        id: i64,
        from: &[&str],
        to: &str,
    ) -> Result<Option<Resource>> {
        let placeholders: Vec<String> =
            (0..from.len()).map(|idx| format!("${}", idx + 3)).collect();
        let sql = format!(
            "UPDATE {} SET state = $1, transitioning = 'no', transitioning_message = NULL WHERE id = $2 AND state IN ({})",
            kind.table(),
            if placeholders.is_empty() {
                "NULL".to_owned()
            } else {
                placeholders.join(", ")
            }
        );
        let moved = dispatch!(self, pool => {
            let mut query = sqlx::query(AssertSqlSafe(sql.as_str())).bind(to).bind(id);
            for state in from {
                query = query.bind(*state);
            }
            query.execute(pool).await?.rows_affected()
        });
        if moved == 0 {
            return Ok(None);
        }
        self.get_resource(kind, id).await
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
        let now = now_millis();
        dispatch!(self, pool => sqlx::query("UPDATE agent SET last_ping = $1 WHERE id = $2")
            .bind(now).bind(agent_id).execute(pool).await?.rows_affected());
        if let Some(facts) = host_data {
            let hosts: Vec<(i64, Option<String>)> = dispatch!(self, pool => sqlx::query_as(
                "SELECT id, data FROM host WHERE agent_id = $1 AND removed IS NULL")
                .bind(agent_id).fetch_all(pool).await?);
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
                    dispatch!(self, pool => sqlx::query("UPDATE host SET data = $1 WHERE id = $2")
                        .bind(&text).bind(host_id).execute(pool).await?.rows_affected());
                }
            }
        }
        Ok(())
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

impl Store {
    /// The agent of a container labelled `io.rancher.container.create_agent=true`: made the
    /// first time (an agent with its own account, acting in the container's project with
    /// `role`), and on every call a fresh `agentApiKey` with the older ones revoked — the key
    /// travels to the container in its start request and is stored nowhere in plain text.
    /// Returns the agent's id and the new key.
    pub async fn instance_agent_key(
        &self,
        instance: &Resource,
        role: Option<&str>,
    ) -> Result<(i64, crate::model::NewKey)> {
        let project = instance
            .account_id
            .ok_or(Error::NotFound("project of the instance"))?;
        let name = format!("{}-agent", instance.name.as_deref().unwrap_or("container"));
        let agent_id = match instance.agent_id {
            Some(agent_id) => agent_id,
            None => {
                let uri = format!("instance://{}", instance.id);
                let new_agent = NewResource {
                    name: Some(name.clone()),
                    sub_kind: "agent".into(),
                    account_id: Some(project),
                    external_id: Some(uri.clone()),
                    ..NewResource::default()
                };
                let agent = self
                    .insert_resource(ResourceKind::Agent, &new_agent, "active")
                    .await?;
                dispatch!(self, pool => sqlx::query("UPDATE agent SET uri = $1 WHERE id = $2")
                    .bind(&uri).bind(agent.id).execute(pool).await?.rows_affected());
                let account = self
                    .create_account(crate::model::AccountKind::Agent, &name, Some(project))
                    .await?;
                let role = role.map(|role| format!("role:{role}"));
                dispatch!(self, pool => sqlx::query("UPDATE account SET agent_id = $1, external_id = $2 WHERE id = $3")
                    .bind(agent.id).bind(&role).bind(account.id).execute(pool).await?.rows_affected());
                dispatch!(self, pool => sqlx::query("UPDATE instance SET agent_id = $1 WHERE id = $2")
                    .bind(agent.id).bind(instance.id).execute(pool).await?.rows_affected());
                agent.id
            }
        };
        let account_id: i64 = dispatch!(self, pool => sqlx::query_scalar(
            "SELECT id FROM account WHERE agent_id = $1 AND kind = 'agent' ORDER BY id LIMIT 1")
            .bind(agent_id).fetch_one(pool).await?);
        dispatch!(self, pool => sqlx::query(
            "UPDATE credential SET state = 'removed', removed = $1 WHERE account_id = $2 AND state = 'active'")
            .bind(now_millis()).bind(account_id).execute(pool).await?.rows_affected());
        let key = self
            .create_key(
                account_id,
                crate::model::CredentialKind::AgentApiKey,
                Some(&name),
                None,
            )
            .await?;
        Ok((agent_id, key))
    }
}
