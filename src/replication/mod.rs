//! The replication slot and the change stream.
//!
//! [`preflight`] checks the source before anything runs (wal_level, privilege, publication, the tables the
//! primers read, the slot) and creates the slot (and, when configured, the publication). [`Stream`] then
//! reads the slot with pgwire-replication, decodes each pgoutput message ([`pgoutput`]), maps changed rows
//! to refresh tasks ([`crate::deps`]) and hands them to the store in batches.
//!
//! # Progress tracking
//!
//! Postgres is told a position (the slot's confirmed LSN) only once every task derived from changes up to
//! it is durable in the store: the stream loop fills a [`TaskBatch`]; a flusher task writes one batch at a
//! time with [`Store::enqueue`] and only then publishes the batch's `ack`, which the loop passes to
//! [`ReplicationClient::update_applied_lsn`]. A batch's `ack` is the end LSN of the last commit it
//! completes, or, between transactions, the position a keepalive reports (so a slot on a database whose
//! published tables are quiet does not hold WAL). While the flusher is busy the loop keeps collecting into
//! the next batch, up to a bound; past it, the loop stops reading, the bounded event channel fills, and the
//! server waits: the slot keeps the WAL, memory stays flat. pgwire-replication keeps sending status
//! updates meanwhile, so `wal_sender_timeout` does not end the session.
//!
//! A crash anywhere loses nothing: what was not acknowledged is sent again on restart, and the queue
//! coalesces the repeats.

pub mod pgoutput;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, oneshot, watch};

use crate::deps::{DepIndex, ResolvedTable, RowChange};
use crate::lsn::Lsn;
use crate::pg::quote_table;
use crate::pg::{ConnectError, Source, error_text};
use crate::primer::TableName;
use crate::queue::{TaskBatch, TaskKind};
use crate::store::{Store, StoreError};
use crate::visibility::VisibilityClock;
use pgoutput::{DecodeError, Message, Relation};

/// The replication side failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// Cannot parse the connection string, or cannot connect.
    #[error(transparent)]
    Source(#[from] ConnectError),
    #[error("query failed while {doing}: {}", error_text(source))]
    Query {
        doing: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "Postgres has wal_level = '{actual}', but kck needs 'logical'. Set wal_level = logical in \
         postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart Postgres."
    )]
    WalLevel { actual: String },
    #[error(
        "role '{role}' may not stream changes: it needs the REPLICATION attribute. Run: ALTER ROLE \
         \"{role}\" REPLICATION;"
    )]
    NoReplicationPrivilege { role: String },
    #[error(
        "publication '{publication}' does not exist in database '{database}'. Create it with: CREATE \
         PUBLICATION \"{publication}\" FOR TABLE {tables}; (or set source.create_publication: true)"
    )]
    PublicationMissing {
        publication: String,
        database: String,
        tables: String,
    },
    #[error(
        "publication '{publication}' does not include table(s) that primers read: {tables}. Add them \
         with: ALTER PUBLICATION \"{publication}\" ADD TABLE {tables}; (or, for a table that must not be \
         published, list it in each such primer's `not_followed` and give the primer a ttl or \
         refresh_interval)"
    )]
    TablesNotPublished { publication: String, tables: String },
    #[error(
        "replication slot '{slot}' is in use by another process (pid {pid}); is another kck running \
         with this slot? Stop it, give this one its own source.slot, or set source.standby: true to \
         wait as a hot standby that takes over when the other one dies."
    )]
    SlotInUse { slot: String, pid: String },
    #[error(
        "lost the session that marks this kck as the owner of replication slot '{slot}' (the advisory \
         lock's connection closed)"
    )]
    OwnershipLost { slot: String },
    #[error(
        "replication slot '{slot}' uses output plugin '{plugin}', not pgoutput; drop it (SELECT \
         pg_drop_replication_slot('{slot}')) or choose another source.slot"
    )]
    SlotPlugin { slot: String, plugin: String },
    #[error(
        "replication slot '{slot}' belongs to database '{database}', not this one; choose another source.slot"
    )]
    SlotOtherDatabase { slot: String, database: String },
    #[error(
        "replication slot '{slot}' was invalidated: Postgres removed WAL it still needed (wal_status = \
         lost, because it retained more than max_slot_wal_keep_size), so changes were missed and the slot \
         cannot be used again. Run `kck slot drop --config FILE --yes-drop-the-slot` (or SELECT \
         pg_drop_replication_slot('{slot}')) and start kck again: it creates a new slot and refreshes every \
         cached key. To do this automatically, set source.on_slot_lost: recreate."
    )]
    SlotLost { slot: String },
    #[error("cannot open the replication connection to {target}: {source}. {fix}")]
    Connect {
        target: String,
        /// What to change, for a person.
        fix: String,
        #[source]
        source: PgWireError,
    },
    #[error("replication stream failed: {0}")]
    Stream(#[from] PgWireError),
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] DecodeError),
    #[error("replication stream out of order: {0}")]
    Protocol(String),
    #[error("cannot queue refreshes: {0}")]
    Store(#[from] StoreError),
}

