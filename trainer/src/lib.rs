//! kiln's trainer: models written once over [`ops::Ops`], computed by libtorch
//! ([`eager`]) and exported to ONNX by kiln's own tracer ([`export`]); datasets and a
//! multi-threaded loader ([`data`]); AdamW, warm-up + cosine, clipping and loss scaling
//! ([`optim`]); the data-parallel training loop ([`train`], [`ddp`]); checkpoints that
//! resume exactly ([`checkpoint`]); and `kiln-train export` ([`package`]).

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod ddp;
pub mod eager;
pub mod error;
pub mod export;
pub mod log;
pub mod models;
pub mod ops;
pub mod optim;
pub mod package;
pub mod train;

pub use error::TrainError;
