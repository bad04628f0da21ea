//! TensorRT provider set-up: shape profiles from the model's declared inputs, the engine
//! cache directory keyed by everything that invalidates an engine, and the option strings
//! ONNX Runtime's TensorRT and CUDA providers take.

use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::probe::Environment;
use super::{AxisRange, CudaOptions, TensorRtOptions, TrtPrecision};
use crate::EngineError;

const DEFAULT_SEQ: AxisRange = [1, 128, 512];
const CALIBRATION_FILE: &str = "calibration.table";

/// Min/opt/max input shapes in ONNX Runtime's `name:d0xd1,name2:…` form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShapeProfiles {
    pub min: String,
    pub opt: String,
    pub max: String,
}

/// Everything that makes a built engine unusable when it changes. Its digest names the
/// engine cache subdirectory, so a changed model, precision, profile, calibration, GPU or
/// TensorRT version builds new engines instead of loading stale ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheKey {
    pub model_sha256: String,
    /// `(location, sha256)` of every external-data file the model's initializers point to:
    /// retrained weights can leave `model.onnx` itself byte-identical.
    pub external_data_sha256: Vec<(String, String)>,
    pub precision: &'static str,
    /// Builder settings that change the engine: calibration-table format, optimisation
    /// level, workspace, smallest TensorRT subgraph.
    pub builder: String,
    pub profiles: Option<ShapeProfiles>,
    pub calibration_sha256: Option<String>,
    /// Device name and compute capability.
    pub gpu: String,
    pub tensorrt: String,
    pub onnxruntime: String,
}

impl CacheKey {
    /// 16 hex digits of the SHA-256 of the key's canonical JSON.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex(&Sha256::digest(json)[..8])
    }
}

/// A TensorRT session ready to register: where its engines live and its provider options.
#[derive(Debug, Clone)]
pub struct TrtSetup {
    pub cache_dir: PathBuf,
    pub key: CacheKey,
    pub options: Vec<(String, String)>,
    /// The smallest batch and sequence of the profile: the warm-up shape, which TensorRT
    /// accepts (a shape outside the profile fails instead of widening it).
    pub min_batch: usize,
    pub min_seq: usize,
}

impl TrtSetup {
    /// The file locked while this cache directory's engines are built or loaded, so that
    /// executors, replicas and `kiln build` sharing it never read a half-written engine.
    pub fn lock_file(&self) -> PathBuf {
        self.cache_dir.join(".lock")
    }
}

/// What the cache key needs from the model file, read once per file version.
#[derive(Debug, Clone)]
struct ModelFacts {
    sha256: String,
    external: Vec<(String, String)>,
    inputs: DeclaredInputs,
    has_qdq: bool,
    /// What the facts were read from: the model and its external-data files.
    stamps: Vec<Stamp>,
}

/// A file's identity for memoisation: canonical path, size, modification time.
type Stamp = (PathBuf, u64, std::time::SystemTime);

fn stamp(path: &Path) -> Result<Stamp, String> {
    let canonical = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = std::fs::metadata(&canonical).map_err(|e| format!("{}: {e}", path.display()))?;
    let modified = meta.modified().map_err(|e| e.to_string())?;
    Ok((canonical, meta.len(), modified))
}

/// Every executor of a model opens its own session, and hashing a multi-gigabyte model
/// once per executor is wasted I/O: facts are reused while none of their files changed.
static FACTS: std::sync::Mutex<Vec<ModelFacts>> = std::sync::Mutex::new(Vec::new());

fn model_facts(model: &Path) -> Result<ModelFacts, String> {
    let id = stamp(model)?;
    let mut memo = FACTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let unchanged = |f: &ModelFacts| f.stamps.iter().all(|s| stamp(&s.0).is_ok_and(|now| now == *s));
    if let Some(facts) = memo.iter().find(|f| f.stamps.first() == Some(&id) && unchanged(f)) {
        return Ok(facts.clone());
    }
    memo.retain(|f| f.stamps.first().map(|s| &s.0) != Some(&id.0));
    let bytes = std::fs::read(&id.0).map_err(|e| e.to_string())?;
    let proto = kiln_onnx::decode(&bytes).map_err(|e| e.to_string())?;
    let dir = id.0.parent().map(Path::to_path_buf).unwrap_or_default();
    let (mut external, mut stamps) = (Vec::new(), vec![id]);
    for location in external_locations(&proto) {
        let path = dir.join(&location);
        let data = std::fs::read(&path).map_err(|e| format!("external data {location}: {e}"))?;
        stamps.push(stamp(&path)?);
        external.push((location, hex(&Sha256::digest(&data))));
    }
    let facts = ModelFacts {
        sha256: hex(&Sha256::digest(&bytes)),
        external,
        inputs: declared_inputs(&proto)?,
        has_qdq: has_qdq(&proto),
        stamps,
    };
    memo.push(facts.clone());
    Ok(facts)
}

