//! A real PostgreSQL 15 for integration tests.
//!
//! [`cluster()`] starts one cluster per test process (the integration tests are one binary), lazily, on a
//! free port of 127.0.0.1, with a data directory under `/tmp`. Tests share it and isolate themselves by
//! database: [`Cluster::new_database`].
//! [`separate_cluster`] starts a private cluster with other settings, stopped when it is dropped.
//!
//! The binaries are taken from `$PG_BIN` or `/usr/lib/postgresql/15/bin`. As root, initdb and postgres run
//! as the `postgres` user (Postgres refuses to run as root); otherwise as the current user. The
//! superuser is always `postgres`, authentication is `trust` (also for replication connections).
//!
//! # Lifetime
//! postgres is started by a small `sh` guardian that holds the read end of a pipe whose write end only
//! this process holds. When this process closes it (shared cluster: at exit, through `atexit`; private
//! cluster: on drop) or dies in any way, even by SIGKILL, the guardian sends postgres SIGQUIT (immediate
//! shutdown), waits for it and removes the temp directory. On a normal exit we wait for that to finish,
//! so no postgres process and no directory is left once `cargo test` returns.
//!
//! Set `KCK_TEST_PG_KEEP_LOG=1` to copy the server log to `/tmp/kck-pg-<port>.log` when a cluster stops.
//!
//! Nothing in a [`Cluster`] belongs to a tokio runtime (every `#[tokio::test]` has its own runtime):
//! clients are made per call and their connection task is spawned on the caller's runtime.

use std::ffi::CString;
use std::fs;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// Where Debian's postgresql-15 package puts the server binaries.
pub const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// The settings of every test cluster (tuned for speed, not durability).
/// `port`, `listen_addresses` and `unix_socket_directories` are set per cluster.
pub const BASE_SETTINGS: &[(&str, &str)] = &[
    ("wal_level", "logical"),
    ("max_wal_senders", "64"),
    ("max_replication_slots", "64"),
    ("max_connections", "300"),
    ("wal_sender_timeout", "5s"),
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("shared_buffers", "128MB"),
    ("log_min_messages", "warning"),
];

const PG_HBA: &str = "\
# kck test cluster: trust everything local.
local   all           all                 trust
local   replication   all                 trust
host    all           all   127.0.0.1/32  trust
host    replication   all   127.0.0.1/32  trust
";

/// How long a cluster may take to accept connections (CI machines can be slow).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guardian may take to stop postgres and remove the directory.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at a free port (another process may take the one we picked before postgres binds it).
const START_ATTEMPTS: usize = 5;

/// `sh -c GUARDIAN kck-pg-guardian DIR BIN_DIR POSTGRES_ARGS...`, as the server's user, with the pg_hba.conf
/// text in `$KCK_PG_HBA`, stdin a pipe from us. It runs initdb then postgres in DIR, each in the
/// background, its pid and stop signal in DIR/job. A watcher waits for EOF on the pipe (we close it, or
/// die), then signals the current job; the main line notices DIR/stop between the steps. Then it removes
/// DIR. `initdb.exited` and `postgres.exited` tell us how a step ended.
const GUARDIAN: &str = r#"
d=$1; bin=$2; shift 2
exec 3<&0 </dev/null
: >"$d/job"
( read -r _ <&3; : >"$d/stop"; read -r pid sig <"$d/job" && kill -"$sig" "$pid" 2>/dev/null ) &
w=$!
exec 3<&-
step() { # SIGNAL NAME COMMAND...: run COMMAND in the background, as the current job; wait for it
    sig=$1; name=$2; shift 2
    "$@" &
    pid=$!
    echo "$pid $sig" >"$d/job"
    [ -e "$d/stop" ] && kill -"$sig" "$pid" 2>/dev/null
    wait "$pid"
    st=$?
    echo "$st" >"$d/$name.exited"
    return "$st"
}
if [ ! -e "$d/stop" ] &&
    step TERM initdb "$bin/initdb" -D "$d/data" -U postgres -A trust -E UTF8 --locale=C \
        --no-sync --no-instructions >"$d/initdb.log" 2>&1 &&
    printf '%s' "$KCK_PG_HBA" >"$d/data/pg_hba.conf" &&
    [ ! -e "$d/stop" ]
