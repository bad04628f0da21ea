//! LayerNorm recognition: the decomposed pattern exporters emit when they do
//! not use opset-17 LayerNormalization,
//!
//! ```text
//! mean = ReduceMean(x, last axis)      d = Sub(x, mean)
//! var  = ReduceMean(Pow(d, 2) | Mul(d, d))
//! std  = Sqrt(Add(var, eps))
//! y    = Div(d, std) | Mul(d, Reciprocal(std))
//! y    = Add(Mul(y, gamma), beta)      (gamma and beta optional)
//! ```
//!
//! becomes one `LayerNormalization(x, gamma, beta)`.

use super::rewrite::{Index, Rewriter, is_f32, is_scalar, other_input, scalar_operand};
use super::{Pass, PassContext, PassStats};
use crate::graph::{Attr, Graph, GraphError, Node, ValueId};
use crate::ops::util::{ints, norm_axis};
use crate::{Tensor, TensorData};

#[derive(Debug, Clone, Copy, Default)]
pub struct LayerNormFusion;

impl Pass for LayerNormFusion {
    fn name(&self) -> &'static str {
        "layer_norm"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = cx;
        let idx = Index::new(graph);
        let mut rw = Rewriter::new();
        for i in 0..graph.nodes.len() {
            if graph.nodes[i].op != "ReduceMean" || rw.is_claimed(i) {
                continue;
            }
            let Some(m) = match_layer_norm(graph, &idx, i) else { continue };
            // Adding values leaves node indices (and so the index) valid; the
            // constants of a refused fusion are dropped by the runner's compaction.
            let [gamma, beta] = [m.gamma, m.beta].map(|(n, t)| graph.add_constant(graph.fresh_name(&n), t));
            let last = &graph.nodes[m.last];
            let fused = Node::new(
                format!("{}_layernorm", last.name),
                "LayerNormalization",
                vec![Some(m.x), Some(gamma), Some(beta)],
                last.outputs.clone(),
            )
            .with_attr("axis", Attr::Int(-1))
            .with_attr("epsilon", Attr::Float(m.eps));
            rw.fuse(graph, &idx, &m.nodes, m.last, fused);
        }
        let fusions = rw.apply(graph);
        let mut stats = PassStats { rewrites: fusions, notes: Vec::new() };
        if fusions > 0 {
            stats.notes.push(format!("LayerNormalization ×{fusions}"));
        }
        Ok(stats)
    }
}

/// One recognised decomposed LayerNorm.
struct Match {
    x: ValueId,
    eps: f32,
    gamma: (String, Tensor),
    beta: (String, Tensor),
    /// Every node of the pattern, and the last one (which the fused node replaces).
    nodes: Vec<usize>,
    last: usize,
}

