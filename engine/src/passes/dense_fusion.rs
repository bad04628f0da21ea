use super::{Pass, PassContext, PassStats};
use crate::graph::{Graph, GraphError};

#[derive(Debug, Clone, Copy, Default)]
pub struct DenseFusion;

impl Pass for DenseFusion {
    fn name(&self) -> &'static str {
        "dense_fusion"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = (graph, cx);
        Ok(PassStats::default())
    }
}
