//! Shape inference over a whole graph: each node's [`OpDef::infer`] in order,
//! recording output types and symbolic shape values.

use crate::graph::{Graph, GraphError, NodeIssue};
use crate::ops::{InferInput, registry};

/// Infers every node's output types in topological order. Values that carry a
/// constant keep the constant's type.
pub fn infer_shapes(graph: &mut Graph) -> Result<(), GraphError> {
    let reg = registry();
    for i in 0..graph.nodes.len() {
        let node = &graph.nodes[i];
        let issue = |reason: String| NodeIssue { node: node.name.clone(), op: node.op.clone(), reason };
        let Some(op) = reg.get(&node.op) else {
            return Err(GraphError::Unsupported(vec![issue("no such op in kiln".into())]));
        };
        let inputs: Vec<InferInput<'_>> = node
            .inputs
            .iter()
            .map(|v| match v {
                None => InferInput::default(),
                Some(v) => {
                    let val = &graph.values[*v];
                    InferInput { ty: val.ty.as_ref(), constant: val.constant.as_deref(), sym: val.sym.as_deref() }
                }
            })
            .collect();
        let out = op.infer(node, &inputs).map_err(|r| GraphError::Inference(issue(r)))?;
        if out.len() < node.outputs.len() {
            return Err(GraphError::Inference(issue(format!(
                "inferred {} outputs, node has {}",
                out.len(),
                node.outputs.len()
            ))));
        }
        let outputs = node.outputs.clone();
        for (v, inferred) in outputs.into_iter().zip(out) {
            let val = &mut graph.values[v];
            if val.constant.is_none() {
                val.ty = Some(inferred.ty);
                val.sym = inferred.sym;
            }
        }
    }
    Ok(())
}
