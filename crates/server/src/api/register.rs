//! Registration: a project's registration tokens, and `POST /v1/register`, with which a host's
//! agent trades a token for its own agent key.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_proto::ids;
use drover_store::{AccountKind, CredentialKind, ResourceKind};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::render::{collection, resource, rfc3339};
use super::{ApiJson, Base};
use crate::auth::{Auth, Principal};
use crate::error::ApiError;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/registrationtokens", get(list).post(create))
        .route(
            "/v1/projects/{project}/registrationtokens",
            get(list_project).post(create_project),
        )
        .route("/v1/register", post(register))
        .route("/v1/projects/{project}/register", post(register))
}

fn may_manage(principal: &Principal) -> Result<(), ApiError> {
    match principal.account.kind {
        AccountKind::Agent | AccountKind::User => Err(ApiError::forbidden(
            "only admin and project keys manage registration tokens",
        )),
        _ => Ok(()),
    }
}

fn render(base: &str, credential: &drover_store::Credential, token: Option<&str>) -> Value {
    let id = ids::format("registrationToken", credential.id);
    let mut fields = Map::new();
    fields.insert(
        "accountId".into(),
        json!(ids::format("project", credential.account_id)),
    );
    fields.insert("name".into(), json!(credential.name));
    fields.insert("state".into(), json!(credential.state));
    fields.insert("created".into(), json!(rfc3339(credential.created)));
    fields.insert("registrationUrl".into(), json!(format!("{base}/register")));
    if let Some(token) = token {
        fields.insert("token".into(), json!(token));
        fields.insert(
            "command".into(),
            json!(format!(
                "drover agent --url {base} --registration-token {token}"
            )),
        );
    }
    resource(
        "registrationToken",
        &id,
        format!("{base}/registrationtokens/{id}"),
        fields,
    )
}

async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    may_manage(&principal)?;
    let project = super::resources::scope(&state, &principal, &Default::default()).await?;
    list_in(&state, project, &base).await
}

async fn list_project(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(project): Path<String>,
    base: Base,
) -> Result<Json<Value>, ApiError> {
    may_manage(&principal)?;
    let project = super::project_id(&state, &project).await?;
    principal.check_project(project)?;
    list_in(&state, project, &base).await
}

async fn list_in(state: &AppState, project: i64, base: &Base) -> Result<Json<Value>, ApiError> {
    let data = state
        .store
        .list_keys(Some(project))
        .await?
        .iter()
        .filter(|key| key.kind == CredentialKind::RegistrationToken)
        .map(|key| render(base, key, None))
        .collect();
    Ok(Json(collection(
        "registrationToken",
        format!("{base}/registrationtokens"),
        data,
    )))
}

async fn create(
    State(state): State<AppState>,
    Auth(principal): Auth,
    base: Base,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    may_manage(&principal)?;
    let project = super::resources::scope(&state, &principal, &Default::default()).await?;
    create_in(&state, project, &base).await
}

async fn create_project(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(project): Path<String>,
    base: Base,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    may_manage(&principal)?;
    let project = super::project_id(&state, &project).await?;
    principal.check_project(project)?;
    create_in(&state, project, &base).await
}

async fn create_in(
    state: &AppState,
    project: i64,
    base: &Base,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = state
        .store
        .create_key(
            project,
            CredentialKind::RegistrationToken,
            Some("registration"),
            None,
        )
        .await?;
    let token = format!("{}:{}", key.credential.public_value, key.secret_value);
    Ok((
        StatusCode::CREATED,
        Json(render(base, &key.credential, Some(&token))),
    ))
}

/// The body of a registration.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Register {
    /// A stable identity of the host (the agent keeps it in its state directory).
    key: Option<String>,
    /// The host's name.
    name: Option<String>,
    /// Host facts to start with.
    host: Option<Map<String, Value>>,
}

/// Authenticates a registration: a registration token (its project), or an admin key.
async fn registrar(state: &AppState, parts: &Parts) -> Result<i64, ApiError> {
    let refuse = |message: &str| {
        state.metrics.auth_failures.increment(1);
        ApiError::unauthorized(message)
    };
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(crate::auth::parse_basic)
        .ok_or_else(|| {
            refuse("registration needs the registration token as HTTP Basic credentials")
        })?;
    let max_age = state.settings.server().auth_cache;
    let principal = state
        .keys
        .verify(&state.store, &header.0, &header.1, max_age)
        .await?
        .ok_or_else(|| refuse("invalid registration token"))?;
    match principal.credential_kind {
        CredentialKind::RegistrationToken => Ok(principal.account.id),
        _ if principal.is_privileged() => Ok(state.default_project.id),
        _ => Err(ApiError::forbidden("register with a registration token")),
    }
}

async fn register(
    State(state): State<AppState>,
    base: Base,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (parts, body) = request.into_parts();
    let project = registrar(&state, &parts).await?;
    if let Some(project_param) = parts
        .uri
        .path()
        .strip_prefix("/v1/projects/")
        .and_then(|rest| rest.split('/').next())
    {
        let asked = super::project_id(&state, project_param).await?;
        if asked != project {
            return Err(ApiError::forbidden(
                "this registration token belongs to another project",
            ));
        }
    }
    let request = axum::extract::Request::from_parts(parts, body);
    let ApiJson(body) =
        <ApiJson<Register> as axum::extract::FromRequest<AppState>>::from_request(request, &state)
            .await?;
    let key = body
        .key
        .filter(|key| !key.trim().is_empty() && key.len() <= 128)
        .ok_or_else(|| {
            ApiError::invalid(
                "MissingRequired",
                "key",
                "a registration needs the host's stable key (1-128 characters)",
            )
        })?;
    let name = body
        .name
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| key.clone());
    super::text::check_name("name", &name)?;
    let plans = [ResourceKind::Agent, ResourceKind::Host].map(|kind| {
        drover_engine::defs::create_plan_with(
            kind,
            &Default::default(),
            &state.external,
            Some(project),
        )
    });
    let registered = state
        .store
        .register_agent(
            project,
            &key,
            &name,
            body.host.unwrap_or_default(),
            &plans[0],
            &plans[1],
            state.engine.node(),
        )
        .await?;
    if registered.created {
        // The plans' pending steps (a step with no `done` state) are what the engine runs.
        for pending in plans
            .iter()
            .filter_map(|plan| plan.last())
            .filter(|s| s.done.is_none())
        {
            state.engine.stats().scheduled_named(&pending.process_name);
        }
    }
    state.changes.changed(&registered.agent, None);
    state.changes.changed(&registered.host, None);
    state.engine.wake();
    tracing::info!(agent = %ids::format("agent", registered.agent.id), new = registered.created, "agent registered");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "type": "register",
            "id": key,
            "key": key,
            "projectId": ids::format("project", project),
            "agentId": ids::format("agent", registered.agent.id),
            "hostId": ids::format("host", registered.host.id),
            "accessKey": registered.key.credential.public_value,
            "secretKey": registered.key.secret_value,
            "url": base.as_str(),
            "links": {"agent": format!("{base}/agents/{}", ids::format("agent", registered.agent.id))},
            "actions": {},
        })),
    ))
}
