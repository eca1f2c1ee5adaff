//! `/v1/apikeys`: list, create and remove API keys.
//!
//! A key authenticates as its account. Admins create keys for any project or user account
//! (`accountId`); everyone else for their own account. The secret is shown once, in the
//! answer to the create.
//!
//! Each create and remove publishes [`APIKEY_CHANGE`] (no secret in it), raw for admins and in
//! the key's account's scope for that account's own keys: the web UI's API keys page refetches on it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use drover_proto::ids;
use drover_store::{AccountKind, Credential, CredentialKind};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::render::{collection, resource, rfc3339};
use super::{ApiJson, Base};
use crate::auth::{Auth, Principal};
use crate::error::ApiError;
use crate::state::AppState;

/// `apikey.change`: an API key was created or removed (`data`: `id`, `change`).
pub const APIKEY_CHANGE: &str = "apikey.change";

/// Announces a create or remove to admins (raw) and to the key's own account.
fn announce(state: &AppState, credential: &Credential, change: &str) {
    let data = json!({"id": ids::format("apiKey", credential.id), "change": change});
    state
        .hub
        .publish(&drover_proto::Event::new(APIKEY_CHANGE).with_data(data.clone()));
    state.hub.publish(
        &drover_proto::Event::new(format!("{APIKEY_CHANGE};account={}", credential.account_id))
            .with_data(data),
    );
}

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/apikeys", get(list).post(create))
        .route("/v1/apikeys/{id}", get(get_one).delete(remove))
        .route(
            "/v1/projects/{project}/apikeys",
            get(list_project).post(create_project),
        )
}

/// The body of a create.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct NewApiKey {
    name: Option<String>,
    description: Option<String>,
    account_id: Option<String>,
}

fn render(base: &str, credential: &Credential, secret: Option<&str>) -> Value {
    let id = ids::format("apiKey", credential.id);
    let mut fields = Map::new();
    fields.insert("kind".into(), json!(credential.kind.as_str()));
    fields.insert("name".into(), json!(credential.name));
    fields.insert("description".into(), json!(credential.description));
    fields.insert(
        "accountId".into(),
        json!(ids::format("account", credential.account_id)),
    );
    fields.insert("publicValue".into(), json!(credential.public_value));
    if let Some(secret) = secret {
        fields.insert("secretValue".into(), json!(secret));
    }
    fields.insert("state".into(), json!(credential.state));
    fields.insert("created".into(), json!(rfc3339(credential.created)));
    fields.insert("createdTS".into(), json!(credential.created));
    let self_link = format!("{base}/apikeys/{id}");
    resource("apiKey", &id, self_link, fields)
}

/// Which keys the caller may see: an admin all, anyone else its own account's.
fn visible(principal: &Principal, credential: &Credential) -> bool {
    principal.is_privileged() || credential.account_id == principal.account.id
}

async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let scope = if principal.is_privileged() {
        None
    } else {
        Some(principal.account.id)
    };
    let data = state
        .store
        .list_keys(scope)
        .await?
        .iter()
        .filter(|credential| {
            credential.kind == CredentialKind::ApiKey && visible(&principal, credential)
        })
        .map(|credential| render(&base, credential, None))
        .collect();
    Ok(Json(collection("apiKey", format!("{base}/apikeys"), data)))
}

async fn list_project(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(project): Path<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let project_id = super::project_id(&state, &project).await?;
    principal.check_project(project_id)?;
    let data = state
        .store
        .list_keys(Some(project_id))
        .await?
        .iter()
        .filter(|credential| credential.kind == CredentialKind::ApiKey)
        .map(|credential| render(&base, credential, None))
        .collect();
    Ok(Json(collection(
        "apiKey",
        format!("{base}/projects/{project}/apikeys"),
        data,
    )))
}

async fn create(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
    ApiJson(body): ApiJson<NewApiKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let account_id = match body.account_id.as_deref() {
        Some(text) => ids::parse("account", text).ok_or_else(|| {
            ApiError::invalid(
                "InvalidReference",
                "accountId",
                format!("{text:?} is not an account id"),
            )
        })?,
        None => principal.account.id,
    };
    create_for(&state, &principal, &base, account_id, body).await
}

async fn create_project(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(project): Path<String>,
    base: Base,
    ApiJson(body): ApiJson<NewApiKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let project_id = super::project_id(&state, &project).await?;
    create_for(&state, &principal, &base, project_id, body).await
}

async fn create_for(
    state: &AppState,
    principal: &Principal,
    base: &Base,
    account_id: i64,
    body: NewApiKey,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if principal.account.kind == AccountKind::Agent {
        return Err(ApiError::forbidden("agent keys cannot create API keys"));
    }
    let account = state
        .store
        .get_account(account_id)
        .await?
        .filter(|account| account.state == "active")
        .ok_or_else(|| {
            ApiError::invalid("InvalidReference", "accountId", "no such active account")
        })?;
    let allowed = if principal.is_privileged() {
        account.kind != AccountKind::Agent
    } else {
        account.id == principal.account.id
    };
    if !allowed {
        return Err(ApiError::forbidden(
            "this key may not create keys for that account",
        ));
    }
    if let Some(name) = &body.name {
        super::text::check_name("name", name)?;
    }
    if let Some(description) = &body.description {
        super::text::check_description("description", description)?;
    }
    let key = state
        .store
        .create_key(
            account.id,
            CredentialKind::ApiKey,
            body.name.as_deref(),
            body.description.as_deref(),
        )
        .await?;
    announce(state, &key.credential, "created");
    Ok((
        StatusCode::CREATED,
        Json(render(base, &key.credential, Some(&key.secret_value))),
    ))
}

async fn find(state: &AppState, principal: &Principal, text: &str) -> Result<Credential, ApiError> {
    let not_found = || ApiError::not_found(format!("no API key {text:?}"));
    let id = ids::parse("apiKey", text).ok_or_else(not_found)?;
    let credential = state.store.get_key(id).await?.ok_or_else(not_found)?;
    if credential.kind != CredentialKind::ApiKey || !visible(principal, &credential) {
        return Err(not_found());
    }
    Ok(credential)
}

async fn get_one(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let credential = find(&state, &principal, &id).await?;
    Ok(Json(render(&base, &credential, None)))
}

async fn remove(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let credential = find(&state, &principal, &id).await?;
    let removed = state
        .store
        .remove_key(credential.id)
        .await?
        .ok_or_else(|| ApiError::not_found("key vanished"))?;
    state.keys.forget(&removed.public_value);
    state.cluster.key_changed(&removed.public_value);
    announce(&state, &removed, "removed");
    Ok(Json(render(&base, &removed, None)))
}
