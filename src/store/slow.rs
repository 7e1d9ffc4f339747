//! [`SlowStore`]: a real store that answers late while a switch is on, to see what kck does when its
//! store is slow (backpressure tests, the benchmark's slow-store phase). Not a mock: every call reaches
//! the wrapped store. Plug it in with [`crate::app::RunOptions::wrap_store`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Claim, Entry, QueueStats, Store, StoreResult, Stored, Task};
use crate::lsn::Lsn;

/// `inner`, with every `enqueue` delayed by `enqueue_delay` and every `finish` by `finish_delay` while
/// `slow` is set.
pub struct SlowStore {
    pub inner: Arc<dyn Store>,
    pub slow: Arc<AtomicBool>,
    pub enqueue_delay: Duration,
    pub finish_delay: Duration,
}

impl SlowStore {
    /// `inner` slowed by 200 ms per enqueue and 50 ms per finish while `slow` is set.
    pub fn new(inner: Arc<dyn Store>, slow: Arc<AtomicBool>) -> SlowStore {
        SlowStore {
            inner,
            slow,
            enqueue_delay: Duration::from_millis(200),
            finish_delay: Duration::from_millis(50),
        }
    }

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
    async fn store_if_registered(
        &self,
        primer: &str,
        key: &str,
        entry: Entry,
    ) -> StoreResult<Option<Stored>> {
        self.inner.store_if_registered(primer, key, entry).await
    }
    fn capacity(&self) -> Option<super::CapacityStats> {
        self.inner.capacity()
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
    async fn enqueue(&self, tasks: Vec<Task>) -> StoreResult<()> {
        self.delay(self.enqueue_delay).await;
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
        self.delay(self.finish_delay).await;
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
    async fn queue_depth(&self) -> StoreResult<u64> {
        self.inner.queue_depth().await
    }
    async fn pending_floor(&self) -> StoreResult<Option<Lsn>> {
        self.inner.pending_floor().await
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
