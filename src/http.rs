//! The HTTP API: router, handlers, and the JSON error shape.
//!
//! [`app`] builds the router from an [`AppState`] and the operations routes ([`crate::ops::http`]); `main`
//! and the tests call the same function. Routes are added through [`Routes`], which remembers them, so
//! that the OpenAPI document ([`crate::openapi`]) can be checked against every route there is.
//!
//! - `GET /fetch/{key}`: a cached value, with `ETag` and `Cache-Control`; `If-None-Match` → `304`. An
//!   expired entry is never a hit: within its primer's `stale_while_revalidate` it is answered marked
//!   `kck-stale: true` while [`Refresher::revalidate`] recomputes it, else it is computed like a miss.
//!   `?min_lsn=X/Y` waits until the value reflects that position; `?wait_change=ETAG` long-polls until
//!   the value differs from that version (`304` if it does not within the timeout).
//! - `POST /fetch`: many keys in one round trip.
//! - `POST /update/{name}`: run an updater ([`crate::update`]); `?wait=fresh` also waits until every cached
//!   value reflects the write.
//! - `GET /healthz`, `GET /openapi.json`.
//!
//! Handlers never fail: every error becomes [`ApiError`], a JSON body `{"error": {"code", "message"}}` with
//! a 4xx status that explains the problem, or a 5xx whose details go to the log only. Extractor rejections
//! (bad query string, wrong content type, body too large) are mapped to the same shape, and a last layer
//! ([`json_errors`]) turns any other error response into it.
//!
//! Middleware, outermost first: JSON error bodies, the request timeout (longer for a request that waits),
//! authentication ([`auth::authenticate`], when configured), the body limit.
//!
//! **Architecture invariant:** `http` reads the store, asks [`Refresher::prime`] for misses and
//! [`Updates::run`] for writes, and reads the stream's progress through [`Progress`] to wait for freshness;
//! it never drives the replication stream or the queue. A cache hit that waits for nothing is one store
//! lookup and the stored bytes written as they are.

pub mod auth;
pub mod subscribe;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::auth::{AuthError, Authenticator, Principal, claim_text};
use crate::freshness::{Hub, Progress, Waited};
use crate::lsn::Lsn;
use crate::primer::{Catalog, Key, KeyError, Primer};
use crate::refresh::{RefreshError, Refresher};
use crate::store::{Entry, Store};
use crate::update::{ArgError, UpdateError, Updater, Updates, ValueType, parse_args};

// ---------------------------------------------------------------------------------------------------------
// Settings (`http` in the config)

pub const DEFAULT_HTTP_BIND: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;
pub const DEFAULT_MAX_BATCH_KEYS: usize = 1000;
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(60);
/// What `/fetch` answers in `Cache-Control` unless a primer says otherwise: caches may keep the value but
/// must revalidate it (cheap with `ETag`).
pub const DEFAULT_CACHE_CONTROL: &str = "no-cache";

/// The HTTP server.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Default `127.0.0.1:8080`. `KCK_HTTP_BIND`.
    pub bind: SocketAddr,
    /// How long a request may take, waits excluded (a request that waits gets `max_wait` more). Updaters'
    /// statements get it as their `statement_timeout`. Default 30 s.
    pub request_timeout: Duration,
    /// The largest request body, in bytes. Default 1 MiB.
    pub body_limit: usize,
    /// The most keys one `POST /fetch` may ask for. Default 1000.
    pub max_batch_keys: usize,
    /// How long a freshness wait (`min_lsn`, `wait=fresh`, `wait_change`) lasts when the request gives no
    /// `timeout`. Default 5 s.
    pub wait_timeout: Duration,
    /// The longest `timeout` a request may give. Default 60 s.
    pub max_wait: Duration,
    /// Origins browsers may call kck from (CORS), such as `https://app.example.com`, or `*`. Default none:
    /// no CORS headers.
    pub cors_origins: Vec<String>,
    /// The most connections open at once; more wait until one closes. Default 4096.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and how long an idle keep-alive connection
    /// stays open. Default 10 s.
    pub header_read_timeout: Duration,
    /// The most bytes of request line and headers. Default 64 KiB.
    pub max_header_bytes: usize,
    /// The most misses one `POST /fetch` computes; the keys past it answer `429 too_many_misses` in
    /// its results (nothing is computed or registered for them). Default 100.
    pub max_batch_misses: usize,
    /// The most misses computed at once, all requests together (requests for one key share one). Default
    /// 32.
    pub max_concurrent_misses: usize,
    /// How long a miss waits for one of those before it answers `503 too_many_misses`. Default 5 s.
    pub miss_wait: Duration,
    /// The names (and `name:port`) a request's `Host` may give; others answer `421 host_not_allowed`.
    /// Lower case. Empty (the default): any.
    pub allowed_hosts: Vec<String>,
    /// Live keys (`/subscribe`).
    pub subscribe: subscribe::SubscribeConfig,
}

pub const DEFAULT_MAX_BATCH_MISSES: usize = 100;

pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 << 10;

impl HttpConfig {
    /// The connection limits for [`crate::listen::serve`].
    pub fn connection_limits(&self) -> crate::listen::Limits {
        crate::listen::Limits {
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            max_header_bytes: self.max_header_bytes,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: DEFAULT_HTTP_BIND,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            body_limit: DEFAULT_BODY_LIMIT,
            max_batch_keys: DEFAULT_MAX_BATCH_KEYS,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            max_wait: DEFAULT_MAX_WAIT,
            cors_origins: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_batch_misses: DEFAULT_MAX_BATCH_MISSES,
            max_concurrent_misses: crate::refresh::DEFAULT_MAX_CONCURRENT_MISSES,
            miss_wait: crate::refresh::DEFAULT_MISS_WAIT,
            allowed_hosts: Vec::new(),
            subscribe: subscribe::SubscribeConfig::default(),
        }
    }
}

/// What the handlers share (behind one `Arc`: axum clones the state for every request).
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub catalog: Arc<Catalog>,
    /// Computes misses; `None` when misses answer 404 (`prime_on_cache_miss: false`).
    pub primer: Option<Arc<Refresher>>,
    /// Told about store writes by the refresh workers and priming; freshness waits listen.
    pub hub: Arc<Hub>,
    /// The stream's progress and the queue's floor (read only).
    pub progress: Progress,
    /// Runs updaters; `None` when none are configured.
    pub updates: Option<Arc<Updates>>,
    /// Checks bearer tokens; `None` when authentication is off.
    pub auth: Option<Arc<Authenticator>>,
    /// Timeouts and limits (`http` in the config).
    pub limits: HttpConfig,
    /// Turns true when kck stops: waits end early so that in-flight requests finish quickly.
    pub shutdown: watch::Receiver<bool>,
    /// Records reads (hot keys go first, cold ones are dropped) and revalidates expired entries; `None` in
    /// a server that runs no refreshes.
    pub refresher: Option<Arc<Refresher>>,
}

