//! `kiln perf --table`: one markdown row per measured plan (precision, batch-1 latency,
//! best throughput, size on disk) beside PyTorch's numbers from the same run
//! (`benches/scripts/torch_baseline.py --json`), written between markers into a
//! markdown file such as BENCHMARKS.md. Everything here is pure (plain structs in,
//! text out) except [`write_atomic`], so the table is tested without a GPU.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use kiln_engine::builder::human_bytes;
use kiln_engine::graph::Precision;
use serde_json::Value;

pub const BEGIN: &str = "<!-- kiln perf --table begin -->";
pub const END: &str = "<!-- kiln perf --table end -->";
/// The section appended when the file has no markers yet (issue 11's table).
pub const HEADING: &str = "## ResNet-50: FP32, FP16, INT8 on one GPU (issue 11)";
const DASH: &str = "–";

/// One batch size of one plan, as `kiln perf` measured it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPoint {
    pub batch: usize,
    pub samples_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Batch / mean GPU compute time (CUDA events, no H2D/D2H): what a GPU-resident input
    /// gets, as PyTorch's numbers are. `None` where only end-to-end time is known.
    pub compute_samples_per_s: Option<f64>,
}

/// One plan's row: what the plan is and what was measured (or why not).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanRow {
    /// The plan's file stem (`resnet50-fp16.plan` → `resnet50-fp16`).
    pub model: String,
    /// From the plan: see [`precision_label`].
    pub precision: String,
    pub plan_bytes: Option<u64>,
    pub points: Vec<BatchPoint>,
    /// Batch sizes that failed, with the reason.
    pub failed: Vec<(usize, String)>,
    /// The plan could not be loaded or run at all.
    pub error: Option<String>,
}

/// One (model, mode, batch) of a `torch_baseline.py --json` file.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchPoint {
    pub model: String,
    pub mode: String,
    pub batch: usize,
    /// `Err` holds the recorded failure (OOM, compile error, …).
    pub measured: Result<(f64, f64, f64), String>,
}

impl TorchPoint {
    fn ok(&self) -> Option<BatchPoint> {
        let &(samples_per_s, p50_ms, p99_ms) = self.measured.as_ref().ok()?;
        // PyTorch's input is already on the GPU: its throughput is compute only.
        let compute_samples_per_s = Some(samples_per_s);
        Some(BatchPoint { batch: self.batch, samples_per_s, p50_ms, p99_ms, compute_samples_per_s })
    }
}

/// A `torch_baseline.py --json` file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TorchRun {
    pub gpu: Option<String>,
    /// `torch 2.x (CUDA y, cuDNN z)`.
    pub versions: String,
    pub points: Vec<TorchPoint>,
    /// Models whose build failed (an entry with an error and no mode).
    pub model_errors: Vec<(String, String)>,
}

/// Everything the table shows.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// The GPUs the plans ran on (normally one).
    pub gpus: Vec<String>,
    /// How kiln measured: streams, CUDA graph, seconds per batch size.
    pub kiln_setup: String,
    pub plans: Vec<PlanRow>,
    pub torch: Option<TorchRun>,
}

/// `FP32`, `FP16`, or `INT8 (N layers, rest FP16)`: the plan's settings hold FP32 or FP16
/// (an INT8 build is an FP16 plan), and its INT8 layers are the nodes carrying
/// `kiln_engine::quant::INPUT_SCALE`.
pub fn precision_label(precision: Precision, int8_layers: usize) -> String {
    let base = match precision {
        Precision::F32 => "FP32",
        Precision::F16 => "FP16",
    };
    match int8_layers {
        0 => base.to_owned(),
        1 => format!("INT8 (1 layer, rest {base})"),
        n => format!("INT8 ({n} layers, rest {base})"),
    }
}

