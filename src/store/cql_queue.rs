//! The refresh queue of the CQL store, over any [`QueueBackend`]: the statements of [`super::cql`] run by
//! the driver (`super::scylla`), or an in-memory model of the tables (`super::cql_model`, for tests that
//! need no server, can interleave operations deterministically and count the rows each query reads).
//!
//! # Design (see also ARCHITECTURE.md, "The CQL refresh queue")
//! - **An append-only log.** Every enqueue, release, retry and lease end is an event in `queue_log`,
//!   partitioned by shard (task id hash) and 10 s slice. No row is deleted inside a partition: a
//!   partition is deleted whole once every claimer has read past it (one partition tombstone, never read:
//!   nobody reads below the heads).
//! - **Heads.** Each claimer reads each shard's log forward from its *head* (every event before it is
//!   resolved) and keeps it in memory; it publishes the heads in its `queue_holders` row.
//! - **One row per task.** `queue_tasks` holds a task's state (pending or done, floor, lease) written only
//!   by lightweight transactions comparing `ver`, so the lease and the task's existence are decided
//!   together: a claim that read the row before a finish cannot take the lease after it.
//!   `req_lsn`, the largest LSN asked for, is written by enqueue without reading.
//! - **Counted, not scanned.** Depth and claims are counters (estimates); the pending floor and the
//!   oldest enqueue come from the claimers' published debts, the events just after the heads (read
//!   exactly, up to the end of a 50 ms slice) and per-slice minimums beyond (`queue_floors`).
//! - **Late events.** An event written at or below a position another process's claimer may already have
//!   read past (its published `reading_to`) is copied above it; this process's own claims never pass an
//!   event it is still writing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt, stream};
use tokio::sync::Notify;

use super::cql::{
    self, COARSE, Counts, DONE_TTL_SECONDS, Decision, FINE, FINE_SLICE_US, Finish, Group,
    HolderRow, LOG_SLICE_US, LogRow, Mark, MicrosClock, QUEUE_BUCKETS, TaskRead, TaskState,
};
use super::{Claim, QueueStats, StoreResult, Task};
use crate::lsn::Lsn;

/// The statements the queue runs, one method each (see [`super::cql::Statements`] for their text).
#[async_trait]
pub trait QueueBackend: Send + Sync + 'static {
    /// Insert log rows.
    async fn append(&self, rows: &[LogRow]) -> StoreResult<()>;
    /// Raise a task's `req_lsn` to at least `lsn` (a write timestamped `lsn`: the largest wins).
    async fn request(&self, id: &str, lsn: i64) -> StoreResult<()>;
    /// Lower the summaries' minimums (writes timestamped [`cql::min_timestamp`]).
    async fn mark(&self, marks: &[Mark]) -> StoreResult<()>;
    /// Rows of partition `(shard, slice)` with `from <= pos <= to`, in `(pos, id)` order, at most `limit`.
    async fn read_log(
        &self,
        shard: i32,
        slice: i64,
        from: i64,
        to: i64,
        limit: usize,
    ) -> StoreResult<Vec<LogRow>>;
    async fn read_task(&self, id: &str) -> StoreResult<TaskRead>;
    /// Write `new` if the row's `ver` is `expect` (`None`: no state yet); whether it applied.
    async fn cas_task(
        &self,
        id: &str,
        expect: Option<i64>,
        new: &TaskState,
        ttl_s: i32,
    ) -> StoreResult<bool>;
    async fn holders(&self) -> StoreResult<Vec<HolderRow>>;
    async fn put_holder(&self, row: &HolderRow) -> StoreResult<()>;
    /// Summaries of `level` with `from <= slice < to`.
    async fn read_marks(&self, level: i8, from: i64, to: i64) -> StoreResult<Vec<Mark>>;
    async fn add_counts(&self, shard: i32, d: Counts) -> StoreResult<()>;
    async fn counts(&self) -> StoreResult<Counts>;
    /// Delete partition `(shard, slice)` of the log whole.
    async fn retire_log(&self, shard: i32, slice: i64) -> StoreResult<()>;
    /// Delete the summaries of `level` with `from <= slice < to` (one range deletion).
    async fn retire_marks(&self, level: i8, from: i64, to: i64) -> StoreResult<()>;
    async fn get_start(&self) -> StoreResult<Option<i64>>;
    async fn put_start(&self, pos: i64) -> StoreResult<()>;
}

