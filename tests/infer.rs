//! Dependencies from the query itself (`crate::plan`): a primer without `depends_on` follows every table its
//! query reads, and one whose `depends_on` forgets a table it reads is refused at start.

use std::time::Duration;

use serde_json::json;

use crate::support::kck::{config, eventually_equals, fetch, start};
use crate::support::pg::database;

const SCHEMA: &str = r#"
CREATE TABLE t (id bigint PRIMARY KEY, v text NOT NULL);
CREATE TABLE t2 (id bigint PRIMARY KEY, t_id bigint NOT NULL, w text NOT NULL);
CREATE VIEW t2_view AS SELECT t_id, w FROM t2;
INSERT INTO t VALUES (1, 'b');
INSERT INTO t2 VALUES (10, 1, 'x');
CREATE PUBLICATION kck_test FOR TABLE t, t2;
"#;

/// The query of the report: a join, so a change to either table changes the answer.
const JOINED: &str = "select t.v, t2.w from t join t2 on t2.t_id = t.id where t.id = $1";

#[tokio::test]
async fn without_depends_on_every_table_the_query_reads_is_followed() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    // One primer reads t2 through a join, one through a view and a scalar subquery.
    let primers = format!(
        r#"
  - name: joined
    key: "joined/{{id:int}}"
    query: "{JOINED}"
  - name: viewed
    key: "viewed/{{id:int}}"
    shape: value
    query: "SELECT (SELECT string_agg(w, ',') FROM t2_view WHERE t_id = t.id) FROM t WHERE t.id = $1"
"#
    );
    let running = start(config(dir.path(), &db.url, "kck_test", &db.name, &primers)).await;
    let addr = running.http_addr;
    assert_eq!(
        fetch(addr, "joined/1").await,
        (200, json!([{"v": "b", "w": "x"}]))
    );
    assert_eq!(fetch(addr, "viewed/1").await, (200, json!("x")));

    db.execute_batch("UPDATE t2 SET w = 'CHANGED'").await;
    let timeout = Duration::from_secs(30);
    eventually_equals(
        addr,
        "joined/1",
        &json!([{"v": "b", "w": "CHANGED"}]),
        timeout,
    )
    .await;
    eventually_equals(addr, "viewed/1", &json!("CHANGED"), timeout).await;
    db.execute_batch("UPDATE t SET v = 'c'").await;
    eventually_equals(
        addr,
        "joined/1",
        &json!([{"v": "c", "w": "CHANGED"}]),
        timeout,
    )
    .await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn a_depends_on_that_forgets_a_table_the_query_reads_is_refused() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = format!(
        r#"
  - name: joined
    key: "joined/{{id:int}}"
    query: "{JOINED}"
    depends_on:
      - table: t
        columns: {{ id: id }}
"#
    );
    let config = config(dir.path(), &db.url, "kck_test", &db.name, &primers);
    let error = match kck::app::start(config, kck::app::RunOptions::default()).await {
        Ok(running) => {
            running.stop().await.unwrap();
            panic!("kck started with a depends_on that misses t2");
        }
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("primer 'joined' reads 't2'") && error.contains("`- table: t2`"),
        "{error}"
    );
    db.cleanup().await;
}

/// A table partitioned by id in two partitions, with two rows of user 7 (one in each).
const PARTITIONED: &str = r#"
CREATE TABLE ev (id bigint PRIMARY KEY, user_id bigint NOT NULL, what text NOT NULL) PARTITION BY RANGE (id);
CREATE TABLE ev_low PARTITION OF ev FOR VALUES FROM (0) TO (100);
CREATE TABLE ev_high PARTITION OF ev FOR VALUES FROM (100) TO (MAXVALUE);
INSERT INTO ev VALUES (1, 7, 'a'), (150, 7, 'b');
"#;