/// Reads a `torch_baseline.py --json` document; `source` names it in errors.
pub fn parse_torch(text: &str, source: &str) -> anyhow::Result<TorchRun> {
    let doc: Value = serde_json::from_str(text).with_context(|| format!("{source} is not valid JSON"))?;
    let tool = doc.get("tool").and_then(Value::as_str);
    if tool != Some("torch_baseline") {
        bail!(
            "{source} is not a torch_baseline.py --json file (its \"tool\" is {tool:?}, expected \"torch_baseline\")"
        );
    }
    let results = doc
        .get("results")
        .and_then(Value::as_array)
        .with_context(|| format!("{source}: \"results\" is missing or not an array"))?;
    let str_of = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let mut run = TorchRun { gpu: str_of(&doc, "gpu"), ..TorchRun::default() };
    let cuda = doc.get("cuda").filter(|v| !v.is_null()).map(|v| v.as_str().map_or(v.to_string(), str::to_owned));
    run.versions = format!(
        "torch {}{}",
        str_of(&doc, "torch").unwrap_or_else(|| "?".into()),
        cuda.map(|c| format!(" (CUDA {c})")).unwrap_or_default()
    );
    for (i, r) in results.iter().enumerate() {
        let at = || format!("{source}: results[{i}]");
        let model = str_of(r, "model").with_context(|| format!("{}: no \"model\"", at()))?;
        let error = str_of(r, "error");
        let Some(mode) = str_of(r, "mode") else {
            match error {
                Some(e) => run.model_errors.push((model, e)),
                None => bail!("{}: no \"mode\"", at()),
            }
            continue;
        };
        let batch = r
            .get("batch")
            .and_then(Value::as_u64)
            .and_then(|b| usize::try_from(b).ok())
            .with_context(|| format!("{}: \"batch\" is missing or not a positive integer", at()))?;
        let measured = match error {
            Some(e) => Err(e),
            None => {
                let num = |v: Option<&Value>, what: &str| {
                    v.and_then(Value::as_f64).with_context(|| format!("{}: {what} is missing or not a number", at()))
                };
                let lat = r.get("latency_ms");
                Ok((
                    num(r.get("throughput"), "\"throughput\"")?,
                    num(lat.and_then(|l| l.get("p50")), "\"latency_ms.p50\"")?,
                    num(lat.and_then(|l| l.get("p99")), "\"latency_ms.p99\"")?,
                ))
            }
        };
        run.points.push(TorchPoint { model, mode, batch, measured });
    }
    Ok(run)
}

/// The torch model a kiln plan stands for: the torch name itself or, for plans named
/// `resnet50-fp16.plan` / `resnet50_int8.plan`, the longest torch name followed by `-`, `_`
/// or `.`.
fn torch_model_for<'a>(plan_model: &str, torch_models: &[&'a str]) -> Option<&'a str> {
    torch_models
        .iter()
        .copied()
        .filter(|m| {
            plan_model == *m || plan_model.strip_prefix(m).is_some_and(|rest| rest.starts_with(['-', '_', '.']))
        })
        .max_by_key(|m| m.len())
}

/// `12,345` (no decimals).
fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return DASH.into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < -0.5 { format!("-{out}") } else { out }
}