/// Unresolved events a claim round reads per shard.
const HEAD: usize = 32;
/// Rounds one claim call runs at most.
const ROUNDS: usize = 4;
/// Empty slices a page steps over at most (catching up after a long stop).
const MAX_STEPS: usize = 64;
/// Groups resolved at once.
const CHUNK: usize = 32;
/// Statements run at once by one call.
const CONCURRENCY: usize = 32;
/// How far ahead of its clock a claimer's published `reading_to` reaches, so that it is not written
/// before every round (an event another process writes below it is copied above it: this is the most a
/// cross-process event waits for that).
const READ_AHEAD_US: i64 = 20_000;
/// How often a claimer rewrites its row with nothing new to read (for the floors other processes see).
const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// How often counter deltas are written.
const COUNTS_EVERY: Duration = Duration::from_millis(100);
/// How often a claimer retires what every head has passed, and how far behind the heads it stays.
const RETIRE_EVERY: Duration = Duration::from_secs(10);
const RETIRE_LAG_US: i64 = 60_000_000;
/// Log slices retired per call at most.
const RETIRE_SLICES: i64 = 60;
/// Rows the pending floor reads exactly per shard before it relies on the summary of that slice.
const EXACT_LIMIT: usize = 2_000;

/// The pending floor and the oldest enqueue, as last computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Answer {
    floor: Option<i64>,
    oldest: Option<i64>,
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A live claim of this process.
#[derive(Debug, Clone, Copy)]
struct Held {
    floor: i64,
    enq: i64,
    until: i64,
    attempts: i32,
    claim_lsn: i64,
}

struct State {
    heads: Option<Vec<i64>>,
    /// Per shard: events at or after the head already resolved (a hole before them stopped the head).
    resolved: Vec<BTreeSet<(i64, String)>>,
    claims: HashMap<String, Held>,
    /// Positions of this process's events being written: no head passes them.
    inflight: BTreeMap<i64, usize>,
    /// The `reading_to` last published, and when.
    published: Option<(Instant, i64)>,
    dirty: bool,
    deltas: Vec<Counts>,
    counts_flushed: Instant,
    retired: Option<i64>,
    retire_due: Instant,
}

/// The refresh queue of a CQL store. See the module docs.
pub struct CqlQueue<B> {
    b: B,
    holder: String,
    clock: MicrosClock,
    st: Mutex<State>,
    round: tokio::sync::Mutex<()>,
    answer: tokio::sync::Mutex<Option<(Instant, Answer)>>,
    tasks_changed: Notify,
}

/// A random 63-bit number (never 0): task row versions, holder names.
fn random() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(cql::now_us());
    ((h.finish() >> 1) as i64).max(1)
}

impl<B: QueueBackend> CqlQueue<B> {
    pub fn new(backend: B) -> CqlQueue<B> {
        CqlQueue {
            b: backend,
            holder: format!("{:016x}", random()),
            clock: MicrosClock::default(),
            st: Mutex::new(State {
                heads: None,
                resolved: vec![BTreeSet::new(); QUEUE_BUCKETS as usize],
                claims: HashMap::new(),
                inflight: BTreeMap::new(),
                published: None,
                dirty: false,
                deltas: vec![Counts::default(); QUEUE_BUCKETS as usize],
                counts_flushed: Instant::now(),
                retired: None,
                retire_due: Instant::now(),
            }),
            round: tokio::sync::Mutex::new(()),
            answer: tokio::sync::Mutex::new(None),
            tasks_changed: Notify::new(),
        }
    }

    pub fn backend(&self) -> &B {
        &self.b
    }

