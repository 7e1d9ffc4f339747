//! Asking a running kck over HTTP, for `kck status`, `kck get` and `kck keys`.
//!
//! The embedded store is one file that a running kck holds locked, so a second process cannot open it:
//! the commands ask the running kck first (at `http.bind` of the config, or `--url`), and open the store
//! themselves only when nothing answers there.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::ops::http::EntryDocument;
use crate::ops::status::Status;

/// Talking to kck failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered (connection refused, timeout): kck is probably not running there.
    #[error("no kck answers at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        /// The `error.message` of kck's JSON error, or the body.
        message: String,
    },
    #[error("{url} answered something that is not what kck sends: {detail}")]
    Decode { url: String, detail: String },
}

/// A client for one kck.
#[derive(Debug, Clone)]
pub struct KckClient {
    pub base: String,
    http: reqwest::Client,
    /// A bearer token from `KCK_TOKEN`, for a kck with `auth.jwt` (it needs `auth.operator`'s claims).
    token: Option<String>,
}

/// The environment variable holding the bearer token the commands send.
pub const TOKEN_ENV: &str = "KCK_TOKEN";

/// The URL to reach the kck of `config`: `http.bind`, with a wildcard address replaced by loopback.
pub fn base_url(config: &Config) -> String {
    let mut addr = config.http.bind;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}")
}

impl KckClient {
    /// `url` (such as `http://127.0.0.1:8080`) or, without it, the config's `http.bind`.
    pub fn new(config: &Config, url: Option<&str>) -> KckClient {
        let base = url
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| base_url(config));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        let token = std::env::var(TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        KckClient { base, http, token }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.get(&url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|source| {
            if source.is_connect() || source.is_timeout() {
                ClientError::Unreachable {
                    url: url.clone(),
                    source,
                }
            } else {
                ClientError::Decode {
                    url: url.clone(),
                    detail: source.to_string(),
                }
            }
        })?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| ClientError::Decode {
            url: url.clone(),
            detail: e.to_string(),
        })?;
        if status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(ClientError::Status {
                url,
                status,
                message,
            });
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ClientError::Decode {
                url,
                detail: e.to_string(),
            })
    }

    /// `GET /status?history=false`.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.get("/status?history=false")
            .await?
            .ok_or_else(|| ClientError::Decode {
                url: format!("{}/status", self.base),
                detail: "404: this server has no /status (is it a kck of this version?)".into(),
            })
    }

    /// `GET /cache/entry/{key}`: `None` when the key is not cached.
    pub async fn entry(&self, key: &str) -> Result<Option<EntryDocument>, ClientError> {
        self.get(&format!("/cache/entry/{key}")).await
    }

    /// `GET /cache/keys/{primer}`: one page, and where the next starts.
    pub async fn keys(
        &self,
        primer: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), ClientError> {
        let mut path = format!("/cache/keys/{primer}?limit={limit}");
        if let Some(after) = after {
            let encoded: String =
                percent_encoding::utf8_percent_encode(after, percent_encoding::NON_ALPHANUMERIC)
                    .to_string();
            path.push_str(&format!("&after={encoded}"));
        }
        let page: serde_json::Value =
            self.get(&path).await?.ok_or_else(|| ClientError::Decode {
                url: format!("{}{path}", self.base),
                detail: "404: this server has no /cache/keys".into(),
            })?;
        let keys = page["keys"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let next = page["next_after"].as_str().map(str::to_string);
        Ok((keys, next))
    }
}
