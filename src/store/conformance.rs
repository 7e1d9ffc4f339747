//! The conformance suite every [`super::Store`] backend must pass.
//!
//! The [`Store`] contract (see [`super`]) is what the replication reader, the refresh workers and
//! `/fetch` rely on, whatever backend holds the data. This suite checks it from the outside, through
//! the trait alone, so that one suite serves every backend: a backend's tests call [`run_all`] with a
//! function that makes a fresh, empty store. Each property runs on its own store, and a failure panics
//! with the property's name and what was expected.
//!
//! The suite makes no claim about speed and uses the clock only with wide margins: short leases and
//! delays (1 ms) are waited out generously, long ones (60 s) are never reached, and waits are only
//! bounded from above.
//!
//! Compiled for tests and under the `test-utils` feature (for integration tests and other crates).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;

use super::{Claim, Entry, QueueStats, Store, Stored, Task};
use crate::lsn::Lsn;

/// A lease no property outlives.
const LONG: Duration = Duration::from_secs(60);
/// How long a property waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(10);

/// Runs every property, each on a fresh store from `make`. Panics at the first failure, naming it.
pub async fn run_all<S, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    macro_rules! properties {
        ($($name:ident),* $(,)?) => {
            $( run_one(stringify!($name), async { $name(make().await).await }).await; )*
        };
    }
    properties!(
        get_missing_is_none,
        get_round_trips_what_was_stored,
        entries_never_go_backwards,
        store_result_indexes_the_key,
        register_key_and_keys_paging,
        key_count_counts_the_primers_keys,
        remove_key_removes_entry_and_index,
        enqueue_coalesces_by_id,
        claim_is_oldest_first_and_skips_claimed,
        claim_reports_task_fields,
        expired_lease_makes_a_task_claimable_again,
        finish_removes_the_task,
        finish_keeps_a_task_raised_after_its_claim,
        finish_stores_result_and_follow_ups,
        finish_result_never_goes_backwards,
        retry_delays_the_task,
        queue_stats_track_depth_claims_and_age,
        meta_round_trips,
        pending_floor_bound,
        pending_floor_bound_after_a_raised_finish,
        pending_floor_bound_with_follow_ups,
        wait_for_tasks_wakes_and_times_out,
        concurrent_enqueue_and_finish_lose_nothing,
        concurrent_writes_to_one_key_keep_the_newest,
        leases_are_exclusive_renewable_and_expire,
        concurrent_lease_attempts_have_one_winner,
    );
}