/// A router that remembers its routes (path and method): axum cannot list a router's routes, and the
/// OpenAPI test and the authentication middleware need them all. Routers of kck are built with it.
pub struct Routes<S = ()> {
    router: Router<S>,
    listed: Vec<(&'static str, Method)>,
}

impl<S: Clone + Send + Sync + 'static> Default for Routes<S> {
    fn default() -> Self {
        Routes {
            router: Router::new(),
            listed: Vec::new(),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub fn new() -> Self {
        Self::default()
    }

    /// `GET path` (an axum path: `{name}` is one segment, `{*name}` the rest).
    pub fn get<H, T>(self, path: &'static str, handler: H) -> Self
    where
        H: axum::handler::Handler<T, S>,
        T: 'static,
    {
        self.add(path, Method::GET, get(handler))
    }

    /// `POST path`.
    pub fn post<H, T>(self, path: &'static str, handler: H) -> Self
    where
        H: axum::handler::Handler<T, S>,
        T: 'static,
    {
        self.add(path, Method::POST, post(handler))
    }

    /// `DELETE path`.
    pub fn delete<H, T>(self, path: &'static str, handler: H) -> Self
    where
        H: axum::handler::Handler<T, S>,
        T: 'static,
    {
        self.add(path, Method::DELETE, axum::routing::delete(handler))
    }

    fn add(mut self, path: &'static str, method: Method, handler: MethodRouter<S>) -> Self {
        self.listed.push((path, method));
        // A second method on a path is merged into its method router.
        self.router = self.router.route(path, handler);
        self
    }

    /// Every route as (path, method), the path as OpenAPI writes it (`{*key}` becomes `{key}`).
    pub fn listed(&self) -> Vec<(String, Method)> {
        self.listed
            .iter()
            .map(|(path, method)| (path.replace("{*", "{"), method.clone()))
            .collect()
    }

    /// The router, with its state.
    pub fn with_state(self, state: S) -> Router {
        self.router.with_state(state)
    }
}

/// The API routes (the operations routes are [`crate::ops::http::routes`]).
pub fn routes() -> Routes<Arc<AppState>> {
    Routes::new()
        .get("/fetch/{*key}", fetch)
        .post("/fetch", fetch_many)
        .post("/update/{name}", update)
        .get("/subscribe", subscribe::subscribe_get)
        .post("/subscribe", subscribe::subscribe_post)
        .get("/healthz", || async { "ok\n" })
        .get("/openapi.json", openapi)
}

/// Whether `path` is one of the API routes' paths (not an operations route, not unknown).
pub fn is_api_path(path: &str) -> bool {
    static API: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        routes()
            .listed
            .iter()
            .map(|(path, _)| path.to_string())
            .collect()
    });
    API.iter().any(|pattern| path_matches(pattern, path))
}

/// Whether a request path matches an axum route path (`{x}`: one non-empty segment; `{*x}`: the rest,
/// non-empty).
fn path_matches(pattern: &str, path: &str) -> bool {
    let mut parts = path.split('/');
    for segment in pattern.split('/') {
        if segment.starts_with("{*") {
            return parts.next().is_some_and(|p| !p.is_empty());
        }
        match parts.next() {
            Some(p) if segment.starts_with('{') => {
                if p.is_empty() {
                    return false;
                }
            }
            Some(p) if p == segment => {}
            _ => return false,
        }
    }
    parts.next().is_none()
}

/// The router: the API routes and `operations` (the operations routes, with their state), behind the same
/// layers.
pub fn app(state: AppState, operations: Router) -> Router {
    let timeouts = Timeouts {
        request: state.limits.request_timeout,
        wait: state.limits.max_wait,
    };
    let body_limit = state.limits.body_limit;
    let cors_origins = state.limits.cors_origins.clone();
    let allowed_hosts = Arc::new(state.limits.allowed_hosts.clone());
    let auth = state.auth.clone();
    let mut router = routes()
        .with_state(Arc::new(state))
        .merge(operations)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method",
            )
        })
        // Innermost: extractors that read the body stop at the limit (413, mapped to JSON).
        .layer(DefaultBodyLimit::max(body_limit));
    if let Some(auth) = auth {
        router = router.layer(axum::middleware::from_fn_with_state(
            auth,
            auth::authenticate,
        ));
    }
    let router = router.layer(axum::middleware::from_fn_with_state(
        timeouts,
        request_timeout,
    ));
    // CORS outside authentication: browsers send preflight requests without the token.
    let router = match cors(&cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    // Outside CORS and authentication: a request for another host (DNS rebinding: a browser page of
    // evil.example whose name now points at 127.0.0.1) gets nothing, not even a preflight answer.
    let router = if allowed_hosts.is_empty() {
        router
    } else {
        router.layer(axum::middleware::from_fn_with_state(
            allowed_hosts,
            check_host,
        ))
    };
    // Outermost: whatever answered with an error, the body has the stable shape.
    router.layer(axum::middleware::map_response(json_errors))
}

/// `421 host_not_allowed` unless the request's host (HTTP/2's `:authority`, else `Host`) is one of
/// `http.allowed_hosts`.
async fn check_host(
    State(allowed): State<Arc<Vec<String>>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request.uri().authority().map(|a| a.as_str()).or_else(|| {
        request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    });
    if host.is_some_and(|h| host_allowed(&allowed, h)) {
        return next.run(request).await;
    }
    ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        "host_not_allowed",
        "this kck does not serve that host name (http.allowed_hosts)",
    )
    .into_response()
}

/// Whether `host` (`name` or `name:port`, any case) is listed: as it is, or by its name alone.
fn host_allowed(allowed: &[String], host: &str) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.strip_prefix('[') {
        // [::1]:8080
        Some(rest) => rest.split_once(']').map_or(host.as_str(), |(n, _)| n),
        None => match host.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => host.as_str(),
        },
    };
    allowed.iter().any(|a| *a == host || a == name)
}

