//! kck: a cache that keeps itself fresh from Postgres logical replication.
//!
//! See `ARCHITECTURE.md` for the code map. Data flows one way:
//! [`replication`] → [`deps`] → [`queue`] → [`refresh`] → [`store`] ← [`http`].

pub mod app;
pub mod config;
pub mod deps;
pub mod http;
pub mod invalidate;
pub mod jobs;
pub mod lsn;
pub mod ops;
pub mod primer;
pub mod queue;
pub mod refresh;
pub mod replication;
pub mod schedule;
pub mod store;
pub mod visibility;
