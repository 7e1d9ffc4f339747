//! `docker/`: no Docker engine runs on our machines, so the compose file and the Dockerfile are checked
//! here: the compose file parses, names the services and images it should, every file it mounts exists,
//! Postgres gets `wal_level=logical` and the demo schema, and the kck config it mounts loads (with the
//! environment the compose file gives kck) into a scylla store whose primers read tables of the demo
//! schema. (`docker compose -f docker/docker-compose.yml config` checks the same file where the client is
//! installed.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Compose {
    services: BTreeMap<String, Service>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    image: Option<String>,
    build: Option<Build>,
    command: Option<Vec<String>>,
    #[serde(default)]
    environment: BTreeMap<String, String>,
    #[serde(default)]
    volumes: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    depends_on: BTreeMap<String, DependsOn>,
    healthcheck: Option<Healthcheck>,
    deploy: Option<Deploy>,
    restart: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Build {
    context: String,
    dockerfile: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DependsOn {
    condition: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Healthcheck {
    test: Vec<String>,
    interval: String,
    timeout: String,
    retries: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Deploy {
    replicas: u32,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Compose {
    let path = root().join("docker/docker-compose.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `HOST:CONTAINER[:ro]` of a volume, with the host path resolved against `docker/`.
fn mount(volume: &str) -> (PathBuf, String) {
    let mut parts = volume.split(':');
    let host = parts.next().unwrap();
    let container = parts.next().unwrap_or_else(|| panic!("volume {volume}"));
    (root().join("docker").join(host), container.to_owned())
}

#[test]
fn the_compose_file_runs_postgres_scylla_and_kck() {
    let c = compose();
    let names: Vec<&str> = c.services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        vec!["kck", "kck-init", "kck-replication", "postgres", "scylla"]
    );

    let pg = &c.services["postgres"];
    assert_eq!(pg.image.as_deref(), Some("postgres:15"));
    for (name, s) in &c.services {
        if let Some(h) = &s.healthcheck {
            assert_eq!(
                h.test.first().map(String::as_str),
                Some("CMD-SHELL"),
                "{name}"
            );
            assert!(
                h.retries > 0 && !h.interval.is_empty() && !h.timeout.is_empty(),
                "{name}"
            );
        }
        if let Some(r) = &s.restart {
            assert_eq!(r, "unless-stopped", "{name}");
        }
    }
    let command = pg.command.as_ref().unwrap().join(" ");
    assert!(command.contains("wal_level=logical"), "{command}");
    assert!(pg.healthcheck.is_some());
    let (demo, target) = mount(&pg.volumes[0]);
    assert_eq!(demo, root().join("docker/../sql/demo.sql"));
    assert!(demo.is_file());
    assert!(target.starts_with("/docker-entrypoint-initdb.d/"));
    let database = &pg.environment["POSTGRES_DB"];

    let scylla = &c.services["scylla"];
    assert!(
        scylla
            .image
            .as_deref()
            .is_some_and(|i| i.starts_with("scylladb/scylla:"))
    );
    assert!(scylla.healthcheck.is_some());

    // One image, built once from the repository root with docker/Dockerfile.
    let init = &c.services["kck-init"];
    let build = init.build.as_ref().expect("kck-init builds the image");
    assert_eq!(build.context, "..");
    assert_eq!(build.dockerfile, "docker/Dockerfile");
    assert!(
        root()
            .join("docker")
            .join(&build.context)
            .join(&build.dockerfile)
            .is_file()
    );
    assert_eq!(
        init.command.as_ref().unwrap()[..2],
        ["store".to_owned(), "init".to_owned()]
    );
    for name in ["kck", "kck-init", "kck-replication"] {
        let s = &c.services[name];
        assert_eq!(s.image.as_deref(), Some("kck:dev"), "{name}");
        for (dep, on) in &s.depends_on {
            assert!(
                c.services.contains_key(dep),
                "{name} depends on unknown {dep}"
            );
            assert!(
                matches!(
                    on.condition.as_str(),
                    "service_healthy" | "service_completed_successfully"
                ),
                "{name}: {}",
                on.condition
            );
        }
        // Every kck service runs the mounted config, and that config loads.
        let (host, target) = mount(&s.volumes[0]);
        let command = s.command.as_ref().unwrap();
        assert_eq!(
            command.last(),
            Some(&target),
            "{name} runs the mounted config"
        );
        let config = load(&host, &s.environment);
        let kck::config::StoreConfig::Scylla(store) = &config.store else {
            panic!("{name}: expected the scylla store, got {:?}", config.store)
        };
        assert_eq!(store.nodes, vec!["scylla:9042"]);
        assert!(config.source.standby);
        let url = config.source.url.clone();
        assert!(
            url.contains("@postgres:5432/") && url.ends_with(&format!("/{database}")),
            "{url}"
        );
        if let Some(roles) = s.environment.get("KCK_ROLES") {
            kck::config::Roles::parse_list(roles).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    assert_eq!(
        c.services["kck-replication"].environment["KCK_ROLES"],
        "replication"
    );
    assert_eq!(
        c.services["kck-replication"]
            .deploy
            .as_ref()
            .unwrap()
            .replicas,
        2,
        "a hot standby"
    );
    assert_eq!(c.services["kck"].environment["KCK_ROLES"], "http,refresh");
    // Auth is off in the example: the port is published on the host's loopback only.
    assert_eq!(c.services["kck"].ports, vec!["127.0.0.1:8080:8080"]);
}

/// Loads a config as kck in the container would: the file, then the container's `KCK_*` variables.
fn load(path: &Path, env: &BTreeMap<String, String>) -> kck::config::Config {
    kck::config::Config::load_with_env(path, |name| env.get(name).cloned())
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_compose_config_reads_the_demo_schema() {
    let config = load(&root().join("config/compose.yaml"), &BTreeMap::new());
    assert_eq!(config.http.bind.to_string(), "0.0.0.0:8080");
    let demo = std::fs::read_to_string(root().join("sql/demo.sql")).unwrap();
    assert!(demo.contains(&format!(
        "CREATE PUBLICATION {} FOR TABLE",
        config.source.publication
    )));
    for primer in &config.catalog.primers {
        for dep in &primer.dependencies {
            assert!(
                demo.contains(&format!("CREATE TABLE {} (", dep.table.name)),
                "primer {} reads {}, which sql/demo.sql does not create",
                primer.name,
                dep.table.name
            );
        }
    }
    // The demo config and the compose config serve the same primers.
    let demo_config = load(&root().join("config/demo.yaml"), &BTreeMap::new());
    let names = |c: &kck::config::Config| -> Vec<String> {
        c.catalog.primers.iter().map(|p| p.name.clone()).collect()
    };
    assert_eq!(names(&config), names(&demo_config));
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_as_a_user_in_another() {
    let text = std::fs::read_to_string(root().join("docker/Dockerfile")).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS build"));
    assert!(froms[1].starts_with("FROM debian:") && froms[1].contains("-slim"));
    assert!(text.contains("cargo build --release --locked"));
    assert!(text.contains("COPY --from=build"));
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert_ne!(user.trim(), "root");
    assert!(text.contains("ENTRYPOINT [\"kck\"]"));
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}

/// `docker compose config` (or the older `docker-compose config`) where a client is installed: the
/// compose file is valid for Docker's own parser too. Skipped, saying so, without a client.
#[test]
fn docker_compose_config_accepts_the_file_where_a_client_exists() {
    use std::io::Write as _;
    use std::process::Command;
    let file = root().join("docker/docker-compose.yml");
    let candidates: [(&str, &[&str]); 2] =
        [("docker", &["compose", "-f"]), ("docker-compose", &["-f"])];
    for (program, args) in candidates {
        let Ok(output) = Command::new(program)
            .args(args)
            .arg(&file)
            .args(["config", "-q"])
            .output()
        else {
            continue;
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        // `docker` without the compose plugin: try the next client.
        if program == "docker" && !output.status.success() && stderr.contains("unknown") {
            continue;
        }
        assert!(
            output.status.success(),
            "{program} rejects {}:\n{stderr}",
            file.display()
        );
        return;
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: neither `docker compose` nor `docker-compose` is installed; the compose file was checked by the other tests only"
    );
}
