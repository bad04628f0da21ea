//! GPU tests: NVRTC compile on first use, the disk cache (hit, damaged entry), module reuse.
#![allow(unsafe_code)] // kernel launches are `unsafe` in cudarc

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg};
use kiln_kernels::KernelError;
use kiln_kernels::sources::{self, KernelSource};
use kiln_kernels::toolchain::{self, Gpu};

/// A tiny kernel for the toolchain and pipeline tests: `out[i] = in[i] * k + 1`.
pub const SCALE: KernelSource = KernelSource {
    name: "test_scale",
    source: r#"extern "C" __global__ void kiln_test_scale(const unsigned char* in, float* out, int n, float k) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) out[i] = (float)in[i] * k + 1.0f;
    }"#,
    functions: &["kiln_test_scale"],
};

pub fn expected(input: &[u8], k: f32) -> Vec<f32> {
    input.iter().map(|&b| b as f32 * k + 1.0).collect()
}

/// Launches [`SCALE`] on `stream` over the first `input.len()` elements.
pub fn launch_scale(
    f: &CudaFunction,
    stream: &Arc<CudaStream>,
    input: &CudaView<'_, u8>,
    out: &mut CudaSlice<f32>,
    k: f32,
) -> Result<(), KernelError> {
    let n = i32::try_from(input.len()).map_err(|_| KernelError::InvalidArgument("too long".into()))?;
    let mut b = stream.launch_builder(f);
    b.arg(input).arg(out).arg(&n).arg(&k);
    // SAFETY: the argument list matches kiln_test_scale's signature; `out` holds ≥ n floats
    // (callers allocate it from the same length) and the grid covers exactly n threads' worth.
    unsafe { b.launch(LaunchConfig::for_num_elems(n.max(1) as u32)) }
        .map(|_| ())
        .map_err(|e| KernelError::Driver(format!("launch: {e:?}")))
}

fn temp_cache(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-gpu-cache-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn opens_and_reports_arch() {
    let Some(gpu) = crate::gpu() else { return };
    assert!(gpu.arch().starts_with("sm_"), "{}", gpu.arch());
    assert!(toolchain::cuda_available().is_ok());
    println!("device: {} ({}), NVRTC {:?}", gpu.name(), gpu.arch(), toolchain::nvrtc_version());
}

#[test]
fn every_kernel_loads_on_this_device() {
    let Some(gpu) = crate::gpu() else { return };
    for src in sources::ALL {
        for f in src.functions {
            gpu.function(src, f).unwrap_or_else(|e| panic!("{}::{f}: {e}", src.name));
        }
    }
    assert!(matches!(gpu.function(&sources::PREPROCESS, "nope"), Err(KernelError::InvalidArgument(_))));
}

#[test]
fn compiled_kernel_runs_and_cache_is_used_then_repaired() {
    let Some(mut gpu) = crate::gpu() else { return };
    let dir = temp_cache("run");
    gpu.set_cache_dir(Some(dir.clone()));
    let f = gpu.function(&SCALE, "kiln_test_scale").expect("compile + load");
    let entries: Vec<_> = std::fs::read_dir(&dir).expect("cache dir written").flatten().map(|e| e.path()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    assert!(toolchain::read_cache_entry(entry).is_some_and(|p| p.contains(".entry kiln_test_scale")));

    let input: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
    let stream = &gpu.stream;
    let dev = stream.clone_htod(&input).expect("htod");
    let mut out = stream.alloc_zeros::<f32>(input.len()).expect("alloc");
    launch_scale(&f, stream, &dev.slice(..), &mut out, 0.5).expect("launch");
    assert_eq!(stream.clone_dtoh(&out).expect("dtoh"), expected(&input, 0.5));

    // A second Gpu reads the entry (same bytes, not rewritten) ...
    let before = std::fs::metadata(entry).and_then(|m| m.modified()).expect("mtime");
    let mut again = Gpu::open(0).expect("open");
    again.set_cache_dir(Some(dir.clone()));
    again.function(&SCALE, "kiln_test_scale").expect("from cache");
    assert_eq!(std::fs::metadata(entry).and_then(|m| m.modified()).expect("mtime"), before);
    // ... and a damaged entry is recompiled and rewritten, not an error.
    std::fs::write(entry, b"// kiln-kernel-cache sha256:00\ngarbage").expect("damage");
    let mut third = Gpu::open(0).expect("open");
    third.set_cache_dir(Some(dir.clone()));
    third.function(&SCALE, "kiln_test_scale").expect("recompiled");
    assert!(toolchain::read_cache_entry(entry).is_some(), "entry repaired");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compile_errors_carry_the_nvrtc_log() {
    let Some(gpu) = crate::gpu() else { return };
    let bad =
        KernelSource { name: "broken", source: "extern \"C\" __global__ void f() { nope(); }", functions: &["f"] };
    match gpu.function(&bad, "f") {
        Err(KernelError::Compile { log, .. }) => assert!(log.contains("nope"), "{log}"),
        other => panic!("expected Compile, got {other:?}"),
    }
}
