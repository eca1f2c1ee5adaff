//! Table clean-up: deleting old events, finished processes and purged resources in batches.
//!
//! Every step deletes at most `batch` rows per statement and is called again until a
//! statement deletes fewer, so no transaction holds the write lock for long. A row that
//! another row still references is never deleted; it is counted as kept. Times are the
//! original's: events by `created`, processes by `end_time` (unfinished ones never match),
//! resources by `removed`, and only once they are `purged` (credentials once `removed`).

use sqlx::AssertSqlSafe;

use super::{Pool, Store, now_millis};
use crate::Result;
use crate::db::args;
use crate::model::ResourceKind;

/// One clean-up step: a table and the rule that selects its old rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupStep {
    /// The table.
    pub table: &'static str,
    /// Which age setting applies.
    pub age: CleanupAge,
    /// The condition (on alias `t`) that makes a row old enough: `$1` is the cutoff.
    old: &'static str,
    /// The condition (on alias `t`) under which an old row is still referenced and kept.
    referenced: Option<&'static str>,
}

/// The age settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanupAge {
    /// `events.purge.after.seconds`.
    Events,
    /// `process_instance.purge.after.seconds`.
    Processes,
    /// `main_tables.purge.after.seconds`.
    MainTables,
    /// `api.idempotency.ttl.seconds`.
    IdempotencyKeys,
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepResult {
    /// Rows deleted.
    pub deleted: u64,
    /// Old rows kept because something references them.
    pub kept: u64,
}

/// The steps, children before parents so that one run deletes a whole old tree.
pub const CLEANUP_STEPS: &[CleanupStep] = &[
    CleanupStep {
        table: "idempotency_key",
        age: CleanupAge::IdempotencyKeys,
        old: "t.created < $1",
        referenced: None,
    },
    CleanupStep {
        table: "cluster_task_run",
        age: CleanupAge::Events,
        old: "t.at < $1",
        referenced: None,
    },
    CleanupStep {
        table: "cluster_node",
        age: CleanupAge::Events,
        old: "t.state = 'dead' AND t.heartbeat_at < $1",
        referenced: None,
    },
    CleanupStep {
        table: "container_event",
        age: CleanupAge::Events,
        old: "t.created < $1",
        referenced: None,
    },
    CleanupStep {
        table: "service_event",
        age: CleanupAge::Events,
        old: "t.created < $1",
        referenced: None,
    },
    CleanupStep {
        table: "process_execution",
        age: CleanupAge::Processes,
        old: "EXISTS (SELECT 1 FROM process_instance p WHERE p.id = t.process_instance_id AND p.end_time < $1)",
        referenced: None,
    },
    CleanupStep {
        table: "process_instance",
        age: CleanupAge::Processes,
        old: "t.end_time < $1",
        referenced: Some(
            "EXISTS (SELECT 1 FROM process_execution e WHERE e.process_instance_id = t.id)",
        ),
    },
    CleanupStep {
        table: "volume",
        age: CleanupAge::MainTables,
        old: "t.state = 'purged' AND t.removed < $1",
        referenced: None,
    },
    CleanupStep {
        table: "instance",
        age: CleanupAge::MainTables,
        old: "t.state = 'purged' AND t.removed < $1",
        referenced: Some(
            "EXISTS (SELECT 1 FROM volume v WHERE v.instance_id = t.id) \
             OR EXISTS (SELECT 1 FROM service_event s WHERE s.instance_id = t.id)",
        ),
    },
    CleanupStep {
        table: "service",
        age: CleanupAge::MainTables,
        old: "t.state = 'purged' AND t.removed < $1",
        referenced: Some("EXISTS (SELECT 1 FROM instance i WHERE i.service_id = t.id)"),
    },
    CleanupStep {
        table: "external_handler",
        age: CleanupAge::MainTables,
        old: "t.state = 'purged' AND t.removed < $1",
        referenced: None,
    },
    CleanupStep {
        table: "stack",
        age: CleanupAge::MainTables,
        old: "t.state = 'purged' AND t.removed < $1",
        referenced: Some("EXISTS (SELECT 1 FROM service s WHERE s.stack_id = t.id)"),
    },
    CleanupStep {
        table: "host",
        age: CleanupAge::MainTables,
        old: "t.state = 'purged' AND t.removed < $1",
        referenced: Some(
            "EXISTS (SELECT 1 FROM instance i WHERE i.host_id = t.id) \
             OR EXISTS (SELECT 1 FROM volume v WHERE v.host_id = t.id) \
             OR EXISTS (SELECT 1 FROM container_event c WHERE c.host_id = t.id) \
             OR EXISTS (SELECT 1 FROM service_event s WHERE s.host_id = t.id)",
        ),
    },
    CleanupStep {
        table: "agent",
        age: CleanupAge::MainTables,
        old: "t.state = 'purged' AND t.removed < $1",
        referenced: Some(
            "EXISTS (SELECT 1 FROM host h WHERE h.agent_id = t.id) \
             OR EXISTS (SELECT 1 FROM instance i WHERE i.agent_id = t.id)",
        ),
    },
    CleanupStep {
        table: "credential",
        age: CleanupAge::MainTables,
        old: "t.state = 'removed' AND t.removed < $1",
        referenced: None,
    },
];

