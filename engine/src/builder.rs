//! The build driver behind `kiln build`: validates profiles, runs the pass
//! pipeline with per-pass accounting, plans activation memory at the largest
//! profile and returns a plan plus a report of what changed.

use std::collections::HashMap;
use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::graph::{Graph, GraphError, Precision};
use crate::memory::plan_memory;
use crate::passes::{PassContext, pipeline, run_pass};
use crate::plan::{BuildSettings, Plan, Profile};

/// Where convolution regions keep their activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// NHWC when building FP16 (tensor-core convolutions want channels last), NCHW otherwise.
    #[default]
    Auto,
    Nchw,
    Nhwc,
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub precision: Precision,
    pub layout: Layout,
    /// One profile per dynamic symbol the graph's inputs use (`batch`, `seq`).
    pub profiles: Vec<Profile>,
    /// Target the plan is for (`cpu-reference`, `sm_90`…).
    pub arch: String,
    /// Source model file name, recorded in the plan.
    pub source: String,
    /// Replace the FP32 image input by UINT8 NHWC pixels normalised in the plan.
    pub uint8_input: Option<crate::image_input::Uint8Input>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            precision: Precision::F32,
            layout: Layout::Auto,
            profiles: Vec::new(),
            arch: "cpu-reference".into(),
            source: String::new(),
            uint8_input: None,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Serialize)]
pub struct PassReport {
    pub pass: String,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub rewrites: usize,
    pub notes: Vec<String>,
    pub millis: f64,
}

/// The build report `kiln build` prints and writes as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub source: String,
    pub precision: String,
    pub layout: String,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub ops_before: Vec<(String, usize)>,
    pub ops_after: Vec<(String, usize)>,
    pub passes: Vec<PassReport>,
    /// Notes of the FP16 pass: the FP32 islands left in an FP16 plan.
    pub fp32_islands: Vec<String>,
    pub weight_bytes: usize,
    /// Symbol values the memory numbers are for (each profile's max).
    pub memory_bindings: HashMap<String, usize>,
    /// Activation arena after liveness-based reuse.
    pub peak_activation_bytes: usize,
    /// Sum of every intermediate tensor (no reuse).
    pub naive_activation_bytes: usize,
    pub build_millis: f64,
}

/// Checks that every dynamic symbol of the inputs has exactly one sane profile.
pub fn check_profiles(graph: &Graph, profiles: &[Profile]) -> Result<(), GraphError> {
    let mut needed: Vec<String> = Vec::new();
    for &i in &graph.inputs {
        for d in graph.shape(i).into_iter().flatten() {
            for s in d.symbols() {
                if !needed.contains(s) {
                    needed.push(s.clone());
                }
            }
        }
    }
    for p in profiles {
        if !(1 <= p.min && p.min <= p.opt && p.opt <= p.max) {
            return Err(GraphError::Invalid(format!(
                "profile {}: need 1 ≤ min ≤ opt ≤ max, got {}:{}:{}",
                p.symbol, p.min, p.opt, p.max
            )));
        }
        if !needed.contains(&p.symbol) {
            return Err(GraphError::Invalid(format!(
                "profile {} names a dimension no input has (inputs use: {})",
                p.symbol,
                if needed.is_empty() { "none".to_string() } else { needed.join(", ") }
            )));
        }
    }
    let missing: Vec<&String> = needed.iter().filter(|s| !profiles.iter().any(|p| &p.symbol == *s)).collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        return Err(GraphError::Invalid(format!("no profile for dynamic dimension(s) {}", names.join(", "))));
    }
    Ok(())
}

