//! The GDAPI error body (`{type:"error", status, code, message, detail}`).

use serde::{Deserialize, Serialize};

/// An API error as the Rancher v1 API spec renders it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Always `"error"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP status code, repeated in the body for clients that lose it.
    pub status: u16,
    /// A stable machine-readable code, e.g. `NotFound`, `InvalidReference`, `Unauthorized`.
    pub code: String,
    /// A human-readable message.
    pub message: String,
    /// More detail, where there is any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The field an input error is about, as GDAPI's `fieldName`.
    #[serde(default, rename = "fieldName", skip_serializing_if = "Option::is_none")]
    pub field_name: Option<String>,
}

impl ApiErrorBody {
    /// A body with the given status, code and message.
    pub fn new(status: u16, code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiErrorBody {
            kind: "error".to_owned(),
            status,
            code: code.into(),
            message: message.into(),
            detail: None,
            field_name: None,
        }
    }
}
