//! Refresh workers.
