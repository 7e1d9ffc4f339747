//! End-to-end tests of the HTTP API: updaters, freshness contracts, ETags, batch fetch, JWT, hygiene and
//! the OpenAPI document. A real Postgres 15 (tests/support/pg.rs), kck in process, real HTTP on 127.0.0.1.
//!
//! The JWT keys under `tests/fixtures/` are test-only (see its README). Timings are never asserted: waits
//! are bounded from above only.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::kck::{eventually_equals, start, wait_drained, write_config};
use crate::support::pg::{TestDb, database};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kck::app::Running;
use kck::config::Config;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = r#"
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email varchar(40) UNIQUE);
CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL REFERENCES users,
                     total numeric(12,2) NOT NULL CONSTRAINT total_not_negative CHECK (total >= 0),
                     note text);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE settings (k text PRIMARY KEY, v text);
CREATE FUNCTION refuse(reason text) RETURNS void LANGUAGE plpgsql AS
  $$ BEGIN RAISE EXCEPTION '%', reason; END $$;
CREATE PUBLICATION kck_test FOR TABLE users, orders, settings;
"#;

const PRIMERS: &str = r#"
  - name: user
    key: "user/{id:int}"
    shape: row
    query: "SELECT id, name, email FROM users WHERE id = $1"
    cache_control: "private, max-age=5"
    depends_on:
      - table: users
        columns: { id: id }
  - name: orders_by_user
    key: "orders_by_user/{user_id:int}"
    query: "SELECT id, total, note FROM orders WHERE user_id = $1 ORDER BY id"
    depends_on:
      - table: orders
        columns: { user_id: user_id }
  - name: setting
    key: "setting/{k}"
    shape: value
    query: "SELECT v FROM settings WHERE k = $1"
    depends_on:
      - table: settings
  - name: slow
    key: "slow/{id:int}"
    shape: value
    query: "SELECT $1::bigint FROM pg_sleep(1)"
    depends_on:
      - table: settings
"#;

const UPDATERS: &str = r#"
updaters:
  - name: add_user
    params: [id:int, name:text, { name: email, type: text, nullable: true }]
    statements:
      - INSERT INTO users (id, name, email) VALUES ($1, $2, $3)
  - name: place_order
    params: [id:int, user_id:int, total:numeric, { name: note, type: text, nullable: true }]
    statements:
      - INSERT INTO orders (id, user_id, total, note) VALUES ($1, $2, $3, $4)
      # Uses only $2: $1 is declared text for Postgres, as it is unused here.
      - UPDATE users SET name = name WHERE id = $2
  - name: order_then_user
    params: [order_id:int, user_id:int]
    statements:
      - INSERT INTO orders (id, user_id, total) VALUES ($1, $2, 1)
      - INSERT INTO users (id, name) VALUES ($2, 'again')
  - name: set
    params: [k:text, v:json]
    statements:
      - INSERT INTO settings VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v
  - name: refuse
    params: [reason]
    statements:
      - SELECT refuse($1)
  - name: slow_set
    params: [v:text]
    statements:
      - SELECT pg_sleep(1)
      - INSERT INTO settings VALUES ('slow', $1) ON CONFLICT (k) DO UPDATE SET v = excluded.v
updaters_dir: updaters
"#;

/// The `.sql` form of an updater, in `updaters_dir`.
const RENAME_SQL: &str = "-- kck:updater
-- params: [id:int, name:text]
UPDATE users SET name = $2
 WHERE id = $1;
";

/// A config for `db` with the test primers and updaters, plus `extra` top-level YAML; `env` is the
/// environment it is loaded with (on top of the real one).
fn test_config(dir: &Path, db: &TestDb, extra: &str, env: &[(&str, &str)]) -> Config {
    let updaters = dir.join("updaters");
    std::fs::create_dir_all(&updaters).unwrap();
    std::fs::write(updaters.join("rename_user.sql"), RENAME_SQL).unwrap();
    let path = write_config(
        dir,
        &db.url,
        "kck_test",
        &db.name,
        PRIMERS,
        &format!("{UPDATERS}\n{extra}"),
    );
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::load_with_env(&path, |name| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(name).ok())
    })
    .unwrap_or_else(|e| panic!("test config does not load: {e}"))
}

/// One HTTP answer.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.text))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }

    /// The error code of a JSON error body, checking the stable shape.
    fn code(&self) -> String {
        let body = self.json();
        let error = &body["error"];
        assert!(
            error["code"].is_string() && error["message"].is_string(),
            "not the error shape: {body}"
        );
        error["code"].as_str().unwrap_or_default().to_owned()
    }
}

struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    fn new(running: &Running) -> Http {
        Http {
            base: format!("http://{}", running.http_addr),
            client: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Answer {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method.clone(), &url);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        if let Some((content_type, body)) = body {
            if !content_type.is_empty() {
                request = request.header("content-type", content_type);
            }
            request = request.body(body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        Answer {
            status: response.status(),
            headers: response.headers().clone(),
            text: response.text().await.expect("body"),
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, &[], None).await
    }

    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send(Method::GET, path, headers, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.post_with(path, body, &[]).await
    }

    async fn post_with(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> Answer {
        let body = serde_json::to_vec(&body).unwrap();
        self.send(
            Method::POST,
            path,
            headers,
            Some(("application/json", body)),
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------------------
// Updaters

#[tokio::test]
async fn updaters_run_their_statements_in_one_transaction() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db, "", &[])).await;
    let http = Http::new(&running);
    let pg = db.client().await;

    let a = http
        .post(
            "/update/add_user",
            json!({"id": 1, "name": "ada", "email": "ada@example.com"}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let body = a.json();
    assert_eq!(body["rows"], json!([1]));
    let lsn = body["lsn"].as_str().expect("an LSN");
    assert!(lsn.parse::<kck::lsn::Lsn>().is_ok(), "{lsn}");
    // A nullable parameter may be left out; numeric keeps its digits.
    let a = http
        .post("/update/add_user", json!({"id": 2, "name": "bob"}))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = http
        .post(
            "/update/place_order",
            json!({"id": 10, "user_id": 1, "total": "1234567890.05"}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["rows"], json!([1, 1]));
    let total: String = pg
        .query_one("SELECT total::text FROM orders WHERE id = 10", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, "1234567890.05");
    // The .sql updater.
    let a = http
        .post("/update/rename_user", json!({"id": 2, "name": "bobby"}))
        .await;
    assert_eq!(
        (a.status.as_u16(), a.json()["rows"].clone()),
        (200, json!([1]))
    );

    // The second statement fails: the first is rolled back.
    let a = http
        .post(
            "/update/order_then_user",
            json!({"order_id": 11, "user_id": 1}),
        )
        .await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(a.code(), "constraint_violation");
    let error = &a.json()["error"];
    assert_eq!(error["constraint"], "users_pkey");
    assert_eq!(error["statement"], 2);
    assert_eq!(error["sqlstate"], "23505");
    let count: i64 = pg
        .query_one("SELECT count(*) FROM orders WHERE id = 11", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "the first statement must have been rolled back");

    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn updater_errors_name_the_parameter_or_constraint_and_write_nothing() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &db, "", &[]);
    config.http.body_limit = 2048;
    let running = start(config).await;
    let http = Http::new(&running);
    let pg = db.client().await;
    pg.batch_execute("INSERT INTO users VALUES (1, 'ada', 'ada@example.com')")
        .await
        .unwrap();

    let a = http.post("/update/nope", json!({})).await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (404, "unknown_updater".into())
    );

    let cases = [
        (json!({"name": "x"}), "missing_parameter", "id"),
        (
            json!({"id": 5, "name": "x", "nickname": "y"}),
            "unknown_parameter",
            "nickname",
        ),
        (json!({"id": "five", "name": "x"}), "bad_parameter", "id"),
        (json!({"id": 5.5, "name": "x"}), "bad_parameter", "id"),
        (json!({"id": 5, "name": 7}), "bad_parameter", "name"),
        (json!({"id": 5, "name": null}), "bad_parameter", "name"),
    ];
    for (body, code, param) in cases {
        let a = http.post("/update/add_user", body.clone()).await;
        assert_eq!(a.status, 400, "{body}: {}", a.text);
        assert_eq!(a.code(), code, "{body}");
        assert_eq!(a.json()["error"]["parameter"], param, "{body}");
        assert!(
            a.text.contains(param),
            "{body}: the message names it: {}",
            a.text
        );
    }
    let a = http
        .post(
            "/update/place_order",
            json!({"id": 1, "user_id": 1, "total": "12,5"}),
        )
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (400, "bad_parameter".into()));

    // Constraints: unique, check, foreign key.
    let a = http
        .post(
            "/update/add_user",
            json!({"id": 2, "name": "x", "email": "ada@example.com"}),
        )
        .await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (409, "constraint_violation".into())
    );
    assert_eq!(a.json()["error"]["constraint"], "users_email_key");
    let a = http
        .post(
            "/update/place_order",
            json!({"id": 1, "user_id": 1, "total": -1}),
        )
        .await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(a.json()["error"]["constraint"], "total_not_negative");
    let a = http
        .post(
            "/update/place_order",
            json!({"id": 1, "user_id": 99, "total": 1}),
        )
        .await;
    assert_eq!(a.status, 409, "{}", a.text);
    assert_eq!(a.json()["error"]["constraint"], "orders_user_id_fkey");
    // A value Postgres refuses (too long for varchar(40)).
    let long = "x".repeat(50);
    let a = http
        .post(
            "/update/add_user",
            json!({"id": 3, "name": "x", "email": long}),
        )
        .await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (400, "bad_parameter_value".into())
    );
    // An exception raised by the database's own code.
    let a = http
        .post("/update/refuse", json!({"reason": "not on a Sunday"}))
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (422, "rejected".into()));
    assert!(a.text.contains("not on a Sunday"), "{}", a.text);

    // Body problems.
    let a = http
        .send(
            Method::POST,
            "/update/add_user",
            &[],
            Some(("text/plain", b"{\"id\": 1}".to_vec())),
        )
        .await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (415, "unsupported_media_type".into())
    );
    let a = http
        .send(
            Method::POST,
            "/update/add_user",
            &[],
            Some(("application/json", b"{\"id\": ".to_vec())),
        )
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (400, "bad_json".into()));
    let big = json!({"id": 4, "name": "y".repeat(4096)});
    let a = http.post("/update/add_user", big).await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (413, "body_too_large".into())
    );
    let a = http.post("/update/add_user?wait=soon", json!({})).await;
    assert_eq!((a.status.as_u16(), a.code()), (400, "bad_query".into()));

    let users: i64 = pg
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    let orders: i64 = pg
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((users, orders), (1, 0), "nothing may have been written");
    running.stop().await.unwrap();
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------------------
// Freshness

