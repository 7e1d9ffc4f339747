//! The visibility clock: which committed changes a new snapshot is sure to see.
//!
//! Postgres can send a transaction's commit to the replication slot a moment before that transaction is
//! visible to new snapshots. A refresh triggered by a change must see that change, and every stored entry is
//! labelled with an LSN meaning "every published commit up to here is visible in the snapshot this was
//! computed from". This module keeps that label honest.
//!
//! The replication stream records each commit (`end_lsn`, `xid`) as it decodes it. Commits whose
//! visibility has not been proven wait in a bounded queue. Whenever anyone takes a snapshot
//! (`pg_current_snapshot()`), [`VisibilityClock::observe`] pops every commit at the front that the snapshot
//! sees and advances the **visible watermark**. Because a committed transaction, once visible, stays
//! visible to every later snapshot, every statement started after reading the watermark `V` sees every
//! commit up to `V`. So a refresh reads `V` first, runs its query (one statement, its own snapshot), and
//! stores the result labelled `V`; if `V` is below the LSN of the change that triggered it, it first proves
//! visibility with a snapshot of its own.
//!
//! **Architecture invariant:** the watermark only moves forward, and only past commits proven visible (or
//! positions the server reported while no transaction was open and every earlier commit was proven).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::lsn::Lsn;

/// A snapshot as `pg_current_snapshot()::text` prints it: `xmin:xmax:xip,xip,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(Snapshot { xmin, xmax, xip })
    }

    /// Whether the committed transaction with this 32-bit xid (as pgoutput gives it) is visible. The xid is
    /// widened to 64 bits with the epoch of `xmax`: a transaction kck just decoded is never 2^31
    /// transactions old.
    pub fn sees(&self, xid: u32) -> bool {
        let behind = (self.xmax as u32).wrapping_sub(xid) as i32;
        if behind <= 0 {
            return false; // xid >= xmax: started after the snapshot
        }
        let Some(xid64) = self.xmax.checked_sub(behind as u64) else {
            return false;
        };
        xid64 < self.xmin || !self.xip.contains(&xid64)
    }
}

#[derive(Debug)]
struct State {
    /// Commits not yet proven visible, in commit order: (end LSN, xid).
    unproven: VecDeque<(Lsn, u32)>,
    /// The newest position the stream vouched for: the last commit's end, or a keepalive position received
    /// between transactions.
    upper: Lsn,
}

/// See the module docs.
#[derive(Debug)]
pub struct VisibilityClock {
    state: Mutex<State>,
    visible: AtomicU64,
    /// Woken when the watermark moves.
    advanced: Notify,
    /// Woken when a commit is recorded (the prover waits on it).
    recorded: Notify,
    /// Woken when room frees up in `unproven`.
    room: Notify,
    capacity: usize,
}

