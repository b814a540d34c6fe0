//! OpenTelemetry end to end: the marketplace runs one process per service and exports to a
//! real OTLP receiver (gRPC, the OpenTelemetry protobuf definitions) in this test. For a
//! successful, a failed and a timed-out order it checks, from what the receiver got: one trace
//! per order across the services, parent links, compensation spans, the injected fault as a
//! span event, log records in the trace, and the order metrics; and that `/metrics` parses as
//! Prometheus text whose counters move with the orders.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::TestApi as _;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::{Marketplace, Mode, user};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde_json::json;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    kind: i32,
    attrs: BTreeMap<String, String>,
    events: Vec<String>,
}

/// A sum data point: (service, metric name, attributes, value).
type SumPoint = (String, String, BTreeMap<String, String>, f64);

#[derive(Default)]
struct Sink {
    spans: Mutex<Vec<Span>>,
    /// (service, trace id, body)
    logs: Mutex<Vec<(String, String, String)>>,
    /// (service, metric name, attributes, value) of sum data points, latest last.
    sums: Mutex<Vec<SumPoint>>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn service(resource: &Option<Resource>) -> String {
    resource
        .as_ref()
        .map(|r| attrs(&r.attributes))
        .and_then(|a| a.get("service.name").cloned())
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone)]
struct Receiver(Arc<Sink>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let svc = service(&rs.resource);
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Span {
                        service: svc.clone(),
                        name: s.name.clone(),
                        trace: hex(&s.trace_id),
                        id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        kind: s.kind,
                        attrs: attrs(&s.attributes),
                        events: s.events.iter().map(|e| e.name.clone()).collect(),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        req: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let mut logs = self.0.logs.lock().unwrap();
        for rl in req.into_inner().resource_logs {
            let svc = service(&rl.resource);
            for sl in rl.scope_logs {
                for r in sl.log_records {
                    logs.push((svc.clone(), hex(&r.trace_id), text(&r.body)));
                }
            }
        }
        Ok(Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        req: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut sums = self.0.sums.lock().unwrap();
        for rm in req.into_inner().resource_metrics {
            let svc = service(&rm.resource);
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    if let Some(metric::Data::Sum(sum)) = &m.data {
                        for p in &sum.data_points {
                            let v = match p.value {
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i)) => i as f64,
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(d)) => d,
                                None => 0.0,
                            };
                            sums.push((svc.clone(), m.name.clone(), attrs(&p.attributes), v));
                        }
                    }
                }
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

async fn start_receiver() -> (Arc<Sink>, String) {
    let sink = Arc::new(Sink::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = Receiver(sink.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(r.clone()))
            .add_service(LogsServiceServer::new(r.clone()))
            .add_service(MetricsServiceServer::new(r))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (sink, format!("http://{addr}"))
}

/// Parses Prometheus text; returns `name{labels}` → value, failing on a malformed line.
fn parse_prometheus(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("malformed line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels in {line:?}"
            );
        }
        out.insert(series.to_owned(), value);
    }
    out
}

