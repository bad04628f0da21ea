//! NHWC layout assignment. Tensor-core convolutions want channels last, so
//! every maximal connected region of 2-D convolutions, pools and the
//! elementwise ops between them is switched to NHWC as a whole: the layout ops
//! get `layout = "NHWC"`, FusedConv weights are re-laid-out OIHW → OHWI,
//! constants the elementwise ops broadcast are permuted alike, and Transposes
//! are inserted only where a tensor enters the region (NCHW → NHWC) or leaves
//! it (to a graph output or any other reader such as Flatten or Reshape).
//!
//! Values keep their ids at the region border: a region node writes a fresh
//! NHWC value, and the original (NCHW) value, with its name, is produced by the
//! Transpose back when anything outside still reads it.

use std::collections::HashMap;

use super::rewrite::components;
use super::{Pass, PassContext, PassStats};
use crate::graph::{Attr, Graph, GraphError, Node, ValueId};
use crate::{DType, Tensor, TensorData};

#[derive(Debug, Clone, Copy, Default)]
pub struct NhwcLayout;

/// NCHW → NHWC.
const TO_NHWC: [usize; 4] = [0, 2, 3, 1];
/// NHWC → NCHW.
const TO_NCHW: [usize; 4] = [0, 3, 1, 2];

/// Ops that take a `layout` attribute.
const LAYOUT_OPS: &[&str] = &["kiln.FusedConv", "MaxPool", "AveragePool", "GlobalAveragePool"];
/// Elementwise ops of one data input (others, like Clip's bounds, are scalars).
const UNARY: &[&str] =
    &["Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Gelu", "Identity"];
/// Broadcasting binary ops.
const BINARY: &[&str] = &["Add", "Mul", "Sub", "Div"];

impl Pass for NhwcLayout {
    fn name(&self) -> &'static str {
        "layout"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        if !cx.nhwc {
            return Ok(PassStats::default());
        }
        let roles: Vec<Option<Role>> = graph.nodes.iter().map(|n| role(graph, n)).collect();
        let regions = regions(graph, &roles);
        let mut cv = Converter::default();
        let mut converted_nodes = 0;
        for region in &regions {
            converted_nodes += region.len();
            cv.convert(graph, region, &roles);
        }
        graph.toposort()?;
        let mut stats = PassStats { rewrites: regions.len(), notes: Vec::new() };
        if !regions.is_empty() {
            stats.notes.push(format!("NHWC regions: {} ({converted_nodes} nodes)", regions.len()));
            stats.notes.push(format!("layout transposes inserted: {}", cv.transposes));
        }
        Ok(stats)
    }
}

/// How a region node's inputs are treated.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// A FusedConv: input 0 and the residual input 3 are data, weight 1 is permuted.
    Conv,
    /// A pool: input 0 is data.
    Pool,
    /// Input 0 is data, the rest are scalars.
    Unary,
    /// Every non-constant input is data; constants are re-laid-out.
    Binary,
}

/// The role `n` can take in an NHWC region, if any.
fn role(g: &Graph, n: &Node) -> Option<Role> {
    let rank4_f32 = |v: ValueId| {
        g.value_type(v).is_some_and(|t| t.dtype == DType::F32 && t.shape.as_ref().is_some_and(|s| s.len() == 4))
    };
    // Binary ops may take a constant first; every other op's input 0 is data.
    if n.outputs.len() != 1 || !rank4_f32(n.outputs[0]) || n.input(0).is_none() {
        return None;
    }
    if LAYOUT_OPS.contains(&n.op.as_str()) && n.attrs.string("layout", "NCHW").ok()? != "NCHW" {
        return None;
    }
    let data = |v: Option<ValueId>| v.is_some_and(|v| g.constant(v).is_none() && rank4_f32(v));
    match n.op.as_str() {
        "kiln.FusedConv" => {
            let w = g.constant(n.input(1)?)?;
            let ok = w.shape().len() == 4
                && w.dtype() == DType::F32
                && (n.input(3).is_none() || data(n.input(3)))
                && n.inputs.len() <= 4
                && data(n.input(0));
            ok.then_some(Role::Conv)
        }
        "MaxPool" | "AveragePool" | "GlobalAveragePool" => {
            (n.inputs.len() == 1 && data(n.input(0))).then_some(Role::Pool)
        }
        op if UNARY.contains(&op) => {
            let scalars = n.inputs[1..]
                .iter()
                .flatten()
                .all(|&v| g.constant(v).is_some_and(|t| t.shape().iter().product::<usize>() == 1));
            (data(n.input(0)) && scalars).then_some(Role::Unary)
        }
        op if BINARY.contains(&op) && n.inputs.len() == 2 => {
            let mut any_data = false;
            for v in &n.inputs {
                let v = (*v)?;
                match g.constant(v) {
                    Some(t) if t.dtype() == DType::F32 && t.shape().len() <= 4 => {}
                    Some(_) => return None,
                    None if data(Some(v)) => any_data = true,
                    None => return None,
                }
            }
            any_data.then_some(Role::Binary)
        }
        _ => None,
    }
}

