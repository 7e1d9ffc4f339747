//! The loader's tests: every field's happy path and its errors, with file, line and field.

use super::*;

const FILE: &str = "/etc/kck/kck.yaml";

fn no_env(_: &str) -> Option<String> {
    None
}

fn load(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_yaml_str(yaml, Path::new(FILE), no_env)
}

fn load_env(yaml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_yaml_str(yaml, Path::new(FILE), |name| vars.get(name).cloned())
}

/// Assert an `Invalid` error at `path:line` for `field` whose message contains `needle`.
fn assert_invalid_at(
    result: Result<Config, ConfigError>,
    path: &Path,
    line: usize,
    field: &str,
    needle: &str,
) {
    let err = result.expect_err("expected an error");
    let text = err.to_string();
    match &err {
        ConfigError::Invalid {
            path: p,
            line: l,
            field: f,
            message,
        } => {
            assert_eq!((p.as_path(), *l, f.as_str()), (path, line, field), "{text}");
            assert!(message.contains(needle), "message lacks {needle:?}: {text}");
            assert!(
                text.starts_with(&format!("{}:{line}: {field}: ", path.display())),
                "{text}"
            );
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn assert_invalid(yaml: &str, line: usize, field: &str, needle: &str) {
    assert_invalid_at(load(yaml), Path::new(FILE), line, field, needle);
}

/// A valid config; tests replace parts of it. Lines:
/// 1 source, 2 url, 3 primers, 4 - name, 5 key, 6 query, 7 depends_on, 8 - table, 9 columns.
const BASE: &str = "\
source:
  url: postgres://kck:secret@127.0.0.1:5432/app
primers:
  - name: orders_by_user
    key: orders_by_user/{user_id:int}
    query: SELECT id, total FROM orders WHERE user_id = $1
    depends_on:
      - table: orders
        columns: { user_id: user_id }
";

fn base_with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from}");
    BASE.replacen(from, to, 1)
}

const FULL: &str = r#"
source:
  url: "postgres://kck:secret@127.0.0.1:5432/app"   # required; env KCK_SOURCE_URL overrides
  publication: kck_pub
  create_publication: true
  slot: kck_slot
store:
  kind: embedded
  path: data/cache
http:
  bind: 0.0.0.0:9090
refresh:
  workers: 8
  visibility_timeout: 200ms
prime_on_cache_miss: false
primers:
  - name: orders_by_user
    key: "orders_by_user/{user_id:int}"
    shape: rows
    query: |
      SELECT id, total FROM orders WHERE user_id = $1 ORDER BY id;
    depends_on:
      - table: orders
        columns: { user_id: user_id }
      - table: Line_Items
        lookup:
          query: "SELECT o.user_id FROM orders o WHERE o.id = $1"
          args: [order_id]
      - table: app.users
  - name: user
    key: user/{id:uuid}/{lang}
    shape: row
    query: "SELECT * FROM users WHERE id = $1 AND lang = $2"
    depends_on:
      - table: users
        columns:
          lang: lang
          id: ID
  - name: order_count
    key: order_count
    shape: value
    query: SELECT count(*) FROM orders
    depends_on: [{ table: orders }]
"#;

#[test]
fn full_config() {
    let c = load(FULL).unwrap();
    assert_eq!(c.file, Path::new(FILE));
    assert_eq!(c.source.url, "postgres://kck:secret@127.0.0.1:5432/app");
    assert_eq!(c.source.publication, "kck_pub");
    assert!(c.source.create_publication);
    assert_eq!(c.source.slot, "kck_slot");
    let StoreConfig::Embedded { path, .. } = &c.store else {
        panic!("expected the embedded store, got {:?}", c.store)
    };
    assert_eq!(path, Path::new("/etc/kck/data/cache"));
    assert_eq!(c.http.bind, "0.0.0.0:9090".parse::<SocketAddr>().unwrap());
    assert_eq!(c.refresh.workers, 8);
    assert_eq!(c.refresh.visibility_timeout, Duration::from_millis(200));
    assert!(!c.prime_on_cache_miss);

    let primers = &c.catalog.primers;
    assert_eq!(primers.len(), 3);
    let p = &primers[0];
    assert_eq!(p.name, "orders_by_user");
    assert_eq!(p.template.source, "orders_by_user/{user_id:int}");
    assert_eq!(p.shape, Shape::Rows);
    assert_eq!(
        p.query,
        "SELECT id, total FROM orders WHERE user_id = $1 ORDER BY id"
    );
    let public = |name: &str| TableName {
        schema: "public".into(),
        name: name.into(),
    };
    assert_eq!(
        p.dependencies,
        vec![
            Dependency {
                table: public("orders"),
                mapping: Mapping::Columns(vec![(0, "user_id".into())])
            },
            Dependency {
                table: public("line_items"),
                mapping: Mapping::Lookup {
                    query: "SELECT o.user_id FROM orders o WHERE o.id = $1".into(),
                    args: vec!["order_id".into()],
                },
            },
            Dependency {
                table: TableName {
                    schema: "app".into(),
                    name: "users".into()
                },
                mapping: Mapping::AllKeys,
            },
        ]
    );
    let p = &primers[1];
    assert_eq!(p.shape, Shape::Row);
    // Columns are ordered by key parameter and lower-cased.
    assert_eq!(
        p.dependencies[0].mapping,
        Mapping::Columns(vec![(0, "id".into()), (1, "lang".into())])
    );
    assert_eq!(primers[2].shape, Shape::Value);
    assert_eq!(primers[2].template.params.len(), 0);
    assert_eq!(c.catalog.primer("user").map(|(i, _)| i), Some(1));
    let key = c.catalog.parse_key("orders_by_user/7").unwrap();
    assert_eq!(c.catalog.render(&key), "orders_by_user/7");
    // The password does not show in Debug output.
    let debug = format!("{c:?}");
    assert!(
        !debug.contains("secret") && debug.contains("kck:***@127.0.0.1"),
        "{debug}"
    );
}

#[test]
fn example_config_is_valid() {
    let c = Config::from_yaml_str(
        include_str!("../../config/example.yaml"),
        Path::new("config/example.yaml"),
        no_env,
    )
    .unwrap();
    assert_eq!(c.catalog.primers.len(), 3);
    assert_eq!(
        c.source.redacted_url(),
        "postgres://kck:***@127.0.0.1:5432/app"
    );
}

#[test]
fn defaults() {
    let c = load(BASE).unwrap();
    assert_eq!(c.source.publication, "kck");
    assert_eq!(c.source.slot, "kck");
    assert!(!c.source.create_publication);
    let StoreConfig::Embedded { path, .. } = &c.store else {
        panic!("expected the embedded store, got {:?}", c.store)
    };
    assert_eq!(path, Path::new("/etc/kck/./kck-data"));
    assert_eq!(c.http.bind, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(c.refresh.workers, 4);
    assert_eq!(c.refresh.visibility_timeout, Duration::from_secs(5));
    assert!(c.prime_on_cache_miss);
    assert_eq!(c.catalog.primers[0].shape, Shape::Rows);
    // Sections given but empty take the defaults too.
    let c = load(&format!("{BASE}store:\nhttp:\nrefresh: {{}}\n")).unwrap();
    assert_eq!(c.refresh.workers, 4);
}

#[test]
fn refresh_policy_and_jobs() {
    use crate::primer::OnExpiry;
    let yaml = format!(
        "{BASE}    refresh_interval: 5m\n    ttl: 30s\n    on_expiry: drop\n    stale_while_revalidate: 10s\n    \
             cold_after: 1h\n    concurrency: 2\n    warm: SELECT DISTINCT user_id FROM orders\n    batch:\n      \
             key_column: kck_key\n      query: SELECT user_id AS kck_key, id FROM orders WHERE user_id = ANY($1)\n\
             refresh:\n  max_queue: 5000\n  cold_after: 2h\n  pool_size: 3\n  claim_batch: 8\n\
             jobs:\n  - name: totals\n    interval: 1m\n    sql: REFRESH MATERIALIZED VIEW CONCURRENTLY totals\n  \
             - name: nightly\n    cron: \"0 3 * * *\"\n    sql: DELETE FROM log WHERE at < now() - interval '7 days'\n"
    );
    let c = load(&yaml).unwrap();
    let p = &c.catalog.primers[0].policy;
    assert_eq!(p.refresh_interval, Some(Duration::from_secs(300)));
    assert_eq!(p.ttl, Some(Duration::from_secs(30)));
    assert_eq!(p.on_expiry, OnExpiry::Drop);
    assert_eq!(p.stale_while_revalidate, Some(Duration::from_secs(10)));
    assert_eq!(p.cold_after, Some(Duration::from_secs(3600)));
    assert_eq!(p.concurrency, Some(2));
    assert_eq!(
        p.warm.as_deref(),
        Some("SELECT DISTINCT user_id FROM orders")
    );
    let batch = p.batch.as_ref().unwrap();
    assert_eq!(batch.key_column, "kck_key");
    assert_eq!(c.refresh.max_queue, 5000);
    assert_eq!(c.refresh.cold_after, Some(Duration::from_secs(7200)));
    assert_eq!((c.refresh.pool_size, c.refresh.claim_batch), (3, 8));
    assert_eq!(c.jobs.len(), 2);
    assert_eq!(
        c.jobs[0].schedule,
        JobSchedule::Interval(Duration::from_secs(60))
    );
    assert_eq!(c.jobs[1].schedule, JobSchedule::Cron("0 3 * * *".into()));
    // Defaults, and the global cold_after for primers without their own.
    let c = load(&format!("{BASE}refresh:\n  cold_after: 2h\n")).unwrap();
    assert_eq!(
        c.catalog.primers[0].policy.cold_after,
        Some(Duration::from_secs(7200))
    );
    let c = load(BASE).unwrap();
    assert_eq!(
        c.catalog.primers[0].policy,
        crate::primer::Policy::default()
    );
    assert_eq!(
        (
            c.refresh.max_queue,
            c.refresh.pool_size,
            c.refresh.claim_batch
        ),
        (1_000_000, 8, 16)
    );
    assert!(c.jobs.is_empty());
}

#[test]
fn refresh_policy_and_job_errors() {
    let primer = |extra: &str| format!("{BASE}{extra}");
    assert_invalid(
        &primer("    on_expiry: drop\n"),
        10,
        "primers[0].on_expiry",
        "has no effect without `ttl`",
    );
    assert_invalid(
        &primer("    ttl: 1s\n    on_expiry: later\n"),
        11,
        "primers[0].on_expiry",
        "unknown value 'later'",
    );
    assert_invalid(
        &primer("    ttl: soon\n"),
        10,
        "primers[0].ttl",
        "not a duration",
    );
    assert_invalid(
        &primer("    concurrency: 0\n"),
        10,
        "primers[0].concurrency",
        "between 1 and",
    );
    assert_invalid(
        &primer("    warm: SELECT $1\n"),
        10,
        "primers[0].warm",
        "takes no parameters",
    );
    assert_invalid(
        &primer("    batch:\n      query: SELECT 1 AS k\n      key_column: k\n"),
        11,
        "primers[0].batch.query",
        "$1",
    );
    assert_invalid(
        &primer("    batch:\n      key_column: k\n"),
        11,
        "primers[0].batch.query",
        "required",
    );
    assert_invalid(
        &primer("    batch:\n      query: SELECT $1 AS k\n"),
        11,
        "primers[0].batch.key_column",
        "required",
    );
    assert_invalid(
        &format!("{BASE}refresh:\n  max_queue: 0\n"),
        11,
        "refresh.max_queue",
        "between 1 and",
    );
    let job = |body: &str| format!("{BASE}jobs:\n  - name: j\n{body}");
    assert_invalid(
        &job("    sql: SELECT 1\n"),
        11,
        "jobs[0].interval",
        "required",
    );
    assert_invalid(&job("    interval: 1m\n"), 11, "jobs[0].sql", "required");
    assert_invalid(
        &job("    sql: SELECT 1\n    interval: 1m\n    cron: \"* * * * *\"\n"),
        14,
        "jobs[0].cron",
        "not both",
    );
    assert_invalid(
        &job("    sql: SELECT 1\n    cron: daily\n"),
        13,
        "jobs[0].cron",
        "not a cron expression",
    );
    assert_invalid(
        &format!(
            "{BASE}jobs:\n  - name: j\n    sql: x\n    interval: 1s\n  - name: j\n    sql: y\n    interval: 1s\n"
        ),
        14,
        "jobs[1].name",
        "used twice",
    );
}

#[test]
fn relative_paths() {
    let yaml = base_with("primers:", "store:\n  path: /var/lib/kck\nprimers:");
    let c = Config::from_yaml_str(&yaml, Path::new("kck.yaml"), no_env).unwrap();
    let StoreConfig::Embedded { path, .. } = &c.store else {
        panic!("expected the embedded store, got {:?}", c.store)
    };
    assert_eq!(path, Path::new("/var/lib/kck"));
    let yaml = base_with("primers:", "store:\n  path: ../data\nprimers:");
    let c = Config::from_yaml_str(&yaml, Path::new("conf/kck.yaml"), no_env).unwrap();
    let StoreConfig::Embedded { path, .. } = &c.store else {
        panic!("expected the embedded store, got {:?}", c.store)
    };
    assert_eq!(path, Path::new("conf/../data"));
    let c = Config::from_yaml_str(BASE, Path::new("kck.yaml"), no_env).unwrap();
    let StoreConfig::Embedded { path, .. } = &c.store else {
        panic!("expected the embedded store, got {:?}", c.store)
    };
    assert_eq!(path, Path::new("./kck-data"));
}

#[test]
fn source_errors() {
    assert_invalid("primers: []\n", 1, "source.url", "required");
    assert_invalid(
        &BASE.replace(
            "  url: postgres://kck:secret@127.0.0.1:5432/app\n",
            "  slot: x\n",
        ),
        2,
        "source.url",
        "KCK_SOURCE_URL",
    );
    assert_invalid(
        &base_with("url: postgres://kck:secret@127.0.0.1:5432/app", "url: \"\""),
        2,
        "source.url",
        "is empty",
    );
    assert_invalid(
        &base_with(
            "url: postgres://kck:secret@127.0.0.1:5432/app",
            "url: \"postgres://h:99999999/db\"",
        ),
        2,
        "source.url",
        "not a valid Postgres connection",
    );
    assert_invalid(
        &base_with("  url:", "  publication: Kck-1\n  url:"),
        2,
        "source.publication",
        "'Kck-1' is not valid as a publication name",
    );
    assert_invalid(
        &base_with("  url:", "  slot: my-slot\n  url:"),
        2,
        "source.slot",
        "not a valid replication slot name",
    );
    assert_invalid(
        &base_with("  url:", "  create_publication: yes\n  url:"),
        2,
        "source.create_publication",
        "expected true or false",
    );
}

#[test]
fn other_section_errors() {
    let at_end = |extra: &str| format!("{BASE}{extra}");
    assert_invalid(
        &at_end("store:\n  kind: redis\n"),
        11,
        "store.kind",
        "unknown store kind 'redis': the kinds are 'embedded' and 'scylla'",
    );
    assert_invalid(
        &at_end("store:\n  path: ''\n"),
        11,
        "store.path",
        "is empty",
    );
    assert_invalid(
        &at_end("store:\n  memory_cache: lots\n"),
        11,
        "store.memory_cache",
        "lots",
    );
    assert_invalid(
        &at_end("store:\n  kind: scylla\n  nodes: [db:9042]\n  memory_cache: 1MB\n"),
        13,
        "store.memory_cache",
        "is a field of the embedded store",
    );
    let memory = |yaml: &str| match load(yaml).unwrap().store {
        StoreConfig::Embedded { memory_cache, .. } => memory_cache,
        other => panic!("expected the embedded store, got {other:?}"),
    };
    assert_eq!(memory(BASE), 64 << 20);
    assert_eq!(memory(&at_end("store:\n  memory_cache: 16MiB\n")), 16 << 20);
    assert_eq!(memory(&at_end("store:\n  memory_cache: 0\n")), 0);
    let capacity = |yaml: &str| match load(yaml).unwrap().store {
        StoreConfig::Embedded { capacity, .. } => capacity,
        other => panic!("expected the embedded store, got {other:?}"),
    };
    assert_eq!(capacity(BASE), crate::store::Capacity::default());
    assert_eq!(
        capacity(&at_end(
            "store:\n  max_entries: 10_000\n  max_bytes: 64MB\n"
        )),
        crate::store::Capacity {
            max_entries: 10_000,
            max_bytes: 64 << 20
        }
    );
    assert_invalid(
        &at_end("store:\n  max_entries: 0\n"),
        11,
        "store.max_entries",
        "at least 1",
    );
    assert_invalid(
        &at_end("store:\n  path: x\n  max_bytes: many\n"),
        12,
        "store.max_bytes",
        "many",
    );
    assert_invalid(
        &at_end("store:\n  max_bytes: 0\n"),
        11,
        "store.max_bytes",
        "at least 1 byte",
    );
    assert_invalid(
        &at_end("store:\n  kind: scylla\n  nodes: [db:9042]\n  max_entries: 100\n"),
        13,
        "store.max_entries",
        "not supported by the scylla store",
    );
    let absent = |yaml: &str| load(yaml).unwrap().refresh.absent_rows;
    assert_eq!(
        absent(BASE),
        crate::refresh::AbsentRows::SecondMiss {
            window: Duration::from_secs(60)
        }
    );
    assert_eq!(
        absent(&at_end("refresh:\n  absent_rows: keep\n")),
        crate::refresh::AbsentRows::Keep
    );
    assert_eq!(
        absent(&at_end("refresh:\n  absent_window: 5m\n")),
        crate::refresh::AbsentRows::SecondMiss {
            window: Duration::from_secs(300)
        }
    );
    assert_invalid(
        &at_end("refresh:\n  absent_rows: never\n"),
        11,
        "refresh.absent_rows",
        "unknown policy 'never'",
    );
    assert_invalid(
        &at_end("refresh:\n  absent_rows: keep\n  absent_window: 5s\n"),
        12,
        "refresh.absent_window",
        "applies to `absent_rows: second_miss`",
    );
    assert_invalid(
        &at_end("http:\n  bind: localhost:8080\n"),
        11,
        "http.bind",
        "'localhost:8080' is not an IP address and port",
    );
    assert_invalid(
        &at_end("http:\n  bind: 127.0.0.1\n"),
        11,
        "http.bind",
        "not an IP address and port",
    );
    assert_invalid(
        &at_end("refresh:\n  workers: 0\n"),
        11,
        "refresh.workers",
        "between 1 and 256, got 0",
    );
    assert_invalid(
        &at_end("refresh:\n  workers: 257\n"),
        11,
        "refresh.workers",
        "got 257",
    );
    assert_invalid(
        &at_end("refresh:\n  workers: -3\n"),
        11,
        "refresh.workers",
        "got -3",
    );
    assert_invalid(
        &at_end("refresh:\n  workers: many\n"),
        11,
        "refresh.workers",
        "expected an integer",
    );
    assert_invalid(
        &at_end("refresh:\n  visibility_timeout: 5\n"),
        11,
        "refresh.visibility_timeout",
        "not a duration",
    );
    assert_invalid(
        &at_end("refresh:\n  visibility_timeout: 5 parsecs\n"),
        11,
        "refresh.visibility_timeout",
        "such as 200ms, 5s or 1m",
    );
    assert_invalid(
        &at_end("refresh:\n  visibility_timeout: 0s\n"),
        11,
        "refresh.visibility_timeout",
        "is zero",
    );
    assert_invalid(
        &at_end("prime_on_cache_miss: 1\n"),
        10,
        "prime_on_cache_miss",
        "expected true or false",
    );
    let c = load(&at_end(
        "refresh:\n  visibility_timeout: 1m 30s\n  workers: 256\n",
    ))
    .unwrap();
    assert_eq!(c.refresh.visibility_timeout, Duration::from_secs(90));
    assert_eq!(c.refresh.workers, 256);
}

#[test]
fn scylla_store() {
    let at_end = |extra: &str| format!("{BASE}{extra}");
    let c = load(&at_end(
            "store:\n  kind: scylla\n  nodes: [\"10.0.0.1:9042\", scylla-2, \"[::1]:19042\"]\n  keyspace: kck_prod\n  replication: { class: NetworkTopologyStrategy, dc1: 3, eu-west: 2 }\n  consistency: LOCAL_QUORUM\n  username: kck\n  password: pw\n  tls: { ca_file: certs/ca.pem }\n  init: true\n",
        ))
        .unwrap();
    let StoreConfig::Scylla(s) = &c.store else {
        panic!("{:?}", c.store)
    };
    assert_eq!(
        s.nodes,
        vec!["10.0.0.1:9042", "scylla-2:9042", "[::1]:19042"]
    );
    assert_eq!(s.keyspace, "kck_prod");
    assert_eq!(
        s.replication,
        KeyspaceReplication::NetworkTopology {
            datacenters: vec![("dc1".into(), 3), ("eu-west".into(), 2)]
        }
    );
    assert_eq!(s.consistency, Consistency::LocalQuorum);
    assert_eq!(s.username.as_deref(), Some("kck"));
    assert_eq!(s.password.as_deref(), Some("pw"));
    assert!(!format!("{s:?}").contains("pw"), "Debug shows the password");
    assert_eq!(
        s.tls_ca_file.as_deref(),
        Some(Path::new("/etc/kck/certs/ca.pem"))
    );
    assert!(s.init);

    // Defaults, and the environment.
    let c = load_env(
        &at_end("store:\n  kind: scylla\n  nodes: [a:1]\n  username: u\n"),
        &[
            ("KCK_STORE_NODES", "n1:9042, n2"),
            ("KCK_STORE_PASSWORD", "secret"),
        ],
    )
    .unwrap();
    let StoreConfig::Scylla(s) = &c.store else {
        panic!("{:?}", c.store)
    };
    assert_eq!(s.nodes, vec!["n1:9042", "n2:9042"]);
    assert_eq!(s.keyspace, "kck");
    assert_eq!(
        s.replication,
        KeyspaceReplication::Simple {
            replication_factor: 1
        }
    );
    assert_eq!(s.consistency, Consistency::LocalQuorum);
    assert_eq!(s.password.as_deref(), Some("secret"));
    assert_eq!(s.tls_ca_file, None);
    assert!(!s.init);
    let c = load(&at_end(
            "store:\n  kind: scylla\n  nodes: [a]\n  replication: { class: org.apache.cassandra.locator.SimpleStrategy, replication_factor: 3 }\n  consistency: one\n",
        ))
        .unwrap();
    let StoreConfig::Scylla(s) = &c.store else {
        panic!("{:?}", c.store)
    };
    assert_eq!(
        s.replication,
        KeyspaceReplication::Simple {
            replication_factor: 3
        }
    );
    assert_eq!(s.consistency, Consistency::One);
}

#[test]
fn scylla_store_errors() {
    let at_end = |extra: &str| format!("{BASE}{extra}");
    let scylla = |rest: &str| at_end(&format!("store:\n  kind: scylla\n  nodes: [a]\n{rest}"));
    assert_invalid(
        &at_end("store:\n  kind: scylla\n"),
        11,
        "store.nodes",
        "required for the scylla store",
    );
    assert_invalid(
        &at_end("store:\n  kind: scylla\n  nodes: []\n"),
        12,
        "store.nodes",
        "is empty",
    );
    assert_invalid(
        &at_end("store:\n  kind: scylla\n  nodes: [\"a:b\"]\n"),
        12,
        "store.nodes[0]",
        "'a:b' is not a contact point",
    );
    assert_invalid(
        &scylla("  path: x\n"),
        13,
        "store.path",
        "field of the embedded store",
    );
    assert_invalid(
        &at_end("store:\n  nodes: [a]\n"),
        11,
        "store.nodes",
        "set `kind: scylla`",
    );
    assert_invalid(
        &scylla("  keyspace: Kck\n"),
        13,
        "store.keyspace",
        "not a valid keyspace name",
    );
    assert_invalid(
        &scylla("  consistency: most\n"),
        13,
        "store.consistency",
        "use one of one, two",
    );
    assert_invalid(
        &scylla("  password: p\n"),
        13,
        "store.username",
        "store.password is set",
    );
    assert_invalid(
        &scylla("  username: ''\n"),
        13,
        "store.username",
        "is empty",
    );
    assert_invalid(
        &scylla("  tls: {}\n"),
        13,
        "store.tls.ca_file",
        "required with `tls`",
    );
    assert_invalid(
        &scylla("  tls: { ca: x }\n"),
        13,
        "store.tls.ca",
        "unknown field `ca`",
    );
    assert_invalid(
        &scylla("  replication: { dc1: 3 }\n"),
        13,
        "store.replication.class",
        "required",
    );
    assert_invalid(
        &scylla("  replication: { class: Everywhere }\n"),
        13,
        "store.replication.class",
        "unknown replication class 'Everywhere'",
    );
    assert_invalid(
        &scylla("  replication: { class: SimpleStrategy }\n"),
        13,
        "store.replication.replication_factor",
        "required with SimpleStrategy",
    );
    assert_invalid(
        &scylla("  replication: { class: SimpleStrategy, dc1: 3 }\n"),
        13,
        "store.replication.dc1",
        "SimpleStrategy takes only replication_factor",
    );
    assert_invalid(
        &scylla("  replication: { class: NetworkTopologyStrategy }\n"),
        13,
        "store.replication",
        "a replica count per data centre",
    );
    assert_invalid(
        &scylla("  replication: { class: NetworkTopologyStrategy, dc1: three }\n"),
        13,
        "store.replication.dc1",
        "got 'three'",
    );
    assert_invalid(
        &scylla("  replication: { class: NetworkTopologyStrategy, dc1: 0 }\n"),
        13,
        "store.replication.dc1",
        "between 1 and 100, got 0",
    );
    let err = load_env(&scylla(""), &[("KCK_STORE_NODES", " , ")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("KCK_STORE_NODES") && err.contains("is empty"),
        "{err}"
    );
    let err = load_env(&scylla(""), &[("KCK_STORE_PASSWORD", "x")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("KCK_STORE_PASSWORD is set but store.username is not"),
        "{err}"
    );
}

#[test]
fn roles_and_standby() {
    let at_end = |extra: &str| format!("{BASE}{extra}");
    let c = load(BASE).unwrap();
    assert_eq!(c.roles, Roles::ALL);
    assert!(!c.source.standby);
    let c = load(&at_end("roles: [http, refresh]\n")).unwrap();
    assert_eq!(
        c.roles,
        Roles {
            replication: false,
            refresh: true,
            http: true
        }
    );
    assert_eq!(c.roles.to_string(), "refresh,http");
    let c = load(&base_with("  url:", "  standby: true\n  url:")).unwrap();
    assert!(c.source.standby);
    assert_invalid(
        &at_end("roles: [http, cache]\n"),
        10,
        "roles[1]",
        "unknown role 'cache'",
    );
    assert_invalid(&at_end("roles: []\n"), 10, "roles", "no role given");
    assert_invalid(&at_end("roles: [http, http]\n"), 10, "roles", "given twice");
    assert_eq!(
        Roles::parse_list("replication,refresh,http"),
        Ok(Roles::ALL)
    );
    assert_eq!(
        Roles::parse_list(" replication "),
        Ok(Roles {
            replication: true,
            refresh: false,
            http: false
        })
    );
    assert!(Roles::parse_list("").unwrap_err().contains("no role given"));
    assert!(
        Roles::parse_list("http,web")
            .unwrap_err()
            .contains("unknown role 'web'")
    );
}

#[test]
fn unknown_fields_and_wrong_types() {
    assert_invalid(
        &base_with("  url:", "  create_publcation: true\n  url:"),
        2,
        "source.create_publcation",
        "unknown field `create_publcation`; did you mean `create_publication`?",
    );
    assert_invalid(
        &format!("{BASE}primer_dir: x\n"),
        10,
        "primer_dir",
        "did you mean `primers_dir`?",
    );
    assert_invalid(
        &format!("{BASE}zzz: 1\n"),
        10,
        "zzz",
        "unknown field `zzz` (known fields: source, store",
    );
    assert_invalid(
        &base_with("    query:", "    shap: row\n    query:"),
        6,
        "primers[0].shap",
        "did you mean `shape`?",
    );
    assert_invalid(
        &base_with("        columns:", "        column:"),
        9,
        "primers[0].depends_on[0].column",
        "did you mean `columns`?",
    );
    assert_invalid(
        &base_with("- name: orders_by_user", "- name: [a]"),
        4,
        "primers[0].name",
        "expected a string",
    );
    assert_invalid(
        &format!("{BASE}refresh: 3\n"),
        10,
        "refresh",
        "expected a mapping",
    );
    assert_invalid(
        &base_with("    depends_on:", "    depends_on: orders\n    x:"),
        7,
        "primers[0].depends_on",
        "expected a list",
    );
    assert_invalid(
        &format!("{BASE}source: {{}}\n"),
        10,
        "source",
        "`source` is given twice",
    );
    assert_invalid(
        &base_with("{ user_id: user_id }", "{ user_id: user_id, user_id: x }"),
        9,
        "primers[0].depends_on[0].columns",
        "`user_id` is given twice",
    );
    // YAML syntax errors carry their line too.
    assert_invalid(
        "source:\n  url: x\n - y\n",
        3,
        "(document)",
        "did not find expected key",
    );
    assert_invalid("source: {url: x\n", 1, "source", "unclosed bracket");
    assert_invalid("source:\n\turl: x\n", 2, "(document)", "tabs");
    assert_invalid("- a\n", 1, "(document)", "expected a mapping");
}

#[test]
fn primer_errors() {
    assert_invalid(
        "source:\n  url: postgres://h/db\n",
        1,
        "primers",
        "at least one primer",
    );
    assert_invalid(
        "source:\n  url: postgres://h/db\nprimers: []\n",
        3,
        "primers",
        "at least one primer",
    );
    assert_invalid(
        &base_with("- name: orders_by_user", "- name: Orders"),
        4,
        "primers[0].name",
        "'Orders' is not a valid primer name",
    );
    assert_invalid(
        &base_with("- name: orders_by_user\n    key:", "- key:"),
        4,
        "primers[0].name",
        "required",
    );
    assert_invalid(
        &base_with("    key: orders_by_user/{user_id:int}\n", ""),
        4,
        "primers[0].key",
        "required",
    );
    assert_invalid(
        &base_with("{user_id:int}", "{user_id:integer}"),
        5,
        "primers[0].key",
        "invalid key template 'orders_by_user/{user_id:integer}': parameter 'user_id' has unknown type 'integer'",
    );
    assert_invalid(
        &base_with(
            "key: orders_by_user/{user_id:int}",
            "key: \"{user_id:int}\"",
        ),
        5,
        "primers[0].key",
        "first segment must be a literal",
    );
    assert_invalid(
        &base_with("    query:", "    shape: table\n    query:"),
        6,
        "primers[0].shape",
        "unknown shape 'table'",
    );
    assert_invalid(
        &base_with(
            "    query: SELECT id, total FROM orders WHERE user_id = $1\n",
            "",
        ),
        4,
        "primers[0].query",
        "required",
    );
    assert_invalid(
        &base_with(
            "SELECT id, total FROM orders WHERE user_id = $1",
            "\" ;  -- nothing\"",
        ),
        6,
        "primers[0].query",
        "the query is empty",
    );
    assert_invalid(
        &base_with("user_id = $1", "user_id = $1 AND x = $3"),
        6,
        "primers[0].query",
        "the query uses $3 but the key template has 1 key parameter (user_id)",
    );
    assert_invalid(
        &base_with("user_id = $1", "user_id = 1"),
        6,
        "primers[0].query",
        "the query uses no $n placeholder but the key template has 1 key parameter",
    );
    assert_invalid(
        &base_with(
            "key: orders_by_user/{user_id:int}",
            "key: orders_by_user/{user_id:int}/{a}/{b}",
        )
        .replace("user_id = $1", "user_id = $1 AND b = $3"),
        6,
        "primers[0].query",
        "the query does not use $2 (key parameter 'a')",
    );
    // A literal block's placeholder errors point at the placeholder's line; other scalars' at their first.
    let block = |style: &str| {
        base_with(
            "query: SELECT id, total FROM orders WHERE user_id = $1",
            &format!("query: {style}\n      SELECT id\n      FROM orders WHERE user_id = $2"),
        )
    };
    assert_invalid(&block("|"), 8, "primers[0].query", "uses $2");
    assert_invalid(&block("|-  # comment"), 8, "primers[0].query", "uses $2");
    assert_invalid(&block(">"), 7, "primers[0].query", "uses $2");
    assert_invalid(
        &base_with("user_id = $1", "user_id = $1 AND x = $2"),
        6,
        "primers[0].query",
        "the query uses $2 but the key template has 1 key parameter (user_id): they are bound as $1..$n in order, so the highest placeholder must be $1",
    );
    assert_invalid(
        &base_with("key: orders_by_user/{user_id:int}", "key: orders_by_user"),
        6,
        "primers[0].query",
        "the query uses $1 but the key template has no key parameters, so the query cannot use $n placeholders",
    );
    assert_invalid(
        &base_with("user_id = $1", "user_id = $1; DELETE FROM orders"),
        6,
        "primers[0].query",
        "more than one statement",
    );
    assert_invalid(
        &base_with("user_id = $1", "user_id = '$1"),
        6,
        "primers[0].query",
        "unterminated string literal",
    );
}

#[test]
fn duplicate_and_ambiguous_primers() {
    let second = "  - name: orders_by_user\n    key: other/{x}\n    query: SELECT $1\n    depends_on: [{ table: t }]\n";
    assert_invalid(
        &format!("{BASE}{second}"),
        10,
        "primers[1].name",
        "the primer name 'orders_by_user' is already used at /etc/kck/kck.yaml:4",
    );
    let second = "  - name: other\n    key: orders_by_user/{name}\n    query: SELECT $1\n    depends_on: [{ table: t }]\n";
    assert_invalid(
        &format!("{BASE}{second}"),
        11,
        "primers[1].key",
        "the key template 'orders_by_user/{name}' can match the same key text as 'orders_by_user/{user_id:int}' of primer 'orders_by_user' (/etc/kck/kck.yaml:5)",
    );
    let second = "  - name: other\n    key: orders_by_user/{name}/x\n    query: SELECT $1\n    depends_on: [{ table: t }]\n";
    load(&format!("{BASE}{second}")).unwrap();
}

#[test]
fn dependency_errors() {
    // Without depends_on a primer loads with no dependencies: kck follows what its plan reads at start.
    let config = load(&base_with(
        "    depends_on:\n      - table: orders\n        columns: { user_id: user_id }\n",
        "",
    ))
    .unwrap();
    let primer = &config.catalog.primers[0];
    assert!(!primer.depends_on_given);
    assert!(primer.dependencies.is_empty());
    // not_followed: tables read but deliberately not followed; never both in it and in depends_on.
    let config = load(&base_with(
        "        columns: { user_id: user_id }\n",
        "        columns: { user_id: user_id }\n    not_followed: [app.rates]\n",
    ))
    .unwrap();
    assert_eq!(
        config.catalog.primers[0].not_followed,
        vec![TableName {
            schema: "app".into(),
            name: "rates".into()
        }]
    );
    assert_invalid(
        &base_with(
            "        columns: { user_id: user_id }\n",
            "        columns: { user_id: user_id }\n    not_followed: [orders]\n",
        ),
        10,
        "primers[0].not_followed[0]",
        "also in depends_on",
    );
    assert_invalid(
        &base_with(
            "    depends_on:\n      - table: orders\n        columns: { user_id: user_id }\n",
            "    depends_on: []\n",
        ),
        7,
        "primers[0].depends_on",
        "at least one table",
    );
    assert_invalid(
        &base_with("      - table: orders\n", "      - "),
        8,
        "primers[0].depends_on[0].table",
        "required",
    );
    assert_invalid(
        &base_with("table: orders", "table: a.b.c"),
        8,
        "primers[0].depends_on[0].table",
        "'a.b.c' is not a table name",
    );
    assert_invalid(
        &base_with("table: orders", "table: '\"Orders'"),
        8,
        "primers[0].depends_on[0].table",
        "a quoted name ends with",
    );
    assert_invalid(
        &base_with("table: orders", "table: 1orders"),
        8,
        "primers[0].depends_on[0].table",
        "not valid as a table name",
    );
    assert_invalid(
        &base_with("{ user_id: user_id }", "{ user_id: user_id, uid: x }"),
        9,
        "primers[0].depends_on[0].columns.uid",
        "'uid' is not a parameter of the key template 'orders_by_user/{user_id:int}' (its parameters: user_id)",
    );
    assert_invalid(
        &base_with("{ user_id: user_id }", "{ user_id: user id }"),
        9,
        "primers[0].depends_on[0].columns.user_id",
        "'user id' is not valid as a column name",
    );
    assert_invalid(
        &base_with(" { user_id: user_id }", ""),
        9,
        "primers[0].depends_on[0].columns",
        "",
    );
    assert_invalid(
        &base_with("columns: { user_id: user_id }", "lookup:"),
        9,
        "primers[0].depends_on[0].lookup",
        "",
    );
    assert_invalid(
        &base_with("{ user_id: user_id }", "{}"),
        9,
        "primers[0].depends_on[0].columns",
        "key parameter 'user_id' is not mapped",
    );
    assert_invalid(
        &base_with(
            "        columns: { user_id: user_id }\n",
            "        columns: { user_id: user_id }\n        lookup: { query: SELECT 1, args: [] }\n",
        ),
        10,
        "primers[0].depends_on[0]",
        "either `columns` or `lookup`, not both",
    );
    let lookup = |body: &str| {
        base_with(
            "        columns: { user_id: user_id }\n",
            &format!("        lookup:\n{body}"),
        )
    };
    assert_invalid(
        &lookup("          args: [id]\n"),
        10,
        "primers[0].depends_on[0].lookup.query",
        "required",
    );
    assert_invalid(
        &lookup("          query: SELECT user_id FROM orders WHERE id = $1\n"),
        10,
        "primers[0].depends_on[0].lookup.args",
        "required",
    );
    assert_invalid(
        &lookup("          query: SELECT user_id FROM orders WHERE id = $1\n          args: []\n"),
        11,
        "primers[0].depends_on[0].lookup.args",
        "at least one column",
    );
    assert_invalid(
        &lookup(
            "          query: SELECT user_id FROM orders WHERE id = $2\n          args: [id, x]\n",
        ),
        10,
        "primers[0].depends_on[0].lookup.query",
        "the query does not use $1 (argument 'id')",
    );
    assert_invalid(
        &lookup(
            "          query: SELECT user_id FROM orders WHERE id = $1\n          args: [id, x]\n",
        ),
        10,
        "primers[0].depends_on[0].lookup.query",
        "the query uses $1 but `lookup.args` has 2 arguments (id, x)",
    );
    assert_invalid(
        &lookup("          query: SELECT 1\n          args: [\"a b\"]\n"),
        11,
        "primers[0].depends_on[0].lookup.args[0]",
        "'a b' is not valid as a column name",
    );
    let c = load(&lookup("          query: SELECT user_id FROM orders WHERE id = $1 AND v = $2;\n          args: [ID, version]\n")).unwrap();
    assert_eq!(
        c.catalog.primers[0].dependencies[0].mapping,
        Mapping::Lookup {
            query: "SELECT user_id FROM orders WHERE id = $1 AND v = $2".into(),
            args: vec!["id".into(), "version".into()],
        }
    );
}

#[test]
fn env_overrides() {
    let vars = [
        ("KCK_SOURCE_URL", "host=db user=kck password=pw dbname=app"),
        ("KCK_SOURCE_PUBLICATION", "pub2"),
        ("KCK_SOURCE_SLOT", "slot2"),
        ("KCK_STORE_PATH", "rel/data"),
        ("KCK_HTTP_BIND", "[::1]:81"),
    ];
    let c = load_env(BASE, &vars).unwrap();
    assert_eq!(c.source.url, "host=db user=kck password=pw dbname=app");
    assert_eq!(
        c.source.redacted_url(),
        "host=db user=kck password=*** dbname=app"
    );
    assert_eq!(c.source.publication, "pub2");
    assert_eq!(c.source.slot, "slot2");
    // Relative to the working directory, not to the file.
    let StoreConfig::Embedded { path, .. } = &c.store else {
        panic!("expected the embedded store, got {:?}", c.store)
    };
    assert_eq!(path, Path::new("rel/data"));
    assert_eq!(c.http.bind, "[::1]:81".parse::<SocketAddr>().unwrap());
    // The URL may come from the environment alone; an override wins over a bad file value.
    let no_url = BASE.replace(
        "  url: postgres://kck:secret@127.0.0.1:5432/app\n",
        "  url: 'not a url'\n",
    );
    let c = load_env(&no_url, &[("KCK_SOURCE_URL", "postgres://h/db")]).unwrap();
    assert_eq!(c.source.url, "postgres://h/db");

    for (var, value, needle) in [
        ("KCK_SOURCE_URL", "", "is empty"),
        (
            "KCK_SOURCE_URL",
            "postgres://h:x/db",
            "not a valid Postgres connection",
        ),
        (
            "KCK_SOURCE_PUBLICATION",
            "a,b",
            "not valid as a publication name",
        ),
        (
            "KCK_SOURCE_SLOT",
            "Slot",
            "not a valid replication slot name",
        ),
        ("KCK_STORE_PATH", "", "is empty"),
        (
            "KCK_HTTP_BIND",
            "8080",
            "'8080' is not an IP address and port",
        ),
    ] {
        let err = load_env(BASE, &[(var, value)]).unwrap_err();
        let text = err.to_string();
        match &err {
            ConfigError::Env {
                var: v,
                field,
                message,
                ..
            } => {
                assert_eq!(v, var);
                let expected_field = ENV_OVERRIDES.iter().find(|(n, _)| *n == var).unwrap().1;
                assert_eq!(field, expected_field);
                assert!(message.contains(needle), "{text}");
                assert!(
                    text.starts_with(&format!(
                        "environment variable {var} (overrides {expected_field} of {FILE}): "
                    )),
                    "{text}"
                );
            }
            other => panic!("{var}: expected Env, got {other:?}"),
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const SQL_PRIMER: &str = "\
-- kck:primer
-- key: orders_by_user/{user_id:int}
-- shape: rows
-- depends_on:
--   - table: orders
--     columns: { user_id: user_id }
SELECT id, total FROM orders WHERE user_id = $1 ORDER BY id;
";

#[test]
fn sql_primers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("primers")).unwrap();
    write(
        &dir.path().join("primers"),
        "orders_by_user.sql",
        SQL_PRIMER,
    );
    write(
        &dir.path().join("primers"),
        "b.sql",
        "-- kck:primer\n--name: order_total\n--key: order_total/{id}\n--depends_on: [{table: orders}]\n\n\
             -- a SQL comment, not header\nSELECT total\n  FROM orders WHERE id = $1 -- the id\n;\n\n",
    );
    write(&dir.path().join("primers"), "notes.txt", "not a primer");
    let config = write(
        dir.path(),
        "kck.yaml",
        "source:\n  url: postgres://h/db\nprimers_dir: primers\n",
    );
    let c = Config::load_with_env(&config, no_env).unwrap();
    let primers = &c.catalog.primers;
    assert_eq!(primers.len(), 2);
    // Sorted by file name: b.sql first.
    assert_eq!(primers[0].name, "order_total");
    assert_eq!(
        primers[0].query,
        "-- a SQL comment, not header\nSELECT total\n  FROM orders WHERE id = $1"
    );
    assert_eq!(primers[1].name, "orders_by_user");
    assert_eq!(
        primers[1].query,
        "SELECT id, total FROM orders WHERE user_id = $1 ORDER BY id"
    );
    assert_eq!(
        primers[1].dependencies[0].mapping,
        Mapping::Columns(vec![(0, "user_id".into())])
    );

    // YAML primers and .sql primers together; names must be unique across both.
    let yaml = "source:\n  url: postgres://h/db\nprimers_dir: primers\nprimers:\n  - name: orders_by_user\n    key: x/{a}\n    query: SELECT $1\n    depends_on: [{ table: t }]\n";
    std::fs::write(&config, yaml).unwrap();
    assert_invalid_at(
        Config::load_with_env(&config, no_env),
        &dir.path().join("primers/orders_by_user.sql"),
        1,
        "name",
        &format!(
            "the primer name 'orders_by_user' is already used at {}:5",
            config.display()
        ),
    );
}

#[test]
fn sql_primer_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "kck.yaml",
        "source:\n  url: postgres://h/db\nprimers_dir: p\n",
    );
    let primers = dir.path().join("p");
    let load = || Config::load_with_env(&config, no_env);
    assert_invalid_at(
        load(),
        &config,
        3,
        "primers_dir",
        "cannot read the directory",
    );
    std::fs::create_dir(&primers).unwrap();
    assert_invalid_at(load(), &config, 1, "primers", "at least one primer");

    let file = write(&primers, "a.sql", "-- key: a/{x}\nSELECT $1\n");
    assert_invalid_at(
        load(),
        &file,
        1,
        "header",
        "must start with the line `-- kck:primer` (found `-- key: a/{x}`)",
    );
    std::fs::write(&file, "").unwrap();
    assert_invalid_at(load(), &file, 1, "header", "(found ``)");

    let bad_header = "-- kck:primer\n-- key: a/{x}\n-- depends_on:\n--   - table: t\n--     colums: { x: y }\nSELECT $1\n";
    std::fs::write(&file, bad_header).unwrap();
    assert_invalid_at(
        load(),
        &file,
        5,
        "depends_on[0].colums",
        "did you mean `columns`?",
    );
    std::fs::write(&file, "-- kck:primer\n-- key: [a\nSELECT 1\n").unwrap();
    let err = load().unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { path, .. } if path == &file),
        "{err}"
    );

    let header =
        "-- kck:primer\n-- key: a/{x}\n-- depends_on:\n--   - table: t\n--     columns: { x: y }\n";
    std::fs::write(&file, format!("{header}\nSELECT *\nFROM t\nWHERE x = $2\n")).unwrap();
    assert_invalid_at(
        load(),
        &file,
        9,
        "query",
        "the query uses $2 but the key template has 1 key parameter (x)",
    );
    std::fs::write(&file, format!("{header}\n\nSELECT 1\n")).unwrap();
    assert_invalid_at(
        load(),
        &file,
        8,
        "query",
        "the query uses no $n placeholder",
    );
    std::fs::write(&file, format!("{header}\n")).unwrap();
    assert_invalid_at(load(), &file, 6, "query", "the query is empty");
    std::fs::write(&file, format!("{header}-- query: SELECT 1\nSELECT $1\n")).unwrap();
    assert_invalid_at(load(), &file, 6, "query", "remove `query` from the header");
    std::fs::write(
        &file,
        format!("{header}--     lookup: {{ query: 'SELECT $1', args: [a] }}\nSELECT $1\n"),
    )
    .unwrap();
    assert_invalid_at(load(), &file, 6, "depends_on[0]", "not both");
    std::fs::write(&file, header.replace("key: a/{x}", "key: a/{x:int}/{x}")).unwrap();
    assert_invalid_at(load(), &file, 2, "key", "'x' appears more than once");
    // The name comes from the file stem, which must then be a valid name.
    let dashed = primers.join("my-primer.sql");
    std::fs::rename(&file, &dashed).unwrap();
    std::fs::write(&dashed, format!("{header}SELECT $1")).unwrap();
    assert_invalid_at(
        load(),
        &dashed,
        1,
        "name",
        "'my-primer' is not a valid primer name",
    );
    std::fs::write(
        &dashed,
        format!(
            "-- kck:primer\n-- name: mine\n{}SELECT $1",
            &header["-- kck:primer\n".len()..]
        ),
    )
    .unwrap();
    assert_eq!(load().unwrap().catalog.primers[0].name, "mine");
}

#[test]
fn sql_scanner() {
    let used = |sql: &str| scan_sql(sql).map(|s| s.used).map_err(|(_, m)| m);
    assert_eq!(used("SELECT $1, $2"), Ok(vec![true, true]));
    assert_eq!(used("SELECT $2"), Ok(vec![false, true]));
    assert_eq!(used("SELECT 1"), Ok(vec![]));
    assert_eq!(used("SELECT '$1', 'it''s $2', $1"), Ok(vec![true]));
    assert_eq!(used("SELECT E'\\'$2', $1"), Ok(vec![true]));
    assert_eq!(used("SELECT '\\', $1"), Ok(vec![true]));
    assert_eq!(
        used("SELECT \"$2\", \"a\"\"$3\" FROM t WHERE x = $1"),
        Ok(vec![true])
    );
    assert_eq!(
        used("SELECT 1 -- $2\n, $1 /* $3 /* nested $4 */ $5 */"),
        Ok(vec![true])
    );
    assert_eq!(
        used("SELECT $$ $2 $$, $tag$ $3 $$ $tag$, $1"),
        Ok(vec![true])
    );
    assert_eq!(used("SELECT a$1 FROM t$2 WHERE x = $1"), Ok(vec![true]));
    assert_eq!(
        used("SELECT $10"),
        Ok(vec![false; 9].into_iter().chain([true]).collect())
    );
    assert_eq!(used("SELECT 'é', $1, ünï$2"), Ok(vec![true]));
    assert!(used("SELECT $0").unwrap_err().contains("$0"));
    assert!(used("SELECT $70000").unwrap_err().contains("65535"));
    assert!(
        used("SELECT 'x")
            .unwrap_err()
            .contains("unterminated string")
    );
    assert!(
        used("SELECT \"x")
            .unwrap_err()
            .contains("unterminated quoted identifier")
    );
    assert!(used("SELECT /* x").unwrap_err().contains("unterminated /*"));
    assert!(
        used("SELECT $a$ x")
            .unwrap_err()
            .contains("unterminated dollar-quoted string $a$")
    );
    assert!(
        used("SELECT 1; SELECT 2")
            .unwrap_err()
            .contains("more than one statement")
    );
    assert!(used("").unwrap_err().contains("empty"));
    assert!(used("  -- only a comment\n").unwrap_err().contains("empty"));
    fn end(sql: &str) -> &str {
        &sql[..scan_sql(sql).unwrap().end]
    }
    assert_eq!(end("SELECT 1;"), "SELECT 1");
    assert_eq!(end("SELECT 1 ; ;\n  -- done\n /* really */ \n"), "SELECT 1");
    assert_eq!(end("SELECT 1 -- trailing"), "SELECT 1");
    assert_eq!(end("SELECT ';' "), "SELECT ';'");
    assert_eq!(end("SELECT $$;$$;"), "SELECT $$;$$");
}

#[test]
fn url_redaction() {
    assert_eq!(
        redact_url("postgres://kck:secret@host:5432/app"),
        "postgres://kck:***@host:5432/app"
    );
    assert_eq!(
        redact_url("postgres://kck:s@cr:et@host/app?x=1"),
        "postgres://kck:***@host/app?x=1"
    );
    assert_eq!(
        redact_url("postgres://kck@host/app"),
        "postgres://kck@host/app"
    );
    assert_eq!(redact_url("postgres://host/app"), "postgres://host/app");
    assert_eq!(
        redact_url("host=h password='a b\\'c' user=u"),
        "host=h password=*** user=u"
    );
    assert_eq!(redact_url("password = pw"), "password=***");
    assert_eq!(redact_url("user=mypassword"), "user=mypassword");
}

#[test]
fn closest_field() {
    assert_eq!(closest("kind", &["kind", "path"]), Some("kind"));
    assert_eq!(closest("pth", &["kind", "path"]), Some("path"));
    assert_eq!(closest("zzzzzz", &["kind", "path"]), None);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
}

// ---------------------------------------------------------------------------------------------
// HTTP, write, auth, updaters

#[test]
fn http_write_and_auth_defaults() {
    let c = load(BASE).unwrap();
    assert_eq!(c.http.request_timeout, Duration::from_secs(30));
    assert_eq!(c.http.body_limit, 1 << 20);
    assert_eq!(c.http.max_batch_keys, 1000);
    assert_eq!(
        c.http.subscribe,
        crate::http::subscribe::SubscribeConfig::default()
    );
    assert_eq!(c.http.wait_timeout, Duration::from_secs(5));
    assert_eq!(c.http.max_wait, Duration::from_secs(60));
    assert_eq!(c.write.url, c.source.url);
    assert_eq!(c.write.connections, 4);
    assert!(c.auth.jwt.is_none());
    assert_eq!(
        c.auth.public_paths,
        ["/healthz", "/readyz", "/openapi.json"]
    );
    assert!(c.updaters.is_empty());
    assert_eq!(c.catalog.primers[0].cache_control, None);
    assert_eq!(c.catalog.primers[0].access, None);
    // The write URL's password stays out of Debug.
    let c = load(&format!("{BASE}write:\n  url: postgres://w:hush@db/app\n")).unwrap();
    assert!(!format!("{:?}", c.write).contains("hush"));
}

#[test]
fn http_and_write_fields() {
    let c = load(&format!(
            "{BASE}http:\n  request_timeout: 10s\n  body_limit: 64KiB\n  max_batch_keys: 50\n  \
             wait_timeout: 2s\n  max_wait: 20s\nwrite:\n  url: postgres://writer@db/app\n  connections: 2\n"
        ))
        .unwrap();
    assert_eq!(c.http.request_timeout, Duration::from_secs(10));
    assert_eq!(c.http.body_limit, 64 * 1024);
    assert_eq!(c.http.max_batch_keys, 50);
    assert_eq!(c.http.wait_timeout, Duration::from_secs(2));
    assert_eq!(c.http.max_wait, Duration::from_secs(20));
    assert!(c.http.cors_origins.is_empty());
    assert_eq!(c.write.url, "postgres://writer@db/app");
    assert_eq!(c.write.connections, 2);
    let c = load(&format!(
        "{BASE}http:\n  cors_origins: [\"https://app.example.com\", \"http://localhost:3000\"]\n"
    ))
    .unwrap();
    assert_eq!(
        c.http.cors_origins,
        ["https://app.example.com", "http://localhost:3000"]
    );
    assert_invalid(
        &format!("{BASE}http:\n  cors_origins: [\"https://app.example.com/path\"]\n"),
        11,
        "http.cors_origins[0]",
        "not an origin",
    );
    assert_invalid(
        &format!("{BASE}http:\n  cors_origins: [\"*\", \"https://a.example\"]\n"),
        11,
        "http.cors_origins",
        "give it alone",
    );
    for (size, bytes) in [("1048576", 1 << 20), ("2MB", 2 << 20), ("1 MiB", 1 << 20)] {
        let c = load(&format!("{BASE}http:\n  body_limit: {size}\n")).unwrap();
        assert_eq!(c.http.body_limit, bytes, "{size}");
    }
    assert_invalid(
        &format!("{BASE}http:\n  body_limit: 12 parsecs\n"),
        11,
        "http.body_limit",
        "not a size",
    );
    assert_invalid(
        &format!("{BASE}http:\n  body_limit: 10\n"),
        11,
        "http.body_limit",
        "between 1kB and 1GB",
    );
    assert_invalid(
        &format!("{BASE}http:\n  wait_timeout: 2m\n"),
        11,
        "http.wait_timeout",
        "longer than http.max_wait",
    );
    assert_invalid(
        &format!("{BASE}http:\n  max_batch_keys: 0\n"),
        11,
        "http.max_batch_keys",
        "between 1 and 100000",
    );
    assert_invalid(
        &format!("{BASE}http:\n  max_batch_misses: 0\n"),
        11,
        "http.max_batch_misses",
        "between 1 and 100000",
    );
    assert_invalid(
        &format!("{BASE}http:\n  allowed_hosts: [localhost, \"https://kck.example.com\"]\n"),
        11,
        "http.allowed_hosts[1]",
        "not a host name",
    );
    assert_invalid(
        &format!("{BASE}http:\n  allowed_hosts: []\n"),
        11,
        "http.allowed_hosts",
        "no request could be answered",
    );
    assert_invalid(
        &format!("{BASE}refresh:\n  park_after: 0\n"),
        11,
        "refresh.park_after",
        "between 1 and 1000",
    );
    assert_invalid(
        &format!("{BASE}http:\n  subscribe:\n    max_keys: 0\n"),
        12,
        "http.subscribe.max_keys",
        "between 1 and 100000",
    );
    assert_invalid(
        &format!("{BASE}http:\n  subscribe:\n    buffer: -1\n"),
        12,
        "http.subscribe.buffer",
        "between 1 and 1000000",
    );
    assert_invalid(
        &format!("{BASE}http:\n  subscribe:\n    heartbeat: 10ms\n"),
        12,
        "http.subscribe.heartbeat",
        "at least 1s",
    );
    assert_invalid(
        &format!("{BASE}write:\n  connections: 0\n"),
        11,
        "write.connections",
        "between 1 and 256",
    );
    let c = load_env(BASE, &[("KCK_WRITE_URL", "postgres://env@db/app")]).unwrap();
    assert_eq!(c.write.url, "postgres://env@db/app");
}

#[test]
fn primer_cache_control() {
    let yaml = base_with(
        "    depends_on:",
        "    cache_control: \"public, max-age=5\"\n    depends_on:",
    );
    let c = load(&yaml).unwrap();
    assert_eq!(
        c.catalog.primers[0].cache_control.as_deref(),
        Some("public, max-age=5")
    );
    let yaml = base_with(
        "    depends_on:",
        "    cache_control: \"a\\nb\"\n    depends_on:",
    );
    assert_invalid(
        &yaml,
        7,
        "primers[0].cache_control",
        "not a Cache-Control value",
    );
}

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn with_auth(auth: &str) -> String {
    format!("{BASE}auth:\n  jwt:\n    secret_env: KCK_JWT_SECRET\n{auth}")
}

#[test]
fn jwt_settings() {
    let yaml = with_auth(
        "    algorithms: [HS256, HS512]\n    issuer: https://id.example/\n    audience: [kck, api]\n    leeway: 10s\n",
    );
    let c = load_env(&yaml, &[("KCK_JWT_SECRET", SECRET)]).unwrap();
    let jwt = c.auth.jwt.as_ref().unwrap();
    assert_eq!(
        jwt.algorithms,
        [
            jsonwebtoken::Algorithm::HS256,
            jsonwebtoken::Algorithm::HS512
        ]
    );
    assert_eq!(jwt.issuer, Some(vec!["https://id.example/".to_owned()]));
    assert_eq!(jwt.audience, Some(vec!["kck".to_owned(), "api".to_owned()]));
    assert_eq!(jwt.leeway, Duration::from_secs(10));
    assert!(
        !format!("{c:?}").contains(SECRET),
        "the secret stays out of Debug"
    );
    let c = load_env(
        &with_auth("    algorithms: [HS256]\n"),
        &[("KCK_JWT_SECRET", SECRET)],
    )
    .unwrap();
    assert_eq!(
        c.auth.jwt.as_ref().map(|j| j.leeway),
        Some(Duration::from_secs(30))
    );

    let env = [("KCK_JWT_SECRET", SECRET)];
    let invalid = |yaml: &str, env: &[(&str, &str)], line: usize, field: &str, needle: &str| {
        assert_invalid_at(load_env(yaml, env), Path::new(FILE), line, field, needle)
    };
    invalid(&with_auth(""), &env, 12, "auth.jwt.algorithms", "required");
    invalid(
        &with_auth("    algorithms: [none]\n"),
        &env,
        13,
        "auth.jwt.algorithms[0]",
        "never accepted",
    );
    invalid(
        &with_auth("    algorithms: [HS256]\n"),
        &[],
        12,
        "auth.jwt.secret_env",
        "KCK_JWT_SECRET is not set",
    );
    invalid(
        &with_auth("    algorithms: [HS256]\n"),
        &[("KCK_JWT_SECRET", "short")],
        12,
        "auth.jwt.secret_env",
        "at least 32",
    );
    invalid(
        &with_auth("    algorithms: [RS256]\n"),
        &env,
        12,
        "auth.jwt",
        "none of the algorithms",
    );
    invalid(
        &with_auth("    algorithms: [HS256]\n    jwks_file: keys.json\n"),
        &env,
        12,
        "auth.jwt",
        "only one of",
    );
    invalid(
        &format!("{BASE}auth:\n  jwt:\n    algorithms: [RS256]\n"),
        &env,
        12,
        "auth.jwt",
        "give the verification key",
    );
    invalid(
        &with_auth("    algorithms: [HS256]\n    leeway: 1h\n"),
        &env,
        14,
        "auth.jwt.leeway",
        "at most 5m",
    );
    invalid(
        &with_auth("    algorithms: [HS256]\n    public_key_file: /nonexistent/key.pem\n"),
        &env,
        12,
        "auth.jwt",
        "only one of",
    );
    invalid(
        &format!(
            "{BASE}auth:\n  jwt:\n    algorithms: [RS256]\n    public_key_file: /nonexistent/key.pem\n"
        ),
        &env,
        13,
        "auth.jwt.public_key_file",
        "cannot read /nonexistent/key.pem",
    );
    invalid(
        &format!("{BASE}auth:\n  public_paths: [healthz]\n"),
        &env,
        11,
        "auth.public_paths[0]",
        "starting with /",
    );
    // The operator rule: claims only (operations routes have no parameters), and it needs jwt.
    let c = load_env(
        &with_auth("    algorithms: [HS256]\n  operator: { require: { role: ops } }\n"),
        &env,
    )
    .unwrap();
    assert_eq!(
        c.auth.operator.map(|o| o.rules[0].require.clone()),
        Some(vec![("role".to_owned(), vec!["ops".to_owned()])])
    );
    invalid(
        &with_auth("    algorithms: [HS256]\n  operator: { match: { sub: id } }\n"),
        &env,
        14,
        "auth.operator.match.sub",
        "the parameters: none",
    );
    invalid(
        &format!("{BASE}auth:\n  operator: {{ require: {{ role: ops }} }}\n"),
        &env,
        11,
        "auth.operator",
        "configure `auth.jwt`",
    );
    // Public paths may be replaced, and auth may be off with only public_paths given.
    let c = load(&format!(
        "{BASE}auth:\n  public_paths: [/healthz, /metrics]\n"
    ))
    .unwrap();
    assert_eq!(c.auth.public_paths, ["/healthz", "/metrics"]);
    assert!(c.auth.jwt.is_none());
}

const UPDATERS: &str = "\
updaters:
  - name: place_order
    params: [id:int, user_id:int, total:numeric, { name: note, type: text, nullable: true }]
    statements:
      - INSERT INTO orders (id, user_id, total, note) VALUES ($1, $2, $3, $4);
      - UPDATE users SET orders = orders + 1 WHERE id = $2
  - name: ping
    statements: [SELECT 1]
";

#[test]
fn updaters_from_yaml() {
    use crate::update::{UpdaterParam, ValueType};
    let c = load(&format!("{BASE}{UPDATERS}")).unwrap();
    assert_eq!(c.updaters.len(), 2);
    let u = &c.updaters[0];
    assert_eq!(u.name, "place_order");
    let param = |name: &str, ty, nullable| UpdaterParam {
        name: name.into(),
        ty,
        nullable,
    };
    assert_eq!(
        u.params,
        vec![
            param("id", ValueType::Int, false),
            param("user_id", ValueType::Int, false),
            param("total", ValueType::Numeric, false),
            param("note", ValueType::Text, true),
        ]
    );
    assert_eq!(
        u.statements[0].sql,
        "INSERT INTO orders (id, user_id, total, note) VALUES ($1, $2, $3, $4)"
    );
    assert_eq!(u.statements[0].uses, vec![true; 4]);
    assert_eq!(u.statements[1].uses, vec![false, true]);
    assert!(c.updaters[1].params.is_empty());
    assert_eq!(c.updaters[1].statements[0].uses, Vec::<bool>::new());
}

#[test]
fn updater_errors() {
    let u = |body: &str| format!("{BASE}updaters:\n  - name: u\n{body}");
    assert_invalid(
        &u("    params: [id:int]\n"),
        11,
        "updaters[0].statements",
        "required",
    );
    assert_invalid(
        &u("    params: [id:integer]\n    statements: [SELECT $1]\n"),
        12,
        "updaters[0].params[0]",
        "unknown type 'integer'",
    );
    assert_invalid(
        &u("    params: [id:int, id:text]\n    statements: [SELECT $1]\n"),
        12,
        "updaters[0].params[1]",
        "declared twice",
    );
    assert_invalid(
        &u("    params: [id:int]\n    statements: [\"SELECT $1, $2\"]\n"),
        13,
        "updaters[0].statements[0]",
        "uses $2 but the updater has 1 parameter (id)",
    );
    assert_invalid(
        &u("    params: [id:int, spare]\n    statements: [SELECT $1]\n"),
        12,
        "updaters[0].params",
        "'spare' ($2) is not used by any statement",
    );
    assert_invalid(
        &u("    statements: [SELECT 1, COMMIT]\n"),
        12,
        "updaters[0].statements[1]",
        "controls the transaction",
    );
    assert_invalid(
        &u("    statements: [\"SELECT 1; SELECT 2\"]\n"),
        12,
        "updaters[0].statements[0]",
        "more than one statement",
    );
    assert_invalid(
        &u("    statements: [SELECT 1]\n    access: { require: { role: admin } }\n"),
        13,
        "updaters[0].access",
        "configure `auth.jwt`",
    );
    assert_invalid(
        &format!("{BASE}updaters:\n  - name: Bad-Name\n    statements: [SELECT 1]\n"),
        11,
        "updaters[0].name",
        "not a valid updater name",
    );
    assert_invalid(
        &format!(
            "{BASE}updaters:\n  - name: a\n    statements: [SELECT 1]\n  - name: a\n    statements: [SELECT 2]\n"
        ),
        13,
        "updaters[1].name",
        "already used",
    );
}

#[test]
fn access_rules() {
    let env = [("KCK_JWT_SECRET", SECRET)];
    let auth = "auth:\n  jwt:\n    algorithms: [HS256]\n    secret_env: KCK_JWT_SECRET\n";
    let yaml = format!(
        "{}{auth}",
        base_with(
            "    depends_on:",
            "    access:\n      - match: { sub: user_id }\n      - require: { role: [admin, ops], level: 3 }\n    depends_on:"
        )
    );
    let c = load_env(&yaml, &env).unwrap();
    let access = c.catalog.primers[0].access.as_ref().unwrap();
    assert_eq!(
        access.rules,
        vec![
            AccessRule {
                require: vec![],
                matches: vec![("sub".into(), 0)],
            },
            AccessRule {
                require: vec![
                    ("role".into(), vec!["admin".into(), "ops".into()]),
                    ("level".into(), vec!["3".into()]),
                ],
                matches: vec![],
            },
        ]
    );
    // One rule as a mapping; an updater's parameters.
    let yaml = format!(
        "{BASE}{auth}updaters:\n  - name: u\n    params: [id:int]\n    statements: [SELECT $1]\n    access: {{ match: {{ sub: id }}, require: {{ role: user }} }}\n"
    );
    let c = load_env(&yaml, &env).unwrap();
    assert_eq!(c.updaters[0].access.as_ref().unwrap().rules.len(), 1);

    let bad = format!(
        "{}{auth}",
        base_with(
            "    depends_on:",
            "    access: { match: { sub: uid } }\n    depends_on:"
        )
    );
    assert_invalid_at(
        load_env(&bad, &env),
        Path::new(FILE),
        7,
        "primers[0].access.match.sub",
        "'uid' is not a parameter here (the parameters: user_id)",
    );
    let bad = format!(
        "{}{auth}",
        base_with("    depends_on:", "    access: {}\n    depends_on:")
    );
    assert_invalid_at(
        load_env(&bad, &env),
        Path::new(FILE),
        7,
        "primers[0].access",
        "a rule needs `require`",
    );
    let no_auth = base_with(
        "    depends_on:",
        "    access: { require: { role: admin } }\n    depends_on:",
    );
    assert_invalid(&no_auth, 7, "primers[0].access", "configure `auth.jwt`");
}

#[test]
fn sql_updaters() {
    let dir = tempfile::tempdir().unwrap();
    let updaters = dir.path().join("updaters");
    std::fs::create_dir(&updaters).unwrap();
    write(
        &updaters,
        "place_order.sql",
        "-- kck:updater\n-- params: [id:int, user_id:int]\nINSERT INTO orders (id, user_id) VALUES ($1, $2);\n\n\
             -- then count it\nUPDATE users SET orders = orders + 1\n WHERE id = $2;\n",
    );
    let config = write(
        dir.path(),
        "kck.yaml",
        &format!("{BASE}updaters_dir: updaters\n"),
    );
    let c = Config::load_with_env(&config, no_env).unwrap();
    assert_eq!(c.updaters.len(), 1);
    let u = &c.updaters[0];
    assert_eq!(u.name, "place_order");
    assert_eq!(
        u.statements
            .iter()
            .map(|s| s.sql.as_str())
            .collect::<Vec<_>>(),
        [
            "INSERT INTO orders (id, user_id) VALUES ($1, $2)",
            "UPDATE users SET orders = orders + 1\n WHERE id = $2"
        ]
    );
    // Errors name the file and the line of the statement.
    let file = write(
        &updaters,
        "place_order.sql",
        "-- kck:updater\n-- params: [id:int]\nSELECT $1;\nSELECT $2;\n",
    );
    assert_invalid_at(
        Config::load_with_env(&config, no_env),
        &file,
        4,
        "statements[1]",
        "uses $2",
    );
    let file = write(&updaters, "place_order.sql", SQL_PRIMER);
    assert_invalid_at(
        Config::load_with_env(&config, no_env),
        &file,
        1,
        "header",
        "this is a primer file; put it in `primers_dir`",
    );
    let file = write(
        &updaters,
        "place_order.sql",
        "-- kck:updater\n-- statements: [SELECT 1]\nSELECT 1\n",
    );
    assert_invalid_at(
        Config::load_with_env(&config, no_env),
        &file,
        2,
        "statements",
        "body of the file",
    );
    let file = write(
        &updaters,
        "place_order.sql",
        "-- kck:updater\n-- params: []\n\n",
    );
    assert_invalid_at(
        Config::load_with_env(&config, no_env),
        &file,
        3,
        "statements",
        "no SQL statement",
    );
}

#[test]
fn scanning_several_statements() {
    let sql = "INSERT INTO t VALUES ($1, ';');;\n-- c; d\nUPDATE t SET x = $$a;b$$ WHERE y = $2;  ";
    let scans = scan_statements(sql, true).unwrap();
    assert_eq!(scans.len(), 2);
    assert_eq!(
        &sql[scans[0].start..scans[0].end],
        "INSERT INTO t VALUES ($1, ';')"
    );
    assert_eq!(
        &sql[scans[1].start..scans[1].end],
        "UPDATE t SET x = $$a;b$$ WHERE y = $2"
    );
    assert_eq!(scans[0].used, vec![true]);
    assert_eq!(scans[1].used, vec![false, true]);
    assert!(scan_statements(" ; -- nothing\n", true).is_err());
    assert!(scan_statements("SELECT 1; SELECT 2", false).is_err());
}
