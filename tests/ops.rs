//! Operating kck (issue 5): `kck check`, `/status` and `kck status`, `/metrics`, `/readyz`, looking inside
//! the cache, the slot's WAL safety (`kck slot drop`, `max_retained_wal`, `on_slot_lost`), and the
//! dashboard in headless Chromium. Real Postgres 15, kck in process or as the real binary, real HTTP.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::support::kck::{
    ConfigYaml, eventually_equals, fetch, free_port, get_json, load, start_with, wait_drained,
};
use crate::support::pg::{TestDb, cluster, database};
use kck::app::{self, RunOptions, Running};
use kck::config::Config;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = r#"
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL, total int NOT NULL);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE items (id bigint PRIMARY KEY, qty int NOT NULL);
INSERT INTO users VALUES (1, 'ada'), (2, 'bob');
INSERT INTO orders VALUES (10, 1, 5), (11, 1, 7), (12, 2, 1);
INSERT INTO items VALUES (1, 4), (2, 0);
CREATE PUBLICATION kck_ops FOR TABLE users, orders, items;
"#;

const PRIMERS: &str = r#"
  - name: user
    key: "user/{id:int}"
    shape: row
    query: "SELECT id, name FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
  - name: user_total
    key: "user_total/{user_id:int}"
    shape: value
    query: "SELECT coalesce(sum(total), 0) FROM orders WHERE user_id = $1"
    depends_on:
      - table: orders
        columns: { user_id: user_id }
  - name: ratio
    key: "ratio/{id:int}"
    shape: value
    query: "SELECT 100 / qty FROM items WHERE id = $1"
    depends_on:
      - table: items
        columns: { id: id }
"#;

/// Write a config (with `source_extra` lines inside `source:`) and return its path.
fn write_config(dir: &Path, db: &TestDb, primers: &str, source_extra: &str) -> PathBuf {
    ConfigYaml {
        source_extra,
        ..ConfigYaml::new(&db.url, "kck_ops", &db.name, primers)
    }
    .write(dir)
}

/// kck in process, checking the slot and the store often.
async fn start(config: Config) -> Running {
    let options = RunOptions {
        monitor_interval: Duration::from_millis(100),
        slot_wait: Duration::from_secs(2),
        ..RunOptions::default()
    };
    start_with(config, options).await
}

