//! Bad input and limits at the edge, on a real server: NUL in text (every backend), oversized
//! WebSocket frames, idempotent creates, the subscriber connection limit, and slow clients.

use std::time::{Duration, Instant};

use drover_test_support::{ADMIN_ACCESS, ADMIN_SECRET, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite;

/// SQLite, and PostgreSQL when configured; in CI (`CI` set) PostgreSQL must be configured, so
/// that its half of a test cannot pass by being skipped.
async fn backends(extra: &[(&str, &str)]) -> Vec<TestServer> {
    let servers = drover_test_support::servers(extra).await;
    if std::env::var_os("CI").is_some() {
        assert_eq!(
            servers.len(),
            2,
            "CI must set DROVER_TEST_POSTGRES_URL: these tests run on PostgreSQL too"
        );
    }
    servers
}

/// A request with the admin key and a raw body; the status and the JSON answer.
async fn raw(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    raw_as(
        server,
        (ADMIN_ACCESS, ADMIN_SECRET),
        method,
        path,
        body,
        headers,
    )
    .await
}

/// A request with a key and a raw body; the status and the JSON answer.
async fn raw_as(
    server: &TestServer,
    (access, secret): (&str, &str),
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", server.url))
        .basic_auth(access, Some(secret));
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// How many containers the admin's default project has now (removed ones too).
async fn containers(server: &TestServer) -> usize {
    let list = server.admin.get("containers?limit=1000").await.unwrap();
    list["data"].as_array().unwrap().len()
}

fn assert_invalid_characters(status: u16, body: &Value, field: &str, what: &str) {
    assert_eq!(status, 422, "{what}: {body}");
    assert_eq!(body["type"], "error", "{what}: {body}");
    assert_eq!(body["code"], "InvalidCharacters", "{what}: {body}");
    assert_eq!(body["fieldName"], field, "{what}: {body}");
    assert!(
        body["message"].as_str().unwrap().contains("NUL"),
        "{what}: {body}"
    );
}

#[tokio::test]
async fn nul_in_any_text_gets_422_naming_the_field_and_nothing_is_stored() {
    for server in backends(&[]).await {
        let backend = format!("{:?}", server.server.state.store.backend());
        let bad_before = server.metric("drover_bad_input_total");
        // JSON bodies: fields the store keeps in columns, in JSON documents, nested, in arrays,
        // in map keys, and in fields no schema names.
        let bodies = [
            (r#"{"name":"a\u0000b","command":["true"]}"#, "name"),
            (
                r#"{"name":"ok","description":"\u0000","command":["true"]}"#,
                "description",
            ),
            (r#"{"name":"ok","command":["sh","-c\u0000"]}"#, "command[1]"),
            (
                r#"{"name":"ok","command":["true"],"labels":{"k\u0000":"v"}}"#,
                "labels.k\\u0000",
            ),
            (
                r#"{"name":"ok","command":["true"],"extra":{"deep":[{"x":"\u0000"}]}}"#,
                "extra.deep[0].x",
            ),
        ];
        for (body, field) in bodies {
            let (status, answer) = raw(
                &server,
                reqwest::Method::POST,
                "/v1/containers",
                Some(body),
                &[],
            )
            .await;
            assert_invalid_characters(status, &answer, field, &format!("{backend} {body}"));
        }
        // An escaped backslash followed by "u0000" is plain text, and is stored.
        let (status, created) = raw(
            &server,
            reqwest::Method::POST,
            "/v1/containers",
            Some(r#"{"name":"back\\u0000slash","command":["true"]}"#),
            &[],
        )
        .await;
        assert_eq!(status, 201, "{backend}: {created}");
        assert_eq!(created["name"], "back\\u0000slash");
        assert_eq!(containers(&server).await, 1, "{backend}: only the good one");

        // Query strings: filters of every list, and the subscribe endpoint's names.
        for (path, field) in [
            ("/v1/containers?name=a%00", "name"),
            ("/v1/containers?name_like=%00%25", "name_like"),
            ("/v1/processinstances?processName=x%00", "processName"),
            ("/v1/containerevents?externalId=%00", "externalId"),
            ("/v1/subscribe?eventNames=ping%00", "eventNames"),
        ] {
            let (status, answer) = raw(&server, reqwest::Method::GET, path, None, &[]).await;
            assert_invalid_characters(status, &answer, field, &format!("{backend} {path}"));
        }
        let (status, answer) = raw(
            &server,
            reqwest::Method::GET,
            "/v1/containers/1i%00",
            None,
            &[],
        )
        .await;
        assert_invalid_characters(status, &answer, "path", &format!("{backend} path"));

        // Events: a published name, and what an agent posts to /v1/containerevents.
        let (status, answer) = raw(
            &server,
            reqwest::Method::POST,
            "/v1/publish",
            Some(r#"{"name":"ping\u0000"}"#),
            &[],
        )
        .await;
        assert_invalid_characters(status, &answer, "name", &format!("{backend} publish"));
        let (_, agent) = server.agent(server.default_project(), "nul-agent").await;
        let error = agent
            .post(
                "containerevents",
                &json!({"externalId": "c1\u{0}", "externalStatus": "start", "reportedHostUuid": "h"}),
            )
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("InvalidCharacters") && error.to_string().contains("422"),
            "{backend}: {error}"
        );
        let events = server.admin.get("containerevents").await.unwrap();
        assert_eq!(
            events["data"].as_array().unwrap().len(),
            0,
            "{backend}: {events}"
        );

        // An action's input.
        let id = created["id"].as_str().unwrap();
        let (status, answer) = raw(
            &server,
            reqwest::Method::POST,
            &format!("/v1/containers/{id}?action=stop"),
            Some(r#"{"reason":"\u0000"}"#),
            &[],
        )
        .await;
        assert_invalid_characters(status, &answer, "reason", &format!("{backend} action"));

        assert_eq!(
            containers(&server).await,
            1,
            "{backend}: nothing more was created"
        );
        assert!(
            server.metric("drover_bad_input_total") >= bad_before + 14.0,
            "{backend}: every refusal is counted"
        );
    }
}

#[tokio::test]
async fn an_oversized_frame_gets_close_1009_with_a_reason() {
    let server = TestServer::start_with(&[("api.max.body.bytes", "1048576")]).await;
    let url = format!("ws://{}/v1/subscribe?eventNames=ping", server.server.addr);
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    let basic = base64_basic(ADMIN_ACCESS, ADMIN_SECRET);
    request
        .headers_mut()
        .insert("authorization", basic.parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let (mut write, mut read) = socket.split();
    // The first ping arrives: the socket is open.
    let first = tokio::time::timeout(Duration::from_secs(10), read.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.is_text(), "{first:?}");
    // A 2 MB frame. The write may fail once the server has closed; the close frame is what
    // counts.
    let writer = tokio::spawn(async move {
        let _ = write
            .send(tungstenite::Message::Binary(vec![7u8; 2 << 20].into()))
            .await;
        write
    });
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match read.next().await {
                Some(Ok(tungstenite::Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame within 10 s")
    .expect("the close frame has a code");
    assert_eq!(u16::from(close.code), 1009);
    assert!(
        close.reason.contains("message too big") && close.reason.contains("1048576"),
        "{}",
        close.reason
    );
    let _ = writer.await;
    assert_eq!(server.metric("drover_oversized_messages_total"), 1.0);
    assert!(server.metric("drover_bad_input_total") >= 1.0);
}

fn base64_basic(access: &str, secret: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{access}:{secret}"))
    )
}

/// Polls `done` every 10 ms for at most 10 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn subscribers_beyond_the_limit_get_503_and_the_api_keeps_answering() {
    let server = TestServer::start_with(&[("api.sub.max.connections", "3")]).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = server
            .admin
            .subscribe(drover_client::Subscribe::names(["ping"]))
            .await
            .unwrap();
        stream.next_event().await.unwrap().unwrap();
        open.push(stream);
    }
    match server
        .admin
        .subscribe(drover_client::Subscribe::names(["ping"]))
        .await
    {
        Err(drover_client::Error::Refused { status, body }) => {
            assert_eq!(status, 503, "{body}");
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["type"], "error");
            assert_eq!(body["code"], "TooManyConnections");
            assert!(
                body["message"].as_str().unwrap().contains("limit of 3"),
                "{body}"
            );
        }
        other => panic!("expected 503, got {other:?}"),
    }
    assert_eq!(server.metric("drover_subscribe_refused_total"), 1.0);
    // The API and the health check are not subscribers: they still answer.
    let health = reqwest::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    server.admin.get("containers").await.unwrap();
    // Closing one frees its slot.
    drop(open.pop());
    let slots = server.server.state.subscriber_slots.clone();
    eventually("the closed socket's slot", || slots.open() == 2).await;
    let mut again = server
        .admin
        .subscribe(drover_client::Subscribe::names(["ping"]))
        .await
        .expect("a slot is free again");
    again.next_event().await.unwrap().unwrap();
    assert_eq!(server.metric("drover_subscribe_refused_total"), 1.0);
}

/// Reads from `tcp` until the server closes it (or `limit` passes): what it sent, and when it
/// closed (None if it did not).
async fn read_until_closed(
    tcp: &mut tokio::net::TcpStream,
    limit: Duration,
) -> (String, Option<Instant>) {
    let mut got = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&got).into(), Some(Instant::now()));
            }
            Ok(Ok(n)) => got.extend_from_slice(&buffer[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into(), None),
        }
    }
}

#[tokio::test]
async fn a_client_sending_headers_a_byte_at_a_time_is_disconnected() {
    let server = TestServer::start_with(&[("api.http.header.timeout.millis", "300")]).await;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\nUser-Agent: slow\r\n\r\n",
        server.server.addr
    );
    // The same request at once is answered: the timeout is what closes the slow one.
    let mut fast = tokio::net::TcpStream::connect(server.server.addr)
        .await
        .unwrap();
    fast.write_all(request.as_bytes()).await.unwrap();
    let mut answer = [0u8; 12];
    fast.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");

    let mut slow = tokio::net::TcpStream::connect(server.server.addr)
        .await
        .unwrap();
    let started = Instant::now();
    // One byte every 100 ms: the headers would be complete after about 6 s.
    let mut closed_while_sending = false;
    for byte in request.as_bytes() {
        if slow.write_all(&[*byte]).await.is_err() {
            closed_while_sending = true;
            break;
        }
        let mut probe = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_while_sending = true;
                break;
            }
            Ok(Ok(_)) => {
                // An error answer (408) before the close is fine.
            }
            Err(_) => {}
        }
    }
    assert!(
        closed_while_sending,
        "the server waited for the whole slow header ({:?})",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed only after {:?}",
        started.elapsed()
    );
    // An idle connection that sends nothing is closed as well.
    let mut idle = tokio::net::TcpStream::connect(server.server.addr)
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "an idle connection is closed");
}