impl ReplicationError {
    /// Whether retrying (reconnecting) may help. Definite errors need a person.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Source(ConnectError::Connect { .. })
            | ReplicationError::Query { .. }
            | ReplicationError::Protocol(_)
            | ReplicationError::OwnershipLost { .. }
            | ReplicationError::Store(_) => true,
            ReplicationError::Stream(e) => !matches!(e, PgWireError::Auth(_) | PgWireError::Tls(_)),
            // The network may come back; a refused login, TLS or pg_hba needs a person.
            ReplicationError::Connect { source, .. } => {
                matches!(source, PgWireError::Io(_) | PgWireError::Task(_))
            }
            _ => false,
        }
    }
}

/// The replication connection's settings for `source`, streaming from `start`.
fn replication_config(source: &Source, start: Lsn) -> ReplicationConfig {
    ReplicationConfig::new(
        source.connect_host(),
        source.user(),
        source.password(),
        source.database(),
        source.config.slot.clone(),
        source.config.publication.clone(),
    )
    .with_port(source.port())
    .with_start_lsn(start.into())
    .with_status_interval(Duration::from_secs(1))
    .with_wakeup_interval(Duration::from_secs(1))
    .with_buffer_size(1024)
    .with_application_name("kck")
    .with_tls(source.tls.replication(source.host()))
}

/// What a process with the `replication` role is doing about the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationState {
    /// This process does not have the `replication` role.
    Off,
    /// Another process owns the slot; this one waits to take over (`source.standby: true`).
    Standby,
    /// This process owns the slot and is (re)connecting to stream from it.
    Starting,
    /// This process streams changes from the slot.
    Streaming,
}

impl ReplicationState {
    /// `off`, `standby`, `starting` or `streaming`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationState::Off => "off",
            ReplicationState::Standby => "standby",
            ReplicationState::Starting => "starting",
            ReplicationState::Streaming => "streaming",
        }
    }
}

impl std::fmt::Display for ReplicationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The slot as preflight found (or made) it.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// Where streaming resumes: every change before it is already queued.
    pub confirmed_flush: Lsn,
    pub created: bool,
}

// ---------------------------------------------------------------------------------------------------------
// The checks. Each reads one thing from the source and, where there is a rule, says what is wrong with the
// fix in the error. [`preflight`] runs them before kck starts; `kck check` (`crate::ops::check`) runs the
// same functions to report every finding at once instead of stopping at the first.

fn query_error(doing: &'static str) -> impl Fn(tokio_postgres::Error) -> ReplicationError {
    move |source| ReplicationError::Query { doing, source }
}

/// `SHOW wal_level`.
pub async fn read_wal_level(client: &tokio_postgres::Client) -> Result<String, ReplicationError> {
    Ok(client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(query_error("reading wal_level"))?
        .get(0))
}

/// kck needs `wal_level = logical`.
pub fn check_wal_level(actual: &str) -> Result<(), ReplicationError> {
    if actual == "logical" {
        Ok(())
    } else {
        Err(ReplicationError::WalLevel {
            actual: actual.to_string(),
        })
    }
}

/// The connected role and database.
#[derive(Debug, Clone)]
pub struct RoleInfo {
    pub role: String,
    /// `REPLICATION` attribute or superuser.
    pub may_replicate: bool,
    pub superuser: bool,
    pub database: String,
}

impl RoleInfo {
    /// kck's role needs the `REPLICATION` attribute.
    pub fn check(&self) -> Result<(), ReplicationError> {
        if self.may_replicate {
            Ok(())
        } else {
            Err(ReplicationError::NoReplicationPrivilege {
                role: self.role.clone(),
            })
        }
    }
}

pub async fn read_role(client: &tokio_postgres::Client) -> Result<RoleInfo, ReplicationError> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper, rolsuper, current_database()::text \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(query_error("reading the role's privileges"))?;
    Ok(RoleInfo {
        role: row.get(0),
        may_replicate: row.get(1),
        superuser: row.get(2),
        database: row.get(3),
    })
}

pub async fn publication_exists(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<bool, ReplicationError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query_error("looking for the publication"))?
        .is_some())
}

