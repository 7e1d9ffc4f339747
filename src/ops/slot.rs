//! The slot's life: preparing it under the `source.on_slot_lost` policy, warning when it keeps too much
//! WAL, and dropping it on request.
//!
//! A logical slot makes Postgres keep every WAL segment its consumer has not acknowledged. A kck that is
//! stopped, or stuck, therefore makes WAL pile up on the database server's disk. Postgres can cap this
//! (`max_slot_wal_keep_size`): past the cap it *invalidates* the slot (`wal_status = lost`), the WAL is
//! removed and the slot can never stream again, because changes were missed. kck then either stops with
//! an error that says what to do (`on_slot_lost: fail`, the default) or drops the slot, creates it again
//! and refreshes every cached key (`on_slot_lost: recreate`): the cache is rebuilt from the database as it
//! is now, so nothing stays stale.

use std::time::Duration;

use crate::deps::DepIndex;
use crate::lsn::Lsn;
use crate::ops::size::format_bytes;
use crate::pg::SlotLostPolicy;
use crate::pg::Source;
use crate::primer::Catalog;
use crate::queue::TaskKind;
use crate::replication::{self, ReplicationError, SlotInfo, SlotState};
use crate::store::Task;
use crate::telemetry::Telemetry;

/// [`replication::preflight`] under the `on_slot_lost` policy, then the retained-WAL check.
pub async fn prepare(
    source: &Source,
    deps: &DepIndex,
    slot_wait: Duration,
    telemetry: &Telemetry,
) -> Result<SlotState, ReplicationError> {
    let state = match replication::preflight(source, deps, slot_wait).await {
        Err(ReplicationError::SlotLost { slot })
            if source.config.on_slot_lost == SlotLostPolicy::Recreate =>
        {
            let message = format!(
                "Replication slot '{slot}' was invalidated (wal_status = lost): Postgres removed WAL it \
                 still needed, so changes were missed. source.on_slot_lost is 'recreate': dropping the \
                 slot, creating it again and refreshing every cached key. To keep this from happening, \
                 give max_slot_wal_keep_size more room or keep kck from stopping for long."
            );
            tracing::error!(%slot, "{message}");
            telemetry.events.error("slot", message);
            let client = source.connect().await?;
            replication::drop_slot(&client, &slot).await?;
            let state = replication::preflight(source, deps, slot_wait).await?;
            telemetry.events.warn(
                "slot",
                format!(
                    "Slot '{slot}' was created again at {}; every cached key is being refreshed.",
                    state.confirmed_flush
                ),
            );
            state
        }
        Err(error @ ReplicationError::SlotLost { .. }) => {
            tracing::error!("{error}");
            telemetry.events.error("slot", error.to_string());
            return Err(error);
        }
        other => other?,
    };
    match source.connect().await {
        Ok(client) => match replication::read_slot(&client, &source.config.slot).await {
            Ok(Some(info)) => {
                warn_if_retaining(&info, source.config.max_retained_wal, telemetry);
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(error = %crate::report::Chain(&error), "Cannot read the slot's retained WAL.")
            }
        },
        Err(error) => {
            tracing::warn!(error = %crate::report::Chain(&error), "Cannot read the slot's retained WAL.")
        }
    }
    Ok(state)
}

/// Warn (log and event) when the slot keeps more WAL than `max` bytes. Returns whether it does.
pub fn warn_if_retaining(info: &SlotInfo, max: u64, telemetry: &Telemetry) -> bool {
    let Some(retained) = info.retained_bytes() else {
        return false;
    };
    if retained <= max {
        return false;
    }
    let message = retained_message(info, retained, max);
    tracing::warn!(slot = %info.name, retained_bytes = retained, "{message}");
    telemetry.events.warn("slot", message);
    true
}

/// The warning about a slot that keeps `retained` bytes of WAL, more than `max`.
pub fn retained_message(info: &SlotInfo, retained: u64, max: u64) -> String {
    let safe = match info.safe_wal_size {
        Some(safe) if safe <= 0 => {
            " Postgres is about to invalidate it (safe_wal_size is used up).".to_string()
        }
        Some(safe) => format!(
            " Postgres invalidates it after {} more (max_slot_wal_keep_size).",
            format_bytes(safe as u64)
        ),
        None => " max_slot_wal_keep_size is -1, so nothing limits it but the disk.".to_string(),
    };
    format!(
        "Replication slot '{}' retains {} of WAL, more than source.max_retained_wal ({}).{safe} Postgres \
         keeps WAL until kck acknowledges it: if kck is catching up after a stop this shrinks on its own \
         (watch kck_slot_retained_wal_bytes); if kck is stuck, see `kck status`; if this slot is no longer \
         used, drop it with `kck slot drop --config FILE --yes-drop-the-slot`.",
        info.name,
        format_bytes(retained),
        format_bytes(max),
    )
}

/// Tasks that refresh every cached key of every primer (after the slot was created: changes made while
/// no slot existed were not seen).
pub fn rebuild_tasks(catalog: &Catalog, lsn: Lsn) -> Vec<Task> {
    catalog
        .primers
        .iter()
        .map(|p| {
            TaskKind::Primer {
                primer: p.name.clone(),
                after: None,
            }
            .task(lsn)
        })
        .collect()
}

/// What `kck slot drop` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    Dropped { retained: Option<u64> },
    NoSuchSlot,
}

/// Drop the configured slot (refused while a session streams from it).
pub async fn drop_configured_slot(source: &Source) -> Result<Dropped, ReplicationError> {
    let client = source.connect().await?;
    let slot = &source.config.slot;
    let retained = replication::read_slot(&client, slot)
        .await?
        .and_then(|i| i.retained_bytes());
    if replication::drop_slot(&client, slot).await? {
        tracing::warn!(%slot, "Dropped the replication slot.");
        Ok(Dropped::Dropped { retained })
    } else {
        Ok(Dropped::NoSuchSlot)
    }
}
