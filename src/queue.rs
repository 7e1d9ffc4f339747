//! Refresh tasks: what the queue holds, and the batch the replication stream fills.
//!
//! A task's id *is* its meaning ([`TaskKind`]): the store coalesces on it, so two changes that need the same
//! work become one pending task (with the newer LSN). The replication stream collects tasks in a
//! [`TaskBatch`] (deduplicated in memory, bounded) and hands it to the store in one durable write.
//!
//! **Architecture invariant:** nothing here does IO.

use std::collections::HashMap;

use crate::lsn::Lsn;
use crate::store::Task;

/// What one queued task asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// Recompute one cached key (canonical key text).
    Key(String),
    /// Run a dependency's lookup query for the values of a changed row, then refresh the keys it returns.
    Lookup {
        primer: String,
        dependency: usize,
        args: Vec<Option<String>>,
    },
    /// Refresh every cached key of a primer, one page at a time: keys after `after`.
    Primer {
        primer: String,
        after: Option<String>,
    },
}

const SEP: char = '\u{1f}';

/// A task id could not be read (written by another version of kck, or corrupt).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable refresh task id {0:?}")]
pub struct BadTaskId(pub String);

impl TaskKind {
    /// The id the store coalesces on.
    pub fn id(&self) -> String {
        match self {
            TaskKind::Key(key) => format!("k{SEP}{key}"),
            TaskKind::Lookup {
                primer,
                dependency,
                args,
            } => {
                // serde_json cannot fail on a Vec<Option<String>>.
                let args = serde_json::to_string(args).unwrap_or_default();
                format!("l{SEP}{primer}{SEP}{dependency}{SEP}{args}")
            }
            TaskKind::Primer {
                primer,
                after: None,
            } => format!("p{SEP}{primer}"),
            TaskKind::Primer {
                primer,
                after: Some(after),
            } => format!("p{SEP}{primer}{SEP}{after}"),
        }
    }

    /// Read a task id back.
    pub fn parse(id: &str) -> Result<TaskKind, BadTaskId> {
        let bad = || BadTaskId(id.to_string());
        let (tag, rest) = id.split_once(SEP).ok_or_else(bad)?;
        match tag {
            "k" => Ok(TaskKind::Key(rest.to_string())),
            "p" => Ok(match rest.split_once(SEP) {
                None => TaskKind::Primer {
                    primer: rest.to_string(),
                    after: None,
                },
                Some((primer, after)) => TaskKind::Primer {
                    primer: primer.to_string(),
                    after: Some(after.to_string()),
                },
            }),
            "l" => {
                let mut parts = rest.splitn(3, SEP);
                let primer = parts.next().ok_or_else(bad)?;
                let dependency = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
                let args =
                    serde_json::from_str(parts.next().ok_or_else(bad)?).map_err(|_| bad())?;
                Ok(TaskKind::Lookup {
                    primer: primer.to_string(),
                    dependency,
                    args,
                })
            }
            _ => Err(bad()),
        }
    }

    /// A task for one change at `lsn` (its floor is `lsn`).
    pub fn task(&self, lsn: Lsn) -> Task {
        Task::new(self.id(), lsn)
    }
}

/// Tasks collected from the stream and not yet handed to the store, deduplicated by id: a task keeps the
/// newest LSN that asked for it and, as its floor, the oldest (see [`Task::floor`]).
///
/// The caller flushes it when [`TaskBatch::is_full`], so memory stays bounded however large a transaction
/// is; `ack` is the position Postgres may be told once this batch (and every one before it) is durable.
#[derive(Debug, Default)]
pub struct TaskBatch {
    /// id → (floor, lsn).
    tasks: HashMap<String, (Lsn, Lsn)>,
    /// Commit end LSN (or idle keepalive position) up to which every change's tasks are in this batch or an
    /// earlier one.
    pub ack: Option<Lsn>,
    limit: usize,
}

impl TaskBatch {
    pub fn new(limit: usize) -> TaskBatch {
        TaskBatch {
            tasks: HashMap::new(),
            ack: None,
            limit: limit.max(1),
        }
    }

    pub fn add(&mut self, kind: &TaskKind, lsn: Lsn) {
        let slot = self.tasks.entry(kind.id()).or_insert((lsn, lsn));
        slot.0 = slot.0.min(lsn);
        slot.1 = slot.1.max(lsn);
    }

    pub fn advance_ack(&mut self, lsn: Lsn) {
        self.ack = Some(self.ack.map_or(lsn, |a| a.max(lsn)));
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_full(&self) -> bool {
        self.tasks.len() >= self.limit
    }

    /// Nothing to write and nothing to acknowledge.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty() && self.ack.is_none()
    }

    /// Take the contents, leaving an empty batch with the same limit.
    pub fn take(&mut self) -> (Vec<Task>, Option<Lsn>) {
        let tasks = self
            .tasks
            .drain()
            .map(|(id, (floor, lsn))| Task { id, lsn, floor })
            .collect();
        (tasks, self.ack.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_round_trip() {
        let kinds = [
            TaskKind::Key("orders_by_user/42".into()),
            TaskKind::Key("p/a%2Fb".into()),
            TaskKind::Lookup {
                primer: "orders_by_user".into(),
                dependency: 1,
                args: vec![Some("7".into()), None, Some("x\u{1f}y".into())],
            },
            TaskKind::Primer {
                primer: "user".into(),
                after: None,
            },
            TaskKind::Primer {
                primer: "user".into(),
                after: Some("user/9".into()),
            },
        ];
        for kind in kinds {
            assert_eq!(TaskKind::parse(&kind.id()), Ok(kind.clone()), "{kind:?}");
        }
        assert!(TaskKind::parse("zzz").is_err());
        assert!(TaskKind::parse("l\u{1f}p\u{1f}x\u{1f}[]").is_err());
    }

    #[test]
    fn batch_coalesces_and_keeps_newest_lsn() {
        let mut batch = TaskBatch::new(2);
        let a = TaskKind::Key("a/1".into());
        batch.add(&a, Lsn(5));
        batch.add(&a, Lsn(9));
        batch.add(&a, Lsn(7));
        assert_eq!(batch.task_count(), 1);
        assert!(!batch.is_full());
        batch.add(&TaskKind::Key("a/2".into()), Lsn(1));
        assert!(batch.is_full());
        batch.advance_ack(Lsn(10));
        batch.advance_ack(Lsn(8));
        let (mut tasks, ack) = batch.take();
        tasks.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(ack, Some(Lsn(10)));
        assert_eq!(tasks[0].lsn, Lsn(9));
        assert_eq!(tasks[0].floor, Lsn(5), "the floor is the oldest change");
        assert_eq!((tasks[1].floor, tasks[1].lsn), (Lsn(1), Lsn(1)));
        assert!(batch.is_empty());
    }
}