#[tokio::test]
async fn a_body_that_stalls_gets_408_and_its_connection_is_closed() {
    for server in backends(&[("api.http.body.timeout.millis", "300")]).await {
        let basic = base64_basic(ADMIN_ACCESS, ADMIN_SECRET);
        let head = format!(
            "POST /v1/containers HTTP/1.1\r\nHost: {}\r\nAuthorization: {basic}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":\"sta",
            server.server.addr
        );
        let mut tcp = tokio::net::TcpStream::connect(server.server.addr)
            .await
            .unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        let (answer, closed) = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"RequestTimeout\""), "{answer}");
        assert!(answer.contains("api.http.body.timeout.millis"), "{answer}");
        assert!(closed.is_some(), "the connection is closed after the 408");
        assert_eq!(containers(&server).await, 0);

        // An action reads its body raw: the same 408 with our error body.
        let volume = server
            .admin
            .post("volumes", &json!({"name": "stall"}))
            .await
            .unwrap();
        let head = format!(
            "POST /v1/volumes/{}?action=deactivate HTTP/1.1\r\nHost: {}\r\nAuthorization: {basic}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"a",
            volume["id"].as_str().unwrap(),
            server.server.addr
        );
        let mut tcp = tokio::net::TcpStream::connect(server.server.addr)
            .await
            .unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        let (answer, closed) = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"RequestTimeout\""), "{answer}");
        assert!(closed.is_some(), "the connection is closed after the 408");
    }
}

