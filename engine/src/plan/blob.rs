//! The weight blob: each constant tensor little-endian at a 64-byte-aligned
//! offset. FP32 weights whose storage is FP16 are written as half precision;
//! BYTES elements are a u64 length followed by the bytes.

use half::f16;

use crate::{DType, Tensor, TensorData};

/// Alignment of every tensor in the blob (and of the blob in the file), so a
/// device loader can copy or map weights without realigning them.
pub const ALIGN: usize = 64;

/// Appends `t` to `blob` at the next aligned offset; returns (offset, bytes).
pub fn write(blob: &mut Vec<u8>, t: &Tensor, stored: DType) -> (usize, usize) {
    let offset = blob.len().next_multiple_of(ALIGN);
    blob.resize(offset, 0);
    match (t.data(), stored) {
        (TensorData::F32(v), DType::F16) => v.iter().for_each(|x| blob.extend(f16::from_f32(*x).to_le_bytes())),
        (TensorData::Bool(v), _) => blob.extend(v.iter().map(|&b| u8::from(b))),
        (TensorData::U8(v), _) => blob.extend_from_slice(v),
        (TensorData::I8(v), _) => blob.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        (TensorData::I16(v), _) => blob.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        (TensorData::I32(v), _) => blob.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        (TensorData::I64(v), _) => blob.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        (TensorData::F16(v), _) => blob.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        (TensorData::F32(v), _) => blob.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        (TensorData::F64(v), _) => blob.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        (TensorData::Bytes(v), _) => {
            for s in v {
                blob.extend((s.len() as u64).to_le_bytes());
                blob.extend_from_slice(s);
            }
        }
    }
    (offset, blob.len() - offset)
}

/// Decodes `bytes` as `numel` elements stored as `stored`, widened to `dtype`
/// (only FP16 → FP32 widens). Every length is checked before allocating.
pub fn read(bytes: &[u8], dtype: DType, stored: DType, shape: Vec<usize>) -> Result<Tensor, String> {
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let data = match stored.size_of() {
        Some(size) => {
            let want = numel.checked_mul(size).ok_or_else(|| format!("shape {shape:?} overflows"))?;
            if bytes.len() != want {
                return Err(format!(
                    "{} bytes do not hold {numel} {stored} elements (shape {shape:?}, need {want})",
                    bytes.len()
                ));
            }
            fixed(bytes, dtype, stored)?
        }
        None => TensorData::Bytes(strings(bytes, numel)?),
    };
    if data.dtype() != dtype {
        return Err(format!("elements stored as {stored} cannot be loaded as {dtype}"));
    }
    Tensor::new(shape, data).map_err(|e| e.to_string())
}

fn fixed(bytes: &[u8], dtype: DType, stored: DType) -> Result<TensorData, String> {
    fn le<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
    }
    Ok(match (stored, dtype) {
        (DType::F16, DType::F32) => TensorData::F32(le(bytes, |b| f16::from_le_bytes(b).to_f32())),
        (DType::Bool, _) => {
            if let Some(b) = bytes.iter().find(|&&b| b > 1) {
                return Err(format!("BOOL element holds {b}, not 0 or 1"));
            }
            TensorData::Bool(bytes.iter().map(|&b| b == 1).collect())
        }
        (DType::U8, _) => TensorData::U8(bytes.to_vec()),
        (DType::I8, _) => TensorData::I8(le(bytes, i8::from_le_bytes)),
        (DType::I16, _) => TensorData::I16(le(bytes, i16::from_le_bytes)),
        (DType::I32, _) => TensorData::I32(le(bytes, i32::from_le_bytes)),
        (DType::I64, _) => TensorData::I64(le(bytes, i64::from_le_bytes)),
        (DType::F16, _) => TensorData::F16(le(bytes, f16::from_le_bytes)),
        (DType::F32, _) => TensorData::F32(le(bytes, f32::from_le_bytes)),
        (DType::F64, _) => TensorData::F64(le(bytes, f64::from_le_bytes)),
        (DType::Bytes, _) => return Err("BYTES elements have no fixed size".into()),
    })
}

