//! Helpers shared by the integration tests.
//!
//! Use from a module of `tests/main.rs` (a file in `tests/` named in `main.rs`) with:
//!
//! ```ignore
//! use crate::support::pg;
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
//! The integration tests are one binary (`tests/main.rs`), so all of them share one Postgres cluster,
//! started on first use and stopped when the binary exits; each test works in its own database and names
//! its replication slot after it (slots are cluster-wide). A test that needs other server settings starts
//! a cluster of its own with `pg::separate_cluster`; one that measures its own process runs alone in a
//! child process (`alone`). Environment: `PG_BIN` (where initdb and postgres are; default
//! `/usr/lib/postgresql/15/bin`), `KCK_TEST_PG_KEEP_LOG=1` (keep each server log as
//! `/tmp/kck-pg-<port>.log`). See `pg.rs` for the details.

/// A size line of `/proc/{pid}/status` in KiB (`pid` may be `self`; `field` e.g. `VmRSS`). Linux only.
pub fn proc_status_kib(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

pub mod alone;
pub mod certs;
pub mod kck;
pub mod pg;
