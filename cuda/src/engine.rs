//! The engine (a plan on one GPU: weights uploaded once, the lowering
//! analysis, loaded kernels) and its execution contexts (one stream, one
//! activation arena, pinned staging, and per batch size the bound steps with
//! their chosen tactics, captured as a CUDA graph).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaStream, PinnedHostSlice};
use kiln_engine::graph::{Dim, Graph, GraphError, NodeIssue, ValueId};
use kiln_engine::ops::registry;
use kiln_engine::plan::Plan;
use kiln_engine::{ModelMetadata, Tensor, TensorSpec};

use crate::CudaError;
use crate::blas::{Blas, GemmArgs, GemmPlan};
use crate::device::Device;
use crate::dnn::{ConvArgs, ConvPlan, Dnn};
use crate::ffi::DevPtr;
use crate::ffi::mem::{self, DeviceBuffer, OwnedGraph};
use crate::kernels::Kernels;
use crate::lower::{ALIGN, Analysis, Bases, Binding, StepKind, emit, write_tensor_bytes};
use crate::tactics::{Choice, TimingCache, fastest};

/// cuBLASLt and cuDNN workspace per context; candidates needing more are skipped.
const WORKSPACE_BYTES: usize = 64 << 20;
/// Timed repetitions per tactic candidate (after one warm-up call).
const TACTIC_REPS: usize = 5;

/// How tactics (GEMM and convolution algorithms) are chosen at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TacticMode {
    /// Time every candidate on the GPU (with the timing cache), keep the fastest.
    #[default]
    Time,
    /// The libraries' first heuristic choice; fastest load, no timing.
    Heuristic,
}

/// Load options of an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Capture each batch size's steps as a CUDA graph and replay it.
    pub cuda_graphs: bool,
    pub tactics: TacticMode,
    /// Timing cache file, read at load and updated with new timings.
    pub timing_cache: Option<PathBuf>,
    /// Largest batch a context accepts; `None`: the plan's `batch` profile max.
    pub max_batch: Option<usize>,
    /// Run each batch padded to the next power of two (see [`crate::buckets`]).
    pub batch_buckets: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            device: 0,
            cuda_graphs: true,
            tactics: TacticMode::Time,
            timing_cache: None,
            max_batch: None,
            batch_buckets: false,
        }
    }
}

/// Milliseconds each stage of one run took, measured with CUDA events.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimes {
    pub h2d_ms: f64,
    pub compute_ms: f64,
    pub d2h_ms: f64,
}

/// One tactic decision, as `kiln build` records it in the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct TacticRecord {
    pub node: String,
    pub key: String,
    pub algo: String,
    pub ms: f64,
}

/// A plan loaded onto one GPU: weights uploaded once, steps lowered and tactics
/// chosen. Contexts ([`Engine::context`]) run it, one per stream.
pub struct Engine {
    device: Device,
    graph: Graph,
    analysis: Analysis,
    weights: DeviceBuffer,
    kernels: Kernels,
    blas: Blas,
    metadata: ModelMetadata,
    /// Profile symbols in a fixed order, with their largest values.
    symbols: Vec<(String, usize)>,
    opts: EngineOptions,
    cache: Mutex<TimingCache>,
    precision: kiln_engine::graph::Precision,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.device.name())
            .field("graph", &self.graph.name)
            .field("steps", &self.analysis.ops.len())
            .field("arena_bytes", &self.analysis.arena_bytes)
            .field("weight_bytes", &self.weights.len())
            .finish()
    }
}

fn spec_of(graph: &Graph, v: ValueId) -> TensorSpec {
    let value = &graph.values[v];
    let ty = value.ty.as_ref();
    let shape = ty
        .and_then(|t| t.shape.as_ref())
        .map(|s| {
            s.iter()
                .map(|d| match d.as_fixed() {
                    Some(n) => kiln_engine::Dim::Fixed(n.max(0) as usize),
                    None => kiln_engine::Dim::Dynamic,
                })
                .collect()
        })
        .unwrap_or_default();
    TensorSpec { name: value.name.clone(), dtype: ty.map_or(kiln_engine::DType::F32, |t| t.dtype), shape }
}

