//! The cluster's rows: nodes with leases, the once-per-cluster duties, task runs and agent
//! sessions.
//!
//! A node joins with a new epoch (one more than any epoch ever given on this database) and
//! renews its lease every heartbeat; a renewal that finds the lease run out, or the row marked
//! dead, or another epoch, fails, and the node must join again. Any live node sweeps: nodes
//! whose lease ran out are marked dead, and in the same transaction their process leases,
//! duties and agent sessions are released, so their work is claimable at once. Work a dead
//! node was doing is fenced by what each write checks: a process write by its node and attempt
//! (`execution_count`), a duty's run by the duty's node and epoch.

use sqlx::FromRow;

use super::Store;
use crate::db::args;
use crate::{Backend, Error, Result};

/// Who a node is, as it joins.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Unique per server process (the engine's lease holder name).
    pub id: String,
    /// The operator's name for it; stable across restarts of the same server.
    pub name: String,
    /// Where clients reach it.
    pub address: String,
    /// Whether it runs in cluster mode (with NATS).
    pub nats: bool,
}

/// A node as listed by [`Store::cluster_nodes`].
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct NodeRow {
    /// The node's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Where clients reach it.
    pub address: String,
    /// 1 in cluster mode.
    pub nats: i64,
    /// The epoch of its current membership.
    pub epoch: i64,
    /// When it (re)joined.
    pub started_at: i64,
    /// Its last heartbeat.
    pub heartbeat_at: i64,
    /// Until when it is alive without another heartbeat.
    pub lease_until: i64,
    /// `alive` or `dead`.
    pub state: String,
    /// 1 when it holds the leader duty.
    pub leader: i64,
    /// Processes it holds a lease on.
    pub processes: i64,
    /// Agents whose socket is on it.
    pub agents: i64,
}

#[derive(FromRow)]
struct LiveRow {
    id: String,
    name: String,
    address: String,
    nats: i64,
}

#[derive(FromRow)]
struct IdRow {
    id: String,
}

#[derive(FromRow)]
struct Value1 {
    value: String,
}

#[derive(FromRow)]
struct Epoch {
    epoch: i64,
}

/// The duty that clean-up, the ping monitor and the event worker run under.
pub const LEADER_DUTY: &str = "leader";

impl Store {
    /// The cluster id of this database (made on first call): what prefixes its NATS subjects,
    /// so that clusters on other databases sharing one NATS never see each other's events.
    pub async fn cluster_id(&self) -> Result<String> {
        let mut tx = self.pool.begin_write().await?;
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        tx.execute(
            "INSERT INTO cluster_meta (name, value) VALUES ('cluster_id', $1) ON CONFLICT (name) DO NOTHING",
            args![fresh],
        )
        .await?;
        let row: Value1 = tx
            .fetch_one(
                "SELECT value FROM cluster_meta WHERE name = 'cluster_id'",
                args![],
            )
            .await?;
        tx.commit().await?;
        Ok(row.value)
    }

    /// A secret shared by every node of this database, made on first call (a new secret key)
    /// and kept in `cluster_meta` under `name`: what signs tokens one node gives out and
    /// another checks (the log sockets' tokens).
    pub async fn shared_secret(&self, name: &str) -> Result<String> {
        let mut tx = self.pool.begin_write().await?;
        tx.execute(
            "INSERT INTO cluster_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            args![name, crate::secret::new_secret_key()],
        )
        .await?;
        let row: Value1 = tx
            .fetch_one(
                "SELECT value FROM cluster_meta WHERE name = $1",
                args![name],
            )
            .await?;
        tx.commit().await?;
        Ok(row.value)
    }

    /// Whether an agent's socket is open on some live node (its session is recorded).
    pub async fn agent_connected(&self, agent_id: i64) -> Result<bool> {
        let count: i64 = dispatch!(self, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM agent_session WHERE agent_id = $1")
            .bind(agent_id).fetch_one(pool).await?);
        Ok(count > 0)
    }

