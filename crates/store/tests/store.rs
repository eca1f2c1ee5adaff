//! The store's behaviour, checked on SQLite and, when `DROVER_TEST_POSTGRES_URL` is set, on
//! PostgreSQL too (`.ci/run` sets it; with `CI` set and no URL the tests fail). Each
//! PostgreSQL test works in a schema of its own.

use drover_store::{
    AccountKind, ChangeBounds, ChangeScope, CredentialKind, NewChange, Store, StoreOptions, secret,
};
use drover_test_support::postgres::Schema;
use sqlx::{Connection, Row};

/// A store under test and where its data is, to read it raw.
struct TestStore {
    store: Store,
    place: Place,
}

enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(Schema),
}

/// The stores to run a test on: a fresh SQLite file, and a fresh PostgreSQL schema (when
/// `DROVER_TEST_POSTGRES_URL` is set; else a `SKIP` line, or a panic in CI).
async fn stores() -> Vec<TestStore> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::connect(&StoreOptions::sqlite_file(&dir.path().join("drover.db")))
        .await
        .unwrap();
    let mut out = vec![TestStore {
        store: sqlite,
        place: Place::Sqlite(dir),
    }];
    if let Some(schema) = Schema::create("t", "a store test").await {
        let options = StoreOptions {
            pg_schema: Some(schema.name.clone()),
            ..StoreOptions::url(schema.url.clone())
        };
        out.push(TestStore {
            store: Store::connect(&options)
                .await
                .expect("PostgreSQL must be reachable when configured"),
            place: Place::Postgres(schema),
        });
    }
    out
}

impl TestStore {
    /// Every row of every table of the store, each as `table: the row's columns as text`, read
    /// with a connection of the test's own.
    async fn dump(&self) -> Vec<String> {
        let mut rows = Vec::new();
        match &self.place {
            Place::Sqlite(dir) => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(dir.path().join("drover.db"))
                    .read_only(true);
                let mut conn = sqlx::SqliteConnection::connect_with(&options)
                    .await
                    .unwrap();
                let tables: Vec<String> =
                    sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                for table in tables {
                    let columns: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "PRAGMA table_info(\"{table}\")"
                    )))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| row.get::<String, _>("name"))
                    .collect();
                    // quote() renders every value: text, numbers, NULL, and blobs as X'hex'.
                    let select = columns
                        .iter()
                        .map(|column| format!("quote(\"{column}\")"))
                        .collect::<Vec<_>>()
                        .join(" || ',' || ");
                    let values: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT {select} FROM \"{table}\""
                    )))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
                    rows.extend(values.into_iter().map(|row| format!("{table}: {row}")));
                }
            }
            Place::Postgres(schema) => {
                let mut conn = schema.connect().await;
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT table_name::text FROM information_schema.tables \
                     WHERE table_schema = $1 AND table_type = 'BASE TABLE'",
                )
                .bind(&schema.name)
                .fetch_all(&mut conn)
                .await
                .unwrap();
                for table in tables {
                    // A row cast to text renders every column (bytea as \\x hex).
                    let values: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT t::text FROM \"{table}\" t"
                    )))
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
                    rows.extend(values.into_iter().map(|row| format!("{table}: {row}")));
                }
            }
        }
        rows
    }
}

/// Fails if `secret` appears in any stored row, as text or hex.
async fn assert_not_stored(store: &TestStore, secret: &str) {
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    let rows = store.dump().await;
    assert!(
        rows.iter().any(|row| row.starts_with("credential: ")),
        "the dump reads the credential table: {rows:#?}"
    );
    for row in rows {
        assert!(
            !row.contains(secret) && !row.to_lowercase().contains(&hex),
            "the plain secret is stored: {row}"
        );
    }
}

