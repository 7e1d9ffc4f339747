//! Running kck for a scenario: its config, the release binary as a child process, or the library in
//! process (on its own tokio runtime, so that the load generator does not share its threads).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use kck::app::{self, RunOptions, Running};
use kck::config::Config;

use crate::http;
use crate::pg::{self, Cluster};
use crate::util::{ChildGuard, free_port};

/// One kck instance's files and names: its slot, store directory, config file and HTTP address.
pub struct Instance {
    pub slot: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub addr: SocketAddr,
}

impl Instance {
    /// Write the config of instance `name` (its own slot and store) with `workers` refresh workers and
    /// the given primers (YAML list items).
    pub fn new(
        work: &Path,
        cluster: &Cluster,
        name: &str,
        workers: usize,
        primers: &str,
    ) -> Result<Instance> {
        Instance::with_store(work, cluster, name, workers, primers, None)
    }

    /// [`Instance::new`] with the `store:` section given (YAML lines, indented by two spaces); `None`: an
    /// embedded store in the instance's directory.
    pub fn with_store(
        work: &Path,
        cluster: &Cluster,
        name: &str,
        workers: usize,
        primers: &str,
        store: Option<&str>,
    ) -> Result<Instance> {
        let dir = work.join(format!("kck-{name}"));
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let slot = format!("kck_{name}");
        let text = format!(
            "source:\n  url: \"{url}\"\n  publication: {publication}\n  slot: {slot}\n\
             store:\n{store}\
             http:\n  bind: \"{addr}\"\n\
             refresh:\n  workers: {workers}\n\
             prime_on_cache_miss: true\n\
             primers:\n{primers}\n",
            url = cluster.url(pg::DB),
            publication = pg::PUBLICATION,
            store = match store {
                Some(s) => s.to_owned(),
                None => format!(
                    "  kind: embedded\n  path: {}\n",
                    dir.join("store").display()
                ),
            },
        );
        let config = dir.join("kck.yaml");
        std::fs::write(&config, text)?;
        Ok(Instance {
            slot,
            dir,
            config,
            addr,
        })
    }

    pub fn load_config(&self) -> Result<Config> {
        Config::load(&self.config).map_err(|e| anyhow::anyhow!("bench config: {e}"))
    }

    /// Start the release binary; returns once `/healthz` answers.
    pub fn spawn(&self, kck_bin: &Path) -> Result<KckProcess> {
        let log = self.dir.join("kck.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = ChildGuard::spawn(
            "kck",
            Command::new(kck_bin)
                .args(["run", "--config"])
                .arg(&self.config)
                .env("KCK_LOG", std::env::var("KCK_LOG").unwrap_or("warn".into()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file),
        )?;
        let mut process = KckProcess {
            child,
            addr: self.addr,
            log,
        };
        if let Err(e) = http::wait_healthy(self.addr, Duration::from_secs(60)) {
            let tail = process.log_tail();
            process.child.kill9();
            return Err(e.context(format!("kck's log ends with:\n{tail}")));
        }
        Ok(process)
    }

    /// Start kck in this process on a runtime of its own with `threads` worker threads.
    pub fn start_in_process(&self, threads: usize) -> Result<InProcess> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("kck")
            .enable_all()
            .build()?;
        let config = self.load_config()?;
        let running = runtime
            .block_on(app::start(config, RunOptions::default()))
            .context("starting kck in process")?;
        Ok(InProcess {
            runtime: Some(runtime),
            running: Some(running),
        })
    }

    pub fn paths(&self, primer: &str, ids: impl IntoIterator<Item = i64>) -> Vec<String> {
        ids.into_iter()
            .map(|i| format!("/fetch/{primer}/{i}"))
            .collect()
    }
}

/// The kck binary, running.
pub struct KckProcess {
    pub child: ChildGuard,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl KckProcess {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn stop(&mut self) {
        self.child.terminate(Duration::from_secs(30));
    }
}

/// kck running in this process.
pub struct InProcess {
    runtime: Option<tokio::runtime::Runtime>,
    running: Option<Running>,
}

impl InProcess {
    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    pub fn addr(&self) -> SocketAddr {
        self.running().http_addr
    }

    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let (Some(runtime), Some(running)) = (self.runtime.take(), self.running.take()) else {
            return Ok(());
        };
        let result = runtime.block_on(running.stop());
        runtime.shutdown_timeout(Duration::from_secs(10));
        result.map_err(|e| anyhow::anyhow!("kck stopped with an error: {e}"))
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
