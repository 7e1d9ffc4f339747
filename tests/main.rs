//! The integration tests: one binary, one module per area, all sharing the Postgres cluster that
//! `support::pg::cluster()` starts on first use (each test on its own database and its own slot).
//!
//! Run one area with `cargo test --test main http::`, one test with its full path.

mod support;

mod abuse;
mod backpressure;
mod corpus;
mod docker;
mod harness;
mod http;
mod infer;
mod js;
mod ops;
mod orm;
mod pipeline;
mod refresh;
mod scylla;
mod standby;
mod start;
mod store_cli;
mod tls;
