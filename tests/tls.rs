//! Postgres as managed services run it: TLS only (`hostssl` lines), a CA of the test's own, roles with md5,
//! scram-sha-256 and client certificates that are not superusers (REPLICATION and SELECT only), an ORM-shaped
//! schema (quoted PascalCase names in a schema of its own, a partitioned table, a default publication).
//! `kck check` passes where `kck run` works and fails, naming the fix, where it would not.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::OnceCell;

use crate::support::certs::Ca;
use crate::support::kck::{
    ConfigYaml, assert_converged, eventually_equals, fetch, load, start, wait_drained,
};
use crate::support::pg::{OwnedCluster, Spec, separate_cluster_spec};

/// pg_hba.conf: the test's own `postgres` over plain TCP (readiness probe, set-up), everyone else only
/// over TLS. No `replication` lines: a logical replication connection names its database, so Postgres
/// matches it against the database's lines (the `replication` keyword is for physical replication).
const HBA: &str = "\
local     all  all         trust
host      all  postgres    127.0.0.1/32  trust
hostssl   all  kck_md5     127.0.0.1/32  md5
hostssl   all  kck_scram   127.0.0.1/32  scram-sha-256
hostssl   all  kck_cert    127.0.0.1/32  cert
hostssl   all  kck_norepl  127.0.0.1/32  scram-sha-256
";

/// A Prisma-shaped schema: quoted PascalCase tables and camelCase columns in schema "App", "Post"
/// partitioned by its author, in a publication made the default way (leaf partitions listed).
const SCHEMA: &str = r#"
CREATE SCHEMA "App";
CREATE TABLE "App"."User" (id int PRIMARY KEY, "displayName" text NOT NULL, "createdAt" timestamptz NOT NULL DEFAULT now());
CREATE TABLE "App"."Post" (id int, "authorId" int NOT NULL, title text NOT NULL, PRIMARY KEY (id, "authorId"))
    PARTITION BY HASH ("authorId");
CREATE TABLE "App"."Post_0" PARTITION OF "App"."Post" FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE "App"."Post_1" PARTITION OF "App"."Post" FOR VALUES WITH (MODULUS 2, REMAINDER 1);
INSERT INTO "App"."User" (id, "displayName") SELECT g, 'user ' || g FROM generate_series(1, 20) g;
INSERT INTO "App"."Post" (id, "authorId", title) SELECT g, 1 + g % 20, 'post ' || g FROM generate_series(1, 60) g;
CREATE PUBLICATION kck_pub FOR TABLE "App"."User", "App"."Post";
SET password_encryption = 'md5';
CREATE ROLE kck_md5 LOGIN REPLICATION PASSWORD 'md5 secret';
SET password_encryption = 'scram-sha-256';
CREATE ROLE kck_scram LOGIN REPLICATION PASSWORD 'scram secret';
CREATE ROLE kck_norepl LOGIN PASSWORD 'norepl secret';
CREATE ROLE kck_cert LOGIN REPLICATION;
GRANT USAGE ON SCHEMA "App" TO kck_md5, kck_scram, kck_norepl, kck_cert;
GRANT SELECT ON ALL TABLES IN SCHEMA "App" TO kck_md5, kck_scram, kck_norepl, kck_cert;
"#;

const PRIMERS: &str = r#"
  - name: user_name
    key: "user_name/{id:int}"
    shape: value
    query: 'SELECT "displayName" FROM "App"."User" WHERE id = $1'
    depends_on:
      - table: '"App"."User"'
        columns: { id: id }
  - name: posts_by
    key: "posts_by/{author:int}"
    query: 'SELECT coalesce(json_agg(title ORDER BY id), ''[]'') FROM "App"."Post" WHERE "authorId" = $1'
    shape: value
    depends_on:
      - table: '"App"."Post"'
        columns: { author: '"authorId"' }
"#;

/// One TLS-only cluster for the module, with its CA's files.
struct Managed {
    cluster: OwnedCluster,
    dir: tempfile::TempDir,
}

