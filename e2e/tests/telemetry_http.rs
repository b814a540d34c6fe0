//! OTLP over HTTP/protobuf: `ldt up` with `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf` posts
//! traces, logs and metrics to `/v1/traces`, `/v1/logs` and `/v1/metrics` of a real HTTP
//! receiver in this test, which decodes them with the OpenTelemetry protobuf definitions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::TestApi as _;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use e2e::{Marketplace, Mode, user};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::json;

#[derive(Default)]
struct Got {
    /// (trace id, span name)
    spans: Vec<(String, String)>,
    log_traces: BTreeSet<String>,
    metrics: BTreeSet<String>,
}

type Shared = Arc<Mutex<Got>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn traces(State(got): State<Shared>, body: Bytes) -> &'static str {
    let req = ExportTraceServiceRequest::decode(body).expect("protobuf traces");
    let mut got = got.lock().unwrap();
    for rs in req.resource_spans {
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.spans.push((hex(&s.trace_id), s.name));
            }
        }
    }
    ""
}

async fn logs(State(got): State<Shared>, body: Bytes) -> &'static str {
    let req = ExportLogsServiceRequest::decode(body).expect("protobuf logs");
    let mut got = got.lock().unwrap();
    for rl in req.resource_logs {
        for sl in rl.scope_logs {
            for r in sl.log_records {
                got.log_traces.insert(hex(&r.trace_id));
            }
        }
    }
    ""
}

async fn metrics(State(got): State<Shared>, body: Bytes) -> &'static str {
    let req = ExportMetricsServiceRequest::decode(body).expect("protobuf metrics");
    let mut got = got.lock().unwrap();
    for rm in req.resource_metrics {
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                got.metrics.insert(m.name);
            }
        }
    }
    ""
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_logs_and_metrics_go_out_over_http_protobuf() {
    let got: Shared = Arc::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/logs", post(logs))
        .route("/v1/metrics", post(metrics))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let m = Marketplace::start_with(
        Mode::Up,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_BLRP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("RUST_LOG", "info,sqlx=warn,lapin=warn,amq_protocol=warn,hyper=warn,reqwest=warn,opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry_http=warn"),
            ("LDT_LOG_FORMAT", "json"),
        ],
    )
    .await;
    let trace = format!(
        "{:032x}",
        0xfeed_0000_0000_0000_0000_0000_0000_0000u128 + std::process::id() as u128
    );
    let resp = m
        .client
        .post(m.url("/api/purchase/"))
        .header("traceparent", format!("00-{trace}-00000000000000aa-01"))
        .json(&json!({"username": user("http"), "price": 1, "amount": 1, "kill_deliver": true}))
        .send()
        .await
        .unwrap();
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        m.wait_final(&id, Duration::from_secs(15)).await["status"],
        "UNKNOWN"
    );
    let started = Instant::now();
    loop {
        {
            let g = got.lock().unwrap();
            let names: BTreeSet<&str> = g
                .spans
                .iter()
                .filter(|(t, _)| *t == trace)
                .map(|(_, n)| n.as_str())
                .collect();
            let done = names.contains("POST /api/purchase/")
                && names
                    .iter()
                    .any(|n| n.starts_with("process ") && n.ends_with(".delivery"))
                && names
                    .iter()
                    .any(|n| n.starts_with("process ") && n.ends_with(".order"))
                && g.log_traces.contains(&trace)
                && g.metrics.contains("ldt_orders_total");
            if done {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "over HTTP got spans {names:?}, logs in trace: {}, metrics {:?}",
                g.log_traces.contains(&trace),
                g.metrics
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
