//! The command line as a newcomer meets it: a URL that cannot work is refused at once with
//! the flag or variable that gave it, a bad environment value names its variable, the
//! startup retry lasts its whole timeout, booleans and host names are taken as people write
//! them, and `purge` says what it did.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn ldt(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let mut cmd = Command::new(e2e::ldt_bin());
    cmd.args(args);
    // The tests choose every LDT_* setting they depend on.
    for (k, _) in std::env::vars() {
        if k.starts_with("LDT_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let started = Instant::now();
    let out = cmd.output().expect("ldt runs");
    (out, started.elapsed())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn urls_that_cannot_work_are_refused_at_once_naming_their_source() {
    for (args, env, needle) in [
        (
            vec!["up", "--amqp-url", "http://127.0.0.1:15672"],
            vec![],
            "--amqp-url: \"http://127.0.0.1:15672\": a http:// URL is not RabbitMQ's",
        ),
        (
            vec!["up"],
            vec![("LDT_AMQP_URL", "amqps://guest:secret@h")],
            "LDT_AMQP_URL (the environment)",
        ),
        (
            vec!["up"],
            vec![("LDT_DATABASE_URL", "mysql://root@127.0.0.1")],
            "only PostgreSQL is supported",
        ),
        (
            vec!["up", "--database-url", "postgres//oops"],
            vec![],
            "is not a URL",
        ),
        (vec!["up", "--amqp-url", "not-a-url"], vec![], "not a URL"),
    ] {
        let (out, took) = ldt(&args, &env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(needle), "{args:?} {env:?}: {err}");
        assert!(
            !err.contains("secret"),
            "a password reached the message: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(took < Duration::from_secs(2), "{args:?} took {took:?}");
    }
}

#[test]
fn a_bad_environment_value_names_the_variable() {
    let (out, _) = ldt(&["up"], &[("LDT_STEP_TIMEOUT_MS", "soon")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("LDT_STEP_TIMEOUT_MS"), "{err}");
    let (out, _) = ldt(&["up"], &[("LDT_EPHEMERAL", "maybe")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("LDT_EPHEMERAL"), "{err}");
}

#[test]
fn the_startup_retry_lasts_its_whole_timeout() {
    // Nothing listens on port 1: the broker is retried for 3 s, then one line says so.
    let (out, took) = ldt(
        &[
            "up",
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "--ephemeral",
            "--startup-timeout-s",
            "3",
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "gave up after {took:?}: {err}"
    );
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(last.contains("127.0.0.1:1"), "{err}");
}

#[test]
fn booleans_and_host_names_are_taken_as_people_write_them() {
    // LDT_EPHEMERAL=1, LDT_FAULT_INJECTION=0 and a host name in --http-addr: the marketplace
    // starts (and is killed once it says it is ready).
    let mut child = std::process::Command::new(e2e::ldt_bin())
        .args(["up", "--http-addr", "localhost:0"])
        .env("LDT_EPHEMERAL", "1")
        .env("LDT_FAULT_INJECTION", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ldt starts");
    let stdout = child.stdout.take().unwrap();
    let ready = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("ldt ready: "))
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = ready.join().unwrap();
    assert!(
        line.as_deref().is_some_and(|l| l.contains("http://")),
        "not ready: {line:?}"
    );
}

#[test]
fn purge_says_what_it_deleted_and_creates_nothing() {
    let dir = std::env::temp_dir().join(format!("ldt-purge-{}", uuid::Uuid::new_v4().simple()));
    let dir_s = dir.display().to_string();
    let (out, _) = ldt(&["purge", "--yes", "--data-dir", &dir_s], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(said.contains("nothing to delete"), "{said}");
    assert!(!dir.exists(), "purge created {dir_s}");
    // Without --yes nothing happens, and it says why.
    let (out, _) = ldt(&["purge", "--data-dir", &dir_s], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
}
