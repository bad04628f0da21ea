//! KServe v2 metadata documents: the server's, and each model's (with kiln's `backend`
//! extension naming the backend and precision that serve it).

use kiln_engine::{ModelMetadata, TensorSpec};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ServerMetadata<'a> {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: &'a [&'a str],
}

/// `extensions` lists only what kiln actually implements (e.g. "binary_tensor_data").
pub fn server_metadata<'a>(extensions: &'a [&'a str]) -> ServerMetadata<'a> {
    ServerMetadata { name: "kiln", version: env!("CARGO_PKG_VERSION"), extensions }
}

#[derive(Debug, Serialize)]
pub struct TensorMetadata<'a> {
    pub name: &'a str,
    pub datatype: &'static str,
    /// -1 marks a dynamic axis.
    pub shape: Vec<i64>,
}

impl<'a> From<&'a TensorSpec> for TensorMetadata<'a> {
    fn from(spec: &'a TensorSpec) -> Self {
        Self { name: &spec.name, datatype: spec.dtype.name(), shape: spec.shape_i64() }
    }
}

#[derive(Debug, Serialize)]
pub struct ModelMetadataDoc<'a> {
    pub name: &'a str,
    pub versions: &'a [String],
    pub platform: &'a str,
    pub inputs: Vec<TensorMetadata<'a>>,
    pub outputs: Vec<TensorMetadata<'a>>,
    /// kiln's extension: which backend was asked for and which one actually serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendDoc<'a>>,
}

/// The `backend` object of a model's metadata.
#[derive(Debug, Clone, Serialize)]
pub struct BackendDoc<'a> {
    /// The configured backend (`tensorrt`, `ort-cuda`, `cuda`, `cpu`).
    pub requested: &'a str,
    /// The one serving: `requested`, or the fallback that loaded.
    pub serving: &'a str,
    /// The engine as it names itself (`onnxruntime-tensorrt`, `kiln-cuda`, …).
    pub engine: &'a str,
    pub precision: &'a str,
}

pub fn model_metadata<'a>(
    name: &'a str,
    versions: &'a [String],
    platform: &'a str,
    meta: &'a ModelMetadata,
) -> ModelMetadataDoc<'a> {
    ModelMetadataDoc {
        name,
        versions,
        platform,
        inputs: meta.inputs.iter().map(TensorMetadata::from).collect(),
        outputs: meta.outputs.iter().map(TensorMetadata::from).collect(),
        backend: None,
    }
}
