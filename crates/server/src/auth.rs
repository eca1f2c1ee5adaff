//! Authentication (HTTP Basic with an access key and secret key) and the access policy.
//!
//! Checking a key must stay cheap at thousands of requests per second: a verified key is kept
//! in [`KeyCache`] with its SHA-256 digest, so a request costs one hash and a constant-time
//! compare, not a database round trip.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use drover_proto::names::Qualifier;
use drover_store::secret::{self, SecretHash};
use drover_store::{Account, AccountKind, Credential, CredentialKind, Store};

use crate::error::ApiError;
use crate::hub::Origin;
use crate::state::AppState;

/// Who is calling: the key's account.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The account the key authenticates as.
    pub account: Account,
    /// The key's credential id.
    pub credential_id: i64,
    /// The key's kind.
    pub credential_kind: CredentialKind,
}

impl Principal {
    /// Whether this caller may see and do everything (admin and service accounts).
    pub fn is_privileged(&self) -> bool {
        self.account.kind.is_privileged()
    }

    /// Checks that the caller is an admin or service account; `what` completes the refusal
    /// ("only admins replay or cancel processes").
    pub fn require_privileged(&self, what: &str) -> Result<(), ApiError> {
        if self.is_privileged() {
            Ok(())
        } else {
            Err(ApiError::forbidden(what.to_owned()))
        }
    }

    /// Checks that the caller may act in a project: privileged accounts in every project,
    /// others in their own only.
    pub fn check_project(&self, project_id: i64) -> Result<(), ApiError> {
        if self.is_privileged() || self.account.default_project() == Some(project_id) {
            Ok(())
        } else {
            Err(ApiError::forbidden("this key may not act in that project"))
        }
    }

    /// The scope of a subscription: how its names are qualified.
    ///
    /// `project` is the project of a `/v1/projects/{id}/subscribe` URL; `agent_id` the
    /// `agentId` parameter. Agent keys always get their own agent, whatever they ask for;
    /// privileged keys may subscribe raw, or on an agent's or a project's behalf.
    pub fn subscription_scope(
        &self,
        project: Option<i64>,
        agent_id: Option<i64>,
    ) -> Result<Qualifier, ApiError> {
        if let Some(project) = project {
            self.check_project(project)?;
        }
        match self.account.kind {
            AccountKind::Agent => {
                let own = self
                    .account
                    .agent_id
                    .ok_or_else(|| ApiError::forbidden("this agent account has no agent"))?;
                match agent_id {
                    Some(asked) if asked != own => Err(ApiError::forbidden(format!(
                        "agentId {asked} is not this key's agent; an agent key subscribes for its own agent only"
                    ))),
                    // A container agent with the environment role listens as its project.
                    None if self.account.role.as_deref() == Some("environment") => self
                        .account
                        .project_id
                        .map(Qualifier::Account)
                        .ok_or_else(|| {
                            ApiError::forbidden("this agent account belongs to no project")
                        }),
                    _ => Ok(Qualifier::Agent(own)),
                }
            }
            AccountKind::Admin | AccountKind::Service => Ok(match (agent_id, project) {
                (Some(agent), _) => Qualifier::Agent(agent),
                (None, Some(project)) => Qualifier::Account(project),
                (None, None) => Qualifier::Raw,
            }),
            AccountKind::Project | AccountKind::User => {
                if agent_id.is_some() {
                    return Err(ApiError::forbidden(
                        "only agent and admin keys may pass agentId",
                    ));
                }
                let project = self
                    .account
                    .default_project()
                    .ok_or_else(|| ApiError::forbidden("this account belongs to no project"))?;
                Ok(Qualifier::Account(project))
            }
        }
    }

    /// Who the caller is as a publisher: the scope its published names are qualified into
    /// (the same as its subscriptions') and what replies it may give. Admin and service keys
    /// publish raw and may answer any call.
    pub fn origin(&self) -> Result<Origin, ApiError> {
        if self.is_privileged() {
            return Ok(Origin::PRIVILEGED);
        }
        Ok(Origin {
            scope: self.subscription_scope(None, None)?,
            agent: self.account.agent_id,
            project: self.account.default_project(),
        })
    }

    /// Whether the caller may publish an event of this name: privileged accounts any name,
    /// everyone else replies (`reply.*`) only.
    pub fn may_publish(&self, name: &str) -> bool {
        self.is_privileged() || name.starts_with(drover_proto::event::REPLY_PREFIX)
    }
}

struct Entry {
    digest: SecretHash,
    principal: Arc<Principal>,
    fetched: Instant,
}

/// Verified keys, by access key.
#[derive(Clone, Default)]
pub struct KeyCache {
    entries: Arc<RwLock<HashMap<String, Entry>>>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").finish_non_exhaustive()
    }
}

/// The most keys cached; past it the cache starts over (a bound, not an expected size).
const MAX_CACHED_KEYS: usize = 100_000;

