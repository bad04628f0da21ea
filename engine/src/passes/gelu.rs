//! GELU recognition. Exporters without an opset-20 Gelu write it out:
//!
//! ```text
//! exact: x · 0.5 · (1 + Erf(x / √2))          (x · 0.7071… for the division)
//! tanh:  x · 0.5 · (1 + Tanh(√(2/π) · (x + 0.044715 · x³)))
//! ```
//!
//! with the 0.5 applied to x first, to (1 + …), or to the product last, and
//! x³ as Pow(x, 3), Mul(x, Mul(x, x)) or Mul(Mul(x, x), x). Each becomes one
//! `Gelu` with `approximate` "none" or "tanh".

use std::f64::consts::{FRAC_1_SQRT_2, PI, SQRT_2};

use super::rewrite::{Index, Rewriter, is_scalar, near, other_input, scalar_operand};
use super::{Pass, PassContext, PassStats};
use crate::graph::{Attr, Graph, GraphError, Node, ValueId};

#[derive(Debug, Clone, Copy, Default)]
pub struct GeluFusion;

impl Pass for GeluFusion {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = cx;
        let idx = Index::new(graph);
        let mut rw = Rewriter::new();
        let (mut exact, mut tanh) = (0, 0);
        for i in 0..graph.nodes.len() {
            if rw.is_claimed(i) {
                continue;
            }
            let (m, approximate) = match graph.nodes[i].op.as_str() {
                "Erf" => (match_erf(graph, &idx, i), "none"),
                "Tanh" => (match_tanh(graph, &idx, i), "tanh"),
                _ => continue,
            };
            let Some(m) = m else { continue };
            let last = &graph.nodes[m.last];
            let fused = Node::new(format!("{}_gelu", last.name), "Gelu", vec![Some(m.x)], last.outputs.clone())
                .with_attr("approximate", Attr::String(approximate.into()));
            if rw.fuse(graph, &idx, &m.nodes, m.last, fused) {
                if approximate == "none" {
                    exact += 1;
                } else {
                    tanh += 1;
                }
            }
        }
        let fusions = rw.apply(graph);
        let mut stats = PassStats { rewrites: fusions, notes: Vec::new() };
        if exact > 0 {
            stats.notes.push(format!("Gelu(erf) ×{exact}"));
        }
        if tanh > 0 {
            stats.notes.push(format!("Gelu(tanh) ×{tanh}"));
        }
        Ok(stats)
    }
}

struct Match {
    x: ValueId,
    nodes: Vec<usize>,
    last: usize,
}

/// `Erf(x / √2)` or `Erf(x · (1/√2))`, then the common tail.
fn match_erf(g: &Graph, idx: &Index, erf_i: usize) -> Option<Match> {
    let arg = g.nodes[erf_i].input(0)?;
    let scale_i = idx.producer(arg)?;
    let scale = &g.nodes[scale_i];
    let (x, c) = scalar_operand(g, scale)?;
    let ok = match scale.op.as_str() {
        "Div" => near(c, SQRT_2),
        "Mul" => near(c, FRAC_1_SQRT_2),
        _ => false,
    };
    if !ok {
        return None;
    }
    let mut nodes = vec![scale_i, erf_i];
    let last = match_tail(g, idx, erf_i, x, &mut nodes)?;
    Some(Match { x, nodes, last })
}

/// `Tanh(√(2/π) · (x + 0.044715 · x³))`, then the common tail.
fn match_tanh(g: &Graph, idx: &Index, tanh_i: usize) -> Option<Match> {
    let arg = g.nodes[tanh_i].input(0)?;
    let (outer_i, outer) = idx.producer_op(g, arg, "Mul")?;
    let (sum, c) = scalar_operand(g, outer)?;
    if !near(c, (2.0 / PI).sqrt()) {
        return None;
    }
    let (add_i, add) = idx.producer_op(g, sum, "Add")?;
    // One operand of the sum is 0.044715 · x³ and the other is x itself.
    for (k, x) in [(add.input(0)?, add.input(1)?), (add.input(1)?, add.input(0)?)] {
        let Some((kappa_i, kappa)) = idx.producer_op(g, k, "Mul") else { continue };
        let Some((cube, c)) = scalar_operand(g, kappa) else { continue };
        if !near(c, 0.044715) {
            continue;
        }
        let Some(cube_nodes) = match_cube(g, idx, cube, x) else { continue };
        let mut nodes = vec![outer_i, add_i, kappa_i, tanh_i];
        nodes.extend(cube_nodes);
        let Some(last) = match_tail(g, idx, tanh_i, x, &mut nodes) else { continue };
        return Some(Match { x, nodes, last });
    }
    None
}

