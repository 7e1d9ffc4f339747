//! End-to-end tests of the core: a real Postgres 15 (started by the test support code), kck running in
//! process (or as a child process where a crash is the point), and real HTTP.

use std::time::Duration;

use crate::support::kck::{
    assert_converged, config, config_with, eventually_equals, fetch, spawn_kck, start, wait_drained,
};
use crate::support::pg::{TestDb, cluster, database};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL, total numeric(10,2) NOT NULL,
                     status text NOT NULL DEFAULT 'new');
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE line_items (id bigint PRIMARY KEY, order_id bigint NOT NULL, qty int NOT NULL);
CREATE TABLE docs (id bigint PRIMARY KEY, title text NOT NULL, body text NOT NULL);
CREATE PUBLICATION kck_test FOR TABLE users, orders, line_items, docs;
"#;

pub(crate) const PRIMERS: &str = r#"
  - name: user
    key: "user/{id:int}"
    shape: row
    query: "SELECT id, name FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
  - name: orders_by_user
    key: "orders_by_user/{user_id:int}"
    shape: rows
    query: |
      SELECT o.id, o.total, o.status,
             (SELECT coalesce(sum(qty), 0) FROM line_items li WHERE li.order_id = o.id) AS qty
      FROM orders o WHERE o.user_id = $1 ORDER BY o.id
    depends_on:
      - table: orders
        columns: { user_id: user_id }
      - table: line_items
        lookup:
          query: "SELECT user_id FROM orders WHERE id = $1"
          args: [order_id]
  - name: user_total
    key: "user_total/{user_id:int}"
    shape: value
    query: "SELECT coalesce(sum(total), 0) FROM orders WHERE user_id = $1"
    depends_on:
      - table: orders
        columns: { user_id: user_id }
  - name: by_status
    key: "by_status/{status}"
    shape: value
    query: "SELECT count(*) FROM orders WHERE status = $1"
    depends_on:
      - table: orders
        columns: { status: status }
  - name: users_from
    key: "users_from/{min:int}"
    shape: value
    query: "SELECT count(*) FROM users WHERE id >= $1"
    depends_on:
      - table: users
  - name: doc
    key: "doc/{id:int}"
    shape: row
    query: "SELECT id, title, length(body) AS len, md5(body) AS md5 FROM docs WHERE id = $1"
    depends_on:
      - table: docs
        columns: { id: id }
"#;

fn test_config(dir: &std::path::Path, db: &TestDb) -> kck::config::Config {
    config(dir, &db.url, "kck_test", &db.name, PRIMERS)
}

/// A test database with the schema, kck running on it with [`PRIMERS`], and a client.
struct Fixture {
    db: TestDb,
    _dir: tempfile::TempDir,
    running: kck::app::Running,
    pg: tokio_postgres::Client,
}

impl Fixture {
    async fn start() -> Fixture {
        let db = database(SCHEMA).await;
        let dir = tempfile::tempdir().unwrap();
        let running = start(test_config(dir.path(), &db)).await;
        let pg = db.client().await;
        Fixture {
            db,
            _dir: dir,
            running,
            pg,
        }
    }
}