/// What the receiver has got, polled for up to 30 s.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    ldt_testkit::client::eventually(
        Duration::from_secs(30),
        what,
        || std::future::ready(check()),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_order_across_every_service_with_logs_and_metrics() {
    let (sink, endpoint) = start_receiver().await;
    let m = Marketplace::start_with(
        Mode::Split,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_BLRP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("RUST_LOG", "info,sqlx=warn,lapin=warn,amq_protocol=warn,h2=warn,tonic=warn,hyper=warn,tower=warn,opentelemetry=warn,opentelemetry_sdk=warn"),
            ("LDT_LOG_FORMAT", "json"),
        ],
    )
    .await;
    let prom_before = parse_prometheus(
        &m.client
            .get(format!("{}/metrics", m.base("order")))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );

    // Three orders, each in a trace the test starts (its client span is the HTTP span's parent).
    let cases = [
        ("SUCCESS", json!({})),
        ("UNKNOWN", json!({"kill_inventory": true})),
        ("TIMEOUT", json!({"timeout_payment": true})),
    ];
    let mut orders = Vec::new();
    for (i, (expected, flags)) in cases.iter().enumerate() {
        let trace = format!(
            "{:032x}",
            0xabc0_0000_0000_0000_0000_0000_0000_0000u128
                + i as u128
                + (std::process::id() as u128) * 16
        );
        let client_span = format!("{:016x}", 0x1000 + i);
        let mut body = json!({"username": user("otel"), "price": 2, "amount": 1});
        for (k, v) in flags.as_object().unwrap() {
            body[k] = v.clone();
        }
        let resp = m
            .client
            .post(m.url("/api/purchase/"))
            .header("traceparent", format!("00-{trace}-{client_span}-01"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            m.wait_final(&id, Duration::from_secs(15)).await["status"],
            *expected
        );
        orders.push((*expected, trace, client_span, id));
    }

    for (status, trace, client_span, _) in &orders {
        let need: &[&str] = match *status {
            "SUCCESS" => &[
                "ldt-order",
                "ldt-orchestrator",
                "ldt-payment",
                "ldt-inventory",
                "ldt-delivery",
            ],
            "UNKNOWN" => &[
                "ldt-order",
                "ldt-orchestrator",
                "ldt-payment",
                "ldt-inventory",
            ],
            // The payment stalls: the slip goes no further, and on the deadline every step
            // on it is compensated (inventory and delivery leave tombstones).
            _ => &[
                "ldt-order",
                "ldt-orchestrator",
                "ldt-payment",
                "ldt-inventory",
                "ldt-delivery",
            ],
        };
        let spans = eventually(&format!("the spans of the {status} order"), || {
            let spans: Vec<Span> = sink
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| &s.trace == trace)
                .cloned()
                .collect();
            let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
            let finished = spans.iter().any(|s| {
                s.service == "ldt-order"
                    && s.attrs.get("ldt.message.type").map(String::as_str) == Some("order_finished")
            });
            let late_done = *status != "TIMEOUT"
                || spans.iter().any(|s| {
                    s.service == "ldt-payment"
                        && s.attrs.get("ldt.message.type").map(String::as_str) == Some("debit")
                });
            // Spans are exported in batches, each process on its own schedule: a consumer's
            // span can arrive before its producer's. Wait for the trace to be whole.
            let ids: BTreeSet<&str> = spans.iter().map(|s| s.id.as_str()).collect();
            let whole = spans
                .iter()
                .all(|s| &s.parent == client_span || ids.contains(s.parent.as_str()));
            (need.iter().all(|n| services.contains(n)) && finished && late_done && whole)
                .then_some(spans)
        })
        .await;
        // Parent links: the HTTP server span is the child of the client's span; every other
        // span's parent is a span of the same trace (the wait above requires that, and times
        // out when a parent never comes).
        let roots: Vec<&Span> = spans.iter().filter(|s| &s.parent == client_span).collect();
        assert_eq!(
            roots.len(),
            1,
            "{status}: one span under the client's: {roots:?}"
        );
        assert_eq!(roots[0].name, "POST /api/purchase/");
        assert_eq!(roots[0].kind, 2, "server span");
        assert_eq!(roots[0].attrs["http.response.status_code"], "200");
        // Messaging spans follow the conventions and carry the order and step.
        let consumers: Vec<&Span> = spans.iter().filter(|s| s.kind == 5).collect();
        assert!(
            consumers.len() >= 4,
            "{status}: consumer spans {consumers:?}"
        );
        for s in &consumers {
            assert_eq!(s.attrs["messaging.system"], "rabbitmq");
            assert_eq!(s.attrs["messaging.operation.type"], "process");
            assert!(
                s.attrs["messaging.destination.name"].starts_with(&m.namespace),
                "{s:?}"
            );
            assert!(!s.attrs["ldt.order_id"].is_empty());
            let parent = spans.iter().find(|p| p.id == s.parent).unwrap();
            assert_eq!(
                parent.kind, 4,
                "a consumer span's parent is the producer span: {s:?} {parent:?}"
            );
        }
        // Database work is a client span with the database conventions, in every service.
        let db: BTreeSet<&str> = spans
            .iter()
            .filter(|s| {
                s.kind == 3
                    && s.attrs.get("db.system.name").map(String::as_str) == Some("postgresql")
            })
            .map(|s| s.service.as_str())
            .collect();
        for service in ["ldt-order", "ldt-orchestrator", "ldt-payment"] {
            assert!(
                db.contains(service),
                "{status}: no database span from {service}: {db:?}"
            );
        }
        assert!(
            spans.iter().filter(|s| s.kind == 3).all(|s| s
                .attrs
                .get("db.namespace")
                .is_some_and(|n| n.starts_with(&m.namespace))),
            "database spans name their database"
        );
        let compensations: Vec<&Span> = spans
            .iter()
            .filter(|s| s.attrs.get("ldt.compensation").map(String::as_str) == Some("true"))
            .collect();
        match *status {
            "SUCCESS" => assert!(compensations.is_empty(), "{compensations:?}"),
            _ => assert!(
                compensations
                    .iter()
                    .any(|s| s.service == "ldt-payment" && s.attrs["ldt.message.type"] == "refund"),
                "{status}: the refund is a span of the trace: {compensations:?}"
            ),
        }
        if *status == "UNKNOWN" {
            assert!(
                spans.iter().any(|s| s.service == "ldt-inventory"
                    && s.events.iter().any(|e| e.contains("injected fault"))),
                "the fault is an event"
            );
        }
        if *status == "TIMEOUT" {
            assert!(
                spans
                    .iter()
                    .any(|s| s.service == "ldt-orchestrator" && s.name == "saga deadline"),
                "the deadline is in the trace"
            );
        }
        // Logs exported with the trace id.
        eventually(&format!("log records of the {status} order"), || {
            sink.logs
                .lock()
                .unwrap()
                .iter()
                .any(|(_, t, _)| t == trace)
                .then_some(())
        })
        .await;
    }

    // Order metrics over OTLP count them.
    eventually("ldt_orders_total over OTLP", || {
        let sums = sink.sums.lock().unwrap();
        let latest = |status: &str| {
            sums.iter()
                .rev()
                .find(|(svc, name, a, _)| {
                    svc == "ldt-order"
                        && name == "ldt_orders_total"
                        && a.get("status").map(String::as_str) == Some(status)
                })
                .map(|s| s.3)
        };
        (latest("SUCCESS") >= Some(1.0)
            && latest("UNKNOWN") >= Some(1.0)
            && latest("TIMEOUT") >= Some(1.0))
        .then_some(())
    })
    .await;

    // /metrics: Prometheus text, and the counters moved.
    let after = parse_prometheus(
        &m.client
            .get(format!("{}/metrics", m.base("order")))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    for status in ["SUCCESS", "UNKNOWN", "TIMEOUT"] {
        let key = format!("ldt_orders_total{{status=\"{status}\"}}");
        assert_eq!(
            after.get(&key).copied().unwrap_or(0.0) - prom_before.get(&key).copied().unwrap_or(0.0),
            1.0,
            "{key}"
        );
    }
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("ldt_saga_duration_ms_bucket")),
        "{after:?}"
    );
    let orchestrator = parse_prometheus(
        &m.client
            .get(format!("{}/metrics", m.base("orchestrator")))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert!(
        orchestrator
            .get("ldt_compensations_total{step=\"payment\"}")
            .copied()
            .unwrap_or(0.0)
            >= 2.0,
        "{orchestrator:?}"
    );
    assert!(
        orchestrator
            .keys()
            .any(|k| k.starts_with("ldt_step_latency_ms_bucket"))
    );
    // Every command and answer went out through the relay, some perhaps in bundles.
    let published = |name: &str| {
        orchestrator
            .get(&format!("{name}{{service=\"orchestrator\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    let (messages, broker) = (
        published("ldt_messages_published_total"),
        published("ldt_bus_messages_published_total"),
    );
    assert!(
        messages >= 3.0 && broker >= 1.0 && broker <= messages,
        "{orchestrator:?}"
    );
}
