//! Running kck in tests: configs, in-process instances, HTTP calls, and the convergence oracle.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kck::app::{self, RunOptions, Running};
use kck::config::Config;
use kck::lsn::Lsn;
use serde_json::Value;

/// Write a config for `url` with the given primers (YAML, the `primers:` list) and load it.
pub fn config(dir: &Path, url: &str, publication: &str, slot: &str, primers_yaml: &str) -> Config {
    config_with(dir, url, publication, slot, primers_yaml, "")
}

/// Like [`config`], with extra top-level YAML (for example `prime_on_cache_miss: false`).
pub fn config_with(
    dir: &Path,
    url: &str,
    publication: &str,
    slot: &str,
    primers_yaml: &str,
    extra: &str,
) -> Config {
    load(&write_config(
        dir,
        url,
        publication,
        slot,
        primers_yaml,
        extra,
    ))
}

/// Write the config of [`config_with`] (three workers) and return its path.
pub fn write_config(
    dir: &Path,
    url: &str,
    publication: &str,
    slot: &str,
    primers_yaml: &str,
    extra: &str,
) -> PathBuf {
    ConfigYaml {
        workers: 3,
        extra,
        ..ConfigYaml::new(url, publication, slot, primers_yaml)
    }
    .write(dir)
}

/// The parts of a test config: an embedded store under `dir/store`, HTTP on a free port of 127.0.0.1.
/// Written to `dir/kck.yaml` by [`ConfigYaml::write`].
pub struct ConfigYaml<'a> {
    pub url: &'a str,
    pub publication: &'a str,
    pub slot: &'a str,
    /// Lines inside `source:` (each indented by two spaces and ending in a newline).
    pub source_extra: &'a str,
    /// Lines inside `store:` after `path:` (for example `  max_entries: 500\n`).
    pub store_extra: &'a str,
    /// Lines inside `http:` after `bind:` (for example `  max_connections: 16\n`).
    pub http_extra: &'a str,
    pub workers: u32,
    /// Lines inside `refresh:` after `workers:`.
    pub refresh_extra: &'a str,
    /// Top-level YAML (for example `prime_on_cache_miss: false`).
    pub extra: &'a str,
    /// The `primers:` list.
    pub primers: &'a str,
}

impl<'a> ConfigYaml<'a> {
    /// Two workers and nothing extra.
    pub fn new(url: &'a str, publication: &'a str, slot: &'a str, primers: &'a str) -> Self {
        ConfigYaml {
            url,
            publication,
            slot,
            source_extra: "",
            store_extra: "",
            http_extra: "",
            workers: 2,
            refresh_extra: "",
            extra: "",
            primers,
        }
    }

    /// Write `dir/kck.yaml` and return its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let ConfigYaml {
            url,
            publication,
            slot,
            source_extra,
            store_extra,
            http_extra,
            workers,
            refresh_extra,
            extra,
            primers,
        } = self;
        let text = format!(
            "source:\n  url: \"{url}\"\n  publication: {publication}\n  slot: {slot}\n{source_extra}\
             store:\n  kind: embedded\n  path: {store}\n{store_extra}\
             http:\n  bind: 127.0.0.1:0\n{http_extra}\
             refresh:\n  workers: {workers}\n{refresh_extra}\n\
             {extra}\n\
             primers:\n{primers}\n",
            store = dir.join("store").display(),
        );
        let path = dir.join("kck.yaml");
        std::fs::write(&path, text).expect("write config");
        path
    }
}

/// Load a test config, panicking with the reason if it does not load.
pub fn load(path: &Path) -> Config {
    Config::load(path).unwrap_or_else(|e| panic!("test config does not load: {e}"))
}

pub async fn start(config: Config) -> Running {
    start_with(config, RunOptions::default()).await
}

pub async fn start_with(config: Config, options: RunOptions) -> Running {
    app::start(config, options)
        .await
        .unwrap_or_else(|e| panic!("kck did not start: {e}"))
}

/// A port of 127.0.0.1 nothing listens on (just now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Start the kck binary (`kck run --config CONFIG`) on a free port and wait until it answers
/// `/healthz`. With `log`, it logs at `info` to that file (and the file is shown if it does not
/// start); without, at `warn` to this process's stderr.
pub async fn spawn_kck(config: &Path, log: Option<&Path>) -> (tokio::process::Child, SocketAddr) {
    spawn_kck_at(config, log.map(|l| (l, "info"))).await
}

