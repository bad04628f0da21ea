//! The op registry. Every op is one module implementing [`OpDef`]: attribute
//! checks (at import), shape inference (with symbolic dims and, for shape
//! subgraphs, symbolic values), and a CPU reference evaluation. Groups register
//! their ops in [`registry`]; adding an op means adding one module and one line.

mod logic;
mod math;
pub(crate) mod nn;
mod shape;
pub mod util;

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::Tensor;
use crate::graph::{Dim, Node, ValueType};

/// What shape inference knows about one input of a node.
#[derive(Debug, Clone, Copy, Default)]
pub struct InferInput<'a> {
    pub ty: Option<&'a ValueType>,
    /// The tensor itself when the input is a constant.
    pub constant: Option<&'a Tensor>,
    /// Symbolic contents of a small integer tensor (a shape being computed).
    pub sym: Option<&'a [Dim]>,
}

/// What shape inference derived for one output.
#[derive(Debug, Clone, PartialEq)]
pub struct Inferred {
    pub ty: ValueType,
    pub sym: Option<Vec<Dim>>,
}

impl Inferred {
    pub fn new(ty: ValueType) -> Self {
        Self { ty, sym: None }
    }

    pub fn with_sym(ty: ValueType, sym: Vec<Dim>) -> Self {
        Self { ty, sym: Some(sym) }
    }
}

/// One operator. Errors are plain messages; callers attach the node.
pub trait OpDef: Send + Sync {
    /// ONNX op type (`Conv`) or kiln's fused op name (`kiln.FusedConv`).
    fn name(&self) -> &'static str;

    /// Rejects attribute values this implementation does not support. Runs at
    /// import so that every unsupported node is reported at once.
    fn check(&self, node: &Node) -> Result<(), String> {
        let _ = node;
        Ok(())
    }

    /// Output types from input types (one entry per `node.inputs`, default for
    /// an omitted optional input). Unknown dims should become fresh symbols or
    /// `shape: None` rather than errors; errors are for real inconsistencies.
    fn infer(&self, node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String>;

    /// Reference CPU evaluation, FP32 math (one entry per `node.inputs`).
    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String>;
}

pub struct Registry {
    ops: HashMap<&'static str, Box<dyn OpDef>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("ops", &self.names()).finish()
    }
}

impl Registry {
    fn new() -> Self {
        Self { ops: HashMap::new() }
    }

    pub(crate) fn add(&mut self, op: impl OpDef + 'static) {
        self.ops.insert(op.name(), Box::new(op));
    }

    pub fn get(&self, op: &str) -> Option<&dyn OpDef> {
        self.ops.get(op).map(AsRef::as_ref)
    }

    /// Every registered op name, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.ops.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// The process-wide registry of every op kiln implements.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut r = Registry::new();
        nn::register(&mut r);
        shape::register(&mut r);
        math::register(&mut r);
        logic::register(&mut r);
        r
    })
}
