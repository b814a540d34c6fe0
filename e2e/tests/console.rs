//! The console, driven in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by scripts/ensure-browser.sh) through WebDriver: place a good
//! order and a `timeout` order and see both in the orders list without reloading, open the
//! failed one and find its compensations in order on its timeline, cancel a stalled order,
//! turn a fault flag on and see the next order fail at that step, and — where a raw message
//! can be dropped on the broker — replay a dead letter from the Attention page. On the
//! embedded marketplace (`ldt up`), and on RabbitMQ + PostgreSQL with one process per
//! service, the console served by a process that reaches the others (`--service-url`).
//!
//! A failure saves a screenshot under `target/console/`; so does the order page, which
//! `LDT_UPDATE_SCREENSHOTS=1` also copies to `docs/console-order.png` (the README's).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::TestApi as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::{Marketplace, Mode};
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use serde_json::json;

/// How long anything the console shows may take to show.
const WITHIN: Duration = Duration::from_secs(30);

struct Browser {
    client: Client,
    _driver: tokio::process::Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn browser() -> Browser {
    let port = free_port();
    let driver = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver runs (scripts/ensure-browser.sh installs it)");
    let profile =
        std::env::temp_dir().join(format!("ldt-chromium-{}", uuid::Uuid::new_v4().simple()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": "/usr/bin/chromium", "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--window-size=1280,900",
            format!("--user-data-dir={}", profile.display()),
        ]}),
    );
    let webdriver = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let client = loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&webdriver)
            .await
        {
            Ok(client) => break client,
            Err(e) if started.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no WebDriver session from chromedriver: {e}"),
        }
    };
    Browser {
        client,
        _driver: driver,
    }
}