impl Engine {
    /// Loads `plan` onto the GPU of `opts.device`.
    pub fn load(plan: Plan, opts: &EngineOptions) -> Result<Arc<Engine>, CudaError> {
        let device = Device::open(opts.device)?;
        device.gpu().ctx.bind_to_thread().map_err(CudaError::driver("bind context"))?;
        let mut symbols: Vec<(String, usize)> =
            plan.settings.profiles.iter().map(|p| (p.symbol.clone(), p.max)).collect();
        if let Some(mb) = opts.max_batch {
            match symbols.iter_mut().find(|(s, _)| s == "batch") {
                Some((_, max)) if mb >= 1 && mb <= *max => *max = mb,
                Some((_, max)) => {
                    return Err(CudaError::InvalidArgument(format!("max batch {mb} outside the plan's 1..={max}")));
                }
                None => return Err(CudaError::InvalidArgument("the plan has no batch profile".into())),
            }
        }
        let max: Binding = symbols.iter().cloned().collect();
        let precision = plan.settings.precision;
        let graph = plan.graph;
        let analysis = Analysis::new(&graph, &max)?;
        let weights = DeviceBuffer::from_host(&device.gpu().stream, &analysis.weights)?;
        device.gpu().stream.synchronize().map_err(CudaError::driver("upload weights"))?;
        let kernels = Kernels::load(&device)?;
        let blas = Blas::new()?;
        let mut cache = match &opts.timing_cache {
            Some(p) => TimingCache::open(p)?,
            None => TimingCache::new(),
        };
        if plan.settings.arch == device.arch() {
            for n in &graph.nodes {
                cache.seed_from_kernel_slot(&n.kernel);
            }
        }
        let metadata = ModelMetadata {
            inputs: graph.inputs.iter().map(|&v| spec_of(&graph, v)).collect(),
            outputs: graph.outputs.iter().map(|&v| spec_of(&graph, v)).collect(),
        };
        tracing::info!(
            device = device.name(),
            model = %graph.name,
            weights = analysis.weights.len(),
            arena = analysis.arena_bytes,
            device_ops = analysis.ops.len(),
            host_nodes = analysis.host_nodes.len(),
            "CUDA engine loaded"
        );
        Ok(Arc::new(Engine {
            device,
            graph,
            analysis,
            weights,
            kernels,
            blas,
            metadata,
            symbols,
            opts: opts.clone(),
            cache: Mutex::new(cache),
            precision,
        }))
    }

