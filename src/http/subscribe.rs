//! `GET /subscribe?key=K1&key=K2` and `POST /subscribe` (`{"keys": [...]}`): live keys as Server-Sent
//! Events.
//!
//! The stream starts with one `value` event per key (its current value; a miss is computed as `/fetch`
//! computes it), then sends a `value` event whenever a key's stored value changes (its ETag differs). Each
//! event's data is `{"key", "value" (the stored bytes), "etag", "lsn", "computed_at"}` and its id is the
//! entry's LSN. A client that reconnects with `Last-Event-ID` gets the current value of every subscribed key
//! again (at least once: nothing that changed in between is lost), then changes as before. Comments
//! (`: keep-alive`) every [`HEARTBEAT`] keep proxies from closing an idle stream.
//!
//! **Bounded:** a subscriber holds no queue of events, only the last ETag it sent per key: whatever
//! changed while the client was slow to read is sent once, as its newest value. Keys per subscription are
//! limited by `http.max_batch_keys`, subscriptions in total by [`MAX_SUBSCRIPTIONS`].
//!
//! **How changes are learnt:** through the [`crate::freshness::Hub`], as `wait_change` does: it is woken
//! by this process's store writes (refresh workers and priming) and re-reads every [`crate::freshness::POLL`]
//! in any case, which is how a process that shares a store (ScyllaDB, split roles) learns other processes'
//! writes: within one poll (50 ms) plus the store read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use super::{
    ApiError, AppState, Principal, body_error, computed_at, etag_of, internal, require_json,
};
use crate::freshness::Waited;
use crate::primer::Key;
use crate::store::Entry;

/// How often an idle stream gets a comment.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// The most subscriptions open at once in one process.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

/// Counters for `/status` and metrics.
pub static SUBSCRIBERS: AtomicUsize = AtomicUsize::new(0);
pub static EVENTS_SENT: AtomicU64 = AtomicU64::new(0);

/// One open subscription; its count is released on drop.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        let mut now = SUBSCRIBERS.load(Ordering::Relaxed);
        loop {
            if now >= MAX_SUBSCRIPTIONS {
                return None;
            }
            match SUBSCRIBERS.compare_exchange(now, now + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Slot),
                Err(seen) => now = seen,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        SUBSCRIBERS.fetch_sub(1, Ordering::AcqRel);
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

async fn open(
    state: Arc<AppState>,
    principal: Principal,
    mut asked: Vec<String>,
    _headers: &HeaderMap,
) -> Result<Response, ApiError> {
    asked.sort();
    asked.dedup();
    if asked.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "no key given: use /subscribe?key=K1&key=K2",
        ));
    }
    super::within_key_limit(asked.len(), state.limits.max_batch_keys, "subscription")?;
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
    let Some(slot) = Slot::take() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscriptions",
            format!("kck already serves {MAX_SUBSCRIPTIONS} subscriptions; retry later or on another instance"),
        )
        .retry_after(5));
    };
    // The first values are computed before answering: a key that cannot be read fails the request with
    // its own error, as `/fetch` would.
    let mut first = Vec::with_capacity(watched.len());
    for w in &mut watched {
        let (entry, _) = state.lookup(&w.key, &w.text).await?;
        w.sent = Some(etag_of(&entry));
        first.push(event(&w.text, &entry));
    }
    let stream = futures_util::stream::unfold(
        (state, watched, first, slot),
        |(state, mut watched, mut pending, slot)| async move {
            loop {
                if let Some(e) = pending.pop() {
                    EVENTS_SENT.fetch_add(1, Ordering::Relaxed);
                    return Some((
                        Ok::<_, std::convert::Infallible>(e),
                        (state, watched, pending, slot),
                    ));
                }
                match changes(&state, &mut watched).await {
                    Ok(Some(events)) => {
                        pending = events;
                        pending.reverse();
                    }
                    Ok(None) => return None,
                    Err(e) => {
                        tracing::warn!(error = %e.message, "A subscription ended: a key could not be read.");
                        let data =
                            serde_json::json!({"error": {"code": e.code, "message": e.message}});
                        pending = vec![Event::default().event("error").data(data.to_string())];
                        // Sent, then the stream ends on the next turn.
                        let e = pending.pop()?;
                        watched.clear();
                        return Some((Ok(e), (state, watched, pending, slot)));
                    }
                }
            }
        },
    );
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT))
        .into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// Waits until at least one key's version differs from the one sent; `None` when the stream should end
/// (kck is stopping, or nothing is watched any more).
async fn changes(
    state: &AppState,
    watched: &mut [Watched],
) -> Result<Option<Vec<Event>>, ApiError> {
    if watched.is_empty() {
        return Ok(None);
    }
    loop {
        let deadline = Instant::now() + Duration::from_secs(3600);
        let found = {
            let watched = &*watched;
            state
                .hub
                .wait_for(None, deadline, &state.shutdown, move || async move {
                    let mut changed = Vec::new();
                    for (i, w) in watched.iter().enumerate() {
                        let entry = state
                            .store
                            .get(&w.text)
                            .await
                            .map_err(|e| internal(&crate::report::Chain(&e)))?;
                        let entry = match entry {
                            Some(entry) => entry,
                            // Evicted: computed again, as /fetch would.
                            None => state.lookup(&w.key, &w.text).await?.0,
                        };
                        if w.sent.as_deref() != Some(etag_of(&entry).as_str()) {
                            changed.push((i, entry));
                        }
                    }
                    Ok::<_, ApiError>((!changed.is_empty()).then_some(changed))
                })
                .await?
        };
        match found {
            Waited::Done(changed) => {
                let mut events = Vec::with_capacity(changed.len());
                for (i, entry) in changed {
                    watched[i].sent = Some(etag_of(&entry));
                    events.push(event(&watched[i].text, &entry));
                }
                return Ok(Some(events));
            }
            Waited::TimedOut => continue,
            Waited::ShuttingDown => return Ok(None),
        }
    }
}

/// A `value` event: id is the entry's LSN.
fn event(text: &str, entry: &Entry) -> Event {
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