impl KeyCache {
    /// Verifies an access key and secret, from the cache when it is fresh, else from the store.
    pub async fn verify(
        &self,
        store: &Store,
        access_key: &str,
        secret_key: &str,
        max_age: Duration,
    ) -> Result<Option<Arc<Principal>>, drover_store::Error> {
        {
            let entries = self
                .entries
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(entry) = entries.get(access_key)
                && entry.fetched.elapsed() < max_age
            {
                return Ok(
                    secret::verify(secret_key, &entry.digest).then(|| entry.principal.clone())
                );
            }
        }
        let Some((credential, digest, account)) = store.lookup_key(access_key).await? else {
            self.forget(access_key);
            return Ok(None);
        };
        let principal = Arc::new(principal_of(credential, account));
        let verified = secret::verify(secret_key, &digest);
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= MAX_CACHED_KEYS {
            entries.clear();
        }
        entries.insert(
            access_key.to_owned(),
            Entry {
                digest,
                principal: principal.clone(),
                fetched: Instant::now(),
            },
        );
        Ok(verified.then_some(principal))
    }

    /// Drops a key from the cache (it was removed or changed).
    pub fn forget(&self, access_key: &str) {
        self.entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(access_key);
    }
}

fn principal_of(credential: Credential, account: Account) -> Principal {
    Principal {
        account,
        credential_id: credential.id,
        credential_kind: credential.kind,
    }
}

/// Splits an `Authorization: Basic …` header into access key and secret key.
pub fn parse_basic(header: &str) -> Option<(String, String)> {
    let encoded = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (access, secret) = text.split_once(':')?;
    Some((access.to_owned(), secret.to_owned()))
}

/// Authenticates a request from its parts.
pub async fn authenticate(state: &AppState, parts: &Parts) -> Result<Arc<Principal>, ApiError> {
    let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        state.metrics.auth_failures.increment(1);
        ApiError::unauthorized("an API key is required (HTTP Basic auth)")
    })?;
    let (access_key, secret_key) = header.to_str().ok().and_then(parse_basic).ok_or_else(|| {
        state.metrics.auth_failures.increment(1);
        ApiError::unauthorized(
            "malformed Authorization header: expected Basic base64(accessKey:secretKey)",
        )
    })?;
    verify_key(state, &access_key, &secret_key).await
}

/// The WebSocket subprotocol a browser offers beside its credentials (see
/// [`authenticate_socket`]); the server selects it, so the handshake completes.
pub const WS_PROTOCOL: &str = "drover.v1";

/// The subprotocol that carries credentials: `drover.basic.<base64url(accessKey:secretKey)>`,
/// unpadded (`=` is not allowed in a protocol name).
pub const WS_CREDENTIALS_PREFIX: &str = "drover.basic.";

/// Finds the credentials in a `Sec-WebSocket-Protocol` header, and whether [`WS_PROTOCOL`] was
/// offered too. `None` when no protocol carries credentials.
pub fn parse_protocol_credentials(header: &str) -> Option<(Option<(String, String)>, bool)> {
    let protocols: Vec<&str> = header.split(',').map(str::trim).collect();
    let encoded = protocols
        .iter()
        .find_map(|protocol| protocol.strip_prefix(WS_CREDENTIALS_PREFIX))?;
    let credentials = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| {
            let (access, secret) = text.split_once(':')?;
            Some((access.to_owned(), secret.to_owned()))
        });
    Some((credentials, protocols.contains(&WS_PROTOCOL)))
}

/// Authenticates a WebSocket handshake: HTTP Basic as everywhere, or, for browsers (whose
/// WebSocket API cannot set `Authorization`), the same key in `Sec-WebSocket-Protocol` as
/// `drover.basic.<base64url(accessKey:secretKey)>` offered together with [`WS_PROTOCOL`],
/// which the server echoes. This is how Kubernetes takes bearer tokens from browsers; the key
/// never goes into the URL, where access logs and browser history would keep it.
pub async fn authenticate_socket(
    state: &AppState,
    parts: &Parts,
) -> Result<Arc<Principal>, ApiError> {
    if parts.headers.contains_key(AUTHORIZATION) {
        return authenticate(state, parts).await;
    }
    let offered = parts
        .headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    match parse_protocol_credentials(&offered) {
        None => authenticate(state, parts).await,
        Some((None, _)) => {
            state.metrics.auth_failures.increment(1);
            Err(ApiError::unauthorized(
                "malformed credentials protocol: expected drover.basic.<base64url(accessKey:secretKey)>",
            ))
        }
        Some((Some(_), false)) => {
            state.metrics.bad_input.increment(1);
            Err(ApiError::bad_request(format!(
                "a WebSocket that sends its key as a subprotocol must offer {WS_PROTOCOL:?} too, which the server selects"
            )))
        }
        Some((Some((access_key, secret_key)), true)) => {
            verify_key(state, &access_key, &secret_key).await
        }
    }
}

