//! Running one test in a process of its own, for a test that measures this process (its memory): in the
//! shared test binary other tests run in the same process at the same time.

/// Set in the child process to the path of the test it runs.
const ALONE: &str = "KCK_TEST_ALONE";

/// Unless this process was started for `test` (its full path, e.g. `backpressure::name`), run the test
/// binary again for `test` alone, assert that the test passed there, and return `true`: the caller then
/// returns at once. In the child process this returns `false` and the caller runs the test itself.
pub async fn run_alone(test: &str) -> bool {
    if std::env::var(ALONE).as_deref() == Ok(test) {
        return false;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let output = tokio::process::Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ALONE, test)
        .output()
        .await
        .expect("run the test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{test} alone in a process of its own: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    eprint!("{stderr}");
    true
}
