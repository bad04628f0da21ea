use super::{Pass, PassContext, PassStats};
use crate::graph::{Graph, GraphError};

#[derive(Debug, Clone, Copy, Default)]
pub struct DeadNodeElimination;

impl Pass for DeadNodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = (graph, cx);
        Ok(PassStats::default())
    }
}
