//! Uint8 image inputs: a model that takes a normalised FP32 image tensor
//! (`[batch, C, H, W]` or `[batch, H, W, C]`) is given a `UINT8 [batch, H, W, C]`
//! input instead — the bytes of a decoded (resized, cropped) image — and
//! normalises on the device: `x · scale + offset` per channel, then the layout
//! change. A quarter of the bytes cross PCIe (150 KB instead of 602 KB for a
//! 224² RGB image), and the normalisation fuses into the first layers; the
//! layout pass cancels the transpose against its own NHWC conversion.

use crate::graph::{Attr, Dim, Graph, GraphError, Node, ValueType};
use crate::{DType, Tensor, TensorData};

/// The normalisation the original model expects of its image input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Uint8Input {
    /// Per channel: `pixel · scale + offset` (e.g. `1/std`, `-mean/std`).
    pub scale: [f32; 3],
    pub offset: [f32; 3],
}

impl Uint8Input {
    /// From the `(pixel − mean) / std` form.
    pub fn from_mean_std(mean: [f32; 3], std: [f32; 3]) -> Result<Self, GraphError> {
        if std.iter().any(|s| !s.is_finite() || *s == 0.0) || mean.iter().any(|m| !m.is_finite()) {
            return Err(GraphError::Invalid(format!(
                "uint8 input: mean {mean:?} / std {std:?} must be finite, std non-zero"
            )));
        }
        Ok(Self { scale: std.map(|s| 1.0 / s), offset: [0, 1, 2].map(|c| -mean[c] / std[c]) })
    }
}

