//! Keys an attacker (or a bug) sends: too long, holding NUL, values Postgres refuses. None is stored, and
//! none holds freshness waits for everyone else.

use std::time::Duration;

use crate::support::kck::{config, fetch, start};
use crate::support::pg::database;

const SCHEMA: &str = r#"
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO items VALUES (1, 'one');
CREATE PUBLICATION kck_test FOR TABLE items;
"#;

const PRIMERS: &str = r#"
  - name: item
    key: "item/{id:int}"
    shape: value
    query: "SELECT name FROM items WHERE id = $1"
  - name: named
    key: "named/{name}"
    shape: value
    query: "SELECT id FROM items WHERE name = $1"
updaters:
  - name: rename
    params: [id:int, name:text]
    statements:
      - UPDATE items SET name = $2 WHERE id = $1
"#;

#[tokio::test]
async fn poisoned_keys_are_refused_and_never_hold_freshness_waits() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(config(dir.path(), &db.url, "kck_test", &db.name, PRIMERS)).await;
    let addr = running.http_addr;

    // NUL in a text parameter: 400, nothing registered.
    let (status, body) = fetch(addr, "named/a%00b").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_key_parameter", "{body}");
    assert!(!running.store.is_registered("named/a%00b").await.unwrap());
    // A value Postgres refuses (int4 out of range): 400, nothing registered.
    let (status, body) = fetch(addr, "item/99999999999").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        !running
            .store
            .is_registered("item/99999999999")
            .await
            .unwrap()
    );
    // A key longer than the limit: 414, nothing registered.
    let long = format!("named/{}", "x".repeat(5000));
    let (status, body) = fetch(addr, &long).await;
    assert_eq!(status, 414, "{body}");
    assert_eq!(body["error"]["code"], "key_too_long", "{body}");
    assert!(!running.store.is_registered(&long).await.unwrap());
    let batch = reqwest::Client::new()
        .post(format!("http://{addr}/fetch"))
        .json(&serde_json::json!({"keys": [long.clone(), "item/1"]}))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = batch.json().await.unwrap();
    assert_eq!(body["results"]["item/1"]["status"], 200, "{body}");
    assert!(!running.store.is_registered(&long).await.unwrap());

    // Freshness waits still end: a write, then a fetch that must see it.
    let client = db.client().await;
    let lsn: String = client
        .query_one(
            "WITH w AS (UPDATE items SET name = 'uno' WHERE id = 1 RETURNING 1) \
             SELECT pg_current_wal_insert_lsn()::text FROM w",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let answer = reqwest::get(format!(
        "http://{addr}/fetch/item/1?min_lsn={lsn}&timeout=10s"
    ))
    .await
    .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "\"uno\"");
    let queue = running.store.queue_stats().await.unwrap();
    assert_eq!(queue.depth, 0, "{queue:?}");
    // The issue's own case: `/fetch/x/%00` is a 400, and `wait=fresh` still answers `fresh: true`.
    let (status, body) = fetch(addr, "named/%00").await;
    assert_eq!(status, 400, "{body}");
    assert!(!running.store.is_registered("named/%00").await.unwrap());
    let answer = reqwest::Client::new()
        .post(format!(
            "http://{addr}/update/rename?wait=fresh&timeout=30s"
        ))
        .json(&serde_json::json!({"id": 1, "name": "eins"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["fresh"], true, "{body}");
    assert_eq!(fetch(addr, "item/1").await.1, "eins");
    tokio::time::sleep(Duration::from_millis(10)).await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Slow and idle clients: a connection that dribbles its headers, or sends nothing, is closed after
/// `http.header_read_timeout`; a flood of them past `http.max_connections` waits, and a normal request
/// still answers.
#[tokio::test]
async fn slow_and_idle_connections_are_closed_and_the_server_keeps_answering() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path = crate::support::kck::ConfigYaml {
        http_extra: "  header_read_timeout: 1s\n  max_connections: 16\n",
        ..crate::support::kck::ConfigYaml::new(&db.url, "kck_test", &db.name, PRIMERS)
    }
    .write(dir.path());
    let config = crate::support::kck::load(&path);
    assert_eq!(config.http.max_connections, 16);
    let running = start(config).await;
    let addr = running.http_addr;

    // 40 slowloris clients: a request line, then one header line every 300 ms.
    let mut slow = Vec::new();
    for _ in 0..40 {
        let client = tokio::spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                return true;
            };
            if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .is_err()
            {
                return true;
            }
            for i in 0..40 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if s.write_all(format!("X-{i}: y\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return true;
                }
            }
            // Still open after 12 s of dribbling?
            let mut buf = [0u8; 64];
            matches!(
                tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await,
                Ok(Ok(0)) | Ok(Err(_))
            )
        });
        slow.push(client);
    }
    // And 40 that connect and send nothing.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // A normal request answers while they wait (the cap frees as the timeout closes connections).
    let answer = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
        .get(format!("http://{addr}/fetch/item/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    // The idle ones were closed by the server.
    for mut s in idle {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection was not closed: {read:?}"
        );
    }
    let mut closed = 0;
    for client in slow {
        if client.await.unwrap() {
            closed += 1;
        }
    }
    assert_eq!(closed, 40, "slowloris connections left open");
    running.stop().await.unwrap();
    db.cleanup().await;
}