    /// This process's heads, resolved events beyond them, and positions being written (for tests).
    #[cfg(test)]
    pub fn debug_state(&self) -> String {
        let st = self.state();
        format!(
            "heads {:?} resolved {:?} inflight {:?}",
            st.heads,
            st.resolved.iter().map(|r| r.len()).collect::<Vec<_>>(),
            st.inflight
        )
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update of the state is complete before the lock is released; a panic cannot leave half.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Positions for `n` new events of this process, registered as being written.
    fn alloc(&self, n: usize) -> Vec<i64> {
        let mut st = self.state();
        let out: Vec<i64> = (0..n).map(|_| self.clock.next()).collect();
        for p in &out {
            *st.inflight.entry(*p).or_default() += 1;
        }
        out
    }

    /// A position at `at` (µs) or later, registered as being written.
    fn alloc_at(&self, at: i64) -> i64 {
        let mut st = self.state();
        let p = if at > self.clock.peek() {
            at
        } else {
            self.clock.next()
        };
        *st.inflight.entry(p).or_default() += 1;
        p
    }

    fn written(&self, positions: impl IntoIterator<Item = i64>) {
        let mut st = self.state();
        for p in positions {
            if let Some(n) = st.inflight.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    st.inflight.remove(&p);
                }
            }
        }
    }

    fn count(&self, shard: i32, d: Counts) {
        if let Some(c) = self.state().deltas.get_mut(shard as usize) {
            c.add(d);
        }
    }

    /// Write the counter deltas if `force` or the last write is older than [`COUNTS_EVERY`].
    async fn flush_counts(&self, force: bool) -> StoreResult<()> {
        let deltas: Vec<(i32, Counts)> = {
            let mut st = self.state();
            if !force && st.counts_flushed.elapsed() < COUNTS_EVERY {
                return Ok(());
            }
            st.counts_flushed = Instant::now();
            st.deltas
                .iter_mut()
                .enumerate()
                .filter(|(_, c)| !c.is_zero())
                .map(|(i, c)| (i as i32, std::mem::take(c)))
                .collect()
        };
        let writes: Vec<_> = deltas
            .into_iter()
            .map(|(s, d)| async move { (s, d, self.b.add_counts(s, d).await) })
            .collect();
        let results: Vec<(i32, Counts, StoreResult<()>)> = stream::iter(writes)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut first_error = None;
        for (s, d, r) in results {
            if let Err(e) = r {
                // Kept for the next write.
                self.count(s, d);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Where this process starts reading: past every retired partition and every head published.
    async fn ensure_heads(&self) -> StoreResult<()> {
        if self.state().heads.is_some() {
            return Ok(());
        }
        let start = match self.b.get_start().await? {
            Some(s) => s,
            None => {
                // A keyspace made by `kck store init` has a start; one without can only be empty or
                // made by hand: read from an hour ago.
                tracing::warn!(
                    "The scylla store's queue has no start position ({}); reading it from an hour ago.",
                    cql::QUEUE_START_META
                );
                cql::now_us() - 3_600_000_000
            }
        };
        let holders = self.b.holders().await?;
        let mut heads = vec![start; QUEUE_BUCKETS as usize];
        for h in &holders {
            for (head, theirs) in heads.iter_mut().zip(&h.heads) {
                *head = (*head).max(*theirs);
            }
        }
        let mut st = self.state();
        if st.heads.is_none() {
            st.heads = Some(heads);
            st.retired = Some(start);
        }
        Ok(())
    }

    /// Write this process's row: what it holds, its heads, and `reading_to`.
    async fn publish(&self, reading_to: i64) -> StoreResult<()> {
        let row = {
            let mut st = self.state();
            st.dirty = false;
            HolderRow {
                holder: self.holder.clone(),
                reading_to,
                heads: st.heads.clone().unwrap_or_default(),
                floor: st.claims.values().map(|h| h.floor).min(),
                oldest: st.claims.values().map(|h| h.enq).min(),
                until: st.claims.values().map(|h| h.until).max().unwrap_or(0),
            }
        };
        self.b.put_holder(&row).await?;
        self.state().published = Some((Instant::now(), reading_to));
        Ok(())
    }

    /// Publish if something changed and the last write is older than [`PUBLISH_EVERY`] (or `force`).
    async fn publish_if_dirty(&self, force: bool) -> StoreResult<()> {
        let reading_to = {
            let st = self.state();
            match st.published {
                Some((at, r)) if st.dirty && (force || at.elapsed() >= PUBLISH_EVERY) => r,
                None if st.heads.is_some() => cql::now_us(),
                _ => return Ok(()),
            }
        };
        self.publish(reading_to).await
    }

    /// Write log rows with their summaries (first, so that no event is ever without one), and copy any
    /// that landed at or below another claimer's `reading_to` above it. Returns the enqueue events that
    /// count in the queue's depth, per shard.
    async fn append_rows(&self, rows: Vec<LogRow>) -> StoreResult<()> {
        let mut rows = rows;
        for _ in 0..4 {
            if rows.is_empty() {
                return Ok(());
            }
            let positions: Vec<i64> = rows.iter().map(|r| r.pos).collect();
            let result = async {
                self.b.mark(&cql::marks_for(&rows)).await?;
                self.b.append(&rows).await?;
                self.b.holders().await
            }
            .await;
            let holders = match result {
                Ok(h) => h,
                Err(e) => {
                    self.written(positions);
                    return Err(e);
                }
            };
            let passed = holders
                .iter()
                .filter(|h| h.holder != self.holder)
                .map(|h| h.reading_to)
                .max();
            let late: Vec<LogRow> = match passed {
                Some(p) => rows.iter().filter(|r| r.pos <= p).cloned().collect(),
                None => Vec::new(),
            };
            let copies: Vec<LogRow> = late
                .into_iter()
                .map(|r| LogRow {
                    pos: self.alloc_at(passed.unwrap_or(0).saturating_add(1)),
                    ..r
                })
                .collect();
            self.written(positions);
            rows = copies;
        }
        Err(super::StoreError::failed(
            "queueing a task: other claimers kept reading past this process's events (are their clocks far ahead?)",
        ))
    }

    pub async fn enqueue(&self, tasks: Vec<Task>) -> StoreResult<()> {
        if tasks.is_empty() {
            return Ok(());
        }
        let mut req: HashMap<&str, i64> = HashMap::new();
        for t in &tasks {
            let l = cql::lsn_bigint(t.lsn);
            let e = req.entry(t.id.as_str()).or_insert(l);
            *e = (*e).max(l);
        }
        // The largest LSN of each id first: a claim that reads an event finds it in the row.
        all(req
            .into_iter()
            .map(|(id, lsn)| self.b.request(id, lsn))
            .collect())
        .await?;
        let positions = self.alloc(tasks.len());
        let rows: Vec<LogRow> = tasks
            .iter()
            .zip(positions)
            .map(|(t, pos)| LogRow {
                shard: cql::bucket_of(&t.id),
                pos,
                id: t.id.clone(),
                lsn: Some(cql::lsn_bigint(t.lsn)),
                floor: Some(cql::lsn_bigint(t.floor.min(t.lsn))),
                enq: None,
            })
            .collect();
        let mut per_shard = vec![0i64; QUEUE_BUCKETS as usize];
        for r in &rows {
            per_shard[r.shard as usize] += 1;
        }
        Box::pin(self.append_rows(rows)).await?;
        for (s, n) in per_shard.into_iter().enumerate() {
            if n > 0 {
                self.count(
                    s as i32,
                    Counts {
                        events: n,
                        ..Counts::default()
                    },
                );
            }
        }
        self.tasks_changed.notify_waiters();
        self.flush_counts(false).await
    }

    /// Up to `limit` events of `shard` from `head` to `to`, skipping empty slices; and, when every event
    /// up to some position was read, that position (exclusive).
    async fn page(
        &self,
        shard: i32,
        head: i64,
        to: i64,
        limit: usize,
    ) -> StoreResult<(Vec<LogRow>, Option<i64>)> {
        let mut from = head;
        for _ in 0..MAX_STEPS {
            if from > to {
                return Ok((Vec::new(), Some(from)));
            }
            let slice = cql::slice_of(from, LOG_SLICE_US);
            let end = (slice + 1) * LOG_SLICE_US - 1;
            let upto = to.min(end);
            let rows = self.b.read_log(shard, slice, from, upto, limit).await?;
            if rows.len() >= limit {
                return Ok((rows, None));
            }
            if upto == to || !rows.is_empty() {
                return Ok((rows, Some(upto + 1)));
            }
            from = end + 1;
        }
        Ok((Vec::new(), Some(from)))
    }

    pub async fn claim(&self, max: usize, lease: Duration) -> StoreResult<Vec<Claim>> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let _round = self.round.lock().await;
        self.ensure_heads().await?;
        for _ in 0..ROUNDS {
            if out.len() >= max {
                break;
            }
            // Boxed, as the other large futures here: debug builds keep them on the stack otherwise.
            let (more, claimed) = Box::pin(self.claim_round(max - out.len(), lease)).await?;
            out.extend(claimed);
            if !more {
                break;
            }
        }
        self.flush_counts(false).await?;
        self.publish_if_dirty(false).await?;
        Ok(out)
    }

    /// One round: read every shard from its head, resolve what was read in order, move the heads.
    /// Returns whether another round may find more.
    async fn claim_round(&self, max: usize, lease: Duration) -> StoreResult<(bool, Vec<Claim>)> {
        // Publish how far this round may read before reading it.
        // Taken under the lock that positions are handed out under: an event of this process below
        // `reading_to` is registered as being written by then (and caps the heads), any later one is above.
        let (reading_to, publish, cap) = {
            let st = self.state();
            let now = self.clock.next();
            let cap = st.inflight.keys().next().copied().unwrap_or(i64::MAX);
            match st.published {
                Some((_, r)) if r >= now => (now, None, cap),
                _ => (now, Some(now + READ_AHEAD_US), cap),
            }
        };
        if let Some(p) = publish {
            self.publish(p).await?;
        }
        let (heads, limits) = {
            let st = self.state();
            let heads = st.heads.clone().unwrap_or_default();
            let limits: Vec<usize> = st.resolved.iter().map(|r| HEAD + r.len()).collect();
            (heads, limits)
        };
        let reads: Vec<_> = (0..QUEUE_BUCKETS)
            .map(|s| {
                let (head, limit) = (heads[s as usize], limits[s as usize]);
                async move {
                    let (rows, bound) = self.page(s, head, reading_to, limit).await?;
                    Ok::<_, super::StoreError>((s, rows, bound))
                }
            })
            .collect();
        let pages: Vec<(i32, Vec<LogRow>, Option<i64>)> = stream::iter(reads)
            .buffer_unordered(QUEUE_BUCKETS as usize)
            .try_collect()
            .await?;
        let mut unread = false;
        let mut all: Vec<LogRow> = Vec::new();
        let mut bounds: Vec<Option<i64>> = vec![None; QUEUE_BUCKETS as usize];
        let mut page_rows: Vec<Vec<(i64, String)>> = vec![Vec::new(); QUEUE_BUCKETS as usize];
        {
            let st = self.state();
            for (s, rows, bound) in pages {
                if bound.is_none() {
                    unread = true;
                }
                bounds[s as usize] = bound;
                for r in rows {
                    if st.resolved[s as usize].contains(&(r.pos, r.id.clone())) {
                        continue;
                    }
                    page_rows[s as usize].push((r.pos, r.id.clone()));
                    all.push(r);
                }
            }
        }
        let groups = cql::group_events(all);
        let now_ms = cql::now_ms();
        let until_ms = cql::lease_until(now_ms, lease);
        let mut out = Vec::new();
        let mut stopped = false;
        for chunk in groups.chunks(CHUNK) {
            if out.len() >= max {
                stopped = true;
                break;
            }
            let reads: Vec<_> = chunk.iter().map(|g| self.b.read_task(&g.id)).collect();
            let reads: Vec<StoreResult<TaskRead>> =
                stream::iter(reads).buffered(CONCURRENCY).collect().await;
            let mut budget = max - out.len();
            let mut take: Vec<(&Group, TaskRead, Decision)> = Vec::new();
            for (g, read) in chunk.iter().zip(reads) {
                let read = read?;
                let d = cql::decide(&read, g, now_ms, until_ms, random());
                if matches!(d, Decision::Claim { .. }) {
                    if budget == 0 {
                        stopped = true;
                        break;
                    }
                    budget -= 1;
                }
                take.push((g, read, d));
            }
            // Lease checks and deferred copies first: a claim never exists without its lease check.
            let mut extra = Vec::new();
            for (g, _, d) in &take {
                match d {
                    Decision::Claim { .. } => extra.push(LogRow {
                        shard: g.shard,
                        pos: self.alloc_at(until_ms.saturating_mul(1000)),
                        id: g.id.clone(),
                        lsn: None,
                        floor: None,
                        enq: None,
                    }),
                    Decision::Defer { at } => extra.push(LogRow {
                        shard: g.shard,
                        pos: self.alloc_at(*at),
                        id: g.id.clone(),
                        lsn: g.lsn,
                        floor: g.floor,
                        enq: Some(g.enq.unwrap_or(g.first)),
                    }),
                    Decision::Skip => {}
                }
            }
            Box::pin(self.append_rows(extra)).await?;
            let writes: Vec<_> = take
                .iter()
                .map(|(g, read, d)| async move {
                    match d {
                        Decision::Claim { state, .. } => {
                            self.b
                                .cas_task(&g.id, read.state.map(|s| s.ver), state, 0)
                                .await
                        }
                        _ => Ok(true),
                    }
                })
                .collect();
            let outcomes: Vec<StoreResult<bool>> =
                stream::iter(writes).buffered(CONCURRENCY).collect().await;
            let mut st = self.state();
            for ((g, read, d), ok) in take.iter().zip(outcomes) {
                if !ok? {
                    // Lost to another claimer (or a finish): read again next round.
                    unread = true;
                    continue;
                }
                let mut delta = Counts {
                    events: -i64::from(g.enqueues),
                    ..Counts::default()
                };
                if let Decision::Claim { state, opened } = d {
                    // Taking over a lease that ran out replaces that claim (its worker died, or will find
                    // the task is not its own any more): it was counted already.
                    let expired = read
                        .state
                        .is_some_and(|s| s.pending && s.lease_until_ms > 0);
                    if !expired {
                        delta.claimed += 1;
                    }
                    if *opened {
                        delta.open += 1;
                    }
                    st.claims.insert(
                        g.id.clone(),
                        Held {
                            floor: state.floor,
                            enq: state.enq,
                            until: until_ms.saturating_mul(1000),
                            attempts: state.attempts,
                            claim_lsn: state.claim_lsn,
                        },
                    );
                    out.push(Claim {
                        id: g.id.clone(),
                        lsn: cql::bigint_lsn(state.claim_lsn),
                        attempts: u32::try_from(state.attempts).unwrap_or(0),
                        enqueued_at_ms: state.enq.div_euclid(1000),
                    });
                }
                if let Some(c) = st.deltas.get_mut(g.shard as usize) {
                    c.add(delta);
                }
                for e in &g.events {
                    st.resolved[g.shard as usize].insert(e.clone());
                }
            }
            if stopped {
                break;
            }
        }
        // Move each head over what is resolved, never past an event this process is still writing.
        let mut st = self.state();
        let cap = cap.min(st.inflight.keys().next().copied().unwrap_or(i64::MAX));
        let State {
            heads, resolved, ..
        } = &mut *st;
        let heads = heads.get_or_insert_with(Vec::new);
        for s in 0..QUEUE_BUCKETS as usize {
            let first_open = page_rows[s]
                .iter()
                .find(|e| !resolved[s].contains(*e))
                .map(|e| e.0);
            let to = match (first_open, bounds[s]) {
                (Some(p), _) => p,
                (None, Some(b)) => b,
                (None, None) => page_rows[s].last().map_or(heads[s], |e| e.0),
            };
            let to = to.min(cap);
            if to > heads[s] {
                heads[s] = to;
                let keep = resolved[s].split_off(&(to, String::new()));
                resolved[s] = keep;
            }
        }
        st.dirty = true;
        Ok((unread && !stopped, out))
    }

    /// `finish` after the result is stored: queue the follow-ups (inheriting the task's floor), then close
    /// or release the task.
    pub async fn finish(&self, claim: &Claim, follow_up: Vec<Task>) -> StoreResult<()> {
        let attempts = i32::try_from(claim.attempts).unwrap_or(i32::MAX);
        let claim_lsn = cql::lsn_bigint(claim.lsn);
        let mut read = self.b.read_task(&claim.id).await?;
        let ours = read.state.filter(|s| s.is_claim(attempts, claim_lsn));
        // A follow-up with the task's own id is a new task: the task stays queued for it.
        let again = follow_up.iter().any(|t| t.id == claim.id);
        if !follow_up.is_empty() {
            let follow_up = follow_up
                .into_iter()
                .map(|mut t| {
                    if let Some(s) = ours {
                        t.floor = t.floor.min(t.lsn).min(cql::bigint_lsn(s.floor));
                    }
                    t
                })
                .collect();
            Box::pin(self.enqueue(follow_up)).await?;
        }
        let shard = cql::bucket_of(&claim.id);
        for _ in 0..4 {
            match cql::finish_state(&read, attempts, claim_lsn, again, random()) {
                Finish::NotOurs => break,
                Finish::Done(state) => {
                    if self
                        .b
                        .cas_task(
                            &claim.id,
                            read.state.map(|s| s.ver),
                            &state,
                            DONE_TTL_SECONDS,
                        )
                        .await?
                    {
                        self.count(
                            shard,
                            Counts {
                                events: 0,
                                open: -1,
                                claimed: -1,
                            },
                        );
                        break;
                    }
                }
                Finish::Raised(state) => {
                    let pos = self.alloc(1)[0];
                    if self.unclaim(&claim.id, shard, pos, &read, &state).await? {
                        self.tasks_changed.notify_waiters();
                        break;
                    }
                }
            }
            read = self.b.read_task(&claim.id).await?;
        }
        self.release(claim).await
    }

    /// Forget a claim of this process (finished, retried or lost) and publish. A newer claim of the same
    /// task (its lease ran out and this process took it again) is kept.
    async fn release(&self, claim: &Claim) -> StoreResult<()> {
        {
            let mut st = self.state();
            let attempts = i32::try_from(claim.attempts).unwrap_or(i32::MAX);
            let claim_lsn = cql::lsn_bigint(claim.lsn);
            if st
                .claims
                .get(&claim.id)
                .is_some_and(|h| h.attempts == attempts && h.claim_lsn == claim_lsn)
            {
                st.claims.remove(&claim.id);
            }
            st.dirty = true;
        }
        self.flush_counts(false).await?;
        self.publish_if_dirty(false).await
    }

    pub async fn retry(&self, claim: &Claim, delay: Duration) -> StoreResult<()> {
        let attempts = i32::try_from(claim.attempts).unwrap_or(i32::MAX);
        let claim_lsn = cql::lsn_bigint(claim.lsn);
        let shard = cql::bucket_of(&claim.id);
        let due_ms = cql::now_ms()
            .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
            .max(1);
        let read = self.b.read_task(&claim.id).await?;
        if let Some(state) = cql::retry_state(&read, attempts, claim_lsn, due_ms, random()) {
            let pos = self.alloc_at(due_ms.saturating_mul(1000));
            self.unclaim(&claim.id, shard, pos, &read, &state).await?;
        }
        self.tasks_changed.notify_waiters();
        self.release(claim).await
    }

    /// Put a claimed task back as `state` (open again: raised by a newer enqueue, or due later): its log
    /// row at `pos` first, so a claimer can find it, then the state row by LWT on the version `read` saw.
    /// Whether the LWT applied (then one claim fewer is counted).
    async fn unclaim(
        &self,
        id: &str,
        shard: i32,
        pos: i64,
        read: &TaskRead,
        state: &TaskState,
    ) -> StoreResult<bool> {
        self.append_rows(vec![LogRow {
            shard,
            pos,
            id: id.to_owned(),
            lsn: None,
            floor: Some(state.floor),
            enq: Some(state.enq),
        }])
        .await?;
        let applied = self
            .b
            .cas_task(id, read.state.map(|s| s.ver), state, 0)
            .await?;
        if applied {
            self.count(
                shard,
                Counts {
                    claimed: -1,
                    ..Counts::default()
                },
            );
        }
        Ok(applied)
    }

    /// Whether some event may be claimable now (a claim may still find it is nothing to do).
    async fn looks_claimable(&self) -> StoreResult<bool> {
        self.ensure_heads().await?;
        let now = cql::now_us();
        let (heads, resolved) = {
            let st = self.state();
            (st.heads.clone().unwrap_or_default(), st.resolved.clone())
        };
        let looks: Vec<_> = (0..QUEUE_BUCKETS)
            .map(|s| {
                let head = heads[s as usize];
                let resolved = &resolved[s as usize];
                async move {
                    let slice = cql::slice_of(head, LOG_SLICE_US);
                    if slice < cql::slice_of(now, LOG_SLICE_US) {
                        // Behind by a slice or more: a round moves the head on.
                        return Ok::<bool, super::StoreError>(true);
                    }
                    let rows = self
                        .b
                        .read_log(s, slice, head, now, 1 + resolved.len())
                        .await?;
                    Ok(rows
                        .iter()
                        .any(|r| !resolved.contains(&(r.pos, r.id.clone()))))
                }
            })
            .collect();
        let found: Vec<bool> = stream::iter(looks)
            .buffer_unordered(QUEUE_BUCKETS as usize)
            .try_collect()
            .await?;
        Ok(found.into_iter().any(|f| f))
    }

    pub async fn wait_for_tasks(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before looking, so that an enqueue by this process after the look wakes us.
            let notified = self.tasks_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let look = async {
                self.flush_counts(false).await?;
                self.publish_if_dirty(false).await?;
                Box::pin(self.maybe_retire()).await?;
                Box::pin(self.looks_claimable()).await
            };
            match look.await {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = %crate::report::Chain(&error), "Cannot look at the queue; waiting.")
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return;
            }
            let step = (deadline - now).min(POLL);
            tokio::select! {
                _ = &mut notified => return,
                _ = tokio::time::sleep(step) => {}
            }
        }
    }

    /// Every process's heads (the furthest of each shard) and the other claimers' rows.
    async fn heads_and_holders(&self) -> StoreResult<(Vec<i64>, Vec<HolderRow>)> {
        self.ensure_heads().await?;
        let holders = self.b.holders().await?;
        let mut heads = self.state().heads.clone().unwrap_or_default();
        let others: Vec<HolderRow> = holders
            .into_iter()
            .filter(|h| h.holder != self.holder)
            .collect();
        for h in &others {
            for (head, theirs) in heads.iter_mut().zip(&h.heads) {
                *head = (*head).max(*theirs);
            }
        }
        Ok((heads, others))
    }

    /// The pending floor and oldest enqueue: the debts claimers hold, the events right after the heads
    /// (exactly, to the end of the head's 50 ms slice), and per-slice minimums beyond.
    async fn compute_answer(&self) -> StoreResult<Answer> {
        let (heads, others) = self.heads_and_holders().await?;
        let (own, resolved) = {
            let st = self.state();
            let own = Answer {
                floor: st.claims.values().map(|h| h.floor).min(),
                oldest: st.claims.values().map(|h| h.enq).min(),
            };
            // A head another process moved past this one's keeps what this one resolved beyond it.
            (own, st.resolved.clone())
        };
        let h = heads.iter().copied().min().unwrap_or(0);
        let fine = cql::slice_of(h, FINE_SLICE_US);
        let fine_end = (fine + 1) * FINE_SLICE_US;
        let reads: Vec<_> = (0..QUEUE_BUCKETS)
            .map(|s| {
                let head = heads[s as usize];
                let resolved = &resolved[s as usize];
                async move {
                    if head >= fine_end {
                        return Ok::<_, super::StoreError>((Answer::default(), false));
                    }
                    let rows = self
                        .b
                        .read_log(
                            s,
                            cql::slice_of(head, LOG_SLICE_US),
                            head,
                            fine_end - 1,
                            EXACT_LIMIT,
                        )
                        .await?;
                    let mut a = Answer::default();
                    for r in &rows {
                        if resolved.contains(&(r.pos, r.id.clone())) {
                            continue;
                        }
                        a.floor = min_opt(a.floor, r.floor);
                        a.oldest = min_opt(a.oldest, r.oldest());
                    }
                    Ok((a, rows.len() >= EXACT_LIMIT))
                }
            })
            .collect();
        let exact: Vec<(Answer, bool)> = stream::iter(reads)
            .buffer_unordered(QUEUE_BUCKETS as usize)
            .try_collect()
            .await?;
        let mut a = own;
        let mut truncated = false;
        for (e, t) in exact {
            a.floor = min_opt(a.floor, e.floor);
            a.oldest = min_opt(a.oldest, e.oldest);
            truncated |= t;
        }
        let per_coarse = LOG_SLICE_US / FINE_SLICE_US;
        let coarse = cql::slice_of(h, LOG_SLICE_US);
        let fine_from = if truncated { fine } else { fine + 1 };
        let marks = self
            .b
            .read_marks(FINE, fine_from, (coarse + 1) * per_coarse)
            .await?
            .into_iter()
            .chain(self.b.read_marks(COARSE, coarse + 1, i64::MAX).await?);
        for m in marks {
            a.floor = min_opt(a.floor, m.floor);
            a.oldest = min_opt(a.oldest, m.oldest);
        }
        for o in others {
            // Once every head passed its lease ends, its claims' debts moved to whoever took them again.
            if o.until >= h {
                a.floor = min_opt(a.floor, o.floor);
                a.oldest = min_opt(a.oldest, o.oldest);
            }
        }
        Ok(a)
    }

    /// [`Self::compute_answer`], once for every caller that arrived before a computation started.
    async fn answer(&self) -> StoreResult<Answer> {
        let arrived = Instant::now();
        let mut slot = self.answer.lock().await;
        if let Some((started, a)) = *slot
            && started >= arrived
        {
            return Ok(a);
        }
        let started = Instant::now();
        let a = Box::pin(self.compute_answer()).await?;
        *slot = Some((started, a));
        Ok(a)
    }

    pub async fn pending_floor(&self) -> StoreResult<Option<Lsn>> {
        Ok(self.answer().await?.floor.map(cql::bigint_lsn))
    }

    /// The counters (with this process's deltas not written yet).
    async fn counts(&self) -> StoreResult<Counts> {
        let mut c = self.b.counts().await?;
        for d in &self.state().deltas {
            c.add(*d);
        }
        Ok(c)
    }

    pub async fn queue_depth(&self) -> StoreResult<u64> {
        let c = self.counts().await?;
        Ok(c.events.max(0) as u64 + c.open.max(0) as u64)
    }

    pub async fn queue_stats(&self) -> StoreResult<QueueStats> {
        let c = self.counts().await?;
        let a = self.answer().await?;
        if a.floor.is_none() && a.oldest.is_none() {
            // Provably empty: every pending task carries a debt that the answer counts. Counters a crash
            // left off are not reported.
            return Ok(QueueStats {
                estimated: true,
                ..QueueStats::default()
            });
        }
        Ok(QueueStats {
            depth: c.events.max(0) as u64 + c.open.max(0) as u64,
            claimed: c.claimed.max(0) as u64,
            oldest_enqueued_at_ms: a.oldest.map(|o| o.div_euclid(1000)),
            parked: 0,
            estimated: true,
        })
    }

    /// Delete what every head has passed (a minute behind): whole log partitions and summary ranges.
    async fn maybe_retire(&self) -> StoreResult<()> {
        {
            let mut st = self.state();
            if Instant::now() < st.retire_due || st.heads.is_none() {
                return Ok(());
            }
            st.retire_due = Instant::now() + RETIRE_EVERY;
        }
        let (heads, others) = self.heads_and_holders().await?;
        {
            // Catch up with heads other processes moved on (what they passed is resolved).
            let mut st = self.state();
            let State {
                heads: own,
                resolved,
                ..
            } = &mut *st;
            if let Some(own) = own {
                for (s, (mine, all)) in own.iter_mut().zip(&heads).enumerate() {
                    if *all > *mine {
                        *mine = *all;
                        resolved[s] = resolved[s].split_off(&(*all, String::new()));
                    }
                }
            }
        }
        drop(others);
        let h = heads.iter().copied().min().unwrap_or(0);
        let Some(retired) = self.state().retired else {
            return Ok(());
        };
        let from = cql::slice_of(retired, LOG_SLICE_US);
        let to = cql::slice_of(h - RETIRE_LAG_US, LOG_SLICE_US).min(from + RETIRE_SLICES);
        if to <= from {
            return Ok(());
        }
        let parts: Vec<_> = (from..to)
            .flat_map(|slice| (0..QUEUE_BUCKETS).map(move |s| (s, slice)))
            .map(|(s, slice)| self.b.retire_log(s, slice))
            .collect();
        all(parts).await?;
        let per_coarse = LOG_SLICE_US / FINE_SLICE_US;
        self.b
            .retire_marks(FINE, from * per_coarse, to * per_coarse)
            .await?;
        self.b.retire_marks(COARSE, from, to).await?;
        let start = to * LOG_SLICE_US;
        self.b.put_start(start).await?;
        self.state().retired = Some(start);
        Ok(())
    }
}

/// Run every future, some at once; the first error.
async fn all<F>(futures: Vec<F>) -> StoreResult<()>
where
    F: std::future::Future<Output = StoreResult<()>>,
{
    stream::iter(futures)
        .buffer_unordered(CONCURRENCY)
        .try_for_each(|()| async { Ok(()) })
        .await
}

/// How often [`CqlQueue::wait_for_tasks`] looks at the cluster for work other processes queued.
pub const POLL: Duration = Duration::from_millis(200);