#[tokio::test]
async fn insert_update_delete_and_truncate_reach_fetch_without_the_application() {
    let Fixture {
        db,
        _dir,
        running,
        pg,
    } = Fixture::start().await;
    let addr = running.http_addr;

    // A miss computes and caches.
    let (status, body) = fetch(addr, "orders_by_user/1").await;
    assert_eq!((status, body), (200, json!([])));
    assert_eq!(fetch(addr, "user/1").await, (200, Value::Null));
    assert_eq!(fetch(addr, "user_total/1").await, (200, json!(0)));

    pg.batch_execute(
        "INSERT INTO users VALUES (1, 'ada'); INSERT INTO orders VALUES (10, 1, 5.50, 'new');",
    )
    .await
    .unwrap();
    eventually_equals(addr, "user/1", &json!({"id": 1, "name": "ada"}), TIMEOUT).await;
    eventually_equals(
        addr,
        "orders_by_user/1",
        &json!([{"id": 10, "total": 5.50, "status": "new", "qty": 0}]),
        TIMEOUT,
    )
    .await;
    eventually_equals(addr, "user_total/1", &json!(5.50), TIMEOUT).await;

    pg.batch_execute("UPDATE orders SET total = 7.25, status = 'paid' WHERE id = 10")
        .await
        .unwrap();
    eventually_equals(addr, "user_total/1", &json!(7.25), TIMEOUT).await;

    pg.batch_execute("DELETE FROM users WHERE id = 1")
        .await
        .unwrap();
    eventually_equals(addr, "user/1", &Value::Null, TIMEOUT).await;

    pg.batch_execute("TRUNCATE orders").await.unwrap();
    eventually_equals(addr, "orders_by_user/1", &json!([]), TIMEOUT).await;
    eventually_equals(addr, "user_total/1", &json!(0), TIMEOUT).await;

    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn join_primer_follows_both_tables_and_moved_rows_refresh_both_keys() {
    let Fixture {
        db,
        _dir,
        running,
        pg,
    } = Fixture::start().await;
    let addr = running.http_addr;
    pg.batch_execute(
        "INSERT INTO orders VALUES (1, 7, 1, 'new'), (2, 8, 2, 'new'); INSERT INTO line_items VALUES (1, 1, 3);",
    )
    .await
    .unwrap();
    let one = |qty: i64| json!([{"id": 1, "total": 1.00, "status": "new", "qty": qty}]);
    eventually_equals(addr, "orders_by_user/7", &one(3), TIMEOUT).await;
    eventually_equals(
        addr,
        "orders_by_user/8",
        &json!([{"id": 2, "total": 2.00, "status": "new", "qty": 0}]),
        TIMEOUT,
    )
    .await;

    // A change to the joined table alone (found through the lookup).
    pg.batch_execute("INSERT INTO line_items VALUES (2, 1, 4)")
        .await
        .unwrap();
    eventually_equals(addr, "orders_by_user/7", &one(7), TIMEOUT).await;
    pg.batch_execute("UPDATE line_items SET qty = 10 WHERE id = 1")
        .await
        .unwrap();
    eventually_equals(addr, "orders_by_user/7", &one(14), TIMEOUT).await;
    pg.batch_execute("DELETE FROM line_items WHERE id = 2")
        .await
        .unwrap();
    eventually_equals(addr, "orders_by_user/7", &one(10), TIMEOUT).await;

    // Moving an order between users refreshes the old key and the new one (REPLICA IDENTITY FULL).
    pg.batch_execute("UPDATE orders SET user_id = 8 WHERE id = 1")
        .await
        .unwrap();
    eventually_equals(addr, "orders_by_user/7", &json!([]), TIMEOUT).await;
    eventually_equals(
        addr,
        "orders_by_user/8",
        &json!([{"id": 1, "total": 1.00, "status": "new", "qty": 10}, {"id": 2, "total": 2.00, "status": "new", "qty": 0}]),
        TIMEOUT,
    )
    .await;

    // A text key parameter, and a primer with no column mapping (every key refreshes).
    assert_eq!(fetch(addr, "by_status/new").await, (200, json!(2)));
    assert_eq!(fetch(addr, "users_from/0").await, (200, json!(0)));
    pg.batch_execute(
        "UPDATE orders SET status = 'paid' WHERE id = 2; INSERT INTO users VALUES (5, 'x');",
    )
    .await
    .unwrap();
    eventually_equals(addr, "by_status/new", &json!(1), TIMEOUT).await;
    eventually_equals(addr, "by_status/paid", &json!(1), TIMEOUT).await;
    eventually_equals(addr, "users_from/0", &json!(1), TIMEOUT).await;

    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn update_that_leaves_a_toasted_column_unchanged_refreshes_correctly() {
    let Fixture {
        db,
        _dir,
        running,
        pg,
    } = Fixture::start().await;
    let addr = running.http_addr;
    // 200 kB of incompressible text: stored out of line (TOAST), and not sent again when unchanged.
    pg.batch_execute(
        "INSERT INTO docs SELECT 1, 'first', string_agg(md5(random()::text), '') FROM generate_series(1, 6250)",
    )
    .await
    .unwrap();
    let row = pg
        .query_one("SELECT length(body), md5(body) FROM docs WHERE id = 1", &[])
        .await
        .unwrap();
    let (len, md5): (i32, String) = (row.get(0), row.get(1));
    let (status, _) = fetch(addr, "doc/1").await;
    assert_eq!(status, 200);
    pg.batch_execute("UPDATE docs SET title = 'second' WHERE id = 1")
        .await
        .unwrap();
    eventually_equals(
        addr,
        "doc/1",
        &json!({"id": 1, "title": "second", "len": len, "md5": md5}),
        TIMEOUT,
    )
    .await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn changes_made_while_kck_is_stopped_are_applied_after_restart() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = db.client().await;
    pg.batch_execute(
        "INSERT INTO users VALUES (1, 'a'), (2, 'b'); INSERT INTO orders VALUES (1, 1, 1, 'new');",
    )
    .await
    .unwrap();
    let running = start(test_config(dir.path(), &db)).await;
    for key in [
        "user/1",
        "user/2",
        "orders_by_user/1",
        "user_total/1",
        "users_from/2",
    ] {
        assert_eq!(fetch(running.http_addr, key).await.0, 200);
    }
    running.stop().await.unwrap();

    pg.batch_execute(
        "UPDATE users SET name = 'changed' WHERE id = 1; DELETE FROM users WHERE id = 2; \
         INSERT INTO users VALUES (3, 'c'); INSERT INTO orders VALUES (2, 1, 41, 'new');",
    )
    .await
    .unwrap();

    let config = test_config(dir.path(), &db);
    let running = start(config.clone()).await;
    wait_drained(&running, &pg, TIMEOUT).await;
    // Read from the store directly first: no fetch may have refreshed anything.
    let entry = running
        .store
        .get("user/1")
        .await
        .unwrap()
        .expect("user/1 still cached");
    assert_eq!(
        serde_json::from_slice::<Value>(&entry.value).unwrap(),
        json!({"id": 1, "name": "changed"})
    );
    assert_eq!(assert_converged(&running, &pg, &config).await, 5);
    assert_eq!(
        fetch(running.http_addr, "user_total/1").await,
        (200, json!(42.00))
    );
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn fetch_errors_are_json_and_say_what_is_wrong() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db)).await;
    let addr = running.http_addr;
    let (status, body) = fetch(addr, "nope/1").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "unknown_primer");
    let (status, body) = fetch(addr, "user/abc").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_key_parameter");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("id"),
        "{body}"
    );
    let (status, body) = fetch(addr, "user/1/extra").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = fetch(addr, "no-such-route").await;
    assert_eq!(status, 400, "{body}");
    let response = reqwest::get(format!("http://{addr}/elsewhere"))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn without_prime_on_cache_miss_a_miss_is_a_404() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        &db.url,
        "kck_test",
        &db.name,
        PRIMERS,
        "prime_on_cache_miss: false",
    );
    let running = start(config).await;
    let (status, body) = fetch(running.http_addr, "user/1").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_cached");
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn concurrent_misses_on_one_key_run_the_query_once() {
    let db = database(SCHEMA).await;
    db.execute_batch("CREATE SEQUENCE slow_calls").await;
    let dir = tempfile::tempdir().unwrap();
    // The query counts its own executions in a sequence.
    let primers = r#"
  - name: slow
    key: "slow/{id:int}"
    shape: value
    query: "SELECT $1::bigint + 0 * nextval('slow_calls') FROM pg_sleep(0.3)"
    # nextval is volatile: kck refuses it without a ttl or refresh_interval (it does not change the value).
    ttl: 1h
    depends_on:
      - table: users
"#;
    let running = start(config(dir.path(), &db.url, "kck_test", &db.name, primers)).await;
    let addr = running.http_addr;
    let fetches: Vec<_> = (0..8)
        .map(|_| tokio::spawn(fetch(addr, "slow/5")))
        .collect();
    for f in fetches {
        assert_eq!(f.await.unwrap(), (200, json!(5)));
    }
    let pg = db.client().await;
    let calls: i64 = pg
        .query_one("SELECT last_value FROM slow_calls", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        calls, 1,
        "eight concurrent misses on one key must run its query once"
    );
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// One random write transaction (1 to 4 statements) over users, orders and line_items.
pub(crate) fn random_transaction(rng: &mut rand::rngs::StdRng) -> String {
    use rand::Rng;
    const STATUSES: [&str; 4] = ["new", "paid", "shipped", "void"];
    let mut sql = String::from("BEGIN;");
    for _ in 0..rng.random_range(1..=4) {
        let user = rng.random_range(1..=50);
        let order = rng.random_range(1..=150);
        let item = rng.random_range(1..=250);
        let status = STATUSES[rng.random_range(0..STATUSES.len())];
        let statement = match rng.random_range(0..100) {
            0..=9 => format!(
                "INSERT INTO users VALUES ({user}, 'u{}') ON CONFLICT (id) DO UPDATE SET name = excluded.name;",
                rng.random_range(0..1000)
            ),
            10..=14 => format!("UPDATE users SET name = name || 'x' WHERE id = {user};"),
            15..=19 => format!("DELETE FROM users WHERE id = {user};"),
            20..=34 => format!(
                "INSERT INTO orders VALUES ({order}, {user}, {}.{:02}, '{status}') ON CONFLICT (id) DO UPDATE \
                 SET user_id = excluded.user_id, total = excluded.total;",
                rng.random_range(0..500),
                rng.random_range(0..100)
            ),
            35..=44 => format!(
                "UPDATE orders SET total = total + 1, status = '{status}' WHERE id = {order};"
            ),
            45..=52 => format!("UPDATE orders SET user_id = {user} WHERE id = {order};"),
            53..=59 => format!("DELETE FROM orders WHERE id = {order};"),
            60..=74 => format!(
                "INSERT INTO line_items VALUES ({item}, {order}, {}) ON CONFLICT (id) DO UPDATE SET qty = excluded.qty;",
                rng.random_range(1..10)
            ),
            75..=84 => format!("UPDATE line_items SET qty = qty + 1 WHERE id = {item};"),
            85..=89 => format!("UPDATE line_items SET order_id = {order} WHERE id = {item};"),
            90..=98 => format!("DELETE FROM line_items WHERE id = {item};"),
            _ => {
                if rng.random_range(0..10) == 0 {
                    "TRUNCATE line_items;".to_string()
                } else {
                    format!("DELETE FROM orders WHERE user_id = {user};")
                }
            }
        };
        sql.push_str(&statement);
    }
    sql.push_str("COMMIT;");
    sql
}

pub(crate) fn random_key(rng: &mut rand::rngs::StdRng) -> String {
    use rand::Rng;
    let user = rng.random_range(1..=55);
    match rng.random_range(0..6) {
        0 => format!("user/{user}"),
        1 | 2 => format!("orders_by_user/{user}"),
        3 => format!("user_total/{user}"),
        4 => [
            "by_status/new",
            "by_status/paid",
            "by_status/shipped",
            "by_status/void",
        ][user as usize % 4]
            .to_string(),
        _ => format!("users_from/{}", user - user % 10),
    }
}

pub(crate) fn seed(test: &str) -> u64 {
    let seed = std::env::var("KCK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (replay with KCK_TEST_SEED={seed})");
    seed
}

fn count_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomised_workload_converges() {
    use rand::SeedableRng;
    let seed = seed("randomised_workload_converges");
    let transactions = count_from_env("KCK_TEST_TRANSACTIONS", 1500);
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path(), &db);
    let running = start(config.clone()).await;
    let addr = running.http_addr;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Cache about half of the keys before the writes start.
    for _ in 0..120 {
        let key = random_key(&mut rng);
        assert_eq!(fetch(addr, &key).await.0, 200, "{key}");
    }
    // Two writers interleave their transactions; a reader caches more keys meanwhile.
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let url = db.url.clone();
            tokio::spawn(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(w + 1));
                for _ in 0..transactions / 2 {
                    client
                        .batch_execute(&random_transaction(&mut rng))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let reader = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(100));
        for _ in 0..200 {
            let key = random_key(&mut rng);
            assert_eq!(fetch(addr, &key).await.0, 200, "{key}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    for w in writers {
        w.await.unwrap();
    }
    reader.await.unwrap();
    let pg = db.client().await;
    wait_drained(&running, &pg, Duration::from_secs(120)).await;
    let checked = assert_converged(&running, &pg, &config).await;
    assert!(checked > 100, "only {checked} keys were cached");
    eprintln!(
        "randomised_workload_converges: {checked} cached keys equal their primers after {transactions} transactions"
    );
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kck_killed_with_sigkill_mid_stream_converges_after_restart() {
    use rand::SeedableRng;
    let seed = seed("a_kck_killed_with_sigkill_mid_stream_converges_after_restart");
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path =
        crate::support::kck::write_config(dir.path(), &db.url, "kck_test", &db.name, PRIMERS, "");
    let (mut child, addr) = spawn_kck(&path, None).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..80 {
        let key = random_key(&mut rng);
        assert_eq!(fetch(addr, &key).await.0, 200, "{key}");
    }
    let pg = db.client().await;
    for i in 0..600 {
        pg.batch_execute(&random_transaction(&mut rng))
            .await
            .unwrap();
        if i == 300 {
            child.start_kill().unwrap(); // SIGKILL
            child.wait().await.unwrap();
        }
    }
    // Restart on the same store and slot, with more writes while it catches up.
    let config = kck::config::Config::load(&path).unwrap();
    let running = start(config.clone()).await;
    // Entries written in the last second before the crash may be lost (they are recomputed on the next
    // miss); fetch again, as clients would, while more writes arrive.
    let mut keys = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..80 {
        let key = random_key(&mut keys);
        assert_eq!(fetch(running.http_addr, &key).await.0, 200, "{key}");
    }
    for _ in 0..200 {
        pg.batch_execute(&random_transaction(&mut rng))
            .await
            .unwrap();
    }
    wait_drained(&running, &pg, Duration::from_secs(120)).await;
    let checked = assert_converged(&running, &pg, &config).await;
    assert!(checked > 40, "only {checked} keys were cached");
    running.stop().await.unwrap();
    db.cleanup().await;
}

async fn start_error(config: kck::config::Config) -> String {
    let options = kck::app::RunOptions {
        slot_wait: Duration::from_millis(500),
        ..Default::default()
    };
    match kck::app::start(config, options).await {
        Ok(running) => {
            running.stop().await.unwrap();
            panic!("kck started, but an error was expected");
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_missing_publication_is_a_clear_error_or_created_when_configured() {
    let db = cluster().await.new_database().await;
    db.execute_batch("CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let primers = "  - name: user\n    key: \"user/{id:int}\"\n    shape: row\n    query: SELECT * FROM users WHERE id = $1\n    depends_on:\n      - table: users\n        columns: { id: id }\n";
    let error = start_error(config(dir.path(), &db.url, "nope", &db.name, primers)).await;
    assert!(
        error.contains("publication 'nope' does not exist"),
        "{error}"
    );
    assert!(
        error.contains("CREATE PUBLICATION \"nope\" FOR TABLE \"public\".\"users\""),
        "{error}"
    );

    let config =
        crate::support::kck::config_with(dir.path(), &db.url, "nope", &db.name, primers, "");
    let mut config = config;
    config.source.create_publication = true;
    let running = start(config).await;
    let pg = db.client().await;
    assert_eq!(fetch(running.http_addr, "user/1").await, (200, Value::Null));
    pg.batch_execute("INSERT INTO users VALUES (1, 'a')")
        .await
        .unwrap();
    eventually_equals(
        running.http_addr,
        "user/1",
        &json!({"id": 1, "name": "a"}),
        TIMEOUT,
    )
    .await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn a_table_missing_from_the_publication_is_named_with_the_fix() {
    let db = cluster().await.new_database().await;
    db.execute_batch(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text); CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint);
         CREATE PUBLICATION only_users FOR TABLE users;",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let primers = "  - name: o\n    key: \"o/{id:int}\"\n    query: SELECT * FROM orders WHERE user_id = $1\n    depends_on:\n      - table: orders\n        columns: { id: user_id }\n";
    let error = start_error(config(dir.path(), &db.url, "only_users", &db.name, primers)).await;
    assert!(error.contains("does not include"), "{error}");
    assert!(
        error.contains("ALTER PUBLICATION \"only_users\" ADD TABLE \"public\".\"orders\""),
        "{error}"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn a_slot_held_by_another_process_is_a_clear_error() {
    let db = database(SCHEMA).await;
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let running = start(test_config(dir_a.path(), &db)).await;
    let error = start_error(test_config(dir_b.path(), &db)).await;
    assert!(
        error.contains(&format!(
            "replication slot '{}' is in use by another process",
            db.name
        )),
        "{error}"
    );
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn a_bad_config_file_names_the_file_and_field_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "source:\n  url: postgres://x@127.0.0.1/x\nprimers:\n  - name: user\n    key: \"user/{id:int}\"\n    query: SELECT 1 WHERE $1 > 0\n    shape: sideways\n    depends_on:\n      - table: users\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.yaml:7"), "{stderr}");
    assert!(stderr.contains("shape"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn wal_level_other_than_logical_is_a_clear_error() {
    let owned = crate::support::pg::separate_cluster(&[("wal_level", "replica")]).await;
    let db = owned.new_database().await;
    db.execute_batch("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let primers = "  - name: user\n    key: \"user/{id:int}\"\n    query: SELECT * FROM users WHERE id = $1\n    depends_on:\n      - table: users\n        columns: { id: id }\n";
    let error = start_error(config(dir.path(), &db.url, "p", &db.name, primers)).await;
    assert!(error.contains("wal_level = 'replica'"), "{error}");
    assert!(error.contains("wal_level = logical"), "{error}");
}

#[tokio::test]
async fn a_schema_change_refreshes_the_table_keys_and_a_dropped_dependency_is_reported() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = format!(
        "{PRIMERS}  - name: user_star\n    key: \"user_star/{{id:int}}\"\n    shape: row\n    query: SELECT * FROM users WHERE id = $1\n    depends_on:\n      - table: users\n        columns: {{ id: id }}\n"
    );
    let running = start(config(dir.path(), &db.url, "kck_test", &db.name, &primers)).await;
    let addr = running.http_addr;
    let pg = db.client().await;
    pg.batch_execute(
        "INSERT INTO users VALUES (1, 'a'), (2, 'b'); INSERT INTO orders VALUES (1, 1, 1, 'new')",
    )
    .await
    .unwrap();
    eventually_equals(addr, "user_star/2", &json!({"id": 2, "name": "b"}), TIMEOUT).await;
    assert_eq!(fetch(addr, "by_status/new").await, (200, json!(1)));

    // Only user 1 changes, but the table gained a column: every cached key reading users is refreshed.
    pg.batch_execute("ALTER TABLE users ADD COLUMN age int NOT NULL DEFAULT 7; UPDATE users SET name = 'z' WHERE id = 1")
        .await
        .unwrap();
    eventually_equals(
        addr,
        "user_star/2",
        &json!({"id": 2, "name": "b", "age": 7}),
        TIMEOUT,
    )
    .await;
    eventually_equals(
        addr,
        "user_star/1",
        &json!({"id": 1, "name": "z", "age": 7}),
        TIMEOUT,
    )
    .await;

    // by_status maps orders.status: dropping that column is reported, not ignored.
    pg.batch_execute("ALTER TABLE orders DROP COLUMN status; INSERT INTO orders VALUES (2, 1, 2)")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let problems = running.stats.problems();
        if problems
            .iter()
            .any(|p| p.contains("by_status") && p.contains("'status'"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no problem reported: {problems:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Other primers on the table keep working.
    eventually_equals(addr, "user_total/1", &json!(3.00), TIMEOUT).await;
    running.stop().await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn the_slot_does_not_hold_wal_for_changes_kck_does_not_depend_on() {
    let db = database(SCHEMA).await;
    db.execute_batch("CREATE TABLE unrelated (id serial PRIMARY KEY, v text)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let running = start(test_config(dir.path(), &db)).await;
    let pg = db.client().await;
    for _ in 0..50 {
        pg.batch_execute(
            "INSERT INTO unrelated (v) SELECT md5(g::text) FROM generate_series(1, 200) g",
        )
        .await
        .unwrap();
    }
    let target: String = pg
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let target: kck::lsn::Lsn = target.parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let confirmed: Option<String> = pg
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        let confirmed: kck::lsn::Lsn = confirmed.expect("slot").parse().unwrap();
        if confirmed >= target {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot still holds WAL: confirmed {confirmed}, current {target}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Peak resident memory of a process, from /proc (Linux).
fn peak_rss_kib(pid: u32) -> u64 {
    crate::support::proc_status_kib(&pid.to_string(), "VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_keeps_memory_bounded() {
    let rows = count_from_env("KCK_TEST_BIG_TX_ROWS", 1_000_000) as i64;
    let db = cluster().await.new_database().await;
    db.execute_batch(
        "CREATE TABLE events (id bigint PRIMARY KEY, user_id bigint NOT NULL, payload text NOT NULL);
         CREATE INDEX ON events (user_id);
         CREATE PUBLICATION kck_test FOR TABLE events;",
    )
    .await;
    let primers = "  - name: events_by_user\n    key: \"events_by_user/{user_id:int}\"\n    shape: value\n    query: SELECT count(*) FROM events WHERE user_id = $1\n    depends_on:\n      - table: events\n        columns: { user_id: user_id }\n";
    let dir = tempfile::tempdir().unwrap();
    let path =
        crate::support::kck::write_config(dir.path(), &db.url, "kck_test", &db.name, primers, "");
    let (child, addr) = spawn_kck(&path, None).await;
    let pid = child.id().unwrap();
    for user in 0..100 {
        assert_eq!(
            fetch(addr, &format!("events_by_user/{user}")).await,
            (200, json!(0))
        );
    }
    let before = peak_rss_kib(pid);
    let pg = db.client().await;
    pg.batch_execute(&format!(
        "INSERT INTO events SELECT g, g % 1000, repeat('x', 200) FROM generate_series(1, {rows}) g"
    ))
    .await
    .unwrap();
    eventually_equals(
        addr,
        "events_by_user/7",
        &json!(rows / 1000),
        Duration::from_secs(300),
    )
    .await;
    eventually_equals(addr, "events_by_user/99", &json!(rows / 1000), TIMEOUT).await;
    let peak = peak_rss_kib(pid);
    eprintln!(
        "a_million_row_transaction_keeps_memory_bounded: {rows} rows, peak RSS {before} KiB before, {peak} KiB after"
    );
    assert!(
        peak < 150 * 1024,
        "peak RSS {peak} KiB over 150 MiB after a {rows}-row transaction"
    );
    drop(child);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_walsender_is_reconnected_and_nothing_is_lost() {
    use rand::SeedableRng;
    let seed = seed("a_killed_walsender_is_reconnected_and_nothing_is_lost");
    let Fixture {
        db,
        _dir,
        running,
        pg,
    } = Fixture::start().await;
    let config = test_config(_dir.path(), &db);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..60 {
        let key = random_key(&mut rng);
        assert_eq!(fetch(running.http_addr, &key).await.0, 200, "{key}");
    }
    for round in 0..3 {
        for _ in 0..150 {
            pg.batch_execute(&random_transaction(&mut rng))
                .await
                .unwrap();
        }
        // Wait until kck holds the slot again, then end its walsender mid-stream.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let active: bool = pg
                .query_one(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&db.name],
                )
                .await
                .unwrap()
                .get(0);
            if active {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "kck did not reconnect"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let killed: i64 = pg
            .query_one(
                "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(killed, 1, "round {round}");
    }
    wait_drained(&running, &pg, Duration::from_secs(120)).await;
    let checked = assert_converged(&running, &pg, &config).await;
    assert!(checked > 30, "only {checked} keys were cached");
    running.stop().await.unwrap();
    db.cleanup().await;
}
