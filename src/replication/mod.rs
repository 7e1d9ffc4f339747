//! The replication slot and the change stream.
pub mod pgoutput;