#[tokio::test]
async fn wait_fresh_answers_once_the_cache_reflects_the_write() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db, "", &[])).await;
    let http = Http::new(&running);
    db.execute_batch("INSERT INTO users VALUES (1, 'ada', NULL)")
        .await;
    // Cached before the writes.
    assert_eq!(http.get("/fetch/orders_by_user/1").await.json(), json!([]));
    assert_eq!(http.get("/fetch/setting/color").await.json(), Value::Null);
    for i in 1..=5 {
        let a = http
            .post(
                "/update/place_order?wait=fresh&timeout=20s",
                json!({"id": i, "user_id": 1, "total": i, "note": format!("n{i}")}),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.json()["fresh"], true);
        // Read your write: the very next plain fetch sees it.
        let orders = http.get("/fetch/orders_by_user/1").await.json();
        assert_eq!(
            orders.as_array().map(Vec::len),
            Some(i as usize),
            "after order {i}: {orders}"
        );
        let a = http
            .post(
                "/update/set?wait=fresh",
                json!({"k": "color", "v": {"round": i}}),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(
            http.get("/fetch/setting/color").await.json(),
            json!(json!({"round": i}).to_string()),
            "the json parameter is stored as its JSON text"
        );
    }
    // A wait too short for the refresh: 202, the write committed but not yet reflected; never an error
    // status a client might retry the write on.
    let a = http
        .post(
            "/update/place_order?wait=fresh&timeout=1ms",
            json!({"id": 99, "user_id": 1, "total": 1, "note": "late"}),
        )
        .await;
    match a.status.as_u16() {
        200 => assert_eq!(a.json()["fresh"], true),
        202 => {
            let body = a.json();
            assert_eq!(body["fresh"], false, "{body}");
            assert!(body["lsn"].is_string(), "{body}");
            assert!(
                body["not_fresh"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("do not retry"),
                "{body}"
            );
        }
        other => panic!("wait=fresh answered {other}: {}", a.text),
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn min_lsn_waits_for_a_write_made_directly_in_postgres() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db, "", &[])).await;
    let http = Http::new(&running);
    let pg = db.client().await;
    pg.batch_execute("INSERT INTO users VALUES (7, 'before', NULL), (8, 'other', NULL)")
        .await
        .unwrap();
    assert_eq!(http.get("/fetch/user/7").await.json()["name"], "before");
    assert_eq!(http.get("/fetch/user/8").await.json()["name"], "other");

    for round in 0..5 {
        let name = format!("after-{round}");
        pg.execute("UPDATE users SET name = $1 WHERE id = 7", &[&name])
            .await
            .unwrap();
        let lsn: String = pg
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let a = http
            .get(&format!("/fetch/user/7?min_lsn={lsn}&timeout=20s"))
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.json()["name"], name.as_str());
        // A key the write did not touch answers too, although its own LSN is older.
        let a = http
            .get(&format!("/fetch/user/8?min_lsn={lsn}&timeout=20s"))
            .await;
        assert_eq!(
            (a.status.as_u16(), a.json()["name"].clone()),
            (200, json!("other"))
        );
        // A miss is computed from a snapshot that reflects it.
        pg.execute(
            "INSERT INTO users VALUES ($1, 'new', NULL)",
            &[&(100 + round as i64)],
        )
        .await
        .unwrap();
        let lsn: String = pg
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let a = http
            .get(&format!(
                "/fetch/user/{}?min_lsn={lsn}&timeout=20s",
                100 + round
            ))
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.json()["name"], "new");
        assert_eq!(a.header("kck-cache"), "miss");
    }

    // A position kck will not reach in time: 504 that says how far behind it is.
    let a = http
        .get("/fetch/user/7?min_lsn=FFFFFFF/0&timeout=200ms")
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (504, "not_fresh".into()));
    let error = &a.json()["error"];
    assert_eq!(error["min_lsn"], "FFFFFFF/0");
    assert!(error["entry_lsn"].is_string(), "{error}");
    assert!(error["received_lsn"].is_string(), "{error}");
    assert!(error["bytes_behind"].as_u64().unwrap_or(0) > 0, "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or("")
            .contains("bytes behind"),
        "{error}"
    );
    // Bad values are 400s.
    for (query, code) in [
        ("min_lsn=16", "bad_min_lsn"),
        ("min_lsn=0/1&timeout=soon", "bad_timeout"),
        ("min_lsn=0/1&timeout=1h", "bad_timeout"),
        ("min_lsn=0/1&wait_change=x", "bad_query"),
        ("min-lsn=0/1", "bad_query"),
        ("timeout=1s", "bad_query"),
    ] {
        let a = http.get(&format!("/fetch/user/7?{query}")).await;
        assert_eq!((a.status.as_u16(), a.code()), (400, code.into()), "{query}");
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Split roles over one shared store (as processes share ScyllaDB): the process serving HTTP does not
/// stream, and learns how far the stream has durably queued from what the streaming process publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_waits_work_when_another_process_streams() {
    use std::sync::Arc;
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn kck::store::Store> =
        Arc::new(kck::store::embedded::EmbeddedStore::open(&dir.path().join("shared")).unwrap());
    let options = kck::app::RunOptions {
        shared_store: Some(store.clone()),
        ..Default::default()
    };
    let with_roles = |roles: &str| {
        let mut c = test_config(dir.path(), &db, "", &[]);
        c.roles = kck::config::Roles::parse_list(roles).unwrap();
        c
    };
    let streamer = kck::app::start(with_roles("replication,refresh"), options.clone())
        .await
        .unwrap();
    let server = kck::app::start(with_roles("http"), options).await.unwrap();
    let http = Http::new(&server);
    db.execute_batch("INSERT INTO users VALUES (1, 'ada', NULL)")
        .await;
    assert_eq!(http.get("/fetch/orders_by_user/1").await.json(), json!([]));
    assert_eq!(http.get("/fetch/user/1").await.json()["name"], "ada");
    for i in 1..=3 {
        let a = http
            .post(
                "/update/place_order?wait=fresh&timeout=20s",
                json!({"id": i, "user_id": 1, "total": i}),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        let orders = http.get("/fetch/orders_by_user/1").await.json();
        assert_eq!(
            orders.as_array().map(Vec::len),
            Some(i as usize),
            "{orders}"
        );
        // The user's key did not change: fresh as of the update's LSN all the same.
        let lsn = a.json()["lsn"].as_str().unwrap().to_owned();
        let a = http
            .get(&format!("/fetch/user/1?min_lsn={lsn}&timeout=20s"))
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    server.stop().await.unwrap();
    streamer.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn etags_revalidate_and_cache_control_comes_from_the_primer() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db, "", &[])).await;
    let http = Http::new(&running);
    let pg = db.client().await;
    pg.batch_execute("INSERT INTO users VALUES (1, 'ada', NULL)")
        .await
        .unwrap();
    assert_eq!(http.get("/fetch/user/1").await.status, 200);
    wait_drained(&running, &pg, TIMEOUT).await;

    let first = http.get("/fetch/user/1").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("cache-control"), "private, max-age=5");
    let etag = first.header("etag").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let again = http.get("/fetch/user/1").await;
    assert_eq!(again.header("etag"), etag, "a hit keeps its version");
    assert_eq!(
        http.get("/fetch/setting/x").await.header("cache-control"),
        "no-cache",
        "the default makes caches revalidate"
    );

    for tag in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"nope\", {etag}"),
        "*".into(),
    ] {
        let a = http
            .get_with("/fetch/user/1", &[("if-none-match", &tag)])
            .await;
        assert_eq!(a.status, 304, "If-None-Match: {tag}");
        assert!(a.text.is_empty());
        assert_eq!(a.header("etag"), etag);
        assert_eq!(a.header("cache-control"), "private, max-age=5");
    }
    let a = http
        .get_with("/fetch/user/1", &[("if-none-match", "\"other\"")])
        .await;
    assert_eq!(a.status, 200);

    // A change that leaves the value as it was: recomputed (its LSN moves on), same bytes, same tag.
    let lsn = again.header("kck-lsn").to_owned();
    pg.batch_execute("UPDATE users SET name = name WHERE id = 1")
        .await
        .unwrap();
    wait_drained(&running, &pg, TIMEOUT).await;
    let same = http
        .get_with("/fetch/user/1", &[("if-none-match", &etag)])
        .await;
    assert_eq!(
        same.status, 304,
        "an identical recomputation keeps its version"
    );
    assert_eq!(same.header("etag"), etag);
    assert_ne!(same.header("kck-lsn"), lsn, "the entry was recomputed");

    pg.batch_execute("UPDATE users SET name = 'changed' WHERE id = 1")
        .await
        .unwrap();
    eventually_equals(
        running.http_addr,
        "user/1",
        &json!({"id": 1, "name": "changed", "email": null}),
        TIMEOUT,
    )
    .await;
    let a = http
        .get_with("/fetch/user/1", &[("if-none-match", &etag)])
        .await;
    assert_eq!(a.status, 200, "a new version answers in full");
    assert_ne!(a.header("etag"), etag);
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn wait_change_long_polls_until_the_value_changes() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db, "", &[])).await;
    let http = Http::new(&running);
    let pg = db.client().await;
    pg.batch_execute("INSERT INTO settings VALUES ('mode', 'a')")
        .await
        .unwrap();
    assert_eq!(http.get("/fetch/setting/mode").await.status, 200);
    // Let the refresh the insert queued settle: a recomputation is a new version.
    wait_drained(&running, &pg, TIMEOUT).await;
    let first = http.get("/fetch/setting/mode").await;
    let etag = first.header("etag").to_owned();

    // Nothing changes: 304 with the same version when the timeout passes.
    let a = http
        .get(&format!(
            "/fetch/setting/mode?wait_change={etag}&timeout=300ms"
        ))
        .await;
    assert_eq!(a.status, 304);
    assert_eq!(a.header("etag"), etag);

    // A change while the poll waits answers it.
    let poll = {
        let base = http.base.clone();
        let etag = etag.clone();
        tokio::spawn(async move {
            let url = format!("{base}/fetch/setting/mode?wait_change={etag}&timeout=30s");
            let response = reqwest::get(&url).await.unwrap();
            let status = response.status();
            let etag = response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (status, etag, response.text().await.unwrap())
        })
    };
    pg.batch_execute("UPDATE settings SET v = 'b' WHERE k = 'mode'")
        .await
        .unwrap();
    let (status, new_etag, body) = tokio::time::timeout(TIMEOUT, poll).await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "\"b\"");
    assert_ne!(new_etag.as_deref(), Some(etag.as_str()));

    // A stale version answers at once; unquoted tags work too.
    let a = http
        .get(&format!(
            "/fetch/setting/mode?wait_change={}",
            etag.trim_matches('"')
        ))
        .await;
    assert_eq!((a.status.as_u16(), a.text.as_str()), (200, "\"b\""));
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn batch_fetch_answers_each_key_with_its_own_status() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &db, "", &[]);
    config.http.max_batch_keys = 4;
    let running = start(config).await;
    let http = Http::new(&running);
    let pg = db.client().await;
    pg.batch_execute(
        "INSERT INTO users VALUES (1, 'ada', NULL); INSERT INTO orders VALUES (5, 1, 2.50, 'n');",
    )
    .await
    .unwrap();
    assert_eq!(http.get("/fetch/user/1").await.status, 200);

    let a = http
        .post(
            "/fetch",
            json!({"keys": ["user/1", "orders_by_user/1", "user/x", "nope/1", "user/1"]}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let results = &a.json()["results"];
    assert_eq!(results.as_object().map(|m| m.len()), Some(4), "{results}");
    let hit = &results["user/1"];
    assert_eq!(hit["status"], 200);
    assert_eq!(hit["value"], json!({"id": 1, "name": "ada", "email": null}));
    assert_eq!(hit["cache"], "hit");
    assert!(hit["lsn"].is_string() && hit["etag"].is_string() && hit["computed_at"].is_string());
    let miss = &results["orders_by_user/1"];
    assert_eq!(
        (
            miss["status"].clone(),
            miss["cache"].clone(),
            miss["value"].clone()
        ),
        (
            json!(200),
            json!("miss"),
            json!([{"id": 5, "total": 2.50, "note": "n"}])
        )
    );
    assert_eq!(results["user/x"]["status"], 400);
    assert_eq!(results["user/x"]["error"]["code"], "bad_key_parameter");
    assert_eq!(results["nope/1"]["error"]["code"], "unknown_primer");

    // With min_lsn, after a direct write.
    pg.batch_execute("UPDATE users SET name = 'ada2' WHERE id = 1")
        .await
        .unwrap();
    let lsn: String = pg
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let a = http
        .post(
            &format!("/fetch?min_lsn={lsn}&timeout=20s"),
            json!({"keys": ["user/1"]}),
        )
        .await;
    assert_eq!(a.json()["results"]["user/1"]["value"]["name"], "ada2");

    let a = http
        .post(
            "/fetch",
            json!({"keys": ["a/1", "b/1", "c/1", "d/1", "e/1", "a/1"]}),
        )
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (400, "too_many_keys".into()));
    let a = http.post("/fetch", json!({"key": ["user/1"]})).await;
    assert_eq!((a.status.as_u16(), a.code()), (400, "bad_json".into()));
    let a = http.post("/fetch", json!({"keys": []})).await;
    assert_eq!(a.json(), json!({"results": {}}));
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Issue 16: every route serves a value as the primer stored it, byte for byte: a numeric that does not fit
/// an f64 keeps its digits, an object keeps its key order (a `serde_json::Value` on the way would round
/// the one and sort the other), and the batch answer carries the same ETag as the single fetch.
#[tokio::test]
async fn every_route_serves_the_stored_bytes() {
    const RATINGS: &str = r#"
CREATE TABLE ratings (sku text PRIMARY KEY, rating numeric NOT NULL, big bigint NOT NULL, name text,
                      email text);
INSERT INTO ratings VALUES ('SKU-1', 4.6666666666666666666666667, 9007199254740993, 'ada', 'a@x.org');
CREATE PUBLICATION kck_test FOR TABLE ratings;
"#;
    const PRIMERS: &str = r#"
  - name: rating
    key: "rating/{sku}"
    shape: row
    query: "SELECT sku, rating, big, name, email FROM ratings WHERE sku = $1"
    depends_on:
      - table: ratings
        columns: { sku: sku }
  - name: rating_value
    key: "rating_value/{sku}"
    shape: value
    query: "SELECT rating FROM ratings WHERE sku = $1"
    depends_on:
      - table: ratings
        columns: { sku: sku }
"#;
    #[derive(serde::Deserialize)]
    struct Item {
        value: Box<serde_json::value::RawValue>,
        etag: String,
    }
    #[derive(serde::Deserialize)]
    struct Batch {
        results: std::collections::BTreeMap<String, Item>,
    }
    let db = database(RATINGS).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &db.url, "kck_test", &db.name, PRIMERS, "");
    let running = start(crate::support::kck::load(&path)).await;
    let http = Http::new(&running);
    let keys = ["rating/SKU-1", "rating_value/SKU-1"];
    let mut stored = Vec::new();
    let mut etags = Vec::new();
    for key in keys {
        let single = http.get(&format!("/fetch/{key}")).await;
        assert_eq!(single.status, 200, "{}", single.text);
        let entry = running
            .store
            .get(key)
            .await
            .unwrap()
            .expect("cached by the fetch");
        let bytes = String::from_utf8(entry.value.to_vec()).unwrap();
        assert!(
            bytes.contains("4.6666666666666666666666667"),
            "Postgres's digits: {bytes}"
        );
        assert_eq!(single.text, bytes, "GET /fetch/{key}");
        etags.push(single.header("etag").to_owned());
        stored.push(bytes);
    }
    assert!(
        stored[0].contains("9007199254740993")
            && stored[0].find("\"sku\"") < stored[0].find("\"big\""),
        "a big integer and keys in column order, not sorted: {}",
        stored[0]
    );
    // Again, now a hit: the same bytes.
    assert_eq!(http.get("/fetch/rating/SKU-1").await.text, stored[0]);

    let batch = http.post("/fetch", json!({"keys": keys})).await;
    assert_eq!(batch.status, 200, "{}", batch.text);
    let batch: Batch = serde_json::from_str(&batch.text).expect("the batch answer is JSON");
    for (i, key) in keys.iter().enumerate() {
        let item = &batch.results[*key];
        assert_eq!(item.value.get(), stored[i], "POST /fetch {key}");
        assert_eq!(item.etag, etags[i], "POST /fetch {key}: the same ETag");
    }

    for (i, key) in keys.iter().enumerate() {
        let entry = http.get(&format!("/cache/entry/{key}")).await;
        assert_eq!(entry.status, 200, "{}", entry.text);
        let entry: kck::ops::http::EntryDocument = serde_json::from_str(&entry.text).unwrap();
        assert_eq!(entry.value.get(), stored[i], "GET /cache/entry/{key}");
    }

    // `kck get`, through the running kck, then (stopped) from the store itself.
    let kck_get = |key: &'static str, url: String| {
        let path = path.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kck"))
                .args(["get", key, "--url", &url, "--config"])
                .arg(&path)
                .env("KCK_LOG", "warn")
                .output()
                .await
                .expect("run kck get");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let entry: kck::ops::http::EntryDocument =
                serde_json::from_slice(&out.stdout).expect("kck get prints JSON");
            entry.value.get().to_owned()
        }
    };
    let base = format!("http://{}", running.http_addr);
    assert_eq!(
        kck_get("rating/SKU-1", base.clone()).await,
        stored[0],
        "kck get"
    );
    running.stop().await.unwrap();
    let nobody = format!("http://127.0.0.1:{}", crate::support::kck::free_port());
    assert_eq!(
        kck_get("rating/SKU-1", nobody).await,
        stored[0],
        "kck get from the store"
    );
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------------------
// Server hygiene