async fn run_one(name: &str, property: impl Future<Output = ()>) {
    if let Err(panic) = AssertUnwindSafe(property).catch_unwind().await {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        panic!("store conformance: property `{name}` failed: {msg}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Helpers

fn entry(lsn: u64, value: &str) -> Entry {
    Entry {
        value: Bytes::from(value.to_owned()),
        lsn: Lsn(lsn),
        computed_at_ms: 1_700_000_000_000 + lsn as i64,
        expires_at_ms: None,
    }
}

fn task(id: &str, lsn: u64) -> Task {
    Task::new(id, Lsn(lsn))
}

/// A task standing for changes from `floor` to `lsn`.
fn task_from(id: &str, floor: u64, lsn: u64) -> Task {
    Task {
        id: id.to_owned(),
        lsn: Lsn(lsn),
        floor: Lsn(floor),
    }
}

use crate::clock::now_ms;

fn ids(claims: &[Claim]) -> Vec<&str> {
    claims.iter().map(|c| c.id.as_str()).collect()
}

async fn claim<S: Store>(s: &S, max: usize, lease: Duration) -> Vec<Claim> {
    s.claim(max, lease).await.expect("claim failed")
}

async fn floor<S: Store>(s: &S) -> Option<Lsn> {
    s.pending_floor().await.expect("pending_floor failed")
}

async fn stats<S: Store>(s: &S) -> QueueStats {
    s.queue_stats().await.expect("queue_stats failed")
}

/// The queue holds `expected` tasks: exactly, or for a backend whose stats are estimates
/// ([`QueueStats::estimated`]), at least that many (an estimate also counts enqueues no claim has looked
/// at yet). Zero is checked exactly for every backend, after a claim has looked at everything queued
/// (and found nothing to claim).
async fn depth_is<S: Store>(s: &S, expected: u64, what: &str) {
    let st = stats(s).await;
    if !st.estimated {
        assert_eq!(st.depth, expected, "{what}: queue depth");
        return;
    }
    assert!(
        st.depth >= expected,
        "{what}: estimated queue depth {} is below {expected}",
        st.depth
    );
    if expected == 0 {
        assert!(
            claim(s, 100, LONG).await.is_empty(),
            "{what}: a task was claimable"
        );
        assert_eq!(
            stats(s).await.depth,
            0,
            "{what}: queue depth once looked at"
        );
    }
}

/// Nothing is queued, claimed, or waiting (see [`depth_is`]).
async fn is_empty<S: Store>(s: &S, what: &str) {
    depth_is(s, 0, what).await;
    let st = stats(s).await;
    assert_eq!(
        (st.depth, st.claimed, st.oldest_enqueued_at_ms),
        (0, 0, None),
        "{what}: queue stats"
    );
}

async fn keys<S: Store>(s: &S, primer: &str, after: Option<&str>, limit: usize) -> Vec<String> {
    s.keys(primer, after, limit).await.expect("keys failed")
}

/// Claims until `id` comes back or `PATIENCE` runs out.
async fn claim_eventually<S: Store>(s: &S, id: &str) -> Claim {
    let start = Instant::now();
    loop {
        let claims = claim(s, 100, LONG).await;
        if let Some(c) = claims.iter().find(|c| c.id == id) {
            return c.clone();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "task {id} did not become claimable within {PATIENCE:?} (claimed instead: {:?})",
            ids(&claims)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Entries

async fn get_missing_is_none<S: Store>(s: S) {
    assert_eq!(s.get("nothing/here").await.unwrap(), None);
    assert!(!s.is_registered("nothing/here").await.unwrap());
}

async fn get_round_trips_what_was_stored<S: Store>(s: S) {
    let in_an_hour = now_ms() + 3_600_000;
    let cases = [
        Entry {
            value: Bytes::from_static(br#"{"id":42,"items":[1,2,3]}"#),
            lsn: Lsn(0x16_B374_D848),
            computed_at_ms: 1_700_000_000_123,
            expires_at_ms: Some(in_an_hour),
        },
        Entry {
            value: Bytes::new(),
            lsn: Lsn(1),
            computed_at_ms: 0,
            expires_at_ms: None,
        },
        Entry {
            value: Bytes::from(vec![b'x'; 300_000]),
            // The largest LSN every backend must take (see the contract).
            lsn: Lsn(i64::MAX as u64),
            computed_at_ms: -5,
            expires_at_ms: Some(i64::MAX),
        },
    ];
    for (i, e) in cases.iter().enumerate() {
        let key = format!("p/ключ-{i}");
        assert_eq!(
            s.store_result("p", &key, e.clone()).await.unwrap(),
            Stored::Written,
            "storing entry {i} into an empty key"
        );
        let got = s.get(&key).await.unwrap();
        assert_eq!(got.as_ref(), Some(e), "entry {i} read back differs");
    }
    assert_eq!(s.get("p/other").await.unwrap(), None);

    // An entry whose expiry has passed is either kept as it was or dropped (the contract allows both),
    // never changed.
    for (i, expires) in [1_700_000_060_123, i64::MIN].into_iter().enumerate() {
        let key = format!("p/expired-{i}");
        let e = Entry {
            expires_at_ms: Some(expires),
            ..entry(3, "old")
        };
        s.store_result("p", &key, e.clone()).await.unwrap();
        let got = s.get(&key).await.unwrap();
        assert!(
            got.is_none() || got.as_ref() == Some(&e),
            "expired entry {i} read back as {got:?}"
        );
    }
}

async fn entries_never_go_backwards<S: Store>(s: S) {
    let k = "orders_by_user/42";
    assert_eq!(
        s.store_result("o", k, entry(10, "ten")).await.unwrap(),
        Stored::Written
    );
    assert_eq!(
        s.store_result("o", k, entry(5, "five")).await.unwrap(),
        Stored::KeptNewer(Lsn(10)),
        "an older LSN must be refused"
    );
    assert_eq!(
        s.get(k).await.unwrap(),
        Some(entry(10, "ten")),
        "older write changed the entry"
    );

    let mut same = entry(10, "ten again");
    same.computed_at_ms += 1;
    assert_eq!(
        s.store_result("o", k, same.clone()).await.unwrap(),
        Stored::Written,
        "an equal LSN must replace"
    );
    assert_eq!(
        s.get(k).await.unwrap(),
        Some(same),
        "equal LSN did not replace"
    );

    assert_eq!(
        s.store_result("o", k, entry(11, "eleven")).await.unwrap(),
        Stored::Written
    );
    assert_eq!(
        s.get(k).await.unwrap(),
        Some(entry(11, "eleven")),
        "newer LSN did not replace"
    );
    assert_eq!(
        s.store_result("o", k, entry(0, "zero")).await.unwrap(),
        Stored::KeptNewer(Lsn(11))
    );
}

async fn store_result_indexes_the_key<S: Store>(s: S) {
    s.store_result("users", "users/1", entry(1, "{}"))
        .await
        .unwrap();
    assert!(
        s.is_registered("users/1").await.unwrap(),
        "a stored key must be registered"
    );
    assert_eq!(keys(&s, "users", None, 10).await, vec!["users/1"]);
    // Refused writes leave the index as it was.
    s.store_result("users", "users/1", entry(0, "{}"))
        .await
        .unwrap();
    assert_eq!(keys(&s, "users", None, 10).await, vec!["users/1"]);
}

async fn register_key_and_keys_paging<S: Store>(s: S) {
    // Registered out of order, under two primers whose names share a prefix.
    for k in ["p/c", "p/a", "p/e", "p/b", "p/d"] {
        s.register_key("p", k).await.unwrap();
    }
    for k in ["p2/z", "p2/a"] {
        s.register_key("p2", k).await.unwrap();
    }
    s.register_key("p", "p/a").await.unwrap(); // again: no duplicate
    assert!(s.is_registered("p/c").await.unwrap());
    assert!(s.is_registered("p2/z").await.unwrap());
    assert!(!s.is_registered("p/f").await.unwrap());
    assert!(!s.is_registered("p/").await.unwrap());
    assert!(!s.is_registered("p").await.unwrap());
    assert_eq!(
        s.get("p/c").await.unwrap(),
        None,
        "registering stores no value"
    );

    assert_eq!(
        keys(&s, "p", None, 100).await,
        vec!["p/a", "p/b", "p/c", "p/d", "p/e"]
    );
    assert_eq!(keys(&s, "p2", None, 100).await, vec!["p2/a", "p2/z"]);
    assert!(keys(&s, "p3", None, 100).await.is_empty());
    assert!(keys(&s, "", None, 100).await.is_empty());

    // Paging: `after` is exclusive, `limit` caps.
    assert_eq!(keys(&s, "p", None, 2).await, vec!["p/a", "p/b"]);
    assert_eq!(keys(&s, "p", Some("p/b"), 2).await, vec!["p/c", "p/d"]);
    assert_eq!(keys(&s, "p", Some("p/d"), 2).await, vec!["p/e"]);
    assert!(keys(&s, "p", Some("p/e"), 2).await.is_empty());
    assert!(keys(&s, "p", None, 0).await.is_empty());
    // `after` need not be a registered key.
    assert_eq!(
        keys(&s, "p", Some("p/bb"), 10).await,
        vec!["p/c", "p/d", "p/e"]
    );
    assert_eq!(keys(&s, "p", Some(""), 1).await, vec!["p/a"]);
    assert_eq!(
        keys(&s, "p2", Some("p/zzz"), 10).await,
        vec!["p2/a", "p2/z"]
    );

    // Walking all pages gives every key once.
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = keys(&s, "p", after.as_deref(), 2).await;
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        all.extend(page);
    }
    assert_eq!(all, vec!["p/a", "p/b", "p/c", "p/d", "p/e"]);
}

async fn key_count_counts_the_primers_keys<S: Store>(s: S) {
    assert_eq!(s.key_count("p").await.unwrap(), 0);
    for k in ["p/c", "p/a", "p/b"] {
        s.register_key("p", k).await.unwrap();
    }
    s.register_key("p", "p/a").await.unwrap();
    s.register_key("p2", "p2/a").await.unwrap();
    s.store_result("p", "p/d", entry(5, "{}")).await.unwrap();
    assert_eq!(s.key_count("p").await.unwrap(), 4);
    assert_eq!(s.key_count("p2").await.unwrap(), 1);
    assert_eq!(s.key_count("").await.unwrap(), 0);
    s.remove_key("p", "p/a").await.unwrap();
    assert_eq!(s.key_count("p").await.unwrap(), 3);
}

async fn remove_key_removes_entry_and_index<S: Store>(s: S) {
    s.store_result("p", "p/1", entry(3, "one")).await.unwrap();
    s.register_key("p", "p/2").await.unwrap();
    s.remove_key("p", "p/1").await.unwrap();
    assert_eq!(
        s.get("p/1").await.unwrap(),
        None,
        "entry still there after remove_key"
    );
    assert!(
        !s.is_registered("p/1").await.unwrap(),
        "key still registered after remove_key"
    );
    assert_eq!(keys(&s, "p", None, 10).await, vec!["p/2"]);
    s.remove_key("p", "p/2").await.unwrap();
    assert!(!s.is_registered("p/2").await.unwrap());
    assert!(keys(&s, "p", None, 10).await.is_empty());
    // Removing what is not there is not an error.
    s.remove_key("p", "p/404").await.unwrap();
}

// ---------------------------------------------------------------------------------------------------
// Queue

async fn enqueue_coalesces_by_id<S: Store>(s: S) {
    s.enqueue(vec![task("a", 5)]).await.unwrap();
    s.enqueue(vec![task("b", 1)]).await.unwrap();
    s.enqueue(vec![task("a", 9), task("c", 2), task("a", 3)])
        .await
        .unwrap();
    s.enqueue(vec![task("a", 7)]).await.unwrap();
    s.enqueue(Vec::new()).await.unwrap();
    depth_is(&s, 3, "one task per id").await;
    let claims = claim(&s, 10, LONG).await;
    assert_eq!(
        ids(&claims),
        vec!["a", "b", "c"],
        "coalescing must keep a's place in line"
    );
    assert_eq!(claims[0].lsn, Lsn(9), "coalesced LSN must be the largest");
    assert_eq!(claims[1].lsn, Lsn(1));
    assert_eq!(claims[2].lsn, Lsn(2));
}

async fn claim_is_oldest_first_and_skips_claimed<S: Store>(s: S) {
    for i in 0..4 {
        s.enqueue(vec![task(&format!("t{i}"), i + 1)])
            .await
            .unwrap();
    }
    s.enqueue((4..10).map(|i| task(&format!("t{i}"), i + 1)).collect())
        .await
        .unwrap();
    assert!(
        claim(&s, 0, LONG).await.is_empty(),
        "claim(0) must claim nothing"
    );
    assert_eq!(ids(&claim(&s, 3, LONG).await), vec!["t0", "t1", "t2"]);
    assert_eq!(
        ids(&claim(&s, 3, LONG).await),
        vec!["t3", "t4", "t5"],
        "claimed tasks must be skipped"
    );
    assert_eq!(
        ids(&claim(&s, 100, LONG).await),
        vec!["t6", "t7", "t8", "t9"]
    );
    assert!(
        claim(&s, 100, LONG).await.is_empty(),
        "every task is claimed"
    );
    // A task enqueued now is claimable while the others stay claimed.
    s.enqueue(vec![task("late", 1)]).await.unwrap();
    assert_eq!(ids(&claim(&s, 100, LONG).await), vec!["late"]);
    depth_is(&s, 11, "after claiming all").await;
}

async fn claim_reports_task_fields<S: Store>(s: S) {
    let before = now_ms();
    s.enqueue(vec![task("x", 77)]).await.unwrap();
    let after = now_ms();
    let claims = claim(&s, 1, LONG).await;
    assert_eq!(claims.len(), 1);
    let c = &claims[0];
    assert_eq!((c.id.as_str(), c.lsn, c.attempts), ("x", Lsn(77), 0));
    assert!(
        (before..=after).contains(&c.enqueued_at_ms),
        "enqueued_at_ms {} is not within [{before}, {after}]",
        c.enqueued_at_ms
    );
    // Raising the LSN keeps the enqueue time.
    s.enqueue(vec![task("x", 80)]).await.unwrap();
    let c2 = finish_and_reclaim(&s, c).await;
    assert_eq!(c2.lsn, Lsn(80));
    assert_eq!(
        c2.enqueued_at_ms, c.enqueued_at_ms,
        "coalescing must keep the enqueue time"
    );
}

/// Finishes `c` (whose LSN was raised), so the task stays, and claims it again.
async fn finish_and_reclaim<S: Store>(s: &S, c: &Claim) -> Claim {
    s.finish(c, None, Vec::new()).await.unwrap();
    claim_eventually(s, &c.id).await
}

async fn expired_lease_makes_a_task_claimable_again<S: Store>(s: S) {
    s.enqueue(vec![task("long", 1), task("short", 1)])
        .await
        .unwrap();
    let long = claim(&s, 1, LONG).await;
    assert_eq!(ids(&long), vec!["long"]);
    let first = claim(&s, 1, Duration::from_millis(1)).await;
    assert_eq!(ids(&first), vec!["short"]);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let again = claim_eventually(&s, "short").await;
    assert!(again.attempts >= first[0].attempts);
    assert_eq!(again.lsn, Lsn(1));
    // The long lease has not run out, and the re-claim took a fresh (long) lease.
    assert!(
        claim(&s, 10, LONG).await.is_empty(),
        "a live claim was handed out twice"
    );
    depth_is(&s, 2, "after the lease ran out").await;
}

async fn finish_removes_the_task<S: Store>(s: S) {
    s.enqueue(vec![task("a", 1), task("b", 1)]).await.unwrap();
    let claims = claim(&s, 10, LONG).await;
    assert_eq!(ids(&claims), vec!["a", "b"]);
    assert_eq!(s.finish(&claims[0], None, Vec::new()).await.unwrap(), None);
    let st = stats(&s).await;
    assert_eq!((st.depth, st.claimed), (1, 1), "after finishing a");
    // Finishing again (a duplicate delivery) is harmless.
    assert_eq!(s.finish(&claims[0], None, Vec::new()).await.unwrap(), None);
    s.finish(&claims[1], None, Vec::new()).await.unwrap();
    is_empty(&s, "queue must be empty").await;
    assert!(claim(&s, 10, LONG).await.is_empty());
}

async fn finish_keeps_a_task_raised_after_its_claim<S: Store>(s: S) {
    s.enqueue(vec![task("a", 5)]).await.unwrap();
    let c = claim(&s, 1, LONG).await.remove(0);
    s.enqueue(vec![task("a", 8)]).await.unwrap();
    depth_is(&s, 1, "coalesced into the claimed task").await;
    s.register_key("p", "p/a").await.unwrap();
    s.finish(&c, Some(("p", "p/a", entry(5, "five"))), Vec::new())
        .await
        .unwrap();
    depth_is(&s, 1, "the raised task must stay queued").await;
    // It is released, not left claimed until its lease runs out.
    let again = claim(&s, 10, LONG).await;
    assert_eq!(
        ids(&again),
        vec!["a"],
        "the raised task must be claimable again at once"
    );
    assert_eq!(again[0].lsn, Lsn(8));
    s.finish(&again[0], None, Vec::new()).await.unwrap();
    depth_is(&s, 0, "after finishing the raised task").await;
    // A raise to an LSN not above the claim's does not keep it.
    s.enqueue(vec![task("b", 5)]).await.unwrap();
    let c = claim(&s, 1, LONG).await.remove(0);
    s.enqueue(vec![task("b", 5), task("b", 4)]).await.unwrap();
    s.finish(&c, None, Vec::new()).await.unwrap();
    depth_is(&s, 0, "task with an unchanged LSN must be removed").await;
}

async fn finish_stores_result_and_follow_ups<S: Store>(s: S) {
    s.register_key("p", "p/1").await.unwrap();
    s.enqueue(vec![task("refresh:p/1", 10)]).await.unwrap();
    let c = claim(&s, 1, LONG).await.remove(0);
    let stored = s
        .finish(
            &c,
            Some(("p", "p/1", entry(10, "v10"))),
            vec![task("f1", 10), task("f2", 10), task("f1", 11)],
        )
        .await
        .unwrap();
    assert_eq!(stored, Some(Stored::Written));
    assert_eq!(s.get("p/1").await.unwrap(), Some(entry(10, "v10")));
    assert!(s.is_registered("p/1").await.unwrap());
    assert_eq!(keys(&s, "p", None, 10).await, vec!["p/1"]);
    depth_is(&s, 2, "finished task gone, follow-ups queued").await;
    assert_eq!(stats(&s).await.claimed, 0, "finished task released");
    let next = claim(&s, 10, LONG).await;
    assert_eq!(
        ids(&next),
        vec!["f1", "f2"],
        "follow-ups in order, coalesced"
    );
    assert_eq!(next[0].lsn, Lsn(11));

    // A follow-up with the finished task's own id is a new task.
    let stored = s
        .finish(&next[0], None, vec![task("f1", 11)])
        .await
        .unwrap();
    assert_eq!(stored, None);
    assert_eq!(ids(&claim(&s, 10, LONG).await), vec!["f1"]);
}

async fn finish_result_never_goes_backwards<S: Store>(s: S) {
    s.store_result("p", "p/1", entry(20, "v20")).await.unwrap();
    s.enqueue(vec![task("t", 15)]).await.unwrap();
    let c = claim(&s, 1, LONG).await.remove(0);
    let stored = s
        .finish(
            &c,
            Some(("p", "p/1", entry(15, "v15"))),
            vec![task("g", 15)],
        )
        .await
        .unwrap();
    assert_eq!(stored, Some(Stored::KeptNewer(Lsn(20))));
    assert_eq!(s.get("p/1").await.unwrap(), Some(entry(20, "v20")));
    // The task is still finished and the follow-ups still queued.
    assert_eq!(ids(&claim(&s, 10, LONG).await), vec!["g"]);
    assert_eq!(stats(&s).await.depth, 1);
    // Equal LSN replaces through finish too.
    s.enqueue(vec![task("t2", 20)]).await.unwrap();
    let c = claim_eventually(&s, "t2").await;
    let stored = s
        .finish(&c, Some(("p", "p/1", entry(20, "v20b"))), Vec::new())
        .await
        .unwrap();
    assert_eq!(stored, Some(Stored::Written));
    assert_eq!(s.get("p/1").await.unwrap(), Some(entry(20, "v20b")));
}

async fn retry_delays_the_task<S: Store>(s: S) {
    s.enqueue(vec![task("slow", 1), task("quick", 2)])
        .await
        .unwrap();
    let claims = claim(&s, 10, LONG).await;
    assert_eq!(ids(&claims), vec!["slow", "quick"]);
    s.retry(&claims[0], LONG).await.unwrap();
    s.retry(&claims[1], Duration::from_millis(1)).await.unwrap();
    let st = stats(&s).await;
    assert_eq!(
        (st.depth, st.claimed),
        (2, 0),
        "retried tasks stay queued, released"
    );
    tokio::time::sleep(Duration::from_millis(30)).await;
    let quick = claim_eventually(&s, "quick").await;
    assert!(
        quick.attempts >= 1,
        "retry must count an attempt (got {})",
        quick.attempts
    );
    assert_eq!(quick.lsn, Lsn(2));
    assert_eq!(quick.enqueued_at_ms, claims[1].enqueued_at_ms);
    assert!(
        claim(&s, 10, LONG).await.is_empty(),
        "a task retried with a 60 s delay must not be claimable"
    );
    // Retried again and again, the count grows.
    s.retry(&quick, Duration::ZERO).await.unwrap();
    let quick2 = claim_eventually(&s, "quick").await;
    assert!(quick2.attempts > quick.attempts);
    s.finish(&quick2, None, Vec::new()).await.unwrap();
    assert_eq!(stats(&s).await.depth, 1);
}

async fn queue_stats_track_depth_claims_and_age<S: Store>(s: S) {
    is_empty(&s, "a new store").await;
    let before = now_ms();
    s.enqueue(vec![task("a", 1), task("b", 1)]).await.unwrap();
    let after = now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.enqueue(vec![task("c", 1)]).await.unwrap();
    let st = stats(&s).await;
    assert_eq!((st.depth, st.claimed), (3, 0));
    let oldest = st
        .oldest_enqueued_at_ms
        .expect("oldest_enqueued_at_ms of a non-empty queue");
    assert!(
        (before..=after).contains(&oldest),
        "oldest_enqueued_at_ms {oldest} is not within [{before}, {after}]"
    );
    let claims = claim(&s, 2, LONG).await;
    let st = stats(&s).await;
    assert_eq!((st.depth, st.claimed), (3, 2));
    assert_eq!(
        st.oldest_enqueued_at_ms,
        Some(oldest),
        "claimed tasks are still pending"
    );
    // Retried (delayed) tasks count too.
    s.retry(&claims[0], LONG).await.unwrap();
    let st = stats(&s).await;
    assert_eq!(
        (st.depth, st.claimed, st.oldest_enqueued_at_ms),
        (3, 1, Some(oldest))
    );
    s.finish(&claims[1], None, Vec::new()).await.unwrap();
    let st = stats(&s).await;
    assert_eq!(
        (st.depth, st.claimed, st.oldest_enqueued_at_ms),
        (2, 0, Some(oldest))
    );
}

async fn meta_round_trips<S: Store>(s: S) {
    assert_eq!(s.get_meta("fingerprint").await.unwrap(), None);
    s.put_meta("fingerprint", Bytes::from_static(b"abc"))
        .await
        .unwrap();
    s.put_meta("binary", Bytes::from_static(&[0, 255, 0, 1]))
        .await
        .unwrap();
    assert_eq!(
        s.get_meta("fingerprint").await.unwrap(),
        Some(Bytes::from_static(b"abc"))
    );
    s.put_meta("fingerprint", Bytes::from_static(b"xyz"))
        .await
        .unwrap();
    assert_eq!(
        s.get_meta("fingerprint").await.unwrap(),
        Some(Bytes::from_static(b"xyz"))
    );
    assert_eq!(
        s.get_meta("binary").await.unwrap(),
        Some(Bytes::from_static(&[0, 255, 0, 1]))
    );
    s.put_meta("empty", Bytes::new()).await.unwrap();
    assert_eq!(s.get_meta("empty").await.unwrap(), Some(Bytes::new()));
    // Meta is not an entry.
    assert_eq!(s.get("fingerprint").await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------------
// The pending floor
//
// The contract asks for a lower bound (`None` only when nothing is queued); `exact` also checks that the
// bound is the floor itself, as the embedded store keeps it (see `exact_pending_floor`).

/// `pending_floor` is at most `expected` (exactly it when `exact`), and `None` exactly when `expected` is.
async fn check_floor<S: Store>(s: &S, exact: bool, expected: Option<Lsn>, what: &str) {
    let got = floor(s).await;
    match (got, expected) {
        (None, None) => {}
        (Some(g), Some(e)) if g == e || (!exact && g < e) => {}
        _ => panic!(
            "{what}: pending_floor is {got:?}, expected {}{expected:?}",
            if exact { "" } else { "at most " }
        ),
    }
}

async fn pending_floor_bound<S: Store>(s: S) {
    pending_floor_is_the_oldest_change_still_owed(s, false).await
}

async fn pending_floor_bound_after_a_raised_finish<S: Store>(s: S) {
    finishing_a_raised_task_moves_its_floor_past_the_claim(s, false).await
}

async fn pending_floor_bound_with_follow_ups<S: Store>(s: S) {
    follow_ups_inherit_the_finished_tasks_floor(s, false).await
}

/// The floor properties, checking that `pending_floor` is exact (not only a lower bound), for backends
/// that track floors (the embedded store). Panics at the first failure, naming it.
pub async fn exact_pending_floor<S, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    run_one(
        "pending_floor_is_the_oldest_change_still_owed (exact)",
        async { pending_floor_is_the_oldest_change_still_owed(make().await, true).await },
    )
    .await;
    run_one(
        "finishing_a_raised_task_moves_its_floor_past_the_claim (exact)",
        async { finishing_a_raised_task_moves_its_floor_past_the_claim(make().await, true).await },
    )
    .await;
    run_one(
        "follow_ups_inherit_the_finished_tasks_floor (exact)",
        async { follow_ups_inherit_the_finished_tasks_floor(make().await, true).await },
    )
    .await;
}

/// The properties of a store with a capacity ([`Store::capacity`]), on stores from `make` that hold at
/// most 3 keys (and many bytes). Panics at the first failure, naming it.
pub async fn bounded<S, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    run_one("evicts_the_least_recently_used_keys", async {
        evicts_the_least_recently_used_keys(make().await).await
    })
    .await;
    run_one(
        "a_refresh_in_flight_does_not_bring_an_evicted_key_back",
        async { a_refresh_in_flight_does_not_bring_an_evicted_key_back(make().await).await },
    )
    .await;
    run_one("registrations_alone_stay_within_the_bound", async {
        registrations_alone_stay_within_the_bound(make().await).await
    })
    .await;
}

async fn held<S: Store>(s: &S, key: &str) -> bool {
    s.is_registered(key).await.unwrap() || s.get(key).await.unwrap().is_some()
}

async fn evicts_the_least_recently_used_keys<S: Store>(s: S) {
    let cap = s.capacity().expect("a bounded store reports its capacity");
    assert_eq!(cap.max_keys, 3);
    for k in ["p/1", "p/2", "p/3"] {
        s.store_result("p", k, entry(1, k)).await.unwrap();
    }
    // Read p/1: p/2 is now the least recently used.
    assert!(s.get("p/1").await.unwrap().is_some());
    s.store_result("p", "p/4", entry(1, "p/4")).await.unwrap();
    assert!(!held(&s, "p/2").await, "the coldest key is evicted whole");
    assert_eq!(keys(&s, "p", None, 10).await, vec!["p/1", "p/3", "p/4"]);
    let cap = s.capacity().unwrap();
    assert_eq!(cap.keys, 3, "{cap:?}");
    assert!(cap.evictions >= 1, "{cap:?}");
    // An evicted key is a miss and can come back from a new computation.
    s.store_result("p", "p/2", entry(2, "again")).await.unwrap();
    assert_eq!(s.get("p/2").await.unwrap(), Some(entry(2, "again")));
    assert!(!held(&s, "p/3").await, "p/3 was the coldest then");
    // Removing frees its place.
    s.remove_key("p", "p/1").await.unwrap();
    let cap = s.capacity().unwrap();
    assert_eq!(cap.keys, 2, "{cap:?}");
}

async fn a_refresh_in_flight_does_not_bring_an_evicted_key_back<S: Store>(s: S) {
    s.register_key("p", "p/a").await.unwrap();
    s.enqueue(vec![task("k:p/a", 5)]).await.unwrap();
    let c = claim(&s, 1, LONG).await.remove(0);
    // While it computes, three other keys push p/a out.
    for k in ["p/1", "p/2", "p/3"] {
        s.register_key("p", k).await.unwrap();
    }
    assert!(!s.is_registered("p/a").await.unwrap(), "p/a was evicted");
    let stored = s
        .finish(&c, Some(("p", "p/a", entry(5, "late"))), Vec::new())
        .await
        .unwrap();
    assert_eq!(stored, None, "nothing stored for an evicted key");
    assert!(
        !held(&s, "p/a").await,
        "the refresh did not register it again"
    );
    depth_is(&s, 0, "the task is finished all the same").await;
    assert_eq!(floor(&s).await, None);
    // A fetch's result for a key evicted while it computed: answered, not kept.
    s.register_key("p", "p/b").await.unwrap();
    for k in ["p/4", "p/5", "p/6"] {
        s.register_key("p", k).await.unwrap();
    }
    assert_eq!(
        s.store_if_registered("p", "p/b", entry(6, "b"))
            .await
            .unwrap(),
        None
    );
    assert!(!held(&s, "p/b").await);
    // And a registered key's is stored.
    assert_eq!(
        s.store_if_registered("p", "p/6", entry(6, "six"))
            .await
            .unwrap(),
        Some(Stored::Written)
    );
    assert_eq!(s.get("p/6").await.unwrap(), Some(entry(6, "six")));
}

async fn registrations_alone_stay_within_the_bound<S: Store>(s: S) {
    for i in 0..50 {
        s.register_key("p", &format!("p/{i}")).await.unwrap();
        assert!(s.capacity().unwrap().keys <= 3);
    }
    assert_eq!(keys(&s, "p", None, 100).await, vec!["p/47", "p/48", "p/49"]);
    assert_eq!(s.capacity().unwrap().evictions, 47);
}

/// Parking ([`Store::park`]), for backends that implement it (the embedded store): a parked task stays
/// queued and claimable after its delay but owes no floor, until its id is enqueued again. Panics at the
/// first failure, naming it.
pub async fn parking<S, F, Fut>(make: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    run_one("a_parked_task_owes_no_floor_until_asked_for_again", async {
        a_parked_task_owes_no_floor_until_asked_for_again(make().await).await
    })
    .await;
}

async fn a_parked_task_owes_no_floor_until_asked_for_again<S: Store>(s: S) {
    s.enqueue(vec![task("a", 5), task("b", 7)]).await.unwrap();
    let claims = claim(&s, 10, LONG).await;
    assert_eq!(ids(&claims), vec!["a", "b"]);
    s.park(&claims[0], LONG).await.unwrap();
    check_floor(&s, true, Some(Lsn(7)), "a parked task owes no floor").await;
    let st = stats(&s).await;
    assert_eq!(
        (st.depth, st.parked),
        (2, 1),
        "a parked task stays queued: {st:?}"
    );
    assert_eq!(s.parked(10).await.unwrap(), vec!["a".to_string()]);
    assert!(
        claim(&s, 10, LONG).await.is_empty(),
        "a parked task waits out its delay"
    );
    s.finish(&claims[1], None, Vec::new()).await.unwrap();
    check_floor(&s, true, None, "only a parked task is left").await;
    depth_is(&s, 1, "the parked task").await;

    // Asked for again: it owes the new change and is due at once.
    s.enqueue(vec![task("a", 9)]).await.unwrap();
    check_floor(
        &s,
        true,
        Some(Lsn(9)),
        "an unparked task owes its new change",
    )
    .await;
    assert_eq!(stats(&s).await.parked, 0);
    let again = claim_eventually(&s, "a").await;
    assert_eq!(again.lsn, Lsn(9));
    assert!(again.attempts >= 1, "attempts are kept: {again:?}");

    // Parked with no delay: claimable again, and finishing it empties the queue.
    s.park(&again, Duration::ZERO).await.unwrap();
    check_floor(&s, true, None, "parked again").await;
    let last = claim_eventually(&s, "a").await;
    s.finish(&last, None, Vec::new()).await.unwrap();
    is_empty(&s, "a finished parked task is gone").await;
    assert_eq!(stats(&s).await.parked, 0);
    assert!(s.parked(10).await.unwrap().is_empty());
}

async fn pending_floor_is_the_oldest_change_still_owed<S: Store>(s: S, exact: bool) {
    check_floor(&s, exact, None, "an empty queue has no floor").await;
    s.enqueue(vec![task("a", 5), task("b", 3)]).await.unwrap();
    check_floor(&s, exact, Some(Lsn(3)), "pending_floor").await;
    s.enqueue(vec![task("b", 7)]).await.unwrap();
    check_floor(
        &s,
        exact,
        Some(Lsn(3)),
        "coalescing a newer change must keep the oldest change owed",
    )
    .await;
    s.enqueue(vec![task("a", 2)]).await.unwrap();
    check_floor(
        &s,
        exact,
        Some(Lsn(2)),
        "coalescing an older change must lower the floor",
    )
    .await;
    s.enqueue(vec![task_from("c", 1, 9)]).await.unwrap();
    check_floor(
        &s,
        exact,
        Some(Lsn(1)),
        "a task's own floor counts, not its LSN",
    )
    .await;
    let claims = claim(&s, 10, LONG).await;
    assert_eq!(ids(&claims), vec!["a", "b", "c"]);
    assert_eq!(claims[0].lsn, Lsn(5));
    check_floor(&s, exact, Some(Lsn(1)), "claimed tasks still owe").await;
    s.retry(&claims[2], Duration::ZERO).await.unwrap();
    check_floor(&s, exact, Some(Lsn(1)), "retried tasks still owe").await;
    s.finish(&claims[0], None, Vec::new()).await.unwrap();
    check_floor(&s, exact, Some(Lsn(1)), "after finishing a").await;
    let c = claim_eventually(&s, "c").await;
    s.finish(&c, None, Vec::new()).await.unwrap();
    check_floor(&s, exact, Some(Lsn(3)), "after finishing c, b owes 3").await;
    s.finish(&claims[1], None, Vec::new()).await.unwrap();
    check_floor(&s, exact, None, "nothing is owed once all finished").await;
}

async fn finishing_a_raised_task_moves_its_floor_past_the_claim<S: Store>(s: S, exact: bool) {
    s.enqueue(vec![task("a", 5)]).await.unwrap();
    let c = claim(&s, 1, LONG).await.remove(0);
    s.enqueue(vec![task("a", 8)]).await.unwrap();
    check_floor(&s, exact, Some(Lsn(5)), "pending_floor").await;
    s.finish(&c, None, Vec::new()).await.unwrap();
    check_floor(
        &s,
        exact,
        Some(Lsn(6)),
        "the refresh saw every change up to the claim's LSN (5): 6..=8 is still owed",
    )
    .await;
    let again = claim_eventually(&s, "a").await;
    assert_eq!(again.lsn, Lsn(8));
    s.finish(&again, None, Vec::new()).await.unwrap();
    check_floor(&s, exact, None, "pending_floor").await;
}

async fn follow_ups_inherit_the_finished_tasks_floor<S: Store>(s: S, exact: bool) {
    // A lookup standing for changes 4..=10 hands its debt to the keys it finds.
    s.enqueue(vec![task_from("lookup", 4, 10)]).await.unwrap();
    let c = claim(&s, 1, LONG).await.remove(0);
    s.finish(&c, None, vec![task("k1", 10), task("k2", 10)])
        .await
        .unwrap();
    check_floor(
        &s,
        exact,
        Some(Lsn(4)),
        "follow-ups must inherit the finished task's floor",
    )
    .await;
    let ks = claim(&s, 10, LONG).await;
    assert_eq!(ids(&ks), vec!["k1", "k2"]);
    s.finish(&ks[0], None, Vec::new()).await.unwrap();
    check_floor(&s, exact, Some(Lsn(4)), "k2 still owes 4").await;
    s.finish(&ks[1], None, Vec::new()).await.unwrap();
    check_floor(&s, exact, None, "pending_floor").await;

    // A task kept because it was raised: its follow-ups take its old floor, it keeps the rest.
    s.enqueue(vec![task_from("m", 3, 6)]).await.unwrap();
    let c = claim(&s, 1, LONG).await.remove(0);
    s.enqueue(vec![task("m", 9)]).await.unwrap();
    s.finish(&c, None, vec![task("f", 6)]).await.unwrap();
    check_floor(&s, exact, Some(Lsn(3)), "f inherits m's floor 3").await;
    let f = claim_eventually(&s, "f").await;
    s.finish(&f, None, Vec::new()).await.unwrap();
    check_floor(&s, exact, Some(Lsn(7)), "m owes 7..=9").await;
}

async fn wait_for_tasks_wakes_and_times_out<S: Store>(s: S) {
    let s = Arc::new(s);
    // Nothing to wait for: it returns after its timeout.
    tokio::time::timeout(PATIENCE, s.wait_for_tasks(Duration::from_millis(20)))
        .await
        .expect("wait_for_tasks overran its timeout");

    // An enqueue while waiting wakes the waiter.
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move { s.wait_for_tasks(LONG).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.enqueue(vec![task("w", 1)]).await.unwrap();
    tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("an enqueue did not wake wait_for_tasks")
        .expect("waiter panicked");

    // A claimable task is already there: no waiting.
    tokio::time::timeout(PATIENCE, s.wait_for_tasks(LONG))
        .await
        .expect("wait_for_tasks waited although a task is claimable");

    // A claim released by retry wakes a waiter.
    let c = claim(&*s, 1, LONG).await.remove(0);
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move { s.wait_for_tasks(LONG).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.retry(&c, Duration::ZERO).await.unwrap();
    tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("a retry did not wake wait_for_tasks")
        .expect("waiter panicked");
}

// ---------------------------------------------------------------------------------------------------
// Concurrency

async fn concurrent_enqueue_and_finish_lose_nothing<S: Store>(s: S) {
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: usize = 250;
    const BATCH: usize = 25;
    const WORKERS: usize = 4;
    // Every 5th task of producer 0 asks for a follow-up.
    const FOLLOW_UPS: usize = PER_PRODUCER / 5;
    const TOTAL: usize = PRODUCERS * PER_PRODUCER + FOLLOW_UPS;

    let s = Arc::new(s);
    let claimed: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut handles = Vec::new();
    for p in 0..PRODUCERS {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            for start in (0..PER_PRODUCER).step_by(BATCH) {
                let tasks = (start..start + BATCH)
                    .map(|i| task(&format!("c{p}-{i}"), i as u64 + 1))
                    .collect();
                s.enqueue(tasks).await.expect("concurrent enqueue failed");
            }
        }));
    }
    for _ in 0..WORKERS {
        let s = s.clone();
        let claimed = claimed.clone();
        handles.push(tokio::spawn(async move {
            let start = Instant::now();
            loop {
                if claimed.lock().unwrap().len() == TOTAL {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "workers did not see every task within 120 s ({} of {TOTAL})",
                    claimed.lock().unwrap().len()
                );
                let claims = s.claim(8, LONG).await.expect("concurrent claim failed");
                if claims.is_empty() {
                    s.wait_for_tasks(Duration::from_millis(20)).await;
                    continue;
                }
                for c in claims {
                    assert!(
                        claimed.lock().unwrap().insert(c.id.clone()),
                        "task {} was claimed twice while its lease was live",
                        c.id
                    );
                    let (primer, follow_up) = if let Some(n) = c.id.strip_prefix("c0-") {
                        let n: usize = n.parse().unwrap();
                        let f = n
                            .is_multiple_of(5)
                            .then(|| task(&format!("f-{n}"), c.lsn.0));
                        ("conc", f.into_iter().collect())
                    } else if c.id.starts_with('f') {
                        ("conc-f", Vec::new())
                    } else {
                        ("conc", Vec::new())
                    };
                    // A refresh runs for a registered key (the embedded store writes no other).
                    s.register_key(primer, &c.id)
                        .await
                        .expect("concurrent register failed");
                    let stored = s
                        .finish(&c, Some((primer, &c.id, entry(c.lsn.0, &c.id))), follow_up)
                        .await
                        .expect("concurrent finish failed");
                    assert_eq!(stored, Some(Stored::Written));
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("a producer or worker panicked");
    }

    for p in 0..PRODUCERS {
        for i in 0..PER_PRODUCER {
            let id = format!("c{p}-{i}");
            assert_eq!(
                s.get(&id).await.unwrap(),
                Some(entry(i as u64 + 1, &id)),
                "entry {id}"
            );
        }
    }
    assert_eq!(
        keys(&*s, "conc", None, 10_000).await.len(),
        PRODUCERS * PER_PRODUCER
    );
    assert_eq!(keys(&*s, "conc-f", None, 10_000).await.len(), FOLLOW_UPS);
    is_empty(&*s, "queue must be empty").await;
    assert_eq!(floor(&*s).await, None, "an empty queue has no floor");
}

async fn concurrent_writes_to_one_key_keep_the_newest<S: Store>(s: S) {
    const WRITERS: u64 = 8;
    const PER_WRITER: u64 = 25;
    let s = Arc::new(s);
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut results = HashMap::new();
            for i in 0..PER_WRITER {
                // A permutation of 1..=200 spread over the writers.
                let lsn = ((w * PER_WRITER + i) * 73) % (WRITERS * PER_WRITER) + 1;
                let stored = s
                    .store_result("hot", "hot/1", entry(lsn, &lsn.to_string()))
                    .await
                    .expect("concurrent store_result failed");
                results.insert(lsn, stored);
                s.enqueue(vec![task("hot-task", lsn)])
                    .await
                    .expect("concurrent enqueue failed");
            }
            results
        }));
    }
    let mut written_max = 0;
    for h in handles {
        for (lsn, stored) in h.await.expect("a writer panicked") {
            match stored {
                Stored::Written => written_max = written_max.max(lsn),
                Stored::KeptNewer(newer) => assert!(newer.0 > lsn, "kept {newer} over {lsn}"),
            }
        }
    }
    let max = WRITERS * PER_WRITER;
    assert_eq!(written_max, max);
    assert_eq!(
        s.get("hot/1").await.unwrap(),
        Some(entry(max, &max.to_string()))
    );
    assert_eq!(keys(&*s, "hot", None, 10).await, vec!["hot/1"]);
    let claims = claim(&*s, 10, LONG).await;
    assert_eq!(
        ids(&claims),
        vec!["hot-task"],
        "concurrent enqueues of one id coalesce"
    );
    assert_eq!(claims[0].lsn, Lsn(max));
}

async fn leases_are_exclusive_renewable_and_expire<S: Store>(s: S) {
    let lease = |name: &'static str, holder: &'static str, ttl: Duration| {
        let s = &s;
        async move {
            s.try_lease(name, holder, ttl)
                .await
                .expect("try_lease failed")
        }
    };
    assert!(lease("job", "a", LONG).await, "a free lease is granted");
    assert!(
        !lease("job", "b", LONG).await,
        "a held lease is refused to another holder"
    );
    assert!(
        lease("job", "a", LONG).await,
        "the holder renews its own lease"
    );
    assert!(
        lease("other", "b", LONG).await,
        "leases are independent by name"
    );
    // Releasing someone else's lease does nothing; releasing one's own frees it.
    s.release_lease("job", "b")
        .await
        .expect("release_lease failed");
    assert!(
        !lease("job", "b", LONG).await,
        "a release by a non-holder must not free the lease"
    );
    s.release_lease("job", "a")
        .await
        .expect("release_lease failed");
    assert!(lease("job", "b", LONG).await, "a released lease is granted");
    s.release_lease("never-taken", "x")
        .await
        .expect("releasing an unknown lease is not an error");
    // A lease that runs out may be taken over.
    assert!(lease("short", "a", Duration::from_millis(1)).await);
    let deadline = Instant::now() + PATIENCE;
    while !lease("short", "b", LONG).await {
        assert!(
            Instant::now() < deadline,
            "an expired lease was never granted to another holder"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !lease("short", "a", LONG).await,
        "the old holder lost the lease it let run out"
    );
}

async fn concurrent_lease_attempts_have_one_winner<S: Store>(s: S) {
    let s = Arc::new(s);
    for round in 0..20 {
        let name = format!("race-{round}");
        let attempts = (0..8).map(|h| {
            let s = s.clone();
            let name = name.clone();
            tokio::spawn(async move { s.try_lease(&name, &format!("h{h}"), LONG).await })
        });
        let mut winners = 0;
        for attempt in attempts {
            if attempt.await.expect("task").expect("try_lease failed") {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "round {round}: {winners} holders got one lease");
    }
}
