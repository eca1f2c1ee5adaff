//! The change log: every published `resource.change`, by stream position, so that a subscriber
//! that reconnects can be sent what it missed.
//!
//! Positions are gap-free and cluster-wide. A batch (one per `resource.change` tick) takes
//! `MAX(position) + 1 …` in one set-based insert while it holds the write lock: SQLite has one
//! writer (`BEGIN IMMEDIATE`), PostgreSQL takes [`CHANGE_LOG_LOCK`] as an advisory transaction
//! lock first. Batches therefore commit in position order: a reader that saw position N never
//! later finds a committed row below N that it did not see. The same transaction trims the log
//! to the newest `retain` positions, so the log never holds more than that many rows.

use serde::Serialize;
use sqlx::{AssertSqlSafe, FromRow};

use super::{Backend, Store};
use crate::Result;
use crate::db::{args, json_ids};

/// The PostgreSQL advisory lock that orders change-log batches across nodes.
pub const CHANGE_LOG_LOCK: i64 = 0x6472_6f76_0005;

/// One change to append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewChange {
    /// When it was published, epoch ms.
    pub time: i64,
    /// The API type, e.g. `container`.
    pub resource_type: String,
    /// The resource's id.
    pub resource_id: i64,
    /// The project whose subscribers may see it; `None`: admin and service keys only.
    pub account_id: Option<i64>,
    /// The event's JSON, without its position.
    pub data: String,
}

/// One logged change, as a replay reads it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct ChangeRow {
    /// Its stream position.
    pub position: i64,
    /// Its project, if any.
    pub account_id: Option<i64>,
    /// The event's JSON, without its position.
    pub data: String,
}

/// The positions the log holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChangeBounds {
    /// The oldest retained position; `None` when the log is empty.
    pub oldest: Option<i64>,
    /// The newest position, 0 when nothing was ever logged.
    pub head: i64,
}

impl ChangeBounds {
    /// Whether every change after `position` is still in the log (and `position` is not ahead
    /// of the head): what a resume from `position` needs.
    pub fn covers(&self, position: i64) -> bool {
        position >= 0
            && position <= self.head
            && self.oldest.is_none_or(|oldest| position >= oldest - 1)
    }
}

/// Whose changes a replay reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeScope {
    /// Every change (admin and service keys).
    All,
    /// The changes of these projects only.
    Accounts(Vec<i64>),
}

#[derive(Serialize)]
struct Row<'a> {
    ord: i64,
    #[serde(flatten)]
    change: &'a NewChange,
}

impl Store {
    /// Appends a batch of changes in one statement and trims the log to the newest `retain`
    /// positions, in one transaction; returns the position of the first change (the others
    /// follow it in order), or `None` for an empty batch.
    pub async fn append_changes(&self, changes: &[NewChange], retain: i64) -> Result<Option<i64>> {
        if changes.is_empty() {
            return Ok(None);
        }
        let rows: Vec<Row<'_>> = changes
            .iter()
            .enumerate()
            .map(|(index, change)| Row {
                ord: index as i64 + 1,
                change,
            })
            .collect();
        let json = serde_json::to_string(&rows).map_err(|error| {
            crate::Error::Corrupt(format!("a change does not serialize: {error}"))
        })?;
        let mut tx = self.pool.begin_write().await?;
        if tx.backend() == Backend::Postgres {
            tx.execute("SELECT pg_advisory_xact_lock($1)", args![CHANGE_LOG_LOCK])
                .await?;
        }
        let source = tx.json_rows(
            1,
            &[
                ("ord", "BIGINT"),
                ("time", "BIGINT"),
                ("resource_type", "TEXT"),
                ("resource_id", "BIGINT"),
                ("account_id", "BIGINT"),
                ("data", "TEXT"),
            ],
        );
        let sql = format!(
            "INSERT INTO change_log (position, time, resource_type, resource_id, account_id, data) \
             SELECT (SELECT COALESCE(MAX(position), 0) FROM change_log) + v.ord, v.time, \
             v.resource_type, v.resource_id, v.account_id, v.data FROM {source} RETURNING position"
        );
        let positions: Vec<(i64,)> = tx.fetch_all(&sql, args![json]).await?;
        let first = positions.iter().map(|(position,)| *position).min();
        let Some(first) = first.filter(|_| positions.len() == changes.len()) else {
            return Err(crate::Error::Conflict(format!(
                "{} of {} changes were logged",
                positions.len(),
                changes.len()
            )));
        };
        let last = first + changes.len() as i64 - 1;
        tx.execute(
            "DELETE FROM change_log WHERE position <= $1",
            args![last - retain.max(1)],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(first))
    }

    /// The oldest and newest positions in the log.
    pub async fn change_bounds(&self) -> Result<ChangeBounds> {
        let (oldest, head): (Option<i64>, Option<i64>) = dispatch!(self, pool => sqlx::query_as(
            "SELECT MIN(position), MAX(position) FROM change_log")
            .fetch_one(pool).await?);
        Ok(ChangeBounds {
            oldest,
            head: head.unwrap_or(0),
        })
    }

    /// Up to `limit` logged changes after `after` in `scope`, oldest first.
    pub async fn changes_after(
        &self,
        after: i64,
        scope: &ChangeScope,
        limit: i64,
    ) -> Result<Vec<ChangeRow>> {
        let (filter, accounts) = match scope {
            ChangeScope::All => (String::new(), None),
            ChangeScope::Accounts(accounts) => (
                format!(" AND account_id IN {}", json_ids(self.backend(), 3)),
                Some(serde_json::to_string(accounts).unwrap_or_else(|_| "[]".to_owned())),
            ),
        };
        let sql = format!(
            "SELECT position, account_id, data FROM change_log WHERE position > $1{filter} \
             ORDER BY position LIMIT $2"
        );
        Ok(dispatch!(self, pool => {
            let query = sqlx::query_as(AssertSqlSafe(sql.as_str())).bind(after).bind(limit.max(1));
            match &accounts {
                Some(accounts) => query.bind(accounts.as_str()),
                None => query,
            }
            .fetch_all(pool)
            .await?
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_cover_what_is_retained_and_nothing_ahead() {
        let empty = ChangeBounds::default();
        assert!(empty.covers(0));
        assert!(!empty.covers(1));
        let bounds = ChangeBounds {
            oldest: Some(11),
            head: 20,
        };
        assert!(bounds.covers(10), "11 onwards are all there");
        assert!(bounds.covers(20));
        assert!(!bounds.covers(9), "10 was trimmed");
        assert!(!bounds.covers(21), "ahead of the head");
        assert!(!bounds.covers(-1));
    }
}
