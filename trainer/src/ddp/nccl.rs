//! NCCL for CUDA gradients, through cudarc's raw bindings (loaded at run time, so a machine without CUDA still runs
//! everything else).
//!
//! This is the trainer's one place with `unsafe`: NCCL works on raw device pointers, which we take from libtorch
//! tensors. Every unsafe block sits in the smallest function that can establish its invariants.
//!
//! Setup on a GPU machine: cudarc opens `libnccl.so`, which pip's NCCL does not ship (only `libnccl.so.2`), and it
//! must be the very file libtorch_cuda loads, or two NCCLs clash; a `libnccl.so` symlink to libtorch's
//! `nvidia/nccl/lib/libnccl.so.2`, first on LD_LIBRARY_PATH, does both. [`nccl_available`] checks it.

use std::ffi::c_char;
use std::sync::Arc;

use cudarc::driver::CudaContext;
use cudarc::nccl::result::{self as nccl, NcclError, NcclStatus};
use cudarc::nccl::sys;
use tch::{Device, Kind, Tensor};

use crate::TrainError;

/// Bytes of an NCCL unique id, the token rank 0 creates and every rank needs to join the communicator.
pub const NCCL_ID_BYTES: usize = 128;

/// Checks, before any GPU work, that NCCL can be used here: the CUDA driver and libnccl can be loaded,
/// libtorch sees a CUDA device, and the libnccl cudarc loads is the one libtorch uses (not a second copy). Never
/// panics (cudarc itself panics when asked to call into a missing library).
pub fn nccl_available() -> Result<(), TrainError> {
    let (driver, nccl) = libraries_present();
    if !driver {
        return Err(TrainError::Distributed(
            "NCCL needs the CUDA driver library (libcuda.so), which is not installed on this machine".into(),
        ));
    }
    if !nccl {
        return Err(TrainError::Distributed(
            "NCCL library not found: cudarc loads it as `libnccl.so` (or `libnccl.so.<CUDA major>`), not by NCCL's \
             soname `libnccl.so.2`; put a `libnccl.so` symlink to the libnccl.so.2 that libtorch loads (pip's \
             nvidia/nccl/lib) in a directory on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    if !tch::Cuda::is_available() {
        return Err(TrainError::Distributed("NCCL: libtorch sees no CUDA device".into()));
    }
    // Loads libnccl for good (cudarc keeps it), so that the check below sees it.
    let version = nccl::get_nccl_version().map_err(|e| nccl_error("version", e))?;
    let loaded = loaded_nccl_files();
    if loaded.len() > 1 {
        // Each copy's internal calls resolve partly to the other (they export the same symbols), so a communicator
        // made by one looks corrupt to the other: fail here with the cause, not later with "invalid argument".
        return Err(TrainError::Distributed(format!(
            "two different NCCL libraries are loaded ({}): the `libnccl.so` that cudarc finds must be the very \
             file libtorch loads (pip's nvidia/nccl/lib/libnccl.so.2), e.g. a symlink to it first on LD_LIBRARY_PATH",
            loaded.join(", ")
        )));
    }
    tracing::debug!("NCCL {version} from {loaded:?}");
    Ok(())
}

/// Distinct libnccl files mapped into this process (Linux; empty where /proc is unreadable).
fn loaded_nccl_files() -> Vec<String> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return Vec::new() };
    let mut files: Vec<String> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.rsplit('/').next().is_some_and(|name| name.starts_with("libnccl.so")))
        .map(str::to_owned)
        .collect();
    files.sort();
    files.dedup();
    files
}

#[allow(unsafe_code)]
fn libraries_present() -> (bool, bool) {
    // SAFETY: both functions only dlopen the library by name and close it again; they touch no memory of ours
    // and are sound to call at any time (loading runs the library's initialisers, as any use of it would).
    unsafe { (cudarc::driver::sys::is_culib_present(), cudarc::nccl::sys::is_culib_present()) }
}

fn nccl_error(what: &str, err: NcclError) -> TrainError {
    TrainError::Distributed(format!("NCCL {what}: {:?}", err.0))
}

fn expect_success(what: &str, status: Result<NcclStatus, NcclError>) -> Result<(), TrainError> {
    match status {
        Ok(NcclStatus::Success) => Ok(()),
        // Only non-blocking communicators report "in progress", and ours are blocking.
        Ok(NcclStatus::InProgress | NcclStatus::NumResults) => {
            Err(TrainError::Distributed(format!("NCCL {what}: unexpected non-success status")))
        }
        Err(err) => Err(nccl_error(what, err)),
    }
}

