//! ONNX models without protoc or Python: hand-written prost messages for the part of
//! `onnx.proto` kiln needs ([`proto`]), a [`GraphBuilder`] for the exporter, and
//! encode/decode/save/load helpers for both the exporter and a future importer.

mod builder;
mod error;
pub mod proto;

use std::path::Path;

use prost::Message;

pub use builder::{
    DEFAULT_OPSET, Dim, GraphBuilder, IR_VERSION, attr_float, attr_floats, attr_int, attr_ints, attr_string,
    attr_tensor, tensor_f32, tensor_i8, tensor_i64, value_info,
};
pub use error::OnnxError;
pub use proto::attribute_proto::AttributeType;
pub use proto::tensor_proto::DataType;
pub use proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// Serializes a model to protobuf bytes (the `.onnx` file format).
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Parses protobuf bytes into a model. Fields outside kiln's subset are skipped.
pub fn decode(bytes: &[u8]) -> Result<ModelProto, OnnxError> {
    Ok(ModelProto::decode(bytes)?)
}

/// Writes a model to `path`.
pub fn save(model: &ModelProto, path: impl AsRef<Path>) -> Result<(), OnnxError> {
    let path = path.as_ref();
    std::fs::write(path, encode(model)).map_err(|source| OnnxError::Io { path: path.to_path_buf(), source })
}

/// Reads a model from `path`.
pub fn load(path: impl AsRef<Path>) -> Result<ModelProto, OnnxError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Io { path: path.to_path_buf(), source })?;
    decode(&bytes)
}

impl TensorProto {
    /// The elements of an FP32 tensor, from `raw_data` or `float_data`. External data is not read.
    pub fn to_f32(&self) -> Result<Vec<f32>, OnnxError> {
        self.expect_type(DataType::Float)?;
        if self.raw_data.is_empty() {
            return Ok(self.float_data.clone());
        }
        Ok(self.raw_chunks::<4>()?.map(f32::from_le_bytes).collect())
    }

    /// The elements of an INT64 tensor, from `raw_data` or `int64_data`. External data is not read.
    pub fn to_i64(&self) -> Result<Vec<i64>, OnnxError> {
        self.expect_type(DataType::Int64)?;
        if self.raw_data.is_empty() {
            return Ok(self.int64_data.clone());
        }
        Ok(self.raw_chunks::<8>()?.map(i64::from_le_bytes).collect())
    }

    fn expect_type(&self, want: DataType) -> Result<(), OnnxError> {
        if self.data_type != want as i32 {
            return Err(OnnxError::Invalid(format!(
                "tensor {:?} has data type {:?}, not {want:?}",
                self.name,
                DataType::try_from(self.data_type)
            )));
        }
        if self.data_location == proto::tensor_proto::DataLocation::External as i32 {
            return Err(OnnxError::Invalid(format!("tensor {:?} keeps its data in an external file", self.name)));
        }
        Ok(())
    }

    fn raw_chunks<const N: usize>(&self) -> Result<impl Iterator<Item = [u8; N]> + '_, OnnxError> {
        if !self.raw_data.len().is_multiple_of(N) {
            return Err(OnnxError::Invalid(format!(
                "tensor {:?}: raw_data length {} is not a multiple of {N}",
                self.name,
                self.raw_data.len()
            )));
        }
        // chunks_exact yields exactly N bytes, so the conversion cannot fail.
        Ok(self.raw_data.chunks_exact(N).map(|c| <[u8; N]>::try_from(c).unwrap_or([0; N])))
    }
}