/// [`spawn_kck`], logging at `level` (a `KCK_LOG` filter) to the file when one is given.
pub async fn spawn_kck_at(
    config: &Path,
    log: Option<(&Path, &str)>,
) -> (tokio::process::Child, SocketAddr) {
    let port = free_port();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kck"));
    command
        .args(["run", "--config"])
        .arg(config)
        .env("KCK_HTTP_BIND", format!("127.0.0.1:{port}"))
        .kill_on_drop(true);
    let log = match log {
        Some((log, level)) => {
            command.env("KCK_LOG", level);
            Some(log)
        }
        None => None,
    };
    match log {
        Some(log) => command
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file")),
        None => command.env("KCK_LOG", "warn"),
    };
    let process = command.spawn().expect("start kck");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://{addr}/healthz"))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "kck did not start listening{}",
            log.map(|log| format!(
                "; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ))
            .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (process, addr)
}

/// Wait until `check` holds, or panic with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// GET `url`: status and JSON body.
pub async fn get_json(url: &str) -> (u16, Value) {
    let response = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("GET {url}: body {text:?} is not JSON: {e}"));
    (status, body)
}

/// GET /fetch/{key}: status and JSON body.
pub async fn fetch(addr: SocketAddr, key: &str) -> (u16, Value) {
    get_json(&format!("http://{addr}/fetch/{key}")).await
}

/// Fetch `key` until it equals `expected` or `timeout` passes.
pub async fn eventually_equals(
    addr: std::net::SocketAddr,
    key: &str,
    expected: &Value,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (status, body) = fetch(addr, key).await;
        if status == 200 && &body == expected {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{key}: expected {expected} within {timeout:?}, last got {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mark a position in the stream and wait until kck has read past it and the queue is empty: after
/// this, every cached key must equal its primer run fresh.
pub async fn wait_drained(running: &Running, client: &tokio_postgres::Client, timeout: Duration) {
    let text: String = client
        .query_one(
            "SELECT pg_logical_emit_message(false, 'kck-test-sync', '')::text",
            &[],
        )
        .await
        .expect("emit sync message")
        .get(0);
    let mark: Lsn = text.parse().expect("lsn");
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let received = Lsn(running
            .stats
            .received
            .load(std::sync::atomic::Ordering::Relaxed));
        let stats = running.store.queue_stats().await.expect("queue stats");
        let acked = Lsn(running
            .stats
            .acked
            .load(std::sync::atomic::Ordering::Relaxed));
        if received >= mark && acked >= mark && stats.depth == 0 && stats.claimed == 0 {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "kck did not drain within {timeout:?}: received {received}, acked {acked}, mark {mark}, queue {stats:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The primer's result for `key` computed directly against Postgres, as kck would store it.
pub async fn oracle(client: &tokio_postgres::Client, config: &Config, key: &str) -> Value {
    let catalog = &config.catalog;
    let parsed = catalog
        .parse_key(key)
        .unwrap_or_else(|e| panic!("{key}: {e}"));
    let primer = &catalog.primers[parsed.primer];
    let sql = kck::refresh::wrapped_query(&primer.query, primer.shape);
    // Bind parameters the way kck does: as text, typed by Postgres.
    let texts: Vec<String> = parsed.params.iter().map(kck::refresh::param_text).collect();
    let params: Vec<kck::pg::TextParam<'_>> =
        texts.iter().map(|t| kck::pg::TextParam(Some(t))).collect();
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let row = client
        .query_one(sql.as_str(), &refs)
        .await
        .unwrap_or_else(|e| panic!("oracle for {key}: {e}"));
    let json: Option<String> = row.get(0);
    serde_json::from_str(json.as_deref().unwrap_or("null")).expect("oracle json")
}

/// Compare every cached key of every primer with the oracle; returns how many keys were checked.
pub async fn assert_converged(
    running: &Running,
    client: &tokio_postgres::Client,
    config: &Config,
) -> usize {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for primer in &config.catalog.primers {
        let mut after: Option<String> = None;
        loop {
            let keys = running
                .store
                .keys(&primer.name, after.as_deref(), 500)
                .await
                .expect("keys");
            for key in &keys {
                let Some(entry) = running.store.get(key).await.expect("get") else {
                    continue;
                };
                let cached: Value = serde_json::from_slice(&entry.value).expect("cached json");
                let fresh = oracle(client, config, key).await;
                checked += 1;
                if cached != fresh {
                    wrong.push(format!(
                        "{key} (lsn {}): cached {cached} fresh {fresh}",
                        entry.lsn
                    ));
                }
            }
            if keys.len() < 500 {
                break;
            }
            after = keys.last().cloned();
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {checked} keys differ from Postgres:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    checked
}