/// The tables a publication publishes.
pub async fn published_tables(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<TableName>, ReplicationError> {
    Ok(client
        .query(
            // A partitioned table is published through its partitions (or, with publish_via_partition_root,
            // as its root): both count, and the stream maps a partition to its root's dependencies.
            "WITH listed AS (SELECT format('%I.%I', schemaname, tablename)::regclass AS rel \
                             FROM pg_publication_tables WHERE pubname = $1), \
                  related AS (SELECT rel AS relid FROM listed \
                              UNION SELECT a.relid FROM listed, pg_partition_ancestors(listed.rel) a \
                              UNION SELECT t.relid FROM listed, pg_partition_tree(listed.rel) t) \
             SELECT DISTINCT n.nspname::text, c.relname::text FROM related \
             JOIN pg_class c ON c.oid = related.relid JOIN pg_namespace n ON n.oid = c.relnamespace",
            &[&publication],
        )
        .await
        .map_err(query_error("listing the publication's tables"))?
        .iter()
        .map(|r| TableName {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect())
}

/// The tables the primers read, sorted.
pub fn needed_tables(deps: &DepIndex) -> Vec<&TableName> {
    let mut tables: Vec<&TableName> = deps.tables().collect();
    tables.sort();
    tables
}

/// Tables as SQL: `"public"."a", "public"."b"`.
pub fn table_list(tables: &[&TableName]) -> String {
    tables
        .iter()
        .map(|t| quote_table(t))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every needed table must be in the publication.
pub fn check_published(
    publication: &str,
    needed: &[&TableName],
    published: &[TableName],
) -> Result<(), ReplicationError> {
    let missing: Vec<&TableName> = needed
        .iter()
        .filter(|t| !published.contains(t))
        .copied()
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ReplicationError::TablesNotPublished {
            publication: publication.to_string(),
            tables: table_list(&missing),
        })
    }
}

/// A replication slot as `pg_replication_slots` shows it, with the server's current WAL position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    /// `None` for a physical slot.
    pub plugin: Option<String>,
    pub database: Option<String>,
    /// A session streams from it now.
    pub active: bool,
    pub active_pid: Option<i32>,
    /// Everything before it is acknowledged: streaming resumes there.
    pub confirmed_flush: Option<Lsn>,
    /// The oldest WAL the slot keeps.
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (see `max_slot_wal_keep_size`).
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger of losing WAL; `None` when
    /// `max_slot_wal_keep_size` is -1 (no limit).
    pub safe_wal_size: Option<i64>,
    /// The server's current WAL position (write position; receive position on a standby).
    pub current_wal: Option<Lsn>,
}

impl SlotInfo {
    /// WAL the server keeps for this slot, in bytes.
    pub fn retained_bytes(&self) -> Option<u64> {
        Some(self.current_wal?.0.saturating_sub(self.restart_lsn?.0))
    }

    /// WAL written but not yet acknowledged by the slot's consumer, in bytes.
    pub fn lag_bytes(&self) -> Option<u64> {
        Some(self.current_wal?.0.saturating_sub(self.confirmed_flush?.0))
    }

    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }

    /// The slot must be a pgoutput slot of this database, with its WAL.
    pub fn check(&self, database: &str) -> Result<(), ReplicationError> {
        if self.plugin.as_deref() != Some("pgoutput") {
            return Err(ReplicationError::SlotPlugin {
                slot: self.name.clone(),
                plugin: self
                    .plugin
                    .clone()
                    .unwrap_or_else(|| "(physical slot)".into()),
            });
        }
        if self.database.as_deref() != Some(database) {
            return Err(ReplicationError::SlotOtherDatabase {
                slot: self.name.clone(),
                database: self.database.clone().unwrap_or_default(),
            });
        }
        if self.is_lost() {
            return Err(ReplicationError::SlotLost {
                slot: self.name.clone(),
            });
        }
        Ok(())
    }
}

/// Read the slot `slot`, if it exists.
pub async fn read_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotInfo>, ReplicationError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active, active_pid, confirmed_flush_lsn::text, \
             restart_lsn::text, wal_status, safe_wal_size, \
             (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END)::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_error("reading the replication slot"))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let lsn = |i: usize| -> Result<Option<Lsn>, ReplicationError> {
        row.get::<_, Option<String>>(i)
            .map(|t| parse_lsn(&t))
            .transpose()
    };
    Ok(Some(SlotInfo {
        name: slot.to_string(),
        plugin: row.get(0),
        database: row.get(1),
        active: row.get(2),
        active_pid: row.get(3),
        confirmed_flush: lsn(4)?,
        restart_lsn: lsn(5)?,
        wal_status: row.get(6),
        safe_wal_size: row.get(7),
        current_wal: lsn(8)?,
    }))
}

/// Create the logical slot `slot` with pgoutput; returns its consistent point.
pub async fn create_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Lsn, ReplicationError> {
    let lsn: String = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(query_error("creating the replication slot"))?
        .get(0);
    parse_lsn(&lsn)
}