/// Run the kck binary with `args`; its environment points nowhere else.
async fn kck(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(args)
        .env("KCK_LOG", "warn")
        .env_remove("KCK_URL")
        .env_remove("KCK_CONFIG")
        .output()
        .await
        .expect("run kck")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn get_text(url: &str) -> (u16, String) {
    let response = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (
        response.status().as_u16(),
        response.text().await.expect("body"),
    )
}

/// The value of the metric line that starts with `series` (name and labels), if any.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A URL where nothing listens.
fn dead_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[tokio::test]
async fn check_reports_every_problem_with_its_fix_and_passes_a_good_setup() {
    let db = cluster().await.new_database().await;
    db.execute_batch(
        r#"
        CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
        CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL, total int NOT NULL);
        CREATE TABLE events (kind text NOT NULL, at timestamptz NOT NULL);
        CREATE TABLE lines (id bigint PRIMARY KEY, order_id bigint NOT NULL);
        CREATE PUBLICATION kck_ops FOR TABLE users, orders, lines WITH (publish = 'insert, update');
        "#,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let bad = r#"
  - name: user
    key: "user/{id}"
    shape: row
    query: "SELECT id, name FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
  - name: totals
    key: "totals/{user_id:int}"
    query: "SELECT id, totl FROM orders WHERE user_id = $1"
    depends_on:
      - table: orders
        columns: { user_id: user_id }
  - name: by_kind
    key: "by_kind/{kind}"
    query: "SELECT at FROM events WHERE kind = $1"
    depends_on:
      - table: events
        columns: { kind: knd }
  - name: order_lines
    key: "order_lines/{user_id:int}"
    query: "SELECT l.id FROM lines l JOIN orders o ON o.id = l.order_id WHERE o.user_id = $1"
    depends_on:
      - table: orders
        columns: { user_id: user_id }
      - table: lines
        lookup:
          query: "SELECT user_id AS uid FROM orders WHERE id = $1"
          args: [order_id]
"#;
    let path = write_config(dir.path(), &db, bad, "");
    let config = path.to_str().unwrap();
    let out = kck(&["check", "--config", config]).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}\n{}", stderr(&out));
    let expect = [
        // Each problem, with its fix.
        "FAIL publication kck_ops: publication 'kck_ops' does not include table(s) that primers read: \"public\".\"events\"",
        "ALTER PUBLICATION \"kck_ops\" ADD TABLE \"public\".\"events\"",
        "does not publish delete, truncate",
        "ALTER PUBLICATION \"kck_ops\" SET (publish = 'insert, update, delete, truncate');",
        "FAIL table public.events: has no replica identity (no primary key)",
        "ALTER TABLE \"public\".\"events\" REPLICA IDENTITY FULL;",
        "primer 'by_kind' maps columns knd of it, but it has no such column (its columns: kind, at)",
        "WARN table public.orders: primer 'totals' maps user_id outside its replica identity (id)",
        "ALTER TABLE \"public\".\"orders\" REPLICA IDENTITY FULL;",
        "FAIL primer totals: its query does not prepare: column \"totl\" does not exist (SQLSTATE 42703)",
        "WARN primer user: its query prepares; Postgres types the parameters: $1 id:text as int8 (it is a text key parameter but Postgres reads it as int8",
        "Declare it as {id:int}",
        "FAIL primer order_lines depends_on[1] lookup: returns columns (uid) but must return one named like each key parameter; missing: user_id",
        "ok   wal_level: logical",
        "ok   privilege: role 'postgres' may stream changes (superuser)",
        "note slot ",
        "check: ",
    ];
    for e in expect {
        assert!(text.contains(e), "missing {e:?} in:\n{text}");
    }
    // One line per finding: every line starts with its level.
    for line in text.lines() {
        assert!(
            ["ok   ", "note ", "WARN ", "FAIL ", "check: "]
                .iter()
                .any(|p| line.starts_with(p)),
            "{line}"
        );
    }
    let json_out = kck(&["check", "--config", config, "--json"]).await;
    let report: Value = serde_json::from_slice(&json_out.stdout).expect("check --json is JSON");
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["level"] == "fail")
    );

    // Fixed: no failures, and the remaining warning passes with --warnings-ok.
    db.execute_batch(
        "ALTER PUBLICATION kck_ops SET (publish = 'insert, update, delete, truncate');
         ALTER TABLE users REPLICA IDENTITY DEFAULT;",
    )
    .await;
    let good = r#"
  - name: user
    key: "user/{id:int}"
    shape: row
    query: "SELECT id, name FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
  - name: totals
    key: "totals/{user_id:int}"
    query: "SELECT id, total FROM orders WHERE user_id = $1"
    depends_on:
      - table: orders
        columns: { user_id: user_id }
