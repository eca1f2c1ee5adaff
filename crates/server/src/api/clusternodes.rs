//! `/v1/clusternodes`: the nodes of this server's cluster (admins only), with their state,
//! last heartbeat and what each holds: the leader duty, process leases, agent sessions.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use drover_store::NodeRow;
use serde_json::{Value, json};

use super::Base;
use super::render::collection;
use crate::auth::Auth;
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/clusternodes", get(list))
        .route("/v1/clusternodes/{id}", get(get_one))
}

fn render(base: &str, state: &AppState, node: &NodeRow) -> Value {
    let now = drover_proto::event::now_millis();
    let alive = node.state == "alive" && node.lease_until >= now;
    json!({
        "id": node.id,
        "type": "clusterNode",
        "links": {"self": format!("{base}/clusternodes/{}", node.id)},
        "actions": {},
        "name": node.name,
        "state": if alive { "alive" } else { "dead" },
        "epoch": node.epoch,
        "address": node.address,
        "cluster": node.nats == 1,
        "self": node.id == state.cluster.node_id(),
        "started": node.started_at,
        "heartbeat": node.heartbeat_at,
        "leaseUntil": node.lease_until,
        "leader": alive && node.leader > 0,
        "processes": node.processes,
        "agents": node.agents,
    })
}

async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    principal.require_privileged("cluster nodes are for admins")?;
    let data = state
        .store
        .cluster_nodes()
        .await?
        .iter()
        .map(|node| render(&base, &state, node))
        .collect();
    Ok(Json(collection(
        "clusterNode",
        format!("{base}/clusternodes"),
        data,
    )))
}

async fn get_one(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    principal.require_privileged("cluster nodes are for admins")?;
    state
        .store
        .cluster_nodes()
        .await?
        .iter()
        .find(|node| node.id == id)
        .map(|node| Json(render(&base, &state, node)))
        .ok_or_else(|| ApiError::not_found(format!("no cluster node {id:?}")))
}
