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
    let path = crate::support::kck::ConfigYaml::new(&db.url, "kck_test", &db.name, PRIMERS)
        .write(dir.path());
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "http:\n  bind: 127.0.0.1:0\n",
        "http:\n  bind: 127.0.0.1:0\n  header_read_timeout: 1s\n  max_connections: 16\n",
    );
    std::fs::write(&path, text).unwrap();
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
    let path = crate::support::kck::ConfigYaml::new(&db.url, "kck_test", &db.name, PRIMERS)
        .write(dir.path());
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "  kind: embedded\n",
        "  kind: embedded\n  max_entries: 500\n  max_bytes: 1MB\n",
    );
    std::fs::write(&path, text).unwrap();
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
