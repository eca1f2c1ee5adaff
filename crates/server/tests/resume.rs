//! The resumable change stream: `data.position` on every `resource.change`, `?resumeFrom=`
//! replays what a subscriber missed (in order, then the live stream without duplicates), a
//! position the change log no longer retains gets `410`, and a project's key never gets
//! another project's changes back. Both backends.

use std::collections::HashSet;
use std::time::Duration;

use drover_client::{Client, Error, Event, EventStream, Subscribe};
use drover_test_support::{ADMIN_ACCESS, ADMIN_SECRET, TestServer, servers};
use serde_json::json;

/// Creates a stack (a create with no agent step: one change each) and returns its id.
async fn stack(client: &Client, name: &str) -> String {
    let created = client.post("stacks", &json!({"name": name})).await.unwrap();
    created["id"].as_str().unwrap().to_owned()
}

/// Subscribes to `resource.change` and waits for the greeting `ping`: the socket is
/// registered and, when it resumes, the replay comes next.
async fn changes(client: &Client, subscribe: Subscribe) -> EventStream {
    let mut stream = client.subscribe(subscribe).await.unwrap();
    let first = stream.next_event().await.unwrap().unwrap();
    assert_eq!(first.name(), "ping", "the first frame is the greeting");
    stream
}

/// The next `resource.change`: its resource id and position.
async fn next_change(stream: &mut EventStream) -> (String, i64) {
    let event: Event = tokio::time::timeout(Duration::from_secs(20), stream.next_non_ping())
        .await
        .expect("a resource.change within 20 s")
        .unwrap()
        .expect("an open stream");
    assert_eq!(event.name(), "resource.change");
    let position = event.data.as_ref().unwrap()["position"]
        .as_i64()
        .unwrap_or_else(|| panic!("no data.position in {event:?}"));
    (event.resource_id.unwrap(), position)
}

/// Reads changes until every id in `ids` has been seen; returns all it read, in order.
async fn until_seen(stream: &mut EventStream, ids: &[String]) -> Vec<(String, i64)> {
    let mut waiting: HashSet<&String> = ids.iter().collect();
    let mut seen = Vec::new();
    while !waiting.is_empty() {
        let change = next_change(stream).await;
        waiting.remove(&change.0);
        seen.push(change);
    }
    seen
}

fn assert_increasing(changes: &[(String, i64)]) {
    for pair in changes.windows(2) {
        assert!(pair[0].1 < pair[1].1, "positions out of order: {changes:?}");
    }
}

#[tokio::test]
async fn a_subscriber_that_missed_100_changes_gets_exactly_those_in_order_then_live_ones() {
    for server in servers(&[]).await {
        let admin = &server.admin;
        let mut observer = changes(admin, Subscribe::names(["resource.change"])).await;
        let mut away = changes(admin, Subscribe::names(["resource.change"])).await;
        let first = stack(admin, "first").await;
        let (id, last_seen) = next_change(&mut away).await;
        assert_eq!(id, first);
        away.close().await.unwrap();

        let mut missed = Vec::new();
        for n in 0..100 {
            missed.push(stack(admin, &format!("missed-{n}")).await);
        }
        let expected: Vec<(String, i64)> = until_seen(&mut observer, &missed)
            .await
            .into_iter()
            .filter(|(_, position)| *position > last_seen)
            .collect();
        assert_eq!(expected.len(), 100, "{expected:?}");
        assert_increasing(&expected);
        let ids: HashSet<&String> = expected.iter().map(|(id, _)| id).collect();
        assert_eq!(ids, missed.iter().collect());

        let mut back = changes(
            admin,
            Subscribe::names(["resource.change"]).resume_from(last_seen),
        )
        .await;
        let mut replayed = Vec::new();
        for _ in 0..expected.len() {
            replayed.push(next_change(&mut back).await);
        }
        assert_eq!(replayed, expected, "exactly the missed changes, in order");
        // Then the live stream, with nothing replayed twice before it.
        let live = stack(admin, "live").await;
        let (id, position) = next_change(&mut back).await;
        assert_eq!(id, live, "the next event after the replay is the live one");
        assert!(position > expected.last().unwrap().1);
    }
}

