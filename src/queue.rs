//! Refresh tasks.
