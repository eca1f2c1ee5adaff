//! What an operator relies on when reading the API: names are one line of printable text of
//! bounded length (declared in the schema), and a `resourceId` filter names one resource, not
//! the same number in every type. Each test runs on SQLite and, when `DROVER_TEST_POSTGRES_URL`
//! is set, on PostgreSQL.

use drover_client::Error;
use drover_test_support::agent::TestAgent;
use drover_test_support::{servers, wait_state};
use serde_json::{Value, json};

fn refused(result: Result<Value, Error>, status: u16, code: &str, what: &str) {
    match result {
        Err(Error::Api {
            status: got,
            code: got_code,
            ..
        }) if got == status && got_code == code => {}
        other => panic!("{what}: expected {status} {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn names_are_one_printable_line_of_at_most_255_characters_and_bad_ones_change_nothing() {
    for server in servers(&[]).await {
        let api = &server.admin;
        let before = api.get("containers").await.unwrap()["data"]
            .as_array()
            .unwrap()
            .len();
        let long = "n".repeat(100 * 1024);
        for (name, code) in [
            (json!(""), "MinLengthExceeded"),
            (json!("   "), "MinLengthExceeded"),
            (json!(long), "MaxLengthExceeded"),
            (json!("n".repeat(256)), "MaxLengthExceeded"),
            (json!("two\nlines"), "InvalidCharacters"),
            (json!("a\ttab"), "InvalidCharacters"),
            (json!("\u{1b}[31mred"), "InvalidCharacters"),
        ] {
            refused(
                api.post(
                    "containers",
                    &json!({"name": name, "command": ["sleep", "1"], "startOnCreate": false}),
                )
                .await,
                422,
                code,
                &format!("container named {:.40}", name.to_string()),
            );
            refused(
                api.post("volumes", &json!({"name": name})).await,
                422,
                code,
                "volume",
            );
            refused(
                api.post("stacks", &json!({"name": name})).await,
                422,
                code,
                "stack",
            );
            refused(
                api.post("projects", &json!({"name": name})).await,
                422,
                // A blank project name is missing rather than too short.
                if code == "MinLengthExceeded" {
                    "MissingRequired"
                } else {
                    code
                },
                "project",
            );
            refused(
                api.post("apikeys", &json!({"name": name})).await,
                422,
                code,
                "api key",
            );
        }
        let after = api.get("containers").await.unwrap()["data"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(before, after, "a refused create created nothing");

        // The limits are in characters, not bytes; no name at all is still fine.
        let wide = "é".repeat(255);
        let created = api
            .post(
                "containers",
                &json!({"name": wide, "command": ["sleep", "1"], "startOnCreate": false}),
            )
            .await
            .unwrap();
        assert_eq!(created["name"], wide.as_str());
        let unnamed = api
            .post(
                "volumes",
                &json!({"description": "two\nlines are fine here"}),
            )
            .await
            .unwrap();
        assert!(unnamed["name"].is_null());

        // An update with a bad name is refused and changes nothing.
        let path = format!("containers/{}", created["id"].as_str().unwrap());
        wait_state(api, &path, "stopped").await;
        refused(
            api.put(&path, &json!({"name": "bad\nname"})).await,
            422,
            "InvalidCharacters",
            "update",
        );
        assert_eq!(api.get(&path).await.unwrap()["name"], wide.as_str());
        refused(
            api.put(&path, &json!({"description": "bell\u{7}"})).await,
            422,
            "InvalidCharacters",
            "description",
        );

        // A generic client learns the limits from the schema.
        let schema = api.get("schemas/container").await.unwrap();
        assert_eq!(schema["resourceFields"]["name"]["minLength"], 1);
        assert_eq!(schema["resourceFields"]["name"]["maxLength"], 255);
        let schema = api.get("schemas/apiKey").await.unwrap();
        assert_eq!(schema["resourceFields"]["name"]["maxLength"], 255);
    }
}

#[tokio::test]
async fn a_resource_filter_names_one_resource_of_one_type() {
    for server in servers(&[]).await {
        let api = &server.admin;
        // A host, an agent, a volume and a container: the first of each type all have number 1.
        let (host_id, _, _agent) = server.host_with_agent("h", TestAgent::always_ok()).await;
        let volume = api.post("volumes", &json!({"name": "v"})).await.unwrap();
        let container = api
            .post(
                "containers",
                &json!({"name": "c", "command": ["sleep", "1"]}),
            )
            .await
            .unwrap();
        let container_id = container["id"].as_str().unwrap().to_owned();
        wait_state(api, &format!("containers/{container_id}"), "running").await;
        wait_state(
            api,
            &format!("volumes/{}", volume["id"].as_str().unwrap()),
            "active",
        )
        .await;
        let number = container_id.trim_start_matches("1i");
        assert_eq!(
            host_id.trim_start_matches("1h"),
            number,
            "the test needs a host and a container with the same number"
        );

        let only_container = |page: &Value| {
            let rows = page["data"].as_array().unwrap();
            assert!(!rows.is_empty(), "the container's processes are listed");
            for row in rows {
                assert_eq!(row["resourceType"], "container", "{row:#}");
                assert_eq!(row["resourceId"], container_id.as_str(), "{row:#}");
            }
        };
        // A typed id carries its type.
        only_container(
            &api.get(&format!("processinstances?resourceId={container_id}"))
                .await
                .unwrap(),
        );
        // A bare number with its type, in either order.
        only_container(
            &api.get(&format!(
                "processinstances?resourceId={number}&resourceType=container"
            ))
            .await
            .unwrap(),
        );
        let host_rows = api
            .get(&format!("processinstances?resourceId={host_id}"))
            .await
            .unwrap();
        assert!(
            host_rows["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|row| row["resourceType"] == "host"),
            "{host_rows:#}"
        );
        // A bare number alone matches every type: refused with what to do.
        match api
            .get(&format!("processinstances?resourceId={number}"))
            .await
        {
            Err(Error::Api {
                status: 422,
                code,
                message,
                ..
            }) => {
                assert_eq!(code, "MissingRequired");
                assert!(message.contains("resourceType"), "{message}");
            }
            other => panic!("a bare resourceId: {other:?}"),
        }
        // A typed id of another type than resourceType.
        refused(
            api.get(&format!(
                "processinstances?resourceType=host&resourceId={container_id}"
            ))
            .await,
            422,
            "InvalidReference",
            "mismatched type",
        );
    }
}

#[tokio::test]
async fn a_project_key_reads_its_own_projects_processes_and_no_one_elses() {
    for server in servers(&[]).await {
        let (_, mine) = server.project("mine").await;
        let (_, theirs) = server.project("theirs").await;
        // No host in either project: the creates wait in their processes, which is enough.
        let created = mine
            .post(
                "containers",
                &json!({"name": "c", "command": ["sleep", "1"]}),
            )
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap();
        let other = theirs
            .post(
                "containers",
                &json!({"name": "c", "command": ["sleep", "1"]}),
            )
            .await
            .unwrap();
        let listed = mine.get("processinstances").await.unwrap();
        let rows = listed["data"].as_array().unwrap();
        assert!(
            rows.iter().any(|row| row["resourceId"] == id),
            "its own container's process is listed: {listed:#}"
        );
        assert!(
            rows.iter().all(|row| row["resourceId"] != other["id"]),
            "not the other project's: {listed:#}"
        );
        let process = rows.iter().find(|row| row["resourceId"] == id).unwrap();
        let process_id = process["id"].as_str().unwrap();
        mine.get(&format!("processinstances/{process_id}"))
            .await
            .unwrap();
        mine.get(&format!("processexecutions?processInstanceId={process_id}"))
            .await
            .unwrap();
        refused(
            theirs.get(&format!("processinstances/{process_id}")).await,
            404,
            "NotFound",
            "another project's process",
        );
        refused(
            theirs
                .get(&format!("processexecutions?processInstanceId={process_id}"))
                .await,
            404,
            "NotFound",
            "another project's executions",
        );
        let summary = mine.get("processsummary").await.unwrap();
        let start = summary["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["processName"] == "instance.start")
            .expect("its start is summarized");
        let pending = start["running"].as_i64().unwrap()
            + start["ready"].as_i64().unwrap()
            + start["delay"].as_i64().unwrap();
        assert_eq!(pending, 1, "only its own start counts: {summary:#}");
        refused(
            mine.post(
                &format!("processinstances/{process_id}?action=cancel"),
                &json!({}),
            )
            .await,
            403,
            "PermissionDenied",
            "cancel by a project key",
        );
    }
}