fn strings(bytes: &[u8], numel: usize) -> Result<Vec<Vec<u8>>, String> {
    // Each element takes at least its 8-byte length, which bounds the allocation.
    if numel > bytes.len() / 8 {
        return Err(format!("{} bytes cannot hold {numel} BYTES elements", bytes.len()));
    }
    let mut out = Vec::with_capacity(numel);
    let mut rest = bytes;
    for i in 0..numel {
        let (len, tail) = rest.split_first_chunk::<8>().ok_or_else(|| format!("BYTES element {i} is truncated"))?;
        let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| format!("BYTES element {i} is too long"))?;
        if len > tail.len() {
            return Err(format!("BYTES element {i} claims {len} bytes, {} remain", tail.len()));
        }
        let (s, tail) = tail.split_at(len);
        out.push(s.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes left after the last BYTES element", rest.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips_and_lengths_are_checked() -> Result<(), String> {
        let tensors = [
            TensorData::Bool(vec![true, false, true]),
            TensorData::U8(vec![0, 7, 255]),
            TensorData::I8(vec![-128, 0, 127]),
            TensorData::I16(vec![-3, 0, 30000]),
            TensorData::I32(vec![i32::MIN, 1, i32::MAX]),
            TensorData::I64(vec![i64::MIN, -1, i64::MAX]),
            TensorData::F16(vec![f16::from_f32(0.5), f16::NEG_INFINITY, f16::MAX]),
            TensorData::F32(vec![1.5, -0.0, f32::MIN_POSITIVE]),
            TensorData::F64(vec![1e300, -2.5, f64::EPSILON]),
            TensorData::Bytes(vec![b"ab".to_vec(), vec![], b"xyz".to_vec()]),
        ];
        let mut blob = vec![1u8];
        for data in tensors {
            let dtype = data.dtype();
            let t = Tensor::new(vec![3], data).map_err(|e| e.to_string())?;
            let (offset, len) = write(&mut blob, &t, dtype);
            assert_eq!(offset % ALIGN, 0);
            let bytes = &blob[offset..offset + len];
            assert_eq!(read(bytes, dtype, dtype, vec![3])?, t);
            assert!(read(&bytes[..len - 1], dtype, dtype, vec![3]).is_err(), "{dtype} short");
            assert!(read(bytes, dtype, dtype, vec![4]).is_err(), "{dtype} wrong shape");
        }
        Ok(())
    }

    #[test]
    fn fp16_storage_rounds_and_widens() -> Result<(), String> {
        let t = Tensor::new(vec![2], TensorData::F32(vec![0.1, 70000.0])).map_err(|e| e.to_string())?;
        let mut blob = Vec::new();
        let (o, n) = write(&mut blob, &t, DType::F16);
        assert_eq!(n, 4);
        let back = read(&blob[o..o + n], DType::F32, DType::F16, vec![2])?;
        let v = back.as_f32().unwrap_or_default();
        assert_eq!(v[0], f16::from_f32(0.1).to_f32());
        assert!(v[1].is_infinite(), "70000 overflows FP16");
        Ok(())
    }

    #[test]
    fn corrupt_elements_are_errors() {
        assert!(read(&[0, 2], DType::Bool, DType::Bool, vec![2]).is_err());
        assert!(read(&[0; 8], DType::I64, DType::I64, vec![usize::MAX, 2]).is_err());
        assert!(read(&[0; 8], DType::I32, DType::F32, vec![2]).is_err());
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.push(1);
        assert!(read(&huge, DType::Bytes, DType::Bytes, vec![1]).is_err());
        assert!(read(&[0; 16], DType::Bytes, DType::Bytes, vec![usize::MAX]).is_err());
        assert!(read(&[0; 9], DType::Bytes, DType::Bytes, vec![1]).is_err(), "trailing byte");
    }
}
