//! `GET /subscribe?key=K1&key=K2` and `POST /subscribe` (`{"keys": [...]}`): live keys as Server-Sent
//! Events.
//!
//! The stream starts with one `value` event per key (its current value; a miss is computed as `/fetch`
//! computes it), then sends a `value` event whenever a key's stored value changes (its ETag differs). Each
//! event's data is `{"key", "value" (the stored bytes), "etag", "lsn", "computed_at"}` and its id is the
//! entry's LSN. A client that reconnects with `Last-Event-ID` gets the current value of every subscribed key
//! again (at least once: nothing that changed in between is lost), then changes as before. Comments
//! (`: keep-alive`) every `http.subscribe.heartbeat` keep proxies from closing an idle stream.
//!
//! Other events: `resync` (the client was too slow to read: every key's current value follows), `expired`
//! (the token expired: the stream ends; reconnect with a new one), `end` (kck is stopping: the stream
//! ends; reconnect), `error` (a key could not be read: the stream ends).
//!
//! **How changes are learnt:** the subscription registers its keys in the [`Hub`]'s registry
//! ([`crate::freshness::live`]); a store write of this process (refresh workers, priming, drops) marks
//! the key in the inbox of each subscription that follows it, and only those re-read it, only that key.
//! With a shared store (ScyllaDB, split roles) a poller reads every followed key once per
//! `http.subscribe.poll` and reports the changed ones the same way.
//!
//! **Bounded:** a subscription's inbox holds at most `http.subscribe.buffer` changed keys (indices, not
//! values); past that it overflows and the client gets `resync` then every key's current value. Keys per
//! subscription (`http.subscribe.max_keys`) and subscriptions in total (`http.subscribe.max_subscriptions`)
//! are limited.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{ApiError, AppState, Principal, body_error, computed_at, etag_of, require_json};
use crate::freshness::Hub;
use crate::freshness::live::{Subscription, Taken};
use crate::primer::Key;
use crate::store::{Entry, Store};

// ---------------------------------------------------------------------------------------------------------
// Settings (`http.subscribe` in the config)

pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 10_000;
pub const DEFAULT_MAX_KEYS: usize = 1000;
pub const DEFAULT_BUFFER: usize = 256;
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);
/// Reads at once of the shared-store poller.
const POLL_CONCURRENCY: usize = 16;

/// Live keys (`/subscribe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeConfig {
    /// How often an idle stream gets a comment. Default 15 s.
    pub heartbeat: Duration,
    /// The most subscriptions open at once in this process. Default 10000.
    pub max_subscriptions: usize,
    /// The most distinct keys one subscription may follow. Default 1000.
    pub max_keys: usize,
    /// The most changed keys held for a subscriber that has not taken them yet; past it, `resync`.
    /// Default 256.
    pub buffer: usize,
    /// With a shared store, how often every followed key is read to learn other processes' writes.
    /// Default 500 ms.
    pub poll: Duration,
}

impl Default for SubscribeConfig {
    fn default() -> Self {
        SubscribeConfig {
            heartbeat: DEFAULT_HEARTBEAT,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_keys: DEFAULT_MAX_KEYS,
            buffer: DEFAULT_BUFFER,
            poll: DEFAULT_POLL,
        }
    }
}

/// One open subscription, counted in the hub's stats; released on drop.
struct Slot(Arc<Hub>);

impl Slot {
    fn take(hub: &Arc<Hub>, max: usize) -> Option<Slot> {
        let count = &hub.live.stats.subscribers;
        let mut now = count.load(Ordering::Relaxed);
        loop {
            if now >= max {
                return None;
            }
            match count.compare_exchange(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Slot(hub.clone())),
                Err(seen) => now = seen,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.live.stats.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeRequest {
    keys: Vec<String>,
}

/// `GET /subscribe?key=...&key=...`.
pub(super) async fn subscribe_get(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(super::bad_query)?;
    let mut keys = Vec::new();
    for (name, value) in query {
        if name != "key" {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("unknown parameter '{name}'; give keys as key=K1&key=K2"),
            ));
        }
        keys.push(value);
    }
    open(state, principal, keys, &headers).await
}

/// `POST /subscribe` with `{"keys": [...]}`.
pub(super) async fn subscribe_post(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| body_error(e, state.limits.body_limit))?;
    require_json(&headers)?;
    let request: SubscribeRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the body must be {{\"keys\": [\"key\", ...]}}: {e}"),
        )
    })?;
    open(state, principal, request.keys, &headers).await
}

/// A subscribed key and the version last sent.
struct Watched {
    key: Key,
    text: String,
    sent: Option<String>,
}

