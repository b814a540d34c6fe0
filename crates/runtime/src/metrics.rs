//! The marketplace's metrics: a small registry of counters, gauges and histograms kept in
//! atomics, rendered as Prometheus text at `/metrics`, and mirrored to OpenTelemetry
//! instruments so they are exported over OTLP too (when an endpoint is configured).
//!
//! Label sets are few and known (statuses, steps, queues), so each series is created once;
//! an update finds it under one short mutex (a map of a few dozen series) and adds to it
//! atomically.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Upper bounds (ms) of the latency histograms' buckets.
pub const LATENCY_BUCKETS_MS: [f64; 16] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0,
];

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct HistogramCells {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microseconds, to keep it integral.
    sum_us: AtomicU64,
}

#[derive(Clone)]
enum Series {
    Counter(Arc<AtomicU64>),
    Gauge(Arc<AtomicI64>),
    Histogram(Arc<HistogramCells>),
}

struct Family {
    help: &'static str,
    kind: &'static str,
    series: BTreeMap<String, (Labels, Series)>,
}

/// The registry. Cheap to clone; every clone shares the same series.
#[derive(Clone, Default)]
pub struct Metrics {
    families: Arc<Mutex<BTreeMap<&'static str, Family>>>,
    otel: Option<Arc<OtelMirror>>,
}

/// The OpenTelemetry instruments the registry mirrors its updates into.
pub struct OtelMirror {
    meter: opentelemetry::metrics::Meter,
    counters: Mutex<BTreeMap<&'static str, opentelemetry::metrics::Counter<u64>>>,
    histograms: Mutex<BTreeMap<&'static str, opentelemetry::metrics::Histogram<f64>>>,
    gauges: Mutex<BTreeMap<&'static str, opentelemetry::metrics::Gauge<i64>>>,
}

fn key(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(",")
}

fn otel_attrs(labels: &Labels) -> Vec<opentelemetry::KeyValue> {
    labels
        .iter()
        .map(|(k, v)| opentelemetry::KeyValue::new(*k, v.clone()))
        .collect()
}

impl Metrics {
    /// A registry that also records into `meter`.
    pub fn with_meter(meter: opentelemetry::metrics::Meter) -> Metrics {
        Metrics {
            families: Arc::default(),
            otel: Some(Arc::new(OtelMirror {
                meter,
                counters: Mutex::default(),
                histograms: Mutex::default(),
                gauges: Mutex::default(),
            })),
        }
    }

    fn series(
        &self,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
        labels: Labels,
        make: impl FnOnce() -> Series,
    ) -> Series {
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let family = families.entry(name).or_insert_with(|| Family {
            help,
            kind,
            series: BTreeMap::new(),
        });
        family
            .series
            .entry(key(&labels))
            .or_insert_with(|| (labels, make()))
            .1
            .clone()
    }

