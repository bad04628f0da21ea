//! Prometheus / OpenMetrics metrics, served as text by the HTTP layer with [`CONTENT_TYPE`].
//!
//! Names mirror Triton's `nv_*` families so existing Grafana dashboards port by renaming
//! (`nv_` → `kiln_`), with two deliberate differences: durations are in seconds (the
//! Prometheus base unit, not Triton's `_us`) and they are histograms rather than cumulative
//! `_us` counters, so `rate(x_sum)/rate(x_count)` still gives Triton's mean while
//! `histogram_quantile` gives tail latency (Triton needs its optional summaries for that).
//!
//! | metric                                            | type      | Triton analogue                    |
//! |---------------------------------------------------|-----------|------------------------------------|
//! | `kiln_requests_total{model,endpoint,status}`      | counter   | `nv_inference_request_success/failure` |
//! | `kiln_request_duration_seconds{model,endpoint}`   | histogram | `nv_inference_request_duration_us` |
//! | `kiln_queue_duration_seconds{model}`              | histogram | `nv_inference_queue_duration_us`   |
//! | `kiln_compute_duration_seconds{model}`            | histogram | `nv_inference_compute_infer_duration_us` |
//! | `kiln_batch_size{model}`                          | histogram | (none; Triton needs count/exec_count) |
//! | `kiln_inference_count_total{model}`               | counter   | `nv_inference_count`               |
//! | `kiln_execution_count_total{model}`               | counter   | `nv_inference_exec_count`          |
//! | `kiln_inference_failures_total{model,reason}`     | counter   | `nv_inference_request_failure{reason}` |
//! | `kiln_model_ready{model,version}`                 | gauge     | (Triton exposes readiness via API) |
//! | `kiln_model_backend_info{model,version,requested,serving,engine,precision}` | gauge (1) | (none; Triton's model config) |
//! | `kiln_process_resident_memory_bytes`              | gauge     | (none; `nv_cpu_memory_used_bytes` is host-wide) |
//! | `kiln_process_cpu_seconds_total`                  | counter   | (node exporter style)              |
//! | `kiln_gpu_utilization_ratio{gpu}`                 | gauge     | `nv_gpu_utilization`               |
//! | `kiln_gpu_memory_used_bytes{gpu}` / `_total_bytes`| gauge     | `nv_gpu_memory_used/total_bytes`   |
//!
//! Latency buckets (request, queue, compute share them so panels can be stacked) are the
//! 1-2.5-5 series from 100 µs to 10 s: 16 bounds plus `+Inf`. 100 µs resolves the queue time
//! of a request dispatched at once (full or preferred-size batch, no delay); 10 s is beyond
//! any sane inference deadline, so `+Inf` only catches pathology. A ×2–2.5 step bounds `histogram_quantile`'s interpolation
//! error to well under one step, yet keeps series count (×17 per model/endpoint) modest.
//!
//! Batch-size buckets are powers of two up to 256 because batch limits and preferred sizes
//! are almost always powers of two, so each bucket boundary lands on a size users configure.
//!
//! Counting rules: `kiln_inference_count_total` and `kiln_execution_count_total` count only
//! successful batches (as Triton does); the histograms record every executed batch, so
//! `kiln_batch_size_count` minus `kiln_execution_count_total` is the number of failed batches.
//! Failures are counted per request: `rejected` (queue full), `expired` (deadline passed in
//! queue), `cancelled` (caller went away), `failed` (requests of a batch whose executor erred).
//!
//! GPU families appear only when NVML loads (lazily, on the first render); on CPU-only hosts
//! they are absent rather than zero, so "no GPU" is never mistaken for "idle GPU".

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kiln_batcher::{BatchObserver, BatchRecord};
use nvml_wrapper::Nvml;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// What the HTTP layer must send with [`Metrics::render`]'s body.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Seconds; see the module doc for why these bounds.
const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH_SIZE_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Linux has fixed `USER_HZ` at 100 for the userspace ABI; reading it via `sysconf` would need
/// `unsafe`, which the workspace denies.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

#[derive(EncodeLabelSet, Clone, Hash, PartialEq, Eq, Debug)]
struct RequestLabels {
    model: String,
    endpoint: String,
    status: String,
}

#[derive(EncodeLabelSet, Clone, Hash, PartialEq, Eq, Debug)]
struct EndpointLabels {
    model: String,
    endpoint: String,
}

#[derive(EncodeLabelSet, Clone, Hash, PartialEq, Eq, Debug)]
struct ModelLabels {
    model: String,
}

#[derive(EncodeLabelSet, Clone, Hash, PartialEq, Eq, Debug)]
struct FailureLabels {
    model: String,
    reason: &'static str,
}

