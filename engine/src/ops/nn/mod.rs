//! Neural-network ops: convolution, normalisation, pooling, GEMM/MatMul,
//! Flatten and kiln's fused Conv/Dense/Attention. The heavy ones share one
//! GEMM ([`linalg`]), one im2col and one activation implementation.

pub(crate) mod activation;
mod attention;
mod batch_norm;
mod conv;
mod dense;
mod flatten;
mod gemm;
mod linalg;
mod matmul;
mod pool;
mod window;

use super::Registry;

pub(crate) fn register(r: &mut Registry) {
    r.add(conv::Conv { fused: false });
    r.add(conv::Conv { fused: true });
    r.add(batch_norm::BatchNorm);
    r.add(pool::Pool(pool::PoolKind::Max));
    r.add(pool::Pool(pool::PoolKind::Average));
    r.add(pool::GlobalAveragePool);
    r.add(gemm::Gemm);
    r.add(matmul::MatMul);
    r.add(flatten::Flatten);
    r.add(dense::Dense);
    r.add(attention::Attention);
}

#[cfg(test)]
mod tests {
    use super::linalg::tests::Lcg;
    use crate::graph::{Attr, Dim, Graph, Node, ValueType};
    use crate::ops::util::{f32s, tensor_f32};
    use crate::reference::{RunOptions, run};
    use crate::{DType, Tensor};

    /// Conv → BatchNormalization → MaxPool → GlobalAveragePool → Flatten → Gemm
    /// through whole-graph inference and the reference executor.
    #[test]
    fn small_cnn_infers_symbolic_batch_and_runs() -> Result<(), String> {
        let mut r = Lcg(31);
        let mut g = Graph::new("cnn", 17);
        let batch = Dim::sym("batch");
        let x = g.add_value("x", Some(ValueType::new(DType::F32, vec![batch.clone(), 3.into(), 16.into(), 16.into()])));
        g.inputs.push(x);
        let mut c = |g: &mut Graph, name: &str, shape: Vec<usize>| -> Result<usize, String> {
            let n = shape.iter().product();
            Ok(g.add_constant(name, tensor_f32(shape, r.vec(n))?))
        };
        let w = c(&mut g, "w", vec![8, 3, 3, 3])?;
        let (scale, bias, mean) = (c(&mut g, "s", vec![8])?, c(&mut g, "b", vec![8])?, c(&mut g, "m", vec![8])?);
        let var = g.add_constant("v", tensor_f32(vec![8], vec![0.5; 8])?);
        let fc = c(&mut g, "fc", vec![10, 8])?;
        let fcb = c(&mut g, "fcb", vec![10])?;
        let ids: Vec<usize> =
            ["conv", "bn", "pool", "gap", "flat", "y"].iter().map(|n| g.add_value(*n, None)).collect();
        g.nodes = vec![
            Node::new("conv", "Conv", vec![Some(x), Some(w)], vec![ids[0]])
                .with_attr("strides", Attr::Ints(vec![2, 2]))
                .with_attr("pads", Attr::Ints(vec![1, 1, 1, 1])),
            Node::new("bn", "BatchNormalization", [ids[0], scale, bias, mean, var].map(Some).to_vec(), vec![ids[1]]),
            Node::new("pool", "MaxPool", vec![Some(ids[1])], vec![ids[2]])
                .with_attr("kernel_shape", Attr::Ints(vec![3, 3]))
                .with_attr("strides", Attr::Ints(vec![2, 2]))
                .with_attr("ceil_mode", Attr::Int(1)),
            Node::new("gap", "GlobalAveragePool", vec![Some(ids[2])], vec![ids[3]]),
            Node::new("flat", "Flatten", vec![Some(ids[3])], vec![ids[4]]),
            Node::new("fc", "Gemm", vec![Some(ids[4]), Some(fc), Some(fcb)], vec![ids[5]])
                .with_attr("transB", Attr::Int(1)),
        ];
        g.outputs.push(ids[5]);
        crate::infer::infer_shapes(&mut g).map_err(|e| e.to_string())?;
        let shape = |i: usize| g.shape(ids[i]).cloned();
        assert_eq!(shape(0), Some(vec![batch.clone(), 8.into(), 8.into(), 8.into()]));
        assert_eq!(shape(2), Some(vec![batch.clone(), 8.into(), 4.into(), 4.into()]));
        assert_eq!(shape(4), Some(vec![batch.clone(), 8.into()]));
        assert_eq!(shape(5), Some(vec![batch, 10.into()]));
        let input = tensor_f32(vec![2, 3, 16, 16], r.vec(2 * 3 * 16 * 16))?;
        let out: Vec<Tensor> = run(&g, &[input], RunOptions::default()).map_err(|e| e.to_string())?;
        assert_eq!(out[0].shape(), &[2, 10]);
        let y = f32s(&out[0])?;
        assert!(y.iter().all(|v| v.is_finite()) && y[..10] != y[10..]);
        Ok(())
    }
}
