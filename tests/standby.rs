//! Hot standby for the replication slot: two kck processes on one Postgres, one streaming, one waiting.
//! Each keeps its own embedded store (a shared store is not needed to test who owns the slot).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::kck::{ConfigYaml, eventually, eventually_equals, fetch};
use crate::support::pg::{TestDb, database};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = r#"
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
CREATE PUBLICATION kck_test FOR TABLE users;
"#;

const PRIMERS: &str = r#"
  - name: user
    key: "user/{id:int}"
    shape: row
    query: "SELECT id, name FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
"#;

/// A config in `dir` for `db`, with its own store and `source.standby: true`.
fn write_config(dir: &Path, db: &TestDb) -> PathBuf {
    ConfigYaml {
        source_extra: "  standby: true\n",
        ..ConfigYaml::new(&db.url, "kck_test", &db.name, PRIMERS)
    }
    .write(dir)
}

/// A kck child process, its HTTP address and the file its log goes to.
struct Child {
    process: tokio::process::Child,
    addr: std::net::SocketAddr,
    log: PathBuf,
}

async fn spawn_kck(dir: &Path, db: &TestDb) -> Child {
    let log = dir.join("kck.log");
    let (process, addr) = crate::support::kck::spawn_kck(&write_config(dir, db), Some(&log)).await;
    Child { process, addr, log }
}

/// The backend pid streaming from the slot, if any.
async fn slot_pid(pg: &tokio_postgres::Client, slot: &str) -> Option<i32> {
    pg.query_one(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .ok()
    .and_then(|row| row.get::<_, Option<i32>>(0))
}

async fn wait_for<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually(what, TIMEOUT, check).await
}

/// Kill -9 the process that holds the slot: the standby holds it within seconds, and every change
/// committed after the kill is streamed, acknowledged and served by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_owner_is_killed() {
    let db = database(SCHEMA).await;
    db.execute_batch("INSERT INTO users VALUES (1, 'ada'), (2, 'grace')")
        .await;
    let pg = db.client().await;
    let slot = db.name.clone();
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();

    let mut a = spawn_kck(dir_a.path(), &db).await;
    wait_for("the first kck to stream", || async {
        slot_pid(&pg, &slot).await.is_some()
    })
    .await;
    let owner = slot_pid(&pg, &slot).await;
    assert_eq!(
        fetch(a.addr, "user/1").await,
        (200, json!({"id": 1, "name": "ada"}))
    );

    let b = spawn_kck(dir_b.path(), &db).await;
    // The second one waits, and says so; the slot stays with the first.
    wait_for("the second kck to report standby", || async {
        std::fs::read_to_string(&b.log)
            .unwrap_or_default()
            .contains("waiting as a hot standby")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        slot_pid(&pg, &slot).await,
        owner,
        "the standby took the slot from a live owner"
    );

    // Kill the owner; change data at once, while nobody streams.
    a.process.start_kill().unwrap();
    a.process.wait().await.unwrap();
    pg.batch_execute(
        "UPDATE users SET name = 'ada lovelace' WHERE id = 1; INSERT INTO users VALUES (3, 'alan')",
    )
    .await
    .unwrap();
    let after_kill: String = pg
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let after_kill: kck::lsn::Lsn = after_kill.parse().unwrap();

    // The standby holds the slot within seconds (the poll is 1 s; the bound here is generous).
    wait_for("the standby to hold the slot", || async {
        slot_pid(&pg, &slot)
            .await
            .is_some_and(|pid| Some(pid) != owner)
    })
    .await;
    // It streamed past every change committed after the kill, and acknowledged it (queued durably).
    wait_for(
        "the standby to acknowledge the changes made after the kill",
        || async {
            let row = pg
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
            let confirmed: Option<String> = row.get(0);
            confirmed
                .and_then(|c| c.parse::<kck::lsn::Lsn>().ok())
                .is_some_and(|c| c >= after_kill)
        },
    )
    .await;
    // It serves them...
    eventually_equals(
        b.addr,
        "user/1",
        &json!({"id": 1, "name": "ada lovelace"}),
        TIMEOUT,
    )
    .await;
    eventually_equals(b.addr, "user/3", &json!({"id": 3, "name": "alan"}), TIMEOUT).await;
    // ... and keeps following the stream.
    pg.batch_execute(
        "UPDATE users SET name = 'alan turing' WHERE id = 3; DELETE FROM users WHERE id = 1",
    )
    .await
    .unwrap();
    eventually_equals(
        b.addr,
        "user/3",
        &json!({"id": 3, "name": "alan turing"}),
        TIMEOUT,
    )
    .await;
    eventually_equals(b.addr, "user/1", &serde_json::Value::Null, TIMEOUT).await;
    let log = std::fs::read_to_string(&b.log).unwrap_or_default();
    assert!(log.contains("took over the replication slot"), "{log}");

    drop(b);
    db.cleanup().await;
}

