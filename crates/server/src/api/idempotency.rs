//! `Idempotency-Key` on creates: `POST /v1/<collection>` with the header answers a retry with
//! the resource the first request made (same id, same status), never a second one. The key is
//! recorded in the store in the transaction that creates the resource
//! ([`drover_store::Store::create_and_schedule_once`]), per account of the calling key, for
//! `api.idempotency.ttl.seconds`; the same key with another request gets
//! `422 IdempotencyKeyReused`.

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use drover_store::{IdempotencyKey, Idempotent};
use serde_json::{Map, Value};

use super::Base;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// The header.
pub const HEADER: &str = "idempotency-key";
/// The longest key accepted, in characters.
pub const MAX_LEN: usize = 255;

/// A create's key, checked, with the digest of what it asks for.
#[derive(Debug)]
pub(super) struct Key {
    account_id: i64,
    key: String,
    fingerprint: String,
    ttl_ms: i64,
}

impl Key {
    /// The key as the store takes it.
    pub(super) fn store(&self) -> IdempotencyKey<'_> {
        IdempotencyKey {
            account_id: self.account_id,
            key: &self.key,
            fingerprint: &self.fingerprint,
            ttl_ms: self.ttl_ms,
        }
    }
}

/// The request's `Idempotency-Key`, if it sent one: 1 to [`MAX_LEN`] visible ASCII
/// characters, else 422.
pub(super) fn key(
    state: &AppState,
    headers: &HeaderMap,
    principal: &Principal,
    collection: &str,
    project: i64,
    body: &Map<String, Value>,
) -> Result<Option<Key>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|key| !key.is_empty() && key.len() <= MAX_LEN)
        .ok_or_else(|| {
            state.metrics.bad_input.increment(1);
            ApiError::invalid(
                "InvalidOption",
                "Idempotency-Key",
                format!("Idempotency-Key must be 1 to {MAX_LEN} visible ASCII characters"),
            )
        })?;
    let request = format!(
        "{collection}\n{project}\n{}",
        sorted(&Value::Object(body.clone()))
    );
    Ok(Some(Key {
        account_id: principal.account.id,
        key: key.to_owned(),
        fingerprint: drover_store::secret::hash_hex(&request),
        ttl_ms: i64::try_from(state.settings.server().idempotency_ttl.as_millis())
            .unwrap_or(i64::MAX),
    }))
}

/// The answer to a create whose key was used before: the resource that request made, as a
/// create answers (201), or why not.
pub(super) fn answer(
    state: &AppState,
    base: &Base,
    found: Idempotent,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    match found {
        Idempotent::Created(scheduled) => Ok((
            StatusCode::CREATED,
            Json(super::resources::render(base, &scheduled.resource)),
        )),
        Idempotent::Existing(Some(resource)) => Ok((
            StatusCode::CREATED,
            Json(super::resources::render(base, &resource)),
        )),
        Idempotent::Existing(None) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            "the resource created with this Idempotency-Key has since been deleted",
        )),
        Idempotent::Mismatch => {
            state.metrics.bad_input.increment(1);
            Err(ApiError::invalid(
                "IdempotencyKeyReused",
                "Idempotency-Key",
                "this Idempotency-Key was used for a different request; use a new key for a new request",
            )
            .with_detail(format!(
                "keys are remembered for {} s (api.idempotency.ttl.seconds)",
                state.settings.server().idempotency_ttl.as_secs()
            )))
        }
    }
}

/// A JSON value with every object's keys in order, so that a digest does not depend on the
/// order a client wrote them in.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(key, item)| (key.clone(), sorted(item)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}
