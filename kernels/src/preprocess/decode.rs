//! JPEG/PNG decoding on a CPU thread pool straight into a (pinned) staging buffer, laid
//! out as the preprocessing kernel reads it, so a batch goes file bytes → pinned memory →
//! device with no intermediate image copies.

use rayon::prelude::*;

use super::Spec;
use super::gpu::BatchLayout;
use crate::KernelError;

/// Decodes `files` (JPEG or PNG) into `dst` as packed RGB at the offsets of the returned
/// layout, one rayon task per image. Headers are read first to lay the batch out; an
/// undecodable file or a batch larger than `dst` is an error naming the image.
pub fn decode_batch_into(files: &[&[u8]], spec: &Spec, dst: &mut [u8]) -> Result<BatchLayout, KernelError> {
    let sizes = files
        .par_iter()
        .enumerate()
        .map(|(i, f)| kiln_image::dimensions(f).map_err(|e| KernelError::InvalidArgument(format!("image {i}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let layout = BatchLayout::for_sizes(&sizes, spec)?;
    if dst.len() < layout.bytes() {
        return Err(KernelError::InvalidArgument(format!(
            "{} images need {} bytes of staging, the buffer has {}",
            files.len(),
            layout.bytes(),
            dst.len()
        )));
    }
    // Disjoint per-image chunks of the staging buffer, so the decodes run in parallel.
    let mut chunks = Vec::with_capacity(files.len());
    let mut rest = &mut dst[..layout.bytes()];
    for &(w, h) in &sizes {
        let (chunk, tail) = rest.split_at_mut(w as usize * h as usize * 3);
        chunks.push(chunk);
        rest = tail;
    }
    files.par_iter().zip(chunks).enumerate().try_for_each(|(i, (f, chunk))| {
        kiln_image::decode_rgb_into(f, chunk)
            .map(drop)
            .map_err(|e| KernelError::InvalidArgument(format!("image {i}: {e}")))
    })?;
    Ok(layout)
}
