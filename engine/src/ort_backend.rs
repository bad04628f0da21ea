//! ONNX Runtime backend: the CPU provider, or TensorRT / CUDA (see [`crate::providers`]).
//! The library is loaded at run time from an explicit path so that a missing or
//! mismatched library is an error value, never a panic inside `ort`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ort::ep::{ArbitrarilyConfigurableExecutionProvider, ExecutionProviderDispatch};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};

use crate::providers::{self, CudaOptions, Provider, TrtSetup, probe};
use crate::{Backend, DType, Dim, EngineError, ModelMetadata, Tensor, TensorData, TensorSpec};

/// A process-wide ONNX Runtime environment. ONNX Runtime allows one environment per
/// process, so every backend shares this handle.
#[derive(Debug, Clone)]
pub struct OrtRuntime {
    env: ort::environment::Environment,
    library: PathBuf,
}

static RUNTIME: Mutex<Option<(PathBuf, OrtRuntime)>> = Mutex::new(None);

impl OrtRuntime {
    /// Loads the ONNX Runtime shared library from `lib` (once per process) and returns the
    /// shared environment. Asking for a different library later is an error.
    pub fn load(lib: &Path) -> Result<Self, EngineError> {
        let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((loaded, runtime)) = slot.as_ref() {
            if loaded != lib {
                return Err(EngineError::RuntimeConflict { loaded: loaded.clone(), requested: lib.to_path_buf() });
            }
            return Ok(runtime.clone());
        }
        // dlopen of a missing file succeeds in ort's eyes only if it exists; check first for a clearer message.
        if !lib.is_file() {
            return Err(EngineError::RuntimeLibrary { path: lib.to_path_buf(), reason: "file does not exist".into() });
        }
        let builder = ort::init_from(lib)
            .map_err(|e| EngineError::RuntimeLibrary { path: lib.to_path_buf(), reason: e.to_string() })?;
        let env = builder
            .with_name("kiln")
            .with_telemetry(false)
            .build()
            .map_err(|e| EngineError::RuntimeLibrary { path: lib.to_path_buf(), reason: e.to_string() })?;
        let runtime = Self { env, library: lib.to_path_buf() };
        *slot = Some((lib.to_path_buf(), runtime.clone()));
        Ok(runtime)
    }

    /// The library this runtime was loaded from.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Whether `provider` can run with this runtime on this machine (see [`probe::check`]).
    pub fn check_provider(&self, provider: &Provider) -> Result<(), EngineError> {
        probe::check(provider, &self.library)
            .map_err(|e| EngineError::ProviderUnavailable { provider: provider.ort_name(), detail: e.to_string() })
    }
}

/// Options for one ONNX Runtime session.
#[derive(Debug, Clone, Default)]
pub struct OrtOptions {
    /// Threads used inside one operator; 0 lets ONNX Runtime decide (one per core).
    pub intra_threads: usize,
    pub provider: Provider,
    /// Largest batch the session will see: the default top of TensorRT's batch profile.
    pub max_batch: usize,
}

#[derive(Debug)]
pub struct OrtBackend {
    session: Session,
    metadata: ModelMetadata,
    name: &'static str,
    precision: &'static str,
    trt_cache: Option<PathBuf>,
}

/// The providers to register, in priority order, after checking each can run here, and
/// the TensorRT set-up when TensorRT is one of them.
fn execution_providers(
    runtime: &OrtRuntime,
    model: &Path,
    options: &OrtOptions,
) -> Result<(Vec<ExecutionProviderDispatch>, Option<TrtSetup>), EngineError> {
    let cuda = |c: &CudaOptions| {
        let mut ep = ort::ep::CUDA::default();
        for (k, v) in providers::cuda_options(c) {
            ep = ep.with_arbitrary_config(k, v);
        }
        // Registration errors must surface: the default is a silent CPU fallback.
        ep.build().error_on_failure()
    };
    match &options.provider {
        Provider::Cpu => Ok((Vec::new(), None)),
        p @ Provider::Cuda(c) => {
            runtime.check_provider(p)?;
            Ok((vec![cuda(c)], None))
        }
        p @ Provider::TensorRt(t, c) => {
            runtime.check_provider(p)?;
            let behind = CudaOptions { device_id: t.device_id, ..c.clone() };
            if t.cuda_fallback {
                runtime.check_provider(&Provider::Cuda(behind.clone()))?;
            }
            let env = probe::environment(t.device_id, runtime.library())
                .map_err(|e| EngineError::ProviderUnavailable { provider: p.ort_name(), detail: e.to_string() })?;
            let setup = providers::prepare_tensorrt(t, model, options.max_batch, &env)?;
            let mut ep = ort::ep::TensorRT::default();
            for (k, v) in &setup.options {
                ep = ep.with_arbitrary_config(k, v);
            }
            let mut eps = vec![ep.build().error_on_failure()];
            if t.cuda_fallback {
                eps.push(cuda(&behind));
            }
            Ok((eps, Some(setup)))
        }
    }
}

