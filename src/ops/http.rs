//! The operations routes and the layer that measures every answer.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the dashboard (one static page, `dashboard.html`, polling `/status`) |
//! | `GET /status` | the [`Status`] document as JSON (`?history=false` leaves out the chart history) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /readyz` | `200` when the slot is held, the store answers and Postgres answers; else `503` with what is not |
//! | `GET /cache/keys/{primer}` | cached keys of a primer, in order: `?after=KEY&limit=N` pages |
//! | `GET /cache/entry/{*key}` | a cached entry with its LSN and time, without computing a miss |
//!
//! [`observe`] wraps the whole router: it counts HTTP answers by route and status and measures `/fetch`
//! (hit, miss, not cached) from the answer itself, so the fetch handler needs no metrics code.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::Router;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use crate::http::{ApiError, Routes};
use crate::ops::Ops;
use crate::ops::status::Status;
use crate::replication::ReplicationState;
use crate::telemetry::Telemetry;

/// The dashboard page.
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// How long a readiness probe waits for the store and for Postgres.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many keys per `/cache/keys` page.
pub const MAX_KEYS_PAGE: usize = 10_000;

/// The operations routes (given to `crate::http::app`, which puts them behind the same layers as the API:
/// JSON errors, timeout, authentication). Listed through [`Routes`] so that the OpenAPI document is checked
/// against them too.
pub fn routes() -> Routes<Arc<Ops>> {
    Routes::new()
        .get("/", dashboard)
        .get("/status", status)
        .get("/metrics", metrics)
        .get("/readyz", readyz)
        .get("/cache/keys/{primer}", keys)
        .get("/cache/entry/{*key}", entry)
        .delete("/cache/{*key}", super::invalidate::delete_key)
        .post("/invalidate", super::invalidate::invalidate_handler)
        .post("/refresh", super::invalidate::refresh_handler)
}

/// [`routes`] with their state.
pub fn router(ops: Arc<Ops>) -> Router {
    routes().with_state(ops)
}

/// Count every answer (and measure `/fetch`) of `router`.
pub fn observe(router: Router, telemetry: Arc<Telemetry>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(telemetry, measure))
}

async fn measure(
    State(telemetry): State<Arc<Telemetry>>,
    request: Request,
    next: Next,
) -> Response {
    // MatchedPath is an `Arc<str>`: cloning it allocates nothing.
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", |p| p.as_str());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    telemetry.metrics.http(route, status.as_u16());
    if route.starts_with("/fetch/") {
        let cache = response
            .headers()
            .get("kck-cache")
            .and_then(|v| v.to_str().ok());
        let counts = &telemetry.fetches;
        let result = match (status.as_u16(), cache) {
            // 304: the client's copy is current (If-None-Match, or a long poll that saw no change).
            (200..=299, Some("hit")) | (304, _) => {
                counts.hits.fetch_add(1, Ordering::Relaxed);
                "hit"
            }
            // Served from the cache (marked stale) while it is recomputed: a hit for the ratio.
            (200..=299, Some("stale")) => {
                counts.hits.fetch_add(1, Ordering::Relaxed);
                "stale"
            }
            (200..=299, _) => {
                counts.misses.fetch_add(1, Ordering::Relaxed);
                "miss"
            }
            (404, _) => {
                counts.not_cached.fetch_add(1, Ordering::Relaxed);
                "not_cached"
            }
            (400..=499, _) => "bad_request",
            _ => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                "error"
            }
        };
        telemetry.metrics.fetch(result, started.elapsed());
    }
    response
}

async fn dashboard() -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], Html(DASHBOARD)).into_response()
}

#[derive(Debug, Deserialize)]
struct StatusQuery {
    history: Option<bool>,
}

async fn status(State(ops): State<Arc<Ops>>, Query(q): Query<StatusQuery>) -> Response {
    let status = Status::live(&ops, q.history.unwrap_or(true)).await;
    axum::Json(status).into_response()
}