/// The CORS layer for `http.cors_origins` (`None` when there are none): GET and POST, with the headers
/// the API reads (`Last-Event-ID` too, for `/subscribe`) and the ones it answers with.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::HEAD, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_NONE_MATCH,
                // Sent by a live-key client when it reconnects to /subscribe (clients/js).
                header::HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                header::ETAG,
                header::CACHE_CONTROL,
                header::HeaderName::from_static("kck-lsn"),
                header::HeaderName::from_static("kck-computed-at"),
                header::HeaderName::from_static("kck-cache"),
                header::HeaderName::from_static("kck-stale"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

// ---------------------------------------------------------------------------------------------------
// Errors

/// An error answer: `{"error": {"code": ..., "message": ..., ...details}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// More fields of the `error` object (the parameter at fault, how far behind kck is, ...).
    pub details: serde_json::Map<String, serde_json::Value>,
    /// Seconds for a `Retry-After` header (answers a client should simply repeat a little later).
    pub retry_after_s: Option<u32>,
    /// A `WWW-Authenticate` challenge (RFC 6750): every 401 and 403 carries one.
    pub challenge: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: serde_json::Map::new(),
            retry_after_s: None,
            challenge: None,
        }
    }

    /// Answer with `Retry-After: seconds`.
    pub fn retry_after(mut self, seconds: u32) -> ApiError {
        self.retry_after_s = Some(seconds);
        self
    }

    /// Add a field to the `error` object.
    pub fn with(mut self, name: &str, value: impl Into<serde_json::Value>) -> ApiError {
        self.details.insert(name.to_owned(), value.into());
        self
    }

    fn body(&self) -> serde_json::Value {
        let mut error = serde_json::Map::with_capacity(2 + self.details.len());
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.clone().into());
        for (k, v) in &self.details {
            error.insert(k.clone(), v.clone());
        }
        serde_json::json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> ApiError {
        let (status, code) = match e {
            KeyError::TooLong { .. } => (StatusCode::URI_TOO_LONG, "key_too_long"),
            KeyError::UnknownPrimer { .. } => (StatusCode::BAD_REQUEST, "unknown_primer"),
            KeyError::Shape { .. } => (StatusCode::BAD_REQUEST, "bad_key"),
            KeyError::ParamType { .. } | KeyError::Nul { .. } => {
                (StatusCode::BAD_REQUEST, "bad_key_parameter")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        let status = match e {
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        let code = match e {
            AuthError::Missing => "unauthorized",
            AuthError::Invalid => "invalid_token",
            AuthError::Forbidden(_) => "forbidden",
        };
        let mut error = ApiError::new(status, code, e.to_string());
        error.challenge = Some(e.challenge());
        error
    }
}

/// What is wrong with serving on `bind` with `auth`, if anything: a non-loopback address with authentication
/// off lets anyone who reaches it read every key and, through the operations routes, drop the cache. Said at
/// start-up (a warning) and by `kck check` (a WARN).
pub fn exposure_warning(
    bind: std::net::SocketAddr,
    auth: &crate::auth::AuthConfig,
) -> Option<String> {
    if auth.jwt.is_some() || bind.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "http.bind is {bind}, not a loopback address, and authentication is off: anyone who can reach it reads \
         every cached key and may drop the cache (POST /invalidate). Configure auth.jwt, or bind 127.0.0.1 and \
         put a proxy that authenticates in front"
    ))
}

/// `400 too_many_keys` when `asked` distinct keys exceed `max` (the setting `setting`) for one `per`.
fn within_key_limit(asked: usize, max: usize, per: &str, setting: &str) -> Result<(), ApiError> {
    if asked <= max {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        "too_many_keys",
        format!("{asked} distinct keys asked for; at most {max} per {per} ({setting})"),
    ))
}

fn internal(error: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(%error, "Request failed.");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see kck's log",
    )
}

/// `Retry-After` of a `503 not_visible` answer, in seconds.
const NOT_VISIBLE_RETRY_AFTER_S: u32 = 1;

fn prime_error(e: RefreshError) -> ApiError {
    // Postgres's own text stays in kck's log (without the values it quotes: `pg::error_text`): the answer
    // gives the SQLSTATE and says what happened in kck's words.
    match e {
        RefreshError::Query { ref primer, ref source } => {
            tracing::error!(error = %crate::report::Chain(&e), "A primer's query failed in Postgres; answered 502 primer_failed.");
            let code = source.code().map(|c| c.code().to_owned());
            let error = ApiError::new(
                StatusCode::BAD_GATEWAY,
                "primer_failed",
                format!(
                    "the query of primer '{primer}' failed in Postgres{}; details are in kck's log",
                    code.as_ref().map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default()
                ),
            );
            match code {
                Some(c) => error.with("sqlstate", c),
                None => error,
            }
        }
        RefreshError::BadKeyValue { ref primer, ref source } => {
            tracing::info!(error = %crate::report::Chain(&e), "Postgres refused a key's values; answered 400 bad_key_parameter, the key is not cached.");
            let code = source.code().map_or("22000", |c| c.code()).to_owned();
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_key_parameter",
                format!(
                    "Postgres refused this key's values for primer '{primer}' (SQLSTATE {code}: a value out of \
                     range or not valid input for its type); the key is not cached"
                ),
            )
            .with("sqlstate", code)
        }
        // The miss needs a change this process cannot prove visible yet: no replication process is
        // publishing the visible watermark (an http-only process with none running), or it is far behind.
        // Nothing is wrong with the request; it can succeed once the stream catches up.
        RefreshError::NotVisible { needed, visible } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_visible",
            format!(
                "the value cannot be computed yet: it must reflect the change at {needed}, but kck has proven \
                 changes visible only up to {visible} (is a replication process running and keeping up?)"
            ),
        )
        .with("needed_lsn", needed.to_string())
        .with("visible_lsn", visible.to_string())
        .retry_after(NOT_VISIBLE_RETRY_AFTER_S),
        // Shed: a flood of misses must not become a flood of queries (nor an unbounded line of them).
        e @ RefreshError::TooManyMisses { .. } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_misses", e.to_string())
                .retry_after(1)
        }
        e => internal(&crate::report::Chain(&e)),
    }
}

fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_query",
        format!("bad query string: {}", e.body_text()),
    )
}

fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than the limit of {limit} bytes (http.body_limit)"),
        )
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_body", e.body_text())
    }
}

/// `415` unless the request says its (non-empty) body is JSON.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| {
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ))
    }
}

/// The last layer: an error response whose body is not JSON (from a layer or axum itself) gets the
/// stable shape; its headers (`Allow`, `WWW-Authenticate`, ...) are kept.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    let (parts, _) = response.into_parts();
    if status.is_server_error() {
        tracing::error!(%status, "Answered {status} from a layer that gave no cause (not one of kck's handlers).");
    }
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => "timeout",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = status.canonical_reason().unwrap_or("error").to_owned();
    let mut fixed = ApiError::new(status, code, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().append(name.clone(), value.clone());
        }
    }
    fixed
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    request: Duration,
    /// Added for a request that asks to wait (`min_lsn`, `wait`, `wait_change`).
    wait: Duration,
}

/// Answers `504 timeout` when a request takes longer than `http.request_timeout` (plus `http.max_wait`
/// if it asked to wait). The handler is dropped; an update already running completes on its own.
async fn request_timeout(State(t): State<Timeouts>, request: Request, next: Next) -> Response {
    let waits = request.uri().query().is_some_and(|q| {
        q.split('&').any(|pair| {
            matches!(
                pair.split('=').next(),
                Some("min_lsn" | "wait" | "wait_change")
            )
        })
    });
    let limit = if waits { t.request + t.wait } else { t.request };
    let update = request.method() == Method::POST && request.uri().path().starts_with("/update/");
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let mut message = format!(
                "the request took longer than {} (http.request_timeout)",
                humantime::format_duration(limit)
            );
            if update {
                // The transaction runs in its own task: it is not cut off, so its outcome is unknown here.
                message.push_str(
                    "; the update goes on in the background and may still commit: check before retrying it",
                );
            }
            tracing::warn!(method = %method, path = %path, "Answered 504 timeout: {message}.");
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message).into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Fetch

/// The query string of `GET /fetch/{key}`. Unknown parameters are refused: a misspelt `min_lsn` must not
/// silently skip the wait.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchQuery {
    min_lsn: Option<String>,
    timeout: Option<String>,
    wait_change: Option<String>,
}

