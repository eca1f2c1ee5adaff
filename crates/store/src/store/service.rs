//! What the service reconciler reads and writes besides processes: the services to look at,
//! their live containers (with their slots and pending processes) and the reconciler's own
//! fields in a service's data.

use serde_json::{Map, Value};
use sqlx::{AssertSqlSafe, FromRow};

use super::Store;
use super::resource::{ResourceRow, select_list};
use crate::Result;
use crate::model::{Resource, ResourceKind};

/// A live (not removed) container of a service, as the reconciler sees it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct ServiceContainer {
    /// The container.
    pub id: i64,
    /// Its service.
    pub service_id: i64,
    /// Its slot (1 to the service's scale).
    pub service_index: Option<i64>,
    /// Its state.
    pub state: String,
    /// The name of its oldest unfinished process, if one holds it.
    pub pending: Option<String>,
}

/// Services asked for at once (one statement's `IN` list).
const CHUNK: usize = 200;

fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Services the reconciler looks at in a full pass, in id order after `after`, at most
    /// `limit`: every service not removed, and removed ones that still have live containers.
    pub async fn services_to_reconcile(&self, after: i64, limit: i64) -> Result<Vec<Resource>> {
        let sql = format!(
            "SELECT {} FROM service r WHERE r.id > $1 AND (r.removed IS NULL OR EXISTS (SELECT 1 FROM instance i \
             WHERE i.service_id = r.id AND i.removed IS NULL AND i.service_index IS NOT NULL)) ORDER BY r.id LIMIT $2",
            select_list(ResourceKind::Service, "r")
        );
        let rows: Vec<ResourceRow> = dispatch!(self, pool => sqlx::query_as(AssertSqlSafe(sql.as_str()))
            .bind(after).bind(limit.clamp(1, 1000)).fetch_all(pool).await?);
        rows.into_iter()
            .map(|row| row.into_resource(ResourceKind::Service))
            .collect()
    }

    /// Services by id, in any state (missing ones are left out).
    pub async fn services_by_id(&self, ids: &[i64]) -> Result<Vec<Resource>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT {} FROM service r WHERE r.id IN ({}) ORDER BY r.id",
                select_list(ResourceKind::Service, "r"),
                placeholders(1, chunk.len())
            );
            let rows: Vec<ResourceRow> = dispatch!(self, pool => {
                let mut query = sqlx::query_as(AssertSqlSafe(sql.as_str()));
                for id in chunk {
                    query = query.bind(*id);
                }
                query.fetch_all(pool).await?
            });
            for row in rows {
                out.push(row.into_resource(ResourceKind::Service)?);
            }
        }
        Ok(out)
    }

    /// The live containers of these services, by service and slot, each with the process that
    /// holds it (if any).
    pub async fn service_containers(&self, service_ids: &[i64]) -> Result<Vec<ServiceContainer>> {
        let mut out = Vec::new();
        for chunk in service_ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT i.id, i.service_id, i.service_index, i.state, \
                 (SELECT p.process_name FROM process_instance p WHERE p.resource_type = 'instance' \
                  AND p.resource_id = i.id AND p.end_time IS NULL ORDER BY p.id LIMIT 1) AS pending \
                 FROM instance i WHERE i.service_id IN ({}) AND i.removed IS NULL AND i.service_index IS NOT NULL \
                 ORDER BY i.service_id, i.service_index, i.id",
                placeholders(1, chunk.len())
            );
            let rows: Vec<ServiceContainer> = dispatch!(self, pool => {
                let mut query = sqlx::query_as(AssertSqlSafe(sql.as_str()));
                for id in chunk {
                    query = query.bind(*id);
                }
                query.fetch_all(pool).await?
            });
            out.extend(rows);
        }
        Ok(out)
    }

    /// Sets `fields` in a resource's data (a `null` value stores `null`), reading and writing
    /// in one transaction so that fields written by others meanwhile (an update's `scale`)
    /// are kept. Returns the resource when its data changed, `None` when it already had those
    /// values or does not exist.
    pub async fn merge_resource_data(
        &self,
        kind: ResourceKind,
        id: i64,
        fields: &Map<String, Value>,
    ) -> Result<Option<Resource>> {
        self.write_fields(kind, id, None, None, fields, true).await
    }
}
