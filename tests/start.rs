//! Starting kck (issue 16): `kck run` refuses what `kck check` calls FAIL, in check's words, before it
//! serves; a port in use stops it before it creates its replication slot; the demo passes its own check.

use std::path::PathBuf;

use crate::support::kck::{ConfigYaml, load};
use crate::support::pg::{TestDb, database};
use kck::app::{self, AppError, RunOptions};

const SCHEMA: &str = r#"
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id bigint PRIMARY KEY, owner bigint NOT NULL, total numeric NOT NULL);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE PUBLICATION kck_test FOR TABLE users, orders;
"#;

const GOOD: &str = r#"
  - name: user
    key: "user/{id:int}"
    shape: row
    query: "SELECT id, name FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
"#;

/// The slots of the test's database (the tests name their slot after it).
async fn slots(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `app::start`'s error for these primers, and the FAIL lines `kck check` prints for them.
async fn refused(db: &TestDb, primers: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = ConfigYaml::new(&db.url, "kck_test", &db.name, primers).write(dir.path());
    let config = load(&path);
    let check = kck::cli::check::run(&config).await.failures();
    let error = match app::start(config, RunOptions::default()).await {
        Ok(running) => {
            running.stop().await.unwrap();
            panic!("kck started with primers `kck check` fails:\n{check}");
        }
        Err(e) => e,
    };
    assert!(matches!(error, AppError::Check { .. }), "{error}");
    (error.to_string(), check)
}

#[tokio::test]
async fn run_refuses_a_primer_check_fails_with_checks_message() {
    let db = database(SCHEMA).await;
    // A query that does not prepare: a syntax error.
    let broken = format!(
        "{GOOD}
  - name: broken
    key: \"broken/{{id:int}}\"
    query: \"SELECT id, name FROM users WHERE id = $1 AND\"
    depends_on:
      - table: users
        columns: {{ id: id }}
"
    );
    let (error, check) = refused(&db, &broken).await;
    assert!(
        check.contains("FAIL primer broken: its query does not prepare:"),
        "{check}"
    );
    assert!(error.contains(&check), "start:\n{error}\ncheck:\n{check}");

    // A depends_on naming a column the table does not have (it never had it).
    let missing = format!(
        "{GOOD}
  - name: orders_by_user
    key: \"orders_by_user/{{user_id:int}}\"
    query: \"SELECT id, total FROM orders WHERE owner = $1 ORDER BY id\"
    depends_on:
      - table: orders
        columns: {{ user_id: user_id }}
"
    );
    let (error, check) = refused(&db, &missing).await;
    assert!(
        check.contains(
            "FAIL table public.orders: primer 'orders_by_user' maps columns user_id of it, but it has no \
             such column (its columns: id, owner, total)"
        ),
        "{check}"
    );
    assert!(error.contains(&check), "start:\n{error}\ncheck:\n{check}");
    assert!(error.contains("kck check --config FILE"), "{error}");
    // Refused before anything was made.
    assert_eq!(slots(&db).await, Vec::<String>::new());
    db.cleanup().await;
}

#[tokio::test]
async fn a_port_in_use_stops_kck_before_it_creates_its_slot() {
    let db = database(SCHEMA).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = ConfigYaml::new(&db.url, "kck_test", &db.name, GOOD).write(dir.path());
    let mut config = load(&path);
    config.http.bind = addr;
    let error = match app::start(config, RunOptions::default()).await {
        Ok(running) => {
            running.stop().await.unwrap();
            panic!("kck started on a port in use");
        }
        Err(e) => e,
    };
    assert!(
        matches!(error, AppError::Bind { .. }) && error.to_string().contains(&addr.to_string()),
        "{error}"
    );
    assert_eq!(
        slots(&db).await,
        Vec::<String>::new(),
        "no slot left behind"
    );
    drop(taken);
    db.cleanup().await;
}

/// The demo (`sql/demo.sql` with `config/demo.yaml`, as `scripts/demo` runs them) passes its own
/// `kck check`: no failure and no warning.
#[tokio::test]
async fn the_demo_passes_its_own_check() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let demo = std::fs::read_to_string(root.join("sql/demo.sql")).unwrap();
    let db = database(&demo).await;
    let url = db.url.clone();
    let config =
        kck::config::Config::load_with_env(&root.join("config/demo.yaml"), |name| match name {
            "KCK_SOURCE_URL" => Some(url.clone()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let report = kck::cli::check::run(&config).await;
    assert_eq!(report.problems(), 0, "{}", report.to_text());
    db.cleanup().await;
}