/// Drop the slot `slot`; `false` if there was none. Fails if a session streams from it.
pub async fn drop_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<bool, ReplicationError> {
    let Some(info) = read_slot(client, slot).await? else {
        return Ok(false);
    };
    if info.active {
        return Err(ReplicationError::SlotInUse {
            slot: slot.to_string(),
            pid: info
                .active_pid
                .map_or_else(|| "unknown".into(), |p| p.to_string()),
        });
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(query_error("dropping the replication slot"))?;
    Ok(true)
}

/// Check the source and prepare the slot. `slot_wait` is how long to wait for a slot that another session
/// holds (a previous kck that just died) before reporting [`ReplicationError::SlotInUse`].
pub async fn preflight(
    source: &Source,
    deps: &DepIndex,
    slot_wait: Duration,
) -> Result<SlotState, ReplicationError> {
    let (client, database) = check_source_on(source, deps).await?;
    prepare_slot(source, &client, &database, slot_wait).await
}

/// Everything [`preflight`] checks except the slot (wal_level, privilege, publication and its tables), so
/// that a hot standby reports a bad source at once rather than when it takes over.
pub async fn check_source(source: &Source, deps: &DepIndex) -> Result<(), ReplicationError> {
    check_source_on(source, deps).await.map(drop)
}

/// [`check_source`]; returns the connection and the database name.
async fn check_source_on(
    source: &Source,
    deps: &DepIndex,
) -> Result<(tokio_postgres::Client, String), ReplicationError> {
    let client = source.connect().await?;
    check_wal_level(&read_wal_level(&client).await?)?;
    let role = read_role(&client).await?;
    role.check()?;

    let publication = &source.config.publication;
    let tables = needed_tables(deps);
    if !publication_exists(&client, publication).await? {
        if !source.config.create_publication {
            return Err(ReplicationError::PublicationMissing {
                publication: publication.clone(),
                database: role.database,
                tables: table_list(&tables),
            });
        }
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            crate::pg::quote_ident(publication),
            table_list(&tables)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(query_error("creating the publication"))?;
        tracing::info!(%publication, tables = %table_list(&tables), "Created the publication.");
    }
    let published = published_tables(&client, publication).await?;
    check_published(publication, &tables, &published)?;
    Ok((client, role.database))
}

/// Find the slot (or create it) and wait up to `slot_wait` for another session to release it.
async fn prepare_slot(
    source: &Source,
    client: &tokio_postgres::Client,
    database: &str,
    slot_wait: Duration,
) -> Result<SlotState, ReplicationError> {
    let slot = &source.config.slot;
    let deadline = tokio::time::Instant::now() + slot_wait;
    loop {
        let Some(info) = read_slot(client, slot).await? else {
            let confirmed_flush = create_slot(client, slot).await?;
            tracing::info!(%slot, lsn = %confirmed_flush, "Created the replication slot.");
            return Ok(SlotState {
                confirmed_flush,
                created: true,
            });
        };
        info.check(database)?;
        if info.active {
            if tokio::time::Instant::now() >= deadline {
                return Err(ReplicationError::SlotInUse {
                    slot: slot.clone(),
                    pid: info
                        .active_pid
                        .map_or_else(|| "unknown".into(), |p| p.to_string()),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        return Ok(SlotState {
            confirmed_flush: info.confirmed_flush.unwrap_or(Lsn::ZERO),
            created: false,
        });
    }
}

/// The advisory lock that marks the one kck process allowed to stream from a slot.
///
/// Postgres lets one session at a time consume a slot, but a process that finds the slot busy cannot tell
/// a live owner from one that just died, and retrying `START_REPLICATION` in a loop is noisy. So the owner
/// also holds a session-level advisory lock, `pg_try_advisory_lock(SLOT_LOCK_CLASS, hashtext(slot))`, on a
/// connection of its own for as long as it streams. Postgres releases it the moment that session ends
/// (the process died, or its connection dropped), so a hot standby polling the lock takes over within a
/// poll interval; no election of our own.
pub struct SlotLock {
    /// Kept open: the lock lives as long as this session.
    _client: tokio_postgres::Client,
    closed: watch::Receiver<bool>,
    slot: String,
}

/// Server-side TCP keepalives of the slot lock's session: a dead peer is noticed after 10 s idle plus 3
/// unanswered probes 5 s apart. (Ignored on Unix-socket connections.)
pub const SLOT_LOCK_KEEPALIVE: &str =
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3";

/// The first key of the slot lock (`'kck'` in ASCII), so that kck's locks do not collide with an
/// application's single-key advisory locks.
pub const SLOT_LOCK_CLASS: i32 = 0x006b_636b;

impl SlotLock {
    /// Open the lock's own session (without taking the lock).
    ///
    /// The session asks the server for TCP keepalives ([`SLOT_LOCK_KEEPALIVE`]): if the owner's machine
    /// vanishes without closing its connections, Postgres ends the session, and so frees the lock, within
    /// about 25 s instead of the operating system's default of hours. A process that dies on a live
    /// machine frees it at once (its kernel closes the connection).
    pub async fn connect(source: &Source) -> Result<SlotLock, ReplicationError> {
        let mut pg = source.pg.clone();
        pg.keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        let (client, connection) = pg
            .connect(source.tls.connector())
            .await
            .map_err(|e| source.connect_error(e))?;
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %crate::report::Chain(&error), "The slot lock's connection closed.");
            }
            let _ = closed_tx.send(true);
        });
        client
            .batch_execute(SLOT_LOCK_KEEPALIVE)
            .await
            .map_err(|source| ReplicationError::Query {
                doing: "setting TCP keepalives on the slot lock's session",
                source,
            })?;
        Ok(SlotLock {
            _client: client,
            closed,
            slot: source.config.slot.clone(),
        })
    }

    /// Take the lock if it is free: `true` when this session holds it (also when it already did).
    pub async fn try_lock(&self) -> Result<bool, ReplicationError> {
        Ok(self
            ._client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&SLOT_LOCK_CLASS, &self.slot],
            )
            .await
            .map_err(|source| ReplicationError::Query {
                doing: "taking the slot's advisory lock",
                source,
            })?
            .get(0))
    }

    /// The process holding the lock (for messages), or "unknown".
    pub async fn holder(source: &Source) -> String {
        let query = async {
            let client = source.connect().await.ok()?;
            let row = client
                .query_opt(
                    "SELECT l.pid::text FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted \
                     AND l.classid = $1::int4::oid AND l.objid = hashtext($2)::oid AND l.objsubid = 2 \
                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    &[&SLOT_LOCK_CLASS, &source.config.slot],
                )
                .await
                .ok()??;
            row.get::<_, Option<String>>(0)
        };
        query.await.unwrap_or_else(|| "unknown".into())
    }

    /// Wait until the lock's session ends (the lock is then gone).
    pub async fn lost(&mut self) {
        let _ = self.closed.wait_for(|closed| *closed).await;
    }

    pub fn is_lost(&self) -> bool {
        *self.closed.borrow()
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }
}

