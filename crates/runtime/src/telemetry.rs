//! Logging, tracing and metrics set-up, and the trace-context helpers.
//!
//! - Logs: `tracing` to stderr, human-readable by default or JSON (`LDT_LOG_FORMAT=json`),
//!   filtered by `RUST_LOG`; every line inside a request or message span carries its
//!   `trace_id` and `span_id`.
//! - Traces and logs are bridged to OpenTelemetry and exported over OTLP when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or a per-signal endpoint) is set, over gRPC or
//!   HTTP/protobuf (`OTEL_EXPORTER_OTLP_PROTOCOL=grpc|http/protobuf`). Without an endpoint
//!   nothing is exported, but trace ids are still made and propagated so logs correlate.
//! - The W3C trace context travels in HTTP headers, the outbox (`traceparent` column) and AMQP
//!   message headers, so one order is one trace across every service.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use ldt_contract::TRACEPARENT_HEADER;

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// The providers to flush on exit.
pub struct Telemetry {
    tracer: SdkTracerProvider,
    logger: Option<SdkLoggerProvider>,
    meter: SdkMeterProvider,
}

/// The OTLP settings found in the environment.
fn otlp_configured(signal: &str) -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    set("OTEL_EXPORTER_OTLP_ENDPOINT") || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
}

fn http_protocol() -> bool {
    std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").is_ok_and(|p| p.starts_with("http"))
}

fn resource(service_name: &str) -> opentelemetry_sdk::Resource {
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the builder's detectors; a
    // name given here only fills in when OTEL_SERVICE_NAME is not set.
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| service_name.to_owned());
    opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build()
}

impl Telemetry {
    /// Installs the global `tracing` subscriber. `service_name` is the default
    /// `service.name` (`ldt-payment` for a one-service process, `ldt` for several).
    pub fn init(format: LogFormat, service_name: &str) -> Telemetry {
        let resource = resource(service_name);
        let mut tracer = SdkTracerProvider::builder().with_resource(resource.clone());
        if otlp_configured("TRACES") {
            let exporter = if http_protocol() {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .build()
            } else {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
            };
            match exporter {
                Ok(e) => tracer = tracer.with_batch_exporter(e),
                Err(e) => eprintln!("ldt: warning: OTLP trace exporter not started: {e}"),
            }
        }
        let tracer = tracer.build();

        let logger = if otlp_configured("LOGS") {
            let exporter = if http_protocol() {
                opentelemetry_otlp::LogExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .build()
            } else {
                opentelemetry_otlp::LogExporter::builder()
                    .with_tonic()
                    .build()
            };
            match exporter {
                Ok(e) => Some(
                    SdkLoggerProvider::builder()
                        .with_resource(resource.clone())
                        .with_batch_exporter(e)
                        .build(),
                ),
                Err(e) => {
                    eprintln!("ldt: warning: OTLP log exporter not started: {e}");
                    None
                }
            }
        } else {
            None
        };

        let mut meter = SdkMeterProvider::builder().with_resource(resource);
        if otlp_configured("METRICS") {
            let exporter = if http_protocol() {
                opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .build()
            } else {
                opentelemetry_otlp::MetricExporter::builder()
                    .with_tonic()
                    .build()
            };
            match exporter {
                Ok(e) => meter = meter.with_periodic_exporter(e),
                Err(e) => eprintln!("ldt: warning: OTLP metric exporter not started: {e}"),
            }
        }
        let meter = meter.build();

        let filter = log_filter();
        let otel_traces = tracing_opentelemetry::layer()
            .with_tracer(tracer.tracer("ldt"))
            .with_error_records_to_exceptions(true);
        let otel_logs = logger
            .as_ref()
            .map(opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new);
        let registry = tracing_subscriber::registry()
            .with(filter)
            .with(otel_traces)
            .with(otel_logs);
        // `try_init` fails only if a subscriber is already set (tests): keep that one.
        let _ = registry.with(lines(format)).try_init();
        Telemetry {
            tracer,
            logger,
            meter,
        }
    }

    /// The meter the metrics registry mirrors into.
    pub fn meter(&self) -> opentelemetry::metrics::Meter {
        opentelemetry::metrics::MeterProvider::meter(&self.meter, "ldt")
    }

