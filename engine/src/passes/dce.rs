//! Dead-node elimination: a node none of whose outputs reaches a graph output
//! is removed (kiln's ops have no side effects).

use std::collections::HashSet;

use super::rewrite::remove_nodes;
use super::{Pass, PassContext, PassStats};
use crate::graph::{Graph, GraphError, ValueId};

#[derive(Debug, Clone, Copy, Default)]
pub struct DeadNodeElimination;

impl Pass for DeadNodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = cx;
        // A worklist from the outputs rather than one reverse sweep, so the pass does
        // not depend on the node order it is given.
        let producers = graph.producers();
        let mut live_nodes = vec![false; graph.nodes.len()];
        let mut seen: HashSet<ValueId> = HashSet::new();
        let mut work: Vec<ValueId> = graph.outputs.clone();
        while let Some(v) = work.pop() {
            if !seen.insert(v) {
                continue;
            }
            if let Some(&p) = producers.get(&v)
                && !live_nodes[p]
            {
                live_nodes[p] = true;
                work.extend(graph.nodes[p].inputs.iter().flatten().copied());
            }
        }
        let dead: HashSet<usize> = (0..graph.nodes.len()).filter(|&i| !live_nodes[i]).collect();
        remove_nodes(graph, &dead);
        let mut stats = PassStats { rewrites: dead.len(), notes: Vec::new() };
        if !dead.is_empty() {
            stats.notes.push(format!("{} dead node(s) removed", dead.len()));
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use kiln_onnx::GraphBuilder;

    use super::super::testing::*;
    use super::*;

    #[test]
    fn removes_only_unreachable_nodes() -> TestResult {
        let mut b = GraphBuilder::new("t");
        let x = input(&mut b, "x", &[-1, 4])?;
        let r = b.add_node("Relu", &[&x], vec![])?;
        let s = b.add_node("Sigmoid", &[&x], vec![])?;
        b.add_node("Tanh", &[&s], vec![])?;
        b.add_node("Add", &[&s, &r], vec![])?;
        let y = b.add_node("Tanh", &[&r], vec![])?;
        output(&mut b, &y)?;
        output(&mut b, &r)?;
        let mut g = import(b)?;
        // Reversed: the pass must not depend on the order it is given.
        let mut reversed = g.clone();
        reversed.nodes.reverse();
        assert_eq!(DeadNodeElimination.run(&mut reversed, &PassContext::default())?.rewrites, 3);
        assert_eq!(reversed.nodes.len(), 2);
        let inputs = random_inputs(&g, 3, &mut Lcg::new(1))?;
        let stats = check_pass(&DeadNodeElimination, &mut g, &inputs, 0.0)?;
        assert_eq!(stats.rewrites, 3);
        assert_eq!(g.op_histogram(), vec![("Relu".to_string(), 1), ("Tanh".to_string(), 1)]);
        Ok(())
    }
}