/// An exclusive lock on `path`, released when the file is dropped.
fn lock_file(path: &Path) -> Result<std::fs::File, EngineError> {
    let err = |e: std::io::Error| EngineError::ModelLoad { path: path.to_path_buf(), reason: e.to_string() };
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(err)?;
    file.lock().map_err(err)?;
    Ok(file)
}

impl OrtBackend {
    pub fn load(runtime: &OrtRuntime, model: &Path, options: &OrtOptions) -> Result<Self, EngineError> {
        if !model.is_file() {
            return Err(EngineError::ModelNotFound { path: model.to_path_buf() });
        }
        let load_err =
            |e: &dyn std::fmt::Display| EngineError::ModelLoad { path: model.to_path_buf(), reason: e.to_string() };
        let (eps, trt) = execution_providers(runtime, model, options)?;
        // TensorRT builds or deserialises its engines while the session is created and at
        // its first run; the lock keeps other sessions (executors, replicas, `kiln build`)
        // sharing the cache from reading an engine that is still being written.
        let lock = trt.as_ref().map(|setup| lock_file(&setup.lock_file())).transpose()?;
        let mut builder = Session::builder(&runtime.env).map_err(|e| load_err(&e))?;
        builder = builder.with_optimization_level(GraphOptimizationLevel::All).map_err(|e| load_err(&e))?;
        if !eps.is_empty() {
            let provider = options.provider.ort_name();
            builder = builder.with_execution_providers(eps).map_err(|e| EngineError::ProviderUnavailable {
                provider,
                detail: format!("ONNX Runtime refused to register it: {e}"),
            })?;
        }
        if matches!(&options.provider, Provider::TensorRt(t, _) if !t.cuda_fallback) {
            // Without the CUDA provider behind it, what TensorRT rejects would run on the CPU.
            builder = builder.with_disable_cpu_fallback().map_err(|e| load_err(&e))?;
        }
        if options.intra_threads > 0 {
            builder = builder.with_intra_threads(options.intra_threads).map_err(|e| load_err(&e))?;
        }
        let session = builder.commit_from_file(model).map_err(|e| load_err(&e))?;
        let inputs = session.inputs().iter().map(|o| spec(o.name(), o.dtype())).collect::<Result<_, _>>()?;
        let outputs = session.outputs().iter().map(|o| spec(o.name(), o.dtype())).collect::<Result<_, _>>()?;
        let mut backend = Self {
            session,
            metadata: ModelMetadata { inputs, outputs },
            name: options.provider.backend_name(),
            precision: options.provider.precision(),
            trt_cache: trt.as_ref().map(|t| t.cache_dir.clone()),
        };
        if let Some(setup) = &trt {
            let zeros = backend
                .metadata
                .inputs
                .iter()
                .map(|s| Tensor::zeros(s.dtype, s.concrete_shape(setup.min_batch, setup.min_seq)))
                .collect::<Result<Vec<_>, _>>()?;
            backend.run(&zeros).map_err(|e| load_err(&format!("TensorRT's first run failed: {e}")))?;
        }
        drop(lock);
        Ok(backend)
    }

    /// The TensorRT engine cache directory of this session (TensorRT provider only).
    pub fn engine_cache_dir(&self) -> Option<&Path> {
        self.trt_cache.as_deref()
    }
}

fn spec(name: &str, ty: &ValueType) -> Result<TensorSpec, EngineError> {
    let ValueType::Tensor { ty, shape, .. } = ty else {
        return Err(EngineError::Unsupported { what: "value type", detail: format!("{name}: {ty:?}") });
    };
    let dtype = dtype_from_ort(*ty)
        .ok_or_else(|| EngineError::Unsupported { what: "element type", detail: format!("{name}: {ty:?}") })?;
    let shape = shape.iter().map(|&d| usize::try_from(d).map(Dim::Fixed).unwrap_or(Dim::Dynamic)).collect();
    Ok(TensorSpec { name: name.to_string(), dtype, shape })
}

fn dtype_from_ort(ty: TensorElementType) -> Option<DType> {
    Some(match ty {
        TensorElementType::Bool => DType::Bool,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Int8 => DType::I8,
        TensorElementType::Int16 => DType::I16,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::String => DType::Bytes,
        _ => return None,
    })
}

fn view<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
    shape: Vec<i64>,
    data: &[T],
) -> Result<SessionInputValue<'_>, EngineError> {
    TensorRef::from_array_view((shape, data)).map(SessionInputValue::from).map_err(EngineError::inference)
}