    /// Joins (or joins again) with a new epoch and a lease until `now + ttl`; returns the epoch.
    ///
    /// Refused ([`Error::Conflict`]) when it would split the cluster: a node without NATS while
    /// another node is alive, or a node with NATS while a node without it is alive. A live row
    /// of the same name and another id is this server's previous incarnation (a restart): it is
    /// declared dead and its work released at once. On SQLite every other row is such a one:
    /// only one server can use the file.
    ///
    /// With `rejoin` (this process lost its lease and joins again) such a row is not an
    /// earlier incarnation but another live process with this node's name: refused, so that
    /// two processes with one name never take each other's work in turn.
    pub async fn node_join(
        &self,
        node: &NodeInfo,
        now: i64,
        ttl: i64,
        rejoin: bool,
    ) -> Result<i64> {
        let mut tx = self.pool.begin_write().await?;
        if tx.backend() == Backend::Postgres {
            // Joins are serialized, so two nodes starting at once see each other.
            tx.execute(
                "LOCK TABLE cluster_node IN SHARE ROW EXCLUSIVE MODE",
                args![],
            )
            .await?;
        }
        let live: Vec<LiveRow> = tx
            .fetch_all(
                "SELECT id, name, address, nats FROM cluster_node \
                 WHERE state = 'alive' AND lease_until >= $1 AND id <> $2",
                args![now, node.id.as_str()],
            )
            .await?;
        let sqlite = tx.backend() == Backend::Sqlite;
        for other in &live {
            if rejoin && other.name == node.name {
                return Err(Error::Conflict(format!(
                    "another drover server took over node name {} (at {}) while this one was \
                     away; give each server its own --node-name and data directory",
                    node.name, other.address
                )));
            }
            if sqlite || other.name == node.name {
                continue;
            }
            if !node.nats {
                return Err(Error::Conflict(format!(
                    "another drover server (node {} at {}) is running on this database; \
                     several servers on one database must each be started with --nats-url",
                    other.name, other.address
                )));
            }
            if other.nats == 0 {
                return Err(Error::Conflict(format!(
                    "drover server node {} at {} runs on this database without NATS; \
                     stop it or restart it with --nats-url before starting more nodes",
                    other.name, other.address
                )));
            }
        }
        // Earlier incarnations of this node (same name), or every other row on SQLite.
        let stale: Vec<String> = live
            .iter()
            .filter(|other| sqlite || other.name == node.name)
            .map(|other| other.id.clone())
            .collect();
        if !stale.is_empty() {
            tx.execute(
                &format!(
                    "UPDATE cluster_node SET state = 'dead', lease_until = 0 WHERE id IN (SELECT value FROM {})",
                    tx.json_rows(1, &[("value", "TEXT")])
                ),
                args![json_strings(&stale)],
            )
            .await?;
        }
        let epoch: Epoch = tx
            .fetch_one(
                "SELECT COALESCE(MAX(epoch), 0) + 1 AS epoch FROM cluster_node",
                args![],
            )
            .await?;
        tx.execute(
            "INSERT INTO cluster_node (id, name, address, nats, epoch, started_at, heartbeat_at, lease_until, state) \
             VALUES ($1, $2, $3, $4, $5, $6, $6, $7, 'alive') \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, address = excluded.address, \
             nats = excluded.nats, epoch = excluded.epoch, started_at = excluded.started_at, \
             heartbeat_at = excluded.heartbeat_at, lease_until = excluded.lease_until, state = 'alive'",
            args![
                node.id.as_str(),
                node.name.as_str(),
                node.address.as_str(),
                i64::from(node.nats),
                epoch.epoch,
                now,
                now + ttl
            ],
        )
        .await?;
        release(&mut tx, &stale).await?;
        tx.commit().await?;
        Ok(epoch.epoch)
    }

    /// Renews a node's lease; `false` when it is no longer the live member of that epoch (its
    /// lease ran out, or it was declared dead): it must join again.
    pub async fn node_heartbeat(&self, id: &str, epoch: i64, now: i64, ttl: i64) -> Result<bool> {
        let rows = dispatch!(self, pool => sqlx::query(
            "UPDATE cluster_node SET heartbeat_at = $1, lease_until = $2 \
             WHERE id = $3 AND epoch = $4 AND state = 'alive' AND lease_until >= $1")
            .bind(now).bind(now + ttl).bind(id).bind(epoch)
            .execute(pool).await?.rows_affected());
        Ok(rows == 1)
    }

