//! The store's behaviour, checked on SQLite and, when `DROVER_TEST_POSTGRES_URL` is set, on
//! PostgreSQL too (`.ci/run` sets it). Each PostgreSQL test works in a schema of its own.

use drover_store::{AccountKind, CredentialKind, Store, StoreOptions, secret};

/// The stores to run a test on: a fresh SQLite file, and a fresh PostgreSQL schema if configured.
async fn stores() -> Vec<(Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::connect(&StoreOptions::sqlite_file(&dir.path().join("drover.db")))
        .await
        .unwrap();
    let mut out = vec![(sqlite, Some(dir))];
    if let Ok(url) = std::env::var("DROVER_TEST_POSTGRES_URL") {
        let schema = format!("t_{}", uuid_like());
        let admin = sqlx_connect(&url).await;
        sqlx_execute(&admin, &format!("CREATE SCHEMA {schema}")).await;
        let options = StoreOptions {
            pg_schema: Some(schema),
            ..StoreOptions::url(url)
        };
        out.push((
            Store::connect(&options)
                .await
                .expect("PostgreSQL must be reachable when configured"),
            None,
        ));
    }
    out
}

fn uuid_like() -> String {
    secret::new_access_key().to_lowercase()
}

async fn sqlx_connect(url: &str) -> sqlx_pg::PgPool {
    sqlx_pg::PgPool::connect(url)
        .await
        .expect("connect to PostgreSQL")
}

async fn sqlx_execute(pool: &sqlx_pg::PgPool, sql: &str) {
    sqlx_pg::query(sqlx_pg::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap();
}

mod sqlx_pg {
    pub use sqlx::AssertSqlSafe;
    pub use sqlx::postgres::PgPool;
    pub use sqlx::query;
}

#[tokio::test]
async fn bootstrap_creates_admin_project_and_one_key() {
    for (store, _dir) in stores().await {
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
        // A second start finds everything in place and generates nothing.
        let second = store.bootstrap(None).await.unwrap();
        assert_eq!(second.admin.id, first.admin.id);
        assert_eq!(second.default_project.id, first.default_project.id);
        assert!(second.generated_admin_key.is_none());
    }
}

#[tokio::test]
async fn configured_admin_key_is_stored_hashed_and_replaced_on_change() {
    for (store, _dir) in stores().await {
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
        // Nothing stores the plain secret.
        for key in store.list_keys(None).await.unwrap() {
            assert_ne!(key.public_value, "first-secret");
        }
    }
}

#[tokio::test]
async fn removed_keys_and_unknown_keys_do_not_authenticate() {
    for (store, _dir) in stores().await {
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
    for (store, _dir) in stores().await {
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
        assert_eq!(store.count_rows("agent").await.unwrap(), 1);
    }
}

#[tokio::test]
async fn settings_round_trip() {
    for (store, _dir) in stores().await {
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
    for (store, _dir) in stores().await {
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
        ] {
            assert_eq!(store.count_rows(table).await.unwrap(), 0, "{table}");
        }
        assert!(store.count_rows("account; DROP TABLE x").await.is_err());
    }
}
