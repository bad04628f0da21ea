//! Data-movement canonicalisation. PyTorch exports a 4-D transpose of the last
//! two axes as Reshape (merge the leading axes) → 3-D Transpose → Reshape
//! (split them again), with the reshape targets computed from `Shape` at run
//! time; that hides Kᵀ from attention recognition and keeps the shape
//! subgraphs alive. This pass turns such a triple into one Transpose, and
//! merges back-to-back Transposes (dropping identities).

use std::collections::HashSet;

use super::rewrite::{Index, remove_nodes};
use super::{Pass, PassContext, PassStats};
use crate::graph::{Attr, Dim, Graph, GraphError, Node, ValueId};

#[derive(Debug, Clone, Copy, Default)]
pub struct MovementFolding;

impl Pass for MovementFolding {
    fn name(&self) -> &'static str {
        "movement"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = cx;
        let idx = Index::new(graph);
        let mut dead = HashSet::new();
        let mut added = Vec::new();
        let (mut triples, mut merged) = (0usize, 0usize);
        for i in 0..graph.nodes.len() {
            if dead.contains(&i) {
                continue;
            }
            if let Some((nodes, input, perm, output)) = reshape_transpose_reshape(graph, &idx, &dead, i) {
                dead.extend(nodes);
                added.push(transpose(graph, &format!("{}_transpose", graph.nodes[i].name), input, &perm, output));
                triples += 1;
                continue;
            }
            // Transpose(Transpose(x, p), q) = Transpose(x, p∘q), when the inner one has no other reader.
            let node = &graph.nodes[i];
            if node.op != "Transpose" {
                continue;
            }
            let Some(x) = node.input(0) else { continue };
            let Some(j) = idx.producer(x) else { continue };
            if dead.contains(&j) || graph.nodes[j].op != "Transpose" || idx.only_reader(x, &dead) != Some(i) {
                continue;
            }
            let (Some(p), Some(q)) = (perm_of(graph, &graph.nodes[j]), perm_of(graph, node)) else { continue };
            if p.len() != q.len() {
                continue;
            }
            let composed: Vec<usize> = q.iter().map(|&k| p[k]).collect();
            let (Some(src), Some(&output)) = (graph.nodes[j].input(0), node.outputs.first()) else { continue };
            dead.insert(i);
            dead.insert(j);
            added.push(transpose(graph, &format!("{}_merged", node.name), src, &composed, output));
            merged += 1;
        }
        remove_nodes(graph, &dead);
        // Identity transposes left by merging are dropped by rewiring their readers.
        let mut identities = 0;
        for n in added {
            let is_identity =
                n.attrs.ints("perm").ok().flatten().is_some_and(|p| p.iter().enumerate().all(|(i, &v)| v == i as i64));
            match (is_identity, n.input(0)) {
                (true, Some(src)) if !graph.is_output(n.outputs[0]) => {
                    graph.replace_uses(n.outputs[0], src);
                    identities += 1;
                }
                _ => graph.nodes.push(n),
            }
        }
        let mut notes = Vec::new();
        if triples > 0 {
            notes.push(format!("Reshape+Transpose+Reshape → Transpose ×{triples}"));
        }
        if merged > 0 {
            notes.push(format!("Transpose+Transpose merged ×{merged} ({identities} identities removed)"));
        }
        Ok(PassStats { rewrites: triples + merged, notes })
    }
}

fn transpose(graph: &Graph, hint: &str, input: ValueId, perm: &[usize], output: ValueId) -> Node {
    let name = if graph.nodes.iter().any(|n| n.name == hint) { format!("{hint}_{output}") } else { hint.to_string() };
    Node::new(name, "Transpose", vec![Some(input)], vec![output])
        .with_attr("perm", Attr::Ints(perm.iter().map(|&p| p as i64).collect()))
}

fn perm_of(graph: &Graph, node: &Node) -> Option<Vec<usize>> {
    let rank = graph.shape(node.input(0)?)?.len();
    match node.attrs.ints("perm").ok()? {
        Some(p) => p.iter().map(|&v| usize::try_from(v).ok().filter(|&v| v < rank)).collect(),
        None => Some((0..rank).rev().collect()),
    }
}

