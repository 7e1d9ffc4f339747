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

/// A hand-written `columns` map that the query's plan contradicts is a WARN in `kck check` (and in `kck
/// explain`), with the map the plan derives; one it agrees with is not.
#[tokio::test]
async fn a_column_map_the_plan_contradicts_is_a_warning_with_the_derived_one() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = r#"
  - name: wrong
    key: "wrong/{id:int}"
    query: "SELECT w FROM t2 WHERE t_id = $1"
    depends_on:
      - table: t2
        columns: { id: id }
  - name: right
    key: "right/{id:int}"
    query: "SELECT w FROM t2 WHERE t_id = $1"
    depends_on:
      - table: t2
        columns: { id: t_id }
"#;
    let path =
        crate::support::kck::write_config(dir.path(), &db.url, "kck_test", &db.name, primers, "");
    for command in ["check", "explain"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kck"))
            .args([command, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let wrong = "primer 'wrong': depends_on maps table public.t2 as `columns: { id: id }`, but its \
                     query's plan compares id: t_id with the key";
        assert!(text.contains(wrong), "{command}: {text}");
        assert!(text.contains("Use `columns: { id: t_id }`"), "{text}");
        assert!(!text.contains("primer 'right': depends_on maps"), "{text}");
        if command == "check" {
            assert!(text.contains("WARN"), "{text}");
        }
    }
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
    let text = kck_explain(&path);
    assert!(
        text.contains("primer joined (key joined/{id:int})"),
        "{text}"
    );
    assert!(
        text.contains("reads (from its plan): public.t, public.t2")
            || text.contains("reads (from its plan): public.t2, public.t"),
        "{text}"
    );
    // The plan carries t.id = $1 over the join to t2: a key-level map, inferred.
    assert!(
        text.contains(
            "public.t2: a changed row refreshes the key its columns name (t_id → id), and an UPDATE also \
             the key of its old values (inferred"
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

/// Inference at key level: the plan's conditions (`t2.t_id = $1`, carried over the join by Postgres's
/// equivalence classes) make a column map, so a change refreshes the keys it affects and no others.
#[tokio::test]
async fn inferred_column_maps_refresh_only_the_affected_keys() {
    let db = database(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text NOT NULL);
CREATE TABLE t2 (id bigint PRIMARY KEY, t_id bigint NOT NULL, w text NOT NULL);
ALTER TABLE t2 REPLICA IDENTITY FULL;
INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3) g;
INSERT INTO t2 SELECT g, g, 'w' || g FROM generate_series(1, 3) g;
CREATE PUBLICATION kck_test FOR TABLE t, t2;",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let primers = format!(
        r#"
  - name: joined
    key: "joined/{{id:int}}"
    query: "{JOINED}"
  - name: windowed
    key: "windowed/{{id:int}}"
    shape: value
    query: "SELECT count(*) OVER () FROM t WHERE t.v <> 'x' AND t.id = $1"
"#
    );
    let running = start(config(dir.path(), &db.url, "kck_test", &db.name, &primers)).await;
    let addr = running.http_addr;
    for id in 1..=3 {
        assert_eq!(fetch(addr, &format!("joined/{id}")).await.0, 200);
    }
    let lsn_of = |key: &'static str| {
        let store = running.store.clone();
        async move { store.get(key).await.unwrap().unwrap().lsn }
    };
    let (before1, before3) = (lsn_of("joined/1").await, lsn_of("joined/3").await);
    db.execute_batch("UPDATE t2 SET w = 'CHANGED' WHERE id = 2")
        .await;
    eventually_equals(
        addr,
        "joined/2",
        &json!([{"v": "v2", "w": "CHANGED"}]),
        Duration::from_secs(30),
    )
    .await;
    // Moving a row refreshes both the old key and the new one.
    db.execute_batch("UPDATE t2 SET t_id = 3 WHERE id = 1")
        .await;
    eventually_equals(addr, "joined/1", &json!([]), Duration::from_secs(30)).await;
    crate::support::kck::eventually(
        "joined/3 has both rows",
        Duration::from_secs(30),
        || async {
            let (_, value) = fetch(addr, "joined/3").await;
            let mut ws: Vec<String> = value
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["w"].as_str().map(str::to_owned))
                .collect();
            ws.sort();
            ws == ["w1", "w3"]
        },
    )
    .await;
    assert!(lsn_of("joined/1").await > before1);
    assert!(lsn_of("joined/3").await > before3);
    // The change to id 2 did not touch key 1 before it moved: prove with a fresh change to 2 only.
    let at1 = lsn_of("joined/1").await;
    db.execute_batch("UPDATE t2 SET w = 'AGAIN' WHERE id = 2")
        .await;
    eventually_equals(
        addr,
        "joined/2",
        &json!([{"v": "v2", "w": "AGAIN"}]),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        lsn_of("joined/1").await,
        at1,
        "key 1 was refreshed by a change to key 2"
    );
    // /status says how each table is followed.
    let (_, status) = crate::support::kck::get_json(&format!("http://{addr}/status")).await;
    let joined = status["primers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "joined")
        .unwrap()
        .clone();
    assert!(
        joined["follows"]
            .as_array()
            .unwrap()
            .contains(&json!({"table": "public.t2", "how": "columns", "columns": ["t_id → id"], "reads": ["t_id", "w"]})),
        "{joined}"
    );
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// A partitioned table filtered by its partition key: a generic plan prunes every partition at start-up
/// (`Subplans Removed`), so kck plans without pruning and still sees every partition it reads.
#[tokio::test]
async fn a_query_filtered_by_the_partition_key_is_followed() {
    let db = database(
        "CREATE TABLE ev (id int, user_id int NOT NULL, what text, PRIMARY KEY (id, user_id)) PARTITION BY HASH (user_id);
CREATE TABLE ev0 PARTITION OF ev FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE ev1 PARTITION OF ev FOR VALUES WITH (MODULUS 2, REMAINDER 1);
INSERT INTO ev VALUES (1, 7, 'a'), (2, 8, 'b');
CREATE PUBLICATION kck_test FOR TABLE ev;",
    )
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
    assert_eq!(fetch(addr, "events/7").await, (200, json!("a")));
    assert_eq!(fetch(addr, "events/8").await, (200, json!("b")));
    db.execute_batch("INSERT INTO ev VALUES (3, 7, 'c'), (4, 8, 'd')")
        .await;
    eventually_equals(addr, "events/7", &json!("a,c"), Duration::from_secs(30)).await;
    eventually_equals(addr, "events/8", &json!("b,d"), Duration::from_secs(30)).await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// A query whose answer moves with the clock or the session cannot be kept fresh by the stream: refused
/// unless the primer refreshes on a schedule.
#[tokio::test]
async fn a_query_calling_now_or_random_needs_a_ttl_or_refresh_interval() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    for (query, named) in [
        ("SELECT v, now() AS at FROM t WHERE id = $1", "now()"),
        (
            "SELECT v FROM t WHERE id = $1 ORDER BY random()",
            "random()",
        ),
        (
            "SELECT v, CURRENT_USER AS who FROM t WHERE id = $1",
            "CURRENT_USER",
        ),
    ] {
        let primers = format!(
            r#"
  - name: clocked
    key: "clocked/{{id:int}}"
    query: "{query}"
"#
        );
        let cfg = config(dir.path(), &db.url, "kck_test", &db.name, &primers);
        let err = match kck::app::start(cfg, kck::app::RunOptions::default()).await {
            Ok(_) => panic!("{query} started"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&format!("primer 'clocked' calls {named}")) && err.contains("`ttl`"),
            "{err}"
        );
        // With a refresh interval it runs.
        let primers = format!("{primers}    refresh_interval: 1m\n");
        let running = start(config(dir.path(), &db.url, "kck_test", &db.name, &primers)).await;
        assert_eq!(fetch(running.http_addr, "clocked/1").await.0, 200);
        running.stop().await.unwrap();
    }
    db.cleanup().await;
}

/// A function of the application's own that may read tables (PL/pgSQL, STABLE) hides them from the plan:
/// without depends_on that is refused, naming the function; with depends_on it runs.
#[tokio::test]
async fn a_function_that_may_read_tables_needs_depends_on() {
    let db = database(
        "CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE reviews (id int PRIMARY KEY, product_id int NOT NULL, stars int NOT NULL);
CREATE FUNCTION rating(p int) RETURNS numeric STABLE LANGUAGE plpgsql AS
  $$ BEGIN RETURN (SELECT avg(stars) FROM reviews WHERE product_id = p); END $$;
INSERT INTO products VALUES (1, 'lamp');
INSERT INTO reviews VALUES (1, 1, 4);
CREATE PUBLICATION kck_test FOR TABLE products, reviews;",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let query = "SELECT name, rating(id) AS rating FROM products WHERE id = $1";
    let inferred = format!(
        r#"
  - name: product
    key: "product/{{id:int}}"
    shape: row
    query: "{query}"
"#
    );
    let cfg = config(dir.path(), &db.url, "kck_test", &db.name, &inferred);
    let err = match kck::app::start(cfg, kck::app::RunOptions::default()).await {
        Ok(_) => panic!("a primer calling a table-reading function started without depends_on"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("calls function public.rating"), "{err}");
    let declared = format!(
        "{inferred}    depends_on:\n      - table: products\n        columns: {{ id: id }}\n      - table: reviews\n        columns: {{ id: product_id }}\n"
    );
    let running = start(config(dir.path(), &db.url, "kck_test", &db.name, &declared)).await;
    assert_eq!(
        fetch(running.http_addr, "product/1").await,
        (200, json!({"name": "lamp", "rating": 4.0}))
    );
    db.execute_batch("INSERT INTO reviews VALUES (2, 1, 2)")
        .await;
    eventually_equals(
        running.http_addr,
        "product/1",
        &json!({"name": "lamp", "rating": 3.0}),
        Duration::from_secs(30),
    )
    .await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Column relevance: an UPDATE that changes no column a primer reads (the old row is sent: REPLICA
/// IDENTITY FULL) refreshes nothing for it; one that changes a column it reads, an index's order or a
/// partial index's condition does. `kck explain` names the columns.
#[tokio::test]
async fn an_update_of_columns_the_query_does_not_read_refreshes_nothing() {
    let db = database(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text NOT NULL, other text NOT NULL, \
                         active bool NOT NULL, cat int NOT NULL, rank int NOT NULL);
ALTER TABLE t REPLICA IDENTITY FULL;
CREATE INDEX t_active ON t (id) WHERE active;
CREATE INDEX t_cat_rank ON t (cat, rank);
INSERT INTO t SELECT g, 'v' || g, 'o' || g, true, g % 2, g FROM generate_series(1, 4) g;
CREATE PUBLICATION kck_test FOR TABLE t;",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let primers = r#"
  - name: v
    key: "v/{id:int}"
    shape: value
    query: "SELECT t.v FROM t WHERE t.id = $1"
  - name: active
    key: "active/{id:int}"
    query: "SELECT t.v FROM t WHERE t.id = $1 AND t.active"
  - name: ranked
    key: "ranked/{cat:int}"
    query: "SELECT t.id FROM t WHERE t.cat = $1 ORDER BY t.rank"
  - name: summed
    key: "summed/{cat:int}"
    shape: value
    query: "SELECT sum(rank) FROM t WHERE cat = $1"
"#;
    let path =
        crate::support::kck::write_config(dir.path(), &db.url, "kck_test", &db.name, primers, "");
    let text = kck_explain(&path);
    assert!(
        text.contains("reads columns id, v: an UPDATE that changes none of them refreshes nothing"),
        "{text}"
    );
    assert!(
        text.contains("which columns it reads is not known (its scan uses index t_active")
            || text.contains("reads columns id, v, active"),
        "{text}"
    );
    assert!(text.contains("reads columns id, cat, rank"), "{text}");
    // A sequential scan's output may be every column (Postgres's physical tlist); the aggregate above it
    // names the one it uses.
    assert!(text.contains("reads columns cat, rank:"), "{text}");

    let running = start(config(dir.path(), &db.url, "kck_test", &db.name, primers)).await;
    let addr = running.http_addr;
    for key in ["v/1", "v/2", "active/1", "ranked/1", "summed/1"] {
        assert_eq!(fetch(addr, key).await.0, 200, "{key}");
    }
    let lsn_of = |key: &'static str| {
        let store = running.store.clone();
        async move { store.get(key).await.unwrap().unwrap().lsn }
    };
    let at = lsn_of("v/1").await;
    // `other` is read by no primer: nothing is refreshed. A later change to v/2 proves the stream passed it.
    db.execute_batch("UPDATE t SET other = 'changed' WHERE id = 1")
        .await;
    db.execute_batch("UPDATE t SET v = 'CHANGED' WHERE id = 2")
        .await;
    eventually_equals(addr, "v/2", &json!("CHANGED"), Duration::from_secs(30)).await;
    assert_eq!(
        lsn_of("v/1").await,
        at,
        "an UPDATE of `other` refreshed v/1"
    );
    let summed = lsn_of("summed/1").await;
    db.execute_batch("UPDATE t SET other = 'again', v = 'x' WHERE id = 3")
        .await;
    db.execute_batch("UPDATE t SET v = 'AGAIN' WHERE id = 2")
        .await;
    eventually_equals(addr, "v/2", &json!("AGAIN"), Duration::from_secs(30)).await;
    assert_eq!(
        lsn_of("summed/1").await,
        summed,
        "summed/1 reads no changed column"
    );
    db.execute_batch("UPDATE t SET rank = 10 WHERE id = 1")
        .await;
    eventually_equals(addr, "summed/1", &json!(13), Duration::from_secs(30)).await;
    // A column it reads.
    db.execute_batch("UPDATE t SET v = 'NEW' WHERE id = 1")
        .await;
    eventually_equals(addr, "v/1", &json!("NEW"), Duration::from_secs(30)).await;
    // The partial index's condition (`active`), which the generic plan may not print.
    db.execute_batch("UPDATE t SET active = false WHERE id = 1")
        .await;
    eventually_equals(addr, "active/1", &json!([]), Duration::from_secs(30)).await;
    // The order of an index scan: rank decides the order although the output does not show it.
    db.execute_batch("UPDATE t SET rank = 0 WHERE id = 3").await;
    eventually_equals(
        addr,
        "ranked/1",
        &json!([{"id": 3}, {"id": 1}]),
        Duration::from_secs(30),
    )
    .await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// docs/operations.md shows `kck explain` on the demo: that text is what the demo's config prints, line for
/// line, against the demo's schema.
#[tokio::test]
async fn kck_explain_on_the_demo_prints_what_the_operations_doc_shows() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let schema = std::fs::read_to_string(root.join("sql/demo.sql")).unwrap();
    let db = database(&schema).await;
    let doc = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let section = doc
        .split("### What a primer reads: `kck explain`")
        .nth(1)
        .unwrap();
    let shown = section
        .split("```text\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(["explain", "--config", "demo.yaml", "orders_by_user"])
        .current_dir(root.join("config"))
        .env("KCK_SOURCE_URL", &db.url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(text.trim_end(), shown.trim_end());
    db.cleanup().await;
}

/// Tables reached only through joins (one hop, two hops, a correlated sub-plan), with no `depends_on`:
/// under random inserts, updates that move rows between parents, and deletes on every table (seed printed),
/// every cached key equals its query run fresh once the queue drains, and kck inferred lookups, not table
/// level, for them.
#[tokio::test]
async fn join_only_tables_converge_under_random_writes() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("KCK_INFER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("infer seed {seed} (replay with KCK_INFER_SEED={seed})");
    let db = database(
        "CREATE TABLE a (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE b (id int PRIMARY KEY, a_id int NOT NULL, w text NOT NULL);
CREATE TABLE c (id int PRIMARY KEY, b_id int NOT NULL, n int NOT NULL);
CREATE TABLE r (id int PRIMARY KEY, a_id int NOT NULL, stars int NOT NULL);
ALTER TABLE b REPLICA IDENTITY FULL;
ALTER TABLE c REPLICA IDENTITY FULL;
ALTER TABLE r REPLICA IDENTITY FULL;
INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 6) g;
INSERT INTO b SELECT g, 1 + g % 6, 'w' || g FROM generate_series(1, 12) g;
INSERT INTO c SELECT g, 1 + g % 12, g FROM generate_series(1, 24) g;
INSERT INTO r SELECT g, 1 + g % 6, 1 + g % 5 FROM generate_series(1, 12) g;
CREATE PUBLICATION kck_test FOR TABLE a, b, c, r;",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let primers = r#"
  - name: chain
    key: "chain/{id:int}"
    query: "SELECT b.w, c.n FROM a JOIN b ON b.a_id = a.id JOIN c ON c.b_id = b.id WHERE a.id = $1 ORDER BY c.id"
  - name: sums
    key: "sums/{id:int}"
    shape: value
    query: "SELECT coalesce(sum(c.n), 0) FROM c JOIN b ON b.id = c.b_id WHERE b.a_id = $1"
  - name: rated
    key: "rated/{id:int}"
    query: "SELECT a.name, (SELECT avg(r.stars)::float8 FROM r WHERE r.a_id = a.id) AS avg FROM a WHERE a.id = $1"
"#;
    let path = crate::support::kck::ConfigYaml::new(&db.url, "kck_test", &db.name, primers)
        .write(dir.path());
    let config = crate::support::kck::load(&path);
    let text = kck_explain(&path);
    for (table, primer) in [("public.c", "chain"), ("public.r", "rated")] {
        let section = text
            .split("\n\n")
            .find(|s| s.starts_with(&format!("primer {primer} ")))
            .unwrap_or("");
        assert!(
            section
                .lines()
                .any(|l| l.starts_with(&format!("  {table}: a changed row runs the lookup"))),
            "{text}"
        );
    }
    let running = start(config.clone()).await;
    let addr = running.http_addr;
    for id in 1..=6 {
        for p in ["chain", "sums", "rated"] {
            assert_eq!(fetch(addr, &format!("{p}/{id}")).await.0, 200);
        }
    }
    let client = db.client().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..300 {
        let sql = match rng.random_range(0..9) {
            0 => format!(
                "INSERT INTO b VALUES ({}, {}, 'w{i}') ON CONFLICT DO NOTHING",
                100 + i,
                rng.random_range(1..=6)
            ),
            1 => format!(
                "UPDATE b SET a_id = {} WHERE id = {}",
                rng.random_range(1..=6),
                rng.random_range(1..=20)
            ),
            2 => format!("DELETE FROM b WHERE id = {}", rng.random_range(1..=30)),
            3 => format!(
                "INSERT INTO c VALUES ({}, {}, {i}) ON CONFLICT DO NOTHING",
                100 + i,
                rng.random_range(1..=20)
            ),
            4 => format!(
                "UPDATE c SET b_id = {}, n = n + 1 WHERE id = {}",
                rng.random_range(1..=20),
                rng.random_range(1..=40)
            ),
            5 => format!("DELETE FROM c WHERE id = {}", rng.random_range(1..=40)),
            6 => format!(
                "UPDATE r SET a_id = {}, stars = {} WHERE id = {}",
                rng.random_range(1..=6),
                rng.random_range(1..=5),
                rng.random_range(1..=12)
            ),
            7 => format!(
                "INSERT INTO r VALUES ({}, {}, {}) ON CONFLICT DO NOTHING",
                100 + i,
                rng.random_range(1..=6),
                rng.random_range(1..=5)
            ),
            _ => format!(
                "UPDATE b SET w = 'w{i}' WHERE id = {}",
                rng.random_range(1..=20)
            ),
        };
        client.execute(sql.as_str(), &[]).await.unwrap();
    }
    crate::support::kck::wait_drained(&running, &client, Duration::from_secs(120)).await;
    let checked = crate::support::kck::assert_converged(&running, &client, &config).await;
    assert_eq!(checked, 18);
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// A foreign table cannot be published: a primer that reads one without listing it in `not_followed` is
/// refused at start with the fix; with it listed (and a ttl), it starts.
#[tokio::test]
async fn a_primer_reading_a_foreign_table_must_list_it_in_not_followed() {
    let db = database(&format!(
        "{SCHEMA}
CREATE EXTENSION file_fdw;
CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
CREATE FOREIGN TABLE remote_rates (id bigint, rate text) SERVER files OPTIONS (filename '/dev/null', format 'csv');"
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let primer = |extra: &str| {
        format!(
            r#"
  - name: rated
    key: "rated/{{id:int}}"
    query: "SELECT t.v, r.rate FROM t LEFT JOIN remote_rates r ON r.id = t.id WHERE t.id = $1"
{extra}"#
        )
    };
    let refused = config(dir.path(), &db.url, "kck_test", &db.name, &primer(""));
    let error = match kck::app::start(refused, kck::app::RunOptions::default()).await {
        Ok(running) => {
            running.stop().await.unwrap();
            panic!("kck started with a primer reading a foreign table it cannot follow");
        }
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("primer 'rated' reads foreign table 'remote_rates'")
            && error.contains("`not_followed`"),
        "{error}"
    );
    let dir = tempfile::tempdir().unwrap();
    let listed = primer("    not_followed: [remote_rates]\n    ttl: 60s\n");
    let running = start(config(dir.path(), &db.url, "kck_test", &db.name, &listed)).await;
    assert_eq!(fetch(running.http_addr, "rated/1").await.0, 200);
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// `kck explain --config PATH`'s output; panics, with what it printed, when it fails.
fn kck_explain(path: &std::path::Path) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(["explain", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}