/// The query string of `POST /fetch`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchManyQuery {
    min_lsn: Option<String>,
    timeout: Option<String>,
}

/// The query string of `POST /update/{name}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateQuery {
    wait: Option<String>,
    timeout: Option<String>,
}

impl AppState {
    /// When a wait asked for with `timeout` (or the default) ends.
    fn deadline(&self, timeout: Option<&str>) -> Result<(Instant, Duration), ApiError> {
        let wait = match timeout {
            None => self.limits.wait_timeout,
            Some(t) => humantime::parse_duration(t.trim()).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_timeout",
                    format!("timeout '{t}' is not a duration ({e}); write e.g. 2s or 500ms"),
                )
            })?,
        };
        if wait > self.limits.max_wait {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_timeout",
                format!(
                    "timeout {} is longer than the maximum of {} (http.max_wait)",
                    humantime::format_duration(wait),
                    humantime::format_duration(self.limits.max_wait)
                ),
            ));
        }
        Ok((Instant::now() + wait, wait))
    }

    /// 403 unless the principal may read `key`.
    fn check_key_access(
        &self,
        principal: &Principal,
        key: &Key,
        text: &str,
    ) -> Result<(), AuthError> {
        let primer = &self.catalog.primers[key.primer];
        let Some(access) = &primer.access else {
            return Ok(());
        };
        let equals = |i: usize, claim: &serde_json::Value| {
            let (Some(param), Some(text)) = (primer.template.params.get(i), claim_text(claim))
            else {
                return false;
            };
            param.ty.parse_value(&text).as_ref() == key.params.get(i)
        };
        if access.allows(principal, &equals) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!("'{text}'")))
        }
    }

    /// The entry for `key`: stored, or computed now (a miss). `(entry, "hit" | "miss")`.
    /// The entry for `key`: a hit, or computed (a miss). An expired (or invalidated) entry is never a
    /// hit: within its primer's `stale_while_revalidate` it is answered as `stale` while it is recomputed
    /// in the background, else it is computed now like a miss.
    async fn lookup(&self, key: &Key, text: &str) -> Result<(Entry, &'static str), ApiError> {
        self.lookup_within(key, text, None).await
    }

    /// [`AppState::lookup`], a miss taking one of `budget`'s (`None`: no budget).
    async fn lookup_within(
        &self,
        key: &Key,
        text: &str,
        budget: Option<&MissBudget>,
    ) -> Result<(Entry, &'static str), ApiError> {
        if let Some(refresher) = &self.refresher {
            refresher.touch(text);
        }
        let mut expired = false;
        if let Some(entry) = self
            .store
            .get(text)
            .await
            .map_err(|e| internal(&crate::report::Chain(&e)))?
        {
            let now = crate::clock::now_ms();
            let Some(expires) = entry.expires_at_ms.filter(|at| *at <= now) else {
                return Ok((entry, "hit"));
            };
            expired = true;
            if let Some(refresher) = &self.refresher {
                let grace = self.catalog.primers[key.primer]
                    .policy
                    .stale_while_revalidate;
                let servable =
                    grace.is_some_and(|g| now < expires.saturating_add(g.as_millis() as i64));
                if servable || self.primer.is_none() {
                    refresher.revalidate(key.clone(), text.to_owned());
                }
                if servable {
                    return Ok((entry, "stale"));
                }
            }
        }
        if expired && self.primer.is_none() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_cached",
                format!(
                    "'{text}' has expired and is being recomputed (prime_on_cache_miss is off)"
                ),
            ));
        }
        Ok((self.prime_within(key, text, budget).await?, "miss"))
    }

    async fn prime(&self, key: &Key, text: &str) -> Result<Entry, ApiError> {
        self.prime_within(key, text, None).await
    }

    async fn prime_within(
        &self,
        key: &Key,
        text: &str,
        budget: Option<&MissBudget>,
    ) -> Result<Entry, ApiError> {
        let Some(refresher) = &self.primer else {
            return Err(not_cached(text));
        };
        if let Some(budget) = budget
            && !budget.take()
        {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_misses",
                format!(
                    "this request already computed {} misses (http.max_batch_misses): '{text}' was not \
                     computed; ask for it again",
                    budget.limit
                ),
            )
            .retry_after(1));
        }
        refresher.prime(key, text).await.map_err(prime_error)
    }

    /// The entry for `key` once it reflects every change up to `min`: its own LSN is at least `min`, or
    /// the whole cache has caught up with `min` (an entry nothing changed keeps its older LSN).
    async fn lookup_fresh(
        &self,
        key: &Key,
        text: &str,
        min: Lsn,
        deadline: Instant,
        timeout: Duration,
        budget: Option<&MissBudget>,
    ) -> Result<(Entry, &'static str), ApiError> {
        let waited = self
            .hub
            .wait_for(Some(text), deadline, &self.shutdown, move || async move {
                // Caught up first, then the read: a refresh that finished before the check is in the read.
                let caught_up = self
                    .progress
                    .caught_up(min)
                    .await
                    .map_err(|e| internal(&crate::report::Chain(&e)))?;
                match self
                    .store
                    .get(text)
                    .await
                    .map_err(|e| internal(&crate::report::Chain(&e)))?
                {
                    Some(entry) if caught_up || entry.lsn >= min => Ok(Some((entry, "hit"))),
                    Some(_) => Ok(None),
                    // A miss is computed once the stream has decoded `min`: priming then sees it.
                    None if self.progress.decoded() >= min => {
                        let entry = self.prime_within(key, text, budget).await?;
                        let fresh = entry.lsn >= min
                            || self
                                .progress
                                .caught_up(min)
                                .await
                                .map_err(|e| internal(&crate::report::Chain(&e)))?;
                        Ok(fresh.then_some((entry, "miss")))
                    }
                    None if self.primer.is_none() => Err(not_cached(text)),
                    None => Ok(None),
                }
            })
            .await?;
        match waited {
            Waited::Done(found) => Ok(found),
            Waited::TimedOut => {
                let entry_lsn = self.store.get(text).await.ok().flatten().map(|e| e.lsn);
                Err(self.not_fresh(text, min, entry_lsn, timeout).await)
            }
            Waited::ShuttingDown => Err(shutting_down()),
        }
    }

    async fn not_fresh(
        &self,
        text: &str,
        min: Lsn,
        entry_lsn: Option<Lsn>,
        timeout: Duration,
    ) -> ApiError {
        let lag = self.progress.lag().await;
        let behind = min.0.saturating_sub(lag.received.0);
        let stream = if behind > 0 {
            format!(
                "kck's stream has received up to {} ({behind} bytes behind)",
                lag.received
            )
        } else {
            format!(
                "kck's stream has received it ({}); refreshes up to it are still queued (oldest owed change: {})",
                lag.received,
                lag.pending_floor
                    .map_or_else(|| "none".to_owned(), |f| f.to_string())
            )
        };
        let message = format!(
            "'{text}' does not reflect {min} after {}: {stream}",
            humantime::format_duration(timeout)
        );
        tracing::warn!(key = %text, min_lsn = %min, "Answered 504 not_fresh: {message}.");
        let mut error = ApiError::new(StatusCode::GATEWAY_TIMEOUT, "not_fresh", message)
            .with("key", text)
            .with("min_lsn", min.to_string())
            .with(
                "entry_lsn",
                entry_lsn.map_or(serde_json::Value::Null, |l| l.to_string().into()),
            );
        error.details.extend(lag.to_json(min));
        error
    }

    /// The entry for `key` once its version differs from `etag` (`None` on timeout or shutdown).
    async fn wait_changed(
        &self,
        key: &Key,
        text: &str,
        etag: &str,
        deadline: Instant,
    ) -> Result<Option<(Entry, &'static str)>, ApiError> {
        let waited = self
            .hub
            .wait_for(Some(text), deadline, &self.shutdown, move || async move {
                match self
                    .store
                    .get(text)
                    .await
                    .map_err(|e| internal(&crate::report::Chain(&e)))?
                {
                    Some(entry) if etag_of(&entry) != etag => {
                        Ok::<_, ApiError>(Some((entry, "hit")))
                    }
                    Some(_) => Ok(None),
                    None => Ok(Some((self.prime(key, text).await?, "miss"))),
                }
            })
            .await?;
        Ok(match waited {
            Waited::Done(found) => Some(found),
            Waited::TimedOut | Waited::ShuttingDown => None,
        })
    }
}

