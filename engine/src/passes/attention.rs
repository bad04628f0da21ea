use super::{Pass, PassContext, PassStats};
use crate::graph::{Graph, GraphError};

#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionFusion;

impl Pass for AttentionFusion {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = (graph, cx);
        Ok(PassStats::default())
    }
}
