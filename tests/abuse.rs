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