#[tokio::test]
async fn every_failure_has_the_json_error_shape() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &db, "", &[]);
    config.http.request_timeout = Duration::from_millis(300);
    config.http.body_limit = 1024;
    let running = start(config).await;
    let http = Http::new(&running);
    let cases = [
        (http.get("/elsewhere").await, 404, "not_found"),
        (
            http.get("/update/add_user").await,
            405,
            "method_not_allowed",
        ),
        (
            http.send(Method::DELETE, "/fetch/user/1", &[], None).await,
            405,
            "method_not_allowed",
        ),
        (http.get("/fetch/user/1?unknown=1").await, 400, "bad_query"),
        (http.get("/fetch/user/abc").await, 400, "bad_key_parameter"),
        (
            http.send(Method::POST, "/fetch", &[], Some(("", b"{}".to_vec())))
                .await,
            415,
            "unsupported_media_type",
        ),
        (
            http.send(
                Method::POST,
                "/fetch",
                &[],
                Some(("application/json", b"[".to_vec())),
            )
            .await,
            400,
            "bad_json",
        ),
        (
            http.post("/fetch", json!({"keys": ["x".repeat(2000)]}))
                .await,
            413,
            "body_too_large",
        ),
        // The slow primer's query outlives the request timeout.
        (http.get("/fetch/slow/1").await, 504, "timeout"),
    ];
    for (answer, status, code) in cases {
        assert_eq!(answer.status, status, "{}", answer.text);
        assert_eq!(
            answer.header("content-type"),
            "application/json",
            "{code}: {}",
            answer.text
        );
        assert_eq!(answer.code(), code, "{}", answer.text);
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn in_flight_requests_finish_when_shutdown_starts() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db, "", &[])).await;
    let base = format!("http://{}", running.http_addr);
    let pg = db.client().await;
    wait_drained(&running, &pg, TIMEOUT).await;
    let mark: String = pg
        .query_one(
            "SELECT pg_logical_emit_message(false, 'kck-test', '')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    wait_drained(&running, &pg, TIMEOUT).await;

    let update = tokio::spawn(async move {
        let response = reqwest::Client::new()
            .post(format!("{base}/update/slow_set"))
            .json(&json!({"v": "done"}))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    });
    // Wait until the update is running in Postgres, then start stopping kck.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let running_sleeps: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND query = 'SELECT pg_sleep(1)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running_sleeps > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the update never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.shutdown();
    let (status, body) = tokio::time::timeout(TIMEOUT, update)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "the in-flight update must finish: {body}");
    running.wait().await.unwrap();
    let v: String = pg
        .query_one("SELECT v FROM settings WHERE k = 'slow'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "done");
    // The slot's position was flushed on the way out: at least what kck had read before.
    let confirmed: String = pg
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    let (confirmed, mark): (kck::lsn::Lsn, kck::lsn::Lsn) =
        (confirmed.parse().unwrap(), mark.parse().unwrap());
    assert!(
        confirmed >= mark,
        "slot at {confirmed}, kck had read {mark}"
    );
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------------------
// OpenAPI

#[tokio::test]
async fn the_openapi_document_matches_the_real_routes() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db, "", &[])).await;
    let http = Http::new(&running);
    let a = http.get("/openapi.json").await;
    assert_eq!(a.status, 200);
    let doc = a.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

    // The routers are built from these listings: they must be exactly what the document says.
    let mut documented: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| (path.clone(), m.to_uppercase()))
        })
        .collect();
    let mut routed: Vec<(String, String)> = kck::http::routes()
        .listed()
        .into_iter()
        .chain(kck::ops::http::routes().listed())
        .map(|(path, method)| (path, method.to_string()))
        .collect();
    documented.sort();
    routed.sort();
    assert_eq!(
        documented, routed,
        "the routes and the OpenAPI document differ"
    );

    // And the real router answers each documented method, and refuses the others with 405.
    for (path, item) in paths {
        let concrete = path
            .replace("{key}", "user/1")
            .replace("{name}", "add_user")
            .replace("{primer}", "user");
        for method in METHODS {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = (m == Method::POST).then(|| ("application/json", b"{}".to_vec()));
            let answer = http.send(m.clone(), &concrete, &[], body).await;
            let code = serde_json::from_str::<Value>(&answer.text)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
            if item.get(method).is_some() {
                assert_ne!(
                    answer.status, 405,
                    "{method} {path} is documented: {}",
                    answer.text
                );
                assert_ne!(
                    code.as_deref(),
                    Some("not_found"),
                    "{method} {path} is documented but not routed"
                );
            } else {
                assert_eq!(
                    answer.status, 405,
                    "{method} {path} is not documented: {}",
                    answer.text
                );
            }
        }
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------------------
// JWT

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value, kid: Option<&str>) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&fixture("jwt-rs256-private.pem")).unwrap()
}

