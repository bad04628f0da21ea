//! The embedded kernel sources: one entry per `.cu` file under `kernels/cu/`.

/// `cu/common.cuh` (FP16 conversions, warp sums) followed by the `.cu` file: NVRTC has no
/// include path here, so shared device code is prepended to the source text (and so is part
/// of every cache key).
macro_rules! with_common {
    ($file:literal) => {
        concat!(include_str!("../cu/common.cuh"), include_str!($file))
    };
}

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

pub const CAST: KernelSource =
    KernelSource { name: "cast", source: with_common!("../cu/cast.cu"), functions: &["kiln_cast"] };

pub const COPY: KernelSource =
    KernelSource { name: "copy", source: include_str!("../cu/copy.cu"), functions: &["kiln_copy_strided"] };

pub const ELEMENTWISE: KernelSource = KernelSource {
    name: "elementwise",
    source: include_str!("../cu/elementwise.cu"),
    functions: &["kiln_elementwise"],
};

pub const POOL: KernelSource = KernelSource {
    name: "pool",
    source: with_common!("../cu/pool.cu"),
    functions: &[
        "kiln_pool2d_f32",
        "kiln_pool2d_f16",
        "kiln_global_avg_pool_nchw_f32",
        "kiln_global_avg_pool_nchw_f16",
        "kiln_global_avg_pool_nhwc_f32",
        "kiln_global_avg_pool_nhwc_f16",
    ],
};

pub const SOFTMAX: KernelSource = KernelSource {
    name: "softmax",
    source: with_common!("../cu/softmax.cu"),
    functions: &[
        "kiln_softmax_warp_f32_f32",
        "kiln_softmax_warp_f32_f16",
        "kiln_softmax_warp_f16_f32",
        "kiln_softmax_warp_f16_f16",
        "kiln_softmax_block_f32_f32",
        "kiln_softmax_block_f32_f16",
        "kiln_softmax_block_f16_f32",
        "kiln_softmax_block_f16_f16",
    ],
};

pub const LAYERNORM: KernelSource = KernelSource {
    name: "layernorm",
    source: with_common!("../cu/layernorm.cu"),
    functions: &[
        "kiln_layernorm_f32_f32",
        "kiln_layernorm_f32_f16",
        "kiln_layernorm_f16_f32",
        "kiln_layernorm_f16_f16",
    ],
};

pub const GATHER: KernelSource =
    KernelSource { name: "gather", source: include_str!("../cu/gather.cu"), functions: &["kiln_gather"] };

pub const REDUCE: KernelSource = KernelSource {
    name: "reduce",
    source: with_common!("../cu/reduce.cu"),
    functions: &[
        "kiln_reduce_rows_f32_f32",
        "kiln_reduce_rows_f32_f16",
        "kiln_reduce_rows_f16_f32",
        "kiln_reduce_rows_f16_f16",
        "kiln_reduce_cols_f32_f32",
        "kiln_reduce_cols_f32_f16",
        "kiln_reduce_cols_f16_f32",
        "kiln_reduce_cols_f16_f16",
    ],
};

pub const ATTENTION: KernelSource = KernelSource {
    name: "attention",
    source: with_common!("../cu/attention.cu"),
    functions: &[
        "kiln_attention_f32_mf32",
        "kiln_attention_f32_mf16",
        "kiln_attention_f16_mf32",
        "kiln_attention_f16_mf16",
    ],
};

/// Quantisation into INT8 and the requantising epilogue of INT8 layers.
pub const QUANT: KernelSource = KernelSource {
    name: "quant",
    source: with_common!("../cu/quant.cu"),
    functions: &["kiln_quantize", "kiln_requant", "kiln_dwconv_i8"],
};

/// Every kernel kiln has (what the NVRTC/ptxas CI check compiles).
pub const ALL: &[KernelSource] =
    &[PREPROCESS, CAST, COPY, ELEMENTWISE, POOL, SOFTMAX, LAYERNORM, GATHER, REDUCE, ATTENTION, QUANT];