/// The distinct files external-data initializers point to, sorted.
fn external_locations(model: &kiln_onnx::proto::ModelProto) -> Vec<String> {
    use kiln_onnx::proto::tensor_proto::DataLocation;
    let mut out: Vec<String> = model
        .graph
        .iter()
        .flat_map(|g| &g.initializer)
        .filter(|t| t.data_location == DataLocation::External as i32)
        .filter_map(|t| t.external_data.iter().find(|e| e.key == "location").map(|e| e.value.clone()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Writes `bytes` to `path` unless it already holds them, through a temporary file and a
/// rename so that a concurrent reader sees the old or the new content, never a mix.
fn write_if_changed(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The model's graph inputs (initializers excluded) with their declared dims; `None` marks
/// a dynamic axis.
type DeclaredInputs = Vec<(String, Vec<Option<usize>>)>;

fn declared_inputs(model: &kiln_onnx::proto::ModelProto) -> Result<DeclaredInputs, String> {
    use kiln_onnx::proto::tensor_shape_proto::dimension::Value;
    use kiln_onnx::proto::type_proto;
    let graph = model.graph.as_ref().ok_or("the model has no graph")?;
    let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut inputs = Vec::new();
    for input in graph.input.iter().filter(|i| !initializers.contains(i.name.as_str())) {
        let shape = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref(),
            None => None,
        };
        let shape =
            shape.ok_or_else(|| format!("input {:?} declares no shape; TensorRT needs its rank", input.name))?;
        let dims = shape
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Value::DimValue(n)) if n > 0 => usize::try_from(n).ok(),
                _ => None,
            })
            .collect();
        inputs.push((input.name.clone(), dims));
    }
    Ok(inputs)
}

/// Optimisation profiles for the dynamic axes: axis 0 takes `batch`, every other dynamic
/// axis `seq`. `None` when every input is static (TensorRT then needs no profile).
pub fn profiles(
    inputs: &[(String, Vec<Option<usize>>)],
    batch: AxisRange,
    seq: AxisRange,
) -> Result<Option<ShapeProfiles>, String> {
    if inputs.iter().all(|(_, dims)| dims.iter().all(Option::is_some)) {
        return Ok(None);
    }
    let mut out = [String::new(), String::new(), String::new()];
    for (name, dims) in inputs {
        if name.is_empty() || name.contains([':', ',']) {
            return Err(format!("input {name:?}: a name with ':' or ',' cannot be written in a TensorRT profile"));
        }
        for (which, text) in out.iter_mut().enumerate() {
            let shape: Vec<String> = dims
                .iter()
                .enumerate()
                .map(|(axis, d)| match d {
                    Some(n) => n.to_string(),
                    None if axis == 0 => batch[which].to_string(),
                    None => seq[which].to_string(),
                })
                .collect();
            if !text.is_empty() {
                text.push(',');
            }
            text.push_str(&format!("{name}:{}", shape.join("x")));
        }
    }
    let [min, opt, max] = out;
    Ok(Some(ShapeProfiles { min, opt, max }))
}