/// Node indices of the data inputs of a region node.
fn data_inputs(g: &Graph, n: &Node, role: Role) -> Vec<(usize, ValueId)> {
    let slots: Vec<usize> = match role {
        Role::Conv => vec![0, 3],
        Role::Pool | Role::Unary => vec![0],
        Role::Binary => vec![0, 1],
    };
    slots.into_iter().filter_map(|s| n.input(s).map(|v| (s, v))).filter(|&(_, v)| g.constant(v).is_none()).collect()
}

/// Connected components of candidate nodes that contain a convolution.
fn regions(g: &Graph, roles: &[Option<Role>]) -> Vec<Vec<usize>> {
    let links = |i: usize| {
        roles[i].map_or(Vec::new(), |r| data_inputs(g, &g.nodes[i], r).into_iter().map(|(_, v)| v).collect())
    };
    let mut all = components(g, |i| roles[i].is_some(), links);
    all.retain(|c| c.iter().any(|&i| roles[i] == Some(Role::Conv)));
    all
}

/// Rewrites regions, sharing the Transposes into NHWC and permuted constants.
#[derive(Debug, Default)]
struct Converter {
    /// NCHW value → its NHWC Transpose (entries) or the region's NHWC value.
    nhwc: HashMap<ValueId, ValueId>,
    /// Constant → its re-laid-out copy (weights and broadcast operands).
    relaid: HashMap<(ValueId, bool), ValueId>,
    transposes: usize,
}

impl Converter {
    fn convert(&mut self, g: &mut Graph, region: &[usize], roles: &[Option<Role>]) {
        // Every region output gets a fresh NHWC value; the old id stays NCHW.
        let mut moved = Vec::new();
        for &i in region {
            for slot in 0..g.nodes[i].outputs.len() {
                let old = g.nodes[i].outputs[slot];
                let name = g.fresh_name(&format!("{}_nhwc", g.values[old].name));
                let new = g.add_value(name, None);
                g.nodes[i].outputs[slot] = new;
                self.nhwc.insert(old, new);
                moved.push((old, new));
            }
        }
        for &i in region {
            let Some(role) = roles[i] else { continue };
            let node = g.nodes[i].clone();
            for (slot, v) in data_inputs(g, &node, role) {
                let t = self.nhwc_of(g, v);
                g.nodes[i].inputs[slot] = Some(t);
            }
            match role {
                Role::Conv => {
                    if let Some(w) = node.input(1)
                        && let Some(w2) = self.relayout(g, w, true)
                    {
                        g.nodes[i].inputs[1] = Some(w2);
                    }
                }
                Role::Binary => {
                    for slot in 0..2 {
                        if let Some(c) = node.input(slot).filter(|&c| g.constant(c).is_some())
                            && let Some(c2) = self.relayout(g, c, false)
                        {
                            g.nodes[i].inputs[slot] = Some(c2);
                        }
                    }
                }
                Role::Pool | Role::Unary => {}
            }
            if LAYOUT_OPS.contains(&node.op.as_str()) {
                g.nodes[i].attrs.insert("layout", Attr::String("NHWC".into()));
            }
        }
        // Leaving the region: readers outside it (and graph outputs) keep the
        // NCHW id, now produced by a Transpose back.
        let in_region = |i: usize| region.contains(&i);
        for (old, new) in moved {
            let outside = g.is_output(old)
                || g.nodes.iter().enumerate().any(|(i, n)| !in_region(i) && n.inputs.contains(&Some(old)));
            if outside {
                let name = format!("{}_to_nchw", g.values[old].name);
                g.nodes.push(transpose(name, new, old, &TO_NCHW));
                self.transposes += 1;
            }
        }
    }