#[tokio::test]
async fn bootstrap_creates_admin_project_and_one_key() {
    for test_store in stores().await {
        let store = &test_store.store;
        let first = store.bootstrap(None).await.unwrap();
        assert_eq!(first.admin.kind, AccountKind::Admin);
        assert_eq!(first.default_project.name.as_deref(), Some("Default"));
        let key = first
            .generated_admin_key
            .expect("a first start generates a key");
        let (credential, digest, account) = store
            .lookup_key(&key.credential.public_value)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(account.id, first.admin.id);
        assert_eq!(credential.kind, CredentialKind::ApiKey);
        assert!(secret::verify(&key.secret_value, &digest));
        assert_not_stored(&test_store, &key.secret_value).await;
        // A second start finds everything in place and generates nothing.
        let second = store.bootstrap(None).await.unwrap();
        assert_eq!(second.admin.id, first.admin.id);
        assert_eq!(second.default_project.id, first.default_project.id);
        assert!(second.generated_admin_key.is_none());
    }
}

#[tokio::test]
async fn configured_admin_key_is_stored_hashed_and_replaced_on_change() {
    for test_store in stores().await {
        let store = &test_store.store;
        store
            .bootstrap(Some(("ADMINKEY", "first-secret")))
            .await
            .unwrap();
        let (_, digest, _) = store.lookup_key("ADMINKEY").await.unwrap().unwrap();
        assert!(secret::verify("first-secret", &digest));
        store
            .bootstrap(Some(("ADMINKEY", "second-secret")))
            .await
            .unwrap();
        let (_, digest, _) = store.lookup_key("ADMINKEY").await.unwrap().unwrap();
        assert!(secret::verify("second-secret", &digest));
        assert!(!secret::verify("first-secret", &digest));
        // Nothing stores the plain secret, in any table or column.
        assert_not_stored(&test_store, "first-secret").await;
        assert_not_stored(&test_store, "second-secret").await;
    }
}

