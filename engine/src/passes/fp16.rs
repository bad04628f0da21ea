use super::{Pass, PassContext, PassStats};
use crate::graph::{Graph, GraphError};

#[derive(Debug, Clone, Copy, Default)]
pub struct Fp16Assignment;

impl Pass for Fp16Assignment {
    fn name(&self) -> &'static str {
        "fp16"
    }

    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
        let _ = (graph, cx);
        Ok(PassStats::default())
    }
}
pub const FP32_OPS: &[&str] = &[];