/// A blocking NCCL communicator bound to one CUDA device; one per process and [`super::Ddp`].
pub struct NcclComm {
    comm: sys::ncclComm_t,
    device: usize,
    rank: usize,
    size: usize,
    /// Keeps the device's primary context (the one libtorch's runtime uses too) retained while `comm` lives.
    _context: Arc<CudaContext>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("device", &self.device)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl NcclComm {
    /// A fresh unique id (rank 0 makes it, then sends its bytes to the others).
    pub fn unique_id() -> Result<[u8; NCCL_ID_BYTES], TrainError> {
        nccl_available()?;
        let id = nccl::get_uniqueid().map_err(|e| nccl_error("get unique id", e))?;
        Ok(id.internal.map(|c| c.to_ne_bytes()[0]))
    }

    /// Joins the communicator `id` as `rank` of `size` on CUDA device `device`. Collective: blocks until all
    /// `size` ranks have called it with the same id.
    pub fn new(device: usize, rank: usize, size: usize, id: &[u8; NCCL_ID_BYTES]) -> Result<NcclComm, TrainError> {
        nccl_available()?;
        let count = i32::try_from(tch::Cuda::device_count()).unwrap_or(0);
        if i32::try_from(device).map_or(true, |d| d >= count) {
            return Err(TrainError::Distributed(format!("NCCL: no CUDA device {device} (libtorch sees {count})")));
        }
        let nranks = i32::try_from(size).map_err(|_| TrainError::Distributed(format!("NCCL: {size} ranks")))?;
        let rank_c = i32::try_from(rank)
            .ok()
            .filter(|r| *r < nranks)
            .ok_or_else(|| TrainError::Distributed(format!("NCCL: rank {rank} of {size}")))?;
        // ncclCommInitRank binds the communicator to the *current* device, so make it current first.
        let context =
            CudaContext::new(device).map_err(|e| TrainError::Distributed(format!("CUDA device {device}: {e:?}")))?;
        let id = sys::ncclUniqueId { internal: id.map(|b| c_char::from_ne_bytes([b])) };
        let comm = init_rank(nranks, id, rank_c)?;
        Ok(NcclComm { comm, device, rank, size, _context: context })
    }

    /// The CUDA device index this communicator runs on.
    pub fn device(&self) -> usize {
        self.device
    }

    /// Sums `tensor` over all ranks, in place. It must be a contiguous f32 tensor on this communicator's device.
    /// Collective (every rank calls it with the same element count) and asynchronous: the reduction is queued on
    /// libtorch's default CUDA stream, so later libtorch work on the tensor sees the result.
    #[allow(unsafe_code)]
    pub fn all_reduce_sum_(&self, tensor: &Tensor) -> Result<(), TrainError> {
        if !tensor.defined() || tensor.device() != Device::Cuda(self.device) {
            return Err(TrainError::Distributed(format!(
                "NCCL all-reduce: tensor is on {:?}, the communicator on cuda:{}",
                tensor.device(),
                self.device
            )));
        }
        if tensor.f_kind()? != Kind::Float || !tensor.is_contiguous() {
            return Err(TrainError::Distributed("NCCL all-reduce: needs a contiguous f32 tensor".into()));
        }
        let count = tensor.numel();
        if count == 0 {
            return Ok(());
        }
        let ptr = tensor.data_ptr();
        // SAFETY:
        // - `ptr` is the first element of a defined, contiguous CUDA tensor on this communicator's device, checked
        //   above, so `count` f32 elements from it are one valid device allocation, in bounds; dtype (ncclFloat32)
        //   and count match the tensor. Send and receive buffers being equal is NCCL's documented in-place mode.
        // - `tensor` is borrowed for this call, and libtorch's caching allocator only reuses freed memory for work
        //   queued later on the same stream; we queue on that stream, so the memory stays valid until the reduction
        //   has run, even if the caller drops the tensor right after.
        // - Stream: the null stream is CUDA's legacy default stream, which is the stream libtorch uses unless a
        //   caller has set another current stream (the trainer never does). The kernels that produced the tensor
        //   therefore run before the reduction and the kernels that read it after, with no extra synchronisation.
        // - `self.comm` came from a successful ncclCommInitRank and is destroyed only in Drop, so it is live.
        let status = unsafe {
            nccl::all_reduce(
                ptr,
                ptr,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        expect_success("all-reduce", status)
    }
}

#[allow(unsafe_code)]
fn init_rank(nranks: i32, id: sys::ncclUniqueId, rank: i32) -> Result<sys::ncclComm_t, TrainError> {
    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: `&mut comm` is a valid, writable out-pointer for the whole call; the id is passed by value and
    // `nranks`/`rank` were range-checked by the caller (NCCL validates them again). Library presence was checked
    // by `nccl_available`, so cudarc's loader does not panic.
    let status = unsafe { nccl::comm_init_rank(&mut comm, nranks, id, rank) };
    expect_success("init rank", status)?;
    if comm.is_null() {
        return Err(TrainError::Distributed("NCCL init rank returned no communicator".into()));
    }
    Ok(comm)
}

impl Drop for NcclComm {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: `self.comm` came from a successful ncclCommInitRank and is destroyed exactly once, here; NCCL
        // finishes the operations still queued on it before freeing it.
        let status = unsafe { nccl::comm_destroy(self.comm) };
        if let Err(err) = status {
            tracing::warn!("NCCL comm destroy: {:?}", err.0);
        }
    }
}
