//! `ldt bench` against a marketplace: a short low-rate run reports every figure and passes the
//! invariant check; the same check fed a wrong expectation fails the run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::{Marketplace, Mode, ldt_bin};

async fn bench(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = tokio::process::Command::new(ldt_bin())
        .arg("bench")
        .args(args)
        .output()
        .await
        .expect("ldt bench runs");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_bench_reports_its_figures_and_checks_the_invariants() {
    let m = Marketplace::start(Mode::Up).await;
    let url = m.base("order").to_owned();
    let (status, stdout, stderr) = bench(&[
        "--url",
        &url,
        "--rate",
        "20",
        "--duration",
        "10",
        "--users",
        "5",
        "--json",
        "--kill-share",
        "0.1",
        "--insufficient-funds-share",
        "0.1",
        "--insufficient-stock-share",
        "0.05",
    ])
    .await;
    assert!(status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&stdout).expect("--json prints one JSON report");
    let sent = report["sent"].as_u64().unwrap();
    assert!(
        (150..=210).contains(&sent),
        "about 200 orders in 10 s at 20/s: {report}"
    );
    assert_eq!(report["accepted"], sent, "{report}");
    assert_eq!(report["lost"], 0);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["mode"], "open");
    assert!(report["throughput"].as_f64().unwrap() > 0.0);
    for key in ["http_ms", "saga_ms"] {
        let l = &report[key];
        assert_eq!(l["count"], sent, "{key}: {l}");
        let (p50, p99, max) = (
            l["p50"].as_f64().unwrap(),
            l["p99"].as_f64().unwrap(),
            l["max"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{key}: {l}");
    }
    // The machine's speed, measured before the run, comes with the figures.
    for key in ["compute_ms", "wake_us"] {
        let v = report["machine"][key].as_f64();
        assert!(v.is_some_and(|v| v > 0.0), "machine.{key}: {report}");
    }
    let statuses = report["statuses"].as_object().unwrap();
    for status in [
        "SUCCESS",
        "UNKNOWN",
        "INSUFFICIENT_FUND",
        "INSUFFICIENT_INVENTORY",
    ] {
        assert!(
            statuses
                .get(status)
                .is_some_and(|n| n.as_u64().unwrap() > 0),
            "{status} in {report}"
        );
    }
    assert_eq!(
        statuses.values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        sent
    );
    assert_eq!(report["invariants_ok"], true, "{report}");
    let invariants = report["invariants"].as_object().unwrap();
    assert_eq!(invariants.len(), 4, "{report}");
    for name in ["money", "stock", "delivery", "final"] {
        assert_eq!(invariants[name]["ok"], true, "{name}: {report}");
        assert!(invariants[name]["detail"].is_string(), "{name}: {report}");
    }

    // The same marketplace checked against a wrong expectation of the initial credits.
    let (status, stdout, _) = bench(&[
        "--url",
        &url,
        "--rate",
        "20",
        "--orders",
        "10",
        "--users",
        "5",
        "--initial-credits",
        "400",
    ])
    .await;
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("invariant money") && l.contains("FAIL")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("invariant stock") && l.contains("ok")),
        "{stdout}"
    );
}