impl Store {
    /// Deletes up to `batch` old rows of one step's table (cutoff: epoch ms); returns how
    /// many it deleted. Call again while it deletes `batch`.
    pub async fn cleanup_batch(&self, step: &CleanupStep, cutoff: i64, batch: i64) -> Result<u64> {
        let table = step.table;
        let keep = step
            .referenced
            .map(|referenced| format!(" AND NOT ({referenced})"))
            .unwrap_or_default();
        if table == "agent" {
            return self.cleanup_agents(cutoff, batch, &keep).await;
        }
        let sql = format!(
            "DELETE FROM {table} WHERE id IN (SELECT t.id FROM {table} t WHERE {}{keep} ORDER BY t.id LIMIT $2)",
            step.old
        );
        Ok(
            dispatch!(self, pool => sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(cutoff).bind(batch).execute(pool).await?.rows_affected()),
        )
    }

    /// An agent's own account and its keys go with it (nothing else references them).
    async fn cleanup_agents(&self, cutoff: i64, batch: i64, keep: &str) -> Result<u64> {
        let select = format!(
            "SELECT t.id FROM agent t WHERE t.state = 'purged' AND t.removed < $1{keep} ORDER BY t.id LIMIT $2"
        );
        let mut tx = self.pool.begin_write().await?;
        let ids: Vec<(i64,)> = tx.fetch_all(&select, args![cutoff, batch]).await?;
        for (id,) in &ids {
            tx.execute(
                "DELETE FROM credential WHERE account_id IN \
                 (SELECT a.id FROM account a WHERE a.agent_id = $1 AND a.kind = 'agent')",
                args![*id],
            )
            .await?;
            tx.execute(
                "DELETE FROM account WHERE agent_id = $1 AND kind = 'agent'",
                args![*id],
            )
            .await?;
            tx.execute(
                "UPDATE account SET agent_id = NULL WHERE agent_id = $1",
                args![*id],
            )
            .await?;
            let gone = tx
                .execute("DELETE FROM agent WHERE id = $1", args![*id])
                .await?;
            if gone != 1 {
                return Err(crate::Error::Conflict(format!(
                    "agent {id} vanished during clean-up"
                )));
            }
        }
        tx.commit().await?;
        let deleted = ids.len() as u64;
        Ok(deleted)
    }

