//! The bench's own Postgres (through `scripts/pg-temp`), its data set, and SQL helpers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kck::lsn::Lsn;
use tokio_postgres::{Client, NoTls};

use crate::Sizes;
use crate::util::run;

pub const DB: &str = "bench";
pub const PUBLICATION: &str = "bench";

/// A throwaway cluster: `scripts/pg-temp start DIR PORT`, fsync on, with pg_stat_statements preloaded.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub bin: PathBuf,
    pg_temp: PathBuf,
}

impl Cluster {
    pub async fn start(pg_temp: &Path, dir: &Path, port: u16, bin: &Path) -> Result<Cluster> {
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            port,
            bin: bin.to_path_buf(),
            pg_temp: pg_temp.to_path_buf(),
        };
        cluster.pg_temp_cmd(&["start", &dir.display().to_string(), &port.to_string()])?;
        let admin = cluster.connect("postgres").await?;
        admin
            .batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            .await
            .context("configuring pg_stat_statements")?;
        drop(admin);
        cluster.pg_temp_cmd(&["stop", &dir.display().to_string()])?;
        cluster.pg_temp_cmd(&["start", &dir.display().to_string(), &port.to_string()])?;
        let admin = cluster.connect("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {DB}"))
            .await
            .context("creating the bench database")?;
        Ok(cluster)
    }

    fn pg_temp_cmd(&self, args: &[&str]) -> Result<String> {
        run(
            "scripts/pg-temp",
            Command::new(&self.pg_temp)
                .args(args)
                .env("PG_BIN", &self.bin),
        )
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A libpq connection string, for pgbench and pg_recvlogical.
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    pub async fn connect(&self, db: &str) -> Result<Client> {
        connect(&self.url(db)).await
    }

    pub fn destroy(&self) {
        let _ = self.pg_temp_cmd(&["destroy", &self.dir.display().to_string()]);
    }
}