fn parse_lsn(text: &str) -> Result<Lsn, ReplicationError> {
    text.parse()
        .map_err(|e: crate::lsn::ParseLsnError| ReplicationError::Protocol(e.to_string()))
}

/// Counters of the stream, for status and logs.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Problems with the primers' dependencies found in the stream (a dependency on a dropped column),
    /// newest last, at most [`StreamStats::MAX_PROBLEMS`].
    problems: std::sync::Mutex<Vec<String>>,
    pub transactions: AtomicU64,
    pub rows: AtomicU64,
    pub tasks_queued: AtomicU64,
    /// The last position acknowledged to Postgres.
    pub acked: AtomicU64,
    /// The last position received (commit end or keepalive).
    pub received: AtomicU64,
    /// Times the flusher waited because the queue was over `refresh.max_queue` (backpressure).
    pub backpressure_waits: AtomicU64,
    /// Whether the flusher is waiting for the queue to shrink now.
    pub throttled: std::sync::atomic::AtomicBool,
    /// A session holds the slot and streams (set once START_REPLICATION is accepted, cleared when the
    /// session ends).
    pub streaming: std::sync::atomic::AtomicBool,
}

/// Bounds of the stream loop.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Tasks collected in memory before the loop waits for the store.
    pub batch_tasks: usize,
    /// The flusher waits while the store's queue holds at least this many tasks (`refresh.max_queue`).
    pub max_queue: u64,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            batch_tasks: 10_000,
            max_queue: u64::MAX,
        }
    }
}

impl StreamStats {
    pub const MAX_PROBLEMS: usize = 100;

    /// Record a problem someone must fix (also logged as an error by the caller).
    pub fn report(&self, problem: &str) {
        let mut problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if problems.iter().any(|p| p == problem) {
            return;
        }
        if problems.len() >= Self::MAX_PROBLEMS {
            problems.remove(0);
        }
        problems.push(problem.to_string());
    }