fn match_layer_norm(g: &Graph, idx: &Index, mean_node: usize) -> Option<Match> {
    let r1 = &g.nodes[mean_node];
    let x = r1.input(0)?;
    let rank = g.shape(x)?.len();
    if !reduces_last_axis(g, r1, rank) || !is_f32(g, x) {
        return None;
    }
    let mean = *r1.outputs.first()?;
    let (sub_i, sub) = idx.sole_reader_op(g, mean, &["Sub"])?;
    if sub.input(0)? != x || sub.input(1)? != mean {
        return None;
    }
    let d = *sub.outputs.first()?;
    if idx.is_output(d) {
        return None;
    }
    // d is read twice by design: by the square and by the division.
    let readers = idx.distinct_readers(d);
    if readers.len() != 2 {
        return None;
    }
    let is_square = |n: &Node| match n.op.as_str() {
        "Pow" => n.input(0) == Some(d) && n.input(1).is_some_and(|e| is_scalar(g, e, 2.0)),
        "Mul" => n.input(0) == Some(d) && n.input(1) == Some(d),
        _ => false,
    };
    let (sq_i, div_i) = if is_square(&g.nodes[readers[0]]) {
        (readers[0], readers[1])
    } else if is_square(&g.nodes[readers[1]]) {
        (readers[1], readers[0])
    } else {
        return None;
    };
    let sq = *g.nodes[sq_i].outputs.first()?;
    let (r2_i, r2) = idx.sole_reader_op(g, sq, &["ReduceMean"])?;
    if !reduces_last_axis(g, r2, rank) {
        return None;
    }
    let var = *r2.outputs.first()?;
    let (add_i, add) = idx.sole_reader_op(g, var, &["Add"])?;
    let (other, eps) = scalar_operand(g, add)?;
    if other != var || !(0.0..1.0).contains(&eps) {
        return None;
    }
    let (sqrt_i, sqrt) = idx.sole_reader_op(g, *add.outputs.first()?, &["Sqrt"])?;
    let std = *sqrt.outputs.first()?;
    let mut nodes = vec![mean_node, sub_i, sq_i, r2_i, add_i, sqrt_i];

    // Div(d, std), or Mul(d, Reciprocal(std)) in either operand order.
    let div = &g.nodes[div_i];
    match div.op.as_str() {
        "Div" if div.input(0) == Some(d) && div.input(1) == Some(std) => {}
        "Mul" => {
            let (rec_i, rec) = idx.sole_reader_op(g, std, &["Reciprocal"])?;
            if other_input(div, d)? != *rec.outputs.first()? {
                return None;
            }
            nodes.push(rec_i);
        }
        _ => return None,
    }
    nodes.push(div_i);
    let mut last = div_i;
    let mut y = *div.outputs.first()?;

    let channels = g.shape(x)?.last()?.as_fixed().and_then(|c| usize::try_from(c).ok());
    let mut gamma = None;
    let mut beta = None;
    if let Some((mul_i, mul)) = idx.sole_reader_op(g, y, &["Mul"])
        && let Some(t) = other_input(mul, y).and_then(|c| per_feature(g, c, rank, channels))
    {
        gamma = Some(t);
        nodes.push(mul_i);
        last = mul_i;
        y = *mul.outputs.first()?;
    }
    if let Some((add_i, add)) = idx.sole_reader_op(g, y, &["Add"])
        && let Some(t) = other_input(add, y).and_then(|c| per_feature(g, c, rank, channels))
    {
        beta = Some(t);
        nodes.push(add_i);
        last = add_i;
    }
    let c = gamma.as_ref().or(beta.as_ref()).map(Vec::len).or(channels)?;
    let gamma = gamma.unwrap_or_else(|| vec![1.0; c]);
    let beta = beta.unwrap_or_else(|| vec![0.0; c]);
    if gamma.len() != beta.len() {
        return None;
    }
    let tensor = |v: Vec<f32>| Tensor::new(vec![c], TensorData::F32(v)).ok();
    let base = g.nodes[last].name.clone();
    Some(Match {
        x,
        eps: eps as f32,
        gamma: (format!("{base}_gamma"), tensor(gamma)?),
        beta: (format!("{base}_beta"), tensor(beta)?),
        nodes,
        last,
    })
}

/// A ReduceMean over exactly the last axis, keeping dims (axes as attribute
/// before opset 18, as input from 18 on).
fn reduces_last_axis(g: &Graph, n: &Node, rank: usize) -> bool {
    if n.attrs.int("keepdims", 1) != Ok(1) || rank == 0 {
        return false;
    }
    let axes = match n.attrs.ints("axes") {
        Ok(Some(a)) => a.to_vec(),
        Ok(None) => match n.input(1).and_then(|a| g.constant(a)).map(ints) {
            Some(Ok(a)) => a,
            _ => return false,
        },
        Err(_) => return false,
    };
    matches!(axes.as_slice(), [a] if norm_axis(*a, rank) == Ok(rank - 1))
}

