//! The HTTP side of authentication: the middleware that turns a request into a [`Principal`], and how an
//! [`AuthError`] is answered. Token verification itself is `crate::auth` and needs no axum.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::auth::{AuthError, Authenticator, Principal};

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Principal>()
            .cloned()
            .unwrap_or_default())
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

/// The middleware: public paths pass; every other request needs a valid bearer token; the operations
/// routes (every path that is not an API route) also need [`AuthConfig::operator`]'s claims. The API
/// handlers apply the primers' and updaters' own rules.
pub async fn authenticate(
    State(auth): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if auth.public_paths.iter().any(|p| p == path) {
        return next.run(request).await;
    }
    let principal = match auth.principal(request.headers()) {
        Ok(principal) => principal,
        Err(e) => return e.into_response(),
    };
    if !super::is_api_path(path) {
        let allowed = auth
            .operator
            .as_ref()
            .is_some_and(|rule| rule.allows(&principal, &|_, _| false));
        if !allowed {
            let why = if auth.operator.is_some() {
                format!("'{path}' (an operations route; see auth.operator)")
            } else {
                format!(
                    "'{path}': operations routes need auth.operator (the claims an operator's token \
                     carries), or the path in auth.public_paths"
                )
            };
            return AuthError::Forbidden(why).into_response();
        }
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}
