//! Scenario 4: coalescing and cost. Many updates over a few hot cached keys, as fast as the writer goes;
//! count the queries kck ran (pg_stat_statements) against a naive refresh per change (one query per update).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use anyhow::Result;

use crate::Ctx;
use crate::fresh::wait_drained;
use crate::http::{self, Http};
use crate::kck::Instance;
use crate::pg::{self, DB};
use crate::report::{Goal, Section, Table};
use crate::util::{Rng, thousands};

const WRITERS: usize = 8;

pub fn run(ctx: &Ctx) -> Result<Section> {
    let s = &ctx.sizes;
    let (updates, hot) = (s.coalesce_updates, s.hot_keys);
    let mut section = Section::new(
        "4. Coalescing and cost",
        format!(
            "kck in process (4 refresh workers). {} single-row UPDATE transactions of `users`, spread \
             uniformly over {} hot cached `user/{{id}}` keys, from {WRITERS} connections as fast as they \
             go. Queries counted with pg_stat_statements (reset after warming the keys), until kck has \
             read everything and its queue is empty. A naive cache that refreshes on every change runs \
             one query per update.",
            thousands(updates as f64),
            thousands(hot as f64)
        ),
    );
    let inst = Instance::new(&ctx.work, &ctx.cluster, "coalesce", 4, pg::PRIMERS)?;
    let kck = inst.start_in_process(2)?;
    let addr = kck.addr();
    let paths = inst.paths("user", 1..=hot);
    anyhow::ensure!(http::fetch_all(addr, &paths, 8)? == 0, "warm-up failed");

    let (write_secs, drain_secs, stats) = ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        wait_drained(ctx, kck.running()).await?;
        pg::reset_statements(&client).await?;
        let queued_before = kck.running().stats.tasks_queued.load(Ordering::Relaxed);
        let next = Arc::new(AtomicI64::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let client = ctx.cluster.connect(DB).await?;
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                let statement = client
                    .prepare("UPDATE users SET name = $1 WHERE id = $2")
                    .await?;
                let mut rng = Rng::new(w as u64 + 11);
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= updates {
                        return anyhow::Ok(());
                    }
                    let id = rng.range(1, hot);
                    client
                        .execute(&statement, &[&format!("c-{n}"), &id])
                        .await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let write_secs = started.elapsed().as_secs_f64();
        wait_drained(ctx, kck.running()).await?;
        let drain_secs = started.elapsed().as_secs_f64() - write_secs;
        let stats = Counts {
            refreshes: pg::statement_calls(&client, "row_to_json").await?,
            snapshots: pg::statement_calls(&client, "pg_current_snapshot").await?,
            updates: pg::statement_calls(&client, "UPDATE users SET name").await?,
            queued: kck.running().stats.tasks_queued.load(Ordering::Relaxed) - queued_before,
        };
        anyhow::Ok((write_secs, drain_secs, stats))
    })?;

    // Every hot key must now hold its primer's result computed fresh.
    let expected = ctx
        .rt
        .block_on(crate::recovery::oracle(ctx, &inst, &paths))?;
    let mut http = Http::new(addr);
    let mut wrong = 0;
    for (path, want) in paths.iter().zip(&expected) {
        let r = http.get(path)?;
        if r.status != 200 || &r.body != want {
            wrong += 1;
        }
    }
    kck.stop()?;
    ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        pg::drop_slot(&client, &inst.slot).await
    })?;

    let kck_queries = stats.refreshes + stats.snapshots;
    let per_update = kck_queries as f64 / updates as f64;
    let mut table = Table::new(&[
        "updates",
        "hot keys",
        "writer tx/s",
        "tasks the stream queued",
        "refresh queries",
        "refreshes per key",
        "snapshot queries",
        "kck queries per update",
        "naive queries per update",
        "kck / naive",
        "drain after last write",
    ]);
    table.row(vec![
        thousands(stats.updates as f64),
        thousands(hot as f64),
        thousands(updates as f64 / write_secs),
        thousands(stats.queued as f64),
        thousands(stats.refreshes as f64),
        format!("{:.1}", stats.refreshes as f64 / hot as f64),
        thousands(stats.snapshots as f64),
        format!("{per_update:.3}"),
        "1".into(),
        format!("{per_update:.3}"),
        format!("{drain_secs:.2} s"),
    ]);
    section.tables.push(table);
    section.goals.push(Goal::new(
        "fewer Postgres queries than a refresh per change (report)",
        format!(
            "{per_update:.3} queries per update ({:.1} refreshes per hot key for {:.0} updates per key)",
            stats.refreshes as f64 / hot as f64,
            updates as f64 / hot as f64
        ),
        Some(per_update < 1.0),
    ));
    section.goals.push(Goal::new(
        "every hot key converged (correctness check, not a speed goal)",
        format!("{wrong} of {hot} keys differ from their primer run fresh"),
        Some(wrong == 0),
    ));
    section.notes.push(
        "Snapshot queries are kck's `pg_current_snapshot()` calls that prove commits visible before a \
         refresh (one per batch of commits). The writer's own UPDATEs are not counted as kck's."
            .into(),
    );
    Ok(section)
}

struct Counts {
    refreshes: i64,
    snapshots: i64,
    updates: i64,
    queued: u64,
}