/// Matches Reshape(x → [∏x[..k], x[k..]…]) → Transpose(p, p[0] = 0) →
/// Reshape(→ [x[..k]…, rest]) starting at node `i`; returns the three node
/// indices, x, the equivalent permutation of x and the final output.
fn reshape_transpose_reshape(
    graph: &Graph,
    idx: &Index,
    dead: &HashSet<usize>,
    i: usize,
) -> Option<([usize; 3], ValueId, Vec<usize>, ValueId)> {
    let r1 = &graph.nodes[i];
    if r1.op != "Reshape" {
        return None;
    }
    let x = r1.input(0)?;
    let xs = graph.shape(x)?;
    let y = *r1.outputs.first()?;
    let ys = graph.shape(y)?;
    // y merges the first k axes of x into one.
    let k = xs.len().checked_sub(ys.len())? + 1;
    if k < 2 || ys[1..] != xs[k..] || ys[0] != crate::graph::numel(&xs[..k]) {
        return None;
    }
    let t = idx.only_reader(y, dead)?;
    let tn = &graph.nodes[t];
    if tn.op != "Transpose" {
        return None;
    }
    let p = perm_of(graph, tn)?;
    if p.first() != Some(&0) {
        return None;
    }
    let z = *tn.outputs.first()?;
    let r2 = idx.only_reader(z, dead)?;
    let r2n = &graph.nodes[r2];
    if r2n.op != "Reshape" {
        return None;
    }
    let out = *r2n.outputs.first()?;
    let outs = graph.shape(out)?;
    let zs = graph.shape(z)?;
    let expected: Vec<Dim> = xs[..k].iter().chain(&zs[1..]).cloned().collect();
    if *outs != expected {
        return None;
    }
    let perm: Vec<usize> = (0..k).chain(p[1..].iter().map(|&a| a + k - 1)).collect();
    Some(([i, t, r2], x, perm, out))
}

#[cfg(test)]
mod tests {
    use kiln_onnx::{GraphBuilder, attr_ints};

    use super::super::testing::*;
    use super::*;

    #[test]
    fn torch_key_transpose_becomes_one_transpose() -> Result<(), String> {
        let mut b = GraphBuilder::new("k");
        let e = |e: kiln_onnx::OnnxError| e.to_string();
        let fixed = kiln_onnx::Dim::Fixed;
        input_dims(&mut b, "k", &[sym("batch"), fixed(4), sym("seq"), fixed(8)]).map_err(e)?;
        // Targets computed from Shape(k), as the exporter does.
        let s = b.add_node("Shape", &["k"], vec![]).map_err(e)?;
        let c: Vec<String> = [("s2", 2), ("e3", 3), ("s0", 0), ("e2", 2), ("m1", -1), ("d8", 8)]
            .iter()
            .map(|&(n, v)| ints(&mut b, n, &[v]))
            .collect::<Result<_, _>>()
            .map_err(e)?;
        let seq = b.add_node("Slice", &[&s, &c[0], &c[1]], vec![]).map_err(e)?;
        let bh = b.add_node("Slice", &[&s, &c[2], &c[3]], vec![]).map_err(e)?;
        let axis0 = || vec![kiln_onnx::attr_int("axis", 0)];
        let t1 = b.add_node("Concat", &[&c[4], &seq, &c[5]], axis0()).map_err(e)?;
        let r1 = b.add_node("Reshape", &["k", &t1], vec![]).map_err(e)?;
        let tr = b.add_node("Transpose", &[&r1], vec![attr_ints("perm", &[0, 2, 1])]).map_err(e)?;
        let t2 = b.add_node("Concat", &[&bh, &c[5], &seq], axis0()).map_err(e)?;
        let r2 = b.add_node("Reshape", &[&tr, &t2], vec![]).map_err(e)?;
        output(&mut b, &r2).map_err(e)?;
        let mut g = import(b)?;
        let mut rng = Lcg::new(3);
        let inputs = random_inputs(&g, 5, &mut rng)?;
        let stats = check_pass(&MovementFolding, &mut g, &inputs, 0.0)?;
        assert_eq!(stats.rewrites, 1, "{stats:?}");
        let t = g.nodes.iter().find(|n| n.op == "Transpose").ok_or("no transpose")?;
        assert_eq!(t.attrs.ints("perm")?, Some(&[0, 1, 3, 2][..]));
        super::super::run_pass(&super::super::DeadNodeElimination, &mut g, &PassContext::default())
            .map_err(|e| e.to_string())?;
        assert_eq!(count(&g, "Shape") + count(&g, "Reshape") + count(&g, "Concat"), 0, "{:?}", g.op_histogram());
        Ok(())
    }

    #[test]
    fn transposes_merge_and_identities_vanish() -> Result<(), String> {
        let mut b = GraphBuilder::new("t");
        let e = |e: kiln_onnx::OnnxError| e.to_string();
        input(&mut b, "x", &[2, 3, 4]).map_err(e)?;
        let a = b.add_node("Transpose", &["x"], vec![attr_ints("perm", &[1, 2, 0])]).map_err(e)?;
        let c = b.add_node("Transpose", &[&a], vec![attr_ints("perm", &[2, 0, 1])]).map_err(e)?;
        let r = b.add_node("Relu", &[&c], vec![]).map_err(e)?;
        let d = b.add_node("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1])]).map_err(e)?;
        let f = b.add_node("Transpose", &[&d], vec![attr_ints("perm", &[1, 0, 2])]).map_err(e)?;
        output(&mut b, &f).map_err(e)?;
        let mut g = import(b)?;
        let mut rng = Lcg::new(4);
        let inputs = random_inputs(&g, 1, &mut rng)?;
        check_pass(&MovementFolding, &mut g, &inputs, 0.0)?;
        // x→x is an identity (removed); the second pair becomes one Transpose.
        assert_eq!(count(&g, "Transpose"), 1, "{:?}", g.op_histogram());
        Ok(())
    }
}
