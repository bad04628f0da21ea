use std::fmt;

pub use half::f16;

use crate::EngineError;

/// Element types a kiln tensor can hold. Later backends (CUDA, TensorRT) add
/// reduced-precision types here rather than inventing their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    /// Variable-length byte strings (KServe `BYTES`, ONNX `string`).
    Bytes,
}

impl DType {
    /// Bytes per element; `None` for variable-length `Bytes`.
    pub fn size_of(self) -> Option<usize> {
        match self {
            Self::Bool | Self::U8 | Self::I8 => Some(1),
            Self::I16 | Self::F16 => Some(2),
            Self::I32 | Self::F32 => Some(4),
            Self::I64 | Self::F64 => Some(8),
            Self::Bytes => None,
        }
    }

    /// Parses a KServe v2 datatype name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "BOOL" => Self::Bool,
            "UINT8" => Self::U8,
            "INT8" => Self::I8,
            "INT16" => Self::I16,
            "INT32" => Self::I32,
            "INT64" => Self::I64,
            "FP16" => Self::F16,
            "FP32" => Self::F32,
            "FP64" => Self::F64,
            "BYTES" => Self::Bytes,
            _ => return None,
        })
    }

    /// The name used by the KServe v2 protocol and in model configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "UINT8",
            Self::I8 => "INT8",
            Self::I16 => "INT16",
            Self::I32 => "INT32",
            Self::I64 => "INT64",
            Self::F16 => "FP16",
            Self::F32 => "FP32",
            Self::F64 => "FP64",
            Self::Bytes => "BYTES",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Typed, contiguous, row-major storage.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<f16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

/// Runs `$body` with `$v` bound to the inner `Vec` of whichever variant `$data` is.
macro_rules! with_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Bool($v) => $body,
            TensorData::U8($v) => $body,
            TensorData::I8($v) => $body,
            TensorData::I16($v) => $body,
            TensorData::I32($v) => $body,
            TensorData::I64($v) => $body,
            TensorData::F16($v) => $body,
            TensorData::F32($v) => $body,
            TensorData::F64($v) => $body,
            TensorData::Bytes($v) => $body,
        }
    };
}

/// Same as [`with_data!`] but rebuilds the same variant from the expression's `Vec`.
macro_rules! map_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Bool($v) => TensorData::Bool($body),
            TensorData::U8($v) => TensorData::U8($body),
            TensorData::I8($v) => TensorData::I8($body),
            TensorData::I16($v) => TensorData::I16($body),
            TensorData::I32($v) => TensorData::I32($body),
            TensorData::I64($v) => TensorData::I64($body),
            TensorData::F16($v) => TensorData::F16($body),
            TensorData::F32($v) => TensorData::F32($body),
            TensorData::F64($v) => TensorData::F64($body),
            TensorData::Bytes($v) => TensorData::Bytes($body),
        }
    };
}

impl TensorData {
    pub fn dtype(&self) -> DType {
        match self {
            Self::Bool(_) => DType::Bool,
            Self::U8(_) => DType::U8,
            Self::I8(_) => DType::I8,
            Self::I16(_) => DType::I16,
            Self::I32(_) => DType::I32,
            Self::I64(_) => DType::I64,
            Self::F16(_) => DType::F16,
            Self::F32(_) => DType::F32,
            Self::F64(_) => DType::F64,
            Self::Bytes(_) => DType::Bytes,
        }
    }

