//! `GET /v1` (and `GET /v2-beta`): the API root, with links to every collection.

use axum::Json;
use axum::response::IntoResponse;
use serde_json::json;

use super::Base;
use crate::auth::Auth;

/// `GET /v1`, `GET /v2-beta`.
pub async fn root(_auth: Auth, base: Base) -> impl IntoResponse {
    let ws = base.replacen("http", "ws", 1);
    Json(json!({
            "type": "apiVersion",
            "id": base.version().id(),
            "links": {
                "self": base.as_str(),
                "schemas": format!("{base}/schemas"),
                "subscribe": format!("{ws}/subscribe"),
                "publish": format!("{base}/publish"),
                "apiKeys": format!("{base}/apikeys"),
                "projects": format!("{base}/projects"),
                "accounts": format!("{base}/accounts"),
                "containers": format!("{base}/containers"),
                "volumes": format!("{base}/volumes"),
                "hosts": format!("{base}/hosts"),
                "agents": format!("{base}/agents"),
                "stacks": format!("{base}/stacks"),
                "services": format!("{base}/services"),
                "processInstances": format!("{base}/processinstances"),
                "processExecutions": format!("{base}/processexecutions"),
                "processSummary": format!("{base}/processsummary"),
            },
            "actions": {},
    }))
}