pub async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The schema and data: `groups`, `users` (each in one group), `orders` (each of one user, in the user's
/// group). A user has `orders / users` orders; a group has `orders / groups` orders.
pub fn schema_sql(s: &Sizes) -> String {
    let (u, g, o) = (s.users, s.groups, s.orders);
    format!(
        r#"
CREATE TABLE groups (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE users (
    id bigint PRIMARY KEY, group_id bigint NOT NULL, name text NOT NULL, email text NOT NULL);
CREATE TABLE orders (
    id bigint PRIMARY KEY, user_id bigint NOT NULL, group_id bigint NOT NULL, status text NOT NULL,
    amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL);
-- The whole old row in UPDATE and DELETE messages, so a change maps to exact user and group keys.
ALTER TABLE orders REPLICA IDENTITY FULL;
INSERT INTO groups SELECT i, 'group ' || i FROM generate_series(1, {g}) i;
INSERT INTO users
SELECT i, (i - 1) % {g} + 1, 'user ' || i, 'user' || i || '@example.com' FROM generate_series(1, {u}) i;
INSERT INTO orders
SELECT i, (i - 1) % {u} + 1, ((i - 1) % {u}) % {g} + 1,
       (ARRAY['new', 'paid', 'shipped', 'delivered'])[1 + i % 4],
       round(((i * 37) % 10000) / 100.0 + 1, 2),
       timestamptz '2026-01-01 00:00:00+00' + i * interval '1 minute'
FROM generate_series(1, {o}) i;
CREATE INDEX orders_user_id ON orders (user_id);
CREATE INDEX orders_group_id ON orders (group_id);
-- A knob the slow primer of the memory scenario reads (not published: no primer depends on it).
CREATE TABLE bench_knobs (delay float8 NOT NULL);
INSERT INTO bench_knobs VALUES (0);
CREATE FUNCTION bench_slow() RETURNS int LANGUAGE plpgsql VOLATILE AS
$$ BEGIN PERFORM pg_sleep(delay) FROM bench_knobs; RETURN 0; END $$;
CREATE EXTENSION pg_stat_statements;
CREATE PUBLICATION {PUBLICATION} FOR TABLE groups, users, orders;
"#
    )
}

/// The primers every scenario uses: a point lookup, a per-user list (about 10 rows) and a per-group
/// aggregate (about 1,000 rows).
pub const PRIMERS: &str = r#"
  - name: user
    key: "user/{id:int}"
    shape: row
    query: "SELECT id, group_id, name, email FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
  - name: orders_by_user
    key: "orders_by_user/{user_id:int}"
    shape: rows
    query: "SELECT id, status, amount, created_at FROM orders WHERE user_id = $1 ORDER BY id"
    depends_on:
      - table: orders
        columns: { user_id: user_id }
  - name: group_stats
    key: "group_stats/{group_id:int}"
    shape: row
    query: "SELECT group_id, count(*) AS orders, sum(amount) AS total, max(amount) AS largest FROM orders WHERE group_id = $1 GROUP BY group_id"
    depends_on:
      - table: orders
        columns: { group_id: group_id }
"#;

/// The queries of [`PRIMERS`] as an application would run them directly (pgbench scripts).
pub const POINT_SQL: &str = "SELECT id, group_id, name, email FROM users WHERE id = :id;";
pub const AGGREGATE_SQL: &str = "SELECT group_id, count(*) AS orders, sum(amount) AS total, max(amount) AS largest FROM orders WHERE group_id = :g GROUP BY group_id;";

pub async fn load(client: &Client, sizes: &Sizes) -> Result<Duration> {
    let started = Instant::now();
    client
        .batch_execute(&schema_sql(sizes))
        .await
        .context("loading the data set")?;
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .context("VACUUM ANALYZE")?;
    Ok(started.elapsed())
}

fn lsn(text: &str) -> Result<Lsn> {
    text.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

pub async fn create_slot(client: &Client, name: &str) -> Result<Lsn> {
    let text: String = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await
        .with_context(|| format!("creating slot {name}"))?
        .get(0);
    lsn(&text)
}

/// Drop a slot if it exists, waiting (up to 30 s) for its session to go away.
pub async fn drop_slot(client: &Client, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await?;
        match row {
            None => return Ok(()),
            Some(r) if !r.get::<_, bool>(0) => {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                    .await
                    .with_context(|| format!("dropping slot {name}"))?;
                return Ok(());
            }
            Some(_) if Instant::now() > deadline => bail!("slot {name} stays active"),
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

pub async fn insert_lsn(client: &Client) -> Result<Lsn> {
    let text: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    lsn(&text)
}

pub async fn slot_confirmed(client: &Client, name: &str) -> Result<Option<Lsn>> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    match row.and_then(|r| r.get::<_, Option<String>>(0)) {
        Some(t) => Ok(Some(lsn(&t)?)),
        None => Ok(None),
    }
}

/// The walsender of a slot, while one streams it.
pub async fn slot_pid(client: &Client, name: &str) -> Result<Option<i32>> {
    Ok(client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?
        .and_then(|r| r.get::<_, Option<i32>>(0)))
}

/// A non-transactional logical message: a position in the stream that kck reports once it has read it.
pub async fn emit_mark(client: &Client) -> Result<Lsn> {
    let text: String = client
        .query_one(
            "SELECT pg_logical_emit_message(false, 'kck-bench', '')::text",
            &[],
        )
        .await?
        .get(0);
    lsn(&text)
}

pub async fn reset_statements(client: &Client) -> Result<()> {
    client
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await?;
    Ok(())
}

/// Calls recorded by pg_stat_statements for statements whose text contains `needle`.
pub async fn statement_calls(client: &Client, needle: &str) -> Result<i64> {
    let pattern = format!("%{}%", needle.replace('%', "\\%"));
    Ok(client
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE query LIKE $1 AND query NOT LIKE '%pg_stat_statements%'",
            &[&pattern],
        )
        .await?
        .get(0))
}

/// Wait until a slot's confirmed position reaches `target` (kck acknowledges about once a second).
pub async fn wait_slot_confirmed(
    client: &Client,
    slot: &str,
    target: Lsn,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if slot_confirmed(client, slot)
            .await?
            .is_some_and(|c| c >= target)
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("slot {slot} did not reach {target} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until kck's refresh queries stop: no new primer query for `quiet` (and at most `timeout`).
pub async fn wait_refreshes_quiet(
    client: &Client,
    quiet: Duration,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let mut last = statement_calls(client, "row_to_json").await?;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = statement_calls(client, "row_to_json").await?;
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return Ok(since.duration_since(started));
        }
        if started.elapsed() > timeout {
            bail!("kck's refreshes did not stop within {timeout:?}");
        }
    }
}
