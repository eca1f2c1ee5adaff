//! [`ApiError`]: every failure the HTTP boundary can answer with, rendered as a GDAPI error body.
//!
//! Internal causes (database, I/O) render as a generic message and are logged; client faults
//! carry their detail to the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use drover_proto::api::ApiErrorBody;

/// An error answered to an API client.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    detail: Option<String>,
    field_name: Option<String>,
}

impl ApiError {
    /// An error with a status, a GDAPI code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
            field_name: None,
        }
    }

    /// Adds detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Names the input field the error is about.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field_name = Some(field.into());
        self
    }

    /// 401: no key, or a wrong one.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    /// 403: the key is valid but may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "PermissionDenied", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "NotFound", message)
    }

    /// 400: the request cannot be parsed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// 422: the request parses, but a field is missing or invalid.
    pub fn invalid(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message).with_field(field)
    }

    /// 500, with the cause logged and hidden from the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServerError",
            "internal server error",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<drover_store::Error> for ApiError {
    fn from(error: drover_store::Error) -> Self {
        match error {
            drover_store::Error::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            drover_store::Error::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "Conflict", message)
            }
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ApiErrorBody {
            detail: self.detail,
            field_name: self.field_name,
            ..ApiErrorBody::new(self.status.as_u16(), self.code, self.message)
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"drover\""),
            );
        }
        response
    }
}