/// Optimises `graph` and wraps it in a plan. `progress(pass, done, total)` is
/// called before each pass.
pub fn build(
    mut graph: Graph,
    opts: &BuildOptions,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<(Plan, BuildReport), GraphError> {
    let started = Instant::now();
    if let Some(norm) = &opts.uint8_input {
        crate::image_input::apply(&mut graph, norm)?;
    }
    check_profiles(&graph, &opts.profiles)?;
    let nhwc = match opts.layout {
        Layout::Auto => opts.precision == Precision::F16,
        Layout::Nchw => false,
        Layout::Nhwc => true,
    };
    let cx = PassContext { precision: opts.precision, nhwc, ..PassContext::default() };
    let nodes_before = graph.nodes.len();
    let ops_before = graph.op_histogram();
    let passes = pipeline(&cx);
    let mut reports = Vec::with_capacity(passes.len());
    for (i, pass) in passes.iter().enumerate() {
        progress(pass.name(), i, passes.len());
        let before = graph.nodes.len();
        let t = Instant::now();
        let stats = run_pass(pass.as_ref(), &mut graph, &cx)?;
        reports.push(PassReport {
            pass: pass.name().to_string(),
            nodes_before: before,
            nodes_after: graph.nodes.len(),
            rewrites: stats.rewrites,
            notes: stats.notes,
            millis: t.elapsed().as_secs_f64() * 1e3,
        });
    }
    progress("memory plan", passes.len(), passes.len());
    let bindings: HashMap<String, usize> = opts.profiles.iter().map(|p| (p.symbol.clone(), p.max)).collect();
    let memory = plan_memory(&graph, &bindings, 256)?;
    let fp32_islands =
        reports.iter().filter(|r| r.pass == "fp16").flat_map(|r| r.notes.iter().cloned()).collect::<Vec<_>>();
    let report = BuildReport {
        source: opts.source.clone(),
        precision: precision_name(opts.precision).into(),
        layout: if nhwc { "NHWC" } else { "NCHW" }.into(),
        nodes_before,
        nodes_after: graph.nodes.len(),
        ops_before,
        ops_after: graph.op_histogram(),
        passes: reports,
        fp32_islands,
        weight_bytes: graph.weight_bytes(),
        memory_bindings: bindings,
        peak_activation_bytes: memory.arena_bytes,
        naive_activation_bytes: memory.naive_bytes,
        build_millis: started.elapsed().as_secs_f64() * 1e3,
    };
    let settings = BuildSettings {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        arch: opts.arch.clone(),
        precision: opts.precision,
        profiles: opts.profiles.clone(),
        source: opts.source.clone(),
    };
    Ok((Plan { settings, graph }, report))
}

pub fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "fp32",
        Precision::F16 => "fp16",
    }
}

/// `12.3 MiB`.
pub fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

impl fmt::Display for BuildReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "build of {} ({}, {})", self.source, self.precision, self.layout)?;
        writeln!(f, "  nodes: {} → {}", self.nodes_before, self.nodes_after)?;
        writeln!(f, "  {:<16} {:>7} {:>7} {:>9} {:>9}  notes", "pass", "before", "after", "rewrites", "ms")?;
        for p in &self.passes {
            writeln!(
                f,
                "  {:<16} {:>7} {:>7} {:>9} {:>9.1}  {}",
                p.pass,
                p.nodes_before,
                p.nodes_after,
                p.rewrites,
                p.millis,
                p.notes.join("; ")
            )?;
        }
        let ops: Vec<String> = self.ops_after.iter().map(|(op, n)| format!("{op} ×{n}")).collect();
        writeln!(f, "  ops after: {}", ops.join(", "))?;
        if self.precision == "fp16" {
            let islands = if self.fp32_islands.is_empty() { "none".to_string() } else { self.fp32_islands.join("; ") };
            writeln!(f, "  FP32 islands: {islands}")?;
        }
        let mut b: Vec<String> = self.memory_bindings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        b.sort();
        writeln!(f, "  weights: {}", human_bytes(self.weight_bytes))?;
        writeln!(
            f,
            "  activations at {}: peak {} (naive sum {}, {:.1}× less)",
            b.join(", "),
            human_bytes(self.peak_activation_bytes),
            human_bytes(self.naive_activation_bytes),
            self.naive_activation_bytes as f64 / self.peak_activation_bytes.max(1) as f64
        )?;
        write!(f, "  build time: {:.0} ms", self.build_millis)
    }
}