/// The nodes computing `x³` into `v`: Pow(x, 3), or x · x · x in either nesting.
fn match_cube(g: &Graph, idx: &Index, v: ValueId, x: ValueId) -> Option<Vec<usize>> {
    let i = idx.producer(v)?;
    let n = &g.nodes[i];
    match n.op.as_str() {
        "Pow" if n.input(0) == Some(x) && n.input(1).is_some_and(|e| is_scalar(g, e, 3.0)) => Some(vec![i]),
        "Mul" => {
            let sq = other_input(n, x)?;
            let (sq_i, sq_node) = idx.producer_op(g, sq, "Mul")?;
            (sq_node.input(0) == Some(x) && sq_node.input(1) == Some(x)).then(|| vec![i, sq_i])
        }
        _ => None,
    }
}

/// From `f` = Erf/Tanh node: `p = 1 + f`, then `x · 0.5 · p` in one of its
/// orderings. Pushes the matched nodes and returns the last one.
fn match_tail(g: &Graph, idx: &Index, f_i: usize, x: ValueId, nodes: &mut Vec<usize>) -> Option<usize> {
    let f = *g.nodes[f_i].outputs.first()?;
    let (one_i, one) = idx.sole_reader_op(g, f, &["Add"])?;
    if !scalar_operand(g, one).is_some_and(|(v, c)| v == f && near(c, 1.0)) {
        return None;
    }
    nodes.push(one_i);
    let p = *one.outputs.first()?;
    let (m1_i, m1) = idx.sole_reader_op(g, p, &["Mul"])?;
    nodes.push(m1_i);
    let q = other_input(m1, p)?;
    let m1_out = *m1.outputs.first()?;
    if q == x {
        // (x · p) · 0.5
        let (m2_i, m2) = idx.sole_reader_op(g, m1_out, &["Mul"])?;
        scalar_operand(g, m2).filter(|&(v, c)| v == m1_out && near(c, 0.5))?;
        nodes.push(m2_i);
        return Some(m2_i);
    }
    if is_scalar(g, q, 0.5) {
        // (0.5 · p) · x
        let (m2_i, m2) = idx.sole_reader_op(g, m1_out, &["Mul"])?;
        if other_input(m2, m1_out)? != x {
            return None;
        }
        nodes.push(m2_i);
        return Some(m2_i);
    }
    // (x · 0.5) · p, the half computed from x on its own.
    let (h_i, h) = idx.producer_op(g, q, "Mul")?;
    scalar_operand(g, h).filter(|&(v, c)| v == x && near(c, 0.5))?;
    nodes.push(h_i);
    Some(m1_i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::testing::{Tb, check_pass, count, random};
    use crate::passes::{PassContext, run_pass};

    #[derive(Clone, Copy, Debug)]
    enum Half {
        First,
        OnSum,
        Last,
    }

    /// `x · 0.5 · p` with the half placed as `half` says; `swap` flips operand order.
    fn tail(b: &mut Tb, x: ValueId, f: ValueId, half: Half, swap: bool) -> ValueId {
        let one = b.scalar(1.0);
        let p = if swap { b.node("Add", &[one, f]) } else { b.node("Add", &[f, one]) };
        let h = b.scalar(0.5);
        let ordered =
            |b: &mut Tb, a: ValueId, c: ValueId| if swap { b.node("Mul", &[c, a]) } else { b.node("Mul", &[a, c]) };
        match half {
            Half::First => {
                let xh = ordered(b, x, h);
                ordered(b, xh, p)
            }
            Half::OnSum => {
                let ph = ordered(b, p, h);
                ordered(b, x, ph)
            }
            Half::Last => {
                let xp = ordered(b, x, p);
                ordered(b, xp, h)
            }
        }
    }

    fn erf_graph(div: bool, half: Half, swap: bool) -> Graph {
        let mut b = Tb::new();
        let x = b.input("x", &[3, 7]);
        let s = if div {
            let c = b.scalar(std::f32::consts::SQRT_2);
            b.node("Div", &[x, c])
        } else {
            let c = b.scalar(std::f32::consts::FRAC_1_SQRT_2);
            if swap { b.node("Mul", &[c, x]) } else { b.node("Mul", &[x, c]) }
        };
        let e = b.node("Erf", &[s]);
        let y = tail(&mut b, x, e, half, swap);
        b.finish(&[y]).expect("build")
    }

    fn tanh_graph(cube: u8, half: Half, swap: bool) -> Graph {
        let mut b = Tb::new();
        let x = b.input("x", &[3, 7]);
        let x3 = match cube {
            0 => {
                let three = b.scalar(3.0);
                b.node("Pow", &[x, three])
            }
            1 => {
                let sq = b.node("Mul", &[x, x]);
                b.node("Mul", &[x, sq])
            }
            _ => {
                let sq = b.node("Mul", &[x, x]);
                b.node("Mul", &[sq, x])
            }
        };
        let kappa = b.scalar(0.044715);
        let k = if swap { b.node("Mul", &[kappa, x3]) } else { b.node("Mul", &[x3, kappa]) };
        let sum = if swap { b.node("Add", &[k, x]) } else { b.node("Add", &[x, k]) };
        let beta = b.scalar(0.797_884_6);
        let inner = if swap { b.node("Mul", &[beta, sum]) } else { b.node("Mul", &[sum, beta]) };
        let t = b.node("Tanh", &[inner]);
        let y = tail(&mut b, x, t, half, swap);
        b.finish(&[y]).expect("build")
    }

    /// Runs the pass on `g` and checks it became one `Gelu` with `approximate`,
    /// producing the original output value.
    fn assert_one_gelu(mut g: Graph, x: &crate::Tensor, approximate: &str, what: &str) {
        let out_name = g.value(g.outputs[0]).name.clone();
        let stats = check_pass(&GeluFusion, &mut g, std::slice::from_ref(x), 1e-5).expect(what);
        assert_eq!(stats.rewrites, 1, "{what}");
        assert_eq!(g.nodes.len(), 1, "{what}");
        assert_eq!(g.nodes[0].op, "Gelu", "{what}");
        assert_eq!(g.nodes[0].attrs.string("approximate", ""), Ok(approximate.to_string()), "{what}");
        assert_eq!(g.value(g.outputs[0]).name, out_name, "{what}");
    }

    #[test]
    fn erf_forms_fuse_to_exact_gelu() {
        let x = random(&[3, 7], 11, 4.0);
        for div in [true, false] {
            for half in [Half::First, Half::OnSum, Half::Last] {
                for swap in [false, true] {
                    let what = format!("div={div} half={half:?} swap={swap}");
                    assert_one_gelu(erf_graph(div, half, swap), &x, "none", &what);
                }
            }
        }
    }

    #[test]
    fn tanh_forms_fuse_to_tanh_gelu() {
        let x = random(&[3, 7], 12, 4.0);
        for cube in 0..3 {
            for half in [Half::First, Half::OnSum, Half::Last] {
                for swap in [false, true] {
                    let what = format!("cube={cube} half={half:?} swap={swap}");
                    assert_one_gelu(tanh_graph(cube, half, swap), &x, "tanh", &what);
                }
            }
        }
    }

    #[test]
    fn wrong_constants_or_escaping_values_are_left_alone() {
        // 1/1.5 is no GELU constant.
        let mut b = Tb::new();
        let x = b.input("x", &[2, 5]);
        let c = b.scalar(1.5);
        let s = b.node("Div", &[x, c]);
        let e = b.node("Erf", &[s]);
        let y = tail(&mut b, x, e, Half::Last, false);
        let mut g = b.finish(&[y]).expect("build");
        assert_eq!(run_pass(&GeluFusion, &mut g, &PassContext::default()).expect("pass").rewrites, 0);
        assert_eq!(count(&g, "Erf"), 1);

        // The Erf result is also read elsewhere.
        let mut b = Tb::new();
        let x = b.input("x", &[2, 5]);
        let c = b.scalar(std::f32::consts::SQRT_2);
        let s = b.node("Div", &[x, c]);
        let e = b.node("Erf", &[s]);
        let y = tail(&mut b, x, e, Half::First, false);
        let mut g = b.finish(&[y, e]).expect("build");
        assert_eq!(run_pass(&GeluFusion, &mut g, &PassContext::default()).expect("pass").rewrites, 0);
        assert_eq!(count(&g, "Gelu"), 0);
    }
}
