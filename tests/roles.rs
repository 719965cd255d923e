//! Least privilege (sql/roles.sql): the owner migrates, nudge runs as a runtime role that can do its job and no
//! DDL, and producers can insert events and call `nudge.publish()` and nothing else. Every other suite already
//! runs nudge as the runtime role (`Nudge::start`); this one proves what each role cannot do.
mod common;

use common::*;
use serde_json::json;

/// The SQLSTATE of a statement that must fail.
async fn refused(pg: &tokio_postgres::Client, sql: &str) -> String {
    let err = pg.batch_execute(sql).await.err().unwrap_or_else(|| panic!("accepted: {sql}"));
    let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: not a database error: {err}"));
    db.code().code().to_owned()
}

const INSUFFICIENT_PRIVILEGE: &str = "42501";

async fn server_version(pg: &tokio_postgres::Client) -> i32 {
    let v: String = pg.query_one("SHOW server_version_num", &[]).await.unwrap().get(0);
    v.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_publishes_with_the_usual_statements_and_can_do_nothing_else() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let mut alice = authed(&nudge, "alice", &["post:*"]).await;
    alice.subscribe("post:1").await;
    let producer = db.client_as(Role::Producer).await;

    // What the examples and the README do.
    producer
        .execute(
            "INSERT INTO nudge.events (topic, kind, data) VALUES ($1, $2, $3::text::jsonb)",
            &[&"post:1", &"comment.created", &r#"{"comment_id": 1}"#],
        )
        .await
        .unwrap();
    let event = alice.recv_type("event").await;
    assert_eq!((event["kind"].clone(), event["data"].clone()), (json!("comment.created"), json!({"comment_id": 1})));
    producer
        .batch_execute(
            "INSERT INTO nudge.events (topic, kind, recipients) VALUES ('inbox', 'message.created', ARRAY['alice'])",
        )
        .await
        .unwrap();
    assert_eq!(alice.recv_type("event").await["kind"], "message.created");
    // nudge.publish returns the id without the producer being able to read the table.
    let id: i64 = producer
        .query_one("SELECT nudge.publish('post:1', 'comment.created', NULL, '{\"comment_id\": 2}')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(alice.recv_type("event").await["id"], id);
    let id: i64 = producer
        .query_one("SELECT nudge.publish($1, $2, $3)", &[&"inbox", &"message.created", &vec!["alice"]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(alice.recv_type("event").await["id"], id);

    // Nothing else.
    let cases = [
        "SELECT * FROM nudge.events",
        "SELECT id FROM nudge.events",
        "SELECT count(*) FROM nudge.events",
        "INSERT INTO nudge.events (topic, kind) VALUES ('post:1', 'k') RETURNING id",
        "UPDATE nudge.events SET topic = 'post:2'",
        "UPDATE nudge.events SET processed_at = NULL",
        "DELETE FROM nudge.events",
        "TRUNCATE nudge.events",
        "SELECT * FROM nudge.claim(10, 300, false)",
        "SELECT * FROM nudge.claim(10, 300, false, true)",
        "SELECT * FROM nudge.delivery",
        "UPDATE nudge.delivery SET last_seq = last_seq + 1000",
        "SELECT * FROM nudge.nodes",
        "SELECT * FROM nudge.schema_migrations",
        "CREATE TABLE nudge.mine (a int)",
        "ALTER TABLE nudge.events DISABLE TRIGGER events_internal_columns",
    ];
    for sql in cases {
        assert_eq!(refused(&producer, sql).await, INSUFFICIENT_PRIVILEGE, "{sql}");
    }
    // nudge's own columns: refused by the trigger, with its message (table-level INSERT is what the producer has).
    for sql in [
        "INSERT INTO nudge.events (topic, kind, seq) VALUES ('post:1', 'k', 1000000)",
        "INSERT INTO nudge.events (topic, kind, processed_at) VALUES ('post:1', 'k', now())",
    ] {
        assert_eq!(refused(&producer, sql).await, "428C9", "{sql}");
    }
    alice.expect_silence(SILENCE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_role_runs_nudge_and_cannot_change_the_schema() {
    let db = TestDb::new().await;
    db.migrate();
    let runtime = db.client_as(Role::Runtime).await;
    let mut cases = vec![
        "CREATE TABLE nudge.mine (a int)",
        "CREATE FUNCTION nudge.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE INDEX mine ON nudge.events (kind)",
        "ALTER TABLE nudge.events ADD COLUMN mine int",
        "ALTER TABLE nudge.events DISABLE TRIGGER events_internal_columns",
        "ALTER TABLE nudge.events DROP CONSTRAINT events_data_size",
        "ALTER FUNCTION nudge.claim(bigint, double precision, boolean) RESET ALL",
        "ALTER FUNCTION nudge.claim(bigint, double precision, boolean, boolean) RESET ALL",
        "DROP TABLE nudge.nodes",
        "DROP FUNCTION nudge.publish(text, text, text[], jsonb)",
        "DROP SCHEMA nudge CASCADE",
        "TRUNCATE nudge.events",
        "INSERT INTO nudge.schema_migrations (version, name) VALUES (99, 'mine')",
        "DELETE FROM nudge.schema_migrations",
        // It relays events; it does not make them.
        "INSERT INTO nudge.events (topic, kind) VALUES ('post:1', 'k')",
        "SELECT nudge.publish('post:1', 'k')",
        "UPDATE nudge.events SET topic = 'post:2'",
    ];
    // Since PostgreSQL 15, nobody may create in schema public unless granted.
    if server_version(&runtime).await >= 150000 {
        cases.push("CREATE TABLE public.mine (a int)");
    }
    for sql in cases {
        let code = refused(&runtime, sql).await;
        // 42501 insufficient_privilege; "must be owner" is 42501 too.
        assert_eq!(code, INSUFFICIENT_PRIVILEGE, "{sql}");
    }
    let owner: String = db
        .client()
        .await
        .query_one("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'nudge'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, db.role_name(Role::Owner));

    // `nudge migrate` as the runtime role on a current schema changes nothing and succeeds; `nudge status` works.
    let runtime_url = db.role_url(Role::Runtime);
    let mut migrate = nudge_command(&[("NUDGE_DATABASE_URL", &runtime_url)]);
    migrate.arg("migrate");
    let (status, _, err) = run_with_deadline(migrate, SOON);
    assert!(status.success(), "nudge migrate as the runtime role on a current schema: {err}");
    let mut status_cmd = nudge_command(&[("NUDGE_DATABASE_URL", &runtime_url)]);
    status_cmd.arg("status");
    let (status, out, err) = run_with_deadline(status_cmd, SOON);
    assert!(status.success() && out.starts_with("last seq 0, pending rows 0"), "nudge status: {out}{err}");
}

/// Claims, deliveries, `resume`, retention, heartbeats and `nudge status` as the runtime role, on one node.
/// (Every other suite runs as that role too; this is the short tour.)
#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_role_claims_delivers_resumes_and_deletes_after_the_retention() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[("NUDGE_RETENTION", "1s"), ("NUDGE_POLL_INTERVAL", "1s")]).await;
    let producer = db.client_as(Role::Producer).await;
    let mut alice = authed(&nudge, "alice", &["post:*"]).await;
    alice.subscribe("post:1").await;
    let first: i64 = producer.query_one("SELECT nudge.publish('post:1', 'k')", &[]).await.unwrap().get(0);
    let event = alice.recv_type("event").await;
    assert_eq!(event["id"], first);
    let seq = event["seq"].as_i64().expect("seq");

    // A second connection resumes from before that event and gets it from the table.
    let mut bob = authed(&nudge, "bob", &["post:*"]).await;
    bob.subscribe("post:1").await;
    bob.send_json(json!({"type": "resume", "since": seq - 1})).await;
    let replayed = bob.recv_type("event").await;
    assert_eq!(replayed["id"], first);
    assert_eq!(bob.recv_type("resumed").await["complete"], true);

    // The heartbeat wrote nudge.nodes; `nudge status` as the runtime role shows this node.
    let runtime_url = db.role_url(Role::Runtime);
    eventually!(SOON, "nudge status to list the node", {
        let mut c = nudge_command(&[("NUDGE_DATABASE_URL", &runtime_url)]);
        c.arg("status");
        let (status, out, _) = run_with_deadline(c, SOON);
        status.success() && out.contains(&format!("127.0.0.1:{}", nudge.port))
    });
    // The retention sweep deletes the row (1 s after it was processed).
    let pg = db.client().await;
    eventually!(
        std::time::Duration::from_secs(30),
        "the retention sweep to delete the processed row",
        pg.query_one("SELECT count(*) FROM nudge.events", &[]).await.unwrap().get::<_, i64>(0) == 0
    );
    // The sweep, as the runtime role, moved the mark `resume` reads (trigger events_deleted).
    let deleted: i64 = pg.query_one("SELECT deleted_through FROM nudge.retention", &[]).await.unwrap().get(0);
    let last: i64 = pg.query_one("SELECT last_seq FROM nudge.delivery", &[]).await.unwrap().get(0);
    assert_eq!(deleted, last);
    assert!(!nudge.log().contains("permission denied"), "{}", nudge.log());
    assert_eq!(nudge.get("/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_sql_is_idempotent_and_refuses_mistakes_before_granting_anything() {
    let db = TestDb::new().await;
    let (owner, runtime, producer) =
        (db.role_name(Role::Owner), db.role_name(Role::Runtime), db.role_name(Role::Producer));
    let owner_url = db.role_url(Role::Owner);

    // Before the schema exists.
    let (ok, err) = apply_roles_sql(&owner_url, &runtime, &producer);
    assert!(!ok && err.contains("nudge migrate"), "{err}");

    db.migrate();
    // Again (re-run after an upgrade): still fine.
    let (ok, err) = apply_roles_sql(&owner_url, &runtime, &producer);
    assert!(ok, "{err}");

    for (url, runtime, producer, says) in [
        // Not as the owner: the superuser is not the schema's owner.
        (db.url.clone(), runtime.clone(), producer.clone(), "owner of schema nudge".to_owned()),
        (owner_url.clone(), "nobody_here".into(), producer.clone(), "does not exist".into()),
        (owner_url.clone(), owner.clone(), producer.clone(), "is the owner".into()),
        (owner_url.clone(), runtime.clone(), runtime.clone(), "must differ".into()),
        (owner_url.clone(), "postgres".into(), producer.clone(), "superuser".into()),
    ] {
        let (ok, err) = apply_roles_sql(&url, &runtime, &producer);
        assert!(!ok && err.contains(&says), "roles.sql with runtime={runtime} producer={producer}: {err}");
    }

    // A table a later migration adds (created by the owner) is the runtime's to read and write, not the
    // producer's.
    let as_owner = db.client_as(Role::Owner).await;
    as_owner.batch_execute("CREATE TABLE nudge.later (a int)").await.unwrap();
    let as_runtime = db.client_as(Role::Runtime).await;
    as_runtime.batch_execute("INSERT INTO nudge.later VALUES (1); SELECT * FROM nudge.later").await.unwrap();
    assert_eq!(refused(&as_runtime, "DROP TABLE nudge.later").await, INSUFFICIENT_PRIVILEGE);
    let as_producer = db.client_as(Role::Producer).await;
    assert_eq!(refused(&as_producer, "SELECT * FROM nudge.later").await, INSUFFICIENT_PRIVILEGE);

    // Re-running takes away what it does not grant.
    db.client().await.batch_execute(&format!("GRANT UPDATE ON nudge.events TO {producer}")).await.unwrap();
    let (ok, err) = apply_roles_sql(&owner_url, &runtime, &producer);
    assert!(ok, "{err}");
    assert_eq!(refused(&as_producer, "UPDATE nudge.events SET kind = 'x'").await, INSUFFICIENT_PRIVILEGE);
}

/// Producers may read who is online and disconnect or unsubscribe users (schema 7), and nothing more of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_producer_reads_presence_and_controls_users_but_not_the_tables_behind() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let mut alice = authed(&nudge, "alice", &["post:*"]).await;
    alice.subscribe("post:1").await;
    let producer = db.client_as(Role::Producer).await;
    eventually!(
        SOON,
        "alice in nudge.presence, read by the producer",
        producer.query_one("SELECT nudge.is_online('alice')", &[]).await.unwrap().get::<_, bool>(0)
    );
    // A flush writes users, then topics (two statements): wait for the topic's row too.
    let topic_users = || async {
        let row = producer.query_opt("SELECT users FROM nudge.topic_presence WHERE topic = 'post:1'", &[]).await;
        row.unwrap().map(|r| r.get::<_, i32>(0))
    };
    eventually!(SOON, "post:1 in nudge.topic_presence, read by the producer", topic_users().await == Some(1));
    for sql in
        ["SELECT * FROM nudge.presence_users", "SELECT * FROM nudge.presence_topics", "SELECT * FROM nudge.status"]
    {
        let err = producer.batch_execute(sql).await.expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{sql}: {err}");
    }
    producer.execute("SELECT nudge.unsubscribe('alice', 'post:*')", &[]).await.unwrap();
    assert_eq!(alice.recv_type("unsubscribed").await["topic"], "post:1");
    producer.execute("SELECT nudge.disconnect('alice', 'bye')", &[]).await.unwrap();
    assert_eq!(alice.recv_type("error").await["code"], "revoked");
}