/// The misses one request may still compute (`http.max_batch_misses`): one `POST /fetch` of a thousand
/// absent ids must not run a thousand primer queries.
struct MissBudget {
    left: std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl MissBudget {
    fn new(limit: usize) -> MissBudget {
        MissBudget {
            left: std::sync::atomic::AtomicUsize::new(limit),
            limit,
        }
    }

    /// Takes one miss; false when none is left.
    fn take(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn not_cached(text: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_cached",
        format!("'{text}' is not in the cache (prime_on_cache_miss is off)"),
    )
}

fn shutting_down() -> ApiError {
    tracing::info!("Answered 503 shutting_down: a request was waiting when kck began to stop.");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "kck is stopping; retry on another instance or after it restarts",
    )
}

fn parse_min_lsn(text: Option<&str>) -> Result<Option<Lsn>, ApiError> {
    text.map(|t| {
        t.trim().parse::<Lsn>().map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_min_lsn",
                format!("min_lsn: {e}"),
            )
        })
    })
    .transpose()
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

async fn fetch(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<FetchQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    let key = state.catalog.parse_key(key_text(&uri)?)?;
    let text = state.catalog.render(&key);
    state.check_key_access(&principal, &key, &text)?;
    let primer = &state.catalog.primers[key.primer];
    let min = parse_min_lsn(query.min_lsn.as_deref())?;
    if min.is_none() && query.wait_change.is_none() {
        if query.timeout.is_some() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                "timeout applies to min_lsn or wait_change; give one of them",
            ));
        }
        let (entry, cache) = state.lookup(&key, &text).await?;
        return Ok(entry_response(entry, cache, primer, &headers));
    }
    let (deadline, timeout) = state.deadline(query.timeout.as_deref())?;
    if let (Some(_), Some(_)) = (min, &query.wait_change) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "give min_lsn or wait_change, not both",
        ));
    }
    if let Some(min) = min {
        let (entry, cache) = state
            .lookup_fresh(&key, &text, min, deadline, timeout, None)
            .await?;
        return Ok(entry_response(entry, cache, primer, &headers));
    }
    let given = query
        .wait_change
        .as_deref()
        .map(strip_etag)
        .unwrap_or_default();
    let given = format!("\"{given}\"");
    match state.wait_changed(&key, &text, &given, deadline).await? {
        Some((entry, cache)) => Ok(entry_response(entry, cache, primer, &HeaderMap::new())),
        None => Ok(not_modified(&given, primer)),
    }
}

/// An ETag without `W/` and quotes.
fn strip_etag(tag: &str) -> &str {
    let tag = tag.trim();
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    tag.trim_matches('"')
}

/// The entry's version: a hash of its bytes (XXH3, 64 bits), a strong validator. A recomputation that
/// gives the same JSON keeps its tag, so `If-None-Match` still matches and `wait_change` does not wake;
/// every kck process (and every version of kck) gives the same tag for the same bytes.
pub fn etag_of(entry: &Entry) -> String {
    format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(&entry.value))
}

/// Whether `If-None-Match` (a list of tags, or `*`) matches `etag` (weak comparison, as RFC 9110 asks).
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    let bare = strip_etag(etag);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == "*" || strip_etag(tag) == bare)
}

fn cache_headers(headers: &mut HeaderMap, etag: &str, primer: &Primer) {
    if let Ok(v) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, v);
    }
    headers.insert(header::CACHE_CONTROL, cache_control(primer));
}

/// The primer's `Cache-Control` (checked when the config was read).
fn cache_control(primer: &Primer) -> HeaderValue {
    match primer.cache_control.as_deref() {
        None => HeaderValue::from_static(DEFAULT_CACHE_CONTROL),
        Some(c) => HeaderValue::from_str(c)
            .unwrap_or_else(|_| HeaderValue::from_static(DEFAULT_CACHE_CONTROL)),
    }
}

fn not_modified(etag: &str, primer: &Primer) -> Response {
    let mut headers = HeaderMap::with_capacity(2);
    cache_headers(&mut headers, etag, primer);
    (StatusCode::NOT_MODIFIED, headers).into_response()
}

