//! The invalidation routes: `DELETE /cache/{key}`, `POST /invalidate`, `POST /refresh`. Operations routes
//! (see [`super::http::routes`]): behind `auth.operator` when authentication is on. The work is
//! `crate::invalidate`'s.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use serde::Deserialize;

use crate::http::ApiError;
use crate::invalidate::{Answer, InvalidateError, Mode, Request, Target, invalidate, refresh};
use crate::ops::Ops;

impl From<InvalidateError> for ApiError {
    fn from(e: InvalidateError) -> ApiError {
        match e {
            InvalidateError::Key(e) => e.into(),
            InvalidateError::UnknownPrimer(..) => {
                ApiError::new(StatusCode::BAD_REQUEST, "unknown_primer", e.to_string())
            }
            InvalidateError::NoTarget => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            InvalidateError::Store(e) => {
                tracing::error!(error = %crate::report::Chain(&e), "Invalidation failed.");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see kck's log",
                )
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct DeleteParams {
    mode: Option<Mode>,
}

/// `DELETE /cache/{key}`: drop a key (`?mode=refresh`: mark it expired and refresh it instead). An
/// operations route (see [`crate::ops::http::routes`]): behind `auth.operator` when authentication is on.
pub async fn delete_key(
    State(ops): State<Arc<Ops>>,
    Query(params): Query<DeleteParams>,
    uri: Uri,
) -> Result<Json<Answer>, ApiError> {
    let key = uri.path().strip_prefix("/cache/").unwrap_or_default();
    let mode = params.mode.unwrap_or(Mode::Drop);
    let keys = invalidate(&ops.refresher, &Target::Key(key.to_owned()), mode).await?;
    Ok(Json(Answer {
        keys,
        mode: Some(mode),
    }))
}

/// `POST /invalidate` (an operations route).
pub async fn invalidate_handler(
    State(ops): State<Arc<Ops>>,
    body: Result<Json<Request>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Answer>, ApiError> {
    let Json(request) = body.map_err(bad_body)?;
    let mode = request.mode.unwrap_or_default();
    let keys = invalidate(&ops.refresher, &request.target()?, mode).await?;
    Ok(Json(Answer {
        keys,
        mode: Some(mode),
    }))
}

/// `POST /refresh` (an operations route).
pub async fn refresh_handler(
    State(ops): State<Arc<Ops>>,
    body: Result<Json<Request>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Answer>, ApiError> {
    let Json(request) = body.map_err(bad_body)?;
    if request.mode.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "/refresh takes no \"mode\" (use /invalidate to drop keys)",
        ));
    }
    let keys = refresh(&ops.refresher, &request.target()?).await?;
    Ok(Json(Answer { keys, mode: None }))
}

fn bad_body(e: axum::extract::rejection::JsonRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
}