async fn metrics(State(ops): State<Arc<Ops>>) -> Response {
    let queue = ops.store.queue_stats().await.ok();
    let reading = ops.watch.reading();
    crate::ops::monitor::set_gauges(&ops, reading.as_ref(), queue.as_ref());
    // Refreshes the per-primer key gauges (counted at most every few seconds).
    ops.key_counts.get(&ops).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.telemetry.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(ops): State<Arc<Ops>>) -> Response {
    let mut not_ready = Vec::new();
    let role = *ops.replication.borrow();
    let slot = match role {
        // No replication role: the slot is another process's business.
        ReplicationState::Off => true,
        ReplicationState::Standby => {
            not_ready.push(format!(
                "slot: standby, waiting to take over slot '{}' from the kck that holds it",
                ops.source.config.slot
            ));
            false
        }
        _ => ops.stats.streaming.load(Ordering::Relaxed),
    };
    if !slot && role != ReplicationState::Standby {
        not_ready.push(format!(
            "slot: the replication stream does not hold slot '{}' (starting or reconnecting; see /status \
             and kck's log)",
            ops.source.config.slot
        ));
    }
    let store = match tokio::time::timeout(PROBE_TIMEOUT, ops.store.queue_stats()).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            not_ready.push(format!("store: {}", crate::report::Chain(&e)));
            false
        }
        Err(_) => {
            not_ready.push(format!(
                "store: no answer within {}s",
                PROBE_TIMEOUT.as_secs()
            ));
            false
        }
    };
    let postgres = match tokio::time::timeout(PROBE_TIMEOUT, ops.refresher.ping()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            not_ready.push(format!("postgres: {e}"));
            false
        }
        Err(_) => {
            not_ready.push(format!(
                "postgres: no answer within {}s",
                PROBE_TIMEOUT.as_secs()
            ));
            false
        }
    };
    let body = json!({
        "ready": not_ready.is_empty(),
        "checks": {"slot": slot, "store": store, "postgres": postgres},
        "replication": role.as_str(),
        "not_ready": not_ready,
    });
    let code = if not_ready.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
struct KeysQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn keys(
    State(ops): State<Arc<Ops>>,
    Path(primer): Path<String>,
    Query(q): Query<KeysQuery>,
) -> Result<Response, ApiError> {
    if ops.catalog.primer(&primer).is_none() {
        let known: Vec<&str> = ops
            .catalog
            .primers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_primer",
            format!(
                "no primer is named '{primer}' (primers: {})",
                known.join(", ")
            ),
        ));
    }
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_KEYS_PAGE);
    let keys = ops
        .store
        .keys(&primer, q.after.as_deref(), limit)
        .await
        .map_err(|e| store_error(&crate::report::Chain(&e)))?;
    let next_after = (keys.len() == limit)
        .then(|| keys.last().cloned())
        .flatten();
    Ok(
        axum::Json(json!({"primer": primer, "keys": keys, "next_after": next_after}))
            .into_response(),
    )
}

async fn entry(State(ops): State<Arc<Ops>>, uri: Uri) -> Result<Response, ApiError> {
    let raw = uri.path().strip_prefix("/cache/entry/").unwrap_or_default();
    let key = ops.catalog.parse_key(raw)?;
    let canonical = ops.catalog.render(&key);
    let Some(entry) = ops
        .store
        .get(&canonical)
        .await
        .map_err(|e| store_error(&crate::report::Chain(&e)))?
    else {
        let registered = ops.store.is_registered(&canonical).await.unwrap_or(false);
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_cached",
            if registered {
                format!("'{canonical}' is registered but its first value is still being computed")
            } else {
                format!("'{canonical}' is not in the cache")
            },
        ));
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        EntryDocument::new(canonical, &entry).to_json(),
    )
        .into_response())
}

/// What `GET /cache/entry/{key}` answers and `kck get` prints: `{"key", "lsn", "computed_at",
/// "expires_at_ms", "value"}`, the value spliced in as the primer stored it (never through
/// `serde_json::Value`, which would round numbers to f64 and sort object keys).
#[derive(Debug, Serialize, Deserialize)]
pub struct EntryDocument {
    pub key: String,
    pub lsn: String,
    pub computed_at: String,
    pub expires_at_ms: Option<i64>,
    pub value: Box<RawValue>,
}

impl EntryDocument {
    /// The document of a stored entry. A value that is not JSON (a corrupt store) is shown as a string.
    pub fn new(key: String, entry: &crate::store::Entry) -> EntryDocument {
        let computed = UNIX_EPOCH + Duration::from_millis(entry.computed_at_ms.max(0) as u64);
        let value = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|text| RawValue::from_string(text.to_owned()).ok())
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(&entry.value);
                serde_json::value::to_raw_value(&text).unwrap_or_default()
            });
        EntryDocument {
            key,
            lsn: entry.lsn.to_string(),
            computed_at: humantime::format_rfc3339_millis(computed).to_string(),
            expires_at_ms: entry.expires_at_ms,
            value,
        }
    }

    /// Compact JSON (the raw value as it is).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Indented JSON for people; the value itself is written as stored (serde_json writes a raw value
    /// verbatim, even when pretty-printing).
    pub fn to_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

fn store_error(error: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(%error, "The store failed; a full disk or a broken store directory are the usual causes.");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see kck's log",
    )
}