const ISSUER: &str = "https://issuer.test/";
const AUDIENCE: &str = "kck-test";

/// Valid claims for subject `sub`, plus `extra`.
fn claims(sub: &str, extra: Value) -> Value {
    let mut c =
        json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "iat": now()});
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Access rules on top of the test primers and updaters (see [`protected`]).
fn with_access(auth: &str) -> String {
    format!("{auth}\nprimers_dir: protected\n")
}

const PROTECTED_PRIMER: &str = "-- kck:primer
-- key: my_orders/{user_id:int}
-- access:
--   - match: { sub: user_id }
--   - require: { role: [admin, support] }
-- depends_on:
--   - table: orders
--     columns: { user_id: user_id }
SELECT id, total FROM orders WHERE user_id = $1 ORDER BY id
";

const PROTECTED_UPDATER: &str = "-- kck:updater
-- params: [id:int, name:text]
-- access: { match: { sub: id } }
UPDATE users SET name = $2 WHERE id = $1
";

/// A primer whose keys users read only for themselves (admins and support for anyone), and an updater
/// users run only on themselves.
fn protected(dir: &Path) {
    let primers = dir.join("protected");
    std::fs::create_dir_all(&primers).unwrap();
    std::fs::write(primers.join("my_orders.sql"), PROTECTED_PRIMER).unwrap();
    let updaters = dir.join("updaters");
    std::fs::create_dir_all(&updaters).unwrap();
    std::fs::write(updaters.join("rename_self.sql"), PROTECTED_UPDATER).unwrap();
}