    pub fn len(&self) -> usize {
        with_data!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn with_capacity(dtype: DType, n: usize) -> Self {
        match dtype {
            DType::Bool => Self::Bool(Vec::with_capacity(n)),
            DType::U8 => Self::U8(Vec::with_capacity(n)),
            DType::I8 => Self::I8(Vec::with_capacity(n)),
            DType::I16 => Self::I16(Vec::with_capacity(n)),
            DType::I32 => Self::I32(Vec::with_capacity(n)),
            DType::I64 => Self::I64(Vec::with_capacity(n)),
            DType::F16 => Self::F16(Vec::with_capacity(n)),
            DType::F32 => Self::F32(Vec::with_capacity(n)),
            DType::F64 => Self::F64(Vec::with_capacity(n)),
            DType::Bytes => Self::Bytes(Vec::with_capacity(n)),
        }
    }

    /// Appends `other`, which must have the same dtype.
    fn extend_from(&mut self, other: &TensorData) -> Result<(), EngineError> {
        let (expected, got) = (self.dtype(), other.dtype());
        match (self, other) {
            (Self::Bool(a), Self::Bool(b)) => a.extend_from_slice(b),
            (Self::U8(a), Self::U8(b)) => a.extend_from_slice(b),
            (Self::I8(a), Self::I8(b)) => a.extend_from_slice(b),
            (Self::I16(a), Self::I16(b)) => a.extend_from_slice(b),
            (Self::I32(a), Self::I32(b)) => a.extend_from_slice(b),
            (Self::I64(a), Self::I64(b)) => a.extend_from_slice(b),
            (Self::F16(a), Self::F16(b)) => a.extend_from_slice(b),
            (Self::F32(a), Self::F32(b)) => a.extend_from_slice(b),
            (Self::F64(a), Self::F64(b)) => a.extend_from_slice(b),
            (Self::Bytes(a), Self::Bytes(b)) => a.extend_from_slice(b),
            _ => return Err(EngineError::DTypeMismatch { expected, got }),
        }
        Ok(())
    }

    fn slice(&self, start: usize, end: usize) -> TensorData {
        map_data!(self, v => v[start..end].to_vec())
    }
}

/// A dense tensor: shape plus typed data, row-major. The first axis is the batch axis
/// wherever a model has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self, EngineError> {
        let elements = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if elements != Some(data.len()) {
            return Err(EngineError::ShapeMismatch { shape, len: data.len() });
        }
        Ok(Self { shape, data })
    }

    /// A tensor of zeros (false, empty strings) of the given dtype and shape.
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Self, EngineError> {
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| EngineError::ShapeMismatch { shape: shape.clone(), len: 0 })?;
        let data = match dtype {
            DType::Bool => TensorData::Bool(vec![false; n]),
            DType::U8 => TensorData::U8(vec![0; n]),
            DType::I8 => TensorData::I8(vec![0; n]),
            DType::I16 => TensorData::I16(vec![0; n]),
            DType::I32 => TensorData::I32(vec![0; n]),
            DType::I64 => TensorData::I64(vec![0; n]),
            DType::F16 => TensorData::F16(vec![f16::ZERO; n]),
            DType::F32 => TensorData::F32(vec![0.0; n]),
            DType::F64 => TensorData::F64(vec![0.0; n]),
            DType::Bytes => TensorData::Bytes(vec![Vec::new(); n]),
        };
        Tensor::new(shape, data)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    pub fn into_data(self) -> TensorData {
        self.data
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Size of the leading (batch) axis; 1 for a scalar.
    pub fn batch(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Concatenates tensors along axis 0. All parts must agree on dtype and on every
    /// other axis; this is the single copy a request's data makes into a batch.
    pub fn concat_batch(parts: &[&Tensor]) -> Result<Tensor, EngineError> {
        let Some(first) = parts.first() else {
            return Err(EngineError::InvalidInput { name: "batch".into(), reason: "no tensors to concatenate".into() });
        };
        let inner = first.shape.get(1..).unwrap_or(&[]);
        let total_batch: usize = parts.iter().map(|t| t.batch()).sum();
        let total_len: usize = parts.iter().map(|t| t.data.len()).sum();
        let mut data = TensorData::with_capacity(first.dtype(), total_len);
        for part in parts {
            if part.shape.get(1..).unwrap_or(&[]) != inner {
                return Err(EngineError::InvalidInput {
                    name: "batch".into(),
                    reason: format!("shape {:?} does not stack with {:?}", part.shape, first.shape),
                });
            }
            data.extend_from(&part.data)?;
        }
        let mut shape = vec![total_batch];
        shape.extend_from_slice(inner);
        Tensor::new(shape, data)
    }

    /// Splits along axis 0 into consecutive pieces of the given batch sizes.
    pub fn split_batch(&self, sizes: &[usize]) -> Result<Vec<Tensor>, EngineError> {
        let total: usize = sizes.iter().sum();
        if self.shape.is_empty() || total != self.batch() {
            return Err(EngineError::ShapeMismatch { shape: self.shape.clone(), len: total });
        }
        let row: usize = self.shape[1..].iter().product();
        let mut start = 0;
        sizes
            .iter()
            .map(|&n| {
                let end = start + n * row;
                let mut shape = self.shape.clone();
                shape[0] = n;
                let piece = Tensor { shape, data: self.data.slice(start, end) };
                start = end;
                Ok(piece)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_wrong_element_count() {
        assert!(Tensor::new(vec![2, 3], TensorData::F32(vec![0.0; 5])).is_err());
        assert!(Tensor::new(vec![2, 3], TensorData::F32(vec![0.0; 6])).is_ok());
        assert!(Tensor::new(vec![usize::MAX, 3], TensorData::F32(vec![])).is_err());
    }

    #[test]
    fn concat_then_split_round_trips() -> Result<(), EngineError> {
        let a = Tensor::new(vec![1, 2], TensorData::I64(vec![1, 2]))?;
        let b = Tensor::new(vec![2, 2], TensorData::I64(vec![3, 4, 5, 6]))?;
        let batch = Tensor::concat_batch(&[&a, &b])?;
        assert_eq!(batch.shape(), &[3, 2]);
        assert_eq!(batch.data(), &TensorData::I64(vec![1, 2, 3, 4, 5, 6]));
        let parts = batch.split_batch(&[1, 2])?;
        assert_eq!(parts, vec![a, b]);
        Ok(())
    }

    #[test]
    fn concat_rejects_mismatched_parts() -> Result<(), EngineError> {
        let a = Tensor::new(vec![1, 2], TensorData::F32(vec![1.0, 2.0]))?;
        let b = Tensor::new(vec![1, 3], TensorData::F32(vec![1.0, 2.0, 3.0]))?;
        let c = Tensor::new(vec![1, 2], TensorData::I32(vec![1, 2]))?;
        assert!(Tensor::concat_batch(&[&a, &b]).is_err());
        assert!(matches!(Tensor::concat_batch(&[&a, &c]), Err(EngineError::DTypeMismatch { .. })));
        assert!(Tensor::concat_batch(&[]).is_err());
        Ok(())
    }

    #[test]
    fn fp16_and_bytes_concat_and_split() -> Result<(), EngineError> {
        let a = Tensor::new(vec![1], TensorData::F16(vec![f16::from_f32(1.5)]))?;
        let b = Tensor::new(vec![1], TensorData::F16(vec![f16::from_f32(-2.0)]))?;
        let ab = Tensor::concat_batch(&[&a, &b])?;
        assert_eq!(ab.data(), &TensorData::F16(vec![f16::from_f32(1.5), f16::from_f32(-2.0)]));
        let s = Tensor::new(vec![3], TensorData::Bytes(vec![b"x".to_vec(), vec![], b"yz".to_vec()]))?;
        let parts = s.split_batch(&[2, 1])?;
        assert_eq!(parts[1].data(), &TensorData::Bytes(vec![b"yz".to_vec()]));
        assert_eq!(DType::from_name("FP16"), Some(DType::F16));
        assert_eq!(DType::from_name(DType::Bytes.name()), Some(DType::Bytes));
        assert_eq!(DType::Bytes.size_of(), None);
        assert_eq!(DType::from_name("FP8"), None);
        Ok(())
    }

    #[test]
    fn split_rejects_wrong_total() -> Result<(), EngineError> {
        let a = Tensor::new(vec![3, 1], TensorData::U8(vec![1, 2, 3]))?;
        assert!(a.split_batch(&[1, 1]).is_err());
        Ok(())
    }
}
