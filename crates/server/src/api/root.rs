//! `GET /v1`: the API root, with links to every collection.

use axum::Json;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use serde_json::json;

use super::base_url;
use crate::auth::Auth;

/// `GET /v1`.
pub async fn root(_auth: Auth, headers: HeaderMap) -> impl IntoResponse {
    let base = base_url(&headers);
    let v1 = format!("{base}/v1");
    let ws = v1.replacen("http", "ws", 1);
    Json(json!({
            "type": "apiVersion",
            "id": "v1",
            "links": {
                "self": v1,
                "schemas": format!("{v1}/schemas"),
                "subscribe": format!("{ws}/subscribe"),
                "publish": format!("{v1}/publish"),
                "apiKeys": format!("{v1}/apikeys"),
                "projects": format!("{v1}/projects"),
                "accounts": format!("{v1}/accounts"),
                "containers": format!("{v1}/containers"),
                "volumes": format!("{v1}/volumes"),
                "hosts": format!("{v1}/hosts"),
                "agents": format!("{v1}/agents"),
                "stacks": format!("{v1}/stacks"),
                "services": format!("{v1}/services"),
                "processInstances": format!("{v1}/processinstances"),
                "processExecutions": format!("{v1}/processexecutions"),
                "processSummary": format!("{v1}/processsummary"),
            },
            "actions": {},
    }))
}