then
    step QUIT postgres "$bin/postgres" -D "$d/data" "$@" >>"$d/log" 2>&1
fi
wait "$w"
for _ in 1 2 3 4 5 6 7 8 9 10; do
    rm -rf "$d" 2>/dev/null
    [ -e "$d" ] || break
    sleep 0.2
done
"#;

static SHARED: OnceLock<Cluster> = OnceLock::new();
static DB_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The cluster shared by all tests of this process; started on first call.
pub async fn cluster() -> &'static Cluster {
    if let Some(c) = SHARED.get() {
        return c;
    }
    tokio::task::spawn_blocking(cluster_blocking)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// [`cluster()`] for code outside a runtime (do not call it on a runtime thread: it blocks).
pub fn cluster_blocking() -> &'static Cluster {
    SHARED.get_or_init(|| {
        let c = Cluster::start(&Spec::default());
        // SAFETY: registering a plain `extern "C" fn` that never unwinds.
        unsafe { libc::atexit(stop_shared_at_exit) };
        c
    })
}

extern "C" fn stop_shared_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        if let Some(c) = SHARED.get() {
            c.stop();
        }
    });
}

/// A new database on the shared [`cluster()`] with `schema` (SQL) run in it.
pub async fn database(schema: &str) -> TestDb {
    let db = cluster().await.new_database().await;
    db.execute_batch(schema).await;
    db
}

