//! An in-memory model of the CQL queue tables, for tests that need no server: it runs the queue
//! ([`CqlQueue`]) with the tables' semantics (partitions, clustering order, whole-partition and range
//! deletions, lightweight transactions on `ver`, minimums kept by timestamp), counts the rows and
//! tombstones each query would read, and can pause an operation so that a test interleaves two
//! deterministically. [`ModelStore`] adds entries, keys, meta and named leases, so that the whole store
//! conformance suite runs on it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use super::cql::{Counts, HolderRow, LogRow, Mark, TaskRead, TaskState};
use super::cql_queue::{CqlQueue, QueueBackend};
use super::{Claim, Entry, QueueStats, Store, StoreResult, Stored, Task};
use crate::lsn::Lsn;

/// What one kind of query read, over all its calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    pub calls: u64,
    /// The most rows (live or not) one call passed over.
    pub max_rows: u64,
    /// The most tombstones (deleted partitions, rows, ranges) one call met.
    pub max_tombstones: u64,
}

#[derive(Default)]
struct Partition {
    /// Deleted whole: reads meet one partition tombstone.
    deleted: bool,
    rows: BTreeMap<(i64, String), LogRow>,
}

/// A summary slice: (least floor, least enqueue time).
type Summary = (Option<i64>, Option<i64>);
/// An armed pause: the operation, and the notifications of [`Pause`].
type Gate = Option<(&'static str, Arc<Notify>, Arc<Notify>)>;

#[derive(Default)]
struct Tables {
    log: BTreeMap<(i32, i64), Partition>,
    tasks: HashMap<String, TaskRead>,
    /// level → slice → (floor, oldest).
    floors: BTreeMap<i8, BTreeMap<i64, Summary>>,
    /// Range deletions of `floors`: (level, from, to).
    floor_ranges: Vec<(i8, i64, i64)>,
    holders: BTreeMap<String, HolderRow>,
    counts: BTreeMap<i32, Counts>,
    start: Option<i64>,
}

/// A pause armed on one operation: the next call of it waits for [`Pause::release`].
pub struct Pause {
    pub reached: Arc<Notify>,
    pub release: Arc<Notify>,
}

/// The in-memory tables, shareable between stores (two "processes" on one cluster).
#[derive(Clone, Default)]
pub struct Model {
    tables: Arc<Mutex<Tables>>,
    reads: Arc<Mutex<BTreeMap<&'static str, Reads>>>,
    gate: Arc<Mutex<Gate>>,
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Model {
    /// A model starting at `start` (what `kck store init` writes).
    pub fn new(start: i64) -> Model {
        let m = Model::default();
        m.t().start = Some(start);
        m
    }

    fn t(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap()
    }

    fn read(&self, op: &'static str, rows: u64, tombstones: u64) {
        let mut reads = self.reads.lock().unwrap();
        let r = reads.entry(op).or_default();
        r.calls += 1;
        r.max_rows = r.max_rows.max(rows);
        r.max_tombstones = r.max_tombstones.max(tombstones);
    }

    /// What each query read so far, and forget it.
    pub fn take_reads(&self) -> BTreeMap<&'static str, Reads> {
        std::mem::take(&mut *self.reads.lock().unwrap())
    }

    /// Pause the next call of `op` (a [`QueueBackend`] method name) until released.
    pub fn pause(&self, op: &'static str) -> Pause {
        let (reached, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        *self.gate.lock().unwrap() = Some((op, reached.clone(), release.clone()));
        Pause { reached, release }
    }

    async fn gate(&self, op: &'static str) {
        let armed = {
            let mut gate = self.gate.lock().unwrap();
            match gate.take() {
                Some((o, reached, release)) if o == op => Some((reached, release)),
                other => {
                    *gate = other;
                    None
                }
            }
        };
        if let Some((reached, release)) = armed {
            reached.notify_one();
            release.notified().await;
        }
    }
}

#[async_trait]
impl QueueBackend for Model {
    async fn append(&self, rows: &[LogRow]) -> StoreResult<()> {
        self.gate("append").await;
        let mut t = self.t();
        for r in rows {
            let p = t
                .log
                .entry((
                    r.shard,
                    super::cql::slice_of(r.pos, super::cql::LOG_SLICE_US),
                ))
                .or_default();
            // A write after a partition deletion is live again (it has a later timestamp).
            p.rows.insert((r.pos, r.id.clone()), r.clone());
        }
        Ok(())
    }

    async fn request(&self, id: &str, lsn: i64) -> StoreResult<()> {
        self.gate("request").await;
        let mut t = self.t();
        let row = t.tasks.entry(id.to_owned()).or_default();
        row.req_lsn = row.req_lsn.max(Some(lsn));
        Ok(())
    }

    async fn mark(&self, marks: &[Mark]) -> StoreResult<()> {
        self.gate("mark").await;
        let mut t = self.t();
        for m in marks {
            let e = t
                .floors
                .entry(m.level)
                .or_default()
                .entry(m.slice)
                .or_default();
            *e = (min_opt(e.0, m.floor), min_opt(e.1, m.oldest));
        }
        Ok(())
    }

    async fn read_log(
        &self,
        shard: i32,
        slice: i64,
        from: i64,
        to: i64,
        limit: usize,
    ) -> StoreResult<Vec<LogRow>> {
        self.gate("read_log").await;
        let t = self.t();
        let Some(p) = t.log.get(&(shard, slice)) else {
            drop(t);
            self.read("read_log", 0, 0);
            return Ok(Vec::new());
        };
        let out: Vec<LogRow> = p
            .rows
            .range((from, String::new())..)
            .take_while(|((pos, _), _)| *pos <= to)
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect();
        let tombstones = u64::from(p.deleted);
        drop(t);
        self.read("read_log", out.len() as u64, tombstones);
        Ok(out)
    }

    async fn read_task(&self, id: &str) -> StoreResult<TaskRead> {
        self.gate("read_task").await;
        let row = self.t().tasks.get(id).copied().unwrap_or_default();
        self.read("read_task", 1, 0);
        Ok(row)
    }

    async fn cas_task(
        &self,
        id: &str,
        expect: Option<i64>,
        new: &TaskState,
        _ttl_s: i32,
    ) -> StoreResult<bool> {
        self.gate("cas_task").await;
        let mut t = self.t();
        let row = t.tasks.entry(id.to_owned()).or_default();
        // A lightweight transaction reads the row it compares.
        let applied = row.state.map(|s| s.ver) == expect;
        if applied {
            row.state = Some(*new);
        }
        drop(t);
        self.read("cas_task", 1, 0);
        Ok(applied)
    }

    async fn holders(&self) -> StoreResult<Vec<HolderRow>> {
        self.gate("holders").await;
        let rows: Vec<HolderRow> = self.t().holders.values().cloned().collect();
        self.read("holders", rows.len() as u64, 0);
        Ok(rows)
    }

    async fn put_holder(&self, row: &HolderRow) -> StoreResult<()> {
        self.gate("put_holder").await;
        self.t().holders.insert(row.holder.clone(), row.clone());
        Ok(())
    }

    async fn read_marks(&self, level: i8, from: i64, to: i64) -> StoreResult<Vec<Mark>> {
        self.gate("read_marks").await;
        let t = self.t();
        let out: Vec<Mark> = t
            .floors
            .get(&level)
            .map(|l| {
                l.range(from..to)
                    .map(|(slice, (floor, oldest))| Mark {
                        level,
                        slice: *slice,
                        floor: *floor,
                        oldest: *oldest,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tombstones = t
            .floor_ranges
            .iter()
            .filter(|(l, f, e)| *l == level && *f < to && from < *e)
            .count() as u64;
        drop(t);
        self.read("read_marks", out.len() as u64, tombstones);
        Ok(out)
    }

    async fn add_counts(&self, shard: i32, d: Counts) -> StoreResult<()> {
        self.gate("add_counts").await;
        self.t().counts.entry(shard).or_default().add(d);
        Ok(())
    }

    async fn counts(&self) -> StoreResult<Counts> {
        self.gate("counts").await;
        let t = self.t();
        let mut c = Counts::default();
        for v in t.counts.values() {
            c.add(*v);
        }
        let n = t.counts.len() as u64;
        drop(t);
        self.read("counts", n, 0);
        Ok(c)
    }

    async fn retire_log(&self, shard: i32, slice: i64) -> StoreResult<()> {
        let mut t = self.t();
        let p = t.log.entry((shard, slice)).or_default();
        p.deleted = true;
        p.rows.clear();
        Ok(())
    }

    async fn retire_marks(&self, level: i8, from: i64, to: i64) -> StoreResult<()> {
        let mut t = self.t();
        if let Some(l) = t.floors.get_mut(&level) {
            let keep = l.split_off(&to);
            l.retain(|s, _| *s < from);
            l.extend(keep);
        }
        t.floor_ranges.push((level, from, to));
        Ok(())
    }

    async fn get_start(&self) -> StoreResult<Option<i64>> {
        Ok(self.t().start)
    }

    async fn put_start(&self, pos: i64) -> StoreResult<()> {
        let mut t = self.t();
        t.start = t.start.max(Some(pos));
        Ok(())
    }
}

/// A whole [`Store`] on the model: the CQL queue, plus plain in-memory entries, keys, meta and leases.
pub struct ModelStore {
    pub queue: CqlQueue<Model>,
    entries: Mutex<HashMap<String, Entry>>,
    index: Mutex<BTreeMap<String, BTreeSet<String>>>,
    meta: Mutex<HashMap<String, Bytes>>,
    leases: Mutex<HashMap<String, (String, std::time::Instant)>>,
}

impl ModelStore {
    pub fn new(model: Model) -> ModelStore {
        ModelStore {
            queue: CqlQueue::new(model),
            entries: Mutex::default(),
            index: Mutex::default(),
            meta: Mutex::default(),
            leases: Mutex::default(),
        }
    }

    pub fn model(&self) -> &Model {
        self.queue.backend()
    }
}

#[async_trait]
impl Store for ModelStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Entry>> {
        Ok(self.entries.lock().unwrap().get(key).cloned())
    }

    async fn is_registered(&self, key: &str) -> StoreResult<bool> {
        Ok(self.index.lock().unwrap().values().any(|k| k.contains(key)))
    }

    async fn register_key(&self, primer: &str, key: &str) -> StoreResult<()> {
        self.index
            .lock()
            .unwrap()
            .entry(primer.to_owned())
            .or_default()
            .insert(key.to_owned());
        Ok(())
    }

    async fn store_result(&self, primer: &str, key: &str, entry: Entry) -> StoreResult<Stored> {
        self.register_key(primer, key).await?;
        let mut entries = self.entries.lock().unwrap();
        match entries.get(key) {
            Some(e) if e.lsn > entry.lsn => Ok(Stored::KeptNewer(e.lsn)),
            _ => {
                entries.insert(key.to_owned(), entry);
                Ok(Stored::Written)
            }
        }
    }

    async fn remove_key(&self, primer: &str, key: &str) -> StoreResult<()> {
        self.entries.lock().unwrap().remove(key);
        if let Some(k) = self.index.lock().unwrap().get_mut(primer) {
            k.remove(key);
        }
        Ok(())
    }

    async fn keys(
        &self,
        primer: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        let index = self.index.lock().unwrap();
        Ok(index
            .get(primer)
            .map(|k| {
                k.iter()
                    .filter(|k| after.is_none_or(|a| k.as_str() > a))
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn enqueue(&self, tasks: Vec<Task>) -> StoreResult<()> {
        self.queue.enqueue(tasks).await
    }

    async fn claim(&self, max: usize, lease: Duration) -> StoreResult<Vec<Claim>> {
        self.queue.claim(max, lease).await
    }

    async fn finish(
        &self,
        claim: &Claim,
        result: Option<(&str, &str, Entry)>,
        follow_up: Vec<Task>,
    ) -> StoreResult<Option<Stored>> {
        let stored = match result {
            Some((p, k, e)) => Some(self.store_result(p, k, e).await?),
            None => None,
        };
        self.queue.finish(claim, follow_up).await?;
        Ok(stored)
    }

    async fn retry(&self, claim: &Claim, delay: Duration) -> StoreResult<()> {
        self.queue.retry(claim, delay).await
    }

    async fn wait_for_tasks(&self, timeout: Duration) {
        self.queue.wait_for_tasks(timeout).await
    }

    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        self.queue.queue_stats().await
    }

    async fn queue_depth(&self) -> StoreResult<u64> {
        self.queue.queue_depth().await
    }

    async fn pending_floor(&self) -> StoreResult<Option<Lsn>> {
        self.queue.pending_floor().await
    }

    async fn get_meta(&self, name: &str) -> StoreResult<Option<Bytes>> {
        Ok(self.meta.lock().unwrap().get(name).cloned())
    }

    async fn put_meta(&self, name: &str, value: Bytes) -> StoreResult<()> {
        self.meta.lock().unwrap().insert(name.to_owned(), value);
        Ok(())
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool> {
        let mut leases = self.leases.lock().unwrap();
        let now = std::time::Instant::now();
        match leases.get(name) {
            Some((h, until)) if h != holder && *until > now => Ok(false),
            _ => {
                leases.insert(name.to_owned(), (holder.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        let mut leases = self.leases.lock().unwrap();
        if leases.get(name).is_some_and(|(h, _)| h == holder) {
            leases.remove(name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    fn store() -> ModelStore {
        ModelStore::new(Model::new(crate::clock::now_us() - 1_000_000))
    }

    /// The CQL queue keeps the whole store contract, on the model of its tables.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cql_queue_passes_the_conformance_suite_on_the_model() {
        conformance::run_all(|| async { store() }).await;
    }

    /// The race of issue 14: a worker's lease runs out while it finishes; another claimer reads the task
    /// (claimable), then the finish lands, then the claimer's lease write. The lease and the task's state
    /// are one row written by a transaction on its version, so the late claim fails and the finished task
    /// is never handed out again.
    #[tokio::test]
    async fn a_claim_that_read_the_task_before_it_finished_does_not_take_it() {
        let s = Arc::new(store());
        s.enqueue(vec![Task::new("t", Lsn(5))]).await.unwrap();
        let a = s
            .claim(1, Duration::from_millis(1))
            .await
            .unwrap()
            .remove(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The next claim reads the task (its lease has run out) and stops before writing the lease.
        let pause = s.model().pause("cas_task");
        let b = {
            let s = s.clone();
            tokio::spawn(async move { s.claim(1, Duration::from_secs(60)).await.unwrap() })
        };
        pause.reached.notified().await;
        // Meanwhile the first worker finishes.
        s.finish(&a, None, Vec::new()).await.unwrap();
        pause.release.notify_one();
        assert!(
            b.await.unwrap().is_empty(),
            "a claim that read the task before its finish took the finished task"
        );
        assert!(
            s.claim(10, Duration::from_secs(60))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(s.pending_floor().await.unwrap(), None);
        assert_eq!(s.queue_depth().await.unwrap(), 0);
    }

    /// The other order: the claim's lease write lands first, so the late finish is not the task's claim
    /// any more and leaves it to the new holder (at-least-once; never two live claims).
    #[tokio::test]
    async fn a_finish_after_its_task_was_claimed_again_leaves_it_to_the_new_claim() {
        let s = Arc::new(store());
        s.enqueue(vec![Task::new("t", Lsn(5))]).await.unwrap();
        let a = s
            .claim(1, Duration::from_millis(1))
            .await
            .unwrap()
            .remove(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b = s.claim(1, Duration::from_secs(60)).await.unwrap().remove(0);
        assert_eq!(b.attempts, 1);
        s.finish(&a, None, Vec::new()).await.unwrap();
        assert_eq!(
            s.pending_floor().await.unwrap(),
            Some(Lsn(5)),
            "b still owes 5"
        );
        s.finish(&b, None, Vec::new()).await.unwrap();
        assert_eq!(s.pending_floor().await.unwrap(), None);
    }

    /// The cost of the queue's queries does not grow with finished work: after 200 or 20,000 finished
    /// tasks (with follow-ups, raises and retries), the same operations read the same number of rows
    /// and meet no tombstone.
    #[tokio::test]
    async fn what_a_query_reads_does_not_grow_with_finished_tasks() {
        async fn probe_after(finished: usize) -> BTreeMap<&'static str, Reads> {
            let s = store();
            let lease = Duration::from_secs(60);
            let mut done = 0;
            let mut lsn = 1u64;
            while done < finished {
                let tasks: Vec<Task> = (0..100)
                    .map(|i| {
                        lsn += 1;
                        Task::new(format!("k{}", (done + i) % 5_000), Lsn(lsn))
                    })
                    .collect();
                s.enqueue(tasks).await.unwrap();
                loop {
                    let claims = s.claim(16, lease).await.unwrap();
                    if claims.is_empty() {
                        break;
                    }
                    for (i, c) in claims.iter().enumerate() {
                        let first = c.id.starts_with('k');
                        if first && i % 7 == 0 {
                            s.enqueue(vec![Task::new(c.id.clone(), Lsn(lsn + 1))])
                                .await
                                .unwrap();
                        }
                        let follow = if first && i % 5 == 0 {
                            vec![Task::new(format!("f{}", c.id), c.lsn)]
                        } else {
                            Vec::new()
                        };
                        s.finish(c, None, follow).await.unwrap();
                        done += 1;
                    }
                }
            }
            s.model().take_reads();
            // The probe: what a steady load does, once.
            s.enqueue(
                (0..10)
                    .map(|i| Task::new(format!("p{i}"), Lsn(lsn + 10)))
                    .collect(),
            )
            .await
            .unwrap();
            s.pending_floor().await.unwrap();
            s.queue_stats().await.unwrap();
            s.queue_depth().await.unwrap();
            let claims = s.claim(16, lease).await.unwrap();
            assert_eq!(
                claims.len(),
                10,
                "after {finished}: {:?} {}",
                claims
                    .iter()
                    .map(|c| (&c.id, c.lsn, c.attempts))
                    .collect::<Vec<_>>(),
                s.queue.debug_state(),
            );
            for c in &claims {
                s.finish(c, None, Vec::new()).await.unwrap();
            }
            s.wait_for_tasks(Duration::ZERO).await;
            assert_eq!(s.pending_floor().await.unwrap(), None);
            s.model().take_reads()
        }
        let small = probe_after(200).await;
        let large = probe_after(20_000).await;
        for (op, r) in &large {
            let s = small.get(op).copied().unwrap_or_default();
            assert_eq!(r.max_tombstones, 0, "{op} met tombstones: {r:?}");
            assert!(
                r.max_rows <= s.max_rows.max(32),
                "{op} reads more after 20,000 finished tasks ({r:?}) than after 200 ({s:?})"
            );
        }
        assert!(large.contains_key("read_log") && large.contains_key("read_task"));
    }
}
