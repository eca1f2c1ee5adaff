//! `POST /v1/publish`: put an event on the bus.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use drover_proto::{Event, names};
use serde_json::Value;

use super::ApiJson;
use crate::auth::Auth;
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/publish", post(publish))
        .route("/v1/projects/{project}/publish", post(publish_project))
}

async fn publish_project(
    State(state): State<AppState>,
    auth: Auth,
    Path(project): Path<String>,
    body: ApiJson<Event>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let project_id = super::project_id(&state, &project).await?;
    auth.0.check_project(project_id)?;
    publish(State(state), auth, body).await
}

/// Validates and delivers one event in the caller's scope; answers 201 with it.
async fn publish(
    State(state): State<AppState>,
    Auth(principal): Auth,
    ApiJson(mut event): ApiJson<Event>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(name) = event.name.clone().filter(|name| !name.is_empty()) else {
        state.metrics.bad_input.increment(1);
        return Err(ApiError::invalid(
            "MissingRequired",
            "name",
            "an event needs a name",
        ));
    };
    names::validate(&name).map_err(|error| {
        state.metrics.bad_input.increment(1);
        ApiError::invalid("InvalidCharacters", "name", error.to_string())
    })?;
    if !principal.may_publish(&name) {
        return Err(ApiError::forbidden(format!(
            "a key of a {} account may publish reply.* events only, not {name:?}",
            principal.account.kind
        )));
    }
    let origin = principal.origin()?;
    if !principal.is_privileged() {
        // As in the original, ordinary callers do not start calls of their own; and the name
        // goes out in the caller's own scope, whatever suffix it carried.
        event.reply_to = None;
        event.timeout_millis = None;
        event.name = Some(names::base(&name).to_owned());
    }
    event
        .id
        .get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
    event
        .time
        .get_or_insert_with(drover_proto::event::now_millis);
    state.hub.publish_from(&event, &origin);
    let mut body = serde_json::to_value(&event).map_err(ApiError::internal)?;
    if let Value::Object(fields) = &mut body {
        fields.insert("type".into(), Value::String("publish".into()));
    }
    Ok((StatusCode::CREATED, Json(body)))
}