/// ONNX Runtime's TensorRT provider options for `o`, engines in `cache_dir`.
pub fn tensorrt_options(
    o: &TensorRtOptions,
    cache_dir: &Path,
    timing_dir: &Path,
    profiles: Option<&ShapeProfiles>,
) -> Vec<(String, String)> {
    let flag = |b: bool| if b { "1" } else { "0" }.to_string();
    let mut v: Vec<(&str, String)> = vec![
        ("device_id", o.device_id.to_string()),
        ("trt_fp16_enable", flag(o.precision != TrtPrecision::Fp32)),
        ("trt_int8_enable", flag(o.precision == TrtPrecision::Int8)),
        ("trt_engine_cache_enable", flag(true)),
        ("trt_engine_cache_path", cache_dir.display().to_string()),
        ("trt_timing_cache_enable", flag(true)),
        ("trt_timing_cache_path", timing_dir.display().to_string()),
        ("trt_cuda_graph_enable", flag(o.cuda_graph)),
    ];
    if o.precision == TrtPrecision::Int8 && o.int8_calibration_table.is_some() {
        // ONNX Runtime looks the table up inside the engine cache directory.
        v.push(("trt_int8_calibration_table_name", CALIBRATION_FILE.into()));
        v.push(("trt_int8_use_native_calibration_table", flag(o.int8_native_calibration_table)));
    }
    if let Some(mib) = o.workspace_mib {
        v.push(("trt_max_workspace_size", (mib << 20).to_string()));
    }
    if let Some(level) = o.builder_optimization_level {
        v.push(("trt_builder_optimization_level", level.to_string()));
    }
    if let Some(n) = o.min_subgraph_size {
        v.push(("trt_min_subgraph_size", n.to_string()));
    }
    if let Some(p) = profiles {
        v.push(("trt_profile_min_shapes", p.min.clone()));
        v.push(("trt_profile_opt_shapes", p.opt.clone()));
        v.push(("trt_profile_max_shapes", p.max.clone()));
    }
    v.into_iter().map(|(k, val)| (k.to_string(), val)).collect()
}

/// ONNX Runtime's CUDA provider options for `o`.
pub fn cuda_options(o: &CudaOptions) -> Vec<(String, String)> {
    let flag = |b: bool| if b { "1" } else { "0" }.to_string();
    let mut v: Vec<(&str, String)> = vec![
        ("device_id", o.device_id.to_string()),
        ("cudnn_conv_algo_search", o.conv_algo_search.ort_value().into()),
        ("enable_cuda_graph", flag(o.cuda_graph)),
        ("prefer_nhwc", flag(o.prefer_nhwc)),
        ("use_tf32", flag(o.tf32)),
    ];
    if let Some(mib) = o.memory_limit_mib {
        v.push(("gpu_mem_limit", (mib << 20).to_string()));
    }
    v.into_iter().map(|(k, val)| (k.to_string(), val)).collect()
}

fn setup_error(model: &Path, reason: impl std::fmt::Display) -> EngineError {
    EngineError::ModelLoad { path: model.to_path_buf(), reason: format!("TensorRT set-up: {reason}") }
}

