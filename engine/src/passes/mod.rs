//! Optimisation passes. Each pass is its own module implementing [`Pass`]; the
//! runner re-sorts, re-infers shapes and compacts the graph after every pass,
//! so a pass only has to leave a valid graph (it may append nodes anywhere and
//! leave dead ones behind for dead-node elimination).

mod attention;
mod bn_fold;
mod const_fold;
mod conv_fusion;
mod dce;
mod dense_fusion;
mod fp16;
mod gelu;
mod layer_norm;
mod layout;
mod movement;
mod qdq;
mod rewrite;
mod shape_fold;
#[cfg(test)]
pub(crate) mod testing;

pub use attention::AttentionFusion;
pub use bn_fold::BatchNormFold;
pub use const_fold::ConstantFolding;
pub use conv_fusion::ConvFusion;
pub use dce::DeadNodeElimination;
pub use dense_fusion::DenseFusion;
pub use fp16::{FP32_OPS, Fp16Assignment};
pub use gelu::GeluFusion;
pub use layer_norm::LayerNormFusion;
pub use layout::NhwcLayout;
pub use movement::MovementFolding;
pub use qdq::QdqFolding;
pub use shape_fold::ShapeFolding;

use crate::graph::{Graph, GraphError, Precision};

/// Settings every pass may consult.
#[derive(Debug, Clone)]
pub struct PassContext {
    /// Precision the build targets; `F16` runs FP16 assignment.
    pub precision: Precision,
    /// Convert convolution regions to NHWC.
    pub nhwc: bool,
    /// Constant folding leaves results larger than this unfolded (bytes).
    pub fold_limit_bytes: usize,
}

impl Default for PassContext {
    fn default() -> Self {
        Self { precision: Precision::F32, nhwc: false, fold_limit_bytes: 64 << 20 }
    }
}

/// What a pass did, for the build report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Rewrites made (folds, fusions, nodes removed…).
    pub rewrites: usize,
    /// Human-readable details, e.g. `Conv+Add+Relu ×16`.
    pub notes: Vec<String>,
}

pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError>;
}

/// The default pipeline, in order.
pub fn pipeline(cx: &PassContext) -> Vec<Box<dyn Pass>> {
    let mut passes: Vec<Box<dyn Pass>> = vec![
        Box::new(ConstantFolding),
        Box::new(ShapeFolding),
        Box::new(MovementFolding),
        Box::new(DeadNodeElimination),
        Box::new(ConstantFolding),
        Box::new(LayerNormFusion),
        Box::new(GeluFusion),
        Box::new(BatchNormFold),
        Box::new(ConvFusion),
        Box::new(DenseFusion),
        Box::new(AttentionFusion),
        Box::new(QdqFolding),
    ];
    if cx.nhwc {
        passes.push(Box::new(NhwcLayout));
        // The layout change can meet a transpose already there (a UINT8 NHWC image input
        // turned NCHW for the model): fold the pair.
        passes.push(Box::new(MovementFolding));
    }
    if cx.precision == Precision::F16 {
        passes.push(Box::new(Fp16Assignment));
    }
    passes.push(Box::new(DeadNodeElimination));
    passes
}

/// Runs one pass and restores the graph invariants (order, types, no unused values).
pub fn run_pass(pass: &dyn Pass, graph: &mut Graph, cx: &PassContext) -> Result<PassStats, GraphError> {
    let stats = pass.run(graph, cx)?;
    graph.toposort()?;
    crate::infer::infer_shapes(graph)?;
    graph.compact();
    Ok(stats)
}