#[tokio::test]
async fn removed_keys_and_unknown_keys_do_not_authenticate() {
    for test_store in stores().await {
        let store = &test_store.store;
        let boot = store.bootstrap(None).await.unwrap();
        let key = store
            .create_key(
                boot.default_project.id,
                CredentialKind::ApiKey,
                Some("ci"),
                Some("for CI"),
            )
            .await
            .unwrap();
        assert!(
            store
                .lookup_key(&key.credential.public_value)
                .await
                .unwrap()
                .is_some()
        );
        store.remove_key(key.credential.id).await.unwrap().unwrap();
        assert!(
            store
                .lookup_key(&key.credential.public_value)
                .await
                .unwrap()
                .is_none()
        );
        assert!(store.lookup_key("NOSUCHKEY").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn agents_get_their_own_account_and_agent_key() {
    for test_store in stores().await {
        let store = &test_store.store;
        let boot = store.bootstrap(None).await.unwrap();
        let (agent_id, account, key) = store
            .create_agent(boot.default_project.id, "host-1", None)
            .await
            .unwrap();
        assert_eq!(account.kind, AccountKind::Agent);
        assert_eq!(account.agent_id, Some(agent_id));
        assert_eq!(account.project_id, Some(boot.default_project.id));
        assert_eq!(key.credential.kind, CredentialKind::AgentApiKey);
        let (_, _, looked_up) = store
            .lookup_key(&key.credential.public_value)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(looked_up.agent_id, Some(agent_id));
        assert_not_stored(&test_store, &key.secret_value).await;
        assert_eq!(store.count_rows("agent").await.unwrap(), 1);
    }
}

#[tokio::test]
async fn settings_round_trip() {
    for test_store in stores().await {
        let store = &test_store.store;
        store
            .put_setting("api.sub.ping.interval.millis", "1000")
            .await
            .unwrap();
        store
            .put_setting("api.sub.ping.interval.millis", "2000")
            .await
            .unwrap();
        assert_eq!(
            store.list_settings().await.unwrap(),
            vec![("api.sub.ping.interval.millis".to_owned(), "2000".to_owned())]
        );
        assert!(
            store
                .delete_setting("api.sub.ping.interval.millis")
                .await
                .unwrap()
        );
        assert!(
            !store
                .delete_setting("api.sub.ping.interval.millis")
                .await
                .unwrap()
        );
        assert!(store.list_settings().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn every_table_of_the_schema_exists() {
    for test_store in stores().await {
        let store = &test_store.store;
        for table in [
            "account",
            "credential",
            "setting",
            "agent",
            "host",
            "instance",
            "volume",
            "stack",
            "service",
            "process_instance",
            "process_execution",
            "container_event",
            "service_event",
            "change_log",
            "external_handler",
        ] {
            assert_eq!(store.count_rows(table).await.unwrap(), 0, "{table}");
        }
        assert!(store.count_rows("account; DROP TABLE x").await.is_err());
    }
}

impl TestStore {
    /// Another handle on the same database, as a second server node would have.
    async fn second_handle(&self) -> Store {
        let options = match &self.place {
            Place::Sqlite(dir) => StoreOptions::sqlite_file(&dir.path().join("drover.db")),
            Place::Postgres(schema) => StoreOptions {
                pg_schema: Some(schema.name.clone()),
                ..StoreOptions::url(schema.url.clone())
            },
        };
        Store::connect(&options).await.unwrap()
    }
}

fn change(resource_id: i64, account_id: Option<i64>) -> NewChange {
    NewChange {
        time: 1,
        resource_type: "stack".into(),
        resource_id,
        account_id,
        data: format!(r#"{{"name":"resource.change","resourceId":"1st{resource_id}"}}"#),
    }
}

/// Two nodes logging changes at once: every batch commits, positions are gap-free, each
/// batch's are consecutive, and the log keeps the newest `retain` only.
#[tokio::test]
async fn change_log_positions_are_gap_free_across_concurrent_writers_and_trimmed() {
    for test_store in stores().await {
        let other = test_store.second_handle().await;
        let write = |store: Store, node: i64| async move {
            let mut firsts = Vec::new();
            for batch in 0..25 {
                let changes: Vec<NewChange> = (0..4)
                    .map(|n| change(node * 1000 + batch * 10 + n, Some(node)))
                    .collect();
                firsts.push(store.append_changes(&changes, 60).await.unwrap().unwrap());
            }
            firsts
        };
        let (a, b) = tokio::join!(
            tokio::spawn(write(test_store.store.clone(), 1)),
            tokio::spawn(write(other, 2))
        );
        let mut firsts: Vec<i64> = a.unwrap().into_iter().chain(b.unwrap()).collect();
        firsts.sort_unstable();
        assert_eq!(firsts, (0..50).map(|n| 1 + n * 4).collect::<Vec<_>>());
        let store = &test_store.store;
        let bounds = store.change_bounds().await.unwrap();
        assert_eq!(
            bounds,
            ChangeBounds {
                oldest: Some(141),
                head: 200
            }
        );
        assert!(bounds.covers(140) && !bounds.covers(139) && !bounds.covers(201));
        let all = store
            .changes_after(140, &ChangeScope::All, 1000)
            .await
            .unwrap();
        assert_eq!(
            all.iter().map(|row| row.position).collect::<Vec<_>>(),
            (141..=200).collect::<Vec<_>>()
        );
        let page = store
            .changes_after(150, &ChangeScope::All, 7)
            .await
            .unwrap();
        assert_eq!(page.first().unwrap().position, 151);
        assert_eq!(page.len(), 7);
        // Which node wrote last depends on scheduling; its rows and the other's add up.
        let newest = all.last().unwrap().account_id.unwrap();
        let mine = store
            .changes_after(0, &ChangeScope::Accounts(vec![newest]), 1000)
            .await
            .unwrap();
        assert_eq!(mine.last().unwrap().position, 200);
        assert!(mine.iter().all(|row| row.account_id == Some(newest)));
        let other = store
            .changes_after(0, &ChangeScope::Accounts(vec![3 - newest]), 1000)
            .await
            .unwrap();
        assert!(other.iter().all(|row| row.account_id == Some(3 - newest)));
        assert_eq!(mine.len() + other.len(), 60);
        assert!(
            store
                .changes_after(0, &ChangeScope::Accounts(vec![]), 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.append_changes(&[], 60).await.unwrap(), None);
    }
}
