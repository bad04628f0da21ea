//! Pinned-memory staging and two-stream overlap: the H2D copy of batch i+1 runs on a copy stream
//! while the kernels of batch i run on a compute stream.
//!
//! A [`Pipeline`] owns a fixed pool of slots, each a pinned host buffer plus a device buffer of
//! the same size, allocated once and reused. Per batch:
//! 1. [`Pipeline::acquire`] (or [`Pipeline::stage`]) hands out a free slot's pinned buffer, to be
//!    filled on any CPU thread (e.g. decoding JPEGs straight into it); it blocks while every slot
//!    is in use, which bounds memory and applies back-pressure to the producers;
//! 2. [`Pipeline::submit`] enqueues the H2D copy on the copy stream, makes the compute stream wait
//!    for it (an event, not a host sync), and calls the caller's launch closure with the compute
//!    stream and the device buffer; the slot then returns to the pool at once.
//!
//! Two events per slot keep reuse safe without host synchronisation on the hot path: `copied`
//! (recorded after the H2D; the pinned buffer may be overwritten once it completes) and
//! `consumed` (recorded after the launch; the next H2D into the slot's device buffer waits for it).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, CudaView, PinnedHostSlice};

use crate::KernelError;
use crate::toolchain::Gpu;

/// Size of the slot pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Number of slots (≥ 2 for any overlap; 3 lets CPU staging run ahead of both streams).
    pub slots: usize,
    /// Bytes per slot: the largest batch input that will be staged.
    pub slot_bytes: usize,
}

struct Slot {
    host: PinnedHostSlice<u8>,
    device: CudaSlice<u8>,
    copied: CudaEvent,
    consumed: CudaEvent,
}

/// A bounded pool of pinned staging buffers with a copy stream and a compute stream.
pub struct Pipeline {
    ctx: Arc<CudaContext>,
    copy: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    slots: Vec<Mutex<Slot>>,
    free: Mutex<VecDeque<usize>>,
    available: Condvar,
    slot_bytes: usize,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("slots", &self.slots.len()).field("slot_bytes", &self.slot_bytes).finish()
    }
}

fn poisoned<T>(_: T) -> KernelError {
    KernelError::Driver("pipeline lock poisoned by a panicking thread".into())
}

impl Pipeline {
    /// Allocates `config.slots` pinned host buffers and device buffers of `config.slot_bytes` each.
    pub fn new(gpu: &Gpu, config: PipelineConfig) -> Result<Pipeline, KernelError> {
        if config.slots == 0 || config.slot_bytes == 0 {
            return Err(KernelError::InvalidArgument(format!("pipeline needs ≥ 1 slot of ≥ 1 byte, got {config:?}")));
        }
        let ctx = gpu.ctx.clone();
        let copy = ctx.new_stream().map_err(KernelError::driver("create copy stream"))?;
        let compute = ctx.new_stream().map_err(KernelError::driver("create compute stream"))?;
        let mut slots = Vec::with_capacity(config.slots);
        for _ in 0..config.slots {
            slots.push(Mutex::new(Slot {
                host: gpu.alloc_pinned(config.slot_bytes)?,
                device: copy
                    .alloc_zeros::<u8>(config.slot_bytes)
                    .map_err(KernelError::driver("allocate device memory"))?,
                // Blocking sync: CPU threads waiting for a staging buffer sleep instead of spinning.
                copied: ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                    .map_err(KernelError::driver("create event"))?,
                consumed: ctx.new_event(None).map_err(KernelError::driver("create event"))?,
            }));
        }
        copy.synchronize().map_err(KernelError::driver("synchronize"))?;
        Ok(Pipeline {
            ctx,
            copy,
            compute,
            slots,
            free: Mutex::new((0..config.slots).collect()),
            available: Condvar::new(),
            slot_bytes: config.slot_bytes,
        })
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// The stream the launch closures run on (to read results back or chain more work).
    pub fn compute_stream(&self) -> &Arc<CudaStream> {
        &self.compute
    }

    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy
    }