    /// Old rows of one step's table that are kept because something references them.
    pub async fn cleanup_kept(&self, step: &CleanupStep, cutoff: i64) -> Result<u64> {
        let Some(referenced) = step.referenced else {
            return Ok(0);
        };
        let sql = format!(
            "SELECT COUNT(*) FROM {} t WHERE {} AND ({referenced})",
            step.table, step.old
        );
        let kept: i64 = dispatch!(self, pool => sqlx::query_scalar(AssertSqlSafe(sql.as_str()))
            .bind(cutoff).fetch_one(pool).await?);
        Ok(kept.max(0) as u64)
    }

    /// Up to `limit` resources of `kind` left `removed` (not yet purged), after id `after`.
    pub async fn removed_resources(
        &self,
        kind: ResourceKind,
        after: i64,
        limit: i64,
    ) -> Result<Vec<i64>> {
        let sql = format!(
            "SELECT id FROM {} WHERE state = 'removed' AND id > $1 ORDER BY id LIMIT $2",
            kind.table()
        );
        Ok(
            dispatch!(self, pool => sqlx::query_scalar(AssertSqlSafe(sql.as_str()))
            .bind(after).bind(limit).fetch_all(pool).await?),
        )
    }

    /// Makes processes older than `max_age_ms` that no lease holds ready now, so the engine
    /// ends them (with its max-age failure) at its next claim instead of after a long
    /// back-off. Returns how many it woke.
    pub async fn wake_overdue_processes(&self, max_age_ms: i64) -> Result<u64> {
        let now = now_millis();
        Ok(dispatch!(self, pool => sqlx::query(
            "UPDATE process_instance SET run_after = $1 WHERE end_time IS NULL AND created < $2 \
             AND run_after > $1 AND (lease_expires IS NULL OR lease_expires < $1)")
            .bind(now).bind(now - max_age_ms).execute(pool).await?.rows_affected()))
    }

    /// Unfinished purge processes with an id up to `up_to`: what a clean-up run waits for
    /// before it deletes.
    pub async fn pending_purges(&self, up_to: i64) -> Result<i64> {
        Ok(dispatch!(self, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM process_instance WHERE end_time IS NULL AND id <= $1 AND process_name LIKE '%.purge'")
            .bind(up_to).fetch_one(pool).await?))
    }

    /// Whether PostgreSQL's autovacuum is off for this server (`SHOW autovacuum`); always
    /// `false` on SQLite, which reuses the pages of deleted rows itself.
    pub async fn autovacuum_off(&self) -> Result<bool> {
        Ok(match &self.pool {
            Pool::Sqlite(_) => false,
            Pool::Postgres(pool) => {
                let value: String = sqlx::query_scalar("SHOW autovacuum")
                    .fetch_one(pool)
                    .await?;
                value.eq_ignore_ascii_case("off")
            }
        })
    }

    /// `VACUUM (ANALYZE)` of one step's table (PostgreSQL; nothing on SQLite), so that the
    /// space of deleted rows is reused when autovacuum does not run.
    pub async fn vacuum(&self, step: &CleanupStep) -> Result<()> {
        if let Pool::Postgres(pool) = &self.pool {
            // VACUUM cannot run in a transaction or a prepared statement: the simple protocol.
            let sql = format!("VACUUM (ANALYZE) {}", step.table);
            sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await?;
        }
        Ok(())
    }

    /// The on-disk size of the database in bytes (SQLite: pages in use; PostgreSQL: the
    /// current schema's tables and indexes).
    pub async fn database_size(&self) -> Result<i64> {
        Ok(match &self.pool {
            Pool::Sqlite(pool) => {
                let pages: i64 = sqlx::query_scalar("PRAGMA page_count").fetch_one(pool).await?;
                let free: i64 = sqlx::query_scalar("PRAGMA freelist_count").fetch_one(pool).await?;
                let size: i64 = sqlx::query_scalar("PRAGMA page_size").fetch_one(pool).await?;
                (pages - free) * size
            }
            Pool::Postgres(pool) => sqlx::query_scalar(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::BIGINT FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'",
            )
            .fetch_one(pool)
            .await?,
        })
    }
}
