//! The web UI: `/` and `/assets/…` from the embedded assets (crate `drover-web-ui`, feature
//! `web-ui`), and the UI's own pages (`/processes`, `/processes/1pi7`, …) answered with
//! `index.html`, so a reload or a shared link opens the same view.
//!
//! Only the page names in [`PAGES`] fall back to `index.html` with `200`: `/v1/…`, `/healthz`,
//! `/metrics` keep their own answers. Any other path is a `404`: a browser asking for a page
//! (`GET` with `Accept: text/html`, outside `/v1`, `/v2-beta` and `/assets`) gets `index.html`
//! with that status, so the UI shows its own "not found" page ([`unknown_page`]); any other
//! client gets the API's error body.
//! The UI needs no session on the server: it keeps the API key in the browser's session
//! storage and sends it like any client (HTTP Basic; for the subscribe WebSocket, the
//! `Sec-WebSocket-Protocol` credentials that [`crate::auth`] accepts).

use axum::Router;
use axum::routing::get;

use crate::state::AppState;

/// The UI's client-side routes; each and everything under it is answered with `index.html`.
pub const PAGES: &[&str] = &[
    "login",
    "processes",
    "hosts",
    "containers",
    "volumes",
    "services",
    "events",
    "cluster",
    "stacks",
    "settings",
    "apikeys",
];

/// The UI's page, with status `404`, for a browser that asked for a path nothing answers: a
/// `GET`/`HEAD` outside the API and the assets whose `Accept` names `text/html`. `None` for
/// any other request (it gets the API's error body).
pub(super) fn unknown_page(request: &axum::extract::Request) -> Option<axum::response::Response> {
    use axum::http::{Method, header};
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return None;
    }
    let path = request.uri().path();
    let api = ["/v1", "/v2-beta", "/assets"]
        .iter()
        .any(|prefix| path == *prefix || path.starts_with(&format!("{prefix}/")));
    let html = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if api || !html {
        return None;
    }
    serve::not_found_page(request.headers())
}

/// The UI's routes (with the `web-ui` feature off, `/` says how to get it).
pub(super) fn routes() -> Router<AppState> {
    let mut router = Router::new()
        .route("/", get(serve::index))
        .route("/assets/{*path}", get(serve::asset));
    for page in PAGES {
        router = router
            .route(&format!("/{page}"), get(serve::index))
            .route(&format!("/{page}/{{*rest}}"), get(serve::index));
    }
    router
}

#[cfg(feature = "web-ui")]
mod serve {
    use axum::extract::Path;
    use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
    use axum::response::{IntoResponse, Response};

    use crate::error::ApiError;

    /// What a UI page may load and connect to: its own origin only (the WebSocket included),
    /// no inline script, not inside a frame.
    const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
                       frame-ancestors 'none'";

    pub(super) async fn index(headers: HeaderMap) -> Response {
        respond(drover_web_ui::INDEX, &headers)
            .unwrap_or_else(|| ApiError::internal("the web UI has no index.html").into_response())
    }

    /// `index.html` with status `404` (never a `304`: the status is the point).
    pub(super) fn not_found_page(headers: &HeaderMap) -> Option<Response> {
        let mut headers = headers.clone();
        headers.remove(header::IF_NONE_MATCH);
        let mut response = respond(drover_web_ui::INDEX, &headers)?;
        *response.status_mut() = StatusCode::NOT_FOUND;
        Some(response)
    }

    pub(super) async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
        respond(&path, &headers).unwrap_or_else(|| {
            ApiError::not_found(format!("no web UI asset {path:?}")).into_response()
        })
    }

    fn respond(path: &str, headers: &HeaderMap) -> Option<Response> {
        let asset = drover_web_ui::get(path)?;
        let etag = HeaderValue::from_str(&asset.etag).ok()?;
        let fresh = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == asset.etag));
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            asset.bytes.into_owned().into_response()
        };
        let out = response.headers_mut();
        let textual = asset.content_type.starts_with("text/")
            || asset.content_type.ends_with("javascript")
            || asset.content_type.ends_with("+xml");
        let content_type = if textual && !asset.content_type.contains("charset") {
            format!("{}; charset=utf-8", asset.content_type)
        } else {
            asset.content_type.clone()
        };
        if let Ok(content_type) = HeaderValue::from_str(&content_type) {
            out.insert(header::CONTENT_TYPE, content_type);
        }
        // The files are not fingerprinted: revalidate each time (a 304 costs one hash compare).
        out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        out.insert(header::ETAG, etag);
        out.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        out.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        if asset.content_type.starts_with("text/html") {
            out.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            );
            out.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        }
        Some(response)
    }
}

#[cfg(not(feature = "web-ui"))]
mod serve {
    use axum::extract::Path;

    use crate::error::ApiError;

    pub(super) async fn index() -> ApiError {
        ApiError::not_found(
            "this drover was built without the web UI (cargo feature web-ui); the API is at /v1",
        )
    }

    pub(super) async fn asset(Path(_path): Path<String>) -> ApiError {
        index().await
    }

    pub(super) fn not_found_page(
        _headers: &axum::http::HeaderMap,
    ) -> Option<axum::response::Response> {
        None
    }
}