/// Rewrites the graph's only 4-D FP32 input with 3 channels into a UINT8 NHWC
/// input of the same name, followed by Cast → Mul → Add (→ Transpose for an
/// NCHW model) that produce the original tensor for its consumers.
pub fn apply(graph: &mut Graph, norm: &Uint8Input) -> Result<(), GraphError> {
    let err = |m: String| GraphError::Invalid(format!("uint8 input: {m}"));
    let images: Vec<(usize, bool)> = graph
        .inputs
        .iter()
        .enumerate()
        .filter_map(|(k, &v)| {
            let ty = graph.value_type(v)?;
            let shape = ty.shape.as_ref()?;
            let three = Dim::fixed(3);
            (ty.dtype == DType::F32 && shape.len() == 4).then_some(())?;
            if shape[1] == three {
                Some((k, true))
            } else if shape[3] == three {
                Some((k, false))
            } else {
                None
            }
        })
        .collect();
    let [(k, nchw)] = images.as_slice() else {
        return Err(err(format!("expected exactly one FP32 image input with 3 channels, found {}", images.len())));
    };
    let old = graph.inputs[*k];
    let name = graph.values[old].name.clone();
    let shape = graph.shape(old).cloned().ok_or_else(|| err("image input has no shape".into()))?;
    let nhwc: Vec<Dim> = if *nchw {
        vec![shape[0].clone(), shape[2].clone(), shape[3].clone(), shape[1].clone()]
    } else {
        shape.clone()
    };

    // The old input value stays (its id is what consumers read) but is now produced by nodes.
    let renamed = graph.fresh_name(&format!("{name}_normalised"));
    graph.values[old].name = renamed;
    let raw = graph.add_value(name.clone(), Some(ValueType::new(DType::U8, nhwc.clone())));
    graph.inputs[*k] = raw;
    let float_nhwc = Some(ValueType::new(DType::F32, nhwc));
    let cast = graph.add_value(graph.fresh_name(&format!("{name}_f32")), float_nhwc.clone());
    let scaled = graph.add_value(graph.fresh_name(&format!("{name}_scaled")), float_nhwc.clone());
    let channel = |v: [f32; 3]| Tensor::new(vec![3], TensorData::F32(v.to_vec()));
    let scale = channel(norm.scale).map_err(|e| err(e.to_string()))?;
    let offset = channel(norm.offset).map_err(|e| err(e.to_string()))?;
    let scale = graph.add_constant(graph.fresh_name(&format!("{name}_scale")), scale);
    let offset = graph.add_constant(graph.fresh_name(&format!("{name}_offset")), offset);
    let normalised = if *nchw { graph.add_value(graph.fresh_name(&format!("{name}_nhwc")), float_nhwc) } else { old };
    let mut nodes = vec![
        Node::new(format!("{name}_to_float"), "Cast", vec![Some(raw)], vec![cast]).with_attr("to", Attr::Int(1)),
        Node::new(format!("{name}_scale"), "Mul", vec![Some(cast), Some(scale)], vec![scaled]),
        Node::new(format!("{name}_offset"), "Add", vec![Some(scaled), Some(offset)], vec![normalised]),
    ];
    if *nchw {
        nodes.push(
            Node::new(format!("{name}_to_nchw"), "Transpose", vec![Some(normalised)], vec![old])
                .with_attr("perm", Attr::Ints(vec![0, 3, 1, 2])),
        );
    }
    graph.nodes.splice(0..0, nodes);
    graph.toposort()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::fixed_shape;
    use crate::reference::{RunOptions, run};

    /// x → Conv(1×1) → y, NCHW [batch, 3, 4, 5].
    fn model() -> Graph {
        let mut g = Graph::new("m", 17);
        let batch = Dim::sym("batch");
        let x = g.add_value(
            "image",
            Some(ValueType::new(DType::F32, vec![batch.clone(), Dim::fixed(3), Dim::fixed(4), Dim::fixed(5)])),
        );
        let w = g.add_constant(
            "w",
            Tensor::new(vec![2, 3, 1, 1], TensorData::F32(vec![0.5, -1.0, 2.0, 1.0, 0.25, -0.5])).expect("w"),
        );
        let y = g
            .add_value("y", Some(ValueType::new(DType::F32, vec![batch, Dim::fixed(2), Dim::fixed(4), Dim::fixed(5)])));
        g.nodes.push(Node::new("conv", "Conv", vec![Some(x), Some(w)], vec![y]));
        g.inputs.push(x);
        g.outputs.push(y);
        g
    }

    #[test]
    fn uint8_input_matches_the_float_model_on_normalised_pixels() -> Result<(), GraphError> {
        let norm = Uint8Input::from_mean_std([127.0, 100.0, 50.0], [128.0, 64.0, 32.0])?;
        let original = model();
        let mut g = original.clone();
        apply(&mut g, &norm)?;
        assert_eq!(g.value(g.inputs[0]).name, "image");
        assert_eq!(g.value_type(g.inputs[0]).map(|t| t.dtype), Some(DType::U8));
        assert_eq!(g.shape(g.inputs[0]).map(|s| s[3].clone()), Some(Dim::fixed(3)));

        let pixels: Vec<u8> = (0..2 * 4 * 5 * 3).map(|i| (i * 37 % 256) as u8).collect();
        let raw = Tensor::new(vec![2, 4, 5, 3], TensorData::U8(pixels.clone()))
            .map_err(|e| GraphError::Invalid(e.to_string()))?;
        // The same pixels normalised on the host, NCHW.
        let mut float = vec![0f32; pixels.len()];
        for n in 0..2 {
            for h in 0..4 {
                for w in 0..5 {
                    for c in 0..3 {
                        let p = f32::from(pixels[((n * 4 + h) * 5 + w) * 3 + c]);
                        float[((n * 3 + c) * 4 + h) * 5 + w] = p * norm.scale[c] + norm.offset[c];
                    }
                }
            }
        }
        let float =
            Tensor::new(vec![2, 3, 4, 5], TensorData::F32(float)).map_err(|e| GraphError::Invalid(e.to_string()))?;
        let want = run(&original, &[float], RunOptions::default())?;
        let got = run(&g, &[raw], RunOptions::default())?;
        let (TensorData::F32(a), TensorData::F32(b)) = (got[0].data(), want[0].data()) else {
            return Err(GraphError::Invalid("outputs are not FP32".into()));
        };
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1.0)), "{a:?} vs {b:?}");
        Ok(())
    }

    #[test]
    fn models_without_one_rgb_input_are_refused() {
        let mut g = Graph::new("m", 17);
        let x = g.add_value("ids", Some(ValueType::new(DType::I64, fixed_shape(&[1, 8]))));
        g.inputs.push(x);
        let norm = Uint8Input { scale: [1.0; 3], offset: [0.0; 3] };
        assert!(apply(&mut g, &norm).is_err());
        assert!(Uint8Input::from_mean_std([0.0; 3], [1.0, 0.0, 1.0]).is_err());
    }
}