    /// The NHWC version of `v`: the region's own value, or a shared Transpose.
    fn nhwc_of(&mut self, g: &mut Graph, v: ValueId) -> ValueId {
        if let Some(&t) = self.nhwc.get(&v) {
            return t;
        }
        let name = g.fresh_name(&format!("{}_nhwc", g.values[v].name));
        let t = g.add_value(name.clone(), None);
        g.nodes.push(transpose(format!("{name}_transpose"), v, t, &TO_NHWC));
        self.transposes += 1;
        self.nhwc.insert(v, t);
        t
    }

    /// A constant re-laid-out for NHWC: conv weights OIHW → OHWI, broadcast
    /// operands padded to rank 4, permuted, and stripped of leading ones (so a
    /// per-channel `[C,1,1]` becomes `[C]`). Scalars need nothing.
    fn relayout(&mut self, g: &mut Graph, c: ValueId, weight: bool) -> Option<ValueId> {
        if let Some(&r) = self.relaid.get(&(c, weight)) {
            return Some(r);
        }
        let t = g.constant(c)?;
        if !weight && t.shape().iter().product::<usize>() == 1 {
            return None;
        }
        let mut dims = vec![1; 4 - t.shape().len().min(4)];
        dims.extend_from_slice(t.shape());
        let mut p = permute(t, &dims, &TO_NHWC)?;
        if !weight {
            let lead = p.shape().iter().take_while(|&&d| d == 1).count();
            let shape = p.shape()[lead..].to_vec();
            p = Tensor::new(shape, p.into_data()).ok()?;
        }
        let name = g.fresh_name(&format!("{}_nhwc", g.values[c].name));
        let storage = g.values[c].storage;
        let id = g.add_constant(name, p);
        g.values[id].storage = storage;
        self.relaid.insert((c, weight), id);
        Some(id)
    }
}

fn transpose(name: String, input: ValueId, output: ValueId, perm: &[usize; 4]) -> Node {
    Node::new(name, "Transpose", vec![Some(input)], vec![output])
        .with_attr("perm", Attr::Ints(perm.iter().map(|&p| p as i64).collect()))
}