async fn verify_key(
    state: &AppState,
    access_key: &str,
    secret_key: &str,
) -> Result<Arc<Principal>, ApiError> {
    let refuse = |message: &str| {
        state.metrics.auth_failures.increment(1);
        ApiError::unauthorized(message)
    };
    let max_age = state.settings.server().auth_cache;
    let principal = state
        .keys
        .verify(&state.store, access_key, secret_key, max_age)
        .await?;
    let principal = principal.ok_or_else(|| refuse("invalid API key"))?;
    // A registration token may only register agents (issue: registration); it is no API key.
    if principal.credential_kind == CredentialKind::RegistrationToken {
        return Err(refuse("a registration token is not an API key"));
    }
    Ok(principal)
}

/// The authenticated caller, as a handler argument.
#[derive(Debug, Clone)]
pub struct Auth(pub Arc<Principal>);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        authenticate(state, parts).await.map(Auth)
    }
}

/// The authenticated caller of a WebSocket handshake (see [`authenticate_socket`]).
#[derive(Debug, Clone)]
pub struct SocketAuth(pub Arc<Principal>);

impl FromRequestParts<AppState> for SocketAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        authenticate_socket(state, parts).await.map(SocketAuth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(
        kind: AccountKind,
        id: i64,
        project_id: Option<i64>,
        agent_id: Option<i64>,
    ) -> Principal {
        Principal {
            account: Account {
                id,
                name: None,
                kind,
                uuid: String::new(),
                state: "active".into(),
                created: 0,
                project_id,
                agent_id,
                role: None,
            },
            credential_id: 1,
            credential_kind: CredentialKind::ApiKey,
        }
    }

    #[test]
    fn agent_keys_are_pinned_to_their_agent() {
        let agent = principal(AccountKind::Agent, 9, Some(2), Some(5));
        assert_eq!(
            agent.subscription_scope(None, None).unwrap(),
            Qualifier::Agent(5)
        );
        assert_eq!(
            agent.subscription_scope(None, Some(5)).unwrap(),
            Qualifier::Agent(5)
        );
        assert_eq!(
            agent
                .subscription_scope(None, Some(6))
                .unwrap_err()
                .status()
                .as_u16(),
            403
        );
        assert_eq!(
            agent
                .subscription_scope(Some(3), None)
                .unwrap_err()
                .status()
                .as_u16(),
            403
        );
        assert!(!agent.may_publish("compute.instance.activate"));
        assert!(agent.may_publish("reply.123"));
    }

    #[test]
    fn projects_see_their_own_project_only() {
        let project = principal(AccountKind::Project, 2, None, None);
        assert_eq!(
            project.subscription_scope(None, None).unwrap(),
            Qualifier::Account(2)
        );
        assert_eq!(
            project.subscription_scope(Some(2), None).unwrap(),
            Qualifier::Account(2)
        );
        assert_eq!(
            project
                .subscription_scope(Some(3), None)
                .unwrap_err()
                .status()
                .as_u16(),
            403
        );
        assert_eq!(
            project
                .subscription_scope(None, Some(1))
                .unwrap_err()
                .status()
                .as_u16(),
            403
        );
        let admin = principal(AccountKind::Admin, 1, None, None);
        assert_eq!(
            admin.subscription_scope(None, None).unwrap(),
            Qualifier::Raw
        );
        assert_eq!(
            admin.subscription_scope(Some(3), None).unwrap(),
            Qualifier::Account(3)
        );
        assert_eq!(
            admin.subscription_scope(None, Some(4)).unwrap(),
            Qualifier::Agent(4)
        );
        assert!(admin.may_publish("anything"));
    }

    #[test]
    fn protocol_credentials_parse() {
        // base64url("AK:S/K?") without padding: "/" and "?" make "+"/"/" in plain base64.
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("AK:S/K?>");
        assert!(!encoded.contains('='));
        let header = format!("drover.v1, drover.basic.{encoded}");
        assert_eq!(
            parse_protocol_credentials(&header),
            Some((Some(("AK".into(), "S/K?>".into())), true))
        );
        assert_eq!(
            parse_protocol_credentials(&format!("drover.basic.{encoded}")),
            Some((Some(("AK".into(), "S/K?>".into())), false))
        );
        assert_eq!(
            parse_protocol_credentials("drover.v1, drover.basic.!!"),
            Some((None, true))
        );
        assert_eq!(parse_protocol_credentials("drover.v1, chat"), None);
    }

    #[test]
    fn basic_header_parses() {
        assert_eq!(
            parse_basic("Basic QUs6U0s="),
            Some(("AK".into(), "SK".into()))
        );
        assert_eq!(parse_basic("Bearer x"), None);
        assert_eq!(parse_basic("Basic !!!"), None);
    }
}
