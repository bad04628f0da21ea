//! The toolchain's and the pipeline's only `unsafe` calls into cudarc, each wrapped in a safe
//! function. Everything else in the crate stays under the workspace's `deny(unsafe_code)`.
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{CudaContext, DriverError, PinnedHostSlice};

/// Whether the CUDA driver library (`libcuda.so`) can be opened.
pub(crate) fn driver_library_present() -> bool {
    // SAFETY: only dlopen()s candidate library names and drops the handle; no symbol is
    // resolved or called, so nothing runs that could misbehave without a driver.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NVRTC library (`libnvrtc.so*`) can be opened.
pub(crate) fn nvrtc_library_present() -> bool {
    // SAFETY: as above: a dlopen() probe only.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's (major, minor) version. Callers must have checked [`nvrtc_library_present`]:
/// cudarc panics when it has to load a library that is not there.
pub(crate) fn nvrtc_version() -> Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (precondition above), and both out-pointers point to
    // live, writable locals for the duration of the call.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// `len` bytes of page-locked host memory, zeroed. Plain (cacheable) pinned memory rather than
/// cudarc's default write-combined kind: staging code (image decoders) may read what it wrote,
/// and host reads of write-combined memory are uncached and very slow.
pub(crate) fn alloc_pinned_zeroed(ctx: &Arc<CudaContext>, len: usize) -> Result<PinnedHostSlice<u8>, DriverError> {
    // SAFETY: cuMemHostAlloc returns uninitialised memory; it is zeroed right below, before
    // any safe code can read it through `as_slice`/`as_mut_slice`.
    let mut buf = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }?;
    let ptr = buf.as_mut_ptr()?;
    // SAFETY: `ptr` is valid for `len` bytes (the allocation above) and nothing else aliases it yet.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    Ok(buf)
}
