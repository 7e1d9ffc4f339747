//! Refresh triggers and choices (issue 4), end to end against a real Postgres 15 and kck in process:
//! interval, TTL (hot vs cold), warm at boot, invalidation (HTTP and CLI), stale-while-revalidate,
//! coalescing, priority order, a failing primer not blocking others, batching, and the process worker's
//! jobs. Backpressure runs in a process of its own (`tests/backpressure.rs`), since it measures its memory.
//!
//! Changes that replication cannot see are made in `rates`, a table the primers read but do not declare
//! (it is not in the publication): only the triggers under test can bring them into the cache.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::kck::{
    ConfigYaml, assert_converged, eventually, fetch, load, start, wait_drained,
};
use crate::support::pg::{TestDb, database};
use kck::app::Running;
use kck::config::Config;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = r#"
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL, total numeric(10,2) NOT NULL);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE nums (id bigint PRIMARY KEY, n int NOT NULL);
CREATE TABLE rates (id int PRIMARY KEY, rate int NOT NULL);
INSERT INTO rates VALUES (1, 1);
INSERT INTO users SELECT g, 'user ' || g FROM generate_series(1, 20) g;
INSERT INTO nums VALUES (1, 1), (2, 2);
CREATE PUBLICATION kck_test FOR TABLE users, orders, nums;
"#;

/// A primer whose value reads the unpublished `rates` table (declared `not_followed`: its changes reach the
/// cache only through the policy or invalidation), with extra policy lines.
fn rated(name: &str, policy: &str) -> String {
    format!(
        r#"  - name: {name}
    key: "{name}/{{id:int}}"
    shape: row
    query: "SELECT u.id, u.name, (SELECT rate FROM rates WHERE id = 1) AS rate FROM users u WHERE u.id = $1"
    depends_on:
      - table: users
        columns: {{ id: id }}
    not_followed: [rates]
{policy}"#
    )
}

const USER: &str = r#"  - name: user
    key: "user/{id:int}"
    shape: row
    query: "SELECT id, name FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
"#;

/// Write a config (the `refresh:` section's body given) and load it.
fn write(dir: &Path, db: &TestDb, primers: &str, refresh: &str, extra: &str) -> (Config, PathBuf) {
    let path = ConfigYaml {
        refresh_extra: refresh,
        extra,
        ..ConfigYaml::new(&db.url, "kck_test", &db.name, primers)
    }
    .write(dir);
    (load(&path), path)
}