#[derive(EncodeLabelSet, Clone, Hash, PartialEq, Eq, Debug)]
struct ReadyLabels {
    model: String,
    version: String,
}

/// Which backend serves a model version; `requested` differs from `serving` after a fallback.
#[derive(EncodeLabelSet, Clone, Hash, PartialEq, Eq, Debug)]
pub struct BackendLabels {
    pub model: String,
    pub version: String,
    pub requested: String,
    pub serving: String,
    pub engine: String,
    pub precision: String,
}

#[derive(EncodeLabelSet, Clone, Hash, PartialEq, Eq, Debug)]
struct GpuLabels {
    gpu: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn batch_size_histogram() -> Histogram {
    Histogram::new(BATCH_SIZE_BUCKETS)
}

/// All of kiln's metrics; create once per server and share the `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<EndpointLabels>,
    queue_duration: HistogramFamily<ModelLabels>,
    compute_duration: HistogramFamily<ModelLabels>,
    batch_size: HistogramFamily<ModelLabels>,
    inferences: Family<ModelLabels, Counter>,
    executions: Family<ModelLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    model_ready: Family<ReadyLabels, Gauge>,
    model_backend: Family<BackendLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut m = Self {
            registry: Registry::with_prefix("kiln"),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            queue_duration: Family::new_with_constructor(latency_histogram),
            compute_duration: Family::new_with_constructor(latency_histogram),
            batch_size: Family::new_with_constructor(batch_size_histogram),
            inferences: Family::default(),
            executions: Family::default(),
            failures: Family::default(),
            model_ready: Family::default(),
            model_backend: Family::default(),
        };
        let r = &mut m.registry;
        // Counters are registered without `_total`: the encoder appends it.
        r.register("requests", "HTTP inference requests by final status code", m.requests.clone());
        let secs = Unit::Seconds;
        r.register_with_unit("request_duration", "Server time per request", secs.clone(), m.request_duration.clone());
        r.register_with_unit("queue_duration", "Admission to execution start", secs.clone(), m.queue_duration.clone());
        r.register_with_unit("compute_duration", "Executor time per batch", secs, m.compute_duration.clone());
        r.register("batch_size", "Items per executed batch", m.batch_size.clone());
        r.register("inference_count", "Items inferred by successful batches", m.inferences.clone());
        r.register("execution_count", "Successful batch executions", m.executions.clone());
        r.register("inference_failures", "Requests that got no inference result, by reason", m.failures.clone());
        r.register("model_ready", "1 when the model version is loaded and serving", m.model_ready.clone());
        r.register(
            "model_backend_info",
            "1 for the backend and precision serving each loaded model version",
            m.model_backend.clone(),
        );
        r.register_collector(Box::new(ProcessCollector));
        r.register_collector(Box::new(GpuCollector::default()));
        Arc::new(m)
    }

    /// The observer to pass to `Batcher::spawn_observed` for `model`. Its series exist (at
    /// zero) from now on, so dashboards' `rate()` works before the first failure.
    pub fn model_observer(self: &Arc<Self>, model: &str) -> Arc<dyn BatchObserver> {
        let labels = ModelLabels { model: model.to_owned() };
        let failure = |reason| self.failures.get_or_create_owned(&FailureLabels { model: model.to_owned(), reason });
        // Handles resolved once here keep the batcher's hot path free of label hashing.
        Arc::new(ModelObserver {
            queue: self.queue_duration.get_or_create_owned(&labels),
            compute: self.compute_duration.get_or_create_owned(&labels),
            batch_size: self.batch_size.get_or_create_owned(&labels),
            inferences: self.inferences.get_or_create_owned(&labels),
            executions: self.executions.get_or_create_owned(&labels),
            rejected: failure("rejected"),
            expired: failure("expired"),
            cancelled: failure("cancelled"),
            failed: failure("failed"),
        })
    }

    /// Records one finished HTTP request; `elapsed` is the total time the server spent on it.
    /// `model` must be a loaded model's name (or a fixed placeholder): passing a client-sent
    /// name that failed lookup would let clients create unbounded series.
    pub fn observe_request(&self, model: &str, endpoint: &str, status: u16, elapsed: Duration) {
        let labels =
            RequestLabels { model: model.to_owned(), endpoint: endpoint.to_owned(), status: status.to_string() };
        self.requests.get_or_create(&labels).inc();
        let labels = EndpointLabels { model: labels.model, endpoint: labels.endpoint };
        self.request_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    pub fn set_model_ready(&self, model: &str, version: &str, ready: bool) {
        let labels = ReadyLabels { model: model.to_owned(), version: version.to_owned() };
        self.model_ready.get_or_create(&labels).set(i64::from(ready));
    }

    /// Publishes (`serving`) or withdraws the backend series of one model version.
    pub fn set_model_backend(&self, labels: &BackendLabels, serving: bool) {
        if serving {
            self.model_backend.get_or_create(labels).set(1);
        } else {
            self.model_backend.remove(labels);
        }
    }

    /// OpenMetrics text, ending in `# EOF`; process and GPU gauges are sampled now.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        // Writing to a String cannot fail and the collectors only forward encoder errors,
        // so this is unreachable in practice; a scrape still gets what was written.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

#[derive(Debug)]
struct ModelObserver {
    queue: Histogram,
    compute: Histogram,
    batch_size: Histogram,
    inferences: Counter,
    executions: Counter,
    rejected: Counter,
    expired: Counter,
    cancelled: Counter,
    failed: Counter,
}

impl BatchObserver for ModelObserver {
    fn batch_executed(&self, r: &BatchRecord<'_>) {
        for q in r.queue_times {
            self.queue.observe(q.as_secs_f64());
        }
        self.compute.observe(r.compute.as_secs_f64());
        self.batch_size.observe(r.items as f64);
        if r.ok {
            self.inferences.inc_by(r.items as u64);
            self.executions.inc();
        } else {
            self.failed.inc_by(r.requests as u64);
        }
    }

    fn request_rejected(&self) {
        self.rejected.inc();
    }

    fn request_expired(&self) {
        self.expired.inc();
    }

    fn request_cancelled(&self) {
        self.cancelled.inc();
    }
}

/// Samples /proc at scrape time; on non-Linux hosts the families are simply absent.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if let Some(rss) = resident_memory_bytes() {
            let (gauge, unit) = (ConstGauge::new(rss), Some(&Unit::Bytes));
            let metric = encoder.encode_descriptor(
                "process_resident_memory",
                "Resident set size.",
                unit,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        if let Some(cpu) = cpu_seconds() {
            let (counter, unit) = (ConstCounter::new(cpu), Some(&Unit::Seconds));
            let metric =
                encoder.encode_descriptor("process_cpu", "User plus system CPU time.", unit, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

/// From `VmRSS` in /proc/self/status (kB) rather than statm pages: the page size would need
/// `sysconf` (unsafe), and guessing 4 KiB is wrong on 16/64 KiB-page arm64 kernels.
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu_seconds(&stat)
}

/// The command name (field 2) may contain spaces and parentheses, so fields are counted
/// from the last `)`: there the state is field 3, utime 14 and stime 15.
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / CLOCK_TICKS_PER_SECOND)
}

/// NVML is loaded on the first scrape, not at start-up, so a server that is never scraped
/// never touches the driver; a failed load is remembered and never retried.
#[derive(Debug, Default)]
struct GpuCollector {
    nvml: OnceLock<Option<Nvml>>,
}

impl GpuCollector {
    fn nvml(&self) -> Option<&Nvml> {
        self.nvml
            .get_or_init(|| {
                // Expected on CPU-only hosts, hence not a warning.
                Nvml::init().inspect_err(|e| tracing::debug!(error = %e, "NVML unavailable; no GPU metrics")).ok()
            })
            .as_ref()
    }
}

/// Emits one gauge family, or nothing when no GPU produced a value for it.
fn encode_gpu_family(
    encoder: &mut DescriptorEncoder<'_>,
    (name, help, unit): (&str, &str, Option<&Unit>),
    values: &[(GpuLabels, f64)],
) -> Result<(), std::fmt::Error> {
    if values.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, unit, ConstGauge::new(0.0).metric_type())?;
    for (labels, value) in values {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(nvml) = self.nvml() else { return Ok(()) };
        let (mut util, mut used, mut total) = (Vec::new(), Vec::new(), Vec::new());
        // A GPU that fails a query (lost, unsupported on old drivers) just lacks that sample.
        for i in 0..nvml.device_count().unwrap_or(0) {
            let Ok(device) = nvml.device_by_index(i) else { continue };
            let labels = GpuLabels { gpu: i.to_string() };
            if let Ok(u) = device.utilization_rates() {
                util.push((labels.clone(), f64::from(u.gpu) / 100.0));
            }
            if let Ok(mem) = device.memory_info() {
                used.push((labels.clone(), mem.used as f64));
                total.push((labels, mem.total as f64));
            }
        }
        let bytes = Some(&Unit::Bytes);
        encode_gpu_family(
            &mut encoder,
            ("gpu_utilization_ratio", "GPU busy fraction, last sample period.", None),
            &util,
        )?;
        encode_gpu_family(&mut encoder, ("gpu_memory_used", "GPU memory in use.", bytes), &used)?;
        encode_gpu_family(&mut encoder, ("gpu_memory_total", "GPU memory installed.", bytes), &total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_batcher::{Batcher, BatcherConfig, Executor, ExecutorError, Payload};

    /// The value of the one sample `name{labels}` (labels in any order), or None if absent.
    fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        want.sort();
        let hits: Vec<f64> = (text.lines().filter(|l| !l.starts_with('#')))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (n, mut got) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.strip_suffix('}')?.split(',').map(str::to_owned).collect()),
                    None => (series, Vec::new()),
                };
                got.sort();
                (n == name && got == want).then(|| value.parse::<f64>().expect("sample value"))
            })
            .collect();
        assert!(hits.len() <= 1, "{name}{labels:?} appears {} times", hits.len());
        hits.first().copied()
    }

    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        sample(text, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{text}"))
    }

    fn assert_close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-9, "got {got}, want {want}");
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn batch(requests: usize, items: usize, queue_times: &[Duration], compute: u64, ok: bool) -> BatchRecord<'_> {
        BatchRecord { requests, items, queue_times, compute: ms(compute), ok }
    }

    #[test]
    fn requests_are_counted_per_label_set() {
        let m = Metrics::new();
        for (endpoint, status, t) in
            [("predict", 200, 5), ("predict", 200, 7), ("predict", 200, 30), ("predict", 503, 1)]
        {
            m.observe_request("resnet", endpoint, status, ms(t));
        }
        m.observe_request("resnet", "infer", 200, ms(2));
        let text = m.render();

        let req = |endpoint, status| {
            sample(&text, "kiln_requests_total", &[("model", "resnet"), ("endpoint", endpoint), ("status", status)])
        };
        assert_eq!(req("predict", "200"), Some(3.0));
        assert_eq!(req("predict", "503"), Some(1.0));
        assert_eq!(req("infer", "200"), Some(1.0));
        assert_eq!(req("infer", "503"), None);

        let predict = [("model", "resnet"), ("endpoint", "predict")];
        assert_eq!(value(&text, "kiln_request_duration_seconds_count", &predict), 4.0);
        assert_close(value(&text, "kiln_request_duration_seconds_sum", &predict), 0.043);
        for (le, want) in [("0.001", 1.0), ("0.01", 3.0), ("0.025", 3.0), ("0.05", 4.0), ("+Inf", 4.0)] {
            assert_eq!(
                value(&text, "kiln_request_duration_seconds_bucket", &[predict[0], predict[1], ("le", le)]),
                want
            );
        }
    }

    #[test]
    fn batches_and_failures_follow_triton_counting() {
        let m = Metrics::new();
        let (obs, other) = (m.model_observer("resnet"), m.model_observer("bert"));
        obs.batch_executed(&batch(2, 3, &[ms(1), ms(3)], 7, true));
        obs.batch_executed(&batch(1, 16, &[ms(20)], 40, true));
        obs.batch_executed(&batch(2, 5, &[ms(2), ms(2)], 9, false));
        (0..2).for_each(|_| obs.request_rejected());
        obs.request_expired();
        (0..3).for_each(|_| obs.request_cancelled());
        other.batch_executed(&batch(1, 1, &[ms(1)], 1, true));
        let text = m.render();
        let model = [("model", "resnet")];

        assert_eq!(value(&text, "kiln_inference_count_total", &model), 19.0);
        assert_eq!(value(&text, "kiln_execution_count_total", &model), 2.0);
        assert_eq!(value(&text, "kiln_inference_count_total", &[("model", "bert")]), 1.0);
        for (reason, n) in [("rejected", 2.0), ("expired", 1.0), ("cancelled", 3.0), ("failed", 2.0)] {
            assert_eq!(value(&text, "kiln_inference_failures_total", &[("model", "resnet"), ("reason", reason)]), n);
        }
        assert_eq!(value(&text, "kiln_inference_failures_total", &[("model", "bert"), ("reason", "failed")]), 0.0);

        assert_eq!(value(&text, "kiln_queue_duration_seconds_count", &model), 5.0);
        assert_close(value(&text, "kiln_queue_duration_seconds_sum", &model), 0.028);
        assert_eq!(value(&text, "kiln_compute_duration_seconds_count", &model), 3.0);
        assert_close(value(&text, "kiln_compute_duration_seconds_sum", &model), 0.056);

        assert_eq!(value(&text, "kiln_batch_size_count", &model), 3.0);
        assert_eq!(value(&text, "kiln_batch_size_sum", &model), 24.0);
        let sizes = [3.0, 16.0, 5.0];
        for bound in BATCH_SIZE_BUCKETS {
            let (le, want) = (format!("{bound:?}"), sizes.iter().filter(|&&s| s <= bound).count() as f64);
            assert_eq!(value(&text, "kiln_batch_size_bucket", &[model[0], ("le", &le)]), want, "le={le}");
        }
        assert_eq!(value(&text, "kiln_batch_size_bucket", &[model[0], ("le", "+Inf")]), 3.0);
    }

    #[test]
    fn backend_info_is_published_and_withdrawn() {
        let m = Metrics::new();
        let labels = BackendLabels {
            model: "resnet".into(),
            version: "1".into(),
            requested: "tensorrt".into(),
            serving: "cpu".into(),
            engine: "onnxruntime-cpu".into(),
            precision: "fp32".into(),
        };
        m.set_model_backend(&labels, true);
        let want = [
            ("model", "resnet"),
            ("version", "1"),
            ("requested", "tensorrt"),
            ("serving", "cpu"),
            ("engine", "onnxruntime-cpu"),
            ("precision", "fp32"),
        ];
        assert_eq!(value(&m.render(), "kiln_model_backend_info", &want), 1.0);
        m.set_model_backend(&labels, false);
        assert!(!m.render().contains("kiln_model_backend_info{"), "the series goes with the model");
    }

    #[test]
    fn model_ready_toggles() {
        let m = Metrics::new();
        for ready in [true, false, true] {
            m.set_model_ready("resnet", "2", ready);
            let got = value(&m.render(), "kiln_model_ready", &[("model", "resnet"), ("version", "2")]);
            assert_eq!(got, f64::from(u8::from(ready)));
        }
    }

    #[test]
    fn process_gauges_present_and_gpu_families_absent_without_nvml() {
        let text = Metrics::new().render();
        assert!(value(&text, "kiln_process_resident_memory_bytes", &[]) > 0.0);
        assert!(value(&text, "kiln_process_cpu_seconds_total", &[]) >= 0.0);
        // No NVIDIA driver here: GPU families must be missing, not zero. Empty families are
        // omitted too, so a fresh registry shows exactly the process ones.
        let families: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        assert_eq!(families, ["kiln_process_resident_memory_bytes gauge", "kiln_process_cpu_seconds counter"]);
    }

    #[test]
    fn rendering_twice_is_stable() {
        let m = Metrics::new();
        m.model_observer("resnet").batch_executed(&batch(1, 2, &[ms(1)], 3, true));
        m.observe_request("resnet", "predict_batch", 200, ms(4));
        m.set_model_ready("resnet", "1", true);
        // Process samples are live readings, so only the rest must match.
        let stable = |t: String| t.lines().filter(|l| !l.starts_with("kiln_process_")).collect::<Vec<_>>().join("\n");
        let (first, second) = (m.render(), m.render());
        assert!(first.ends_with("# EOF\n") && first.matches("# EOF").count() == 1);
        assert_eq!(stable(first), stable(second));
    }

    #[test]
    fn cpu_time_survives_odd_command_names() {
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 12345 0 0";
        assert_eq!(parse_cpu_seconds(stat), Some(3.0));
        assert_eq!(parse_cpu_seconds("garbage"), None);
    }

    struct Items(usize);

    impl Payload for Items {
        fn items(&self) -> usize {
            self.0
        }
    }

    struct Echo;

    impl Executor for Echo {
        type Input = Items;
        type Output = usize;

        fn execute(&mut self, inputs: &[&Items]) -> Result<Vec<usize>, ExecutorError> {
            Ok(inputs.iter().map(|i| i.0).collect())
        }
    }

    #[tokio::test]
    async fn observer_is_fed_by_a_real_batcher() {
        let m = Metrics::new();
        let observer = Some(m.model_observer("echo"));
        let batcher = Batcher::spawn_observed(BatcherConfig::default(), observer, |_| Ok(Echo)).expect("spawn");
        for n in [1, 2, 3] {
            assert_eq!(batcher.infer(Items(n)).await.expect("infer"), n);
        }
        batcher.shutdown();
        let (text, stats, model) = (m.render(), batcher.stats(), [("model", "echo")]);
        assert_eq!(value(&text, "kiln_inference_count_total", &model), 6.0);
        assert_eq!(value(&text, "kiln_execution_count_total", &model), stats.batches as f64);
        assert_eq!(value(&text, "kiln_queue_duration_seconds_count", &model), 3.0);
        assert_close(value(&text, "kiln_queue_duration_seconds_sum", &model), stats.queue_time.as_secs_f64());
    }
}
