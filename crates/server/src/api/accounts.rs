//! `/v1/projects` and `/v1/accounts`: the accounts keys act as.
//!
//! Projects are accounts of kind `project` (the original's environments). Admins create
//! projects and user accounts; everyone sees the project they act in.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use drover_proto::ids;
use drover_store::{Account, AccountKind};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::render::{collection, resource, rfc3339};
use super::{ApiJson, Base};
use crate::auth::Auth;
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/projects", get(list_projects).post(create_project))
        .route("/v1/projects/{project}", get(get_project))
        .route("/v1/accounts", get(list_accounts).post(create_account))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct NewAccount {
    name: Option<String>,
    kind: Option<String>,
    project_id: Option<String>,
}

fn render(base: &str, account: &Account) -> Value {
    let (api_type, path) = match account.kind {
        AccountKind::Project => ("project", "projects"),
        _ => ("account", "accounts"),
    };
    let id = ids::format("account", account.id);
    let mut fields = Map::new();
    fields.insert("name".into(), json!(account.name));
    fields.insert("kind".into(), json!(account.kind.as_str()));
    fields.insert("uuid".into(), json!(account.uuid));
    fields.insert("state".into(), json!(account.state));
    fields.insert("created".into(), json!(rfc3339(account.created)));
    fields.insert("createdTS".into(), json!(account.created));
    if let Some(project) = account.project_id {
        fields.insert("projectId".into(), json!(ids::format("project", project)));
    }
    if let Some(agent) = account.agent_id {
        fields.insert("agentId".into(), json!(ids::format("agent", agent)));
    }
    resource(api_type, &id, format!("{base}/{path}/{id}"), fields)
}

async fn list_projects(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let data = state
        .store
        .list_accounts(AccountKind::Project)
        .await?
        .iter()
        .filter(|project| principal.check_project(project.id).is_ok())
        .map(|project| render(&base, project))
        .collect();
    Ok(Json(collection(
        "project",
        format!("{base}/projects"),
        data,
    )))
}

async fn get_project(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(project): Path<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    let project_id = super::project_id(&state, &project).await?;
    principal
        .check_project(project_id)
        .map_err(|_| ApiError::not_found(format!("no project {project:?}")))?;
    let account = state
        .store
        .get_account(project_id)
        .await?
        .ok_or_else(|| ApiError::not_found("project vanished"))?;
    Ok(Json(render(&base, &account)))
}

async fn create_project(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
    ApiJson(body): ApiJson<NewAccount>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !principal.is_privileged() {
        return Err(ApiError::forbidden("only admins create projects"));
    }
    let name = body
        .name
        .filter(|name| !name.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("MissingRequired", "name", "a project needs a name"))?;
    super::text::check_name("name", &name)?;
    let project = state
        .store
        .create_account(AccountKind::Project, &name, None)
        .await?;
    Ok((StatusCode::CREATED, Json(render(&base, &project))))
}

async fn list_accounts(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    if !principal.is_privileged() {
        return Err(ApiError::forbidden("only admins list accounts"));
    }
    let mut data = Vec::new();
    for kind in [
        AccountKind::Admin,
        AccountKind::Service,
        AccountKind::Project,
        AccountKind::User,
        AccountKind::Agent,
    ] {
        data.extend(
            state
                .store
                .list_accounts(kind)
                .await?
                .iter()
                .map(|account| render(&base, account)),
        );
    }
    Ok(Json(collection(
        "account",
        format!("{base}/accounts"),
        data,
    )))
}

async fn create_account(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
    ApiJson(body): ApiJson<NewAccount>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !principal.is_privileged() {
        return Err(ApiError::forbidden("only admins create accounts"));
    }
    let kind: AccountKind = body
        .kind
        .as_deref()
        .unwrap_or("user")
        .parse()
        .map_err(|error: String| ApiError::invalid("InvalidOption", "kind", error))?;
    let name = body
        .name
        .filter(|name| !name.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("MissingRequired", "name", "an account needs a name"))?;
    super::text::check_name("name", &name)?;
    let project_id = match kind {
        AccountKind::User => {
            let text = body
                .project_id
                .as_deref()
                .map(str::to_owned)
                .unwrap_or_else(|| ids::format("project", state.default_project.id));
            Some(super::project_id(&state, &text).await.map_err(|_| {
                ApiError::invalid(
                    "InvalidReference",
                    "projectId",
                    format!("no project {text:?}"),
                )
            })?)
        }
        AccountKind::Service | AccountKind::Project => None,
        AccountKind::Admin | AccountKind::Agent => {
            return Err(ApiError::invalid(
                "InvalidOption",
                "kind",
                "accounts of kind admin and agent are made by bootstrap and registration",
            ));
        }
    };
    let account = state.store.create_account(kind, &name, project_id).await?;
    Ok((StatusCode::CREATED, Json(render(&base, &account))))
}