/// When the token's `exp` (plus the allowed leeway) passes, if there is a token.
fn token_expiry(state: &AppState, principal: &Principal) -> Option<(Instant, i64)> {
    let exp = principal.claims.as_ref()?.get("exp")?.as_f64()?;
    let leeway = state.auth.as_ref().map_or(0, |a| a.jwt.leeway.as_secs());
    let now = UNIX_EPOCH.elapsed().map_or(0.0, |d| d.as_secs_f64());
    let left = (exp + leeway as f64 - now).max(0.0);
    // A far-away `exp` (years) would overflow an Instant: a day is far enough, checked again then.
    let left = Duration::from_secs_f64(left.min(86_400.0 * 365.0));
    Some((Instant::now() + left, exp as i64))
}

async fn open(
    state: Arc<AppState>,
    principal: Principal,
    mut asked: Vec<String>,
    _headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let config = state.limits.subscribe;
    asked.sort();
    asked.dedup();
    if asked.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "no key given: use /subscribe?key=K1&key=K2",
        ));
    }
    super::within_key_limit(
        asked.len(),
        config.max_keys,
        "subscription",
        "http.subscribe.max_keys",
    )?;
    let mut watched = Vec::with_capacity(asked.len());
    for text in &asked {
        let key = state.catalog.parse_key(text)?;
        let text = state.catalog.render(&key);
        state.check_key_access(&principal, &key, &text)?;
        watched.push(Watched {
            key,
            text,
            sent: None,
        });
    }
    let Some(slot) = Slot::take(&state.hub, config.max_subscriptions) else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscriptions",
            format!(
                "kck already serves {} subscriptions (http.subscribe.max_subscriptions); retry later or on \
                 another instance",
                config.max_subscriptions
            ),
        )
        .with("max_subscriptions", config.max_subscriptions)
        .retry_after(5));
    };
    if state.progress.shared() && state.hub.live.claim_poller() {
        tokio::spawn(poll(
            state.hub.clone(),
            state.store.clone(),
            config.poll,
            state.shutdown.clone(),
        ));
    }
    // Followed before the first reads: a write after them marks the key, so none falls in between.
    let texts: Vec<String> = watched.iter().map(|w| w.text.clone()).collect();
    let subscription = state.hub.subscribe(&texts, config.buffer);
    drop(texts);
    // The first values are computed before answering: a key that cannot be read fails the request with
    // its own error, as `/fetch` would.
    let mut pending = VecDeque::with_capacity(watched.len());
    for w in &mut watched {
        let (entry, _) = state.lookup(&w.key, &w.text).await?;
        w.sent = Some(etag_of(&entry));
        pending.push_back((value_event(&w.text, &entry), false));
    }
    let mut heartbeat =
        tokio::time::interval_at(Instant::now() + config.heartbeat, config.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let live = Live {
        shutdown: state.shutdown.clone(),
        expires: token_expiry(&state, &principal),
        state,
        watched,
        subscription,
        pending,
        heartbeat,
        ended: false,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(live, |mut live| async move {
        loop {
            if let Some(e) = live.pending.pop_front() {
                if !e.1 {
                    live.state
                        .hub
                        .live
                        .stats
                        .events_sent
                        .fetch_add(1, Ordering::Relaxed);
                }
                return Some((Ok::<_, std::convert::Infallible>(e.0), live));
            }
            if live.ended {
                return None;
            }
            live.next().await;
        }
    });
    let mut response = Sse::new(stream).into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// An open stream.
struct Live {
    state: Arc<AppState>,
    watched: Vec<Watched>,
    subscription: Subscription,
    /// Events ready to send (at most one per key, plus one), each with whether it is a comment (not
    /// counted as an event sent).
    pending: VecDeque<(Event, bool)>,
    heartbeat: tokio::time::Interval,
    /// When the token expires, and its `exp`.
    expires: Option<(Instant, i64)>,
    shutdown: watch::Receiver<bool>,
    /// The last event is pending: the stream ends after it.
    ended: bool,
    _slot: Slot,
}

impl Live {
    /// Wait for what comes next and queue its events.
    async fn next(&mut self) {
        let hub = self.state.hub.clone();
        let stats = &hub.live.stats;
        let expires = self.expires;
        enum Wake {
            Stop,
            Expired,
            Inbox,
            Beat,
        }
        let wake = tokio::select! {
            biased;
            // Also when the sender is gone: kck is stopping either way.
            _ = async { let _ = self.shutdown.wait_for(|stop| *stop).await; } => Wake::Stop,
            _ = tokio::time::sleep_until(expires.map_or_else(Instant::now, |e| e.0)),
                if expires.is_some() => Wake::Expired,
            _ = self.subscription.inbox.ready() => Wake::Inbox,
            _ = self.heartbeat.tick() => Wake::Beat,
        };
        match wake {
            Wake::Stop => {
                self.end(end_event(
                    "shutdown",
                    "kck is stopping; reconnect (to another instance)",
                ));
            }
            Wake::Expired => {
                stats.expired.fetch_add(1, Ordering::Relaxed);
                let exp = expires.map_or(0, |e| e.1);
                let data = serde_json::json!({
                    "reason": "token_expired",
                    "exp": exp,
                    "message": "the token expired; reconnect with a new one",
                });
                self.end(Event::default().event("expired").data(data.to_string()));
            }
            Wake::Inbox => match self.subscription.inbox.take() {
                None => {}
                Some(Taken::Changed(indices)) => {
                    for i in indices {
                        if let Err(e) = self.read(i as usize, false).await {
                            self.fail(e);
                            return;
                        }
                    }
                }
                Some(Taken::Overflowed) => {
                    stats.resyncs.fetch_add(1, Ordering::Relaxed);
                    let data = serde_json::json!({
                        "reason": "slow_reader",
                        "keys": self.watched.len(),
                        "message": "more keys changed than this stream buffers (http.subscribe.buffer); \
                                    every key's current value follows",
                    });
                    self.pending.push_back((
                        Event::default().event("resync").data(data.to_string()),
                        false,
                    ));
                    for i in 0..self.watched.len() {
                        if let Err(e) = self.read(i, true).await {
                            self.fail(e);
                            return;
                        }
                    }
                }
            },
            Wake::Beat => {
                // A followed key is read, even when no event is sent: it must not go cold.
                if let Some(refresher) = &self.state.refresher {
                    for w in &self.watched {
                        refresher.touch(&w.text);
                    }
                }
                self.pending
                    .push_back((Event::default().comment("keep-alive"), true));
            }
        }
    }

    /// Read key `i`; queue its event if its value differs from the one sent (or `always`).
    async fn read(&mut self, i: usize, always: bool) -> Result<(), ApiError> {
        let w = &mut self.watched[i];
        // As /fetch reads it: an evicted or dropped key is computed again, an expired one revalidated.
        let (entry, _) = self.state.lookup(&w.key, &w.text).await?;
        let etag = etag_of(&entry);
        if always || w.sent.as_deref() != Some(etag.as_str()) {
            self.pending
                .push_back((value_event(&w.text, &entry), false));
            w.sent = Some(etag);
        }
        Ok(())
    }

    fn fail(&mut self, e: ApiError) {
        tracing::warn!(error = %e.message, "A subscription ended: a key could not be read.");
        let data = serde_json::json!({"error": {"code": e.code, "message": e.message}});
        self.end(Event::default().event("error").data(data.to_string()));
    }

    fn end(&mut self, last: Event) {
        self.pending.push_back((last, false));
        self.ended = true;
    }
}

fn end_event(reason: &str, message: &str) -> Event {
    let data = serde_json::json!({"reason": reason, "message": message});
    Event::default().event("end").data(data.to_string())
}

/// With a shared store: read every followed key each `every`, and report other processes' writes to the
/// hub (see [`crate::freshness::live`]).
async fn poll(
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        match hub.live.poll_once(&hub, &*store, POLL_CONCURRENCY).await {
            Ok(_) => failing = false,
            Err(e) => {
                // Said once per failing spell, not every interval.
                if !failing {
                    tracing::warn!(error = %crate::report::Chain(&e), "Live keys: cannot read the shared store to learn other processes' writes; retrying.");
                }
                failing = true;
            }
        }
    }
}

/// A `value` event: id is the entry's LSN.
fn value_event(text: &str, entry: &Entry) -> Event {
    let mut out = Vec::with_capacity(entry.value.len() + 128);
    out.extend_from_slice(b"{\"key\":");
    let _ = serde_json::to_writer(&mut out, text);
    out.extend_from_slice(b",\"value\":");
    out.extend_from_slice(&entry.value);
    for (name, value) in [
        ("etag", etag_of(entry)),
        ("lsn", entry.lsn.to_string()),
        ("computed_at", computed_at(entry)),
    ] {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        let _ = serde_json::to_writer(&mut out, &value);
    }
    out.push(b'}');
    Event::default()
        .event("value")
        .id(entry.lsn.to_string())
        .data(String::from_utf8_lossy(&out))
}
