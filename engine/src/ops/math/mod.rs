//! Elementwise math, reductions and normalisation. The strided walker below is
//! shared by broadcasting binary ops and reductions so that both run in tight
//! contiguous inner loops instead of per-element index arithmetic.
//!
//! Fused ops should take their scalar activations from [`unary`] (`gelu`,
//! `gelu_tanh`, `sigmoid`) and [`erf`] so fused and unfused graphs agree.

mod binary;
mod clip;
pub(crate) mod erf;
mod layer_norm;
mod quantize;
mod reduce;
pub(crate) mod softmax;
pub(crate) mod unary;

use super::Registry;

pub(crate) fn register(r: &mut Registry) {
    binary::register(r);
    unary::register(r);
    r.add(clip::Clip);
    r.add(softmax::Softmax);
    reduce::register(r);
    r.add(layer_norm::LayerNormalization);
    r.add(quantize::QuantizeLinear);
    r.add(quantize::DequantizeLinear);
}

/// Calls `f(a_offset, b_offset, len, a_step, b_step)` for every innermost run
/// of a row-major walk over `dims`, where `sa`/`sb` are the two operands'
/// strides (0 on broadcast axes). Size-1 axes are dropped and adjacent axes
/// merged wherever both operands allow, so runs are as long as possible.
pub(crate) fn for_each_run(
    dims: &[usize],
    sa: &[usize],
    sb: &[usize],
    mut f: impl FnMut(usize, usize, usize, usize, usize),
) {
    if dims.contains(&0) {
        return;
    }
    let mut d: Vec<(usize, usize, usize)> = Vec::with_capacity(dims.len());
    for ((&n, &a), &b) in dims.iter().zip(sa).zip(sb) {
        if n == 1 {
            continue;
        }
        match d.last_mut() {
            Some(last) if last.1 == a * n && last.2 == b * n => *last = (last.0 * n, a, b),
            _ => d.push((n, a, b)),
        }
    }
    let Some(&(inner, da, db)) = d.last() else {
        f(0, 0, 1, 0, 0);
        return;
    };
    let outer = &d[..d.len() - 1];
    let mut idx = vec![0usize; outer.len()];
    let (mut oa, mut ob) = (0usize, 0usize);
    loop {
        f(oa, ob, inner, da, db);
        let mut k = outer.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            let (n, a, b) = outer[k];
            idx[k] += 1;
            oa += a;
            ob += b;
            if idx[k] < n {
                break;
            }
            oa -= a * n;
            ob -= b * n;
            idx[k] = 0;
        }
    }
}

/// Product of dims, or an error when it overflows.
pub(crate) fn checked_numel(dims: &[usize]) -> Result<usize, String> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| format!("shape {dims:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::util::broadcast_strides;

    #[test]
    fn runs_merge_axes_and_cover_every_position() {
        // [2, 3, 4] against a [2, 3, 1] operand: the last axis is the run, the
        // first two merge into 6 outer steps.
        let dims = [2, 3, 4];
        let sa = broadcast_strides(&dims, &dims);
        let sb = broadcast_strides(&[2, 3, 1], &dims);
        let mut seen = Vec::new();
        for_each_run(&dims, &sa, &sb, |oa, ob, n, da, db| seen.push((oa, ob, n, da, db)));
        assert_eq!(seen.len(), 6);
        assert_eq!(seen[0], (0, 0, 4, 1, 0));
        assert_eq!(seen[5], (20, 5, 4, 1, 0));
        let mut all = 0;
        for_each_run(&dims, &sa, &sa, |_, _, n, _, _| all += n);
        assert_eq!(all, 24);
        let mut scalar = Vec::new();
        for_each_run(&[], &[], &[], |oa, ob, n, _, _| scalar.push((oa, ob, n)));
        assert_eq!(scalar, vec![(0, 0, 1)]);
        let mut empty = 0;
        for_each_run(&[3, 0], &[0, 1], &[0, 1], |_, _, _, _, _| empty += 1);
        assert_eq!(empty, 0);
        assert!(checked_numel(&[usize::MAX, 2]).is_err());
    }
}