    /// Exports what is buffered, within a few seconds.
    pub fn shutdown(&self) {
        let _ = self.tracer.force_flush();
        if let Some(l) = &self.logger {
            let _ = l.force_flush();
        }
        let _ = self.meter.force_flush();
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `RUST_LOG` (default `info`), with the libraries' own chatter turned down unless `RUST_LOG`
/// names them. lapin is off: it logs every broker I/O error at error level, one line per
/// channel, where the bus already says what failed and what it does about it
/// (`RUST_LOG=lapin=debug` brings it back).
fn log_filter() -> EnvFilter {
    const QUIET: [(&str, &str); 9] = [
        ("sqlx", "warn"),
        ("lapin", "off"),
        ("amq_protocol", "warn"),
        ("h2", "warn"),
        ("tonic", "warn"),
        ("hyper", "warn"),
        ("opentelemetry", "warn"),
        ("opentelemetry_sdk", "warn"),
        ("tower", "warn"),
    ];
    let asked = std::env::var("RUST_LOG").unwrap_or_default();
    let mut spec = if asked.trim().is_empty() {
        "info".to_owned()
    } else {
        asked.clone()
    };
    for (target, level) in QUIET {
        if !asked.contains(target) {
            spec.push_str(&format!(",{target}={level}"));
        }
    }
    EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("ldt: warning: RUST_LOG={asked:?} is not a log filter ({e}); using info");
        EnvFilter::new("info")
    })
}

/// Logging only, for the client commands (`chaos`, `bench`, `purge`): no spans exported.
pub fn init_plain(format: LogFormat) {
    let filter = log_filter();
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(lines(format))
        .try_init();
}

/// The log lines on stderr: one short line per event — its time, level, target, message and
/// fields, and the trace id of the request or message it belongs to (not every field of every
/// span around it: at thousands of orders a second those made kilobytes a line). Colours only
/// on a terminal.
fn lines<S>(format: LogFormat) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use std::io::IsTerminal;
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(LineFormat {
            json: format == LogFormat::Json,
        })
}

/// See [`lines`].
struct LineFormat {
    json: bool,
}

/// The trace and span ids recorded on the innermost span of the event's scope that has them.
fn ids_in_scope<S, N>(
    ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
) -> Option<(String, String)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    let scope = ctx.event_scope()?;
    for span in scope {
        let ext = span.extensions();
        let Some(fields) = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>() else {
            continue;
        };
        let find = |key: &str| {
            let at = fields.find(&format!("{key}="))?;
            let rest = &fields[at + key.len() + 1..];
            let end = rest
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(rest.len());
            (end > 0).then(|| rest[..end].to_owned())
        };
        if let (Some(trace), Some(span_id)) = (find("trace_id"), find("span_id")) {
            return Some((trace, span_id));
        }
    }
    None
}

/// An event's fields, as JSON values.
#[derive(Default)]
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for LineFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_subscriber::fmt::FormatFields;
        use tracing_subscriber::fmt::time::FormatTime;
        let meta = event.metadata();
        let ids = ids_in_scope(ctx);
        if self.json {
            let mut fields = JsonFields::default();
            event.record(&mut fields);
            let mut line = serde_json::Map::new();
            let mut ts = String::new();
            let _ = tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut ts));
            line.insert("timestamp".into(), ts.into());
            line.insert("level".into(), meta.level().as_str().into());
            line.insert("target".into(), meta.target().into());
            if let Some(message) = fields.0.remove("message") {
                line.insert("message".into(), message);
            }
            line.insert("fields".into(), fields.0.into());
            if let Some((trace_id, span_id)) = ids {
                line.insert("trace_id".into(), trace_id.into());
                line.insert("span_id".into(), span_id.into());
            }
            return writeln!(writer, "{}", serde_json::Value::Object(line));
        }
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut writer)?;
        let level = meta.level();
        if writer.has_ansi_escapes() {
            let colour = match *level {
                tracing::Level::ERROR => "31",
                tracing::Level::WARN => "33",
                tracing::Level::INFO => "32",
                _ => "2",
            };
            write!(writer, " \x1b[{colour}m{level:>5}\x1b[0m ")?;
        } else {
            write!(writer, " {level:>5} ")?;
        }
        write!(writer, "{}: ", meta.target())?;
        ctx.format_fields(writer.by_ref(), event)?;
        if let Some((trace_id, _)) = ids {
            write!(writer, " trace_id={trace_id}")?;
        }
        writeln!(writer)
    }
}

/// The W3C `traceparent` of the current span, to put into an outgoing message.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT_HEADER)
}

/// Makes `span` a child of the remote span described by `traceparent`, and records the
/// trace and span ids on it (so log lines inside it carry them).
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let mut carrier: HashMap<String, String> = HashMap::new();
        carrier.insert(TRACEPARENT_HEADER.to_owned(), tp.to_owned());
        let cx = TraceContextPropagator::new().extract(&carrier);
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
    let sc = span.context().span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}