/// Resolves `o` for `model` on the machine described by `env`: the model's facts (hashes,
/// declared inputs, Q/DQ nodes), the keyed engine cache directory with a `key.json`
/// describing it, and the calibration table copied into it.
pub(crate) fn prepare(
    o: &TensorRtOptions,
    model: &Path,
    max_batch: usize,
    env: &Environment,
) -> Result<TrtSetup, EngineError> {
    let facts = model_facts(model).map_err(|e| setup_error(model, e))?;
    let max_batch = max_batch.max(1);
    let batch = o.batch.unwrap_or([1, max_batch, max_batch]);
    let seq = o.seq.unwrap_or(DEFAULT_SEQ);
    let profiles = profiles(&facts.inputs, batch, seq).map_err(|e| setup_error(model, e))?;

    let calibration = match &o.int8_calibration_table {
        Some(path) => Some(std::fs::read(path).map_err(|e| setup_error(model, format!("{}: {e}", path.display())))?),
        None => None,
    };
    if o.precision == TrtPrecision::Int8 && calibration.is_none() && !facts.has_qdq {
        return Err(setup_error(
            model,
            "precision int8 needs tensorrt.int8_calibration_table, or a model with QuantizeLinear/DequantizeLinear nodes",
        ));
    }
    let key = CacheKey {
        model_sha256: facts.sha256,
        external_data_sha256: facts.external,
        precision: o.precision.name(),
        builder: format!(
            "native_calibration={} optimization_level={:?} workspace_mib={:?} min_subgraph={:?}",
            o.int8_native_calibration_table, o.builder_optimization_level, o.workspace_mib, o.min_subgraph_size
        ),
        profiles,
        calibration_sha256: calibration.as_ref().map(|c| hex(&Sha256::digest(c))),
        gpu: env.gpu.clone(),
        tensorrt: env.tensorrt.clone(),
        onnxruntime: env.onnxruntime.clone(),
    };
    let root = match &o.engine_cache_dir {
        Some(dir) => dir.clone(),
        None => model.parent().unwrap_or(Path::new(".")).join("trt_cache"),
    };
    let cache_dir = root.join(key.digest());
    let timing_dir = o.timing_cache_dir.clone().unwrap_or_else(|| root.join("timing"));
    let io = |p: &Path, e: std::io::Error| setup_error(model, format!("{}: {e}", p.display()));
    for dir in [&cache_dir, &timing_dir] {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let key_file = cache_dir.join("key.json");
    let key_json = serde_json::to_vec_pretty(&key).map_err(|e| setup_error(model, e))?;
    write_if_changed(&key_file, &key_json).map_err(|e| io(&key_file, e))?;
    if let Some(table) = &calibration {
        let dest = cache_dir.join(CALIBRATION_FILE);
        write_if_changed(&dest, table).map_err(|e| io(&dest, e))?;
    }
    let options = tensorrt_options(o, &cache_dir, &timing_dir, key.profiles.as_ref());
    Ok(TrtSetup { cache_dir, key, options, min_batch: batch[0], min_seq: seq[0] })
}

fn has_qdq(model: &kiln_onnx::proto::ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| matches!(n.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ConvAlgoSearch;

    fn get<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
        opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn bert_inputs() -> DeclaredInputs {
        vec![("input_ids".into(), vec![None, None]), ("attention_mask".into(), vec![None, None])]
    }

    #[test]
    fn profiles_put_batch_on_axis_zero_and_seq_elsewhere() -> Result<(), String> {
        let p = profiles(&bert_inputs(), [1, 8, 32], [1, 128, 512])?.ok_or("no profile")?;
        assert_eq!(p.min, "input_ids:1x1,attention_mask:1x1");
        assert_eq!(p.opt, "input_ids:8x128,attention_mask:8x128");
        assert_eq!(p.max, "input_ids:32x512,attention_mask:32x512");
        let image = vec![("images".to_string(), vec![None, Some(3), Some(224), Some(224)])];
        let p = profiles(&image, [1, 4, 16], DEFAULT_SEQ)?.ok_or("no profile")?;
        assert_eq!((p.min.as_str(), p.max.as_str()), ("images:1x3x224x224", "images:16x3x224x224"));
        let fixed = vec![("x".to_string(), vec![Some(1), Some(3)])];
        assert_eq!(profiles(&fixed, [1, 1, 1], DEFAULT_SEQ)?, None, "static models need no profile");
        let bad = vec![("a:b".to_string(), vec![None])];
        assert!(profiles(&bad, [1, 1, 1], DEFAULT_SEQ).is_err());
        Ok(())
    }

    #[test]
    fn every_tensorrt_option_reaches_the_provider() {
        let o = TensorRtOptions {
            precision: TrtPrecision::Int8,
            int8_calibration_table: Some("calib.bin".into()),
            int8_native_calibration_table: true,
            workspace_mib: Some(2048),
            device_id: 3,
            builder_optimization_level: Some(5),
            min_subgraph_size: Some(4),
            cuda_graph: true,
            ..TensorRtOptions::default()
        };
        let p = ShapeProfiles { min: "x:1x3".into(), opt: "x:4x3".into(), max: "x:8x3".into() };
        let v = tensorrt_options(&o, Path::new("/c/k"), Path::new("/c/timing"), Some(&p));
        let expect = [
            ("device_id", "3"),
            ("trt_fp16_enable", "1"),
            ("trt_int8_enable", "1"),
            ("trt_int8_calibration_table_name", "calibration.table"),
            ("trt_int8_use_native_calibration_table", "1"),
            ("trt_engine_cache_enable", "1"),
            ("trt_engine_cache_path", "/c/k"),
            ("trt_timing_cache_enable", "1"),
            ("trt_timing_cache_path", "/c/timing"),
            ("trt_cuda_graph_enable", "1"),
            ("trt_max_workspace_size", "2147483648"),
            ("trt_builder_optimization_level", "5"),
            ("trt_min_subgraph_size", "4"),
            ("trt_profile_min_shapes", "x:1x3"),
            ("trt_profile_opt_shapes", "x:4x3"),
            ("trt_profile_max_shapes", "x:8x3"),
        ];
        for (k, want) in expect {
            assert_eq!(get(&v, k), Some(want), "{k}");
        }
        assert_eq!(v.len(), expect.len(), "no unexpected options: {v:?}");

        let fp32 = TensorRtOptions { precision: TrtPrecision::Fp32, ..TensorRtOptions::default() };
        let v = tensorrt_options(&fp32, Path::new("/c"), Path::new("/t"), None);
        assert_eq!((get(&v, "trt_fp16_enable"), get(&v, "trt_int8_enable")), (Some("0"), Some("0")));
        assert_eq!(get(&v, "trt_profile_min_shapes"), None);
        assert_eq!(get(&v, "trt_max_workspace_size"), None, "unset options keep TensorRT's defaults");
        let fp16 = tensorrt_options(&TensorRtOptions::default(), Path::new("/c"), Path::new("/t"), None);
        assert_eq!((get(&fp16, "trt_fp16_enable"), get(&fp16, "trt_int8_enable")), (Some("1"), Some("0")));
    }

    #[test]
    fn every_cuda_option_reaches_the_provider() {
        let o = CudaOptions {
            device_id: 1,
            memory_limit_mib: Some(1024),
            conv_algo_search: ConvAlgoSearch::Heuristic,
            cuda_graph: true,
            prefer_nhwc: true,
            tf32: false,
        };
        let v = cuda_options(&o);
        let expect = [
            ("device_id", "1"),
            ("gpu_mem_limit", "1073741824"),
            ("cudnn_conv_algo_search", "HEURISTIC"),
            ("enable_cuda_graph", "1"),
            ("prefer_nhwc", "1"),
            ("use_tf32", "0"),
        ];
        for (k, want) in expect {
            assert_eq!(get(&v, k), Some(want), "{k}");
        }
        assert_eq!(v.len(), expect.len());
        assert_eq!(get(&cuda_options(&CudaOptions::default()), "cudnn_conv_algo_search"), Some("EXHAUSTIVE"));
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let base = CacheKey {
            model_sha256: "aa".into(),
            external_data_sha256: vec![],
            precision: "fp16",
            builder: "optimization_level=None".into(),
            profiles: Some(ShapeProfiles { min: "x:1".into(), opt: "x:4".into(), max: "x:8".into() }),
            calibration_sha256: None,
            gpu: "NVIDIA H200 (sm_90)".into(),
            tensorrt: "10.16.1".into(),
            onnxruntime: "1.31.1".into(),
        };
        let d = base.digest();
        assert_eq!(d.len(), 16);
        assert_eq!(d, base.clone().digest(), "the digest is deterministic");
        let variants = [
            CacheKey { model_sha256: "ab".into(), ..base.clone() },
            CacheKey { external_data_sha256: vec![("w.bin".into(), "dd".into())], ..base.clone() },
            CacheKey { builder: "optimization_level=Some(5)".into(), ..base.clone() },
            CacheKey { precision: "int8", ..base.clone() },
            CacheKey { profiles: None, ..base.clone() },
            CacheKey {
                profiles: Some(ShapeProfiles { min: "x:1".into(), opt: "x:4".into(), max: "x:16".into() }),
                ..base.clone()
            },
            CacheKey { calibration_sha256: Some("cc".into()), ..base.clone() },
            CacheKey { gpu: "NVIDIA H100 80GB HBM3 (sm_90)".into(), ..base.clone() },
            CacheKey { tensorrt: "10.13.2".into(), ..base.clone() },
            CacheKey { onnxruntime: "1.30.0".into(), ..base.clone() },
        ];
        let mut seen = std::collections::HashSet::from([d]);
        for v in variants {
            assert!(seen.insert(v.digest()), "{v:?} did not change the digest");
        }
    }

    #[test]
    fn declared_inputs_skip_initializers_and_mark_dynamic_axes() -> Result<(), Box<dyn std::error::Error>> {
        use kiln_onnx::DataType;
        use kiln_onnx::{Dim, GraphBuilder};
        let mut g = GraphBuilder::new("g");
        let dims = [Dim::Symbolic("batch".into()), Dim::Fixed(3)];
        g.add_input("x", DataType::Float, &dims)?;
        let w = g.add_initializer_f32("w", &[3], &[1.0, 2.0, 3.0])?;
        g.add_node_with_outputs("Mul", &["x", &w], &["y"], vec![])?;
        g.add_output("y", DataType::Float, &dims)?;
        let mut model = g.finish(17);
        // Older exporters also list initializers as graph inputs.
        if let Some(graph) = model.graph.as_mut() {
            graph.input.push(kiln_onnx::value_info(&w, DataType::Float, &[Dim::Fixed(3)])?);
        }
        assert_eq!(declared_inputs(&model)?, vec![("x".to_string(), vec![None, Some(3)])]);
        assert!(!has_qdq(&model));
        Ok(())
    }

    #[test]
    fn prepare_keys_the_cache_on_external_weights_and_fills_it() -> Result<(), Box<dyn std::error::Error>> {
        use kiln_onnx::proto::tensor_proto::DataLocation;
        use kiln_onnx::{DataType, Dim, GraphBuilder, StringStringEntryProto};
        let dir = std::env::temp_dir().join(format!("kiln-trt-prepare-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut g = GraphBuilder::new("g");
        let dims = [Dim::Symbolic("batch".into()), Dim::Fixed(3)];
        g.add_input("x", DataType::Float, &dims)?;
        let w = g.add_initializer_f32("w", &[3], &[1.0, 2.0, 3.0])?;
        g.add_node_with_outputs("Mul", &["x", &w], &["y"], vec![])?;
        g.add_output("y", DataType::Float, &dims)?;
        let mut model = g.finish(17);
        let init = model.graph.as_mut().and_then(|g| g.initializer.first_mut()).ok_or("no initializer")?;
        let entry = |k: &str, v: &str| StringStringEntryProto { key: k.into(), value: v.into() };
        init.raw_data.clear();
        init.data_location = DataLocation::External as i32;
        init.external_data = vec![entry("location", "w.bin"), entry("offset", "0"), entry("length", "12")];
        let path = dir.join("model.onnx");
        kiln_onnx::save(&model, &path)?;
        let weights = |v: [f32; 3]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        std::fs::write(dir.join("w.bin"), weights([1.0, 2.0, 3.0]))?;
        std::fs::write(dir.join("calib.table"), b"TRT-table")?;
        let env = Environment { gpu: "G (sm_90)".into(), tensorrt: "10.16.1".into(), onnxruntime: "1.31.1".into() };
        let o = TensorRtOptions {
            precision: TrtPrecision::Int8,
            int8_calibration_table: Some(dir.join("calib.table")),
            batch: Some([2, 4, 8]),
            ..TensorRtOptions::default()
        };
        let first = prepare(&o, &path, 8, &env)?;
        assert_eq!(first.cache_dir.parent(), Some(dir.join("trt_cache").as_path()));
        assert_eq!((first.min_batch, first.min_seq), (2, 1));
        assert_eq!(first.key.external_data_sha256.len(), 1);
        assert!(first.cache_dir.join("key.json").is_file());
        assert_eq!(std::fs::read(first.cache_dir.join(CALIBRATION_FILE))?, b"TRT-table");
        assert_eq!(get(&first.options, "trt_profile_min_shapes"), Some("x:2x3"));
        // New weights of the same size in the external file: a new engine directory.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("w.bin"), weights([1.0, 2.0, 4.0]))?;
        let second = prepare(&o, &path, 8, &env)?;
        assert_ne!(first.cache_dir, second.cache_dir, "changed external weights reused the old engines");
        // INT8 without a table, and without Q/DQ nodes, is refused.
        let bare = TensorRtOptions { int8_calibration_table: None, ..o };
        let err = prepare(&bare, &path, 8, &env).err().ok_or("int8 without calibration was accepted")?;
        assert!(err.to_string().contains("int8_calibration_table"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
