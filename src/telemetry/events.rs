//! Recent problems, for `/status` and the dashboard: a small ring of warnings and errors that kck also
//! logged. A repeat of the newest entry (same source and message) is counted rather than stored again, so a
//! primer failing on every key does not push everything else out.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;

/// One recorded problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When it last happened (ms since the Unix epoch).
    pub at_ms: i64,
    /// When it first happened, if it repeated.
    pub first_at_ms: i64,
    /// `error` or `warn`.
    pub level: String,
    /// What it concerns: `replication`, `slot`, `primer user`, ...
    pub source: String,
    pub message: String,
    /// How many times in a row it happened.
    pub count: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct EventLog {
    events: Mutex<VecDeque<Event>>,
    capacity: usize,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new(100)
    }
}

impl EventLog {
    pub fn new(capacity: usize) -> EventLog {
        EventLog {
            events: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        }
    }

    pub fn error(&self, source: impl Into<String>, message: impl Into<String>) {
        self.push("error", source.into(), message.into());
    }

    pub fn warn(&self, source: impl Into<String>, message: impl Into<String>) {
        self.push("warn", source.into(), message.into());
    }

    fn push(&self, level: &str, source: String, message: String) {
        let now = now_ms();
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = events.back_mut()
            && last.source == source
            && last.message == message
            && last.level == level
        {
            last.count += 1;
            last.at_ms = now;
            return;
        }
        if events.len() == self.capacity {
            events.pop_front();
        }
        events.push_back(Event {
            at_ms: now,
            first_at_ms: now,
            level: level.to_string(),
            source,
            message,
            count: 1,
        });
    }

    /// The newest first.
    pub fn recent(&self, limit: usize) -> Vec<Event> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.iter().rev().take(limit).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_counted_and_the_ring_is_bounded() {
        let log = EventLog::new(2);
        log.error("primer a", "boom");
        log.error("primer a", "boom");
        log.warn("slot", "big");
        log.error("primer b", "bang");
        let recent = log.recent(10);
        assert_eq!(recent.len(), 2);
        assert_eq!(recent[0].source, "primer b");
        assert_eq!(recent[1].source, "slot");
        let log = EventLog::new(5);
        log.error("primer a", "boom");
        log.error("primer a", "boom");
        assert_eq!(log.recent(10)[0].count, 2);
    }
}