    /// The problems recorded so far.
    pub fn problems(&self) -> Vec<String> {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

struct OpenTransaction {
    xid: u32,
    final_lsn: Lsn,
    /// Some of its tasks were handed to the flusher already.
    flushed: bool,
}

/// One replication session: reads the slot until `shutdown` or an error.
pub struct Stream {
    pub source: Source,
    pub deps: Arc<DepIndex>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<VisibilityClock>,
    pub stats: Arc<StreamStats>,
    pub limits: StreamLimits,
    /// Set to [`ReplicationState::Streaming`] once a session streams.
    pub state: Arc<watch::Sender<ReplicationState>>,
}

impl Stream {
    /// Stream from the slot's confirmed position `start` until `shutdown` becomes true (then flush what was
    /// read, acknowledge it, and return `Ok`) or the session fails.
    /// `started` is taken and signalled once the server accepted START_REPLICATION (the slot is held).
    pub async fn run(
        &self,
        start: Lsn,
        shutdown: watch::Receiver<bool>,
        started: &mut Option<oneshot::Sender<()>>,
    ) -> Result<(), ReplicationError> {
        let mut client =
            ReplicationClient::connect(replication_config(&self.source, start)).await?;
        if let Err(e) = client.wait_started().await {
            return Err(slot_error(e, &self.source));
        }
        self.state.send_replace(ReplicationState::Streaming);
        if let Some(started) = started.take() {
            let _ = started.send(());
        }
        self.stats.streaming.store(true, Ordering::Relaxed);
        let result = self.stream(client, start, shutdown).await;
        self.stats.streaming.store(false, Ordering::Relaxed);
        result
    }

    async fn stream(
        &self,
        mut client: ReplicationClient,
        start: Lsn,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ReplicationError> {
        tracing::info!(slot = %self.source.config.slot, from = %start, "Streaming changes.");

        // (tasks, ack, continues a transaction that has tasks queued already).
        let (batch_tx, mut batch_rx) =
            mpsc::channel::<(Vec<crate::store::Task>, Option<Lsn>, bool)>(1);
        let (durable_tx, mut durable_rx) = watch::channel(start);
        let store = self.store.clone();
        let stats = self.stats.clone();
        let max_queue = self.limits.max_queue;
        let mut flusher_shutdown = shutdown.clone();
        let flusher = tokio::spawn(async move {
            while let Some((tasks, ack, continues)) = batch_rx.recv().await {
                if !tasks.is_empty() {
                    // A transaction's tasks can run only once its commit is read: holding back the rest
                    // of a transaction whose first tasks are queued could wait for ever (they fill the
                    // queue and wait for the commit). So a transaction waits for room before its first
                    // tasks are queued, and the rest of it follows: the bound holds between transactions,
                    // and one transaction larger than it is queued whole.
                    if !continues {
                        wait_for_room(store.as_ref(), max_queue, &stats, &mut flusher_shutdown)
                            .await;
                    }
                    let n = tasks.len() as u64;
                    store.enqueue(tasks).await?;
                    stats.tasks_queued.fetch_add(n, Ordering::Relaxed);
                }
                if let Some(ack) = ack {
                    durable_tx.send_if_modified(|d| {
                        let raise = ack > *d;
                        if raise {
                            *d = ack;
                        }
                        raise
                    });
                }
            }
            Ok::<(), StoreError>(())
        });

        let mut session = Session {
            stream: self,
            relations: HashMap::new(),
            warned: std::collections::HashSet::new(),
            open: None,
            batch: TaskBatch::new(self.limits.batch_tasks),
            row_tasks: Vec::new(),
            catalog_client: None,
        };
        let result = loop {
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break Ok(());
                    }
                }
                Ok(()) = durable_rx.changed() => {
                    let durable = *durable_rx.borrow_and_update();
                    client.update_applied_lsn(durable.into());
                    self.stats.acked.store(durable.0, Ordering::Relaxed);
                }
                permit = batch_tx.reserve(), if !session.batch.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            let (tasks, ack) = session.batch.take();
                            // Its transaction has tasks queued already: see the flusher.
                            let continues = session.open.as_ref().is_some_and(|t| t.flushed);
                            if let Some(open) = &mut session.open {
                                open.flushed = true;
                            }
                            permit.send((tasks, ack, continues));
                        }
                        Err(_) => break Err(ReplicationError::Protocol("the queue writer stopped".into())),
                    }
                }
                event = client.recv(), if !session.batch.is_full() => {
                    match event {
                        Ok(Some(event)) => {
                            if let Err(e) = session.handle(event).await {
                                break Err(e);
                            }
                        }
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e.into()),
                    }
                }
            }
        };

        // Hand over what was read, wait until it is durable, acknowledge it, and close the session.
        let rest = session.batch.take();
        let flushed = if result.is_ok() && (!rest.0.is_empty() || rest.1.is_some()) {
            batch_tx.send((rest.0, rest.1, false)).await.is_ok()
        } else {
            true
        };
        drop(batch_tx);
        let flush_result = flusher
            .await
            .map_err(|e| ReplicationError::Protocol(format!("queue writer failed: {e}")))?;
        let durable = *durable_rx.borrow();
        client.update_applied_lsn(durable.into());
        self.stats.acked.store(durable.0, Ordering::Relaxed);
        if result.is_ok() {
            // The client reports a raised position at most once per status interval, and stopping does
            // not report it: wait (boundedly) until it went out, so that the slot keeps what was made
            // durable and a restart does not read it again.
            let metrics = client.metrics();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while Lsn::from(metrics.last_applied_lsn()) < durable
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown()).await;
        } else {
            client.abort();
        }
        flush_result?;
        if !flushed {
            return Err(ReplicationError::Protocol(
                "the queue writer stopped".into(),
            ));
        }
        result
    }
}

/// Backpressure: wait while the queue holds `max_queue` tasks or more (or until shutdown, when what was read
/// is written anyway so that it can be acknowledged). Not called for the rest of a transaction whose first
/// tasks are queued (see the flusher). Meanwhile the stream loop fills its batch and stops
/// reading, and the slot keeps the WAL.
async fn wait_for_room(
    store: &dyn Store,
    max_queue: u64,
    stats: &StreamStats,
    shutdown: &mut watch::Receiver<bool>,
) {
    if max_queue == u64::MAX {
        return;
    }
    let mut waiting = false;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let depth = match store.queue_depth().await {
            Ok(depth) => depth,
            Err(error) => {
                tracing::warn!(error = %crate::report::Chain(&error), "Cannot read the queue's size; writing without waiting.");
                break;
            }
        };
        if depth < max_queue {
            break;
        }
        if !waiting {
            waiting = true;
            stats.backpressure_waits.fetch_add(1, Ordering::Relaxed);
            stats.throttled.store(true, Ordering::Relaxed);
            tracing::info!(
                depth,
                max_queue,
                "The refresh queue is full: reading changes pauses until the workers catch up (the slot \
                 keeps the WAL). Add workers, or raise refresh.max_queue if the store has room."
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    if waiting {
        stats.throttled.store(false, Ordering::Relaxed);
        tracing::debug!("The refresh queue has room again; reading changes.");
    }
}

/// Open a replication connection to `source` as the stream does (same TLS, same authentication) and run
/// `IDENTIFY_SYSTEM` on it, then close it: what `kck check` runs so that whatever would stop `kck run` on
/// this connection (pg_hba's `replication` line, the auth method, TLS) stops check too.
pub async fn probe(
    source: &Source,
) -> Result<pgwire_replication::IdentifySystem, ReplicationError> {
    let connect = async {
        let mut client = ReplicationClient::connect_gated(replication_config(source, Lsn::ZERO))
            .await
            .map_err(|e| connect_error(e, source))?;
        let system = client
            .identify_system()
            .await
            .map_err(|e| connect_error(e, source))?;
        client.abort();
        Ok(system)
    };
    match tokio::time::timeout(Duration::from_secs(15), connect).await {
        Ok(result) => result,
        Err(_) => Err(connect_error(
            PgWireError::Io(std::sync::Arc::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in 15 s",
            ))),
            source,
        )),
    }
}

