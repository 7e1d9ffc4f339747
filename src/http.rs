//! The HTTP API: `/fetch` serves cached values; `/healthz` says the process is alive.
//!
//! [`app`] builds the router from an [`AppState`]; `main` and the tests call the same function. Handlers
//! never fail: every error becomes [`ApiError`], a JSON body `{"error": {"code", "message"}}` with a 4xx
//! status that explains the problem, or a 5xx whose details go to the log only.
//!
//! **Architecture invariant:** `http` reads the store and asks [`Refresher::prime`] for misses; it never
//! touches the replication stream or the queue. A cache hit is one store lookup and the stored bytes
//! written as they are.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::primer::{Catalog, KeyError};
use crate::refresh::{RefreshError, Refresher};
use crate::store::{Entry, Store};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub catalog: Arc<Catalog>,
    /// Computes misses; `None` when misses answer 404 (`prime_on_cache_miss: false`).
    pub primer: Option<Arc<Refresher>>,
    /// Records reads, revalidates stale entries and serves invalidation ([`crate::invalidate`]); `None` in
    /// a server that runs no refreshes.
    pub refresher: Option<Arc<Refresher>>,
}

/// The router.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/fetch/{*key}", get(fetch))
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(crate::invalidate::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            )
        })
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            Duration::from_secs(30),
        ))
        .with_state(state)
}

/// An error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> ApiError {
        let code = match e {
            KeyError::UnknownPrimer { .. } => "unknown_primer",
            KeyError::Shape { .. } => "bad_key",
            KeyError::ParamType { .. } => "bad_key_parameter",
        };
        ApiError::new(StatusCode::BAD_REQUEST, code, e.to_string())
    }
}

fn internal(error: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(%error, "Request failed.");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see kck's log",
    )
}

/// The key text of a `/fetch/...` path, percent-encoding kept (a text parameter may hold an encoded `/`).
fn key_text(uri: &Uri) -> Result<&str, ApiError> {
    let text = uri.path().strip_prefix("/fetch/").unwrap_or_default();
    if text.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_key",
            "no key given: use /fetch/{key}",
        ));
    }
    Ok(text)
}

async fn fetch(State(state): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let raw = key_text(&uri)?;
    let key = state.catalog.parse_key(raw)?;
    let canonical = state.catalog.render(&key);
    if let Some(refresher) = &state.refresher {
        refresher.touch(&canonical);
    }
    let mut expired = false;
    if let Some(entry) = state
        .store
        .get(&canonical)
        .await
        .map_err(|e| internal(&e))?
    {
        // An expired (or invalidated) entry is never served as fresh: within the primer's
        // stale_while_revalidate it is served marked stale while it is recomputed, else it is a miss.
        let Some(expires) = entry
            .expires_at_ms
            .filter(|at| *at <= crate::refresh::now_ms())
        else {
            return Ok(entry_response(entry, "hit"));
        };
        expired = true;
        let grace = state.catalog.primers[key.primer]
            .policy
            .stale_while_revalidate;
        if let Some(refresher) = &state.refresher {
            let servable = grace.is_some_and(|g| {
                crate::refresh::now_ms() < expires.saturating_add(g.as_millis() as i64)
            });
            if servable || state.primer.is_none() {
                refresher.revalidate(key.clone(), canonical.clone());
            }
            if servable {
                let mut response = entry_response(entry, "stale");
                response
                    .headers_mut()
                    .insert("kck-stale", HeaderValue::from_static("true"));
                return Ok(response);
            }
        }
    }
    let Some(refresher) = &state.primer else {
        let why = if expired {
            "has expired and is being recomputed"
        } else {
            "is not in the cache"
        };
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_cached",
            format!("'{canonical}' {why} (prime_on_cache_miss is off)"),
        ));
    };
    match refresher.prime(&key, &canonical).await {
        Ok(entry) => Ok(entry_response(entry, "miss")),
        Err(e @ RefreshError::Query { .. }) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "primer_failed",
            e.to_string(),
        )),
        Err(e) => Err(internal(&e)),
    }
}

fn entry_response(entry: Entry, cache: &'static str) -> Response {
    let mut headers = HeaderMap::with_capacity(4);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&entry.lsn.to_string()) {
        headers.insert("kck-lsn", v);
    }
    let computed = UNIX_EPOCH + Duration::from_millis(entry.computed_at_ms.max(0) as u64);
    if let Ok(v) = HeaderValue::from_str(&humantime::format_rfc3339_millis(computed).to_string()) {
        headers.insert("kck-computed-at", v);
    }
    headers.insert("kck-cache", HeaderValue::from_static(cache));
    (headers, entry.value).into_response()
}
