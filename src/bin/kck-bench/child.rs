//! `kck-bench` as a child process: kck itself (`app::start`, as the `kck` binary runs it) with its store
//! wrapped so that the parent can slow it down, for the memory scenario's slowed store. The parent sets
//! [`CHILD_ENV`] to the config file and [`FLAG_ENV`] to a path: while `PATH.slow` exists, every enqueue
//! waits 200 ms and every finish 50 ms; when `PATH.stop` appears, kck stops. Every 100 ms the child prints
//! `depth=N waits=M` (queue depth, times the reader waited for room) on stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use bytes::Bytes;
use kck::app::{self, RunOptions, StoreWrapper};
use kck::config::Config;
use kck::lsn::Lsn;
use kck::store::{Claim, Entry, QueueStats, Store, StoreResult, Stored, Task};

pub const CHILD_ENV: &str = "KCK_BENCH_CHILD_CONFIG";
pub const FLAG_ENV: &str = "KCK_BENCH_CHILD_FLAG";

pub fn slow_path(flag: &Path) -> PathBuf {
    flag.with_extension("slow")
}

pub fn stop_path(flag: &Path) -> PathBuf {
    flag.with_extension("stop")
}

pub fn run(config: &Path, flag: &Path) -> Result<()> {
    let config = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let slow = Arc::new(AtomicBool::new(false));
    let wrap = {
        let slow = slow.clone();
        StoreWrapper(Arc::new(move |inner| {
            Arc::new(SlowStore {
                inner,
                slow: slow.clone(),
            }) as Arc<dyn Store>
        }))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let options = RunOptions {
        wrap_store: Some(wrap),
        ..RunOptions::default()
    };
    let running = rt
        .block_on(app::start(config, options))
        .map_err(|e| anyhow::anyhow!("kck did not start: {e}"))?;
    let (slow_file, stop_file) = (slow_path(flag), stop_path(flag));
    rt.block_on(async {
        while !stop_file.exists() {
            slow.store(slow_file.exists(), Ordering::Relaxed);
            let depth = running.store.queue_stats().await.map_or(0, |q| q.depth);
            let waits = running.stats.backpressure_waits.load(Ordering::Relaxed);
            println!("depth={depth} waits={waits}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    slow.store(false, Ordering::Relaxed);
    rt.block_on(running.stop())
        .map_err(|e| anyhow::anyhow!("kck stopped with an error: {e}"))
}

/// The real store, with `enqueue` and `finish` slowed down while `slow` is set.
struct SlowStore {
    inner: Arc<dyn Store>,
    slow: Arc<AtomicBool>,
}

impl SlowStore {
    async fn delay(&self, d: Duration) {
        if self.slow.load(Ordering::Relaxed) {
            tokio::time::sleep(d).await;
        }
    }
}

#[async_trait]
impl Store for SlowStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Entry>> {
        self.inner.get(key).await
    }
    async fn is_registered(&self, key: &str) -> StoreResult<bool> {
        self.inner.is_registered(key).await
    }
    async fn register_key(&self, primer: &str, key: &str) -> StoreResult<()> {
        self.inner.register_key(primer, key).await
    }
    async fn store_result(&self, primer: &str, key: &str, entry: Entry) -> StoreResult<Stored> {
        self.inner.store_result(primer, key, entry).await
    }
    async fn remove_key(&self, primer: &str, key: &str) -> StoreResult<()> {
        self.inner.remove_key(primer, key).await
    }
    async fn keys(
        &self,
        primer: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        self.inner.keys(primer, after, limit).await
    }
    async fn key_count(&self, primer: &str) -> StoreResult<u64> {
        self.inner.key_count(primer).await
    }
    async fn pending_floor(&self) -> StoreResult<Option<Lsn>> {
        self.inner.pending_floor().await
    }
    async fn enqueue(&self, tasks: Vec<Task>) -> StoreResult<()> {
        self.delay(Duration::from_millis(200)).await;
        self.inner.enqueue(tasks).await
    }
    async fn claim(&self, max: usize, lease: Duration) -> StoreResult<Vec<Claim>> {
        self.inner.claim(max, lease).await
    }
    async fn finish(
        &self,
        claim: &Claim,
        result: Option<(&str, &str, Entry)>,
        follow_up: Vec<Task>,
    ) -> StoreResult<Option<Stored>> {
        self.delay(Duration::from_millis(50)).await;
        self.inner.finish(claim, result, follow_up).await
    }
    async fn retry(&self, claim: &Claim, delay: Duration) -> StoreResult<()> {
        self.inner.retry(claim, delay).await
    }
    async fn wait_for_tasks(&self, timeout: Duration) {
        self.inner.wait_for_tasks(timeout).await
    }
    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        self.inner.queue_stats().await
    }
    async fn get_meta(&self, name: &str) -> StoreResult<Option<Bytes>> {
        self.inner.get_meta(name).await
    }
    async fn put_meta(&self, name: &str, value: Bytes) -> StoreResult<()> {
        self.inner.put_meta(name, value).await
    }
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool> {
        self.inner.try_lease(name, holder, ttl).await
    }
    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        self.inner.release_lease(name, holder).await
    }
}