/// GET /fetch/{key}: status, headers and JSON body.
async fn get(addr: std::net::SocketAddr, key: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let url = format!("http://{addr}/fetch/{key}");
    let response = reqwest::get(&url).await.expect("GET");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = serde_json::from_str(&response.text().await.expect("body")).expect("json");
    (status, headers, body)
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn post(addr: std::net::SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .json(&body)
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn set_rate(db: &TestDb, rate: i64) {
    db.execute_batch(&format!("UPDATE rates SET rate = {rate} WHERE id = 1"))
        .await;
}

async fn rate_of(addr: std::net::SocketAddr, key: &str) -> Value {
    let (status, body) = fetch(addr, key).await;
    assert_eq!(status, 200, "{key}: {body}");
    body["rate"].clone()
}

/// What the refresher recorded for `primer` (keys its workers stored, misses, batches, failures).
fn stats_of(running: &Running, primer: &str) -> kck::refresh::PrimerHealth {
    running.refresher.primer_health(primer)
}

#[tokio::test]
async fn refresh_interval_recomputes_every_cached_key() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = rated("rated", "    refresh_interval: 300ms\n") + USER;
    let (config, _) = write(dir.path(), &db, &primers, "", "");
    let running = start(config).await;
    let addr = running.http_addr;
    assert_eq!(rate_of(addr, "rated/1").await, json!(1));
    assert_eq!(rate_of(addr, "rated/2").await, json!(1));
    set_rate(&db, 7).await;
    // Replication cannot see `rates`; the schedule recomputes both keys.
    eventually("rated/1 and rated/2 follow rates", TIMEOUT, || async {
        rate_of(addr, "rated/1").await == json!(7) && rate_of(addr, "rated/2").await == json!(7)
    })
    .await;
    assert!(stats_of(&running, "rated").keys_refreshed >= 2);
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn ttl_refreshes_hot_keys_drops_cold_ones_and_never_serves_expired_as_fresh() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = rated("hot", "    ttl: 1s\n    cold_after: 3s\n")
        + &rated("gone", "    ttl: 1s\n    on_expiry: drop\n");
    let (config, _) = write(dir.path(), &db, &primers, "", "");
    let running = start(config).await;
    let addr = running.http_addr;
    let (_, headers, body) = get(addr, "hot/1").await;
    assert_eq!(body["rate"], json!(1));
    assert!(header(&headers, "kck-cache") == Some("miss"));
    let entry = running.store.get("hot/1").await.unwrap().expect("stored");
    let expires = entry
        .expires_at_ms
        .expect("an entry of a primer with a ttl expires");
    assert_eq!(expires - entry.computed_at_ms, 1000);
    assert_eq!(rate_of(addr, "hot/2").await, json!(1));
    assert_eq!(rate_of(addr, "gone/1").await, json!(1));

    set_rate(&db, 5).await;
    // hot/1 is read all along: it is refreshed (ahead of its expiry) and follows rates.
    eventually("hot/1 follows rates through its ttl", TIMEOUT, || async {
        rate_of(addr, "hot/1").await == json!(5)
    })
    .await;
    // gone/1 expires and, with on_expiry: drop, is removed.
    eventually("gone/1 is dropped once expired", TIMEOUT, || async {
        !running.store.is_registered("gone/1").await.unwrap()
    })
    .await;
    // hot/2 is not read: after cold_after it is dropped instead of recomputed, while hot/1 stays.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while running.store.is_registered("hot/2").await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cold hot/2 was never dropped"
        );
        let _ = fetch(addr, "hot/1").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running.store.is_registered("hot/1").await.unwrap());
    let stats = stats_of(&running, "hot");
    assert!(stats.keys_refreshed >= 1, "{stats:?}");

    // Whatever the sweeper did, a fetch never answers an expired entry as a fresh hit.
    for _ in 0..20 {
        let (_, headers, _) = get(addr, "gone/1").await;
        if header(&headers, "kck-cache") == Some("hit") {
            let stored = running.store.get("gone/1").await.unwrap();
            let computed = header(&headers, "kck-computed-at").unwrap().to_owned();
            let computed = humantime::parse_rfc3339(&computed).unwrap();
            let age = std::time::SystemTime::now()
                .duration_since(computed)
                .unwrap_or_default();
            assert!(
                age < Duration::from_secs(3),
                "served an entry {age:?} old as fresh: {stored:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn warm_fills_the_cache_before_the_first_request() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = rated("warmed", "    warm: SELECT id FROM users WHERE id <= 15\n");
    let (config, _) = write(dir.path(), &db, &primers, "", "");
    let running = start(config).await;
    // `start` returned: the listed keys are already computed.
    for id in 1..=15 {
        let key = format!("warmed/{id}");
        assert!(
            running.store.get(&key).await.unwrap().is_some(),
            "{key} not warmed"
        );
    }
    assert!(running.store.get("warmed/16").await.unwrap().is_none());
    let (_, headers, body) = get(running.http_addr, "warmed/3").await;
    assert_eq!(header(&headers, "kck-cache"), Some("hit"));
    assert_eq!(body["name"], json!("user 3"));
    // Warmed keys are kept fresh like any other.
    db.execute_batch("UPDATE users SET name = 'renamed' WHERE id = 3")
        .await;
    crate::support::kck::eventually_equals(
        running.http_addr,
        "warmed/3",
        &json!({"id": 3, "name": "renamed", "rate": 1}),
        TIMEOUT,
    )
    .await;
    assert_eq!(stats_of(&running, "warmed").primes, 15);
    running.stop().await.unwrap();

    // A restart does not recompute what is cached and fresh.
    let (config, _) = write(dir.path(), &db, &primers, "", "");
    let running = start(config).await;
    assert_eq!(stats_of(&running, "warmed").primes, 0);
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn invalidation_drops_or_refreshes_by_key_primer_and_prefix() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = rated("rated", "") + USER;
    let (config, _) = write(dir.path(), &db, &primers, "", "");
    let running = start(config).await;
    let addr = running.http_addr;
    for id in [1, 2, 10, 11, 12] {
        assert_eq!(rate_of(addr, &format!("rated/{id}")).await, json!(1));
        let _ = fetch(addr, &format!("user/{id}")).await;
    }

    // DELETE /cache/{key}: dropped; the next fetch is a miss.
    let response = reqwest::Client::new()
        .delete(format!("http://{addr}/cache/rated/2"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"keys": 1, "mode": "drop"})
    );
    assert!(!running.store.is_registered("rated/2").await.unwrap());
    let (_, headers, _) = get(addr, "rated/2").await;
    assert_eq!(header(&headers, "kck-cache"), Some("miss"));

    // By prefix, dropping: rated/10..12 go; rated/1 and rated/2 and the user keys stay.
    let (status, body) = post(
        addr,
        "/invalidate",
        json!({"prefix": "rated/1", "mode": "drop"}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"keys": 4, "mode": "drop"})));
    assert!(!running.store.is_registered("rated/1").await.unwrap());
    assert!(!running.store.is_registered("rated/12").await.unwrap());
    assert!(running.store.is_registered("rated/2").await.unwrap());
    assert!(running.store.is_registered("user/10").await.unwrap());

    // By primer, refreshing: every key is recomputed and follows a change replication cannot see.
    for id in [1, 10] {
        let _ = fetch(addr, &format!("rated/{id}")).await;
    }
    set_rate(&db, 9).await;
    let (status, body) = post(addr, "/invalidate", json!({"primer": "rated"})).await;
    assert_eq!((status, body), (200, json!({"keys": 3, "mode": "refresh"})));
    for id in [1, 2, 10] {
        let key = format!("rated/{id}");
        eventually(&format!("{key} refreshed"), TIMEOUT, || async {
            running.store.get(&key).await.unwrap().is_some_and(|e| {
                serde_json::from_slice::<Value>(&e.value).unwrap()["rate"] == json!(9)
            })
        })
        .await;
    }
    // Errors say what is wrong.
    let (status, body) = post(addr, "/invalidate", json!({"primer": "nope"})).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("unknown_primer"))
    );
    let (status, body) = post(
        addr,
        "/invalidate",
        json!({"primer": "rated", "key": "rated/1"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(addr, "/invalidate", json!({"key": "rated/x"})).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("bad_key_parameter"))
    );
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn an_invalidated_entry_is_served_stale_within_the_bound_while_it_refreshes() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = rated("soft", "    stale_while_revalidate: 1h\n") + &rated("strict", "");
    let (config, _) = write(dir.path(), &db, &primers, "", "");
    let running = start(config).await;
    let addr = running.http_addr;
    assert_eq!(rate_of(addr, "soft/1").await, json!(1));
    assert_eq!(rate_of(addr, "strict/1").await, json!(1));
    running.refresher.pause(); // the queued refreshes wait; only the stale path recomputes
    set_rate(&db, 3).await;
    for key in ["soft/1", "strict/1"] {
        let (status, _) = post(addr, "/invalidate", json!({"key": key})).await;
        assert_eq!(status, 200);
    }
    // Within stale_while_revalidate: the old value, marked stale, and a recomputation behind it.
    let (status, headers, body) = get(addr, "soft/1").await;
    assert_eq!((status, body["rate"].clone()), (200, json!(1)));
    assert_eq!(header(&headers, "kck-stale"), Some("true"));
    assert_eq!(header(&headers, "kck-cache"), Some("stale"));
    eventually("soft/1 revalidated", TIMEOUT, || async {
        let (_, headers, body) = get(addr, "soft/1").await;
        body["rate"] == json!(3) && header(&headers, "kck-stale").is_none()
    })
    .await;
    // Without it: never served once invalidated; the fetch recomputes.
    let (_, headers, body) = get(addr, "strict/1").await;
    assert_eq!(body["rate"], json!(3));
    assert_eq!(header(&headers, "kck-stale"), None);
    running.refresher.resume();
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn cli_refresh_and_invalidate_ask_the_running_server() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = rated("rated", "") + USER;
    let (config, path) = write(dir.path(), &db, &primers, "", "");
    let running = start(config).await;
    let addr = running.http_addr;
    assert_eq!(rate_of(addr, "rated/1").await, json!(1));
    assert_eq!(rate_of(addr, "rated/2").await, json!(1));
    let kck = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kck"));
        command
            .args(args)
            .arg("--config")
            .arg(&path)
            .env("KCK_HTTP_BIND", addr.to_string())
            .env("KCK_LOG", "warn");
        command
    };
    set_rate(&db, 4).await;
    let out = tokio::task::spawn_blocking({
        let mut c = kck(&["refresh", "rated/1"]);
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "queued a refresh of 1 key"
    );
    eventually("rated/1 refreshed from the CLI", TIMEOUT, || async {
        rate_of(addr, "rated/1").await == json!(4)
    })
    .await;
    // Only the key asked for (rated/2 still has the old value).
    wait_drained(&running, &db.client().await, TIMEOUT).await;
    assert_eq!(rate_of(addr, "rated/2").await, json!(1));

    // A key that is not cached: nothing is queued, and the command says so and fails.
    let out = tokio::task::spawn_blocking({
        let mut c = kck(&["refresh", "rated/999"]);
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("nothing to refresh: 'rated/999' is not cached"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = tokio::task::spawn_blocking({
        let mut c = kck(&["refresh", "--primer", "rated"]);
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("rated/2 refreshed from the CLI", TIMEOUT, || async {
        rate_of(addr, "rated/2").await == json!(4)
    })
    .await;

    let out = tokio::task::spawn_blocking({
        let mut c = kck(&["invalidate", "--prefix", "rated/", "--drop"]);
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "dropped 2 keys"
    );
    assert!(!running.store.is_registered("rated/1").await.unwrap());

    // A target is required, and a server that is not there is named with the fix.
    let out = tokio::task::spawn_blocking({
        let mut c = kck(&["invalidate"]);
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    running.stop().await.unwrap();
    let out = tokio::task::spawn_blocking({
        let mut c = kck(&["refresh", "rated/1"]);
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Is kck running"), "{stderr}");
    db.cleanup().await;
}

/// Wait until kck has read and queued everything written so far (but, paused, refreshed nothing).
async fn wait_read(running: &Running, client: &tokio_postgres::Client) {
    let text: String = client
        .query_one(
            "SELECT pg_logical_emit_message(false, 'kck-test-sync', '')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mark: kck::lsn::Lsn = text.parse().unwrap();
    eventually("kck read up to the mark", TIMEOUT, || async {
        running
            .stats
            .acked
            .load(std::sync::atomic::Ordering::Relaxed)
            >= mark.0
    })
    .await;
}

#[tokio::test]
async fn a_thousand_updates_to_one_key_while_paused_cause_one_refresh() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write(dir.path(), &db, USER, "", "");
    let running = start(config.clone()).await;
    let addr = running.http_addr;
    assert_eq!(fetch(addr, "user/1").await.1["name"], json!("user 1"));
    running.refresher.pause();
    let mut sql = String::new();
    for i in 0..1000 {
        sql.push_str(&format!(
            "BEGIN; UPDATE users SET name = 'v{i}' WHERE id = 1; COMMIT;\n"
        ));
    }
    let pg = db.client().await;
    pg.batch_execute(&sql).await.unwrap();
    wait_read(&running, &pg).await;
    assert_eq!(running.store.queue_stats().await.unwrap().depth, 1);
    assert_eq!(stats_of(&running, "user").keys_refreshed, 0);
    running.refresher.resume();
    wait_drained(&running, &pg, TIMEOUT).await;
    assert_eq!(stats_of(&running, "user").keys_refreshed, 1);
    assert_eq!(fetch(addr, "user/1").await.1["name"], json!("v999"));
    assert_converged(&running, &pg, &config).await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn keys_read_most_recently_are_refreshed_first() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    // One worker, and one user refresh at a time: a worker starts its claimed tasks in order and the
    // primer's permits are handed out in the order asked, so the refreshes end in the order started.
    let primers = USER.replace("    shape: row\n", "    shape: row\n    concurrency: 1\n");
    let (config, _) = write(dir.path(), &db, &primers, "", "");
    let config = Config {
        refresh: kck::config::RefreshConfig {
            workers: 1,
            ..config.refresh.clone()
        },
        ..config
    };
    let running = start(config).await;
    let addr = running.http_addr;
    // Read in this order: user/4 last, so hottest.
    for id in [2, 5, 1, 3, 4] {
        let _ = fetch(addr, &format!("user/{id}")).await;
    }
    running.refresher.pause();
    let pg = db.client().await;
    // One transaction, so the tasks reach the queue together (in no particular order).
    pg.batch_execute("UPDATE users SET name = name || '!' WHERE id <= 5")
        .await
        .unwrap();
    wait_read(&running, &pg).await;
    assert_eq!(running.store.queue_stats().await.unwrap().depth, 5);
    running.refresher.resume();
    wait_drained(&running, &pg, TIMEOUT).await;
    let order = running.refresher.recent_refreshes();
    assert_eq!(order, ["user/4", "user/3", "user/1", "user/5", "user/2"]);
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn a_failing_primer_is_reported_and_does_not_block_the_others() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = r#"  - name: ratio
    key: "ratio/{id:int}"
    shape: value
    query: "SELECT 100 / n FROM nums WHERE id = $1"
    depends_on:
      - table: nums
        columns: { id: id }
"#
    .to_owned()
        + USER;
    let (config, _) = write(dir.path(), &db, &primers, "", "");
    let config = Config {
        refresh: kck::config::RefreshConfig {
            workers: 1,
            ..config.refresh.clone()
        },
        ..config
    };
    let running = start(config).await;
    let addr = running.http_addr;
    assert_eq!(fetch(addr, "ratio/1").await, (200, json!(100)));
    assert_eq!(fetch(addr, "ratio/2").await, (200, json!(50)));
    let _ = fetch(addr, "user/1").await;
    // From now on ratio/1's query fails (division by zero) every time.
    db.execute_batch("UPDATE nums SET n = 0 WHERE id = 1").await;
    eventually("ratio fails at least twice", TIMEOUT, || async {
        stats_of(&running, "ratio").failures >= 2
    })
    .await;
    // With a single worker, other keys and primers still refresh while it keeps failing.
    for i in 0..5 {
        db.execute_batch(&format!(
            "UPDATE users SET name = 'n{i}' WHERE id = 1; UPDATE nums SET n = {} WHERE id = 2",
            i + 1
        ))
        .await;
        crate::support::kck::eventually_equals(
            addr,
            "user/1",
            &json!({"id": 1, "name": format!("n{i}")}),
            TIMEOUT,
        )
        .await;
        crate::support::kck::eventually_equals(addr, "ratio/2", &json!(100 / (i + 1)), TIMEOUT)
            .await;
    }
    let stats = stats_of(&running, "ratio");
    assert!(
        stats.consecutive_failures >= 1 || stats.failures >= 2,
        "{stats:?}"
    );
    assert!(
        stats
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("division by zero")),
        "{stats:?}"
    );
    // The failing key keeps its last good value.
    assert_eq!(fetch(addr, "ratio/1").await, (200, json!(100)));
    // Fixed: it recovers.
    db.execute_batch("UPDATE nums SET n = 4 WHERE id = 1").await;
    crate::support::kck::eventually_equals(addr, "ratio/1", &json!(25), Duration::from_secs(60))
        .await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn keys_due_together_are_refreshed_in_one_batch_query() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = r#"  - name: orders_by_user
    key: "orders_by_user/{user_id:int}"
    shape: rows
    query: "SELECT id, total FROM orders WHERE user_id = $1 ORDER BY id"
    depends_on:
      - table: orders
        columns: { user_id: user_id }
    batch:
      key_column: kck_key
      query: "SELECT user_id AS kck_key, id, total FROM orders WHERE user_id = ANY($1) ORDER BY user_id, id"
  - name: order_total
    key: "order_total/{user_id:int}"
    shape: value
    query: "SELECT sum(total) FROM orders WHERE user_id = $1"
    depends_on:
      - table: orders
        columns: { user_id: user_id }
    batch:
      key_column: kck_key
      query: "SELECT u AS kck_key, (SELECT sum(total) FROM orders WHERE user_id = u) FROM unnest($1::bigint[]) u"
"#;
    let (config, _) = write(
        dir.path(),
        &db,
        primers,
        // The absent keys it fetches are refreshed too: kept at once.
        "  claim_batch: 50\n  absent_rows: keep\n",
        "",
    );
    let running = start(config.clone()).await;
    let addr = running.http_addr;
    for user in 1..=20 {
        assert_eq!(
            fetch(addr, &format!("orders_by_user/{user}")).await,
            (200, json!([]))
        );
        assert_eq!(
            fetch(addr, &format!("order_total/{user}")).await,
            (200, Value::Null)
        );
    }
    running.refresher.pause();
    let pg = db.client().await;
    pg.batch_execute(
        "INSERT INTO orders SELECT g, g % 20 + 1, g * 1.5 FROM generate_series(1, 100) g",
    )
    .await
    .unwrap();
    wait_read(&running, &pg).await;
    running.refresher.resume();
    wait_drained(&running, &pg, TIMEOUT).await;
    assert_converged(&running, &pg, &config).await;
    for primer in ["orders_by_user", "order_total"] {
        let stats = stats_of(&running, primer);
        assert_eq!(stats.keys_refreshed, 20, "{stats:?}");
        assert!(
            stats.batch_queries >= 1 && stats.batch_queries < 20,
            "{stats:?}"
        );
    }
    // Served bytes are the same as an unbatched computation's.
    let batched = running
        .store
        .get("orders_by_user/3")
        .await
        .unwrap()
        .unwrap()
        .value;
    let _ = post(
        addr,
        "/invalidate",
        json!({"key": "orders_by_user/3", "mode": "drop"}),
    )
    .await;
    let response = reqwest::get(format!("http://{addr}/fetch/orders_by_user/3"))
        .await
        .unwrap();
    assert_eq!(response.bytes().await.unwrap(), batched);
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_on_schedule_never_twice_at_once_and_report_errors() {
    let db = database(SCHEMA).await;
    db.execute_batch(
        r#"
        CREATE TABLE job_runs (id serial PRIMARY KEY, job text NOT NULL, overlap bool NOT NULL,
                               at timestamptz NOT NULL DEFAULT clock_timestamp());
        CREATE FUNCTION job_probe(job text) RETURNS void LANGUAGE plpgsql AS $$
        DECLARE alone bool;
        BEGIN
          alone := pg_try_advisory_xact_lock(hashtext(job));
          PERFORM pg_sleep(0.3);
          INSERT INTO job_runs (job, overlap) VALUES (job, NOT alone);
        END $$;
        "#,
    )
    .await;
    let jobs = r#"jobs:
  - name: slow
    interval: 100ms
    sql: SELECT job_probe('slow')
  - name: every_second
    cron: "* * * * * *"
    sql: SELECT job_probe('every_second')
  - name: broken
    interval: 200ms
    sql: SELECT no_such_function()
"#;
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write(dir.path(), &db, USER, "", jobs);
    let running = start(config.clone()).await;
    let mine = running.jobs.clone();
    // A second process sharing the store (the embedded store admits one process, so it is simulated
    // with a second lease holder on the same store).
    let (tx, rx) = tokio::sync::watch::channel(false);
    let source = kck::pg::Source::new(&config.source).unwrap();
    let (other, handles) = kck::jobs::spawn(
        &config.jobs,
        source,
        running.store.clone(),
        "second-process".into(),
        rx,
    );
    let pg = db.client().await;
    let count = |job: &'static str| {
        let pg = &pg;
        async move {
            let row = pg
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE overlap) FROM job_runs WHERE job = $1",
                    &[&job],
                )
                .await
                .unwrap();
            (row.get::<_, i64>(0), row.get::<_, i64>(1))
        }
    };
    eventually("slow ran 6 times", Duration::from_secs(60), || async {
        count("slow").await.0 >= 6
    })
    .await;
    eventually(
        "every_second ran twice",
        Duration::from_secs(60),
        || async { count("every_second").await.0 >= 2 },
    )
    .await;
    eventually("broken failed", Duration::from_secs(60), || async {
        status(&mine, "broken").failures + status(&other, "broken").failures >= 1
    })
    .await;
    // Status and metrics show the jobs.
    let addr = running.http_addr;
    let doc: Value = reqwest::get(format!("http://{addr}/status?history=false"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slow = doc["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["name"] == "slow"))
        .cloned()
        .unwrap_or_else(|| panic!("no job 'slow' in /status: {doc}"));
    assert_eq!(slow["schedule"], json!("interval 100ms"));
    eventually("metrics show the jobs", TIMEOUT, || async {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.contains("kck_job_runs_total{job=\"broken\",outcome=\"failed\"}")
            && text.contains("kck_job_last_failed{job=\"broken\"} 1")
    })
    .await;
    let _ = tx.send(true);
    for h in handles {
        h.await.unwrap();
    }
    running.stop().await.unwrap();
    assert_eq!(count("slow").await.1, 0, "two runs of one job overlapped");
    assert_eq!(
        count("every_second").await.1,
        0,
        "two runs of one job overlapped"
    );
    // Both holders ran `slow` or found it leased; together they ran it as often as it finished.
    let (a, b) = (status(&mine, "slow"), status(&other, "slow"));
    assert!(a.runs + b.runs >= 6, "{a:?} {b:?}");
    for s in [&a, &b] {
        if s.runs > 0 {
            assert!(
                s.last_duration_ms.is_some() && s.last_error.is_none(),
                "{s:?}"
            );
        }
    }
    assert_eq!(a.schedule, "interval 100ms");
    let broken = [status(&mine, "broken"), status(&other, "broken")];
    let failed = broken.iter().find(|s| s.failures > 0).expect("a failure");
    assert!(
        failed
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("no_such_function")),
        "{failed:?}"
    );
    db.cleanup().await;
}

fn status(jobs: &kck::jobs::Jobs, name: &str) -> kck::jobs::JobStatus {
    jobs.status()
        .into_iter()
        .find(|s| s.name == name)
        .expect("job status")
}

#[tokio::test]
async fn a_primer_concurrency_caps_its_refreshes_in_flight() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    // Each computation holds an advisory lock while it sleeps: `alone` is false if another computation of
    // the primer ran at the same time.
    let primers = r#"  - name: slow
    key: "slow/{id:int}"
    shape: row
    query: "SELECT u.id, pg_try_advisory_xact_lock(4711) AS alone, (SELECT 1 FROM pg_sleep(0.05)) AS slept, u.name FROM users u WHERE u.id = $1"
    depends_on:
      - table: users
        columns: { id: id }
    concurrency: 1
    # pg_try_advisory_xact_lock is volatile: kck refuses it without a ttl or refresh_interval.
    ttl: 1h
"#;
    let (config, _) = write(dir.path(), &db, primers, "  claim_batch: 1\n", "");
    let config = Config {
        refresh: kck::config::RefreshConfig {
            workers: 4,
            ..config.refresh.clone()
        },
        ..config
    };
    let running = start(config.clone()).await;
    let addr = running.http_addr;
    for id in 1..=12 {
        assert_eq!(
            fetch(addr, &format!("slow/{id}")).await.1["alone"],
            json!(true)
        );
    }
    running.refresher.pause();
    let pg = db.client().await;
    pg.batch_execute("UPDATE users SET name = name || '+' WHERE id <= 12")
        .await
        .unwrap();
    wait_read(&running, &pg).await;
    running.refresher.resume();
    wait_drained(&running, &pg, TIMEOUT).await;
    assert_eq!(stats_of(&running, "slow").keys_refreshed, 12);
    for id in 1..=12 {
        let entry = running
            .store
            .get(&format!("slow/{id}"))
            .await
            .unwrap()
            .unwrap();
        let value: Value = serde_json::from_slice(&entry.value).unwrap();
        assert!(value["name"].as_str().unwrap().ends_with('+'), "{value}");
        assert_eq!(
            value["alone"],
            json!(true),
            "two refreshes of the primer overlapped: {value}"
        );
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}
