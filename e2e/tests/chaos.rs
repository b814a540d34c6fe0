//! A short chaos run on every submission: one process per service on the real RabbitMQ and
//! PostgreSQL, SIGKILLs, a broker restart, duplicate publishes; every invariant must hold.
//! (This restarts the shared broker: it is its own test binary, and cargo runs test binaries
//! one at a time.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn a_short_chaos_run_keeps_every_invariant() {
    let out = std::process::Command::new(e2e::ldt_bin())
        .args([
            "chaos",
            "--orders",
            "300",
            "--rate",
            "60",
            "--kills",
            "6",
            "--broker-restarts",
            "1",
            "--duplicate-every",
            "7",
        ])
        .output()
        .expect("ldt chaos runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "chaos failed:\n{stdout}\n{stderr}");
    for invariant in ["money", "stock", "delivery", "final"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("invariant {invariant:<9} ok"))
                    && l.contains(" ok ")),
            "invariant {invariant} line missing or failing:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("6 SIGKILLs") && stdout.contains("1 broker restarts"),
        "{stdout}"
    );
}