    /// Leaves the cluster (clean shutdown): the row is marked dead and its work released now,
    /// rather than when its lease runs out.
    pub async fn node_leave(&self, id: &str, epoch: i64) -> Result<()> {
        let mut tx = self.pool.begin_write().await?;
        let rows = tx
            .execute(
                "UPDATE cluster_node SET state = 'dead', lease_until = 0 WHERE id = $1 AND epoch = $2",
                args![id, epoch],
            )
            .await?;
        if rows == 1 {
            release(&mut tx, &[id.to_owned()]).await?;
        }
        tx.commit().await
    }

    /// Declares dead every node whose lease ran out before `now` and releases its process
    /// leases, duties and agent sessions, in one transaction; returns their ids.
    ///
    /// On PostgreSQL the sweep waits at most 500 ms for a row lock (a stopped node's open
    /// transaction holds some until PostgreSQL ends its session): it fails instead, and the
    /// next heartbeat sweeps again, so the sweep never holds up the caller's own heartbeat.
    pub async fn sweep_dead_nodes(&self, now: i64) -> Result<Vec<String>> {
        let mut tx = self.pool.begin_write().await?;
        if tx.backend() == Backend::Postgres {
            tx.execute("SET LOCAL lock_timeout = '500ms'", args![])
                .await?;
        }
        let dead: Vec<IdRow> = tx
            .fetch_all(
                "UPDATE cluster_node SET state = 'dead' WHERE state = 'alive' AND lease_until < $1 RETURNING id",
                args![now],
            )
            .await?;
        let dead: Vec<String> = dead.into_iter().map(|row| row.id).collect();
        if !dead.is_empty() {
            release(&mut tx, &dead).await?;
        }
        tx.commit().await?;
        Ok(dead)
    }

    /// Takes or renews a duty's lease for `node` at `epoch`; `true` when it holds the duty
    /// until `now + ttl`. A duty held by another live lease is not taken.
    pub async fn duty_acquire(
        &self,
        duty: &str,
        node: &str,
        epoch: i64,
        now: i64,
        ttl: i64,
    ) -> Result<bool> {
        let rows = dispatch!(self, pool => sqlx::query(
            "INSERT INTO cluster_duty (name, node, epoch, lease_until, acquired_at) \
             SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM cluster_node \
             WHERE id = $2 AND epoch = $3 AND state = 'alive' AND lease_until >= $5) \
             ON CONFLICT (name) DO UPDATE SET node = excluded.node, epoch = excluded.epoch, \
             lease_until = excluded.lease_until, acquired_at = CASE WHEN cluster_duty.node = excluded.node \
             AND cluster_duty.epoch = excluded.epoch THEN cluster_duty.acquired_at ELSE excluded.acquired_at END \
             WHERE cluster_duty.lease_until < $5 \
             OR (cluster_duty.node = excluded.node AND cluster_duty.epoch = excluded.epoch)")
            .bind(duty).bind(node).bind(epoch).bind(now + ttl).bind(now)
            .execute(pool).await?.rows_affected());
        Ok(rows == 1)
    }

    /// Records one run of a periodic task by `node` at `epoch`, only while that node still
    /// holds `duty` at `now`; `false` (nothing written) when it does not: the run must not
    /// happen. This is the fence of every once-per-cluster task.
    pub async fn begin_task_run(
        &self,
        task: &str,
        duty: &str,
        node: &str,
        epoch: i64,
        now: i64,
    ) -> Result<bool> {
        let rows = dispatch!(self, pool => sqlx::query(
            "INSERT INTO cluster_task_run (task, node, epoch, at) SELECT $1, $2, $3, $4 \
             WHERE EXISTS (SELECT 1 FROM cluster_duty WHERE name = $5 AND node = $2 AND epoch = $3 \
             AND lease_until >= $4)")
            .bind(task).bind(node).bind(epoch).bind(now).bind(duty)
            .execute(pool).await?.rows_affected());
        Ok(rows == 1)
    }

