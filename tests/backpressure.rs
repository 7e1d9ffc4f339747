//! Backpressure: with the store slowed down and the queue at `refresh.max_queue`, the replication reader
//! waits (the slot keeps the WAL) instead of growing the queue or this process's memory; once the store
//! is fast again, everything is applied. It runs in a process of its own (`support::alone`), so that no
//! other test shares the memory it measures.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::kck::{ConfigYaml, assert_converged, eventually_equals, fetch, wait_drained};
use crate::support::pg::cluster;
use kck::app::{RunOptions, StoreWrapper};
use kck::replication::StreamLimits;
use kck::store::Store;
use kck::store::slow::SlowStore;
use serde_json::json;

/// Resident memory of this process, from /proc (Linux).
fn rss_kib() -> u64 {
    crate::support::proc_status_kib("self", "VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_and_a_full_queue_slow_the_reader_and_keep_memory_flat() {
    const ROWS: i64 = 8_000;
    const MAX_QUEUE: u64 = 500;
    const BATCH: usize = 100;
    if crate::support::alone::run_alone(
        "backpressure::a_slow_store_and_a_full_queue_slow_the_reader_and_keep_memory_flat",
    )
    .await
    {
        return;
    }
    let db = cluster().await.new_database().await;
    db.execute_batch(
        "CREATE TABLE events (id bigint PRIMARY KEY, user_id bigint NOT NULL);
         CREATE INDEX ON events (user_id);
         CREATE PUBLICATION kck_test FOR TABLE events;",
    )
    .await;
    // A lookup dependency: every changed row is its own task, whether or not its key is cached.
    let primers = r#"  - name: events_by_user
    key: "events_by_user/{user_id:int}"
    shape: value
    query: SELECT count(*) FROM events WHERE user_id = $1
    depends_on:
      - table: events
        lookup:
          query: SELECT user_id FROM events WHERE id = $1
          args: [id]
"#;
    let dir = tempfile::tempdir().unwrap();
    let refresh_extra = format!("  max_queue: {MAX_QUEUE}\n");
    let path = ConfigYaml {
        refresh_extra: &refresh_extra,
        ..ConfigYaml::new(&db.url, "kck_test", &db.name, primers)
    }
    .write(dir.path());
    let config = kck::config::Config::load(&path).unwrap();
    let slow = Arc::new(AtomicBool::new(false));
    let wrap = {
        let slow = slow.clone();
        StoreWrapper(Arc::new(move |inner| {
            Arc::new(SlowStore::new(inner, slow.clone())) as Arc<dyn Store>
        }))
    };
    let options = RunOptions {
        limits: StreamLimits {
            batch_tasks: BATCH,
            ..StreamLimits::default()
        },
        wrap_store: Some(wrap),
        ..RunOptions::default()
    };
    let running = kck::app::start(config.clone(), options).await.unwrap();
    let addr = running.http_addr;
    for user in 0..10 {
        assert_eq!(
            fetch(addr, &format!("events_by_user/{user}")).await,
            (200, json!(0))
        );
    }

    slow.store(true, Ordering::Relaxed);
    let pg = db.client().await;
    // Many small transactions (a transaction's tasks are queued whole; the bound applies between them).
    let mut sql = String::new();
    for t in 0..ROWS / 100 {
        sql.push_str(&format!(
            "BEGIN; INSERT INTO events SELECT g, g % 10 FROM generate_series({}, {}) g; COMMIT;\n",
            t * 100 + 1,
            t * 100 + 100
        ));
    }
    pg.batch_execute(&sql).await.unwrap();
    let end: kck::lsn::Lsn = pg
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();

    // The queue fills up to its bound and the reader starts waiting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while running.stats.backpressure_waits.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reader never waited for the queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_full = rss_kib();
    let mut max_depth = 0;
    let mut rss_max = rss_full;
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < watch_until {
        let depth = running.store.queue_stats().await.unwrap().depth;
        max_depth = max_depth.max(depth);
        rss_max = rss_max.max(rss_kib());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked = running.stats.acked.load(Ordering::Relaxed);
    eprintln!(
        "backpressure: queue depth at most {max_depth} (bound {MAX_QUEUE}), RSS {rss_full} KiB when full, \
         at most {rss_max} KiB after, acknowledged {} of {end}",
        kck::lsn::Lsn(acked)
    );
    // One batch may land just under the bound; lookups add at most one task per user.
    assert!(
        max_depth <= MAX_QUEUE + BATCH as u64 + 10,
        "the queue grew to {max_depth}, past its bound {MAX_QUEUE}"
    );
    assert!(
        acked < end.0,
        "the slot was acknowledged past changes not yet queued"
    );
    assert!(
        rss_max < rss_full + 32 * 1024,
        "memory grew from {rss_full} KiB to {rss_max} KiB while the reader waited"
    );

    // The store is fast again: everything is applied, nothing was lost.
    slow.store(false, Ordering::Relaxed);
    eventually_equals(
        addr,
        "events_by_user/3",
        &json!(ROWS / 10),
        Duration::from_secs(300),
    )
    .await;
    wait_drained(&running, &pg, Duration::from_secs(300)).await;
    assert_eq!(assert_converged(&running, &pg, &config).await, 10);
    assert!(!running.stats.throttled.load(Ordering::Relaxed));
    running.stop().await.unwrap();
    db.cleanup().await;
}