#[tokio::test]
async fn a_depends_on_on_a_partitioned_table_covers_its_partitions() {
    let db = database(&format!(
        "{PARTITIONED}
ALTER TABLE ev_low REPLICA IDENTITY FULL;
ALTER TABLE ev_high REPLICA IDENTITY FULL;
CREATE PUBLICATION kck_test FOR TABLE ev;"
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    // The plan reads ev_low and ev_high; depends_on names their parent. The publication is made the default
    // way (publish_via_partition_root = false): Postgres lists, and the stream names, the partitions.
    let primers = r#"
  - name: events
    key: "events/{user_id:int}"
    shape: value
    query: "SELECT string_agg(what, ',' ORDER BY id) FROM ev WHERE user_id = $1"
    depends_on:
      - table: ev
        columns: { user_id: user_id }
"#;
    let running = start(config(dir.path(), &db.url, "kck_test", &db.name, primers)).await;
    let addr = running.http_addr;
    assert_eq!(fetch(addr, "events/7").await, (200, json!("a,b")));
    db.execute_batch("UPDATE ev SET what = 'B' WHERE id = 150")
        .await;
    eventually_equals(addr, "events/7", &json!("a,B"), Duration::from_secs(30)).await;
    // A partition attached while kck runs is followed too.
    db.execute_batch(
        "CREATE TABLE ev_old (id bigint PRIMARY KEY, user_id bigint NOT NULL, what text NOT NULL);
         ALTER TABLE ev_old REPLICA IDENTITY FULL;
         ALTER TABLE ev DETACH PARTITION ev_low;
         ALTER TABLE ev ATTACH PARTITION ev_old FOR VALUES FROM (0) TO (100);
         INSERT INTO ev VALUES (2, 7, 'new');",
    )
    .await;
    eventually_equals(addr, "events/7", &json!("new,B"), Duration::from_secs(30)).await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn without_depends_on_a_partitioned_table_is_followed_in_either_publish_mode() {
    let db = database(&format!(
        "{PARTITIONED}
CREATE PUBLICATION kck_test FOR TABLE ev WITH (publish_via_partition_root = true);"
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let primers = r#"
  - name: events
    key: "events/{user_id:int}"
    shape: value
    query: "SELECT string_agg(what, ',' ORDER BY id) FROM ev WHERE user_id = $1"
"#;
    let running = start(config(dir.path(), &db.url, "kck_test", &db.name, primers)).await;
    let addr = running.http_addr;
    assert_eq!(fetch(addr, "events/7").await, (200, json!("a,b")));
    // The stream names the root here: the inferred dependencies include it.
    db.execute_batch("UPDATE ev SET what = 'B' WHERE id = 150")
        .await;
    eventually_equals(addr, "events/7", &json!("a,B"), Duration::from_secs(30)).await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn kck_explain_says_what_each_primer_reads_and_how_it_is_followed() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = format!(
        r#"
  - name: joined
    key: "joined/{{id:int}}"
    query: "{JOINED}"
  - name: declared
    key: "declared/{{id:int}}"
    query: "SELECT v FROM t WHERE id = $1"
    depends_on:
      - table: t
        columns: {{ id: id }}
      - table: t2
        columns: {{ id: t_id }}
"#
    );
    let path =
        crate::support::kck::write_config(dir.path(), &db.url, "kck_test", &db.name, &primers, "");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(["explain", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("primer joined (key joined/{id:int})"),
        "{text}"
    );
    assert!(
        text.contains("reads (from its plan): public.t, public.t2")
            || text.contains("reads (from its plan): public.t2, public.t"),
        "{text}"
    );
    assert!(
        text.contains(
            "public.t2: every cached key of the primer (no depends_on: followed at table level)"
        ),
        "{text}"
    );
    assert!(
        text.contains("public.t: a changed row refreshes the key its columns name (id → id)"),
        "{text}"
    );
    // t's mapped column is its primary key, t2's is not.
    assert!(
        text.contains("replica identity DEFAULT (the primary key): enough"),
        "{text}"
    );
    assert!(
        text.contains("the old t_id of an UPDATE or DELETE")
            && text.contains("ALTER TABLE \"public\".\"t2\" REPLICA IDENTITY FULL;"),
        "{text}"
    );

    // One primer only, and a name that does not exist.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(["explain", "nope", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("no primer is named 'nope' (the primers: joined, declared)"),
        "{err}"
    );
    db.cleanup().await;
}