#[tokio::test]
async fn a_resume_from_a_position_no_longer_retained_gets_410_and_the_head() {
    for server in servers(&[("resource.change.retain.count", "10")]).await {
        let admin = &server.admin;
        let mut observer = changes(admin, Subscribe::names(["resource.change"])).await;
        let start = observer
            .stream_position()
            .expect("the handshake names the head");
        let mut made = Vec::new();
        for n in 0..20 {
            made.push(stack(admin, &format!("s-{n}")).await);
        }
        let seen = until_seen(&mut observer, &made).await;
        let head = seen.last().unwrap().1;
        assert!(
            server
                .server
                .state
                .store
                .count_rows("change_log")
                .await
                .unwrap()
                <= 10,
            "the log is trimmed to resource.change.retain.count"
        );

        match admin
            .subscribe(Subscribe::names(["resource.change"]).resume_from(start))
            .await
        {
            Err(Error::Relist { head: got, body }) => {
                assert_eq!(got, head);
                let body: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(body["status"], 410);
                assert_eq!(body["code"], "ResumeTooOld");
                assert!(body["message"].as_str().unwrap().contains("re-list"));
                assert_eq!(
                    body["detail"],
                    format!(
                        "oldest retained position: {}; head position: {head}",
                        head - 9
                    )
                );
            }
            other => panic!("expected 410 ResumeTooOld, got {other:?}"),
        }
        match admin
            .subscribe(Subscribe::names(["resource.change"]).resume_from(head + 1))
            .await
        {
            Err(Error::Relist { head: got, body }) => {
                assert_eq!(got, head);
                assert!(body.contains("ResumeAhead"), "{body}");
            }
            other => panic!("expected 410 ResumeAhead, got {other:?}"),
        }
        match admin
            .subscribe(Subscribe::names(["resource.change"]).resume_from(-1))
            .await
        {
            Err(Error::Refused { status: 400, body }) => {
                assert!(body.contains("InvalidResumeFrom"), "{body}");
            }
            other => panic!("expected 400 InvalidResumeFrom, got {other:?}"),
        }
        // The oldest position a resume may start from: everything after it is retained.
        let mut edge = changes(
            admin,
            Subscribe::names(["resource.change"]).resume_from(head - 10),
        )
        .await;
        let mut replayed = Vec::new();
        for _ in 0..10 {
            replayed.push(next_change(&mut edge).await);
        }
        assert_eq!(replayed, seen[seen.len() - 10..].to_vec());

        // A list tells the head to resume from after re-listing.
        let listed = reqwest::Client::new()
            .get(format!("{}/v1/stacks", server.url))
            .basic_auth(ADMIN_ACCESS, Some(ADMIN_SECRET))
            .send()
            .await
            .unwrap();
        assert_eq!(
            listed.headers()["x-drover-stream-position"]
                .to_str()
                .unwrap(),
            head.to_string()
        );
    }
}

#[tokio::test]
async fn a_project_subscriber_that_resumes_gets_its_own_projects_changes_only() {
    for server in servers(&[]).await {
        let mut observer = changes(&server.admin, Subscribe::names(["resource.change"])).await;
        let (_, one) = server.project("one").await;
        let (two_id, two) = server.project("two").await;
        let away = changes(&one, Subscribe::names(["resource.change"])).await;
        let from = away.stream_position().unwrap();
        away.close().await.unwrap();

        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for n in 0..10 {
            mine.push(stack(&one, &format!("one-{n}")).await);
            theirs.push(stack(&two, &format!("two-{n}")).await);
        }
        let all: Vec<String> = mine.iter().chain(&theirs).cloned().collect();
        until_seen(&mut observer, &all).await;

        let mut back = changes(
            &one,
            Subscribe::names(["resource.change"]).resume_from(from),
        )
        .await;
        let mut replayed = Vec::new();
        for _ in 0..mine.len() {
            replayed.push(next_change(&mut back).await);
        }
        assert_increasing(&replayed);
        let got: HashSet<&String> = replayed.iter().map(|(id, _)| id).collect();
        assert_eq!(got, mine.iter().collect(), "project one's changes only");
        let live = stack(&one, "one-live").await;
        assert_eq!(
            next_change(&mut back).await.0,
            live,
            "nothing of project two came in between"
        );

        // The same through the project's own URL, with the admin key.
        let mut admin_two = changes(
            &server.admin,
            Subscribe::names(["resource.change"])
                .project(two_id)
                .resume_from(from),
        )
        .await;
        let mut replayed = Vec::new();
        for _ in 0..theirs.len() {
            replayed.push(next_change(&mut admin_two).await);
        }
        let got: HashSet<&String> = replayed.iter().map(|(id, _)| id).collect();
        assert_eq!(got, theirs.iter().collect(), "project two's changes only");
        let marker = stack(&two, "two-live").await;
        assert_eq!(next_change(&mut admin_two).await.0, marker);
    }
}

#[tokio::test]
async fn a_fresh_subscription_starts_at_the_head_it_was_told() {
    let server = TestServer::start_with(drover_test_support::FAST).await;
    let first = stack(&server.admin, "before").await;
    let mut observer = changes(&server.admin, Subscribe::names(["resource.change"])).await;
    // The handshake's head may or may not include the first stack's change (its tick may not
    // have run yet); either way what comes after the head arrives, and nothing before it.
    let head = observer.stream_position().unwrap();
    let second = stack(&server.admin, "after").await;
    let seen = until_seen(&mut observer, std::slice::from_ref(&second)).await;
    assert!(seen.iter().all(|(_, position)| *position > head));
    assert!(seen.iter().all(|(id, _)| *id == first || *id == second));
}