"#;
    let path = write_config(dir.path(), &db, good, "");
    let config = path.to_str().unwrap();
    let out = kck(&["check", "--config", config]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("1 problem: 0 failures, 1 warning"));
    let out = kck(&["check", "--config", config, "--warnings-ok"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    db.execute_batch("ALTER TABLE orders REPLICA IDENTITY FULL")
        .await;
    let out = kck(&["check", "--config", config]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("check: no problems"),
        "{}",
        stdout(&out)
    );
    db.cleanup().await;
}

#[tokio::test]
async fn check_says_what_to_do_when_the_database_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kck.yaml");
    std::fs::write(
        &path,
        format!(
            "source:\n  url: \"postgres://kck@127.0.0.1:{}/app\"\nprimers:\n{PRIMERS}",
            dead_url().rsplit(':').next().unwrap()
        ),
    )
    .unwrap();
    let out = kck(&["check", "--config", path.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.starts_with("FAIL connection: cannot connect"),
        "{text}"
    );
    assert!(text.contains("pg_hba.conf"), "{text}");
}

#[tokio::test]
async fn a_running_kck_reports_status_metrics_readiness_and_its_cache() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    // It lists a fetched key whose row does not exist: kept at once.
    let path = ConfigYaml {
        refresh_extra: "  absent_rows: keep\n",
        ..ConfigYaml::new(&db.url, "kck_ops", &db.name, PRIMERS)
    }
    .write(dir.path());
    let config = load(&path);
    let running = start(config.clone()).await;
    let addr = running.http_addr;
    let base = format!("http://{addr}");
    let pg = db.client().await;

    assert_eq!(
        fetch(addr, "user/1").await,
        (200, json!({"id": 1, "name": "ada"}))
    );
    assert_eq!(fetch(addr, "user/1").await.0, 200);
    assert_eq!(fetch(addr, "user/2").await.0, 200);
    assert_eq!(fetch(addr, "user_total/1").await, (200, json!(12)));
    assert_eq!(fetch(addr, "nope/1").await.0, 400);
    pg.batch_execute("UPDATE orders SET total = 8 WHERE id = 11")
        .await
        .unwrap();
    eventually_equals(addr, "user_total/1", &json!(13), TIMEOUT).await;
    wait_drained(&running, &pg, TIMEOUT).await;

    let (code, status) = get_json(&format!("{base}/status")).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["from"], "kck");
    assert_eq!(status["slot"]["name"], db.name.as_str());
    assert_eq!(status["slot"]["held_by_this_kck"], true);
    assert_eq!(status["slot"]["exists"], true);
    assert_eq!(status["slot"]["wal_status"], "reserved");
    assert!(status["slot"]["lag_bytes"].is_u64(), "{status}");
    assert!(status["slot"]["retained_wal_bytes"].is_u64(), "{status}");
    assert_eq!(status["slot"]["max_retained_wal_bytes"], 1u64 << 30);
    assert_eq!(status["stream"]["streaming"], true);
    assert!(status["stream"]["transactions"].as_u64().unwrap() >= 1);
    assert_eq!(status["queue"]["depth"], 0);
    assert!(status["fetch"]["hits"].as_u64().unwrap() >= 2, "{status}");
    assert_eq!(status["fetch"]["misses"], 3, "{status}");
    assert!(status["fetch"]["hit_ratio"].as_f64().unwrap() > 0.0);
    assert!(status["refresh"]["refreshes"].as_u64().unwrap() >= 1);
    assert!(status["refresh"]["latency_p50_ms"].is_f64(), "{status}");
    let primers = status["primers"].as_array().unwrap();
    let keys: Vec<(String, u64)> = primers
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["keys"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            ("user".into(), 2),
            ("user_total".into(), 1),
            ("ratio".into(), 0)
        ]
    );
    assert_eq!(primers[1]["health"]["consecutive_failures"], 0);
    assert!(primers[1]["health"]["last_refresh_at_ms"].is_i64());
    assert_eq!(status["jobs"], json!([]));
    assert_eq!(status["problems"], json!([]), "{status}");
    assert!(!status["history"].as_array().unwrap().is_empty());

    let (code, text) = get_text(&format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    for series in [
        "kck_replication_lag_bytes",
        "kck_replication_lag_seconds",
        "kck_slot_retained_wal_bytes",
        "kck_queue_depth",
        "kck_queue_oldest_age_seconds",
        "kck_replication_streaming",
        "kck_slot_active",
        "kck_slot_wal_status{status=\"reserved\"}",
        "kck_primer_keys{primer=\"user\"}",
        "kck_refresh_consecutive_failures{primer=\"user_total\"}",
    ] {
        assert!(metric(&text, series).is_some(), "no {series} in\n{text}");
    }
    assert_eq!(metric(&text, "kck_replication_streaming"), Some(1.0));
    assert_eq!(
        metric(&text, "kck_slot_wal_status{status=\"reserved\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&text, "kck_primer_keys{primer=\"user\"}"), Some(2.0));
    assert!(metric(&text, "kck_replication_transactions_total").unwrap() >= 1.0);
    assert!(metric(&text, "kck_replication_events_total").unwrap() >= 1.0);
    assert_eq!(
        metric(&text, "kck_fetches_total{result=\"miss\"}"),
        Some(3.0)
    );
    assert!(metric(&text, "kck_fetches_total{result=\"hit\"}").unwrap() >= 2.0);
    assert_eq!(
        metric(&text, "kck_fetches_total{result=\"bad_request\"}"),
        Some(1.0)
    );
    assert!(
        metric(
            &text,
            "kck_refreshes_total{primer=\"user_total\",outcome=\"ok\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(text.contains("kck_refresh_duration_seconds_bucket{primer=\"user_total\",le="));
    assert!(text.contains("kck_fetch_duration_seconds_bucket{result=\"hit\",le="));
    assert!(
        metric(
            &text,
            "kck_http_responses_total{route=\"/fetch/{*key}\",status=\"400\"}"
        ) == Some(1.0),
        "{text}"
    );
    assert!(text.contains("# TYPE kck_refresh_duration_seconds histogram"));

    let (code, ready) = get_json(&format!("{base}/readyz")).await;
    assert_eq!(
        (code, &ready["checks"]),
        (200, &json!({"slot": true, "store": true, "postgres": true}))
    );
    assert_eq!(get_text(&format!("{base}/healthz")).await.0, 200);

    let (code, page) = get_json(&format!("{base}/cache/keys/user?limit=1")).await;
    assert_eq!(code, 200);
    assert_eq!(page["keys"], json!(["user/1"]));
    assert_eq!(page["next_after"], "user/1");
    let (_, page) = get_json(&format!("{base}/cache/keys/user?after=user%2F1")).await;
    assert_eq!(page["keys"], json!(["user/2"]));
    let (code, error) = get_json(&format!("{base}/cache/keys/nope")).await;
    assert_eq!(
        (code, &error["error"]["code"]),
        (400, &json!("unknown_primer"))
    );
    let (code, entry) = get_json(&format!("{base}/cache/entry/user/+01")).await;
    assert_eq!(code, 200);
    assert_eq!(entry["key"], "user/1");
    assert_eq!(entry["value"], json!({"id": 1, "name": "ada"}));
    assert!(entry["lsn"].as_str().unwrap().contains('/'));
    let (code, _) = get_json(&format!("{base}/cache/entry/user/99")).await;
    assert_eq!(code, 404, "looking does not compute");
    assert_eq!(fetch(addr, "user/99").await.0, 200);

    // The commands, through the running kck's HTTP (its store is locked).
    let config_arg = path.to_str().unwrap();
    let out = kck(&["status", "--config", config_arg, "--url", &base]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    for e in [
        "kck 0.1.0 (running)",
        "held by this kck",
        "wal_status     reserved",
        "stream         streaming",
        "hit ratio",
        " keys  user/{id:int}",
        "jobs           none",
        "no problems",
    ] {
        assert!(text.contains(e), "missing {e:?} in:\n{text}");
    }
    let out = kck(&["status", "--config", config_arg, "--url", &base, "--json"]).await;
    let json: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(json["from"], "kck");
    let out = kck(&["get", "user/2", "--config", config_arg, "--url", &base]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let entry: Value = serde_json::from_slice(&out.stdout).expect("get prints JSON");
    assert_eq!(entry["value"], json!({"id": 2, "name": "bob"}));
    let out = kck(&["get", "user/77", "--config", config_arg, "--url", &base]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("'user/77' is not in the cache"));
    let out = kck(&["keys", "user", "--config", config_arg, "--url", &base]).await;
    assert_eq!(stdout(&out), "user/1\nuser/2\nuser/99\n");

    running.stop().await.unwrap();

    // Stopped: `kck status` reads Postgres and the store itself, and says the slot is unread.
    let url = dead_url();
    let out = kck(&["status", "--config", config_arg, "--url", &url]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    for e in [
        "kck is not answering",
        "inactive: nobody reads it, WAL accumulates",
        "user                            3 keys",
        "queue          0 tasks",
        "exists but nothing reads it",
        "kck slot drop --config FILE --yes-drop-the-slot",
    ] {
        assert!(text.contains(e), "missing {e:?} in:\n{text}");
    }
    let out = kck(&["keys", "user", "--config", config_arg, "--url", &url]).await;
    assert_eq!(
        stdout(&out),
        "user/1\nuser/2\nuser/99\n",
        "{}",
        stderr(&out)
    );
    let out = kck(&["get", "user/1", "--config", config_arg, "--url", &url]).await;
    let entry: Value = serde_json::from_slice(&out.stdout).expect("get prints JSON");
    assert_eq!(entry["value"], json!({"id": 1, "name": "ada"}));
    let out = kck(&["keys", "nope", "--config", config_arg, "--url", &url]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no primer is named 'nope'"));
    db.cleanup().await;
}

#[tokio::test]
async fn a_failing_primer_shows_in_status_metrics_and_recent_errors_until_it_works_again() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let config = load(&write_config(dir.path(), &db, PRIMERS, ""));
    let running = start(config).await;
    let addr = running.http_addr;
    let base = format!("http://{addr}");
    let pg = db.client().await;

    assert_eq!(fetch(addr, "ratio/1").await, (200, json!(25)));
    // A miss that fails is a 502 and a failure of the primer.
    let (code, body) = fetch(addr, "ratio/2").await;
    assert_eq!(
        (code, &body["error"]["code"]),
        (502, &json!("primer_failed"))
    );
    // A change that makes the cached key's refresh fail.
    pg.batch_execute("UPDATE items SET qty = 0 WHERE id = 1")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let status = loop {
        let (_, status) = get_json(&format!("{base}/status")).await;
        if status["primers"][2]["health"]["consecutive_failures"]
            .as_u64()
            .unwrap_or(0)
            >= 2
        {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failure never showed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let health = &status["primers"][2]["health"];
    assert!(
        health["last_error"]
            .as_str()
            .unwrap()
            .contains("division by zero"),
        "{status}"
    );
    let problems = status["problems"].to_string();
    assert!(problems.contains("Primer 'ratio' is failing"), "{problems}");
    assert!(problems.contains("division by zero"), "{problems}");
    let errors = status["recent_errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e["source"] == "primer ratio" && e["level"] == "error"),
        "{status}"
    );
    let (_, text) = get_text(&format!("{base}/metrics")).await;
    assert!(
        metric(
            &text,
            "kck_refreshes_total{primer=\"ratio\",outcome=\"failed\"}"
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );
    assert!(
        metric(&text, "kck_refresh_consecutive_failures{primer=\"ratio\"}").unwrap() >= 1.0,
        "{text}"
    );

    // Fixed in the database: the retried refresh works, and the primer is healthy again.
    pg.batch_execute("UPDATE items SET qty = 5 WHERE id = 1")
        .await
        .unwrap();
    eventually_equals(addr, "ratio/1", &json!(20), Duration::from_secs(60)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = get_json(&format!("{base}/status")).await;
        if status["primers"][2]["health"]["consecutive_failures"] == 0 {
            assert_eq!(status["problems"], json!([]), "{status}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}

async fn slots(pg: &tokio_postgres::Client, name: &str) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
        &[&name],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn slot_drop_refuses_without_confirmation_and_a_new_slot_rebuilds_the_cache() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &db, PRIMERS, "");
    let config_arg = path.to_str().unwrap();
    let running = start(load(&path)).await;
    assert_eq!(
        fetch(running.http_addr, "user_total/1").await,
        (200, json!(12))
    );

    // A running kck holds the slot: it cannot be dropped.
    let out = kck(&[
        "slot",
        "drop",
        "--config",
        config_arg,
        "--yes-drop-the-slot",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is in use by another process"),
        "{}",
        stderr(&out)
    );
    running.stop().await.unwrap();

    let out = kck(&["slot", "drop", "--config", config_arg]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    for e in [
        "refusing to drop replication slot",
        "without --yes-drop-the-slot",
        "not held by anyone, and retains",
        "changes made until kck starts again are never streamed",
        "refreshes every cached key",
    ] {
        assert!(text.contains(e), "missing {e:?} in:\n{text}");
    }
    let pg = db.client().await;
    assert_eq!(slots(&pg, &db.name).await, 1, "still there");
    let out = kck(&[
        "slot",
        "drop",
        "--config",
        config_arg,
        "--yes-drop-the-slot",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("dropped replication slot"));
    assert_eq!(slots(&pg, &db.name).await, 0);
    let out = kck(&[
        "slot",
        "drop",
        "--config",
        config_arg,
        "--yes-drop-the-slot",
    ])
    .await;
    assert!(stdout(&out).contains("does not exist; nothing to drop"));

    // Changed while no slot existed: a new slot means every cached key is refreshed.
    pg.batch_execute("UPDATE orders SET total = 100 WHERE id = 10")
        .await
        .unwrap();
    let running = start(load(&path)).await;
    eventually_equals(running.http_addr, "user_total/1", &json!(107), TIMEOUT).await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn a_slot_retaining_more_wal_than_the_bound_is_warned_about_at_start() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &db, PRIMERS, "  max_retained_wal: 1kB\n");
    let running = start(load(&path)).await;
    running.stop().await.unwrap();
    // WAL written while kck is stopped stays for its slot.
    let pg = db.client().await;
    pg.batch_execute(
        "INSERT INTO users SELECT g, repeat('x', 100) FROM generate_series(100, 2100) g",
    )
    .await
    .unwrap();
    let out = kck(&["check", "--config", path.to_str().unwrap()]).await;
    let text = stdout(&out);
    assert!(text.contains("WARN slot "), "{text}");
    assert!(
        text.contains("more than source.max_retained_wal (1.0 KiB)"),
        "{text}"
    );

    let running = start(load(&path)).await;
    let (_, status) = get_json(&format!("http://{}/status", running.http_addr)).await;
    let warned = status["recent_errors"].as_array().unwrap().iter().any(|e| {
        e["source"] == "slot"
            && e["level"] == "warn"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("more than source.max_retained_wal (1.0 KiB)")
    });
    assert!(warned, "{status}");
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Make Postgres invalidate the (inactive) slot `slot`: with `max_slot_wal_keep_size` tiny, write and
/// switch WAL segments, then checkpoint.
async fn invalidate_slot(db: &TestDb, slot: &str) {
    let pg = db.client().await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        pg.batch_execute(
            "INSERT INTO users SELECT g, 'filler' FROM generate_series(1000, 3000) g ON CONFLICT DO NOTHING;
             DELETE FROM users WHERE id >= 1000;
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .unwrap();
        let status: Option<String> = pg
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if status.as_deref() == Some("lost") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was not invalidated (wal_status {status:?})"
        );
    }
}

#[tokio::test]
async fn an_invalidated_slot_stops_kck_with_the_fix_or_is_recreated_and_the_cache_rebuilt() {
    let owned = crate::support::pg::separate_cluster(&[("max_slot_wal_keep_size", "1MB")]).await;
    let db = owned.new_database().await;
    db.execute_batch(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &db, PRIMERS, "");
    let running = start(load(&path)).await;
    assert_eq!(fetch(running.http_addr, "user/1").await.0, 200);
    running.stop().await.unwrap();

    let pg = db.client().await;
    pg.batch_execute("UPDATE users SET name = 'ada lovelace' WHERE id = 1")
        .await
        .unwrap();
    invalidate_slot(&db, &db.name).await;

    // The default policy: stop, and say what to do.
    let out = kck(&["check", "--config", path.to_str().unwrap()]).await;
    assert!(stdout(&out).contains("was invalidated"), "{}", stdout(&out));
    let error = match app::start(load(&path), RunOptions::default()).await {
        Ok(running) => {
            running.stop().await.unwrap();
            panic!("kck started on a lost slot");
        }
        Err(e) => e.to_string(),
    };
    for e in [
        "was invalidated",
        "max_slot_wal_keep_size",
        "kck slot drop --config FILE --yes-drop-the-slot",
        "source.on_slot_lost: recreate",
    ] {
        assert!(error.contains(e), "missing {e:?} in: {error}");
    }
    // The binary exits non-zero with the same message.
    let out = kck(&["run", "--config", path.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("was invalidated"), "{}", stderr(&out));

    // `on_slot_lost: recreate`: the slot is made again and the cached key reflects the change it missed.
    let path = write_config(dir.path(), &db, PRIMERS, "  on_slot_lost: recreate\n");
    let running = start(load(&path)).await;
    eventually_equals(
        running.http_addr,
        "user/1",
        &json!({"id": 1, "name": "ada lovelace"}),
        TIMEOUT,
    )
    .await;
    // The slot monitor reads the slot every 2 s: wait for a reading of the new slot.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let status = loop {
        let (_, status) = get_json(&format!("http://{}/status", running.http_addr)).await;
        if status["slot"]["wal_status"] == "reserved" {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let events = status["recent_errors"].to_string();
    assert!(
        events.contains("dropping the slot, creating it again"),
        "{events}"
    );
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Headless Chromium, if installed.
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(move |dir| dir.join(name))
        })
        .find(|p| p.is_file())
}

async fn chromium_run(browser: &Path, args: &[String]) -> Output {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("chromium did not finish within 120 s")
        .expect("run chromium")
}

/// The value of `attr` on the element with id `id` in serialized HTML.
fn attribute(dom: &str, id: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let key = format!("{attr}=\"");
    let from = tag.find(&key)? + key.len();
    Some(tag[from..from + tag[from..].find('"')?].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_draws_live_charts_in_headless_chromium() {
    let Some(browser) = chromium() else {
        eprintln!(
            "SKIPPED the_dashboard_draws_live_charts_in_headless_chromium: Chromium is not installed \
             (apt-get install -y chromium; .ci/run installs it)"
        );
        return;
    };
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let config = load(&write_config(dir.path(), &db, PRIMERS, ""));
    let running = start(config).await;
    let addr = running.http_addr;
    let pg = db.client().await;
    // Some traffic, so that the charts have something to draw.
    for i in 0..30 {
        for key in [
            "user/1",
            "user/2",
            "user_total/1",
            "user_total/2",
            "ratio/1",
        ] {
            assert_eq!(fetch(addr, key).await.0, 200);
        }
        pg.batch_execute(&format!(
            "UPDATE orders SET total = total + 1 WHERE id = {}",
            10 + i % 3
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_drained(&running, &pg, TIMEOUT).await;

    let url = format!("http://{addr}/");
    let (code, page) = get_text(&url).await;
    assert_eq!(code, 200);
    assert!(page.contains("<title>kck</title>"));
    // Virtual time lets the page poll /status twice (every 2 s) without waiting for real.
    let out = chromium_run(
        &browser,
        &[
            "--virtual-time-budget=5000".into(),
            "--dump-dom".into(),
            url.clone(),
        ],
    )
    .await;
    let dom = stdout(&out);
    assert!(out.status.success(), "chromium failed: {}", stderr(&out));
    let updates: u32 = dom
        .split_once("data-updates=\"")
        .and_then(|(_, rest)| rest.split('"').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        updates >= 2,
        "the page rendered /status {updates} times:\n{dom}"
    );
    for chart in ["chart-lag", "chart-refresh", "chart-queue", "chart-fetch"] {
        let points: usize = attribute(&dom, chart, "data-points")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(points >= 2, "{chart} has {points} points:\n{dom}");
    }
    assert!(dom.contains("<polyline"), "{dom}");
    assert!(dom.contains("data-primer=\"user_total\""), "{dom}");
    assert!(dom.contains(">healthy<"), "{dom}");
    let first = attribute(&dom, "chart-lag", "data-last").unwrap_or_default();

    // Later, the chart has moved on: it follows the monitor's readings.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = chromium_run(
        &browser,
        &[
            "--virtual-time-budget=3000".into(),
            "--dump-dom".into(),
            url.clone(),
        ],
    )
    .await;
    let later = attribute(&stdout(&out), "chart-lag", "data-last").unwrap_or_default();
    let (first, later): (u64, u64) = (first.parse().unwrap(), later.parse().unwrap());
    assert!(
        later > first,
        "chart-lag's newest point was at {first}, then {later}"
    );

    // A screenshot, as a person sees it (KCK_UPDATE_SCREENSHOT=1 keeps it as docs/dashboard.png).
    let shot = dir.path().join("dashboard.png");
    let out = chromium_run(
        &browser,
        &[
            "--window-size=1280,1100".into(),
            "--virtual-time-budget=3000".into(),
            format!("--screenshot={}", shot.display()),
            url,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    if std::env::var_os("KCK_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png");
        std::fs::write(docs, &png).unwrap();
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[test]
fn slot_safety_fields_load_and_bad_values_say_what_is_right() {
    let yaml = |source_extra: &str| {
        format!("source:\n  url: postgres://kck@127.0.0.1/app\n{source_extra}primers:\n{PRIMERS}")
    };
    let load = |text: &str| Config::from_yaml_str(text, Path::new("kck.yaml"), |_| None);
    let config = load(&yaml("")).unwrap();
    assert_eq!(config.source.max_retained_wal, 1 << 30);
    assert_eq!(
        config.source.on_slot_lost,
        kck::config::SlotLostPolicy::Fail
    );
    let config = load(&yaml(
        "  max_retained_wal: 512MB\n  on_slot_lost: recreate\n",
    ))
    .unwrap();
    assert_eq!(config.source.max_retained_wal, 512 << 20);
    assert_eq!(
        config.source.on_slot_lost,
        kck::config::SlotLostPolicy::Recreate
    );
    let error = load(&yaml("  max_retained_wal: lots\n"))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("kck.yaml:3: source.max_retained_wal: 'lots' is not a size"),
        "{error}"
    );
    let error = load(&yaml("  on_slot_lost: retry\n"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("source.on_slot_lost: 'retry' is not a policy: use 'fail'"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_while_kck_runs_stops_it_or_is_recreated_without_retrying_forever() {
    let owned = crate::support::pg::separate_cluster(&[("max_slot_wal_keep_size", "1MB")]).await;
    let db = owned.new_database().await;
    db.execute_batch(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = db.client().await;

    // `fail`: the stream is ended by Postgres, the supervisor finds the slot lost and kck stops.
    let path = write_config(dir.path(), &db, PRIMERS, "");
    let running = start(load(&path)).await;
    assert_eq!(fetch(running.http_addr, "user/1").await.0, 200);
    invalidate_slot(&db, &db.name).await;
    tokio::time::timeout(Duration::from_secs(60), running.failed())
        .await
        .expect("kck went on retrying a lost slot");
    let (_, status) = get_json(&format!("http://{}/status", running.http_addr)).await;
    let events = status["recent_errors"].to_string();
    assert!(events.contains("was invalidated"), "{events}");
    let error = running.stop().await.unwrap_err().to_string();
    assert!(error.contains("was invalidated"), "{error}");
    assert!(error.contains("kck slot drop"), "{error}");

    // `recreate`: (the start-up drops the lost slot first) then, invalidated again while running, kck
    // creates the slot again and keeps following the database.
    let path = write_config(dir.path(), &db, PRIMERS, "  on_slot_lost: recreate\n");
    let running = start(load(&path)).await;
    assert_eq!(fetch(running.http_addr, "user/2").await.0, 200);
    invalidate_slot(&db, &db.name).await;
    pg.batch_execute("UPDATE users SET name = 'robert' WHERE id = 2")
        .await
        .unwrap();
    eventually_equals(
        running.http_addr,
        "user/2",
        &json!({"id": 2, "name": "robert"}),
        Duration::from_secs(60),
    )
    .await;
    let (_, status) = get_json(&format!("http://{}/status", running.http_addr)).await;
    let events = status["recent_errors"].to_string();
    assert!(events.contains("creating it again"), "{events}");
    running.stop().await.unwrap();
    db.cleanup().await;
}
