//! The end-to-end suite against `ldt up` with nothing configured: every service in one
//! process on SQLite files and the in-process bus (what a newcomer's first command runs).
//! The poison-message case needs a broker to drop a raw message on; the in-process bus's
//! dead-lettering is checked by the crate's transport and step suites.
e2e::suite!(e2e::Mode::Embedded);

use e2e::TestApi as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_data_directory_is_refused_clearly() {
    let m = e2e::Marketplace::start(e2e::Mode::Embedded).await;
    let out = m.ldt().arg("up").output().expect("ldt runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("another ldt process is using the data directory"),
        "{stderr}"
    );
    // The first one is unharmed.
    let (status, _) = m.get("/readyz").await;
    assert_eq!(status, 200);
}

#[test]
fn serve_without_a_broker_says_it_needs_one() {
    let out = std::process::Command::new(e2e::ldt_bin())
        .args(["serve", "payment"])
        .env_remove("LDT_AMQP_URL")
        .output()
        .expect("ldt runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("set --amqp-url or LDT_AMQP_URL"),
        "{stderr}"
    );
    assert!(stderr.contains("ldt up"), "{stderr}");
}