/// Waits until `css` finds an element whose text `ok` accepts; its text.
async fn text_of(c: &Client, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    let mut last = String::from("(no such element)");
    while started.elapsed() < WITHIN {
        if let Ok(el) = c.find(Locator::Css(css)).await
            && let Ok(text) = el.text().await
        {
            if ok(text.trim()) {
                return text.trim().to_owned();
            }
            last = text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what} ({css}); last seen: {last:?}");
}

async fn click(c: &Client, css: &str) {
    let started = Instant::now();
    loop {
        match c.find(Locator::Css(css)).await {
            Ok(el) => match el.click().await {
                Ok(()) => return,
                Err(e) if started.elapsed() > WITHIN => panic!("cannot click {css}: {e}"),
                Err(_) => {}
            },
            Err(e) if started.elapsed() > WITHIN => panic!("no {css} to click: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fill(c: &Client, css: &str, value: &str) {
    let el = c
        .wait()
        .at_most(WITHIN)
        .for_element(Locator::Css(css))
        .await
        .unwrap();
    el.clear().await.unwrap();
    el.send_keys(value).await.unwrap();
}

async fn select(c: &Client, css: &str, value: &str) {
    let el = c
        .wait()
        .at_most(WITHIN)
        .for_element(Locator::Css(css))
        .await
        .unwrap();
    el.select_by_value(value).await.unwrap();
}

/// Places an order with the console's form; its id.
async fn place_with_form(c: &Client, username: &str, fault: Option<(&str, &str)>) -> String {
    fill(c, "#new-username", username).await;
    fill(c, "#new-price", "2").await;
    fill(c, "#new-amount", "1").await;
    match fault {
        Some((step, kind)) => {
            select(c, "#new-fault-step", step).await;
            select(c, "#new-fault-kind", kind).await;
        }
        None => select(c, "#new-fault-step", "").await,
    }
    let before = c.find(Locator::Css("#new-order-result")).await.ok();
    let previous = match before {
        Some(el) => el.text().await.unwrap_or_default(),
        None => String::new(),
    };
    click(c, "#new-order-submit").await;
    let shown = text_of(c, "#new-order-result", "the new order's id", |t| {
        !t.is_empty() && t != previous.trim() && t.contains('-')
    })
    .await;
    // The id is the one word of the result that parses as a UUID.
    shown
        .split(|ch: char| ch.is_whitespace() || ch == ':')
        .find(|w| uuid::Uuid::parse_str(w).is_ok())
        .unwrap_or_else(|| panic!("no order id in {shown:?}"))
        .to_owned()
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn save_screenshot(c: &Client, name: &str) -> PathBuf {
    let png = c.screenshot().await.unwrap();
    let path = screenshots().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    path
}

/// The whole walk through the console; `dead_letters`: the marketplace has a broker to drop
/// a poison message on.
async fn walk(c: &Client, base: &str, market: &Marketplace, stack: &str, dead_letters: bool) {
    c.goto(&format!("{base}/#/orders")).await.unwrap();
    c.wait()
        .at_most(WITHIN)
        .for_element(Locator::Css("#orders-table"))
        .await
        .unwrap();
    let name = e2e::user("console");

    // A good order and a stalled one, both placed with the form; the list shows them
    // without a reload.
    let good = place_with_form(c, &name, None).await;
    let stalled = place_with_form(c, &name, Some(("delivery", "timeout"))).await;
    text_of(
        c,
        &format!("#orders-table tr[data-order-id=\"{good}\"] td.status"),
        "the good order SUCCESS in the list",
        |t| t == "SUCCESS",
    )
    .await;
    text_of(
        c,
        &format!("#orders-table tr[data-order-id=\"{stalled}\"] td.status"),
        "the stalled order in the list",
        |t| !t.is_empty(),
    )
    .await;

    // The stalled one times out; its timeline shows the compensations, last step first.
    click(
        c,
        &format!("#orders-table tr[data-order-id=\"{stalled}\"] a"),
    )
    .await;
    text_of(c, "#order-status", "the stalled order TIMEOUT", |t| {
        t == "TIMEOUT"
    })
    .await;
    let started = Instant::now();
    let kinds = loop {
        let mut kinds = Vec::new();
        for el in c
            .find_all(Locator::Css("#timeline li.event"))
            .await
            .unwrap()
        {
            kinds.push(el.attr("data-kind").await.unwrap().unwrap_or_default());
        }
        let compensations: Vec<String> = kinds
            .iter()
            .filter(|k| matches!(k.as_str(), "cancel_delivery" | "release" | "refund"))
            .cloned()
            .collect();
        if compensations == ["cancel_delivery", "release", "refund"] || started.elapsed() > WITHIN {
            break compensations;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        kinds,
        ["cancel_delivery", "release", "refund"],
        "the compensations in order"
    );
    let shot = save_screenshot(c, &format!("order-{stack}")).await;
    if std::env::var_os("LDT_UPDATE_SCREENSHOTS").is_some() && stack == "embedded" {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::copy(&shot, docs.join("console-order.png")).unwrap();
    }

    // Another stalled order, cancelled from its page while it waits.
    c.goto(&format!("{base}/#/orders")).await.unwrap();
    let doomed = place_with_form(c, &name, Some(("delivery", "timeout"))).await;
    c.goto(&format!("{base}/#/order/{doomed}")).await.unwrap();
    text_of(c, "#order-status", "the order PENDING", |t| t == "PENDING").await;
    click(c, "#cancel-order").await;
    click(c, "#cancel-order").await; // "Really cancel?"
    text_of(c, "#order-status", "the cancelled order", |t| {
        t == "CANCELLED"
    })
    .await;

    // A fault flag: payment fails for every new order; the next one ends UNKNOWN, marked.
    c.goto(&format!("{base}/#/faults")).await.unwrap();
    fill(c, "#fault-payment-fail", "100").await;
    click(c, "#faults-save").await;
    text_of(c, "#faults-status", "the flags saved", |t| {
        t.contains("saved")
    })
    .await;
    c.goto(&format!("{base}/#/orders")).await.unwrap();
    let flagged = place_with_form(c, &name, None).await;
    text_of(
        c,
        &format!("#orders-table tr[data-order-id=\"{flagged}\"] td.status"),
        "the next order failed by the flag",
        |t| t == "UNKNOWN",
    )
    .await;
    let row = text_of(
        c,
        &format!("#orders-table tr[data-order-id=\"{flagged}\"]"),
        "the flag shown on the order",
        |t| t.contains("payment"),
    )
    .await;
    assert!(row.contains("kill"), "{row}");
    let (status, _) = market
        .client
        .put(format!("{base}/api/v1/faults"))
        .json(&json!({"payment": {"fail_percent": 0, "stall_percent": 0}}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 200, "the flags back to zero");

    if dead_letters {
        // A poison message, parked; replayed from the Attention page.
        let id = format!("poison-{}", uuid::Uuid::new_v4().simple());
        market.publish_raw("payment", &id, b"{not json").await;
        c.goto(&format!("{base}/#/attention")).await.unwrap();
        let row = format!("#dead-letters tr[data-dead-letter-id=\"{id}\"]");
        text_of(c, &row, "the dead letter on the Attention page", |t| {
            t.contains("payment")
        })
        .await;
        click(c, &format!("{row} button.replay")).await;
        let (_, letters) = market.get("/api/v1/dead-letters").await;
        let replayed = |letters: &serde_json::Value| {
            letters.as_array().is_some_and(|l| {
                l.iter()
                    .any(|d| d["id"] == id.as_str() && d["times_parked"].as_i64() >= Some(2))
            })
        };
        let started = Instant::now();
        let mut letters = letters;
        while !replayed(&letters) && started.elapsed() < WITHIN {
            tokio::time::sleep(Duration::from_millis(200)).await;
            letters = market.get("/api/v1/dead-letters").await.1;
        }
        assert!(
            replayed(&letters),
            "the replayed poison came back as a dead letter: {letters}"
        );
    }
}

/// Runs the walk, saving a screenshot if it fails.
async fn walk_or_screenshot(
    b: &Browser,
    base: &str,
    market: &Marketplace,
    stack: &str,
    dead_letters: bool,
) {
    let outcome = std::panic::AssertUnwindSafe(walk(&b.client, base, market, stack, dead_letters))
        .catch_unwind()
        .await;
    if let Err(panic) = outcome {
        if let Ok(c) = tokio::time::timeout(
            Duration::from_secs(10),
            save_screenshot(&b.client, &format!("failure-{stack}")),
        )
        .await
        {
            eprintln!("console test failed; screenshot in {}", c.display());
        }
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_on_the_embedded_marketplace() {
    // Long enough a deadline to cancel a stalled order by hand.
    let market = Marketplace::start_with(Mode::Embedded, &[("LDT_STEP_TIMEOUT_MS", "2000")]).await;
    let base = market.base("order").to_owned();
    let b = browser().await;
    walk_or_screenshot(&b, &base, &market, "embedded", false).await;
    let _ = b.client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_on_rabbitmq_and_postgresql_one_process_per_service() {
    let mut market = Marketplace::start_with(Mode::Split, &[("LDT_STEP_TIMEOUT_MS", "2000")]).await;
    let base = market.spawn_gateway().await;
    let b = browser().await;
    walk_or_screenshot(&b, &base, &market, "split", true).await;
    let _ = b.client.close().await;
}