    /// Adds `n` to a counter.
    pub fn inc(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        n: u64,
    ) {
        let labels: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        if let Series::Counter(c) = self.series(name, help, "counter", labels.clone(), || {
            Series::Counter(Arc::default())
        }) {
            c.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(otel) = &self.otel {
            let mut counters = otel.counters.lock().unwrap_or_else(|e| e.into_inner());
            let counter = counters
                .entry(name)
                .or_insert_with(|| otel.meter.u64_counter(name).with_description(help).build());
            counter.add(n, &otel_attrs(&labels));
        }
    }

    /// Sets a gauge.
    pub fn set(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        v: i64,
    ) {
        let labels: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        if let Series::Gauge(g) = self.series(name, help, "gauge", labels.clone(), || {
            Series::Gauge(Arc::default())
        }) {
            g.store(v, Ordering::Relaxed);
        }
        if let Some(otel) = &self.otel {
            let mut gauges = otel.gauges.lock().unwrap_or_else(|e| e.into_inner());
            let gauge = gauges
                .entry(name)
                .or_insert_with(|| otel.meter.i64_gauge(name).with_description(help).build());
            gauge.record(v, &otel_attrs(&labels));
        }
    }

    /// Records one observation (milliseconds) into a histogram.
    pub fn observe_ms(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
        ms: f64,
    ) {
        let labels: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        if let Series::Histogram(h) = self.series(name, help, "histogram", labels.clone(), || {
            Series::Histogram(Arc::new(HistogramCells {
                buckets: LATENCY_BUCKETS_MS
                    .iter()
                    .map(|_| AtomicU64::new(0))
                    .collect(),
                ..HistogramCells::default()
            }))
        }) {
            let ms = if ms.is_finite() { ms.max(0.0) } else { 0.0 };
            for (cell, bound) in h.buckets.iter().zip(LATENCY_BUCKETS_MS) {
                if ms <= bound {
                    cell.fetch_add(1, Ordering::Relaxed);
                }
            }
            h.count.fetch_add(1, Ordering::Relaxed);
            h.sum_us.fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
        }
        if let Some(otel) = &self.otel {
            let mut histograms = otel.histograms.lock().unwrap_or_else(|e| e.into_inner());
            let histogram = histograms.entry(name).or_insert_with(|| {
                otel.meter
                    .f64_histogram(name)
                    .with_description(help)
                    .with_unit("ms")
                    .with_boundaries(LATENCY_BUCKETS_MS.to_vec())
                    .build()
            });
            histogram.record(ms, &otel_attrs(&labels));
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, family) in families.iter() {
            let _ = writeln!(out, "# HELP {name} {}", family.help);
            let _ = writeln!(out, "# TYPE {name} {}", family.kind);
            for (labels, series) in family.series.values() {
                let base = key(labels);
                let braces = |extra: &str| {
                    let all: Vec<&str> = [base.as_str(), extra]
                        .into_iter()
                        .filter(|s| !s.is_empty())
                        .collect();
                    if all.is_empty() {
                        String::new()
                    } else {
                        format!("{{{}}}", all.join(","))
                    }
                };
                match series {
                    Series::Counter(c) => {
                        let _ = writeln!(out, "{name}{} {}", braces(""), c.load(Ordering::Relaxed));
                    }
                    Series::Gauge(g) => {
                        let _ = writeln!(out, "{name}{} {}", braces(""), g.load(Ordering::Relaxed));
                    }
                    Series::Histogram(h) => {
                        for (cell, bound) in h.buckets.iter().zip(LATENCY_BUCKETS_MS) {
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {}",
                                braces(&format!("le=\"{bound}\"")),
                                cell.load(Ordering::Relaxed)
                            );
                        }
                        let count = h.count.load(Ordering::Relaxed);
                        let _ = writeln!(out, "{name}_bucket{} {count}", braces("le=\"+Inf\""));
                        let _ = writeln!(
                            out,
                            "{name}_sum{} {}",
                            braces(""),
                            h.sum_us.load(Ordering::Relaxed) as f64 / 1000.0
                        );
                        let _ = writeln!(out, "{name}_count{} {count}", braces(""));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.inc(
            "ldt_orders_total",
            "Orders by final status.",
            &[("status", "SUCCESS")],
            2,
        );
        m.inc(
            "ldt_orders_total",
            "Orders by final status.",
            &[("status", "SUCCESS")],
            1,
        );
        m.set(
            "ldt_outbox_backlog",
            "Rows waiting.",
            &[("service", "payment")],
            7,
        );
        m.observe_ms("ldt_saga_duration_ms", "Saga duration.", &[], 3.0);
        m.observe_ms("ldt_saga_duration_ms", "Saga duration.", &[], 700.0);
        let text = m.render();
        assert!(text.contains("# TYPE ldt_orders_total counter"), "{text}");
        assert!(
            text.contains("ldt_orders_total{status=\"SUCCESS\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("ldt_outbox_backlog{service=\"payment\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("ldt_saga_duration_ms_bucket{le=\"5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ldt_saga_duration_ms_bucket{le=\"1000\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ldt_saga_duration_ms_bucket{le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(text.contains("ldt_saga_duration_ms_count 2"), "{text}");
        assert!(text.contains("ldt_saga_duration_ms_sum 703"), "{text}");
    }
}
