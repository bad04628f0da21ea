//! kiln-onnx's error type.

use std::path::PathBuf;

/// Why building, encoding, decoding, saving or loading a model failed.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// A graph input, initializer or node output reused a name already in the graph.
    #[error("value name {0:?} is already defined in the graph")]
    DuplicateName(String),
    /// A node input or graph output named a value nothing defines (yet).
    #[error("value {0:?} is not defined in the graph")]
    UnknownValue(String),
    /// Initializer data whose length does not match the product of its dims.
    #[error("initializer {name:?}: {len} elements do not fill dims {dims:?}")]
    DataLength { name: String, dims: Vec<i64>, len: usize },
    /// Anything else the builder refuses (e.g. a negative fixed dimension).
    #[error("invalid graph: {0}")]
    Invalid(String),
    /// Bytes that are not a valid `ModelProto`.
    #[error("decoding ONNX protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Reading or writing a model file.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}