/// A new private cluster: [`BASE_SETTINGS`] overridden by `extra_settings` (e.g.
/// `[("wal_level", "replica")]`). Stopped, and its directory removed, on drop.
pub async fn separate_cluster(extra_settings: &[(&str, &str)]) -> OwnedCluster {
    let extra: Vec<(String, String)> = extra_settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        OwnedCluster(Cluster::start(&Spec {
            settings: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Spec::default()
        }))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// What a private cluster is made of besides [`BASE_SETTINGS`].
#[derive(Default)]
pub struct Spec {
    /// Settings over [`BASE_SETTINGS`]; `{dir}` in a value is the cluster's directory (where `files` are).
    pub settings: Vec<(String, String)>,
    /// pg_hba.conf, instead of the trusting default. It must let `postgres` in over TCP from 127.0.0.1
    /// without TLS (the readiness probe and [`Cluster::admin_client`] connect so).
    pub hba: Option<String>,
    /// Files written into the cluster's directory, owned by the server's user, mode 0600 (certificates).
    pub files: Vec<(String, Vec<u8>)>,
}

/// A new private cluster made to `spec` (TLS, pg_hba...). Stopped and removed on drop.
pub async fn separate_cluster_spec(spec: Spec) -> OwnedCluster {
    tokio::task::spawn_blocking(move || OwnedCluster(Cluster::start(&spec)))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// A running Postgres cluster. Plain data plus the guardian process: usable from any runtime.
#[derive(Debug)]
pub struct Cluster {
    /// Always `127.0.0.1`.
    pub host: &'static str,
    pub port: u16,
    /// Where `postgres`, `initdb`, `psql`, `pg_recvlogical`... are.
    pub bin_dir: PathBuf,
    /// The temp directory: holds `data/`, `log` and the unix socket. Removed when the cluster stops.
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    /// The server log.
    pub log_path: PathBuf,
    guardian: Mutex<Option<Guardian>>,
}

#[derive(Debug)]
struct Guardian {
    child: Child,
    /// Closing it tells the guardian to stop postgres.
    pipe: Option<ChildStdin>,
}

/// A private cluster from [`separate_cluster`]; derefs to [`Cluster`]; stopped on drop.
#[derive(Debug)]
pub struct OwnedCluster(Cluster);

impl Deref for OwnedCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl Drop for OwnedCluster {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl Cluster {
    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}:{}/{}", self.host, self.port, db)
    }

    /// A new client on database `db`; its connection task is spawned on the current runtime.
    pub async fn connect(&self, db: &str) -> Client {
        connect(&self.url(db)).await
    }

    /// A client on the `postgres` database.
    pub async fn admin_client(&self) -> Client {
        self.connect("postgres").await
    }

    /// A fresh, uniquely named, empty database (`kck_test_<counter>_<random>`).
    pub async fn new_database(&self) -> TestDb {
        let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("kck_test_{n}_{:08x}", random_u64() as u32);
        let admin = self.admin_client().await;
        let sql = format!("CREATE DATABASE \"{name}\"");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match admin.batch_execute(&sql).await {
                Ok(()) => break,
                // 55006 object_in_use: someone is connected to the template; retry.
                Err(e) if is_code(&e, "55006") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{sql}: {}", pg_error(&e)),
            }
        }
        TestDb {
            url: self.url(&name),
            admin_url: self.url("postgres"),
            name,
        }
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// Whether postgres is still running.
    pub fn is_running(&self) -> bool {
        let g = self.guardian.lock().unwrap_or_else(|e| e.into_inner());
        g.is_some() && !self.dir.join("postgres.exited").exists()
    }

    /// Stop postgres and remove the directory (idempotent; blocks up to [`STOP_TIMEOUT`]).
    fn stop(&self) {
        let guardian = self
            .guardian
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(g) = guardian {
            if std::env::var_os("KCK_TEST_PG_KEEP_LOG").is_some_and(|v| v != "0" && !v.is_empty()) {
                let _ = fs::copy(&self.log_path, format!("/tmp/kck-pg-{}.log", self.port));
            }
            stop_guardian(g);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    fn start(spec: &Spec) -> Cluster {
        let extra_settings = &spec.settings;
        let bin_dir = bin_dir();
        for tool in ["initdb", "postgres"] {
            if !bin_dir.join(tool).is_file() {
                panic!(
                    "PostgreSQL 15 is not installed: {} is missing. Install it with \
                     `apt-get install -y postgresql-15`, or point PG_BIN at its bin directory.",
                    bin_dir.join(tool).display()
                );
            }
        }
        let owner = server_owner();
        let mut settings: Vec<(String, String)> = BASE_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in extra_settings {
            match settings.iter_mut().find(|(name, _)| name == k) {
                Some(s) => s.1 = v.to_string(),
                None => settings.push((k.to_string(), v.to_string())),
            }
        }

        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = make_dir(owner);
            for (name, bytes) in &spec.files {
                let path = dir.join(name);
                fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
                }
            }
            let data_dir = dir.join("data");
            let log_path = dir.join("log");

            let port = free_port();
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(GUARDIAN)
                .arg("kck-pg-guardian")
                .arg(&dir)
                .arg(&bin_dir)
                .arg("-p")
                .arg(port.to_string())
                .arg("-c")
                .arg("listen_addresses=127.0.0.1")
                .arg("-c")
                .arg(format!("unix_socket_directories={}", dir.display()));
            for (k, v) in &settings {
                let v = v.replace("{dir}", &dir.display().to_string());
                cmd.arg("-c").arg(format!("{k}={v}"));
            }
            cmd.current_dir(&dir)
                .env("KCK_PG_HBA", spec.hba.as_deref().unwrap_or(PG_HBA))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Out of the terminal's process group: Ctrl-C reaches us, and the pipe does the rest.
                .process_group(0);
            if let Some((uid, gid)) = owner {
                cmd.uid(uid).gid(gid);
            }
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start /bin/sh for postgres: {e}"));
            let pipe = child.stdin.take();
            let cluster = Cluster {
                host: "127.0.0.1",
                port,
                bin_dir: bin_dir.clone(),
                dir,
                data_dir,
                log_path,
                guardian: Mutex::new(Some(Guardian { child, pipe })),
            };
            match cluster.wait_ready() {
                Ready::Yes => return cluster,
                Ready::PortTaken => {
                    last_log = cluster.log_tail(20);
                    cluster.stop();
                }
                Ready::Failed(why) => {
                    let log = cluster.log_tail(40);
                    cluster.stop();
                    panic!("test postgres did not start: {why}\n--- server log (tail) ---\n{log}");
                }
            }
        }
        panic!(
            "test postgres could not bind a free port in {START_ATTEMPTS} attempts\n\
             --- last server log (tail) ---\n{last_log}"
        );
    }

    /// Poll until postgres accepts connections, it exits, or [`START_TIMEOUT`] passes.
    fn wait_ready(&self) -> Ready {
        let config = {
            let mut c = tokio_postgres::Config::new();
            c.host(self.host)
                .port(self.port)
                .user("postgres")
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(2));
            c
        };
        let exited = self.dir.join("postgres.exited");
        let initdb_exited = self.dir.join("initdb.exited");
        let initdb_log = self.dir.join("initdb.log");
        let log_path = self.log_path.clone();
        let want_data_dir = self.data_dir.to_string_lossy().into_owned();
        block_on_fresh_runtime(async move {
            let deadline = Instant::now() + START_TIMEOUT;
            let mut last_error;
            loop {
                if fs::read_to_string(&initdb_exited).is_ok_and(|st| !matches!(st.trim(), "" | "0"))
                {
                    let out = fs::read_to_string(&initdb_log).unwrap_or_default();
                    return Ready::Failed(format!("initdb failed:\n{out}"));
                }
                if exited.exists() {
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    if log.contains("Address already in use")
                        || log.contains("could not create any TCP/IP sockets")
                    {
                        return Ready::PortTaken;
                    }
                    return Ready::Failed("postgres exited".into());
                }
                // Bounded: something else listening on the port may never answer.
                let probe = async {
                    let (client, conn) = config.connect(NoTls).await?;
                    let conn = tokio::spawn(conn);
                    let row = client.query_one("SHOW data_directory", &[]).await;
                    drop(client);
                    let _ = conn.await;
                    row.map(|r| r.get::<_, String>(0))
                };
                match tokio::time::timeout(Duration::from_secs(3), probe).await {
                    // Someone else's server on "our" port: ours will fail to bind.
                    Ok(Ok(dir)) if dir != want_data_dir => return Ready::PortTaken,
                    Ok(Ok(_)) => return Ready::Yes,
                    Ok(Err(e)) => last_error = pg_error(&e),
                    Err(_) => last_error = "no answer in 3 s".into(),
                }
                if Instant::now() > deadline {
                    return Ready::Failed(format!(
                        "not accepting connections after {START_TIMEOUT:?}: {last_error}"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    }
}

enum Ready {
    Yes,
    PortTaken,
    Failed(String),
}

/// A database of its own for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    /// `postgres://postgres@127.0.0.1:PORT/NAME`
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// A new client; its connection task is spawned on the current runtime.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Run `sql` (several statements allowed) on a new connection; panics on error.
    pub async fn execute_batch(&self, sql: &str) {
        let client = self.client().await;
        if let Err(e) = client.batch_execute(sql).await {
            let shown: String = sql.chars().take(500).collect();
            panic!(
                "in database {}: {}\n--- SQL ---\n{shown}",
                self.name,
                pg_error(&e)
            );
        }
    }

    /// Drop the database: refuse new connections, terminate its backends (walsenders included), drop
    /// its replication slots, then the database. Stop anything that reconnects (kck) first.
    pub async fn cleanup(self) {
        let admin = connect(&self.admin_url).await;
        let name = self.name.as_str();
        let deadline = Instant::now() + Duration::from_secs(30);
        let step = |what: &str, r: Result<(), tokio_postgres::Error>| match r {
            Ok(()) => Ok(()),
            Err(e) if Instant::now() < deadline => Err(format!("{what}: {}", pg_error(&e))),
            Err(e) => panic!("cleanup of database {name}: {what}: {}", pg_error(&e)),
        };
        let _ = step(
            "ALTER DATABASE ... ALLOW_CONNECTIONS false",
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
                ))
                .await,
        );
        loop {
            let terminate = admin
                .execute(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&name],
                )
                .await
                .map(drop);
            let slots = admin
                .query(
                    "SELECT slot_name::text, active_pid FROM pg_replication_slots WHERE database = $1",
                    &[&name],
                )
                .await;
            let mut pending = step("terminate backends", terminate).is_err();
            match slots {
                Ok(rows) => {
                    for row in rows {
                        let slot: String = row.get(0);
                        let pid: Option<i32> = row.get(1);
                        if let Some(pid) = pid {
                            let _ = admin
                                .execute("SELECT pg_terminate_backend($1, 5000)", &[&pid])
                                .await;
                        }
                        let r = admin
                            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                            .await
                            .map(drop);
                        pending |= step("drop replication slot", r).is_err();
                    }
                }
                Err(e) => pending |= step("list replication slots", Err(e)).is_err(),
            }
            if !pending {
                let r = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
                if step("DROP DATABASE", r).is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Connect and spawn the connection task on the current runtime; panics with the server's message.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {}", pg_error(&e)));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A tokio-postgres error with the server's message, code and detail when there are some.
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            s
        }
        None => format!("{e}: {e:?}"),
    }
}

fn is_code(e: &tokio_postgres::Error, code: &str) -> bool {
    e.as_db_error().is_some_and(|db| db.code().code() == code)
}

pub fn bin_dir() -> PathBuf {
    std::env::var_os("PG_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN_DIR))
}

/// `Some((uid, gid))` of the `postgres` user when we are root; `None` to run as ourselves.
fn server_owner() -> Option<(u32, u32)> {
    // SAFETY: plain libc calls; getpwnam's result is read at once, before any other getpw* call here.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let name = CString::new("postgres").unwrap();
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            panic!(
                "running as root, and Postgres refuses to run as root, but there is no `postgres` \
                 user to run it as (`apt-get install -y postgresql-15` creates it)"
            );
        }
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

/// `/tmp/kck-pg-XXXXXX`, mode 0755, owned by the server's user.
fn make_dir(owner: Option<(u32, u32)>) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("kck-pg-")
        .permissions(fs::Permissions::from_mode(0o755))
        .tempdir_in("/tmp")
        .unwrap_or_else(|e| panic!("cannot create a temp dir in /tmp: {e}"))
        .keep();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
    }
    dir
}

/// A port that was free a moment ago (postgres may still lose a race for it: then we retry).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free port on 127.0.0.1: {e}"))
}

fn stop_guardian(mut g: Guardian) {
    drop(g.pipe.take()); // EOF: the guardian stops postgres and removes the directory.
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match g.child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => break,
        }
    }
    // Stuck: kill the whole process group (guardian, watcher, postmaster; backends follow the postmaster).
    // SAFETY: plain libc call on our child's process group.
    unsafe { libc::killpg(g.child.id() as libc::pid_t, libc::SIGKILL) };
    let _ = g.child.wait();
}

fn log_tail(path: &Path, lines: usize) -> String {
    let log = fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn random_u64() -> u64 {
    RandomState::new().hash_one((std::process::id(), Instant::now()))
}

/// Run `f` to completion on a new current-thread runtime in a new thread: works from sync code and from
/// inside another runtime alike.
fn block_on_fresh_runtime<F>(f: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f)
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}