impl Managed {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `postgres://USER:PASSWORD@HOST:PORT/kck_app?PARAMS`.
    fn url(&self, user: &str, password: &str, host: &str, params: &str) -> String {
        let auth = if password.is_empty() {
            user.to_string()
        } else {
            format!("{user}:{}", password.replace(' ', "%20"))
        };
        format!(
            "postgres://{auth}@{host}:{}/kck_app?{params}",
            self.cluster.port
        )
    }

    fn ca(&self) -> String {
        self.file("ca.crt").display().to_string()
    }
}

static MANAGED: OnceCell<Managed> = OnceCell::const_new();

async fn managed() -> &'static Managed {
    MANAGED
        .get_or_init(|| async {
            let ca = Ca::new("kck test CA");
            let server = ca.server(&["localhost", "127.0.0.1"]);
            let client = ca.client("kck_cert");
            let other = Ca::new("someone else's CA");
            let dir = tempfile::tempdir().unwrap();
            let write = |name: &str, text: &str| {
                let path = dir.path().join(name);
                std::fs::write(&path, text).unwrap();
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
            };
            write("ca.crt", &ca.pem);
            write("other-ca.crt", &other.pem);
            write("client.crt", &client.cert);
            write("client.key", &client.key);
            let cluster = separate_cluster_spec(Spec {
                settings: vec![
                    ("ssl".into(), "on".into()),
                    ("ssl_cert_file".into(), "{dir}/server.crt".into()),
                    ("ssl_key_file".into(), "{dir}/server.key".into()),
                    ("ssl_ca_file".into(), "{dir}/ca.crt".into()),
                ],
                hba: Some(HBA.into()),
                files: vec![
                    ("server.crt".into(), server.cert.into_bytes()),
                    ("server.key".into(), server.key.into_bytes()),
                    ("ca.crt".into(), ca.pem.clone().into_bytes()),
                ],
            })
            .await;
            let admin = cluster.admin_client().await;
            admin
                .batch_execute("CREATE DATABASE kck_app")
                .await
                .unwrap();
            let app = cluster.connect("kck_app").await;
            app.batch_execute(SCHEMA).await.unwrap();
            Managed { cluster, dir }
        })
        .await
}

/// `kck check`'s report for a config of `url`, in-process (as the binary runs it).
async fn check(dir: &Path, url: &str) -> kck::cli::check::Report {
    let path = ConfigYaml::new(url, "kck_pub", "kck_tls", PRIMERS).write(dir);
    kck::cli::check::run(&load(&path)).await
}

fn fails(report: &kck::cli::check::Report) -> Vec<String> {
    report
        .findings
        .iter()
        .filter(|f| f.level == kck::cli::check::Level::Fail)
        .map(|f| format!("{}: {}", f.topic, f.message))
        .collect()
}

