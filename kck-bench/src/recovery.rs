//! Scenario 6: recovery. kck (the release binary) serves cached keys; it is killed with SIGKILL; changes
//! are committed while it is down; it is started again. Measured: from the restart to serving, to the slot
//! acknowledging the last change, and to every cached key equal to its primer run fresh.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kck::pg::TextParam;
use kck::refresh::{param_text, wrapped_query};
use tokio_postgres::types::ToSql;

use crate::Ctx;
use crate::http::{self, Http};
use crate::kck::Instance;
use crate::pg::{self, DB};
use crate::report::{Goal, Section, Table};
use crate::util::thousands;

pub fn run(ctx: &Ctx) -> Result<Section> {
    let s = &ctx.sizes;
    let changes = s.recovery_changes;
    let hot = s.hot_keys.min(s.users);
    let per_user = s.orders / s.users;
    let mut section = Section::new(
        "6. Recovery",
        format!(
            "kck (release binary, 4 workers) with {} cached keys ({h} `user`, {h} `orders_by_user`, \
             every `group_stats`), killed with SIGKILL. While it is down, {} single-row transactions \
             change those keys (half update a cached user, half an order of a cached user, which also \
             changes its group). Then kck starts again on the same store and slot.",
            thousands((2 * hot + s.groups) as f64),
            thousands(changes as f64),
            h = thousands(hot as f64),
        ),
    );
    let inst = Instance::new(&ctx.work, &ctx.cluster, "recovery", 4, pg::PRIMERS)?;
    let mut process = inst.spawn(&ctx.kck_bin)?;
    let mut paths = inst.paths("user", 1..=hot);
    paths.extend(inst.paths("orders_by_user", 1..=hot));
    paths.extend(inst.paths("group_stats", 1..=s.groups));
    anyhow::ensure!(
        http::fetch_all(process.addr, &paths, 8)? == 0,
        "warm-up failed"
    );

    let killed = Instant::now();
    process.child.kill9();
    let (write_secs, end) = ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        client
            .batch_execute("SET synchronous_commit = off")
            .await?;
        let started = Instant::now();
        client
            .batch_execute(&format!(
                "DO $$ DECLARE u bigint; BEGIN FOR i IN 1..{changes} LOOP \
                 u := (i * 7919) % {hot} + 1; \
                 IF i % 2 = 0 THEN UPDATE users SET name = 'r' || i WHERE id = u; \
                 ELSE UPDATE orders SET amount = amount + 1 WHERE id = u + (i % {per_user}) * {users}; \
                 END IF; COMMIT; END LOOP; END $$",
                users = s.users
            ))
            .await?;
        client.batch_execute("SET synchronous_commit = on").await?;
        let end = pg::insert_lsn(&client).await?;
        anyhow::Ok((started.elapsed().as_secs_f64(), end))
    })?;
    let expected = ctx.rt.block_on(oracle(ctx, &inst, &paths))?;

    let restarted = Instant::now();
    let process2 = inst.spawn(&ctx.kck_bin)?;
    let serving = restarted.elapsed().as_secs_f64();
    let slot = inst.slot.clone();
    let url = ctx.cluster.url(DB);
    let acked = ctx.rt.spawn(async move {
        let client = pg::connect(&url).await?;
        pg::wait_slot_confirmed(&client, &slot, end, Duration::from_secs(600)).await
    });
    // Poll the keys not yet fresh until none is left.
    let mut pending: Vec<usize> = (0..paths.len()).collect();
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        pending = stale(process2.addr, &paths, &expected, &pending)?;
        if restarted.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("{} keys still stale 600 s after the restart", pending.len());
        }
    }
    let fresh = restarted.elapsed().as_secs_f64();
    let acked = ctx.rt.block_on(acked)??.as_secs_f64() + serving;
    let mut process2 = process2;
    process2.stop();
    ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        pg::drop_slot(&client, &inst.slot).await
    })?;

    let mut table = Table::new(&[
        "changes while down",
        "writing them took",
        "restart → serving",
        "restart → slot acknowledged the last change",
        "restart → every cached key fresh",
        "kill → every cached key fresh",
    ]);
    // From the kill to the moment every key was fresh.
    let kill_to_fresh = restarted.duration_since(killed).as_secs_f64() + fresh;
    table.row(vec![
        thousands(changes as f64),
        format!("{write_secs:.1} s"),
        format!("{serving:.2} s"),
        format!("{acked:.2} s (±1 s: kck reports its position once a second)"),
        format!("{fresh:.2} s ({rounds} polling rounds)"),
        format!("{kill_to_fresh:.1} s"),
    ]);
    section.tables.push(table);
    section.goals.push(Goal::new(
        "time from restart to caught up (report; the issue sets no number)",
        format!(
            "{fresh:.2} s to fresh keys after {} changes",
            thousands(changes as f64)
        ),
        None,
    ));
    section.notes.push(
        "`kill → every cached key fresh` includes the time the bench took to commit the changes while kck \
         was down, and to compute the expected values; the restart figures are kck's own."
            .into(),
    );
    Ok(section)
}

/// Indexes (among `check`) of the paths whose body differs from `expected`, fetched over 8 connections.
fn stale(
    addr: std::net::SocketAddr,
    paths: &[String],
    expected: &[Vec<u8>],
    check: &[usize],
) -> Result<Vec<usize>> {
    let chunk = check.len().div_ceil(8).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = check
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || -> Result<Vec<usize>> {
                    let mut http = Http::new(addr);
                    let mut out = Vec::new();
                    for &i in part {
                        let r = http.get(&paths[i])?;
                        if r.status != 200 || r.body != expected[i] {
                            out.push(i);
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("poll thread panicked"))??,
            );
        }
        Ok(out)
    })
}

/// Each `/fetch/...` path's primer computed directly in Postgres, as kck stores it.
pub async fn oracle(ctx: &Ctx, inst: &Instance, paths: &[String]) -> Result<Vec<Vec<u8>>> {
    let config = inst.load_config()?;
    let catalog = &config.catalog;
    let client = ctx.cluster.connect(DB).await?;
    let mut out = Vec::with_capacity(paths.len());
    let mut statements = std::collections::HashMap::new();
    for path in paths {
        let text = path.strip_prefix("/fetch/").unwrap_or(path);
        let key = catalog
            .parse_key(text)
            .map_err(|e| anyhow::anyhow!("{text}: {e}"))?;
        let primer = &catalog.primers[key.primer];
        let statement = match statements.get(&key.primer) {
            Some(s) => s,
            None => {
                let s = client
                    .prepare(&wrapped_query(&primer.query, primer.shape))
                    .await
                    .context("preparing the oracle query")?;
                statements.entry(key.primer).or_insert(s)
            }
        };
        let texts: Vec<String> = key.params.iter().map(param_text).collect();
        let params: Vec<TextParam<'_>> = texts.iter().map(|t| TextParam(Some(t))).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let row = client.query_one(statement, &refs).await?;
        let json: Option<String> = row.get(0);
        out.push(json.unwrap_or_else(|| "null".into()).into_bytes());
    }
    Ok(out)
}
