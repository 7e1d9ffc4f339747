//! The client of `kck invalidate` and `kck refresh`: they ask the running kck (its `http.bind`), which
//! holds the store.

use std::net::SocketAddr;

use crate::invalidate::{Answer, Request};

/// Asking a running kck failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach kck at {url}: {source}. Is kck running with this config? These commands ask the \
         running server (its http.bind; KCK_HTTP_BIND overrides it)"
    )]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("kck answered {status}: {message}")]
    Refused { status: u16, message: String },
}

/// The URL of a server bound to `bind` (a wildcard address is reached on loopback).
pub fn base_url(bind: SocketAddr) -> String {
    let ip = match bind.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, bind.port()))
}

/// `POST {base}{path}` with `request`; `token` is sent as a bearer token when given.
pub async fn call(
    base: &str,
    path: &str,
    request: &Request,
    token: Option<&str>,
) -> Result<Answer, ClientError> {
    let url = format!("{base}{path}");
    let unreachable = |source| ClientError::Unreachable {
        url: url.clone(),
        source,
    };
    let mut builder = reqwest::Client::new().post(&url).json(request);
    if let Some(token) = token {
        builder = builder.bearer_auth(token);
    }
    let response = builder.send().await.map_err(unreachable)?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(unreachable)?;
    if status == 200
        && let Ok(answer) = serde_json::from_str::<Answer>(&text)
    {
        return Ok(answer);
    }
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or(text);
    Err(ClientError::Refused { status, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_binds_are_reached_on_loopback() {
        assert_eq!(
            base_url("0.0.0.0:8080".parse().unwrap()),
            "http://127.0.0.1:8080"
        );
        assert_eq!(base_url("[::]:80".parse().unwrap()), "http://[::1]:80");
        assert_eq!(base_url("10.1.2.3:9".parse().unwrap()), "http://10.1.2.3:9");
    }
}
