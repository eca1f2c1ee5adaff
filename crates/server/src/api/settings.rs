//! `/v1/settings`: every tunable with its value, where it comes from, and what it does.
//! `PUT` stores a value that takes effect at once (readers ask for settings each time they need
//! them); `DELETE` removes the stored value, so the environment's or the default applies again.
//! Both publish [`SETTING_CHANGE`] (raw, for admins: the web UI's Settings page refetches on it).

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::render::collection;
use super::{ApiJson, Base};
use crate::auth::{Auth, Principal};
use crate::error::ApiError;
use crate::settings::{self, DEFINITIONS, SettingError, Source};
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/settings", get(list))
        .route("/v1/settings/{name}", get(get_one).put(put).delete(remove))
}

/// `setting.change`: a stored value was changed or removed (`data`: `name`, `value`, `source`).
pub const SETTING_CHANGE: &str = "setting.change";

/// Announces the setting's new value to admins, on this node (another node's admins learn it
/// when their pages refetch).
fn announce(state: &AppState, rendered: &Value) {
    let data = json!({
        "name": rendered["name"],
        "value": rendered["value"],
        "source": rendered["source"],
    });
    state
        .hub
        .publish(&drover_proto::Event::new(SETTING_CHANGE).with_data(data));
}

fn admin(principal: &Principal) -> Result<(), ApiError> {
    principal.require_privileged("settings are for admins")
}

fn render(base: &str, state: &AppState, name: &str) -> Option<Value> {
    let definition = settings::definition(name)?;
    let (active, source) = state.settings.get(name)?;
    let source_name = match source {
        Source::Default => "Default",
        Source::Environment => "Environment",
        Source::Database => "Database",
    };
    Some(json!({
        "id": definition.name,
        "type": "setting",
        "links": {"self": format!("{base}/settings/{}", definition.name)},
        "actions": {},
        "name": definition.name,
        "value": active,
        "activeValue": active,
        "defaultValue": definition.default,
        "inDb": source == Source::Database,
        "source": source_name,
        "environmentVariable": settings::env_name(definition.name),
        "description": definition.description,
    }))
}

fn unknown(name: &str) -> ApiError {
    ApiError::not_found(format!("no setting {name:?}; GET /v1/settings lists them"))
}

async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    admin(&principal)?;
    let data = DEFINITIONS
        .iter()
        .filter_map(|definition| render(&base, &state, definition.name))
        .collect();
    Ok(Json(collection(
        "setting",
        format!("{base}/settings"),
        data,
    )))
}

async fn get_one(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(name): Path<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    admin(&principal)?;
    render(&base, &state, &name)
        .map(Json)
        .ok_or_else(|| unknown(&name))
}

#[derive(Debug, Deserialize)]
struct NewValue {
    value: Option<Value>,
}

async fn put(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(name): Path<String>,
    base: Base,
    ApiJson(body): ApiJson<NewValue>,
) -> Result<Json<Value>, ApiError> {
    admin(&principal)?;
    let definition = settings::definition(&name).ok_or_else(|| unknown(&name))?;
    let value = match body.value {
        Some(Value::String(text)) => text,
        Some(Value::Number(number)) => number.to_string(),
        _ => {
            return Err(ApiError::invalid(
                "MissingRequired",
                "value",
                "a setting needs a value (string or number)",
            ));
        }
    };
    settings::validate(definition, &value).map_err(|error| match error {
        SettingError::Invalid { reason, .. } => ApiError::invalid(
            "InvalidOption",
            "value",
            format!("{name}: {value:?} is invalid: {reason}"),
        ),
        SettingError::Unknown(_) => unknown(&name),
    })?;
    // Stored first: a value the store did not take never takes effect.
    state
        .store
        .put_setting(definition.name, value.trim())
        .await?;
    state
        .settings
        .set_stored(definition.name, value.trim())
        .map_err(ApiError::internal)?;
    state.cluster.settings_changed();
    tracing::info!(
        setting = definition.name,
        value = value.trim(),
        "setting changed"
    );
    let rendered = render(&base, &state, &name).ok_or_else(|| unknown(&name))?;
    announce(&state, &rendered);
    Ok(Json(rendered))
}

async fn remove(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(name): Path<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    admin(&principal)?;
    let definition = settings::definition(&name).ok_or_else(|| unknown(&name))?;
    state.store.delete_setting(definition.name).await?;
    state.settings.clear_stored(definition.name);
    state.cluster.settings_changed();
    let rendered = render(&base, &state, &name).ok_or_else(|| unknown(&name))?;
    announce(&state, &rendered);
    Ok(Json(rendered))
}
