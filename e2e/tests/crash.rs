//! One test per crash point per service: the process aborts at that point the first time it
//! reaches it, is restarted, and every invariant holds once all orders are final.
//! The runs take turns: each is six processes, and two at once would crowd two cores and
//! PostgreSQL's connection limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn crash_run(point: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut args = vec![
        "chaos",
        "--crash-point",
        point,
        "--orders",
        "40",
        "--rate",
        "80",
        "--kills",
        "0",
        "--broker-restarts",
        "0",
        "--duplicate-every",
        "0",
    ];
    if point.starts_with("dead-letter") {
        args.extend(["--poison", "3"]);
    }
    let out = std::process::Command::new(e2e::ldt_bin())
        .args(&args)
        .output()
        .expect("ldt chaos runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{point}:\n{stdout}\n{stderr}");
    // chaos fails by itself when the crash point was never reached; check the report says so.
    let aborts: u32 = stdout
        .split(", ")
        .find_map(|part| part.strip_suffix(" crash-point aborts"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no abort count in:\n{stdout}"));
    assert!(aborts >= 1, "{point} never reached:\n{stdout}");
    // The report shows why a process exited: the end of its log, here the abort's own line.
    assert!(
        stderr.contains(&format!("| ldt: crash point {point} reached: aborting")),
        "the abort is not in the report:\n{stderr}"
    );
    for invariant in ["money", "stock", "delivery", "final"] {
        assert!(
            stdout.contains(&format!("invariant {invariant:<9} ok")),
            "{invariant}:\n{stdout}"
        );
    }
}

macro_rules! crash_tests {
    ($($name:ident => $point:literal,)*) => { $( #[test] fn $name() { crash_run($point); } )* };
}

crash_tests! {
    order_before_commit => "order.before_commit",
    order_after_commit => "order.after_commit",
    order_after_publish => "order.after_publish",
    orchestrator_before_commit => "orchestrator.before_commit",
    orchestrator_after_commit => "orchestrator.after_commit",
    orchestrator_after_publish => "orchestrator.after_publish",
    payment_before_commit => "payment.before_commit",
    payment_after_commit => "payment.after_commit",
    payment_after_publish => "payment.after_publish",
    inventory_before_commit => "inventory.before_commit",
    inventory_after_commit => "inventory.after_commit",
    inventory_after_publish => "inventory.after_publish",
    delivery_before_commit => "delivery.before_commit",
    delivery_after_commit => "delivery.after_commit",
    delivery_after_publish => "delivery.after_publish",
    dead_letter_before_commit => "dead-letter.before_commit",
    dead_letter_after_commit => "dead-letter.after_commit",
    dead_letter_after_publish => "dead-letter.after_publish",
}
