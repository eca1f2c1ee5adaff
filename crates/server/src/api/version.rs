//! One API under two paths: `/v1` and `/v2-beta`.
//!
//! The original served the same API at `/v1` and, from Rancher 1.2, at `/v2-beta`, whose Go
//! client (go-rancher v2) rewrites any `…/v1` base URL to `…/v2-beta` before its first request.
//! [`map`] runs before routing: a request to `/v2-beta/…` is routed as `/v1/…`, and the version
//! it came in under is kept as an [`ApiVersion`] extension. Handlers build every link on
//! [`Base`] (`http://host:port/<version>`), so a response's links stay under the path the
//! request used. Nothing rewrites response bodies.

use std::convert::Infallible;
use std::fmt;

use axum::extract::{FromRequestParts, Request};
use axum::http::header::HOST;
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap, Uri};

/// The path an API request came in under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ApiVersion {
    /// `/v1`: the routes' own path.
    #[default]
    V1,
    /// `/v2-beta`: the same routes, reached through [`map`].
    V2Beta,
}

impl ApiVersion {
    /// Every version, `/v1` first.
    pub const ALL: [ApiVersion; 2] = [ApiVersion::V1, ApiVersion::V2Beta];

    /// The version's id, as the API root shows it: `v1`, `v2-beta`.
    pub fn id(self) -> &'static str {
        match self {
            ApiVersion::V1 => "v1",
            ApiVersion::V2Beta => "v2-beta",
        }
    }

    /// The version's path: `/v1`, `/v2-beta`.
    pub fn path(self) -> &'static str {
        match self {
            ApiVersion::V1 => "/v1",
            ApiVersion::V2Beta => "/v2-beta",
        }
    }

    /// The version a request was routed under (the extension [`map`] sets; `/v1` without it).
    pub fn of(extensions: &Extensions) -> ApiVersion {
        extensions.get::<ApiVersion>().copied().unwrap_or_default()
    }

    /// A routed path (`/v1/…`) as the client sent it, for messages.
    pub fn shown(self, path: &str) -> String {
        match (self, path.strip_prefix(ApiVersion::V1.path())) {
            (ApiVersion::V2Beta, Some(rest)) => format!("{}{rest}", self.path()),
            _ => path.to_owned(),
        }
    }
}

/// The `/v1` path a `/v2-beta` path is routed as: `Some` only for `/v2-beta` itself and paths
/// under `/v2-beta/` (not `/v2-betax`).
fn routed_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix(ApiVersion::V2Beta.path())?;
    (rest.is_empty() || rest.starts_with('/')).then(|| format!("{}{rest}", ApiVersion::V1.path()))
}

/// Routes `/v2-beta/…` as `/v1/…` and records the version; every other request passes as it
/// is (the web UI's paths, `/healthz`, `/metrics`, `/v1/…`). Runs before routing (it wraps the
/// router in [`super::router`]), so every `/v1` route, the fallbacks and the layers see the
/// mapped path.
pub fn map(mut request: Request) -> Request {
    let Some(path) = routed_path(request.uri().path()) else {
        return request;
    };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = request.uri().clone().into_parts();
    // The path came from a valid URI with a prefix of the same characters swapped: it parses.
    let Ok(path_and_query) = path_and_query.parse() else {
        return request;
    };
    parts.path_and_query = Some(path_and_query);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
        request.extensions_mut().insert(ApiVersion::V2Beta);
    }
    request
}

/// `http://host:port/<version>`: the base of every link in a response. Host and scheme come
/// from the request (`Host`, `X-Forwarded-Proto`), the version path from [`ApiVersion`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    url: String,
    version: ApiVersion,
}

impl Base {
    /// The base for a request's headers, under `version`.
    pub fn new(headers: &HeaderMap, version: ApiVersion) -> Base {
        let host = headers
            .get(HOST)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("localhost");
        let scheme = headers
            .get("x-forwarded-proto")
            .and_then(|value| value.to_str().ok())
            .filter(|proto| *proto == "https" || *proto == "http")
            .unwrap_or("http");
        Base {
            url: format!("{scheme}://{host}{}", version.path()),
            version,
        }
    }

    /// The base of a request.
    pub fn of(parts: &Parts) -> Base {
        Base::new(&parts.headers, ApiVersion::of(&parts.extensions))
    }

    /// The version the request came in under.
    pub fn version(&self) -> ApiVersion {
        self.version
    }

    /// `http://host:port/<version>`, without a trailing slash.
    pub fn as_str(&self) -> &str {
        &self.url
    }
}

impl std::ops::Deref for Base {
    type Target = str;

    fn deref(&self) -> &str {
        &self.url
    }
}

impl fmt::Display for Base {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Base {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Base::of(parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_beta_paths_are_routed_as_v1() {
        let mapped = |uri: &str| {
            let request = map(Request::builder()
                .uri(uri)
                .body(Default::default())
                .unwrap());
            (
                request.uri().to_string(),
                ApiVersion::of(request.extensions()),
            )
        };
        assert_eq!(mapped("/v2-beta"), ("/v1".into(), ApiVersion::V2Beta));
        assert_eq!(mapped("/v2-beta/"), ("/v1/".into(), ApiVersion::V2Beta));
        assert_eq!(
            mapped("/v2-beta/projects/1a5/containers?name=a%20b&limit=2"),
            (
                "/v1/projects/1a5/containers?name=a%20b&limit=2".into(),
                ApiVersion::V2Beta
            )
        );
        assert_eq!(mapped("/v2-betax"), ("/v2-betax".into(), ApiVersion::V1));
        assert_eq!(
            mapped("/v1/containers"),
            ("/v1/containers".into(), ApiVersion::V1)
        );
        assert_eq!(mapped("/processes"), ("/processes".into(), ApiVersion::V1));
        assert_eq!(ApiVersion::V2Beta.shown("/v1/x"), "/v2-beta/x");
        assert_eq!(ApiVersion::V1.shown("/v1/x"), "/v1/x");
    }

    #[test]
    fn the_base_carries_the_version() {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, "h:1".parse().unwrap());
        assert_eq!(
            Base::new(&headers, ApiVersion::V1).as_str(),
            "http://h:1/v1"
        );
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(
            Base::new(&headers, ApiVersion::V2Beta).to_string(),
            "https://h:1/v2-beta"
        );
    }
}