    /// Reads a plan file (see [`kiln_engine::plan::load`]) and loads it.
    pub fn load_file(path: &Path, opts: &EngineOptions) -> Result<Arc<Engine>, CudaError> {
        let plan = kiln_engine::plan::load(path, &kiln_engine::plan::Expect::default())?;
        Self::load(plan, opts)
    }

    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// The plan's precision: `int8` when it has INT8 layers (the rest FP16), else `fp16` or `fp32`.
    pub fn precision_name(&self) -> &'static str {
        match self.precision {
            _ if !self.analysis.int8.is_empty() => "int8",
            kiln_engine::graph::Precision::F16 => "fp16",
            kiln_engine::graph::Precision::F32 => "fp32",
        }
    }

    /// How many layers run in INT8.
    pub fn int8_layers(&self) -> usize {
        self.analysis.int8.len()
    }

    /// Largest batch a context accepts.
    pub fn max_batch(&self) -> usize {
        self.symbols.iter().find(|(s, _)| s == "batch").map_or(1, |(_, m)| *m)
    }

    /// The GPU's name, e.g. `NVIDIA H200`.
    pub fn device_name(&self) -> &str {
        self.device.name()
    }

    /// `sm_XY` of the GPU.
    pub fn arch(&self) -> &str {
        self.device.arch()
    }

    /// A new execution context: its own stream, activation arena and CUDA graphs.
    pub fn context(self: &Arc<Self>) -> Result<ExecutionContext, CudaError> {
        self.device.gpu().ctx.bind_to_thread().map_err(CudaError::driver("bind context"))?;
        let stream = self.device.new_stream()?;
        let a = &self.analysis;
        Ok(ExecutionContext {
            dnn: Dnn::new(&stream)?,
            arena: DeviceBuffer::zeroed(&stream, a.arena_bytes.max(ALIGN))?,
            workspace: DeviceBuffer::zeroed(&stream, WORKSPACE_BYTES)?,
            upload: self.device.gpu().alloc_pinned(a.upload_bytes.max(1))?,
            download: self.device.gpu().alloc_pinned(a.download_bytes.max(1))?,
            instances: HashMap::new(),
            memo: HashMap::new(),
            engine: Arc::clone(self),
            stream,
        })
    }

    /// Zero-filled inputs at `binding` (for preparing a binding without data).
    pub fn zero_inputs(&self, binding: &Binding) -> Result<Vec<Tensor>, CudaError> {
        let g = &self.graph;
        g.inputs
            .iter()
            .map(|&v| {
                let ty = g.values[v].ty.as_ref();
                let dims = ty.and_then(|t| t.shape.as_ref()).and_then(|s| kiln_engine::graph::eval_shape(s, binding));
                match (ty, dims) {
                    (Some(t), Some(d)) => {
                        Tensor::zeros(t.dtype, d).map_err(|e| CudaError::InvalidArgument(e.to_string()))
                    }
                    _ => Err(CudaError::InvalidArgument(format!("input {} has no bound shape", g.values[v].name))),
                }
            })
            .collect()
    }

    /// Saves the timing cache file, if one was given and anything was timed.
    pub fn save_timing_cache(&self) -> Result<(), CudaError> {
        self.cache.lock().map_err(|_| CudaError::InvalidArgument("timing cache poisoned".into()))?.save()
    }

    /// The binding of the profile symbols implied by `inputs`' shapes, checked
    /// against the metadata and the profiles' maxima.
    fn binding(&self, inputs: &[Tensor]) -> Result<(Binding, Vec<usize>), CudaError> {
        let g = &self.graph;
        if inputs.len() != g.inputs.len() {
            return Err(CudaError::Input {
                name: g.name.clone(),
                reason: format!("expected {} inputs, got {}", g.inputs.len(), inputs.len()),
            });
        }
        let mut binding = Binding::new();
        for (&v, t) in g.inputs.iter().zip(inputs) {
            let value = &g.values[v];
            let bad = |reason: String| CudaError::Input { name: value.name.clone(), reason };
            let Some(ty) = value.ty.as_ref() else { continue };
            if ty.dtype != t.dtype() {
                return Err(bad(format!("expected {}, got {}", ty.dtype, t.dtype())));
            }
            let Some(shape) = ty.shape.as_ref() else { continue };
            if shape.len() != t.shape().len() {
                return Err(bad(format!("expected rank {}, got shape {:?}", shape.len(), t.shape())));
            }
            for (d, &n) in shape.iter().zip(t.shape()) {
                if let Some(f) = d.as_fixed() {
                    if f != n as i64 {
                        return Err(bad(format!(
                            "expected {}, got shape {:?}",
                            kiln_engine::graph::shape_string(shape),
                            t.shape()
                        )));
                    }
                } else if let [s] = d.symbols()
                    && *d == Dim::sym(s.clone())
                {
                    match binding.insert(s.clone(), n) {
                        Some(prev) if prev != n => {
                            return Err(bad(format!("{s} is {prev} in another input but {n} here")));
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut key = Vec::with_capacity(self.symbols.len());
        for (s, max) in &self.symbols {
            let n = *binding.get(s).ok_or_else(|| CudaError::Input {
                name: g.name.clone(),
                reason: format!("no input fixes the size {s}"),
            })?;
            if n == 0 || n > *max {
                return Err(CudaError::Input {
                    name: g.name.clone(),
                    reason: format!("{s} = {n} is outside this engine's 1..={max}"),
                });
            }
            key.push(n);
        }
        Ok((binding, key))
    }

    /// A value the host has for one run: a constant, a graph input, a memoised
    /// shape-only result or one computed this run.
    fn host_value<'a>(
        &'a self,
        v: ValueId,
        inputs: &'a [Tensor],
        memo: &'a HashMap<ValueId, Tensor>,
        computed: &'a HashMap<ValueId, Tensor>,
    ) -> Option<&'a Tensor> {
        let g = &self.graph;
        g.values[v]
            .constant
            .as_deref()
            .or_else(|| g.inputs.iter().position(|&i| i == v).and_then(|k| inputs.get(k)))
            .or_else(|| memo.get(&v))
            .or_else(|| computed.get(&v))
    }

    /// Evaluates the host nodes (shape and mask bookkeeping) on `inputs` and
    /// returns what they computed this run. Nodes
    /// that depend only on input *shapes* (through `Shape`) and constants give
    /// the same result for every run of a binding: they come from `memo`, which
    /// the caller keeps per binding, so a run only evaluates what depends on
    /// input values (e.g. an attention mask).
    fn host_values(
        &self,
        inputs: &[Tensor],
        binding: &Binding,
        memo: &mut HashMap<ValueId, Tensor>,
    ) -> Result<HashMap<ValueId, Tensor>, CudaError> {
        let g = &self.graph;
        let mut vals: HashMap<ValueId, Tensor> = HashMap::new();
        for &i in &self.analysis.host_nodes {
            let node = &g.nodes[i];
            if node.outputs.iter().all(|o| memo.contains_key(o)) {
                continue;
            }
            let issue = |reason: String| {
                CudaError::Plan(GraphError::Execution(NodeIssue {
                    node: node.name.clone(),
                    op: node.op.clone(),
                    reason,
                }))
            };
            let op = registry().get(&node.op).ok_or_else(|| issue("no such op".into()))?;
            // `Shape` of a tensor computed on the device needs only its dims: a zero stand-in.
            let stand_in = match (node.op.as_str(), node.input(0)) {
                ("Shape", Some(v)) if self.host_value(v, inputs, memo, &vals).is_none() => {
                    let ty = g.values[v].ty.as_ref().ok_or_else(|| issue("input type unknown".into()))?;
                    let dims = ty
                        .shape
                        .as_ref()
                        .and_then(|s| kiln_engine::graph::eval_shape(s, binding))
                        .ok_or_else(|| issue("input shape not bound".into()))?;
                    Some((v, Tensor::zeros(ty.dtype, dims).map_err(|e| issue(e.to_string()))?))
                }
                _ => None,
            };
            let ins: Vec<Option<&Tensor>> = node
                .inputs
                .iter()
                .map(|v| {
                    v.and_then(|v| {
                        self.host_value(v, inputs, memo, &vals)
                            .or_else(|| stand_in.as_ref().filter(|(s, _)| *s == v).map(|(_, t)| t))
                    })
                })
                .collect();
            let outs = op.eval(node, &ins).map_err(issue)?;
            let shape_only = self.analysis.static_host_nodes.contains(&i);
            for (&o, t) in node.outputs.iter().zip(outs) {
                if shape_only {
                    memo.insert(o, t);
                } else {
                    vals.insert(o, t);
                }
            }
        }
        Ok(vals)
    }

    fn tactic_key(&self, what: &str) -> String {
        format!("{}|{}|{what}", self.device.name(), self.device.arch())
    }
}

/// A step ready to enqueue.
enum Bound {
    Gemm { plan: GemmPlan, algo: usize, args: GemmArgs },
    Conv { plan: ConvPlan, algo: usize, args: ConvArgs },
    Elementwise { program: DevPtr, n: usize },
    Kernel(StepKind),
}

/// Everything one binding (batch size, sequence length) needs on one context.
struct Instance {
    steps: Vec<(String, Bound)>,
    /// Elementwise programs, uploaded once; the steps point into it.
    _params: DeviceBuffer,
    graph: Option<OwnedGraph>,
    tactics: Vec<TacticRecord>,
}

/// Runs an [`Engine`] on one stream. Not shared between threads; make one per thread.
pub struct ExecutionContext {
    engine: Arc<Engine>,
    stream: Arc<CudaStream>,
    dnn: Dnn,
    arena: DeviceBuffer,
    workspace: DeviceBuffer,
    upload: PinnedHostSlice<u8>,
    download: PinnedHostSlice<u8>,
    instances: HashMap<Vec<usize>, Instance>,
    /// Shape-only host values per binding (see [`Engine::host_values`]).
    memo: HashMap<Vec<usize>, HashMap<ValueId, Tensor>>,
}

impl std::fmt::Debug for ExecutionContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutionContext")
            .field("engine", &self.engine)
            .field("arena_bytes", &self.arena.len())
            .field("bindings", &self.instances.len())
            .finish()
    }
}

