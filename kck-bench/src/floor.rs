//! The HTTP floor: a bare axum server (same axum, hyper, tokio runtime and allocator as kck) that answers
//! `GET /fetch/{key}` with the bytes kck serves for that key from a `HashMap`, and nothing else. Serving
//! measures it beside kck and Redis, so that what HTTP itself costs is told apart from what kck adds.
//!
//! It runs as a child process of the driver (`kck-bench` with [`FLOOR_ENV`] set to `ADDR FILE`, where
//! FILE holds one `PATH<TAB>BODY` line per key), like kck and Redis do.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

pub const FLOOR_ENV: &str = "KCK_BENCH_HTTP_FLOOR";

type Values = Arc<HashMap<String, Bytes>>;

/// Serve until killed. `spec` is `ADDR FILE`.
pub fn run(spec: &str) -> Result<()> {
    let (addr, file) = spec
        .split_once(' ')
        .with_context(|| format!("{FLOOR_ENV} must be 'ADDR FILE', not {spec:?}"))?;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let values: HashMap<String, Bytes> = text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(path, body)| (path.to_string(), Bytes::from(body.to_string())))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let app = Router::new()
            .route("/fetch/{*key}", axum::routing::get(fetch))
            .with_state(Arc::new(values));
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}

async fn fetch(State(values): State<Values>, uri: Uri) -> Response {
    match values.get(uri.path()) {
        Some(body) => ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
