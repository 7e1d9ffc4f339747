//! kck on a real ScyllaDB or Cassandra node (`KCK_TEST_SCYLLA=host:9042`; skipped, saying so, without
//! one): a randomised write load at the full rate the machine allows, kck killed with SIGKILL twice
//! during it, and then every cached key equal to its query at the final LSN. With
//! `KCK_TEST_CASSANDRA_LOG` (the node's `system.log`), the lines the node logged during the run must hold
//! no tombstone warning.
//!
//! `KCK_TEST_LOAD_SECONDS` (default 60) sets how long the load runs; `KCK_TEST_WRITERS` (default 8) how
//! many connections write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::pipeline::{PRIMERS, SCHEMA, random_key, random_transaction, seed};
use crate::support::kck::{assert_converged, fetch, spawn_kck, start, wait_drained};
use crate::support::pg::database;

fn node() -> Option<String> {
    let node = std::env::var("KCK_TEST_SCYLLA")
        .ok()
        .filter(|v| !v.is_empty());
    if node.is_none() {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: set KCK_TEST_SCYLLA=host:9042 to run kck on a ScyllaDB or Cassandra node"
        );
    }
    node
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Lines of the node's log, if its path is given.
fn log_lines(path: Option<&str>) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path?).ok()?;
    Some(text.lines().map(str::to_owned).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_load_with_two_sigkills_converges_on_the_scylla_store() {
    use rand::SeedableRng;
    let Some(node) = node() else { return };
    let seed = seed("a_write_load_with_two_sigkills_converges_on_the_scylla_store");
    let seconds = env_number("KCK_TEST_LOAD_SECONDS", 60);
    let writers = env_number("KCK_TEST_WRITERS", 8);
    let cassandra_log = std::env::var("KCK_TEST_CASSANDRA_LOG").ok();
    let log_before = log_lines(cassandra_log.as_deref()).map_or(0, |l| l.len());

    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let keyspace = format!("kck_it_{:x}", kck::store::cql::now_us());
    let config_text = format!(
        "source:\n  url: \"{url}\"\n  publication: kck_test\n  slot: {slot}\n\
         store:\n  kind: scylla\n  nodes: [\"{node}\"]\n  keyspace: {keyspace}\n  \
         replication: {{ class: SimpleStrategy, replication_factor: 1 }}\n  consistency: quorum\n  init: true\n\
         http:\n  bind: 127.0.0.1:0\n\
         refresh:\n  workers: 4\n\
         primers:\n{PRIMERS}\n",
        url = db.url,
        slot = db.name,
    );
    let path = dir.path().join("kck.yaml");
    std::fs::write(&path, config_text).unwrap();
    let log = dir.path().join("kck.log");

    let (mut child, addr) = spawn_kck(&path, Some(&log)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..120 {
        let key = random_key(&mut rng);
        assert_eq!(fetch(addr, &key).await.0, 200, "{key}");
    }

    // The load: every writer as fast as its connection goes, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let load: Vec<_> = (0..writers)
        .map(|w| {
            let (url, stop, done) = (db.url.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(w + 1));
                while !stop.load(Ordering::Relaxed) {
                    // Deadlocks between writers are Postgres's to break: such a transaction is not
                    // committed and kck never sees it.
                    if client
                        .batch_execute(&random_transaction(&mut rng))
                        .await
                        .is_ok()
                    {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let _ = client.batch_execute("ROLLBACK").await;
                    }
                }
            })
        })
        .collect();

    // Two SIGKILLs, a third and two thirds of the way through, each followed by a restart on the same
    // store and slot; clients keep fetching (and so caching) keys in between.
    let mut keys = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1000));
    let mut addr = addr;
    for kill in 1..=2u32 {
        let at = Duration::from_secs(seconds * u64::from(kill) / 3);
        while started.elapsed() < at {
            let key = random_key(&mut keys);
            let (status, body) = fetch(addr, &key).await;
            assert!(status == 200 || status == 503, "{key}: {status} {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        eprintln!(
            "killed kck with SIGKILL at {:.1} s ({} transactions so far)",
            started.elapsed().as_secs_f64(),
            done.load(Ordering::Relaxed)
        );
        (child, addr) = spawn_kck(&path, Some(&log)).await;
    }
    while started.elapsed() < Duration::from_secs(seconds) {
        let key = random_key(&mut keys);
        let (status, body) = fetch(addr, &key).await;
        assert!(status == 200 || status == 503, "{key}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in load {
        w.await.unwrap();
    }
    let transactions = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "load: {transactions} transactions in {elapsed:.1} s ({:.0}/s) by {writers} writers",
        transactions as f64 / elapsed
    );

    // The last process stops cleanly; one in this test process checks the result.
    let _ = child.start_kill();
    let _ = child.wait().await;
    let config = kck::config::Config::load(&path).unwrap();
    let running = start(config.clone()).await;
    let pg = db.client().await;
    let catch_up = Instant::now();
    wait_drained(&running, &pg, Duration::from_secs(900)).await;
    eprintln!(
        "caught up and drained {:.1} s after the load ended",
        catch_up.elapsed().as_secs_f64()
    );
    let checked = assert_converged(&running, &pg, &config).await;
    assert!(checked > 100, "only {checked} keys were cached");
    eprintln!(
        "converged: {checked} cached keys equal their primers after {transactions} transactions"
    );
    running.stop().await.unwrap();

    if let Some(lines) = log_lines(cassandra_log.as_deref()) {
        let new = lines.get(log_before..).unwrap_or_default();
        let tombstones: Vec<&String> = new
            .iter()
            .filter(|l| l.contains("tombstone cells"))
            .collect();
        eprintln!(
            "the node logged {} lines during the run, {} of them tombstone warnings",
            new.len(),
            tombstones.len()
        );
        assert!(
            tombstones.is_empty(),
            "the node warned about tombstones:\n{}",
            tombstones
                .iter()
                .take(5)
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let admin = kck::store::scylla::connect(&match &config.store {
        kck::store::StoreConfig::Scylla(c) => c.clone(),
        other => panic!("not a scylla store: {other:?}"),
    })
    .await
    .unwrap();
    let _ = admin
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await;
    db.cleanup().await;
}