impl VisibilityClock {
    /// Start at `start`: a position every commit before which is long visible (the slot's confirmed
    /// position when kck starts).
    pub fn new(start: Lsn, capacity: usize) -> VisibilityClock {
        VisibilityClock {
            state: Mutex::new(State {
                unproven: VecDeque::new(),
                upper: start,
            }),
            visible: AtomicU64::new(start.0),
            advanced: Notify::new(),
            recorded: Notify::new(),
            room: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// The visible watermark.
    pub fn visible(&self) -> Lsn {
        Lsn(self.visible.load(Ordering::Acquire))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (every update is one push,
        // pop or max), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest position the stream has decoded (a commit's end, or an idle keepalive position). A
    /// computation that must see everything decoded so far waits for [`VisibilityClock::visible`] to reach it.
    pub fn decoded(&self) -> Lsn {
        self.lock().upper
    }

    /// Number of commits waiting to be proven visible.
    pub fn unproven(&self) -> usize {
        self.lock().unproven.len()
    }

    /// Record a decoded commit. Waits while too many commits are unproven (backpressure on the stream).
    pub async fn record_commit(&self, end_lsn: Lsn, xid: u32) {
        loop {
            let room = self.room.notified();
            {
                let mut state = self.lock();
                if state.unproven.len() < self.capacity {
                    state.unproven.push_back((end_lsn, xid));
                    state.upper = state.upper.max(end_lsn);
                    break;
                }
            }
            self.recorded.notify_one();
            let _ = tokio::time::timeout(Duration::from_millis(50), room).await;
        }
        self.recorded.notify_one();
    }

    /// The server reported `position` while no transaction was open: every commit before it was decoded.
    pub fn record_idle(&self, position: Lsn) {
        let mut state = self.lock();
        state.upper = state.upper.max(position);
        if state.unproven.is_empty() {
            self.advance(state.upper);
        }
    }

    /// Another kck process proved every commit up to `lsn` visible (it published its watermark through the
    /// shared store): visibility is a property of the database, so it holds here too.
    pub fn learn(&self, lsn: Lsn) {
        let mut state = self.lock();
        let mut popped = false;
        while state.unproven.front().is_some_and(|&(l, _)| l <= lsn) {
            state.unproven.pop_front();
            popped = true;
        }
        drop(state);
        self.advance(lsn);
        if popped {
            self.room.notify_waiters();
        }
    }

    /// Learn from a snapshot taken now; returns the watermark after it.
    pub fn observe(&self, snapshot: &Snapshot) -> Lsn {
        let mut state = self.lock();
        let mut moved = None;
        while let Some(&(lsn, xid)) = state.unproven.front() {
            if !snapshot.sees(xid) {
                break;
            }
            state.unproven.pop_front();
            moved = Some(lsn);
        }
        if state.unproven.is_empty() {
            moved = Some(state.upper);
        }
        drop(state);
        if let Some(lsn) = moved {
            self.advance(lsn);
            self.room.notify_waiters();
        }
        self.visible()
    }

    fn advance(&self, lsn: Lsn) {
        if self.visible.fetch_max(lsn.0, Ordering::AcqRel) < lsn.0 {
            self.advanced.notify_waiters();
        }
    }

    /// Wait until some commit is waiting to be proven (for the prover task).
    pub async fn wait_recorded(&self) {
        loop {
            let recorded = self.recorded.notified();
            if !self.lock().unproven.is_empty() {
                return;
            }
            recorded.await;
        }
    }

    /// Wait until the watermark reaches `lsn`, at most `timeout`. Returns the watermark.
    pub async fn wait_visible(&self, lsn: Lsn, timeout: Duration) -> Lsn {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let advanced = self.advanced.notified();
            let now = self.visible();
            if now >= lsn {
                return now;
            }
            if tokio::time::timeout_at(deadline, advanced).await.is_err() {
                return self.visible();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snapshots() {
        assert_eq!(
            Snapshot::parse("10:20:12,15"),
            Some(Snapshot {
                xmin: 10,
                xmax: 20,
                xip: vec![12, 15]
            })
        );
        assert_eq!(Snapshot::parse("10:10:").map(|s| s.xip.len()), Some(0));
        assert_eq!(Snapshot::parse("x:1:"), None);
    }

    #[test]
    fn visibility_of_32_bit_xids() {
        let s = Snapshot::parse("100:110:103,107").unwrap();
        assert!(s.sees(99));
        assert!(s.sees(104));
        assert!(!s.sees(103));
        assert!(!s.sees(110));
        assert!(!s.sees(200));
        // Across an epoch boundary: xmax = 2^32 + 5, xid 2^32 - 3 (epoch 0) is behind it.
        let e = 1u64 << 32;
        let s = Snapshot {
            xmin: e + 1,
            xmax: e + 5,
            xip: vec![],
        };
        assert!(s.sees(u32::MAX - 2));
        assert!(s.sees(3));
        assert!(!s.sees(5));
    }

    #[tokio::test]
    async fn watermark_moves_only_past_proven_commits() {
        let clock = VisibilityClock::new(Lsn(10), 8);
        clock.record_commit(Lsn(20), 100).await;
        clock.record_commit(Lsn(30), 101).await;
        assert_eq!(clock.visible(), Lsn(10));
        // 100 still running in this snapshot: nothing moves, even though 101 is visible.
        let s = Snapshot::parse("100:102:100").unwrap();
        assert_eq!(clock.observe(&s), Lsn(10));
        let s = Snapshot::parse("101:102:").unwrap();
        assert_eq!(clock.observe(&s), Lsn(30));
        clock.record_idle(Lsn(40));
        assert_eq!(clock.visible(), Lsn(40));
        // An idle position while a commit is unproven waits for the proof.
        clock.record_commit(Lsn(50), 102).await;
        clock.record_idle(Lsn(60));
        assert_eq!(clock.visible(), Lsn(40));
        assert_eq!(
            clock.observe(&Snapshot::parse("103:103:").unwrap()),
            Lsn(60)
        );
        assert_eq!(clock.wait_visible(Lsn(60), Duration::ZERO).await, Lsn(60));
    }

    #[tokio::test]
    async fn a_watermark_learned_from_another_process_moves_this_one() {
        let clock = VisibilityClock::new(Lsn::ZERO, 8);
        clock.learn(Lsn(50));
        assert_eq!(clock.visible(), Lsn(50));
        clock.learn(Lsn(40));
        assert_eq!(clock.visible(), Lsn(50), "never backwards");
        // Commits this process decoded up to the learned position are proven by it.
        clock.record_commit(Lsn(60), 1).await;
        clock.record_commit(Lsn(70), 2).await;
        clock.learn(Lsn(65));
        assert_eq!((clock.visible(), clock.unproven()), (Lsn(65), 1));
        assert_eq!(clock.observe(&Snapshot::parse("3:3:").unwrap()), Lsn(70));
    }
}
