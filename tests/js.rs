//! The TypeScript client (`clients/js`) against a real kck and Postgres: this test starts both,
//! builds the package (`npm ci` when `node_modules` is missing or stale, then `npm run build`: tsc,
//! and esbuild for the React example) and runs its node tests (`node --test`), which write to
//! Postgres with psql and, when Chromium is installed, drive the example pages in headless
//! Chromium. Without node or npm it says it was skipped and passes.
//!
//! What the node tests check is in `clients/js/test/`: reads and writes, a subscription seeing a
//! change made in Postgres, resume after a dropped connection losing nothing, access rules (403,
//! 401, a renewed token), a half-open connection replaced, and both example pages (React-free and
//! React, whose `stale` shows while kck is out of reach) following a psql change, the React-free one
//! also from another origin (`cors_origins: ["*"]`), resuming after a cut with `Last-Event-ID`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::support::kck::{start, write_config};
use crate::support::pg::{bin_dir, database};
use kck::config::Config;

const SCHEMA: &str = r#"
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
INSERT INTO users SELECT i, 'user ' || i FROM generate_series(1, 20) i;
CREATE PUBLICATION kck_js FOR TABLE users;
"#;

const PRIMERS: &str = r#"
  - name: user
    key: "user/{id:int}"
    shape: row
    query: "SELECT id, name FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
  - name: my_user
    key: "my_user/{id:int}"
    shape: row
    query: "SELECT id, name FROM users WHERE id = $1"
    access: { match: { sub: id } }
    depends_on:
      - table: users
        columns: { id: id }
"#;

const EXTRA: &str = r#"
updaters:
  - name: rename
    params: [id:int, name:text]
    statements:
      - UPDATE users SET name = $2 WHERE id = $1
auth:
  jwt:
    algorithms: [HS256]
    secret_env: KCK_TEST_JS_JWT_SECRET
"#;

const SECRET: &str = "test-only-js-secret-0123456789abcdef0123456789";

/// `name` on PATH, if there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs `program args` in `dir` with `env`, within `limit`; panics with its output if it fails.
async fn run(dir: &Path, program: &Path, args: &[&str], env: &[(&str, String)], limit: Duration) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let what = format!("{} {}", program.display(), args.join(" "));
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown with --nocapture; in the panic message otherwise.
    eprintln!("{what}:\n{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_and_the_example_pages_pass_their_node_tests_against_a_live_kck() {
    let (Some(node), Some(npm)) = (on_path("node"), on_path("npm")) else {
        eprintln!(
            "SKIPPED the_js_client_and_the_example_pages_pass_their_node_tests_against_a_live_kck: \
             node or npm is not installed (Node 18+; .ci/run installs it)"
        );
        return;
    };
    let version = std::process::Command::new(&node)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 18 {
        eprintln!(
            "SKIPPED the_js_client_and_the_example_pages_pass_their_node_tests_against_a_live_kck: \
             node {version:?} is older than 18"
        );
        return;
    }
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js");
    // npm ci when node_modules is missing or older than the lock file (npm writes its own copy of
    // the lock into node_modules on every install).
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let installed = modified(&package.join("node_modules/.package-lock.json"));
    if installed.is_none() || installed < modified(&package.join("package-lock.json")) {
        run(
            &package,
            &npm,
            &["ci", "--no-audit", "--no-fund"],
            &[],
            Duration::from_secs(600),
        )
        .await;
    }
    run(
        &package,
        &npm,
        &["run", "build"],
        &[],
        Duration::from_secs(300),
    )
    .await;

    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &db.url, "kck_js", &db.name, PRIMERS, EXTRA);
    let mut config = Config::load_with_env(&path, |name| {
        (name == "KCK_TEST_JS_JWT_SECRET")
            .then(|| SECRET.to_owned())
            .or_else(|| std::env::var(name).ok())
    })
    .unwrap_or_else(|e| panic!("test config does not load: {e}"));
    // The browser tests also open a page from another origin than kck's.
    config.http.cors_origins = vec!["*".into()];
    let running = start(config).await;

    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| on_path(name));
    if chromium.is_none() {
        eprintln!(
            "the browser tests will be SKIPPED: Chromium is not installed (apt-get install -y chromium)"
        );
    }
    let env = [
        ("KCK_URL", format!("http://{}", running.http_addr)),
        ("KCK_JWT_SECRET", SECRET.to_owned()),
        ("PG_URL", db.url.clone()),
        ("PSQL", bin_dir().join("psql").display().to_string()),
        (
            "CHROMIUM",
            chromium
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ),
    ];
    // The test files by name: node would also run test/support.mjs as one.
    let mut files: Vec<String> = std::fs::read_dir(package.join("test"))
        .expect("clients/js/test")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".test.mjs"))
        .map(|name| format!("test/{name}"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "clients/js/test holds {files:?}");
    let mut args = vec!["--test", "--test-reporter=spec"];
    args.extend(files.iter().map(String::as_str));
    run(&package, &node, &args, &env, Duration::from_secs(600)).await;

    running.stop().await.unwrap();
    db.cleanup().await;
}