/// `t` viewed with `dims` (same element count), transposed by `perm`.
fn permute(t: &Tensor, dims: &[usize], perm: &[usize]) -> Option<Tensor> {
    let TensorData::F32(src) = t.data() else { return None };
    if dims.iter().product::<usize>() != src.len() || dims.len() != perm.len() {
        return None;
    }
    let rank = dims.len();
    let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    let mut strides = vec![1; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    let src_strides: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    let mut data = Vec::with_capacity(src.len());
    let mut idx = vec![0; rank];
    for _ in 0..src.len() {
        let off: usize = idx.iter().zip(&src_strides).map(|(i, s)| i * s).sum();
        data.push(src[off]);
        for d in (0..rank).rev() {
            idx[d] += 1;
            if idx[d] < out_dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Tensor::new(out_dims, TensorData::F32(data)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::testing::{Tb, check_pass_with, count, random, random_data};

    fn nhwc() -> PassContext {
        PassContext { nhwc: true, ..PassContext::default() }
    }

    fn conv(b: &mut Tb, x: ValueId, cin: usize, cout: usize, seed: u64, act: &str) -> ValueId {
        let w = b.constant(&[cout, cin, 3, 3], random_data(cout * cin * 9, seed, 0.5));
        let bias = b.constant(&[cout], random_data(cout, seed + 100, 0.5));
        b.node_attrs(
            "kiln.FusedConv",
            &[x, w, bias],
            vec![
                ("pads", Attr::Ints(vec![1, 1, 1, 1])),
                ("kernel_shape", Attr::Ints(vec![3, 3])),
                ("activation", Attr::String(act.into())),
            ],
        )
    }

    #[test]
    fn conv_chain_converts_with_exactly_two_transposes() {
        for const_add in [false, true] {
            let mut b = Tb::new();
            let x = b.input("x", &[2, 3, 6, 6]);
            let c1 = conv(&mut b, x, 3, 4, 1, "none");
            let r = b.node("Relu", &[c1]);
            let c2 = conv(&mut b, r, 4, 4, 2, "none");
            let a = if const_add {
                let k = b.constant(&[4, 1, 1], random_data(4, 7, 1.0));
                b.node("Add", &[k, c2])
            } else {
                b.node("Add", &[c2, r])
            };
            let p = b.node_attrs(
                "MaxPool",
                &[a],
                vec![("kernel_shape", Attr::Ints(vec![2, 2])), ("strides", Attr::Ints(vec![2, 2]))],
            );
            let f = b.node_attrs("Flatten", &[p], vec![("axis", Attr::Int(1))]);
            let mut after = b.finish(&[f]).expect("build");
            let out_name = after.value(after.outputs[0]).name.clone();
            let inputs = [random(&[2, 3, 6, 6], 5, 1.0)];
            let stats = check_pass_with(&NhwcLayout, &mut after, &nhwc(), &inputs, 1e-5, false).expect("check");
            assert_eq!(count(&after, "Transpose"), 2, "const_add={const_add}");
            assert_eq!(stats.rewrites, 1);
            assert!(stats.notes.iter().any(|n| n.contains("transposes inserted: 2")), "{:?}", stats.notes);
            for n in after.nodes.iter().filter(|n| LAYOUT_OPS.contains(&n.op.as_str())) {
                assert_eq!(n.attrs.string("layout", ""), Ok("NHWC".to_string()), "{}", n.name);
            }
            let w = after.nodes.iter().find(|n| n.op == "kiln.FusedConv").and_then(|n| n.input(1)).expect("w");
            assert_eq!(after.constant(w).expect("weight").shape(), &[4, 3, 3, 3]);
            if const_add {
                let add = after.nodes.iter().find(|n| n.op == "Add").expect("add");
                let k = add.input(0).and_then(|k| after.constant(k)).expect("constant operand");
                assert_eq!(k.shape(), &[4], "per-channel constant re-laid-out to [C]");
            }
            assert_eq!(after.value(after.outputs[0]).name, out_name);
        }
    }

    #[test]
    fn global_pool_output_leaves_through_a_transpose() {
        let mut b = Tb::new();
        let x = b.input("x", &[1, 2, 5, 5]);
        let c = conv(&mut b, x, 2, 3, 3, "relu");
        let gap = b.node("GlobalAveragePool", &[c]);
        let mut after = b.finish(&[gap, c]).expect("build");
        check_pass_with(&NhwcLayout, &mut after, &nhwc(), &[random(&[1, 2, 5, 5], 9, 1.0)], 1e-5, false)
            .expect("check");
        // In, and one back for each of the two graph outputs.
        assert_eq!(count(&after, "Transpose"), 3);
        let gap_out = after.shape(after.outputs[0]).expect("shape");
        assert_eq!(crate::graph::shape_string(gap_out), "[1, 3, 1, 1]");
    }

    #[test]
    fn regions_without_a_convolution_or_without_the_flag_stay_nchw() {
        let mut b = Tb::new();
        let x = b.input("x", &[1, 2, 4, 4]);
        let r = b.node("Relu", &[x]);
        let p = b.node_attrs("MaxPool", &[r], vec![("kernel_shape", Attr::Ints(vec![2, 2]))]);
        let mut g = b.finish(&[p]).expect("build");
        let stats = crate::passes::run_pass(&NhwcLayout, &mut g, &nhwc()).expect("pass");
        assert_eq!(stats.rewrites, 0);
        assert_eq!(count(&g, "Transpose"), 0);

        let mut b = Tb::new();
        let x = b.input("x", &[1, 2, 4, 4]);
        let c = conv(&mut b, x, 2, 2, 4, "none");
        let mut g = b.finish(&[c]).expect("build");
        let stats = crate::passes::run_pass(&NhwcLayout, &mut g, &PassContext::default()).expect("pass");
        assert_eq!(stats.rewrites, 0);
        assert_eq!(count(&g, "Transpose"), 0);
    }

    #[test]
    fn permute_moves_channels_last() {
        let t = Tensor::new(vec![1, 2, 1, 3], TensorData::F32(vec![0., 1., 2., 10., 11., 12.])).expect("t");
        let p = permute(&t, &[1, 2, 1, 3], &TO_NHWC).expect("permute");
        assert_eq!(p.shape(), &[1, 1, 3, 2]);
        assert_eq!(p.as_f32(), Some(&[0., 10., 1., 11., 2., 12.][..]));
    }
}