#[tokio::test]
async fn jwt_rs256_checks_every_claim_and_refuses_forgeries() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt-rs256-public.pem"),
        dir.path().join("jwt.pem"),
    )
    .unwrap();
    protected(dir.path());
    let auth = format!(
        "auth:\n  jwt:\n    algorithms: [RS256]\n    public_key_file: jwt.pem\n    issuer: \"{ISSUER}\"\n    audience: {AUDIENCE}\n    leeway: 0s\n"
    );
    let running = start(test_config(dir.path(), &db, &with_access(&auth), &[])).await;
    let http = Http::new(&running);
    db.execute_batch(
        "INSERT INTO users VALUES (1, 'ada', NULL), (2, 'bob', NULL); INSERT INTO orders VALUES (5, 1, 2, NULL);",
    )
    .await;
    let key = rsa_key();
    let valid = |sub: &str| sign(Algorithm::RS256, &key, &claims(sub, json!({})), None);

    // Public paths need no token; everything else does.
    assert_eq!(http.get("/healthz").await.status, 200);
    assert_eq!(http.get("/openapi.json").await.status, 200);
    let a = http.get("/fetch/my_orders/1").await;
    assert_eq!((a.status.as_u16(), a.code()), (401, "unauthorized".into()));
    assert!(a.header("www-authenticate").starts_with("Bearer"));
    let a = http.get("/elsewhere").await;
    assert_eq!(
        a.status, 401,
        "unknown routes are not revealed without a token"
    );

    // Forgeries and bad claims: 401 "invalid token", nothing more.
    let good = valid("1");
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims("2", json!({})).to_string().as_bytes()),
        parts[2]
    );
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("1", json!({})).to_string().as_bytes())
    );
    let none_signed = format!("{none}{}", parts[2]);
    // Algorithm confusion: an HS256 "signature" made with the server's RSA public key as the secret.
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&fixture("jwt-rs256-public.pem")),
        &claims("1", json!({})),
        None,
    );
    let other_key = sign(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(&fixture("jwt-es256-private.pem")).unwrap(),
        &claims("1", json!({})),
        None,
    );
    let forged = [
        (
            "expired",
            sign(
                Algorithm::RS256,
                &key,
                &claims("1", json!({"exp": now() - 120})),
                None,
            ),
        ),
        (
            "not yet valid",
            sign(
                Algorithm::RS256,
                &key,
                &claims("1", json!({"nbf": now() + 3600})),
                None,
            ),
        ),
        (
            "wrong audience",
            sign(
                Algorithm::RS256,
                &key,
                &claims("1", json!({"aud": "someone-else"})),
                None,
            ),
        ),
        (
            "wrong issuer",
            sign(
                Algorithm::RS256,
                &key,
                &claims("1", json!({"iss": "https://evil.test/"})),
                None,
            ),
        ),
        ("no exp", {
            let mut c = claims("1", json!({}));
            c.as_object_mut().unwrap().remove("exp");
            sign(Algorithm::RS256, &key, &c, None)
        }),
        ("an extension it must understand (crit)", {
            let mut header = Header::new(Algorithm::RS256);
            header.crit = Some(vec!["exp".into()]);
            jsonwebtoken::encode(&header, &claims("1", json!({})), &key).unwrap()
        }),
        ("tampered payload", tampered),
        ("alg none", none),
        ("alg none with a signature", none_signed),
        ("HS256 with the RSA public key", confused),
        ("another algorithm and key", other_key),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (what, token) in &forged {
        let a = http
            .get_with("/fetch/my_orders/1", &[("authorization", &bearer(token))])
            .await;
        assert_eq!(a.status, 401, "{what}: {}", a.text);
        assert_eq!(a.code(), "invalid_token", "{what}");
        assert_eq!(a.json()["error"]["message"], "invalid token", "{what}");
        assert!(
            a.header("www-authenticate").contains("invalid_token"),
            "{what}"
        );
    }

    // Valid tokens: someone else's key is 403, one's own is 200, an admin may read any.
    let a = http
        .get_with(
            "/fetch/my_orders/1",
            &[("authorization", &bearer(&valid("2")))],
        )
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (403, "forbidden".into()));
    assert!(
        a.header("www-authenticate")
            .contains(r#"error="insufficient_scope""#),
        "an access rule's 403 carries its challenge"
    );
    let a = http
        .get_with(
            "/fetch/my_orders/1",
            &[("authorization", &bearer(&valid("1")))],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json(), json!([{"id": 5, "total": 2.00}]));
    let admin = sign(
        Algorithm::RS256,
        &key,
        &claims("9", json!({"role": "admin"})),
        None,
    );
    let a = http
        .get_with("/fetch/my_orders/2", &[("authorization", &bearer(&admin))])
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    // A primer without rules: any valid token.
    let a = http
        .get_with("/fetch/user/2", &[("authorization", &bearer(&valid("1")))])
        .await;
    assert_eq!(a.status, 200);

    // POST /fetch checks each key.
    let a = http
        .post_with(
            "/fetch",
            json!({"keys": ["my_orders/1", "my_orders/2"]}),
            &[("authorization", &bearer(&valid("1")))],
        )
        .await;
    let results = &a.json()["results"];
    assert_eq!(results["my_orders/1"]["status"], 200);
    assert_eq!(results["my_orders/2"]["status"], 403);
    assert_eq!(results["my_orders/2"]["error"]["code"], "forbidden");

    // Updaters: the rule matches a parameter.
    let a = http
        .post_with(
            "/update/rename_self",
            json!({"id": 2, "name": "mallory"}),
            &[("authorization", &bearer(&valid("1")))],
        )
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (403, "forbidden".into()));
    let a = http
        .post_with(
            "/update/rename_self",
            json!({"id": 1, "name": "ada lovelace"}),
            &[("authorization", &bearer(&valid("1")))],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = http
        .post("/update/rename_self", json!({"id": 1, "name": "x"}))
        .await;
    assert_eq!(a.status, 401);

    // The operations routes show every cached value: without auth.operator, no token opens them.
    for path in [
        "/status",
        "/metrics",
        "/cache/entry/my_orders/1",
        "/cache/keys/my_orders",
        "/",
    ] {
        let a = http
            .get_with(path, &[("authorization", &bearer(&admin))])
            .await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (403, "forbidden".into()),
            "{path}"
        );
        assert!(a.text.contains("auth.operator"), "{path}: {}", a.text);
    }
    let a = http.get("/readyz").await;
    assert!(
        matches!(a.status.as_u16(), 200 | 503),
        "/readyz is public: {}",
        a.text
    );
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn jwt_hs256_secret_from_the_environment() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "test-only-secret-0123456789abcdef0123456789";
    let auth = "auth:\n  jwt:\n    algorithms: [HS256]\n    secret_env: KCK_TEST_JWT_SECRET\n  \
                operator: { require: { role: ops } }\n";
    let mut config = test_config(dir.path(), &db, auth, &[("KCK_TEST_JWT_SECRET", secret)]);
    config.http.cors_origins = vec!["https://app.example".into()];
    let running = start(config).await;
    let http = Http::new(&running);
    let token = |secret: &str, claims: &Value| {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(secret.as_bytes()),
            claims,
            None,
        )
    };
    // No issuer or audience configured: tokens without them are fine, tokens naming an audience are not.
    let plain = json!({"sub": "1", "exp": now() + 600});
    let a = http
        .get_with(
            "/fetch/user/1",
            &[("authorization", &bearer(&token(secret, &plain)))],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let with_aud = json!({"sub": "1", "exp": now() + 600, "aud": "elsewhere"});
    for (what, t) in [
        (
            "another secret",
            token("another-secret-0123456789abcdef012345678", &plain),
        ),
        ("an audience kck does not have", token(secret, &with_aud)),
        (
            "an RS256 token",
            sign(Algorithm::RS256, &rsa_key(), &plain, None),
        ),
    ] {
        let a = http
            .get_with("/fetch/user/1", &[("authorization", &bearer(&t))])
            .await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (401, "invalid_token".into()),
            "{what}"
        );
    }
    let a = http
        .get_with("/fetch/user/1", &[("authorization", "Basic dXNlcjpwYXNz")])
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (401, "unauthorized".into()));

    // CORS: a browser's preflight needs no token; answers name the allowed origin, and only that one.
    let preflight = |origin: &'static str| {
        let http = &http;
        async move {
            let headers = [
                ("origin", origin),
                ("access-control-request-method", "GET"),
                (
                    "access-control-request-headers",
                    "authorization, last-event-id",
                ),
            ];
            http.send(Method::OPTIONS, "/fetch/user/1", &headers, None)
                .await
        }
    };
    let a = preflight("https://app.example").await;
    assert!(a.status.is_success(), "{} {}", a.status, a.text);
    assert_eq!(
        a.header("access-control-allow-origin"),
        "https://app.example"
    );
    assert!(
        a.header("access-control-allow-headers")
            .contains("authorization")
    );
    // A live-key client reconnecting from another origin sends Last-Event-ID.
    assert!(
        a.header("access-control-allow-headers")
            .contains("last-event-id")
    );
    let a = preflight("https://evil.example").await;
    assert!(a.headers.get("access-control-allow-origin").is_none());
    let a = http
        .get_with(
            "/fetch/user/1",
            &[
                ("origin", "https://app.example"),
                ("authorization", &bearer(&token(secret, &plain))),
            ],
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("access-control-allow-origin"),
        "https://app.example"
    );
    assert!(a.header("access-control-expose-headers").contains("etag"));

    // Operations routes: auth.operator's claims.
    let operator = token(
        secret,
        &json!({"sub": "o", "exp": now() + 600, "role": "ops"}),
    );
    for path in ["/metrics", "/status", "/cache/entry/user/1"] {
        let a = http
            .get_with(path, &[("authorization", &bearer(&operator))])
            .await;
        assert_eq!(a.status, 200, "{path}: {}", a.text);
        let a = http
            .get_with(path, &[("authorization", &bearer(&token(secret, &plain)))])
            .await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (403, "forbidden".into()),
            "{path}"
        );
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn jwt_keys_from_a_jwks_file_are_chosen_by_kid() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), fixture("jwt-jwks.json")).unwrap();
    let auth = "auth:\n  jwt:\n    algorithms: [RS256]\n    jwks_file: jwks.json\n  public_paths: [/healthz]\n";
    let running = start(test_config(dir.path(), &db, auth, &[])).await;
    let http = Http::new(&running);
    let c = json!({"sub": "1", "exp": now() + 600});
    let a = http
        .get_with(
            "/fetch/user/1",
            &[(
                "authorization",
                &bearer(&sign(Algorithm::RS256, &rsa_key(), &c, Some("test-rsa-1"))),
            )],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = http
        .get_with(
            "/fetch/user/1",
            &[(
                "authorization",
                &bearer(&sign(Algorithm::RS256, &rsa_key(), &c, Some("unknown"))),
            )],
        )
        .await;
    assert_eq!(a.status, 401);
    // Only /healthz is public now.
    assert_eq!(http.get("/openapi.json").await.status, 401);
    assert_eq!(http.get("/healthz").await.status, 200);
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn jwt_es256_public_key_file() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("es.pem"), fixture("jwt-es256-public.pem")).unwrap();
    let auth = "auth:\n  jwt:\n    algorithms: [ES256]\n    public_key_file: es.pem\n";
    let running = start(test_config(dir.path(), &db, auth, &[])).await;
    let http = Http::new(&running);
    let key = EncodingKey::from_ec_pem(&fixture("jwt-es256-private.pem")).unwrap();
    let c = json!({"sub": "1", "exp": now() + 600});
    let a = http
        .get_with(
            "/fetch/user/1",
            &[(
                "authorization",
                &bearer(&sign(Algorithm::ES256, &key, &c, None)),
            )],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Reads SSE `data:` lines of `value` events from `response` until `n` arrived.
async fn sse_values(response: &mut reqwest::Response, buffer: &mut String, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if block.lines().any(|l| l == "event: value") {
                let data = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap();
                out.push(serde_json::from_str(data).unwrap());
            }
        }
        if out.len() >= n {
            break;
        }
        let chunk = tokio::time::timeout(TIMEOUT, response.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    out
}

#[tokio::test]
async fn subscribe_streams_current_values_then_changes() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db, "", &[])).await;
    let http = Http::new(&running);
    let pg = db.client().await;
    pg.batch_execute("INSERT INTO settings VALUES ('mode', 'a'), ('other', 'x')")
        .await
        .unwrap();
    let url = format!("{}/subscribe?key=setting/mode&key=setting/other", http.base);
    let mut response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut buffer = String::new();
    let first = sse_values(&mut response, &mut buffer, 2).await;
    let mut keys: Vec<_> = first.iter().map(|e| e["key"].as_str().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, ["setting/mode", "setting/other"]);
    let mode = first.iter().find(|e| e["key"] == "setting/mode").unwrap();
    assert_eq!(mode["value"], "a");
    assert!(mode["etag"].is_string() && mode["lsn"].is_string() && mode["computed_at"].is_string());

    pg.batch_execute("UPDATE settings SET v = 'b' WHERE k = 'mode'")
        .await
        .unwrap();
    // Recomputations that give the same value send nothing; the change arrives.
    let change = loop {
        let e = sse_values(&mut response, &mut buffer, 1).await.remove(0);
        if e["value"] != "a" {
            break e;
        }
    };
    assert_eq!(change["key"], "setting/mode");
    assert_eq!(change["value"], "b");

    // Resuming (a new connection with Last-Event-ID) sends every key's current value again.
    drop(response);
    let mut resumed = reqwest::Client::new()
        .get(&url)
        .header("last-event-id", change["lsn"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let mut buffer = String::new();
    let again = sse_values(&mut resumed, &mut buffer, 2).await;
    assert!(
        again
            .iter()
            .any(|e| e["key"] == "setting/mode" && e["value"] == "b")
    );

    // Errors are JSON, before the stream starts.
    let a = http.get("/subscribe?key=nope/1").await;
    assert_eq!(a.status, 400);
    let a = http.get("/subscribe").await;
    assert_eq!(a.status, 400);
    drop(resumed);
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Reads SSE events (`(event, data)`; comments skipped) from `response` until `until` holds for the last
/// one, or the stream ends (`None` at the end of the list).
async fn sse_until(
    response: &mut reqwest::Response,
    buffer: &mut String,
    until: impl Fn(&str, &Value) -> bool,
) -> Vec<Option<(String, Value)>> {
    let mut out = Vec::new();
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let Some(event) = block.lines().find_map(|l| l.strip_prefix("event: ")) else {
                continue;
            };
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap();
            let data: Value = serde_json::from_str(data).unwrap();
            let done = until(event, &data);
            out.push(Some((event.to_owned(), data)));
            if done {
                return out;
            }
        }
        match tokio::time::timeout(TIMEOUT, response.chunk())
            .await
            .unwrap()
        {
            Ok(Some(chunk)) => buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
            _ => {
                out.push(None);
                return out;
            }
        }
    }
}