#[tokio::test]
async fn check_passes_over_verify_full_with_md5_scram_and_client_certificates() {
    let m = managed().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = m.ca();
    for (what, url) in [
        (
            "md5, verify-full by name",
            m.url(
                "kck_md5",
                "md5 secret",
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
        ),
        (
            "md5, verify-full by IP address",
            m.url(
                "kck_md5",
                "md5 secret",
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
        ),
        (
            "scram, require",
            m.url("kck_scram", "scram secret", "127.0.0.1", "sslmode=require"),
        ),
        (
            "client certificate, verify-ca",
            m.url(
                "kck_cert",
                "",
                "127.0.0.1",
                &format!(
                    "sslmode=verify-ca&sslrootcert={ca}&sslcert={}&sslkey={}",
                    m.file("client.crt").display(),
                    m.file("client.key").display()
                ),
            ),
        ),
    ] {
        let report = check(dir.path(), &url).await;
        let text = report.to_text();
        assert!(fails(&report).is_empty(), "{what}:\n{text}");
        assert!(
            text.contains("ok   replication connection: IDENTIFY_SYSTEM answered"),
            "{what}:\n{text}"
        );
        assert!(text.contains("ok   tls: sslmode="), "{what}:\n{text}");
        assert!(
            text.contains(
                "partitioned table \"App\".\"Post\": publish_via_partition_root = false (the default)"
            ),
            "{what}:\n{text}"
        );
    }
}

#[tokio::test]
async fn check_names_the_fix_for_each_misconfiguration() {
    let m = managed().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = m.ca();
    let other = m.file("other-ca.crt").display().to_string();
    let cases = [
        (
            "wrong CA",
            m.url(
                "kck_md5",
                "md5 secret",
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={other}"),
            ),
            "is not signed by the CA in sslrootcert",
        ),
        (
            "host name mismatch",
            m.url(
                "kck_md5",
                "md5 secret",
                "wrong-name.invalid",
                &format!("sslmode=verify-full&sslrootcert={ca}&hostaddr=127.0.0.1"),
            ),
            "The server's certificate does not name \"wrong-name.invalid\"",
        ),
        (
            "a role that may not open a replication connection",
            m.url(
                "kck_norepl",
                "norepl secret",
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "ALTER ROLE \"kck_norepl\" REPLICATION;",
        ),
        (
            "no pg_hba.conf line for the role",
            m.url(
                "kck_nobody",
                "x",
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "hostssl kck_app kck_nobody 127.0.0.1/32 scram-sha-256",
        ),
        (
            "plain text refused by the server",
            m.url("kck_md5", "md5 secret", "127.0.0.1", "sslmode=disable"),
            "connect with TLS instead",
        ),
        (
            "wrong password",
            m.url("kck_md5", "not it", "127.0.0.1", "sslmode=require"),
            "password authentication failed",
        ),
    ];
    for (what, url, expect) in cases {
        let report = check(dir.path(), &url).await;
        let text = report.to_text();
        let failed = fails(&report);
        eprintln!("--- {what}\n{text}");
        assert!(!failed.is_empty(), "{what}: check passed:\n{text}");
        assert!(
            failed.iter().any(|f| f.contains(expect)),
            "{what}: no failure says {expect:?}:\n{text}"
        );
    }
}

#[tokio::test]
async fn tls_settings_kck_cannot_honour_are_config_errors_naming_the_parameter() {
    let m = managed().await;
    let dir = tempfile::tempdir().unwrap();
    for (url, expect) in [
        (
            m.url("kck_md5", "p", "localhost", "sslmode=verify-full"),
            "sslmode=verify-full checks the server's certificate, but the root certificate file",
        ),
        (
            m.url(
                "kck_md5",
                "p",
                "localhost",
                "sslmode=verify-ca&sslrootcert=/nonexistent/ca.crt",
            ),
            "/nonexistent/ca.crt does not exist",
        ),
        (
            m.url(
                "kck_md5",
                "p",
                "localhost",
                "sslmode=require&sslrootcert=system",
            ),
            "sslrootcert=system needs sslmode=verify-full",
        ),
        (
            m.url("kck_md5", "p", "localhost", "sslmode=require&sslcrl=/x.crl"),
            "sslcrl=\"/x.crl\"",
        ),
        (
            m.url(
                "kck_md5",
                "p",
                "localhost",
                "sslmode=require&channel_binding=require",
            ),
            "channel_binding=\"require\"",
        ),
        (
            m.url("kck_md5", "p", "localhost", "sslmode=sometimes"),
            "sslmode=\"sometimes\" is not a value kck knows",
        ),
    ] {
        let path = ConfigYaml::new(&url, "kck_pub", "kck_tls", PRIMERS).write(dir.path());
        let err = kck::config::Config::load(&path)
            .err()
            .unwrap_or_else(|| panic!("{url} loaded"))
            .to_string();
        assert!(err.contains("source.url"), "{err}");
        assert!(err.contains(expect), "{url}: {err}");
    }
}

#[tokio::test]
async fn kck_follows_a_partitioned_quoted_table_over_tls_with_an_md5_role_and_converges() {
    let m = managed().await;
    let dir = tempfile::tempdir().unwrap();
    let url = m.url(
        "kck_md5",
        "md5 secret",
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", m.ca()),
    );
    let path = ConfigYaml::new(&url, "kck_pub", "kck_tls_run", PRIMERS).write(dir.path());
    let config = load(&path);
    let running = start(config.clone()).await;
    let addr = running.http_addr;
    let client = m.cluster.connect("kck_app").await;
    for id in 1..=20 {
        assert_eq!(fetch(addr, &format!("user_name/{id}")).await.0, 200);
        assert_eq!(fetch(addr, &format!("posts_by/{id}")).await.0, 200);
    }
    client
        .batch_execute(r#"UPDATE "App"."User" SET "displayName" = 'Ada' WHERE id = 3"#)
        .await
        .unwrap();
    eventually_equals(addr, "user_name/3", &json!("Ada"), Duration::from_secs(30)).await;
    // A change to a leaf partition reaches the key its root's dependency names.
    client
        .batch_execute(
            r#"INSERT INTO "App"."Post" (id, "authorId", title) VALUES (1000, 4, 'new')"#,
        )
        .await
        .unwrap();
    let (_, before) = fetch(addr, "posts_by/4").await;
    let mut want: Vec<serde_json::Value> = before.as_array().cloned().unwrap_or_default();
    if !want.contains(&json!("new")) {
        want.push(json!("new"));
    }
    eventually_equals(addr, "posts_by/4", &json!(want), Duration::from_secs(30)).await;

    // A randomised workload: renames, new posts, posts moved between authors (across partitions), deletes.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b636b);
    for i in 0..300 {
        let sql = match rng.random_range(0..4) {
            0 => format!(
                r#"UPDATE "App"."User" SET "displayName" = 'name {i}' WHERE id = {}"#,
                rng.random_range(1..=20)
            ),
            1 => format!(
                r#"INSERT INTO "App"."Post" (id, "authorId", title) VALUES ({}, {}, 'p{i}') ON CONFLICT DO NOTHING"#,
                2000 + i,
                rng.random_range(1..=20)
            ),
            2 => format!(
                r#"UPDATE "App"."Post" SET "authorId" = {} WHERE id = {}"#,
                rng.random_range(1..=20),
                rng.random_range(1..=60)
            ),
            _ => format!(
                r#"DELETE FROM "App"."Post" WHERE id = {}"#,
                rng.random_range(1..=60)
            ),
        };
        // Moving a post to an author who already has that id conflicts on the key: skip those.
        let _ = client.batch_execute(&sql).await;
    }
    wait_drained(&running, &client, Duration::from_secs(60)).await;
    let checked = assert_converged(&running, &client, &config).await;
    assert_eq!(checked, 40);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn passwords_come_from_pgpassword_or_the_password_file_as_libpq_reads_them() {
    let m = managed().await;
    let dir = tempfile::tempdir().unwrap();
    let pgpass = dir.path().join("pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "localhost:{}:kck_app:kck_scram:scram secret\n",
            m.cluster.port
        ),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = |url: String| kck::pg::SourceConfig {
        url,
        publication: "kck_pub".into(),
        create_publication: false,
        slot: "kck_tls".into(),
        standby: false,
        max_retained_wal: 1 << 30,
        on_slot_lost: kck::pg::SlotLostPolicy::Fail,
    };
    let ca = m.ca();
    let params = format!("sslmode=verify-full&sslrootcert={ca}");
    /// What the case is, the URL, and the environment variables it sees.
    type Case<'a> = (&'a str, String, Vec<(&'a str, String)>);
    let cases: [Case<'_>; 2] = [
        (
            "PGPASSWORD",
            m.url("kck_md5", "", "localhost", &params),
            vec![("PGPASSWORD", "md5 secret".to_string())],
        ),
        (
            "PGPASSFILE",
            m.url("kck_scram", "", "localhost", &params),
            vec![("PGPASSFILE", pgpass.display().to_string())],
        ),
    ];
    for (what, url, vars) in cases {
        let var = move |k: &str| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.clone())
        };
        let source = kck::pg::Source::with_env(
            &config(url),
            &kck::pg::Environment {
                var: &var,
                home: None,
            },
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let client = source
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert!(user.starts_with("kck_"), "{what}: {user}");
        kck::replication::probe(&source)
            .await
            .unwrap_or_else(|e| panic!("{what}: replication: {e}"));
    }
}