const PARKING_SCHEMA: &str = r#"
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, weight int NOT NULL);
INSERT INTO items VALUES (1, 'one', 1), (2, 'two', 0);
CREATE PUBLICATION kck_test FOR TABLE items;
"#;

const PARKING_PRIMERS: &str = r#"
  - name: item
    key: "item/{id:int}"
    shape: value
    query: "SELECT name FROM items WHERE id = $1"
  - name: ratio
    key: "ratio/{id:int}"
    shape: value
    query: "SELECT 10 / weight FROM items WHERE id = $1"
updaters:
  - name: rename
    params: [id:int, name:text]
    statements:
      - UPDATE items SET name = $2 WHERE id = $1
"#;

/// Issue 15: a key whose refresh fails every time (here a division by zero in its row, so the key itself
/// is valid) is parked after `refresh.park_after` attempts: `POST /update?wait=fresh` for other keys still
/// answers `fresh: true`, `/status` and the metrics show it, and a change that fixes its row unparks and
/// refreshes it.
#[tokio::test]
async fn a_key_whose_refresh_keeps_failing_is_parked_and_wait_fresh_still_ends() {
    let db = database(PARKING_SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path = crate::support::kck::ConfigYaml {
        refresh_extra: "  park_after: 2\n  parked_retry: 1h\n",
        ..crate::support::kck::ConfigYaml::new(&db.url, "kck_test", &db.name, PARKING_PRIMERS)
    }
    .write(dir.path());
    let config = crate::support::kck::load(&path);
    assert_eq!(config.refresh.park_after, 2);
    let running = start(config).await;
    let addr = running.http_addr;

    assert_eq!(fetch(addr, "item/1").await.0, 200);
    // The miss fails in Postgres (22012): 502, with the SQLSTATE and kck's words, not Postgres's text.
    let (status, body) = fetch(addr, "ratio/2").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "primer_failed", "{body}");
    assert_eq!(body["error"]["sqlstate"], "22012", "{body}");
    assert!(
        !body.to_string().contains("division by zero"),
        "the answer echoes Postgres's message: {body}"
    );
    // The key stays registered (it is valid); a change to its row queues a refresh that fails each time.
    assert!(running.store.is_registered("ratio/2").await.unwrap());
    let client = db.client().await;
    client
        .execute("UPDATE items SET name = 'deux' WHERE id = 2", &[])
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats = running.store.queue_stats().await.unwrap();
        if stats.parked == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the failing refresh was never parked: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Waits for everyone else still end.
    let answer = reqwest::Client::new()
        .post(format!(
            "http://{addr}/update/rename?wait=fresh&timeout=30s"
        ))
        .json(&serde_json::json!({"id": 1, "name": "uno"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["fresh"], true, "{body}");
    assert_eq!(fetch(addr, "item/1").await.1, "uno");

    // Visible in /status and in the metrics.
    let (status, body) = crate::support::kck::get_json(&format!("http://{addr}/status")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queue"]["parked"], 1, "{body}");
    let listed = body["queue"]["parked_tasks"].to_string();
    assert!(listed.contains("ratio/2"), "{body}");
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l == "kck_queue_parked 1"),
        "no kck_queue_parked gauge of 1"
    );

    // A change that fixes the row unparks the key, and its refresh works.
    let lsn: String = client
        .query_one(
            "WITH w AS (UPDATE items SET weight = 5 WHERE id = 2 RETURNING 1) \
             SELECT pg_current_wal_insert_lsn()::text FROM w",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let answer = reqwest::get(format!(
        "http://{addr}/fetch/ratio/2?min_lsn={lsn}&timeout=30s"
    ))
    .await
    .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "2");
    let stats = running.store.queue_stats().await.unwrap();
    assert_eq!(stats.parked, 0, "{stats:?}");
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Issue 15: one `POST /fetch` of 999 distinct misses (the audit's batch amplification) computes at most
/// `http.max_batch_misses` (default 100) of them; the rest answer `429 too_many_misses` in the results
/// and are neither computed nor registered.
#[tokio::test]
async fn a_batch_of_misses_computes_at_most_its_budget() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &db.url, "kck_test", &db.name, PRIMERS);
    assert_eq!(config.http.max_batch_misses, 100);
    let running = start(config).await;
    let addr = running.http_addr;
    assert_eq!(fetch(addr, "item/1").await.0, 200);
    let mut keys: Vec<String> = (1000..1999).map(|i| format!("item/{i}")).collect();
    keys.push("item/1".into());
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/fetch"))
        .json(&serde_json::json!({ "keys": keys }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let results = body["results"].as_object().unwrap();
    let with = |status: u64| results.values().filter(|r| r["status"] == status).count();
    // The hit costs nothing; 100 misses are computed, 899 are refused.
    assert_eq!(results["item/1"]["status"], 200, "{body}");
    assert_eq!((with(200), with(429)), (101, 899));
    let refused: Vec<&String> = results
        .iter()
        .filter(|(_, r)| r["status"] == 429)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        results[refused[0].as_str()]["error"]["code"],
        "too_many_misses"
    );
    for key in refused {
        assert!(!running.store.is_registered(key).await.unwrap(), "{key}");
    }
    let primes = running.refresher.primer_health("item").primes;
    assert_eq!(
        primes, 101,
        "primer queries run for misses (item/1's first fetch included)"
    );
    running.stop().await.unwrap();
    db.cleanup().await;
}

const SLOW_PRIMERS: &str = r#"
  - name: slow
    key: "slow/{id:int}"
    shape: value
    ttl: 1h
    query: "SELECT name FROM items, pg_sleep(1) WHERE id = $1"
"#;

/// Issue 15: misses computed at once are bounded (`http.max_concurrent_misses`); one more waits
/// `http.miss_wait`, then answers `503 too_many_misses` with `Retry-After`, and the server keeps answering.
#[tokio::test]
async fn misses_past_the_global_limit_are_shed_with_retry_after() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path = crate::support::kck::ConfigYaml {
        http_extra: "  max_concurrent_misses: 1\n  miss_wait: 100ms\n",
        ..crate::support::kck::ConfigYaml::new(&db.url, "kck_test", &db.name, SLOW_PRIMERS)
    }
    .write(dir.path());
    let running = start(crate::support::kck::load(&path)).await;
    let addr = running.http_addr;
    // Five distinct misses at once, each query taking a second, one slot.
    let answers = futures_util::future::join_all((1..=5).map(|i| async move {
        let response = reqwest::get(format!("http://{addr}/fetch/slow/{i}"))
            .await
            .unwrap();
        let retry_after = response.headers().get("retry-after").cloned();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        (status, retry_after, body)
    }))
    .await;
    let shed: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert!(
        answers.iter().any(|a| a.0 == 200),
        "no miss was computed: {answers:?}"
    );
    assert!(!shed.is_empty(), "no miss was shed: {answers:?}");
    for (_, retry_after, body) in &shed {
        assert_eq!(body["error"]["code"], "too_many_misses", "{body}");
        assert!(retry_after.is_some(), "503 without Retry-After: {body}");
    }
    assert_eq!(
        answers.iter().filter(|a| a.0 == 200 || a.0 == 503).count(),
        5,
        "{answers:?}"
    );
    // Answering still: health, and the slot is free again.
    assert_eq!(
        reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(fetch(addr, "slow/1").await.0, 200);
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Issue 15: with `http.allowed_hosts`, a request for another host (DNS rebinding reaching a loopback
/// kck from a browser) answers `421 host_not_allowed` as JSON, whatever its route.
#[tokio::test]
async fn requests_for_hosts_not_allowed_are_refused() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path = crate::support::kck::ConfigYaml {
        http_extra: "  allowed_hosts: [localhost, KCK.internal:8080]\n",
        ..crate::support::kck::ConfigYaml::new(&db.url, "kck_test", &db.name, PRIMERS)
    }
    .write(dir.path());
    let config = crate::support::kck::load(&path);
    assert_eq!(
        config.http.allowed_hosts,
        ["localhost", "kck.internal:8080"]
    );
    let running = start(config).await;
    let addr = running.http_addr;
    let client = reqwest::Client::new();
    let ask = |host: String, route: &'static str| {
        let client = client.clone();
        async move {
            let response = client
                .get(format!("http://{addr}{route}"))
                .header("host", host)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    for (host, route) in [
        ("evil.example".to_string(), "/fetch/item/1"),
        (format!("evil.example:{}", addr.port()), "/status"),
        (addr.to_string(), "/healthz"),
        ("kck.internal:9999".to_string(), "/fetch/item/1"),
    ] {
        let (status, text) = ask(host.clone(), route).await;
        assert_eq!(status, 421, "{host} {route}: {text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["error"]["code"], "host_not_allowed", "{text}");
    }
    for host in [
        "localhost".to_string(),
        format!("LocalHost:{}", addr.port()),
        "kck.internal:8080".to_string(),
    ] {
        let (status, text) = ask(host.clone(), "/fetch/item/1").await;
        assert_eq!(status, 200, "{host}: {text}");
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Issue 15: at `KCK_LOG=debug` the log carries no parameter or row value: an updater's argument, the
/// row it writes and the cached value that reflects it appear nowhere (tokio-postgres prints every bound
/// parameter at debug; the binary's subscriber leaves those lines out).
#[tokio::test]
async fn debug_logs_carry_no_parameter_or_row_values() {
    const SECRET: &str = "zebra-secret-7731";
    let db = database(PARKING_SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path = crate::support::kck::ConfigYaml::new(&db.url, "kck_test", &db.name, PARKING_PRIMERS)
        .write(dir.path());
    let log = dir.path().join("kck.log");
    let (mut child, addr) =
        crate::support::kck::spawn_kck_at(&path, Some((log.as_path(), "debug"))).await;
    assert_eq!(fetch(addr, "item/1").await.0, 200);
    let answer = reqwest::Client::new()
        .post(format!(
            "http://{addr}/update/rename?wait=fresh&timeout=30s"
        ))
        .json(&serde_json::json!({"id": 1, "name": SECRET}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(fetch(addr, "item/1").await.1, SECRET);
    // A miss with a key value Postgres refuses, and one whose query fails: their errors are logged too.
    assert_eq!(fetch(addr, "item/7731000000").await.0, 400);
    assert_eq!(fetch(addr, "ratio/2").await.0, 502);
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    // The errors of the two misses are logged (without the values their Postgres messages quote).
    assert!(
        text.contains("SQLSTATE 22003") && text.contains("SQLSTATE 22012"),
        "the misses' errors are not logged:\n{text}"
    );
    for value in [SECRET, "7731000000"] {
        let found: Vec<&str> = text.lines().filter(|l| l.contains(value)).collect();
        // The key's own text may be logged (keys are, by design); the value alone may not.
        let outside_keys: Vec<&&str> = found
            .iter()
            .filter(|l| !l.contains(&format!("item/{value}")))
            .collect();
        assert!(
            outside_keys.is_empty(),
            "the log carries the value {value}:\n{}",
            outside_keys
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    db.cleanup().await;
}

/// POST /fetch of `keys`; the `results` object.
async fn fetch_batch(addr: std::net::SocketAddr, keys: &[String]) -> serde_json::Value {
    let answer = reqwest::Client::new()
        .post(format!("http://{addr}/fetch"))
        .json(&serde_json::json!({ "keys": keys }))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    body["results"].clone()
}

/// Random ids that have no row: 20,000 misses leave the store within `store.max_entries` (most are not
/// even kept: `refresh.absent_rows: second_miss`), those fetched twice are kept and evicted least
/// recently used first, the server answers throughout, and present keys (and an absent one whose row
/// appears) still converge.
#[tokio::test]
async fn absent_ids_leave_the_store_within_its_bound() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    // 1,000 misses per request (the default budget is 100): this test is about the store's bound.
    let path = crate::support::kck::ConfigYaml {
        store_extra: "  max_entries: 500\n  max_bytes: 1MB\n",
        http_extra: "  max_batch_misses: 1000\n",
        ..crate::support::kck::ConfigYaml::new(&db.url, "kck_test", &db.name, PRIMERS)
    }
    .write(dir.path());
    let config = crate::support::kck::load(&path);
    let running = start(config).await;
    let addr = running.http_addr;
    let store = running.store.clone();

    // Fetched once before the row exists: answered null, not kept; the row appears, the next fetch
    // computes it fresh.
    let (status, body) = fetch(addr, "item/5").await;
    assert_eq!(
        (status, body.clone()),
        (200, serde_json::Value::Null),
        "{body}"
    );
    assert!(!store.is_registered("item/5").await.unwrap());
    // Fetched twice: kept (null), and refreshed when its row appears.
    for _ in 0..2 {
        let (status, _) = fetch(addr, "item/6").await;
        assert_eq!(status, 200);
    }
    assert!(store.is_registered("item/6").await.unwrap());

    // 20,000 absent ids, 1,000 per request.
    let mut max_keys = 0;
    for batch in 0..20 {
        let keys: Vec<String> = (0..1000)
            .map(|i| format!("item/{}", 1_000_000 + batch * 1000 + i))
            .collect();
        let results = fetch_batch(addr, &keys).await;
        for k in &keys {
            assert_eq!(results[k]["status"], 200, "{k}: {}", results[k]);
        }
        let cap = store.capacity().unwrap();
        assert!(cap.keys <= 500, "{cap:?}");
        max_keys = max_keys.max(cap.keys);
    }
    let after_once = store.capacity().unwrap();
    eprintln!("after 20,000 absent misses: {after_once:?}, at most {max_keys} keys");
    assert!(
        after_once.keys <= 3,
        "first misses are not kept: {after_once:?}"
    );
    // 2,000 absent ids fetched twice are kept, within the bound: the least recently used are evicted.
    for round in 0..2 {
        for batch in 0..2 {
            let keys: Vec<String> = (0..1000)
                .map(|i| format!("item/{}", 2_000_000 + batch * 1000 + i))
                .collect();
            let results = fetch_batch(addr, &keys).await;
            assert_eq!(results[&keys[0]]["status"], 200, "round {round}");
        }
    }
    let after_twice = store.capacity().unwrap();
    eprintln!("after 2,000 ids fetched twice: {after_twice:?}");
    assert!(after_twice.keys <= 500, "{after_twice:?}");
    assert!(
        after_twice.bytes <= after_twice.max_bytes,
        "{after_twice:?}"
    );
    assert!(after_twice.evictions >= 1500, "{after_twice:?}");
    // The queue holds no junk.
    let queue = store.queue_stats().await.unwrap();
    assert!(queue.depth <= 10, "{queue:?}");

    // The server answers, and present keys converge.
    let (status, body) = fetch(addr, "item/1").await;
    assert_eq!((status, body), (200, serde_json::json!("one")));
    let client = db.client().await;
    let lsn: String = client
        .query_one(
            "WITH w AS (UPDATE items SET name = 'uno' WHERE id = 1 RETURNING 1), \
             i AS (INSERT INTO items VALUES (5, 'five'), (6, 'six') RETURNING 1) \
             SELECT pg_current_wal_insert_lsn()::text FROM (SELECT count(*) FROM w, i) x",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for (key, want) in [("item/1", "uno"), ("item/5", "five"), ("item/6", "six")] {
        let answer = reqwest::get(format!(
            "http://{addr}/fetch/{key}?min_lsn={lsn}&timeout=30s"
        ))
        .await
        .unwrap();
        assert_eq!(answer.status(), 200, "{key}");
        assert_eq!(answer.text().await.unwrap(), format!("\"{want}\""), "{key}");
    }
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("kck_store_evictions_total"), "{metrics}");
    assert!(metrics.contains("kck_store_max_keys 500"), "{metrics}");
    running.stop().await.unwrap();
    db.cleanup().await;
}