/// Batch-1 p50, batch-1 p99, best throughput and best compute-only throughput cells for
/// measured points and failures.
fn cells(points: &[BatchPoint], failed: &[usize]) -> [String; 4] {
    let (p50, p99) = match points.iter().find(|p| p.batch == 1) {
        Some(p) => (format!("{:.3}", p.p50_ms), format!("{:.3}", p.p99_ms)),
        None if failed.contains(&1) => ("failed".into(), "failed".into()),
        None => (DASH.into(), DASH.into()),
    };
    let best = points
        .iter()
        .filter(|p| p.samples_per_s.is_finite())
        .max_by(|a, b| a.samples_per_s.total_cmp(&b.samples_per_s));
    let best = match best {
        Some(p) => format!("{} (batch {})", thousands(p.samples_per_s), p.batch),
        None if !failed.is_empty() => "failed".into(),
        None => DASH.into(),
    };
    let compute = points
        .iter()
        .filter_map(|p| p.compute_samples_per_s.filter(|v| v.is_finite()).map(|v| (v, p.batch)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let compute = match compute {
        Some((v, b)) => format!("{} (batch {b})", thousands(v)),
        None if !failed.is_empty() && points.is_empty() => "failed".into(),
        None => DASH.into(),
    };
    [p50, p99, best, compute]
}

/// One line, no table-breaking characters, at most 300 characters.
fn one_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|");
    if flat.chars().count() > 300 { format!("{}…", flat.chars().take(300).collect::<String>()) } else { flat }
}

/// The markdown table with its caption and, below it, what failed.
pub fn render(t: &Table) -> String {
    let mut out = String::new();
    let gpus = if t.gpus.is_empty() { "unknown (nothing was measured)".to_owned() } else { t.gpus.join(", ") };
    out.push_str(&format!("GPU: {gpus}"));
    let torch_gpu = t.torch.as_ref().and_then(|r| r.gpu.clone());
    if let Some(g) = &torch_gpu
        && !t.gpus.is_empty()
        && !t.gpus.contains(g)
    {
        out.push_str(&format!(" (**PyTorch ran on {g}: not comparable**)"));
    }
    out.push_str(".\n\n");
    out.push_str(&format!(
        "kiln: `kiln perf`, {}; latency end to end (host tensors in, host tensors out: H2D + \
         compute + D2H). ",
        t.kiln_setup
    ));
    match &t.torch {
        Some(r) => out.push_str(&format!(
            "PyTorch: `torch_baseline.py` in the same run, {}, same architecture with random weights, \
             input already on the GPU (no H2D/D2H in its latency). ",
            r.versions
        )),
        None => out.push_str("PyTorch: not given (`--torch-json`). "),
    }
    out.push_str(
        "Size: the plan file on disk. TensorRT rows appear only where TensorRT was measured; \
         none was in this run. \"–\": not measured.\n\n",
    );
    out.push_str(
        "| model | engine | precision | batch-1 p50 ms | batch-1 p99 ms | best samples/s (batch) | \
         best compute-only samples/s (batch) | size on disk |\n",
    );
    out.push_str("|---|---|---|---:|---:|---:|---:|---:|\n");
    let mut failures = Vec::new();
    for p in &t.plans {
        let size = p.plan_bytes.map_or_else(|| DASH.to_owned(), |b| human_bytes(b as usize));
        let [p50, p99, best, compute] = match &p.error {
            Some(e) => {
                failures.push(format!("- kiln {}: {}", p.model, one_line(e)));
                ["failed".to_owned(), "failed".to_owned(), "failed".to_owned(), "failed".to_owned()]
            }
            None => {
                let batches: Vec<usize> = p.failed.iter().map(|(b, _)| *b).collect();
                for (b, e) in &p.failed {
                    failures.push(format!("- kiln {} batch {b}: {}", p.model, one_line(e)));
                }
                cells(&p.points, &batches)
            }
        };
        out.push_str(&format!(
            "| {} | kiln | {} | {p50} | {p99} | {best} | {compute} | {size} |\n",
            p.model, p.precision
        ));
    }
    if let Some(run) = &t.torch {
        let names: Vec<&str> = {
            let mut v: Vec<&str> = run.points.iter().map(|p| p.model.as_str()).collect();
            v.extend(run.model_errors.iter().map(|(m, _)| m.as_str()));
            v
        };
        // Torch models in the order of the plans that stand for them, each once.
        let mut models: Vec<&str> = Vec::new();
        for p in &t.plans {
            if let Some(m) = torch_model_for(&p.model, &names)
                && !models.contains(&m)
            {
                models.push(m);
            }
        }
        if models.is_empty() {
            let plans: Vec<&str> = t.plans.iter().map(|p| p.model.as_str()).collect();
            failures.push(format!("- PyTorch: no results for {} in the --torch-json file", plans.join(", ")));
        }
        for m in models {
            for (model, e) in run.model_errors.iter().filter(|(model, _)| model == m) {
                failures.push(format!("- PyTorch {model}: {}", one_line(e)));
            }
            let mut modes: Vec<&str> = Vec::new();
            for p in run.points.iter().filter(|p| p.model == m) {
                if !modes.contains(&p.mode.as_str()) {
                    modes.push(&p.mode);
                }
            }
            for mode in modes {
                let of_mode: Vec<&TorchPoint> = run.points.iter().filter(|p| p.model == m && p.mode == mode).collect();
                let points: Vec<BatchPoint> = of_mode.iter().filter_map(|p| p.ok()).collect();
                let mut failed = Vec::new();
                for p in &of_mode {
                    if let Err(e) = &p.measured {
                        failed.push(p.batch);
                        failures.push(format!("- PyTorch {m} {mode} batch {}: {}", p.batch, one_line(e)));
                    }
                }
                let [p50, p99, best, compute] = cells(&points, &failed);
                let precision = if mode.ends_with("fp32") {
                    "FP32"
                } else if mode.ends_with("fp16") {
                    "FP16"
                } else {
                    DASH
                };
                out.push_str(&format!(
                    "| {m} | PyTorch {mode} | {precision} | {p50} | {p99} | {best} | {compute} | {DASH} |\n"
                ));
            }
        }
    }
    let ratios = ratios_to_fp16(&t.plans);
    if !ratios.is_empty() {
        out.push_str("\nThroughput against the FP16 plan, at the largest batch both measured:\n\n");
        out.push_str(&ratios);
    }
    if !failures.is_empty() {
        out.push_str("\nFailures:\n\n");
        for f in failures {
            out.push_str(&f);
            out.push('\n');
        }
    }
    out
}

/// `- model: R× model-fp16 at batch B` for every measured plan beside the (first) FP16 one —
/// the INT8 target is a ratio measured in one run.
fn ratios_to_fp16(plans: &[PlanRow]) -> String {
    let Some(base) = plans.iter().find(|p| p.precision == "FP16" && p.error.is_none()) else { return String::new() };
    let mut out = String::new();
    for p in plans.iter().filter(|p| !std::ptr::eq(*p, base) && p.error.is_none()) {
        let common = p
            .points
            .iter()
            .filter_map(|a| base.points.iter().find(|b| b.batch == a.batch).map(|b| (a, b)))
            .filter(|(_, b)| b.samples_per_s > 0.0)
            .max_by_key(|(a, _)| a.batch);
        if let Some((a, b)) = common {
            let ratio = a.samples_per_s / b.samples_per_s;
            let compute = match (a.compute_samples_per_s, b.compute_samples_per_s) {
                (Some(x), Some(y)) if y > 0.0 => format!(", {:.2}× compute only", x / y),
                _ => String::new(),
            };
            out.push_str(&format!(
                "- {} ({}): {ratio:.2}× {} end to end{compute}, at batch {}\n",
                p.model, p.precision, base.model, a.batch
            ));
        }
    }
    out
}

/// Where the markers are: `Ok(None)` when the file has neither, an error when it has only
/// one, has them out of order or more than once (a hand edit that should not be guessed at).
fn markers(text: &str) -> anyhow::Result<Option<(usize, usize)>> {
    let (b, e) = (text.matches(BEGIN).count(), text.matches(END).count());
    match (text.find(BEGIN), text.find(END)) {
        (None, None) => Ok(None),
        (Some(begin), Some(end)) if b == 1 && e == 1 && begin < end => Ok(Some((begin, end))),
        _ => bail!(
            "the file has {b} `{BEGIN}` and {e} `{END}` marker(s), not one of each in that order: \
             fix them by hand (or remove both to have the section appended)"
        ),
    }
}

/// Checks that `text` can take a table (see [`markers`]) before anything is measured.
pub fn check_markers(text: &str) -> anyhow::Result<()> {
    markers(text).map(|_| ())
}

/// `text` with `table` between the markers (everything outside them kept byte for byte),
/// or with a new [`HEADING`] section holding the markers appended when it has none.
pub fn insert_table(text: &str, table: &str) -> anyhow::Result<String> {
    let body = table.trim_end_matches('\n');
    match markers(text)? {
        Some((begin, end)) => {
            let head = &text[..begin + BEGIN.len()];
            Ok(format!("{head}\n{body}\n{}", &text[end..]))
        }
        None => {
            let mut out = text.to_owned();
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("{HEADING}\n\n{BEGIN}\n{body}\n{END}\n"));
            Ok(out)
        }
    }
}

/// Writes `contents` to a temporary file beside `path` and renames it over `path`, so a
/// reader (or a crash) never sees half a file.
pub fn write_atomic(path: &Path, contents: &str) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.kiln-tmp-{}", name.to_string_lossy(), std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        // Keep the file's permissions: it is usually a tracked document.
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions())?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // Best effort: the temporary file is ours and useless after a failure.
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