fn computed_at(entry: &Entry) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(entry.computed_at_ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

/// The answer for a cached entry. On the path of every cache hit: it builds the response's header map
/// in place (no second map merged into it) and formats only what varies per entry.
fn entry_response(
    entry: Entry,
    cache: &'static str,
    primer: &Primer,
    request: &HeaderMap,
) -> Response {
    let etag = etag_of(&entry);
    let lsn = entry.lsn.to_string();
    let at = computed_at(&entry);
    let not_modified = none_match(request, &etag);
    let mut response = if not_modified {
        let mut r = Response::new(axum::body::Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(axum::body::Body::from(entry.value))
    };
    let headers = response.headers_mut();
    headers.reserve(8);
    cache_headers(headers, &etag, primer);
    if let Ok(v) = HeaderValue::from_str(&lsn) {
        headers.insert(KCK_LSN, v);
    }
    if let Ok(v) = HeaderValue::from_str(&at) {
        headers.insert(KCK_COMPUTED_AT, v);
    }
    headers.insert(KCK_CACHE, HeaderValue::from_static(cache));
    if cache == "stale" {
        headers.insert(KCK_STALE, HeaderValue::from_static("true"));
    }
    if !not_modified {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    response
}

const KCK_LSN: HeaderName = HeaderName::from_static("kck-lsn");
const KCK_COMPUTED_AT: HeaderName = HeaderName::from_static("kck-computed-at");
const KCK_CACHE: HeaderName = HeaderName::from_static("kck-cache");
const KCK_STALE: HeaderName = HeaderName::from_static("kck-stale");

// ---------------------------------------------------------------------------------------------------
// Batch fetch

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchManyRequest {
    keys: Vec<String>,
}

/// One key's answer in `POST /fetch`. Written by hand ([`FetchManyItem::write_json`]) rather than through
/// `serde_json::Value`, so that the cached value is spliced in as the bytes the primer stored: a `Value`
/// would round numbers to f64 and sort object keys.
#[derive(Debug)]
enum FetchManyItem {
    Entry {
        /// The stored JSON, exactly as stored.
        value: Bytes,
        lsn: String,
        etag: String,
        computed_at: String,
        cache: &'static str,
    },
    Error {
        status: u16,
        /// The `error` object of the [`ApiError`].
        error: serde_json::Value,
    },
}

impl FetchManyItem {
    fn error(e: ApiError) -> FetchManyItem {
        let status = e.status.as_u16();
        let error = e.body().get("error").cloned().unwrap_or_default();
        FetchManyItem::Error { status, error }
    }

    fn entry(entry: Entry, cache: &'static str) -> FetchManyItem {
        // Checked without building anything (a borrowed `RawValue`), so that one broken value cannot make
        // the whole answer invalid JSON.
        if serde_json::from_slice::<&RawValue>(&entry.value).is_err() {
            return FetchManyItem::error(internal(&"a cached value is not valid JSON"));
        }
        FetchManyItem::Entry {
            etag: etag_of(&entry),
            lsn: entry.lsn.to_string(),
            computed_at: computed_at(&entry),
            cache,
            value: entry.value,
        }
    }

    /// `{"status": 200, "value": <stored bytes>, "lsn", "etag", "computed_at", "cache"}` or
    /// `{"status": 4xx, "error": {...}}`.
    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            FetchManyItem::Entry {
                value,
                lsn,
                etag,
                computed_at,
                cache,
            } => {
                out.extend_from_slice(b"{\"status\":200,\"value\":");
                out.extend_from_slice(value);
                for (name, text) in [
                    ("lsn", lsn.as_str()),
                    ("etag", etag.as_str()),
                    ("computed_at", computed_at.as_str()),
                    ("cache", cache),
                ] {
                    out.extend_from_slice(b",\"");
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b"\":");
                    write_json_string(out, text);
                }
                out.push(b'}');
            }
            FetchManyItem::Error { status, error } => {
                out.extend_from_slice(format!("{{\"status\":{status},\"error\":").as_bytes());
                // Writing a `Value` into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, error);
                out.push(b'}');
            }
        }
    }
}

/// `text` as a JSON string.
fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// The body of `POST /fetch`: `{"results": {key: item, ...}}`, values spliced in as stored.
fn fetch_many_body(results: &BTreeMap<String, FetchManyItem>) -> Vec<u8> {
    let size: usize = results
        .values()
        .map(|item| match item {
            FetchManyItem::Entry { value, .. } => value.len() + 160,
            FetchManyItem::Error { .. } => 200,
        })
        .sum();
    let mut out = Vec::with_capacity(16 + size);
    out.extend_from_slice(b"{\"results\":{");
    for (i, (key, item)) in results.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_string(&mut out, key);
        out.push(b':');
        item.write_json(&mut out);
    }
    out.extend_from_slice(b"}}");
    out
}

/// How many keys of one `POST /fetch` are looked up at once.
const BATCH_CONCURRENCY: usize = 16;

async fn fetch_many(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    query: Result<Query<FetchManyQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    let body = body.map_err(|e| body_error(e, state.limits.body_limit))?;
    require_json(&headers)?;
    let request: FetchManyRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the body must be {{\"keys\": [\"key\", ...]}}: {e}"),
        )
    })?;
    let mut keys = request.keys;
    keys.sort();
    keys.dedup();
    within_key_limit(
        keys.len(),
        state.limits.max_batch_keys,
        "request",
        "http.max_batch_keys",
    )?;
    let min = parse_min_lsn(query.min_lsn.as_deref())?;
    let wait = match (min, &query.timeout) {
        (Some(_), timeout) => Some(state.deadline(timeout.as_deref())?),
        (None, Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                "timeout applies to min_lsn; give it too",
            ));
        }
        (None, None) => None,
    };
    let state = &state;
    let principal = &principal;
    let budget = &MissBudget::new(state.limits.max_batch_misses);
    let results: BTreeMap<String, FetchManyItem> = futures_util::stream::iter(keys)
        .map(|asked| async move {
            let item = async {
                let key = state.catalog.parse_key(&asked)?;
                let text = state.catalog.render(&key);
                state.check_key_access(principal, &key, &text)?;
                let (entry, cache) = match (min, wait) {
                    (Some(min), Some((deadline, timeout))) => {
                        state
                            .lookup_fresh(&key, &text, min, deadline, timeout, Some(budget))
                            .await?
                    }
                    _ => state.lookup_within(&key, &text, Some(budget)).await?,
                };
                Ok::<_, ApiError>(FetchManyItem::entry(entry, cache))
            }
            .await
            .unwrap_or_else(FetchManyItem::error);
            (asked, item)
        })
        .buffer_unordered(BATCH_CONCURRENCY)
        .collect()
        .await;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        fetch_many_body(&results),
    )
        .into_response())
}

// ---------------------------------------------------------------------------------------------------
// Update

fn arg_error(e: ArgError) -> ApiError {
    let code = match e {
        ArgError::NotAnObject => "bad_json",
        ArgError::Missing { .. } => "missing_parameter",
        ArgError::Unknown { .. } => "unknown_parameter",
        ArgError::BadValue { .. } | ArgError::Null { .. } => "bad_parameter",
    };
    let param = e.param().map(str::to_owned);
    let error = ApiError::new(StatusCode::BAD_REQUEST, code, e.to_string());
    match param {
        Some(p) => error.with("parameter", p),
        None => error,
    }
}

