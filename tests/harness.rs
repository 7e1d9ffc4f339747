//! Tests of the test harness itself (`tests/support/pg.rs`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::pg;

async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
    client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap()
        .get(0)
}

async fn database_exists(cluster: &pg::Cluster, name: &str) -> bool {
    let admin = cluster.admin_client().await;
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    n == 1
}

#[tokio::test]
async fn two_databases_in_parallel() {
    let cluster = pg::cluster().await;
    let (a, b) = tokio::join!(cluster.new_database(), cluster.new_database());
    assert_ne!(a.name, b.name);
    assert!(
        a.url
            .starts_with(&format!("postgres://postgres@127.0.0.1:{}/", cluster.port))
    );
    tokio::join!(
        a.execute_batch("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)"),
        b.execute_batch("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)"),
    );
    let (ca, cb) = tokio::join!(a.client(), b.client());
    let na: i64 = ca
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    let nb: i64 = cb
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((na, nb), (1, 2));
    let db: String = ca
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, a.name);

    let (a_name, b_name) = (a.name.clone(), b.name.clone());
    // Cleanup terminates open sessions (ca, cb) too.
    tokio::join!(a.cleanup(), b.cleanup());
    assert!(!database_exists(cluster, &a_name).await);
    assert!(!database_exists(cluster, &b_name).await);
}

#[tokio::test]
async fn shared_cluster_has_the_test_settings() {
    let cluster = pg::cluster().await;
    let client = cluster.admin_client().await;
    assert_eq!(show(&client, "wal_level").await, "logical");
    assert_eq!(show(&client, "max_replication_slots").await, "64");
    assert_eq!(show(&client, "max_wal_senders").await, "64");
    assert_eq!(show(&client, "max_connections").await, "300");
    assert_eq!(show(&client, "fsync").await, "off");
    assert_eq!(show(&client, "wal_sender_timeout").await, "5s");
    assert!(cluster.is_running());
    // The same cluster for every test of the binary.
    assert_eq!(pg::cluster().await.port, cluster.port);
}

#[tokio::test]
async fn logical_slot_is_dropped_by_cleanup_even_while_streaming() {
    let cluster = pg::cluster().await;
    let db = cluster.new_database().await;
    db.execute_batch(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text); CREATE PUBLICATION p FOR TABLE items",
    )
    .await;
    // A multi-statement batch is one transaction, and a slot cannot be created after writes in it.
    db.execute_batch("SELECT pg_create_logical_replication_slot('harness_slot', 'pgoutput')")
        .await;
    db.execute_batch("INSERT INTO items VALUES (1, 'a')").await;
    let client = db.client().await;
    let plugin: String = client
        .query_one(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = 'harness_slot' \
             AND database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plugin, "pgoutput");

    // A walsender streaming from the slot makes it active: cleanup must still get rid of it.
    let mut recv = Command::new(cluster.bin_dir.join("pg_recvlogical"))
        .args([
            "--start",
            "--no-loop",
            "-S",
            "harness_slot",
            "-f",
            "/dev/null",
        ])
        .args(["-o", "proto_version=1", "-o", "publication_names=p"])
        .args(["-d", &db.url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pg_recvlogical");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let active: bool = client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'harness_slot'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if active {
            break;
        }
        assert!(
            recv.try_wait().unwrap().is_none(),
            "pg_recvlogical exited early"
        );
        assert!(Instant::now() < deadline, "slot never became active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let name = db.name.clone();
    db.cleanup().await;
    assert!(!database_exists(cluster, &name).await);
    let admin = cluster.admin_client().await;
    let slots: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'harness_slot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
    let _ = recv.kill();
    let _ = recv.wait();
}

#[tokio::test]
async fn separate_cluster_with_wal_level_replica() {
    let shared_port = pg::cluster().await.port;
    let other = pg::separate_cluster(&[("wal_level", "replica")]).await;
    assert_ne!(other.port, shared_port);
    let client = other.admin_client().await;
    assert_eq!(show(&client, "wal_level").await, "replica");
    // Other settings stay.
    assert_eq!(show(&client, "max_replication_slots").await, "64");
    let err = client
        .batch_execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
        .await
        .unwrap_err();
    assert!(
        pg::pg_error(&err).contains("wal_level"),
        "{}",
        pg::pg_error(&err)
    );
    drop(client);

    let dir = other.dir.clone();
    let port = other.port;
    drop(other);
    assert!(!dir.exists(), "{} is left behind", dir.display());
    let refused = tokio_postgres::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres?connect_timeout=2"),
        tokio_postgres::NoTls,
    )
    .await;
    assert!(
        refused.is_err(),
        "a stopped cluster still accepts connections"
    );
}
