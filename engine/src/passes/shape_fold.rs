use super::{Pass, PassContext, PassStats};
use crate::graph::{Graph, GraphError};

#[derive(Debug, Clone, Copy, Default)]
pub struct ShapeFolding;

impl Pass for ShapeFolding {
    fn name(&self) -> &'static str {
        "shape_fold"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = (graph, cx);
        Ok(PassStats::default())
    }
}