fn update_error(e: UpdateError) -> ApiError {
    let statement = match &e {
        UpdateError::Statement { statement, .. } => Some(*statement),
        _ => None,
    };
    let Some(db) = e.db_error() else {
        return match e {
            UpdateError::Commit { .. } => {
                tracing::error!(error = %crate::report::Chain(&e), "The connection failed during COMMIT.");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "commit_unknown",
                    "the database connection failed during COMMIT: the write may or may not have been \
                     committed; check before retrying",
                )
            }
            UpdateError::Pool { .. }
            | UpdateError::Statement { .. }
            | UpdateError::Begin { .. } => {
                tracing::warn!(error = %crate::report::Chain(&e), "Update failed: no usable database connection.");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "no usable database connection for updates; nothing was written, retry later",
                )
            }
            UpdateError::Task(_) => internal(&crate::report::Chain(&e)),
        };
    };
    let code = db.code().code().to_owned();
    let with_context = |error: ApiError| {
        let error = error.with("sqlstate", code.clone());
        match statement {
            Some(n) => error.with("statement", n),
            None => error,
        }
    };
    let class = &code[..code.len().min(2)];
    let error = match (class, code.as_str()) {
        ("23", _) => {
            let constraint = db.constraint().map(str::to_owned);
            let error = ApiError::new(
                StatusCode::CONFLICT,
                "constraint_violation",
                format!("{}; nothing was written", db.message()),
            );
            match constraint {
                Some(c) => error.with("constraint", c),
                None => error,
            }
        }
        // Postgres's message quotes the value it refused: not echoed (the SQLSTATE says which kind).
        ("22", _) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_parameter_value",
            format!(
                "Postgres refused a value (SQLSTATE {code}: out of range, or not valid input for its \
                 type); nothing was written"
            ),
        ),
        ("P0", _) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "rejected",
            format!("{}; nothing was written", db.message()),
        ),
        ("40", _) => ApiError::new(
            StatusCode::CONFLICT,
            "transaction_conflict",
            "the transaction conflicted with concurrent ones and was rolled back after several attempts; \
             nothing was written, retry",
        ),
        (_, "57014") => {
            tracing::warn!(error = %crate::report::Chain(&e), "Answered 504 timeout: an updater ran longer than http.request_timeout and was rolled back.");
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "the update ran longer than http.request_timeout and was rolled back; nothing was written",
            )
        }
        ("08" | "53" | "57", _) => {
            tracing::warn!(error = %crate::report::Chain(&e), "Update failed: the database is unavailable.");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database is unavailable; nothing was written, retry later",
            )
        }
        _ => {
            tracing::error!(error = %crate::report::Chain(&e), "An updater failed in Postgres.");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "updater_failed",
                format!(
                    "the updater failed in Postgres (SQLSTATE {code}); nothing was written; details are in \
                     kck's log"
                ),
            )
        }
    };
    with_context(error)
}

/// 403 unless the principal may run `updater` with these arguments.
fn check_update_access(
    updater: &Updater,
    principal: &Principal,
    args: &[Option<String>],
) -> Result<(), AuthError> {
    let Some(access) = &updater.access else {
        return Ok(());
    };
    let equals = |i: usize, claim: &serde_json::Value| {
        let (Some(param), Some(Some(arg)), Some(text)) =
            (updater.params.get(i), args.get(i), claim_text(claim))
        else {
            return false;
        };
        match param.ty {
            ValueType::Int => text.parse::<i64>().ok().map(|n| n.to_string()).as_ref() == Some(arg),
            ValueType::Uuid => {
                crate::primer::ParamType::Uuid.parse_value(&text)
                    == crate::primer::ParamType::Uuid.parse_value(arg)
            }
            _ => &text == arg,
        }
    };
    if access.allows(principal, &equals) {
        Ok(())
    } else {
        Err(AuthError::Forbidden(format!("updater '{}'", updater.name)))
    }
}

async fn update(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<UpdateQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(name) =
        name.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_path", e.body_text()))?;
    let Query(query) = query.map_err(bad_query)?;
    let unknown = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_updater",
            format!("there is no updater named '{name}'"),
        )
    };
    let updates = state.updates.as_ref().ok_or_else(unknown)?;
    let updater = updates.get(&name).ok_or_else(unknown)?.clone();
    let wait = match query.wait.as_deref() {
        None => None,
        Some("fresh") => Some(state.deadline(query.timeout.as_deref())?),
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("wait={other}: the only kind of wait is wait=fresh"),
            ));
        }
    };
    if wait.is_none() && query.timeout.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "timeout applies to wait=fresh; give it too",
        ));
    }
    let body = body.map_err(|e| body_error(e, state.limits.body_limit))?;
    if !body.trim_ascii().is_empty() {
        require_json(&headers)?;
    }
    let args = parse_args(&updater, &body).map_err(arg_error)?;
    check_update_access(&updater, &principal, &args)?;
    let outcome = updates
        .run(updater.clone(), args)
        .await
        .map_err(update_error)?;
    let mut answer = serde_json::Map::new();
    answer.insert("rows".into(), outcome.rows.clone().into());
    answer.insert(
        "lsn".into(),
        outcome
            .lsn
            .map_or(serde_json::Value::Null, |l| l.to_string().into()),
    );
    let Some((deadline, timeout)) = wait else {
        return Ok(axum::Json(answer).into_response());
    };
    let committed = |error: ApiError| {
        let mut error = error
            .with("committed", true)
            .with("rows", outcome.rows.clone());
        error
            .details
            .insert("lsn".into(), answer.get("lsn").cloned().unwrap_or_default());
        error
    };
    let Some(lsn) = outcome.lsn else {
        return Err(committed(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "not_fresh",
            "the write was committed (do not retry it), but kck could not read its WAL position, so it \
             cannot wait for the cache to reflect it",
        )));
    };
    let progress = &state.progress;
    let waited = state
        .hub
        .wait_for(None, deadline, &state.shutdown, move || async move {
            progress
                .caught_up(lsn)
                .await
                .map(|done| done.then_some(()))
                .map_err(|e| internal(&crate::report::Chain(&e)))
        })
        .await?;
    match waited {
        Waited::Done(()) => {
            answer.insert("fresh".into(), true.into());
            Ok(axum::Json(answer).into_response())
        }
        Waited::TimedOut => {
            // The write is committed: answer 202 (accepted, not yet reflected), never an error status a
            // client might retry the write on.
            let lag = progress.lag().await;
            let mut not_fresh = serde_json::Map::new();
            not_fresh.insert(
                "message".into(),
                format!(
                    "the write was committed at {lsn} (do not retry it), but after {} the cache does not \
                     reflect it yet: kck's stream has received up to {} and the oldest change still \
                     queued for refresh is {}",
                    humantime::format_duration(timeout),
                    lag.received,
                    lag.pending_floor
                        .map_or_else(|| "none".to_owned(), |f| f.to_string())
                )
                .into(),
            );
            not_fresh.extend(lag.to_json(lsn));
            answer.insert("fresh".into(), false.into());
            answer.insert("not_fresh".into(), not_fresh.into());
            Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response())
        }
        Waited::ShuttingDown => Err(committed(shutting_down())),
    }
}

// ---------------------------------------------------------------------------------------------------
// OpenAPI

