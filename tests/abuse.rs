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