async fn status_subscribe(http: &Http) -> Value {
    let a = http.get("/status").await;
    assert_eq!(a.status, 200, "{}", a.text);
    a.json()["subscribe"].clone()
}

#[tokio::test]
async fn subscribe_registry_wakes_only_the_changed_keys_subscribers_and_counts_them() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db, "", &[])).await;
    let http = Http::new(&running);
    let pg = db.client().await;
    pg.batch_execute("INSERT INTO settings VALUES ('a', 'a1'), ('b', 'b1')")
        .await
        .unwrap();
    let mut a = reqwest::get(format!("{}/subscribe?key=setting/a", http.base))
        .await
        .unwrap();
    let mut b = reqwest::get(format!("{}/subscribe?key=setting/b", http.base))
        .await
        .unwrap();
    let (mut ba, mut bb) = (String::new(), String::new());
    assert_eq!(sse_values(&mut a, &mut ba, 1).await[0]["value"], "a1");
    assert_eq!(sse_values(&mut b, &mut bb, 1).await[0]["value"], "b1");
    let live = status_subscribe(&http).await;
    assert_eq!(live["subscribers"], 2, "{live}");
    assert_eq!(live["keys"], 2, "{live}");

    pg.batch_execute("UPDATE settings SET v = 'a2' WHERE k = 'a'")
        .await
        .unwrap();
    let change = sse_values(&mut a, &mut ba, 1).await.remove(0);
    assert_eq!(
        (&change["key"], &change["value"]),
        (&json!("setting/a"), &json!("a2"))
    );
    wait_drained(&running, &pg, TIMEOUT).await;
    // Then b changes: b's first event after its initial value is that change, nothing about a.
    pg.batch_execute("UPDATE settings SET v = 'b2' WHERE k = 'b'")
        .await
        .unwrap();
    let change = sse_values(&mut b, &mut bb, 1).await.remove(0);
    assert_eq!(
        (&change["key"], &change["value"]),
        (&json!("setting/b"), &json!("b2"))
    );
    // Two initial values and two changes: one event each, no more.
    let live = status_subscribe(&http).await;
    assert_eq!(live["events_sent"], 4, "{live}");
    assert_eq!(live["resyncs"], 0, "{live}");
    let metrics = http.get("/metrics").await.text;
    assert!(metrics.contains("kck_subscribers 2"), "{metrics}");
    assert!(
        metrics.contains("kck_subscribe_events_total 4"),
        "{metrics}"
    );
    drop(a);
    drop(b);
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn subscribe_limits_come_from_the_config_and_answer_json() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &db, "", &[]);
    config.http.subscribe.max_subscriptions = 1;
    config.http.subscribe.max_keys = 2;
    let running = start(config).await;
    let http = Http::new(&running);
    let a = http
        .get("/subscribe?key=setting/a&key=setting/b&key=setting/c")
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (400, "too_many_keys".into()));
    assert!(a.text.contains("http.subscribe.max_keys"), "{}", a.text);
    let mut first = reqwest::get(format!("{}/subscribe?key=setting/a", http.base))
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let mut buffer = String::new();
    sse_values(&mut first, &mut buffer, 1).await;
    let a = http.get("/subscribe?key=setting/b").await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (503, "too_many_subscriptions".into())
    );
    assert!(
        a.text.contains("http.subscribe.max_subscriptions"),
        "{}",
        a.text
    );
    assert_eq!(a.header("retry-after"), "5");
    // Closing the first frees its place.
    drop(first);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let a = http.get("/status").await.json();
        if a["subscribe"]["subscribers"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{a}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = reqwest::get(format!("{}/subscribe?key=setting/b", http.base))
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    drop(second);
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn subscribe_ends_with_an_expired_event_when_the_token_expires() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "test-only-secret-0123456789abcdef0123456789";
    let auth = "auth:\n  jwt:\n    algorithms: [HS256]\n    secret_env: KCK_TEST_JWT_SECRET\n  \
                operator: { require: { role: ops } }\n";
    let mut config = test_config(dir.path(), &db, auth, &[("KCK_TEST_JWT_SECRET", secret)]);
    if let Some(jwt) = config.auth.jwt.as_mut() {
        jwt.leeway = Duration::ZERO;
    }
    let running = start(config).await;
    let base = format!("http://{}", running.http_addr);
    let key = EncodingKey::from_secret(secret.as_bytes());
    let short = sign(
        Algorithm::HS256,
        &key,
        &json!({"sub": "1", "exp": now() + 3}),
        None,
    );
    let mut response = reqwest::Client::new()
        .get(format!("{base}/subscribe?key=setting/mode"))
        .header("authorization", bearer(&short))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut buffer = String::new();
    let events = sse_until(&mut response, &mut buffer, |event, _| event == "expired").await;
    let (event, data) = events.iter().flatten().last().cloned().expect("some event");
    assert_eq!(event, "expired", "{events:?}");
    assert_eq!(data["reason"], "token_expired");
    assert!(
        data["exp"].is_i64() && data["message"].is_string(),
        "{data}"
    );
    // And the stream ends there.
    let rest = sse_until(&mut response, &mut buffer, |_, _| false).await;
    assert_eq!(rest, vec![None]);
    let ops = sign(
        Algorithm::HS256,
        &key,
        &json!({"sub": "ops", "role": "ops", "exp": now() + 600}),
        None,
    );
    let status: Value = reqwest::Client::new()
        .get(format!("{base}/status"))
        .header("authorization", bearer(&ops))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["subscribe"]["expired"], 1, "{status}");
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn subscribe_streams_end_with_an_end_event_on_shutdown() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db, "", &[])).await;
    let base = format!("http://{}", running.http_addr);
    let mut response = reqwest::get(format!("{base}/subscribe?key=setting/mode"))
        .await
        .unwrap();
    let mut buffer = String::new();
    sse_values(&mut response, &mut buffer, 1).await;
    let stopping = tokio::spawn(running.stop());
    let events = sse_until(&mut response, &mut buffer, |event, _| event == "end").await;
    let last = events.iter().flatten().last().cloned().expect("an event");
    assert_eq!(last.0, "end", "{events:?}");
    assert_eq!(last.1["reason"], "shutdown");
    assert_eq!(
        sse_until(&mut response, &mut buffer, |_, _| false).await,
        vec![None]
    );
    tokio::time::timeout(TIMEOUT, stopping)
        .await
        .expect("kck stops")
        .unwrap()
        .unwrap();
    db.cleanup().await;
}