fn input_value<'a>(tensor: &'a Tensor, name: &str) -> Result<SessionInputValue<'a>, EngineError> {
    let shape: Vec<i64> = tensor.shape().iter().map(|&d| i64::try_from(d).unwrap_or(i64::MAX)).collect();
    match tensor.data() {
        // ONNX strings are UTF-8; the owned copy is unavoidable for string tensors.
        TensorData::Bytes(items) => {
            let strings =
                items.iter().map(|b| String::from_utf8(b.clone())).collect::<Result<Vec<_>, _>>().map_err(|_| {
                    EngineError::InvalidInput { name: name.into(), reason: "BYTES element is not UTF-8".into() }
                })?;
            ort::value::Tensor::from_string_array((shape, strings.as_slice()))
                .map(SessionInputValue::from)
                .map_err(EngineError::inference)
        }
        TensorData::Bool(v) => view(shape, v),
        TensorData::U8(v) => view(shape, v),
        TensorData::I8(v) => view(shape, v),
        TensorData::I16(v) => view(shape, v),
        TensorData::I32(v) => view(shape, v),
        TensorData::I64(v) => view(shape, v),
        TensorData::F16(v) => view(shape, v),
        TensorData::F32(v) => view(shape, v),
        TensorData::F64(v) => view(shape, v),
    }
}

fn output_tensor(value: &DynValue, spec: &TensorSpec) -> Result<Tensor, EngineError> {
    fn extract<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug>(
        value: &DynValue,
    ) -> Result<(Vec<usize>, Vec<T>), EngineError> {
        let (shape, data) = value.try_extract_tensor::<T>().map_err(EngineError::inference)?;
        let shape = shape.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
        Ok((shape, data.to_vec()))
    }
    let (shape, data) = match spec.dtype {
        DType::Bool => extract::<bool>(value).map(|(s, d)| (s, TensorData::Bool(d)))?,
        DType::U8 => extract::<u8>(value).map(|(s, d)| (s, TensorData::U8(d)))?,
        DType::I8 => extract::<i8>(value).map(|(s, d)| (s, TensorData::I8(d)))?,
        DType::I16 => extract::<i16>(value).map(|(s, d)| (s, TensorData::I16(d)))?,
        DType::I32 => extract::<i32>(value).map(|(s, d)| (s, TensorData::I32(d)))?,
        DType::I64 => extract::<i64>(value).map(|(s, d)| (s, TensorData::I64(d)))?,
        DType::F16 => extract::<half::f16>(value).map(|(s, d)| (s, TensorData::F16(d)))?,
        DType::Bytes => {
            let (shape, strings) = value.try_extract_strings().map_err(EngineError::inference)?;
            let shape = shape.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
            (shape, TensorData::Bytes(strings.into_iter().map(String::into_bytes).collect()))
        }
        DType::F32 => extract::<f32>(value).map(|(s, d)| (s, TensorData::F32(d)))?,
        DType::F64 => extract::<f64>(value).map(|(s, d)| (s, TensorData::F64(d)))?,
    };
    Tensor::new(shape, data)
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn precision(&self) -> &'static str {
        self.precision
    }

    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        let specs = &self.metadata.inputs;
        if inputs.len() != specs.len() {
            return Err(EngineError::InputCount { expected: specs.len(), got: inputs.len() });
        }
        let mut feed: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (tensor, spec) in inputs.iter().zip(specs) {
            if tensor.dtype() != spec.dtype {
                return Err(EngineError::DTypeMismatch { expected: spec.dtype, got: tensor.dtype() });
            }
            check_shape(tensor, spec)?;
            feed.push((Cow::Borrowed(spec.name.as_str()), input_value(tensor, &spec.name)?));
        }
        let outputs = self.session.run(feed).map_err(EngineError::inference)?;
        self.metadata
            .outputs
            .iter()
            .map(|spec| {
                let value = outputs
                    .get(&spec.name)
                    .ok_or_else(|| EngineError::Inference(format!("output {} missing", spec.name)))?;
                output_tensor(value, spec)
            })
            .collect()
    }
}

fn check_shape(tensor: &Tensor, spec: &TensorSpec) -> Result<(), EngineError> {
    let ok = tensor.shape().len() == spec.shape.len()
        && tensor.shape().iter().zip(&spec.shape).all(|(&got, want)| match want {
            Dim::Fixed(n) => got == *n,
            Dim::Dynamic => true,
        });
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidInput {
            name: spec.name.clone(),
            reason: format!("shape {:?} does not match {:?}", tensor.shape(), spec.shape_i64()),
        })
    }
}