impl Drop for ExecutionContext {
    /// Waits for the stream and destroys the graphs (which reference the arena,
    /// the weights and the kernel modules) before anything they use is freed.
    fn drop(&mut self) {
        let _ = self.engine.device.gpu().ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        self.instances.clear();
    }
}

impl ExecutionContext {
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Runs one batch: inputs follow the engine metadata's order, batch axis first.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, CudaError> {
        self.run_timed(inputs).map(|(out, _)| out)
    }

    /// Lowers, binds and (with CUDA graphs) captures the binding of `inputs`
    /// without running it; returns the tactics chosen for it.
    pub fn prepare(&mut self, inputs: &[Tensor]) -> Result<Vec<TacticRecord>, CudaError> {
        self.engine.device.gpu().ctx.bind_to_thread().map_err(CudaError::driver("bind context"))?;
        let (binding, key) = self.engine.binding(inputs)?;
        self.instance(&binding, &key)?;
        Ok(self.instances.get(&key).map(|i| i.tactics.clone()).unwrap_or_default())
    }

    /// Prepares every batch bucket (see [`crate::buckets`]) when batch is the
    /// plan's only dynamic size, so that no request pays for tactic timing or
    /// a graph capture; returns how many bindings were prepared.
    pub fn prepare_buckets(&mut self) -> Result<usize, CudaError> {
        let engine = Arc::clone(&self.engine);
        if !engine.opts.batch_buckets || engine.symbols.len() != 1 || engine.symbols[0].0 != "batch" {
            return Ok(0);
        }
        let buckets = crate::buckets::all(engine.max_batch());
        for &b in &buckets {
            let inputs = engine.zero_inputs(&[("batch".to_owned(), b)].into())?;
            self.prepare(&inputs)?;
        }
        Ok(buckets.len())
    }

    /// [`ExecutionContext::run`], also returning the H2D / compute / D2H split.
    pub fn run_timed(&mut self, inputs: &[Tensor]) -> Result<(Vec<Tensor>, StageTimes), CudaError> {
        let n = inputs.first().map_or(1, Tensor::batch);
        let bucketed = self.engine.opts.batch_buckets && self.engine.symbols.iter().any(|(s, _)| s == "batch");
        let to = if bucketed { crate::buckets::bucket(n, self.engine.max_batch()) } else { n };
        if to != n && inputs.iter().all(|t| t.batch() == n) {
            let padded = crate::buckets::pad(inputs, to)?;
            let (outputs, times) = self.run_exact(&padded)?;
            return Ok((crate::buckets::trim(outputs, n)?, times));
        }
        self.run_exact(inputs)
    }

    fn run_exact(&mut self, inputs: &[Tensor]) -> Result<(Vec<Tensor>, StageTimes), CudaError> {
        let engine = Arc::clone(&self.engine);
        engine.device.gpu().ctx.bind_to_thread().map_err(CudaError::driver("bind context"))?;
        let (binding, key) = engine.binding(inputs)?;
        let mut memo = self.memo.remove(&key).unwrap_or_default();
        let computed = engine.host_values(inputs, &binding, &mut memo);
        let result = computed.and_then(|computed| self.run_bound(&engine, inputs, &binding, &key, &memo, &computed));
        self.memo.insert(key, memo);
        result
    }

    fn run_bound(
        &mut self,
        engine: &Arc<Engine>,
        inputs: &[Tensor],
        binding: &Binding,
        key: &[usize],
        memo: &HashMap<ValueId, Tensor>,
        computed: &HashMap<ValueId, Tensor>,
    ) -> Result<(Vec<Tensor>, StageTimes), CudaError> {
        self.instance(binding, key)?;
        let a = &engine.analysis;

        // Stage every upload into the pinned buffer at its arena offset.
        let staging = self.upload.as_mut_slice().map_err(CudaError::driver("pinned upload buffer"))?;
        let mut copies = Vec::with_capacity(a.uploads.len());
        for u in &a.uploads {
            let d = &a.dvals[u.dval];
            let t = engine.host_value(u.value, inputs, memo, computed).ok_or_else(|| CudaError::Input {
                name: d.name.clone(),
                reason: "was not computed on the host".into(),
            })?;
            let crate::lower::Storage::Arena { offset } = a.storage(u.dval) else { continue };
            // Written straight into its planned slot of the pinned buffer, no intermediate copy.
            let slot = staging.get_mut(offset..offset + d.bytes).unwrap_or_default();
            let len = write_tensor_bytes(t, d.elem, slot).ok_or_else(|| CudaError::Input {
                name: d.name.clone(),
                reason: format!(
                    "{} [{:?}] does not fit {:?} in the {} bytes planned",
                    t.dtype(),
                    t.shape(),
                    d.elem,
                    d.bytes
                ),
            })?;
            copies.push((offset, len));
        }
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let ev = |s: &CudaStream| s.record_event(timing).map_err(CudaError::driver("record event"));
        let enqueued = (|| {
            let e0 = ev(&self.stream)?;
            let staging = self.upload.as_slice().map_err(CudaError::driver("pinned upload buffer"))?;
            for &(off, len) in &copies {
                mem::htod(&self.stream, &staging[off..off + len], self.arena.at(off, len)?, len)?;
            }
            let e1 = ev(&self.stream)?;
            self.launch(key)?;
            let e2 = ev(&self.stream)?;
            let (off, len) = (a.download_offset, a.download_bytes);
            if len > 0 {
                let dst = self.download.as_mut_slice().map_err(CudaError::driver("pinned download buffer"))?;
                mem::dtoh(&self.stream, self.arena.at(off, len)?, len, &mut dst[..len])?;
            }
            let e3 = ev(&self.stream)?;
            Ok::<_, CudaError>((e0, e1, e2, e3))
        })();
        // Whatever was queued finishes before the pinned buffers can be rewritten.
        let synced = self.stream.synchronize().map_err(CudaError::driver("run"));
        let (e0, e1, e2, e3) = enqueued?;
        synced?;
        let ms =
            |x: &cudarc::driver::CudaEvent, y| x.elapsed_ms(y).map(f64::from).map_err(CudaError::driver("event time"));
        let times = StageTimes { h2d_ms: ms(&e0, &e1)?, compute_ms: ms(&e1, &e2)?, d2h_ms: ms(&e2, &e3)? };
        let outputs = self.collect_outputs(binding, inputs, memo, computed)?;
        Ok((outputs, times))
    }

    fn collect_outputs(
        &self,
        binding: &Binding,
        inputs: &[Tensor],
        memo: &HashMap<ValueId, Tensor>,
        computed: &HashMap<ValueId, Tensor>,
    ) -> Result<Vec<Tensor>, CudaError> {
        let e = &self.engine;
        let (g, a) = (&e.graph, &e.analysis);
        let bytes = self.download.as_slice().map_err(CudaError::driver("pinned download buffer"))?;
        let mut out = Vec::with_capacity(g.outputs.len());
        for &o in &g.outputs {
            if let Some(d) = a.downloads.iter().find(|d| d.value == o) {
                let dv = &a.dvals[d.dval];
                let dims = kiln_engine::graph::eval_shape(&dv.shape, binding)
                    .ok_or_else(|| CudaError::InvalidArgument(format!("shape of output {} unbound", dv.name)))?;
                let crate::lower::Storage::Arena { offset } = a.storage(d.dval) else {
                    return Err(CudaError::InvalidArgument(format!("output {} is not in the arena", dv.name)));
                };
                let start = offset - a.download_offset;
                let len = dims.iter().product::<usize>() * dv.elem.size();
                let raw = bytes.get(start..start + len).ok_or_else(|| {
                    CudaError::InvalidArgument(format!("output {} lies outside the download area", dv.name))
                })?;
                out.push(crate::lower::tensor_from_bytes(raw, dv.elem, dims)?);
            } else if let Some(t) = e.host_value(o, inputs, memo, computed) {
                out.push(t.clone());
            } else {
                return Err(CudaError::InvalidArgument(format!("output {} has no source", g.values[o].name)));
            }
        }
        Ok(out)
    }

    /// Enqueues the instance of `key`: its CUDA graph, or its steps one by one.
    fn launch(&self, key: &[usize]) -> Result<(), CudaError> {
        let inst = self.instances.get(key).ok_or_else(|| CudaError::InvalidArgument("binding not prepared".into()))?;
        match &inst.graph {
            Some(g) => g.0.launch().map_err(CudaError::driver("launch CUDA graph")),
            None => self.enqueue(&inst.steps),
        }
    }

    fn enqueue(&self, steps: &[(String, Bound)]) -> Result<(), CudaError> {
        for (node, step) in steps {
            self.enqueue_one(step).map_err(|e| CudaError::InvalidArgument(format!("{node}: {e}")))?;
        }
        Ok(())
    }

    fn enqueue_one(&self, step: &Bound) -> Result<(), CudaError> {
        let (k, s) = (&self.engine.kernels, &self.stream);
        let (ws, wsn) = (self.workspace.ptr(), self.workspace.len());
        match step {
            Bound::Gemm { plan, algo, args } => self.engine.blas.run(s, plan, *algo, args, ws, wsn),
            Bound::Conv { plan, algo, args } => self.dnn.run(plan, *algo, args, ws, wsn),
            Bound::Elementwise { program, n } => k.elementwise(s, *program, *n),
            Bound::Kernel(kind) => match kind {
                StepKind::Cast(a) => k.cast(s, a),
                StepKind::Copy(a) => k.copy_strided(s, a),
                StepKind::Gather(a) => k.gather(s, a),
                StepKind::Softmax(a) => k.softmax(s, a),
                StepKind::LayerNorm(a) => k.layernorm(s, a),
                StepKind::Reduce(a) => k.reduce(s, a),
                StepKind::Pool(a) => k.pool2d(s, a),
                StepKind::GlobalPool(a) => k.global_avg_pool(s, a),
                StepKind::Attention(a) => k.attention(s, a),
                StepKind::Quantize(a) => k.quantize(s, a),
                StepKind::Requant(a) => k.requant(s, a),
                StepKind::DwConvI8(a) => k.dwconv_i8(s, a),
                StepKind::Zero { ptr, bytes } => mem::zero(s, *ptr, *bytes),
                StepKind::DtoD { src, dst, bytes } => mem::dtod(s, *src, *dst, *bytes),
                StepKind::Gemm { .. } | StepKind::Conv { .. } | StepKind::Elementwise(_) => {
                    Err(CudaError::InvalidArgument("unbound library step".into()))
                }
            },
        }
    }

    /// Builds (once) the instance of a binding: emit, plan library calls, pick
    /// tactics, upload elementwise programs, capture.
    fn instance(&mut self, binding: &Binding, key: &[usize]) -> Result<(), CudaError> {
        if self.instances.contains_key(key) {
            return Ok(());
        }
        let engine = Arc::clone(&self.engine);
        let bases = Bases { weights: engine.weights.ptr(), arena: self.arena.ptr() };
        let steps = emit(&engine.graph, &engine.analysis, binding, bases)?;
        // Elementwise programs go into one device buffer, 64-byte aligned each.
        let programs: Vec<Vec<u8>> = steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::Elementwise(p) => Some(p.to_bytes()),
                _ => None,
            })
            .collect();
        let stride = programs.first().map_or(0, |p| p.len().next_multiple_of(64));
        let mut blob = vec![0u8; stride * programs.len()];
        for (i, p) in programs.iter().enumerate() {
            blob[i * stride..i * stride + p.len()].copy_from_slice(p);
        }
        let params = DeviceBuffer::from_host(&self.stream, &blob)?;
        let mut bound = Vec::with_capacity(steps.len());
        let mut tactics = Vec::new();
        let mut next_program = 0usize;
        for step in steps {
            let b = match step.kind {
                StepKind::Gemm { spec, args } => {
                    let plan = engine.blas.plan(&spec, WORKSPACE_BYTES)?;
                    let what = format!("cublasLt {}|{spec}", engine.blas.version());
                    let algo =
                        self.choose(&step.node, &what, plan.algo_count(), plan.algo_ids(), &mut tactics, |ctx, i| {
                            engine.blas.run(&ctx.stream, &plan, i, &args, ctx.workspace.ptr(), ctx.workspace.len())
                        })?;
                    Bound::Gemm { plan, algo, args }
                }
                StepKind::Conv { spec, args } => {
                    let plan = self.dnn.plan(&spec)?;
                    let ids: Vec<String> = (0..plan.algo_count())
                        .map(|i| {
                            let fits = plan.workspace_bytes(i).is_some_and(|w| w <= WORKSPACE_BYTES);
                            if fits { plan.algo_id(i).unwrap_or("?").to_owned() } else { String::new() }
                        })
                        .collect();
                    let what = format!("cuDNN {}|{spec:?}", self.dnn.version());
                    let algo = self.choose(&step.node, &what, plan.algo_count(), &ids, &mut tactics, |ctx, i| {
                        if ids[i].is_empty() {
                            return Err(CudaError::Dnn("workspace too large".into()));
                        }
                        ctx.dnn.run(&plan, i, &args, ctx.workspace.ptr(), ctx.workspace.len())
                    })?;
                    Bound::Conv { plan, algo, args }
                }
                StepKind::Elementwise(p) => {
                    let program = params.ptr() + (next_program * stride) as u64;
                    next_program += 1;
                    Bound::Elementwise { program, n: p.len() }
                }
                other => Bound::Kernel(other),
            };
            bound.push((step.node, b));
        }
        // One eager pass first: one-time library setup (cuDNN plans, lazy module loading)
        // must not happen inside stream capture, and step errors surface here, named.
        self.enqueue(&bound)?;
        self.stream.synchronize().map_err(CudaError::driver("first run of a binding"))?;
        let graph = if engine.opts.cuda_graphs { self.capture(&bound)? } else { None };
        if let Err(e) = engine.save_timing_cache() {
            tracing::warn!(error = %e, "timing cache not saved");
        }
        self.instances.insert(key.to_vec(), Instance { steps: bound, _params: params, graph, tactics });
        Ok(())
    }

    /// The candidate to use for one library call: from the timing cache, by
    /// timing every candidate, or the heuristic's first.
    fn choose(
        &self,
        node: &str,
        what: &str,
        count: usize,
        ids: &[String],
        records: &mut Vec<TacticRecord>,
        run: impl Fn(&Self, usize) -> Result<(), CudaError>,
    ) -> Result<usize, CudaError> {
        let engine = &self.engine;
        let key = engine.tactic_key(what);
        let cached = engine.cache.lock().ok().and_then(|c| c.get(&key).cloned());
        if let Some(c) = cached
            && let Some(i) = ids.iter().position(|id| *id == c.algo)
        {
            records.push(TacticRecord { node: node.to_owned(), key, algo: c.algo, ms: c.ms });
            return Ok(i);
        }
        if count <= 1 || engine.opts.tactics == TacticMode::Heuristic {
            // The first candidate that fits the workspace (cuDNN lists its heuristic's first).
            return ids.iter().position(|id| !id.is_empty()).ok_or_else(|| {
                CudaError::InvalidArgument(format!("{node}: no candidate fits the workspace for {what}"))
            });
        }
        let time = |i: usize| -> Result<f64, CudaError> {
            run(self, i)?;
            let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
            let start = self.stream.record_event(flags).map_err(CudaError::driver("record event"))?;
            for _ in 0..TACTIC_REPS {
                run(self, i)?;
            }
            let end = self.stream.record_event(flags).map_err(CudaError::driver("record event"))?;
            let ms = start.elapsed_ms(&end).map_err(CudaError::driver("event time"))?;
            Ok(f64::from(ms) / TACTIC_REPS as f64)
        };
        let (best, ms) = fastest(count, time).ok_or_else(|| {
            CudaError::InvalidArgument(format!("{node}: every candidate algorithm failed for {what}"))
        })?;
        let algo = ids.get(best).cloned().unwrap_or_default();
        if let Ok(mut c) = engine.cache.lock() {
            c.insert(key.clone(), Choice { algo: algo.clone(), ms });
        }
        records.push(TacticRecord { node: node.to_owned(), key, algo, ms });
        Ok(best)
    }

    /// Captures `steps` as a CUDA graph; `None` (eager replay, with a warning)
    /// when a library call refuses capture.
    fn capture(&self, steps: &[(String, Bound)]) -> Result<Option<OwnedGraph>, CudaError> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(CudaError::driver("begin capture"))?;
        let enqueued = self.enqueue(steps);
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        match (enqueued, ended) {
            (Ok(()), Ok(Some(graph))) => {
                graph.upload().map_err(CudaError::driver("upload CUDA graph"))?;
                Ok(Some(OwnedGraph(graph)))
            }
            (Err(e), _) => {
                tracing::warn!(error = %e, "CUDA graph capture failed; replaying steps one by one");
                Ok(None)
            }
            (Ok(()), Err(e)) => {
                tracing::warn!(error = ?e, "CUDA graph capture failed; replaying steps one by one");
                Ok(None)
            }
            (Ok(()), Ok(None)) => Ok(None),
        }
    }
}