/// `e`, from opening the replication connection, with what a person should change.
pub fn connect_error(e: PgWireError, source: &Source) -> ReplicationError {
    let fix = connect_fix(&e, source);
    ReplicationError::Connect {
        target: source.display(),
        fix,
        source: e,
    }
}

fn connect_fix(e: &PgWireError, source: &Source) -> String {
    crate::pg::connect_fix(&e.to_string(), source)
}

fn slot_error(e: PgWireError, source: &Source) -> ReplicationError {
    let slot = source.config.slot.as_str();
    let text = e.to_string();
    if text.contains("is active for PID") {
        let pid = text
            .split("is active for PID")
            .nth(1)
            .map(|s| {
                s.trim()
                    .trim_end_matches(|c: char| !c.is_ascii_digit())
                    .to_string()
            })
            .unwrap_or_default();
        return ReplicationError::SlotInUse {
            slot: slot.to_string(),
            pid,
        };
    }
    match e {
        // Refused at the door (SQLSTATE class 28: pg_hba, password, role), or TLS: a person must act.
        PgWireError::Server(ref m) if m.contains("SQLSTATE 28") || m.contains("pg_hba") => {
            connect_error(e, source)
        }
        PgWireError::Auth(_) | PgWireError::Tls(_) => connect_error(e, source),
        e => e.into(),
    }
}

struct Session<'a> {
    stream: &'a Stream,
    relations: HashMap<u32, (Relation, ResolvedTable)>,
    warned: std::collections::HashSet<String>,
    open: Option<OpenTransaction>,
    batch: TaskBatch,
    /// Reused buffer for one row's tasks.
    row_tasks: Vec<TaskKind>,
    /// An ordinary connection for catalogue questions (a partition's ancestors), opened when first needed.
    catalog_client: Option<tokio_postgres::Client>,
}