/// A constant that varies at most along the last axis of a rank-`rank`
/// result, as one value per feature (a scalar is expanded when the feature
/// count is known). `None` when it would broadcast the result to a new shape.
fn per_feature(g: &Graph, v: ValueId, rank: usize, channels: Option<usize>) -> Option<Vec<f32>> {
    let t = g.constant(v)?;
    let data = t.as_f32()?;
    let dims = t.shape();
    if dims.len() > rank || dims.iter().rev().skip(1).any(|&d| d != 1) {
        return None;
    }
    match (data.len(), channels) {
        (1, Some(c)) => Some(vec![data[0]; c]),
        (n, Some(c)) if n == c => Some(data.to_vec()),
        (n, None) if n > 1 => Some(data.to_vec()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::testing::{Tb, check_pass, count, random, random_data};
    use crate::passes::{PassContext, run_pass};

    /// Which exporter ordering to build.
    #[derive(Clone, Copy)]
    struct Variant {
        mul_square: bool,
        reciprocal: bool,
        affine: bool,
        swap_operands: bool,
        axes_input: bool,
    }

    fn build(v: Variant) -> Graph {
        let mut b = Tb::new();
        let x = b.input("x", &[2, 3, 8]);
        let reduce = |b: &mut Tb, input: ValueId| {
            if v.axes_input {
                let axes = b.ints(&[-1]);
                b.node("ReduceMean", &[input, axes])
            } else {
                b.node_attrs("ReduceMean", &[input], vec![("axes", Attr::Ints(vec![2]))])
            }
        };
        let mean = reduce(&mut b, x);
        let d = b.node("Sub", &[x, mean]);
        let sq = if v.mul_square {
            b.node("Mul", &[d, d])
        } else {
            let two = b.scalar(2.0);
            b.node("Pow", &[d, two])
        };
        let var = reduce(&mut b, sq);
        let eps = b.scalar(1e-5);
        let ve = if v.swap_operands { b.node("Add", &[eps, var]) } else { b.node("Add", &[var, eps]) };
        let std = b.node("Sqrt", &[ve]);
        let mut y = if v.reciprocal {
            let r = b.node("Reciprocal", &[std]);
            if v.swap_operands { b.node("Mul", &[r, d]) } else { b.node("Mul", &[d, r]) }
        } else {
            b.node("Div", &[d, std])
        };
        if v.affine {
            let gamma = b.constant(&[8], random_data(8, 3, 1.0));
            let beta = b.constant(&[8], random_data(8, 4, 1.0));
            y = if v.swap_operands { b.node("Mul", &[gamma, y]) } else { b.node("Mul", &[y, gamma]) };
            y = if v.swap_operands { b.node("Add", &[beta, y]) } else { b.node("Add", &[y, beta]) };
        }
        let out = b.node("Relu", &[y]);
        b.finish(&[out]).expect("build")
    }

    #[test]
    fn every_exporter_ordering_fuses_to_one_layer_norm() {
        let x = random(&[2, 3, 8], 1, 3.0);
        for bits in 0..32u32 {
            let v = Variant {
                mul_square: bits & 1 != 0,
                reciprocal: bits & 2 != 0,
                affine: bits & 4 != 0,
                swap_operands: bits & 8 != 0,
                axes_input: bits & 16 != 0,
            };
            let mut after = build(v);
            let stats = check_pass(&LayerNormFusion, &mut after, std::slice::from_ref(&x), 1e-5)
                .unwrap_or_else(|e| panic!("variant {bits}: {e}"));
            assert_eq!(stats.rewrites, 1, "variant {bits}");
            assert_eq!(count(&after, "LayerNormalization"), 1, "variant {bits}");
            assert_eq!(after.nodes.len(), 2, "variant {bits}: only LayerNormalization and Relu remain");
            let ln = &after.nodes[0];
            assert!((ln.attrs.float("epsilon", 0.0).expect("eps") - 1e-5).abs() < 1e-9);
        }
    }

    #[test]
    fn a_shared_intermediate_blocks_the_fusion() {
        let mut b = Tb::new();
        let x = b.input("x", &[4, 6]);
        let mean = b.node_attrs("ReduceMean", &[x], vec![("axes", Attr::Ints(vec![-1]))]);
        let d = b.node("Sub", &[x, mean]);
        let two = b.scalar(2.0);
        let sq = b.node("Pow", &[d, two]);
        let var = b.node_attrs("ReduceMean", &[sq], vec![("axes", Attr::Ints(vec![-1]))]);
        let eps = b.scalar(1e-6);
        let ve = b.node("Add", &[var, eps]);
        let std = b.node("Sqrt", &[ve]);
        let y = b.node("Div", &[d, std]);
        // The variance is also a graph output: the pattern must stay.
        let mut g = b.finish(&[y, var]).expect("build");
        let stats = run_pass(&LayerNormFusion, &mut g, &PassContext::default()).expect("pass");
        assert_eq!(stats.rewrites, 0);
        assert_eq!(count(&g, "LayerNormalization"), 0);
    }

    #[test]
    fn reduction_over_another_axis_is_not_a_layer_norm() {
        let mut b = Tb::new();
        let x = b.input("x", &[4, 6]);
        let mean = b.node_attrs("ReduceMean", &[x], vec![("axes", Attr::Ints(vec![0]))]);
        let d = b.node("Sub", &[x, mean]);
        let sq = b.node("Mul", &[d, d]);
        let var = b.node_attrs("ReduceMean", &[sq], vec![("axes", Attr::Ints(vec![0]))]);
        let eps = b.scalar(1e-6);
        let ve = b.node("Add", &[var, eps]);
        let std = b.node("Sqrt", &[ve]);
        let y = b.node("Div", &[d, std]);
        let mut g = b.finish(&[y]).expect("build");
        let stats = run_pass(&LayerNormFusion, &mut g, &PassContext::default()).expect("pass");
        assert_eq!(stats.rewrites, 0);
    }
}
