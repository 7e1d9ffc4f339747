//! `kck-bench` as a child process: kck itself (`app::start`, as the `kck` binary runs it) with its store
//! wrapped so that the parent can slow it down, for the memory scenario's slowed store. The parent sets
//! [`CHILD_ENV`] to the config file and [`FLAG_ENV`] to a path: while `PATH.slow` exists, every enqueue
//! waits 200 ms and every finish 50 ms; when `PATH.stop` appears, kck stops. Every 100 ms the child prints
//! `depth=N waits=M` (queue depth, times the reader waited for room) on stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use kck::app::{self, RunOptions, StoreWrapper};
use kck::config::Config;
use kck::store::Store;
use kck::store::slow::SlowStore;

pub const CHILD_ENV: &str = "KCK_BENCH_CHILD_CONFIG";
pub const FLAG_ENV: &str = "KCK_BENCH_CHILD_FLAG";

pub fn slow_path(flag: &Path) -> PathBuf {
    flag.with_extension("slow")
}

pub fn stop_path(flag: &Path) -> PathBuf {
    flag.with_extension("stop")
}

pub fn run(config: &Path, flag: &Path) -> Result<()> {
    let config = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let slow = Arc::new(AtomicBool::new(false));
    let wrap = {
        let slow = slow.clone();
        StoreWrapper(Arc::new(move |inner| {
            Arc::new(SlowStore::new(inner, slow.clone())) as Arc<dyn Store>
        }))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let options = RunOptions {
        wrap_store: Some(wrap),
        ..RunOptions::default()
    };
    let running = rt
        .block_on(app::start(config, options))
        .map_err(|e| anyhow::anyhow!("kck did not start: {e}"))?;
    let (slow_file, stop_file) = (slow_path(flag), stop_path(flag));
    rt.block_on(async {
        while !stop_file.exists() {
            slow.store(slow_file.exists(), Ordering::Relaxed);
            let depth = running.store.queue_stats().await.map_or(0, |q| q.depth);
            let waits = running.stats.backpressure_waits.load(Ordering::Relaxed);
            println!("depth={depth} waits={waits}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    slow.store(false, Ordering::Relaxed);
    rt.block_on(running.stop())
        .map_err(|e| anyhow::anyhow!("kck stopped with an error: {e}"))
}