impl Session<'_> {
    async fn handle(&mut self, event: ReplicationEvent) -> Result<(), ReplicationError> {
        match event {
            ReplicationEvent::Begin { final_lsn, xid, .. } => {
                if self.open.is_some() {
                    return Err(ReplicationError::Protocol(
                        "BEGIN inside a transaction".into(),
                    ));
                }
                self.open = Some(OpenTransaction {
                    xid,
                    final_lsn: final_lsn.into(),
                    flushed: false,
                });
            }
            ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                let Some(open) = self.open.take() else {
                    return Err(ReplicationError::Protocol("COMMIT without BEGIN".into()));
                };
                let (lsn, end_lsn) = (Lsn::from(lsn), Lsn::from(end_lsn));
                if lsn != open.final_lsn {
                    return Err(ReplicationError::Protocol(format!(
                        "COMMIT at {lsn} does not match BEGIN's final LSN {}",
                        open.final_lsn
                    )));
                }
                self.stream.clock.record_commit(end_lsn, open.xid).await;
                self.batch.advance_ack(end_lsn);
                let stats = &self.stream.stats;
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                stats.received.fetch_max(end_lsn.0, Ordering::Relaxed);
            }
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::decode(&data)?;
                self.handle_message(message).await?;
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if self.open.is_none() {
                    self.idle_position(wal_end.into());
                }
            }
            // A non-transactional message (`pg_logical_emit_message(false, ...)`) is sent when the decoder
            // reaches it, after every commit before it: between transactions it is a position as safe to
            // acknowledge as a keepalive's, and it lets a client wait until kck has read up to it.
            ReplicationEvent::Message {
                transactional: false,
                lsn,
                ..
            } if self.open.is_none() => self.idle_position(lsn.into()),
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// The server vouched, between transactions, that every commit before `lsn` was sent.
    fn idle_position(&mut self, lsn: Lsn) {
        self.batch.advance_ack(lsn);
        self.stream.clock.record_idle(lsn);
        self.stream
            .stats
            .received
            .fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// The LSN tasks from the current message carry: the open transaction's commit LSN.
    fn lsn(&self) -> Lsn {
        self.open
            .as_ref()
            .map_or(self.stream.clock.visible(), |t| t.final_lsn)
    }

    /// The nearest ancestor of `table` that some primer depends on, when `table` is a partition (the stream
    /// names partitions, not their root, unless the publication publishes via the root). Asked of Postgres
    /// at each Relation message of a table no primer names, so partitions attached later are followed too.
    /// An error ends the session (it reconnects): not knowing could leave keys stale.
    async fn followed_ancestor(
        &mut self,
        table: &TableName,
    ) -> Result<Option<TableName>, ReplicationError> {
        if self.catalog_client.as_ref().is_none_or(|c| c.is_closed()) {
            self.catalog_client = Some(self.stream.source.connect().await?);
        }
        let Some(client) = &self.catalog_client else {
            return Ok(None);
        };
        let ancestors = crate::pg::partition_ancestors(client, table)
            .await
            .map_err(query_error("reading a partition's ancestors"))?;
        Ok(ancestors
            .into_iter()
            .find(|a| a != table && self.stream.deps.follows(a)))
    }

    async fn handle_message(&mut self, message: Message) -> Result<(), ReplicationError> {
        let stream: &Stream = self.stream;
        let deps = &stream.deps;
        let lsn = self.lsn();
        match message {
            Message::Relation(relation) => {
                let own = TableName {
                    schema: relation.namespace.clone(),
                    name: relation.name.clone(),
                };
                let resolved = if deps.follows(&own) {
                    deps.resolve(&relation)
                } else if let Some(ancestor) = self.followed_ancestor(&own).await? {
                    tracing::debug!(partition = %own, root = %ancestor, "Following a partition as its root.");
                    deps.resolve_as(&relation, ancestor)
                } else {
                    deps.resolve(&relation)
                };
                let table = resolved.table.clone();
                for error in &resolved.errors {
                    tracing::error!(table = %table, "{error}");
                    self.stream.stats.report(error);
                }
                for warning in &resolved.warnings {
                    if self.warned.insert(warning.clone()) {
                        tracing::warn!(table = %table, "{warning}");
                    }
                }
                let changed = self
                    .relations
                    .get(&relation.id)
                    .is_some_and(|(old, _)| !same_shape(old, &relation));
                if changed {
                    tracing::info!(table = %table, "Table changed shape; refreshing every key that reads it.");
                    for primer in deps.primers_reading(&table) {
                        let kind = TaskKind::Primer {
                            primer: primer.to_string(),
                            after: None,
                        };
                        self.batch.add(&kind, lsn);
                    }
                }
                self.relations.insert(relation.id, (relation, resolved));
            }
            Message::Insert { relation_id, new } => {
                self.map(relation_id, lsn, RowChange::Insert { new: &new })
                    .await?;
            }
            Message::Update {
                relation_id,
                old,
                old_is_key,
                new,
            } => {
                let change = RowChange::Update {
                    old: old.as_ref(),
                    old_is_key,
                    new: &new,
                };
                self.map(relation_id, lsn, change).await?;
            }
            Message::Delete {
                relation_id,
                old,
                old_is_key,
            } => {
                self.map(
                    relation_id,
                    lsn,
                    RowChange::Delete {
                        old: &old,
                        old_is_key,
                    },
                )
                .await?;
            }
            Message::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    let Some((_, resolved)) = self.relations.get(&id) else {
                        continue;
                    };
                    for primer in deps.primers_reading(&resolved.table) {
                        let kind = TaskKind::Primer {
                            primer: primer.to_string(),
                            after: None,
                        };
                        self.batch.add(&kind, lsn);
                    }
                }
            }
            Message::Begin { .. }
            | Message::Commit { .. }
            | Message::Origin { .. }
            | Message::Type { .. }
            | Message::LogicalMessage { .. } => {}
        }
        Ok(())
    }

    /// Map a changed row to tasks and add them to the batch. A key nobody cached (not registered) is not
    /// queued: computing it would be waste, and a fetch that registers it later computes it from a snapshot
    /// that sees this change (see [`crate::refresh::Refresher::prime`]).
    async fn map(
        &mut self,
        relation_id: u32,
        lsn: Lsn,
        change: RowChange<'_>,
    ) -> Result<(), ReplicationError> {
        self.stream.stats.rows.fetch_add(1, Ordering::Relaxed);
        let Some((_, resolved)) = self.relations.get(&relation_id) else {
            // pgoutput always describes a table before its first change in a session; a change to an
            // unknown table cannot be mapped, so refresh every primer rather than lose it.
            tracing::error!(
                relation_id,
                "Change to a table the stream never described; refreshing all primers."
            );
            for primer in &self.stream.deps.catalog().primers {
                let kind = TaskKind::Primer {
                    primer: primer.name.clone(),
                    after: None,
                };
                self.batch.add(&kind, lsn);
            }
            return Ok(());
        };
        if !resolved.is_relevant() {
            return Ok(());
        }
        let mut kinds = std::mem::take(&mut self.row_tasks);
        self.stream
            .deps
            .map_row(resolved, change, &mut |kind| kinds.push(kind));
        for kind in kinds.drain(..) {
            if let TaskKind::Key(key) = &kind
                && !self.stream.store.is_registered(key).await?
            {
                continue;
            }
            self.batch.add(&kind, lsn);
        }
        self.row_tasks = kinds;
        Ok(())
    }
}

/// Whether two descriptions of a table have the same columns (names and types) and identity.
fn same_shape(a: &Relation, b: &Relation) -> bool {
    a.namespace == b.namespace
        && a.name == b.name
        && a.replica_identity == b.replica_identity
        && a.columns.len() == b.columns.len()
        && a.columns
            .iter()
            .zip(&b.columns)
            .all(|(x, y)| x.name == y.name && x.type_oid == y.type_oid && x.flags == y.flags)
}
