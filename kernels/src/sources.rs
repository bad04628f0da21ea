//! The embedded kernel sources: one entry per `.cu` file under `kernels/cu/`.

/// One `.cu` file and the `extern "C"` functions it defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    /// Short name, used in logs, errors and cache file names.
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

pub const PREPROCESS: KernelSource =
    KernelSource { name: "preprocess", source: include_str!("../cu/preprocess.cu"), functions: &["kiln_preprocess"] };

/// Every kernel kiln has (what the NVRTC/ptxas CI check compiles).
pub const ALL: &[KernelSource] = &[PREPROCESS];