/// A create with an `Idempotency-Key`: status and answer.
async fn create_once(server: &TestServer, key: &str, body: &Value) -> (u16, Value) {
    raw(
        server,
        reqwest::Method::POST,
        "/v1/containers",
        Some(&body.to_string()),
        &[("Idempotency-Key", key)],
    )
    .await
}

#[tokio::test]
async fn a_create_retried_with_its_idempotency_key_answers_the_same_resource() {
    for server in backends(&[]).await {
        let backend = format!("{:?}", server.server.state.store.backend());
        let body = json!({"name": "once", "command": ["sleep", "1"]});
        let (status, first) = create_once(&server, "key-1", &body).await;
        assert_eq!(status, 201, "{backend}: {first}");
        // The same body with its keys in another order is the same request.
        let reordered = json!({"command": ["sleep", "1"], "name": "once"});
        let (status, again) = create_once(&server, "key-1", &reordered).await;
        assert_eq!(status, 201, "{backend}: {again}");
        assert_eq!(again["id"], first["id"], "{backend}");
        assert_eq!(containers(&server).await, 1, "{backend}: no duplicate");

        // The same key with another request is refused and creates nothing.
        let other = json!({"name": "twice", "command": ["sleep", "1"]});
        let (status, refused) = create_once(&server, "key-1", &other).await;
        assert_eq!(status, 422, "{backend}: {refused}");
        assert_eq!(
            refused["code"], "IdempotencyKeyReused",
            "{backend}: {refused}"
        );
        assert_eq!(refused["fieldName"], "Idempotency-Key");
        assert_eq!(containers(&server).await, 1, "{backend}");

        // Keys belong to the caller's account: another project's key of the same name is
        // its own.
        let project = server
            .admin
            .post("projects", &json!({"name": "idem-other"}))
            .await
            .unwrap();
        let key = server
            .admin
            .post(
                &format!("projects/{}/apikeys", project["id"].as_str().unwrap()),
                &json!({}),
            )
            .await
            .unwrap();
        let credentials = (
            key["publicValue"].as_str().unwrap(),
            key["secretValue"].as_str().unwrap(),
        );
        let (status, theirs) = raw_as(
            &server,
            credentials,
            reqwest::Method::POST,
            "/v1/containers",
            Some(&body.to_string()),
            &[("Idempotency-Key", "key-1")],
        )
        .await;
        assert_eq!(status, 201, "{backend}: {theirs}");
        assert_ne!(theirs["id"], first["id"], "{backend}");

        // Malformed keys are refused.
        for key in ["", &"k".repeat(256)] {
            let (status, refused) = create_once(&server, key, &body).await;
            assert_eq!(status, 422, "{backend} {key:?}: {refused}");
            assert_eq!(refused["code"], "InvalidOption");
        }

        // Once the key is older than its time to live it is forgotten: a new create, and
        // table.cleanup deletes it.
        assert_eq!(
            server
                .sql("UPDATE idempotency_key SET created = created - 100000000 WHERE idem_key = 'key-1'")
                .await,
            2,
            "{backend}: one row per account"
        );
        let (status, fresh) = create_once(&server, "key-1", &other).await;
        assert_eq!(status, 201, "{backend}: {fresh}");
        assert_ne!(fresh["id"], first["id"]);
        server
            .admin
            .post("cleanup?action=run", &json!({}))
            .await
            .unwrap();
        eventually_async(&backend, || async {
            server
                .sql("UPDATE idempotency_key SET created = created")
                .await
                == 1
        })
        .await;
    }
}

/// Polls an async condition every 20 ms for at most 20 s.
async fn eventually_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn concurrent_creates_with_one_idempotency_key_make_one_resource() {
    for server in backends(&[]).await {
        let backend = format!("{:?}", server.server.state.store.backend());
        let body = json!({"name": "racer", "command": ["sleep", "1"]});
        let answers = futures_util::future::join_all(
            (0..10).map(|_| create_once(&server, "race-key", &body)),
        )
        .await;
        let first = &answers[0].1["id"];
        for (status, answer) in &answers {
            assert_eq!(*status, 201, "{backend}: {answer}");
            assert_eq!(
                &answer["id"], first,
                "{backend}: every answer names one resource"
            );
        }
        assert_eq!(containers(&server).await, 1, "{backend}: one container");
        assert_eq!(
            server
                .sql("UPDATE process_instance SET priority = priority WHERE process_name = 'instance.create'")
                .await,
            1,
            "{backend}: one create process (the losers rolled theirs back)"
        );
    }
}