/// The same in process, through [`kck::app::Running::replication_state`]: standby, then streaming once
/// the owner stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_state_reports_standby_then_streaming() {
    use kck::app::ReplicationState;
    let db = database(SCHEMA).await;
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let load = |dir: &Path| kck::config::Config::load(&write_config(dir, &db)).unwrap();
    let options = kck::app::RunOptions {
        standby_poll: Duration::from_millis(100),
        ..Default::default()
    };
    let a = kck::app::start(load(dir_a.path()), options.clone())
        .await
        .unwrap();
    assert_eq!(a.replication_state(), ReplicationState::Streaming);
    let b = kck::app::start(load(dir_b.path()), options).await.unwrap();
    assert_eq!(b.replication_state(), ReplicationState::Standby);
    // A standby serves HTTP (it may run other roles meanwhile).
    assert_eq!(
        reqwest::get(format!("http://{}/healthz", b.http_addr))
            .await
            .unwrap()
            .status(),
        200
    );
    let (code, body) = readyz(b.http_addr).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["replication"], "standby", "{body}");
    assert!(
        body["not_ready"][0]
            .as_str()
            .is_some_and(|m| m.starts_with("slot: standby")),
        "{body}"
    );
    a.stop().await.unwrap();
    let mut state = b.watch_replication_state();
    tokio::time::timeout(
        TIMEOUT,
        state.wait_for(|s| *s == ReplicationState::Streaming),
    )
    .await
    .expect("the standby did not take over")
    .unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (code, body) = readyz(b.http_addr).await;
        if code == 200 {
            assert_eq!(body["replication"], "streaming", "{body}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pg = db.client().await;
    pg.batch_execute("INSERT INTO users VALUES (7, 'edsger')")
        .await
        .unwrap();
    eventually_equals(
        b.http_addr,
        "user/7",
        &json!({"id": 7, "name": "edsger"}),
        TIMEOUT,
    )
    .await;
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// Splitting roles needs a shared store: the embedded store says so.
#[tokio::test]
async fn roles_other_than_all_need_a_shared_store() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &db);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(["run", "--roles", "http,refresh", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("roles 'refresh,http' need a store that several processes share"),
        "{stderr}"
    );
    assert!(stderr.contains("store.kind: scylla"), "{stderr}");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(["run", "--roles", "http,cache", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown role 'cache'"), "{stderr}");
    db.cleanup().await;
}

/// Roles split over two instances sharing one store (the way several processes share ScyllaDB): one
/// streams and queues, the other serves HTTP and refreshes, learning what is visible from the watermark
/// the first publishes in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_roles_share_the_work_through_the_store() {
    use std::sync::Arc;
    let db = database(SCHEMA).await;
    db.execute_batch("INSERT INTO users VALUES (1, 'ada')")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn kck::store::Store> =
        Arc::new(kck::store::embedded::EmbeddedStore::open(&dir.path().join("shared")).unwrap());
    let options = kck::app::RunOptions {
        shared_store: Some(store.clone()),
        ..Default::default()
    };
    let with_roles = |roles: &str| {
        let mut c = kck::config::Config::load(&write_config(dir.path(), &db)).unwrap();
        c.roles = kck::config::Roles::parse_list(roles).unwrap();
        c
    };
    let streamer = kck::app::start(with_roles("replication"), options.clone())
        .await
        .unwrap();
    assert_eq!(streamer.http_addr.port(), 0, "no http role, no listener");
    let server = kck::app::start(with_roles("http,refresh"), options)
        .await
        .unwrap();
    assert_eq!(server.replication_state(), kck::app::ReplicationState::Off);
    // Ready without the slot: it is not this process's job.
    let (code, body) = readyz(server.http_addr).await;
    assert_eq!((code, &body["replication"]), (200, &json!("off")), "{body}");
    // A miss in the process that does not stream: marked in the WAL, proven by the streamer.
    assert_eq!(
        fetch(server.http_addr, "user/1").await,
        (200, json!({"id": 1, "name": "ada"}))
    );
    let pg = db.client().await;
    pg.batch_execute("UPDATE users SET name = 'ada lovelace' WHERE id = 1")
        .await
        .unwrap();
    eventually_equals(
        server.http_addr,
        "user/1",
        &json!({"id": 1, "name": "ada lovelace"}),
        TIMEOUT,
    )
    .await;
    assert!(
        store
            .get_meta(kck::app::VISIBLE_META)
            .await
            .unwrap()
            .is_some(),
        "the streamer publishes its watermark"
    );
    server.stop().await.unwrap();
    streamer.stop().await.unwrap();
    db.cleanup().await;
}

/// GET /readyz: status and JSON body.
async fn readyz(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let response = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    let code = response.status().as_u16();
    (code, response.json().await.unwrap())
}