/// A client that does not read: its socket's receive buffer is tiny, and each value is large, so kck's
/// stream is stuck behind the first values; more keys then change than `http.subscribe.buffer` holds.
#[tokio::test]
async fn a_subscriber_too_slow_to_read_gets_resync_then_every_value() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const KEYS: usize = 16;
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &db, "", &[]);
    config.http.subscribe.buffer = 1;
    let running = start(config).await;
    let http = Http::new(&running);
    let pg = db.client().await;
    // 16 values of 512 KiB: 8 MiB, more than the kernel and hyper buffer between kck and a reader that
    // reads nothing.
    pg.batch_execute(&format!(
        "INSERT INTO settings SELECT 'big' || i, repeat('x', 524288) FROM generate_series(1, {KEYS}) i"
    ))
    .await
    .unwrap();
    let query: Vec<String> = (1..=KEYS).map(|i| format!("key=setting/big{i}")).collect();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(running.http_addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /subscribe?{} HTTP/1.1\r\nhost: kck\r\n\r\n",
                query.join("&")
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // The answer's head: kck read every first value and answers (the stream is stuck behind them).
    let mut seen = Vec::new();
    let mut chunk = [0u8; 1024];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(TIMEOUT, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed");
        seen.extend_from_slice(&chunk[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    pg.batch_execute("UPDATE settings SET v = 'new' WHERE k LIKE 'big%'")
        .await
        .unwrap();
    for i in 1..=KEYS {
        eventually_equals(
            running.http_addr,
            &format!("setting/big{i}"),
            &json!("new"),
            TIMEOUT,
        )
        .await;
    }
    // Now read: the first values, then resync, then every key's new value.
    let text = read_until_count(&mut stream, &mut seen, "\"value\":\"new\"", KEYS).await;
    let resync = text.find("event: resync").expect("a resync event");
    assert!(
        text[..resync].matches("\"value\":\"new\"").count() == 0,
        "new values before resync"
    );
    assert!(text[resync..].contains("\"reason\":\"slow_reader\""));
    let live = status_subscribe(&http).await;
    assert!(live["resyncs"].as_u64().unwrap() >= 1, "{live}");
    drop(stream);
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Reads from `stream` (appending to `seen`) until `needle` occurs `count` times; the text so far.
async fn read_until_count(
    stream: &mut tokio::net::TcpStream,
    seen: &mut Vec<u8>,
    needle: &str,
    count: usize,
) -> String {
    use tokio::io::AsyncReadExt;
    let needle = needle.as_bytes();
    let mut chunk = vec![0u8; 1 << 16];
    let (mut found, mut scanned) = (0, 0);
    loop {
        while let Some(at) = seen[scanned..]
            .windows(needle.len())
            .position(|w| w == needle)
        {
            found += 1;
            scanned += at + needle.len();
        }
        scanned = scanned.max(seen.len().saturating_sub(needle.len()));
        if found >= count {
            return String::from_utf8_lossy(seen).into_owned();
        }
        let n = tokio::time::timeout(TIMEOUT, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed before {count} of the needle");
        seen.extend_from_slice(&chunk[..n]);
    }
}