    /// Records that `agent`'s socket is on `node`.
    pub async fn agent_session_open(&self, agent: i64, node: &str, now: i64) -> Result<()> {
        dispatch!(self, pool => sqlx::query(
            "INSERT INTO agent_session (agent_id, node, since) VALUES ($1, $2, $3) \
             ON CONFLICT (agent_id, node) DO UPDATE SET since = excluded.since")
            .bind(agent).bind(node).bind(now).execute(pool).await?.rows_affected());
        Ok(())
    }

    /// Records that `agent`'s last socket on `node` is gone.
    pub async fn agent_session_close(&self, agent: i64, node: &str) -> Result<()> {
        dispatch!(self, pool => sqlx::query(
            "DELETE FROM agent_session WHERE agent_id = $1 AND node = $2")
            .bind(agent).bind(node).execute(pool).await?.rows_affected());
        Ok(())
    }

    /// Every node with what it holds, live ones first.
    pub async fn cluster_nodes(&self) -> Result<Vec<NodeRow>> {
        Ok(dispatch!(self, pool => sqlx::query_as(
            "SELECT n.id, n.name, n.address, n.nats, n.epoch, n.started_at, n.heartbeat_at, n.lease_until, n.state, \
             (SELECT COUNT(*) FROM cluster_duty d WHERE d.name = 'leader' AND d.node = n.id AND d.epoch = n.epoch \
              AND n.state = 'alive') AS leader, \
             (SELECT COUNT(*) FROM process_instance p WHERE p.running_process_server_id = n.id \
              AND p.end_time IS NULL) AS processes, \
             (SELECT COUNT(*) FROM agent_session s WHERE s.node = n.id) AS agents \
             FROM cluster_node n ORDER BY n.state, n.name")
            .fetch_all(pool).await?))
    }

    /// How many nodes are alive at `now`.
    pub async fn live_nodes(&self, now: i64) -> Result<i64> {
        let (count,): (i64,) = dispatch!(self, pool => sqlx::query_as(
            "SELECT COUNT(*) FROM cluster_node WHERE state = 'alive' AND lease_until >= $1")
            .bind(now).fetch_one(pool).await?);
        Ok(count)
    }

    /// When `task` last ran anywhere in the cluster.
    pub async fn last_task_run(&self, task: &str) -> Result<Option<i64>> {
        let (at,): (Option<i64>,) = dispatch!(self, pool => sqlx::query_as(
            "SELECT MAX(at) FROM cluster_task_run WHERE task = $1")
            .bind(task).fetch_one(pool).await?);
        Ok(at)
    }

    /// How many runs of `task` were recorded at or after `since`, by node id.
    pub async fn task_runs_since(&self, task: &str, since: i64) -> Result<Vec<(String, i64)>> {
        Ok(dispatch!(self, pool => sqlx::query_as(
            "SELECT node, COUNT(*) FROM cluster_task_run WHERE task = $1 AND at >= $2 GROUP BY node ORDER BY node")
            .bind(task).bind(since).fetch_all(pool).await?))
    }
}

/// Releases what the nodes `ids` held: their process leases (claimable at once), duties and
/// agent sessions.
async fn release(tx: &mut crate::db::Tx, ids: &[String]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let list = json_strings(ids);
    let set = format!(
        "(SELECT value FROM {})",
        tx.json_rows(1, &[("value", "TEXT")])
    );
    tx.execute(
        &format!(
            "UPDATE process_instance SET running_process_server_id = NULL, lease_expires = NULL \
             WHERE running_process_server_id IN {set} AND end_time IS NULL"
        ),
        args![list.as_str()],
    )
    .await?;
    tx.execute(
        &format!("UPDATE cluster_duty SET lease_until = 0 WHERE node IN {set}"),
        args![list.as_str()],
    )
    .await?;
    tx.execute(
        &format!("DELETE FROM agent_session WHERE node IN {set}"),
        args![list.as_str()],
    )
    .await?;
    Ok(())
}

/// `[{"value": id}, …]`, the shape `json_rows` reads.
fn json_strings(ids: &[String]) -> String {
    serde_json::Value::Array(
        ids.iter()
            .map(|id| serde_json::json!({ "value": id }))
            .collect(),
    )
    .to_string()
}