async fn openapi() -> Response {
    static DOCUMENT: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| {
        Bytes::from(serde_json::to_vec_pretty(&crate::openapi::document()).unwrap_or_default())
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        DOCUMENT.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_hosts_match_by_name_or_name_and_port() {
        let allowed = [
            "localhost".to_string(),
            "kck.internal:8080".to_string(),
            "::1".to_string(),
        ];
        assert!(host_allowed(&allowed, "localhost"));
        assert!(host_allowed(&allowed, "LOCALHOST:9000"));
        assert!(host_allowed(&allowed, "kck.internal:8080"));
        assert!(!host_allowed(&allowed, "kck.internal:8081"));
        assert!(!host_allowed(&allowed, "kck.internal"));
        assert!(host_allowed(&allowed, "[::1]:8080"));
        assert!(!host_allowed(&allowed, "localhost.evil.example"));
        assert!(!host_allowed(&allowed, "evil.example:localhost"));
        assert!(!host_allowed(&allowed, ""));
    }

    /// Only a non-loopback bind with authentication off is an exposure worth a warning.
    #[test]
    fn serving_every_key_to_the_network_is_warned_about() {
        let off = crate::auth::AuthConfig::default();
        let bind = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let why = exposure_warning(bind("0.0.0.0:8080"), &off).unwrap();
        assert!(
            why.contains("auth.jwt") && why.contains("0.0.0.0:8080"),
            "{why}"
        );
        assert!(exposure_warning(bind("192.168.1.5:8080"), &off).is_some());
        assert!(exposure_warning(bind("127.0.0.1:8080"), &off).is_none());
        assert!(exposure_warning(bind("[::1]:8080"), &off).is_none());
    }

    /// A miss whose change is not visible yet is a 503 the client can retry (its own code, `Retry-After`,
    /// both LSNs), not a 500.
    #[tokio::test]
    async fn a_change_not_visible_yet_is_a_retryable_503() {
        let error = prime_error(RefreshError::NotVisible {
            needed: Lsn(0x16_0000_0010),
            visible: Lsn(0x16_0000_0000),
        });
        assert_eq!(error.code, "not_visible");
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "not_visible");
        assert_eq!(body["error"]["needed_lsn"], "16/10");
        assert_eq!(body["error"]["visible_lsn"], "16/0");
    }

    /// The whole router in process (axum's `oneshot`): a hit is answered from the store with its ETag and
    /// conditional 304, a miss without priming is a JSON 404, an unknown primer a JSON 400, no Postgres.
    #[tokio::test]
    async fn the_router_answers_from_the_store_in_process() {
        use axum::body::Body;
        use axum::http::Request;
        use tower::ServiceExt;

        const YAML: &str = r#"
source: { url: "postgres://u@localhost/db" }
prime_on_cache_miss: false
primers:
  - name: user
    key: "user/{id:int}"
    shape: row
    query: "SELECT id, name FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
"#;
        let config =
            crate::config::Config::from_yaml_str(YAML, std::path::Path::new("t.yaml"), |_| None)
                .expect("config");
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> =
            Arc::new(crate::store::embedded::EmbeddedStore::open(dir.path()).expect("store"));
        let value = Bytes::from_static(br#"{"id":1,"name":"ada"}"#);
        store
            .store_result(
                "user",
                "user/1",
                Entry {
                    value: value.clone(),
                    lsn: "0/16B3748".parse().expect("lsn"),
                    computed_at_ms: crate::clock::now_ms(),
                    expires_at_ms: None,
                },
            )
            .await
            .expect("stored");
        let clock = Arc::new(crate::visibility::VisibilityClock::new(Lsn::default(), 16));
        let state = AppState {
            store: store.clone(),
            catalog: Arc::new(config.catalog.clone()),
            primer: None,
            hub: Arc::default(),
            progress: Progress::new(store.clone(), Arc::default(), clock, false),
            updates: None,
            auth: None,
            limits: HttpConfig::default(),
            shutdown: watch::channel(false).1,
            refresher: None,
        };
        let router = app(state, Router::new());
        let get = |uri: &str, etag: Option<&str>| {
            let mut request = Request::get(uri);
            if let Some(etag) = etag {
                request = request.header(header::IF_NONE_MATCH, etag);
            }
            router
                .clone()
                .oneshot(request.body(Body::empty()).expect("request"))
        };

        let hit = get("/fetch/user/1", None).await.expect("answer");
        assert_eq!(hit.status(), StatusCode::OK);
        let etag = hit
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .expect("an ETag");
        let body = axum::body::to_bytes(hit.into_body(), 1 << 20)
            .await
            .expect("body");
        assert_eq!(body, value);

        let not_modified = get("/fetch/user/1", Some(&etag)).await.expect("answer");
        assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);

        for (uri, status) in [
            ("/fetch/user/2", StatusCode::NOT_FOUND),
            ("/fetch/nobody/1", StatusCode::BAD_REQUEST),
            ("/fetch/user/x", StatusCode::BAD_REQUEST),
        ] {
            let answer = get(uri, None).await.expect("answer");
            assert_eq!(answer.status(), status, "{uri}");
            let body = axum::body::to_bytes(answer.into_body(), 1 << 20)
                .await
                .expect("body");
            let json: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error body");
            assert!(json["error"]["code"].is_string(), "{uri}: {json}");
        }
        assert_eq!(
            get("/healthz", None).await.expect("answer").status(),
            StatusCode::OK
        );

        // Issue 16: the batch answer splices the stored bytes in, digits and key order kept.
        let odd = Bytes::from_static(
            br#"{"name":"b","id":9007199254740993,"r":4.6666666666666666666666667}"#,
        );
        store
            .store_result(
                "user",
                "user/3",
                Entry {
                    value: odd.clone(),
                    lsn: "0/16B3748".parse().expect("lsn"),
                    computed_at_ms: crate::clock::now_ms(),
                    expires_at_ms: None,
                },
            )
            .await
            .expect("stored");
        let single = get("/fetch/user/3", None).await.expect("answer");
        let etag = single
            .headers()
            .get(header::ETAG)
            .cloned()
            .expect("an ETag");
        let request = Request::post("/fetch")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"keys": ["user/3", "user/x"]}"#))
            .expect("request");
        let batch = router.clone().oneshot(request).await.expect("answer");
        assert_eq!(batch.status(), StatusCode::OK);
        let body = axum::body::to_bytes(batch.into_body(), 1 << 20)
            .await
            .expect("body");
        let text = std::str::from_utf8(&body).expect("UTF-8");
        let prefix = format!(
            r#"{{"results":{{"user/3":{{"status":200,"value":{},"lsn":"0/16B3748","etag":{:?},"#,
            std::str::from_utf8(&odd).expect("UTF-8"),
            etag.to_str().expect("ASCII"),
        );
        assert!(
            text.starts_with(&prefix),
            "{text}\nnot starting with\n{prefix}"
        );
        let json: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
        assert_eq!(
            json["results"]["user/x"]["error"]["code"],
            "bad_key_parameter"
        );
    }

    #[test]
    fn api_paths_are_told_from_the_others() {
        for api in [
            "/fetch/user/1",
            "/fetch/a%2Fb/c",
            "/fetch",
            "/update/x",
            "/healthz",
            "/openapi.json",
        ] {
            assert!(is_api_path(api), "{api}");
        }
        for other in [
            "/",
            "/status",
            "/metrics",
            "/fetch/",
            "/update/",
            "/update/x/y",
            "/cache/entry/user/1",
            "/fetchx",
        ] {
            assert!(!is_api_path(other), "{other}");
        }
        assert_eq!(
            routes().listed().first(),
            Some(&("/fetch/{key}".to_string(), Method::GET))
        );
    }

    #[test]
    fn if_none_match_compares_weakly_and_accepts_lists_and_star() {
        let mut h = HeaderMap::new();
        assert!(!none_match(&h, "\"a-1\""));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"a-1\""),
        );
        assert!(none_match(&h, "\"a-1\""));
        assert!(!none_match(&h, "\"a-2\""));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(none_match(&h, "\"zzz\""));
    }
}
