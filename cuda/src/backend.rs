//! The CUDA engine behind kiln-engine's [`Backend`] trait, so the server's
//! executors drive it like any other backend: one [`ExecutionContext`] (one
//! stream, one arena, its CUDA graphs) per executor thread, sharing one
//! [`Engine`] (weights uploaded once).

use std::sync::Arc;

use kiln_engine::{Backend, EngineError, ModelMetadata, Tensor};

use crate::CudaError;
use crate::engine::{Engine, ExecutionContext};

#[derive(Debug)]
pub struct CudaBackend {
    ctx: ExecutionContext,
}

impl CudaBackend {
    /// A backend on a new execution context of `engine`, with every batch
    /// bucket prepared when the engine uses buckets.
    pub fn new(engine: &Arc<Engine>) -> Result<Self, CudaError> {
        let mut ctx = engine.context()?;
        let prepared = ctx.prepare_buckets()?;
        if prepared > 0 {
            tracing::info!(buckets = prepared, "CUDA graphs captured for every batch bucket");
        }
        Ok(Self { ctx })
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "kiln-cuda"
    }

    fn precision(&self) -> &'static str {
        self.ctx.engine().precision_name()
    }

    fn metadata(&self) -> &ModelMetadata {
        self.ctx.engine().metadata()
    }

    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, EngineError> {
        self.ctx.run(inputs).map_err(EngineError::from)
    }
}
