//! Scenario 7 (with `--store scylla`, `scripts/bench --store scylla` when `KCK_TEST_SCYLLA` names a node):
//! the scylla store beside the embedded one in the same run: freshness at 1k tx/s (the probe of
//! [`crate::fresh`]) and the throughput of `/fetch` hits (wrk, as in [`crate::serve`]), each store in
//! turn on the same machine, with the same primers, keys and load.

use anyhow::Result;

use crate::Ctx;
use crate::fresh;
use crate::http;
use crate::kck::Instance;
use crate::pg::{self, DB};
use crate::report::{Section, Table};
use crate::serve;
use crate::util::{mean, percentile, thousands};

pub fn run(ctx: &Ctx) -> Result<Section> {
    let Some(node) = ctx.scylla.as_deref() else {
        anyhow::bail!("the scylla scenario needs --store scylla and a node (KCK_TEST_SCYLLA)");
    };
    let s = &ctx.sizes;
    let keyspace = format!("kck_bench_{}", std::process::id());
    let mut section = Section::new(
        "7. The scylla store beside the embedded one",
        format!(
            "The same kck (in process, 4 refresh workers, 2 runtime threads) on each store in turn: the \
             embedded store, then the scylla store on `{node}` (keyspace `{keyspace}`, SimpleStrategy 1, \
             consistency `quorum`; the node runs on this machine). Freshness as in section 2 at {rate} tx/s \
             (`--fresh-rates`) for {secs} s each; then wrk (as in section 3, {c} connections) fetching random cached `user/{{id}}` \
             keys ({keys} cached) for {serve} s. Every hit on the scylla store is a read of the cluster \
             (there is no front cache).",
            rate = s
                .fresh_rates
                .iter()
                .map(|r| thousands(f64::from(*r)))
                .collect::<Vec<_>>()
                .join(" and "),
            secs = s.fresh_secs,
            c = s.concurrency,
            keys = thousands(s.warm_users as f64),
            serve = s.serve_secs,
        ),
    );
    let mut table = Table::new(&[
        "store",
        "target tx/s",
        "achieved tx/s",
        "probes",
        "fresh p50 ms",
        "fresh p99 ms",
        "fresh max ms",
        "not seen in 10 s",
        "queue depth mean / max",
        "hits/s",
        "hit p50 ms",
        "hit p99 ms",
    ]);
    let scylla_store = format!(
        "  kind: scylla\n  nodes: [\"{node}\"]\n  keyspace: {keyspace}\n  \
         replication: {{ class: SimpleStrategy, replication_factor: 1 }}\n  consistency: quorum\n  init: true\n"
    );
    for (name, store) in [("embedded", None), ("scylla", Some(scylla_store.as_str()))] {
        eprintln!("kck-bench: the {name} store");
        let inst = Instance::with_store(
            &ctx.work,
            &ctx.cluster,
            &format!("store_{name}"),
            4,
            pg::PRIMERS,
            store,
        )?;
        let kck = inst.start_in_process(2)?;
        let addr = kck.addr();
        let probe_id = s.warm_users + 1;
        let paths = inst.paths("user", 1..=probe_id);
        let bad = http::fetch_all(addr, &paths, 8)?;
        anyhow::ensure!(bad == 0, "{bad} warm-up fetches failed");
        ctx.rt.block_on(fresh::wait_drained(ctx, kck.running()))?;
        let mut rows = Vec::new();
        for &rate in &s.fresh_rates {
            eprintln!("kck-bench: the {name} store at {rate} tx/s");
            let r = fresh::measure(ctx, kck.running(), addr, rate, probe_id)?;
            ctx.rt.block_on(fresh::wait_drained(ctx, kck.running()))?;
            rows.push((rate, r));
        }
        let dir = inst.dir.clone();
        let hits = serve::wrk(ctx, &dir, addr, "user", s.warm_users, s.concurrency)?;
        for (i, (rate, r)) in rows.iter().enumerate() {
            let p = |q| percentile(&r.latencies_ms, q).unwrap_or(f64::NAN);
            let hit = |v: String| if i == 0 { v } else { "".to_string() };
            table.row(vec![
                name.to_string(),
                thousands(f64::from(*rate)),
                thousands(r.achieved),
                r.latencies_ms.len().to_string(),
                format!("{:.2}", p(50.0)),
                format!("{:.2}", p(99.0)),
                format!("{:.2}", p(100.0)),
                r.timeouts.to_string(),
                format!(
                    "{:.1} / {}",
                    mean(&r.depth).unwrap_or(0.0),
                    r.depth.iter().copied().fold(0.0, f64::max)
                ),
                hit(thousands(hits.rate)),
                hit(format!("{:.2}", hits.p50_ms)),
                hit(format!("{:.2}", hits.p99_ms)),
            ]);
        }
        kck.stop()?;
        ctx.rt.block_on(async {
            let client = ctx.cluster.connect(DB).await?;
            pg::drop_slot(&client, &inst.slot).await
        })?;
    }
    section.tables.push(table);
    section.notes.push(
        "The scylla figures include a Cassandra or ScyllaDB node sharing this machine's cores with Postgres, \
         kck and the load generators; on a cluster of its own the store's round trips are network ones. \
         The keyspace is left in place (drop it with `DROP KEYSPACE`)."
            .into(),
    );
    Ok(section)
}
