//! Helpers shared by the integration tests.
//!
//! Use from a file in `tests/` with:
//!
//! ```ignore
//! mod support;
//! use support::pg;
//!
//! #[tokio::test]
//! async fn something() {
//!     let db = pg::cluster().await.new_database().await;
//!     db.execute_batch("CREATE TABLE t (id int primary key)").await;
//!     // ... db.url, db.client().await ...
//!     db.cleanup().await;
//! }
//! ```
//!
//! Each test binary compiles its own copy and so gets its own Postgres cluster, started on first use
//! and stopped when the binary exits. Environment: `PG_BIN` (where initdb and postgres are; default
//! `/usr/lib/postgresql/15/bin`), `KCK_TEST_PG_KEEP_LOG=1` (keep each server log as
//! `/tmp/kck-pg-<port>.log`). See `pg.rs` for the details.

// Every test binary uses a different subset of the helpers.
#![allow(dead_code)]

pub mod alone;
pub mod kck;
pub mod pg;
