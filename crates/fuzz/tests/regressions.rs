//! What the fuzz targets found, kept as tests (each also has a `regression-*` corpus entry).

use axum::http::{Method, StatusCode};
use drover_fuzz::api::{Api, check};

/// A known path asked with a method it does not have answered axum's bare 405 with an empty
/// body; it now answers a GDAPI error and keeps the `Allow` header.
#[test]
fn method_not_allowed_has_an_error_body() {
    let api = Api::start();
    for (method, path) in [
        (Method::PATCH, "/v1/containers"),
        (Method::DELETE, "/v1/publish"),
        (Method::PUT, "/v1/processinstances"),
    ] {
        let answer = api.request("project", method.clone(), path, b"{}".to_vec());
        assert_eq!(
            answer.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        check(&method, path, &answer);
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(body["code"], "MethodNotAllowed");
        assert!(
            answer.allow.is_some(),
            "{method} {path} lost its Allow header"
        );
    }
}

/// A path with a percent escape that is not UTF-8 (`%ce` alone) reached axum's `Path`
/// extractor, which answered a plain-text 400; it now answers a GDAPI error.
#[test]
fn path_with_invalid_utf8_has_an_error_body() {
    let api = Api::start();
    for (method, path) in [
        (Method::POST, "/v1/processinstan%ces/1pi1?action=cancel"),
        (Method::GET, "/v1/containers/1i%ff"),
        (Method::GET, "/v1/projects/%c3/containers"),
        (Method::GET, "/v1/settings/%80"),
    ] {
        let answer = api.request("admin", method.clone(), path, Vec::new());
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{method} {path}");
        check(&method, path, &answer);
    }
    // Escapes of UTF-8 are still decoded as before.
    let answer = api.request("admin", Method::GET, "/v1/containers/%31i1", Vec::new());
    check(&Method::GET, "/v1/containers/%31i1", &answer);
}
