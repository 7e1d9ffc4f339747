//! `kck store init` and `kck validate` with the scylla store, without a cluster: the commands say what they
//! would use, and an unreachable cluster is an error that names it.

use std::process::Command;

fn write_config(dir: &std::path::Path, nodes: &str) -> std::path::PathBuf {
    let text = format!(
        "source:\n  url: postgres://kck@127.0.0.1:1/app\nstore:\n  kind: scylla\n  nodes: [\"{nodes}\"]\n  keyspace: kck_cli\n\
         roles: [http, refresh]\n\
         primers:\n  - name: user\n    key: \"user/{{id:int}}\"\n    query: SELECT 1 WHERE $1::int > 0\n    depends_on:\n      - table: users\n"
    );
    let path = dir.join("kck.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn validate_shows_the_store_and_the_roles() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "10.1.2.3");
    let output = Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("store: scylla, keyspace kck_cli on 10.1.2.3:9042 (local_quorum)"),
        "{stdout}"
    );
    assert!(stdout.contains("roles: refresh,http"), "{stdout}");
}

#[test]
fn store_init_names_an_unreachable_cluster() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let path = write_config(dir.path(), "127.0.0.1:1");
    let output = Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(["store", "init", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot connect to the scylla store at 127.0.0.1:1"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn store_init_creates_an_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kck.yaml");
    std::fs::write(
        &path,
        "source:\n  url: postgres://kck@127.0.0.1:1/app\nstore:\n  path: data\n\
         primers:\n  - name: user\n    key: \"user/{id:int}\"\n    query: SELECT 1 WHERE $1::int > 0\n    depends_on:\n      - table: users\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_kck"))
        .args(["store", "init", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("embedded store ready"), "{stdout}");
    assert!(dir.path().join("data/kck.redb").is_file());
}
