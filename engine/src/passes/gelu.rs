use super::{Pass, PassContext, PassStats};
use crate::graph::{Graph, GraphError};

#[derive(Debug, Clone, Copy, Default)]
pub struct GeluFusion;

impl Pass for GeluFusion {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = (graph, cx);
        Ok(PassStats::default())
    }
}