    /// Takes a free slot, blocking while all are in use, and waits until its previous H2D copy
    /// has finished reading the pinned buffer. Never call twice on one thread without submitting
    /// (or dropping) the first: with one slot that would wait forever.
    pub fn acquire(&self) -> Result<StagingBuffer<'_>, KernelError> {
        let index = {
            let mut free = self.free.lock().map_err(poisoned)?;
            loop {
                if let Some(i) = free.pop_front() {
                    break i;
                }
                free = self.available.wait(free).map_err(poisoned)?;
            }
        };
        // From here on the slot must go back to the pool on every path: the guard does that.
        let mut buffer = StagingBuffer { pipeline: self, index, slot: None };
        let slot = self.slots[index].lock().map_err(poisoned)?;
        slot.copied.synchronize().map_err(KernelError::driver("wait for the slot's previous copy"))?;
        buffer.slot = Some(slot);
        Ok(buffer)
    }

    /// [`acquire`](Self::acquire) + fill: `fill` writes the batch into the pinned buffer and
    /// returns how many bytes it used.
    pub fn stage(&self, fill: impl FnOnce(&mut [u8]) -> usize) -> Result<Staged<'_>, KernelError> {
        let mut buffer = self.acquire()?;
        let len = fill(buffer.as_mut_slice()?);
        buffer.finish(len)
    }

    /// Copies the staged bytes to the slot's device buffer on the copy stream, then calls
    /// `launch(compute_stream, device_bytes)` once the compute stream is ordered after that copy.
    /// Returns as soon as the work is enqueued; the slot is free for the next batch at once.
    pub fn submit<R>(
        &self,
        staged: Staged<'_>,
        launch: impl FnOnce(&Arc<CudaStream>, &CudaView<'_, u8>) -> Result<R, KernelError>,
    ) -> Result<R, KernelError> {
        if !std::ptr::eq(staged.pipeline, self) {
            return Err(KernelError::InvalidArgument("staged batch belongs to another pipeline".into()));
        }
        // The slot returns to the pool when `staged` drops at the end, also if enqueueing failed.
        self.enqueue(staged.index, staged.len, launch)
    }

    fn enqueue<R>(
        &self,
        index: usize,
        len: usize,
        launch: impl FnOnce(&Arc<CudaStream>, &CudaView<'_, u8>) -> Result<R, KernelError>,
    ) -> Result<R, KernelError> {
        let mut guard = self.slots[index].lock().map_err(poisoned)?;
        let slot = &mut *guard;
        // The previous batch's kernels must be done reading the device buffer before it is overwritten.
        self.copy.wait(&slot.consumed).map_err(KernelError::driver("copy stream wait"))?;
        if len > 0 {
            let host = slot.host.as_slice().map_err(KernelError::driver("pinned buffer"))?;
            let mut dst = slot.device.slice_mut(..len);
            self.copy.memcpy_htod(&host[..len], &mut dst).map_err(KernelError::driver("H2D copy"))?;
        }
        slot.copied.record(&self.copy).map_err(KernelError::driver("record copy event"))?;
        self.compute.wait(&slot.copied).map_err(KernelError::driver("compute stream wait"))?;
        let result = launch(&self.compute, &slot.device.slice(..len));
        // Recorded even when `launch` failed: whatever it did enqueue must finish before reuse.
        slot.consumed.record(&self.compute).map_err(KernelError::driver("record compute event"))?;
        result
    }

    /// Waits for every copy and kernel enqueued so far.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.copy.synchronize().map_err(KernelError::driver("synchronize copy stream"))?;
        self.compute.synchronize().map_err(KernelError::driver("synchronize compute stream"))
    }

    fn release(&self, index: usize) {
        if let Ok(mut free) = self.free.lock() {
            free.push_back(index);
            self.available.notify_one();
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // The pinned buffers must outlive any DMA still reading them.
        if let Err(e) = self.synchronize() {
            tracing::warn!(error = %e, "pipeline dropped with failing streams");
        }
        let _ = self.ctx.bind_to_thread();
    }
}

/// A slot being filled: the pinned buffer, exclusively this thread's until [`finish`](Self::finish).
/// Dropping it unfinished returns the slot to the pool.
pub struct StagingBuffer<'a> {
    pipeline: &'a Pipeline,
    index: usize,
    slot: Option<MutexGuard<'a, Slot>>,
}

impl std::fmt::Debug for StagingBuffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingBuffer").field("slot", &self.index).finish()
    }
}

impl<'a> StagingBuffer<'a> {
    /// The whole pinned buffer ([`Pipeline::slot_bytes`] long; contents of an earlier batch).
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8], KernelError> {
        let slot = self.slot.as_mut().ok_or_else(|| KernelError::Driver("staging buffer already finished".into()))?;
        slot.host.as_mut_slice().map_err(KernelError::driver("pinned buffer"))
    }

    /// Marks the first `len` bytes as the batch, ready for [`Pipeline::submit`].
    pub fn finish(mut self, len: usize) -> Result<Staged<'a>, KernelError> {
        if len > self.pipeline.slot_bytes {
            return Err(KernelError::InvalidArgument(format!(
                "staged {len} bytes into a {}-byte slot",
                self.pipeline.slot_bytes
            )));
        }
        self.slot = None;
        let staged = Staged { pipeline: self.pipeline, index: self.index, len };
        // Ownership of the slot moves to `staged`; skip this guard's release.
        std::mem::forget(self);
        Ok(staged)
    }
}

impl Drop for StagingBuffer<'_> {
    fn drop(&mut self) {
        self.slot = None;
        self.pipeline.release(self.index);
    }
}

/// A filled slot waiting for [`Pipeline::submit`]; `Send`, so staging threads can hand it over.
/// Dropping it unsubmitted returns the slot to the pool.
pub struct Staged<'a> {
    pipeline: &'a Pipeline,
    index: usize,
    len: usize,
}

impl Staged<'_> {
    /// Bytes staged.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Which slot of the pool holds it (diagnostics and tests).
    pub fn slot(&self) -> usize {
        self.index
    }
}

impl std::fmt::Debug for Staged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged").field("slot", &self.index).field("len", &self.len).finish()
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        self.pipeline.release(self.index);
    }
}
