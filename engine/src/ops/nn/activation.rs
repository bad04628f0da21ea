//! The activations fused ops apply after their GEMM (`activation` attribute of
//! kiln.FusedConv and kiln.Dense). One implementation so the fusion passes only
//! have to set the attribute and every fused op computes the same function.
//! The scalar functions are the unfused ops' own (math::unary), so a fused
//! graph computes exactly what the graph it replaced did.

use crate::graph::Node;
use crate::ops::math::unary::{gelu, gelu_tanh, sigmoid};

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Activation {
    None,
    Relu,
    Clip { min: f32, max: f32 },
    Sigmoid,
    Silu,
    Tanh,
    Gelu,
    GeluTanh,
}

impl Activation {
    /// Reads `activation` (plus `clip_min`/`clip_max` for clip), accepting only
    /// the names in `allowed`.
    pub(crate) fn from_node(node: &Node, allowed: &[&str]) -> Result<Self, String> {
        let name = node.attrs.string("activation", "none")?;
        if !allowed.contains(&name.as_str()) {
            return Err(format!("activation {name:?} is not supported (expected one of {allowed:?})"));
        }
        Ok(match name.as_str() {
            "relu" => Self::Relu,
            "clip" => {
                let min = node.attrs.float("clip_min", f32::NEG_INFINITY)?;
                let max = node.attrs.float("clip_max", f32::INFINITY)?;
                if min.is_nan() || max.is_nan() || min > max {
                    return Err(format!("clip range [{min}, {max}] is empty"));
                }
                Self::Clip { min, max }
            }
            "sigmoid" => Self::Sigmoid,
            "silu" => Self::Silu,
            "tanh" => Self::Tanh,
            "gelu" => Self::Gelu,
            "gelu_tanh" => Self::GeluTanh,
            _ => Self::None,
        })
    }

    pub(crate) fn apply(self, data: &mut [f32]) {
        match self {
            Self::None => {}
            Self::Relu => map(data, |x| if x < 0.0 { 0.0 } else { x }),
            // NaN passes through like ONNX Clip (min/max would swallow it).
            Self::Clip { min, max } => map(data, |x| {
                if x < min {
                    min
                } else if x > max {
                    max
                } else {
                    x
                }
            }),
            Self::Sigmoid => map(data, sigmoid),
            Self::Silu => map(data, |x| x * sigmoid(x)),
            Self::Tanh => map(data, f32::tanh),
            Self::Gelu => map(data, gelu),
            Self::GeluTanh => map(data, gelu_tanh),
        }
    }
}

/// Applies `f` in place in parallel chunks (activations run over whole tensors).
fn map(data: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    use rayon::prelude::*;
    data.par_chunks_mut(1 << 14).for_each(|chunk| {
        // An index loop: at the low optimisation level of test builds iterator
        // adapters cost a call per element.
        let mut i = 0;
        while i < chunk.len() {
            chunk[i] = f(chunk[i]);
            i += 1;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Attr;

    fn node(act: &str) -> Node {
        Node::new("n", "kiln.Dense", vec![], vec![]).with_attr("activation", Attr::String(act.into()))
    }

    #[test]
    fn activations_compute_their_functions() -> Result<(), String> {
        let xs = [-3.0f32, -0.5, 0.0, 0.7, 4.0];
        let run = |n: &Node, allowed: &[&str]| -> Result<Vec<f32>, String> {
            let mut v = xs.to_vec();
            Activation::from_node(n, allowed)?.apply(&mut v);
            Ok(v)
        };
        let all = ["none", "relu", "clip", "sigmoid", "silu", "tanh", "gelu", "gelu_tanh"];
        assert_eq!(run(&node("relu"), &all)?, vec![0.0, 0.0, 0.0, 0.7, 4.0]);
        let clip = node("clip").with_attr("clip_min", Attr::Float(0.0)).with_attr("clip_max", Attr::Float(6.0));
        assert_eq!(run(&clip, &all)?, vec![0.0, 0.0, 0.0, 0.7, 4.0]);
        let clip = node("clip").with_attr("clip_max", Attr::Float(1.0));
        assert_eq!(run(&clip, &all)?, vec![-3.0, -0.5, 0.0, 0.7, 1.0]);
        let sig = run(&node("sigmoid"), &all)?;
        let silu = run(&node("silu"), &all)?;
        let gelu_v = run(&node("gelu"), &all)?;
        let gelu_t = run(&node("gelu_tanh"), &all)?;
        for (i, &x) in xs.iter().enumerate() {
            let s = 1.0 / (1.0 + (-x).exp());
            assert!((sig[i] - s).abs() < 1e-6);
            assert!((silu[i] - x * s).abs() < 1e-6);
            // GELU's two forms agree to ~1e-3 and bracket x·sigmoid(1.702x).
            assert!((gelu_v[i] - gelu_t[i]).abs() < 2e-3, "{x}: {} vs {}", gelu_v[i], gelu_t[i]);
        }
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert_eq!(run(&node("none"), &all)?, xs.to_vec());
        assert!(Activation::from_node(&node("gelu"), &["none", "relu"]).is_err());
        assert!(Activation::from_node(&node("swish"), &all).is_err());
        let bad = node("clip").with_attr("clip_min", Attr::Float(2.0)).with_attr("clip_max", Attr::Float(1.0));
        assert!(Activation::from_node(&bad, &all).is_err());
        Ok(())
    }
}
