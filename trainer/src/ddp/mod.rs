//! Data-parallel training: `mpirun -n N kiln-train fit …` runs one model replica per process, and after every
//! backward pass the gradients are averaged over the processes (ranks), so all replicas take the same step.
//!
//! CPU tensors are reduced through MPI (Open MPI, via rsmpi); CUDA tensors through NCCL, whose communicator is
//! bootstrapped over MPI. Gradients travel in buckets (flattened and concatenated as f32, like PyTorch DDP), so a
//! model with hundreds of small parameters costs a handful of collective calls, not hundreds.
//!
//! A collective blocks until every rank joins it, so one rank that stops early leaves the others waiting forever.
//! Hence dropping a [`Ddp`] while panicking aborts the whole MPI job, and a caller that gives up on an error under
//! `mpirun` should end with [`Ddp::abort`] rather than a plain return.

mod bucket;
mod nccl;

use std::cell::RefCell;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use tch::{Device, Tensor};

pub use nccl::{NCCL_ID_BYTES, NcclComm, nccl_available};

use crate::TrainError;

/// Elements per MPI call: MPI counts are C ints, so bigger buffers go in slices.
const MPI_MAX_COUNT: usize = 1 << 30;

/// Environment variables that Open MPI's, MPICH's or PMIx's launchers set in every process they start.
const LAUNCHER_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// This process's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorldInfo {
    /// 0-based index of this process.
    pub rank: usize,
    /// Number of processes.
    pub size: usize,
}

/// Options for [`Ddp`].
#[derive(Debug, Clone)]
pub struct DdpOptions {
    /// Largest gradient bucket, in bytes of f32 (default 25 MiB, like PyTorch DDP). A tensor bigger than this
    /// gets a bucket of its own.
    pub bucket_bytes: usize,
}

impl Default for DdpOptions {
    fn default() -> Self {
        DdpOptions { bucket_bytes: 25 << 20 }
    }
}

/// True when this process was started by `mpirun` (or another MPI/PMIx launcher).
pub fn launched_by_mpirun() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// The data-parallel context: rank, world size and the collectives a training loop needs.
///
/// Not `Send`: MPI is initialised with `MPI_THREAD_FUNNELED`, so all calls stay on the thread that called
/// [`Ddp::init`] (other threads, such as data loaders and libtorch's pool, may run but must not use it).
pub struct Ddp {
    world: WorldInfo,
    options: DdpOptions,
    /// Created on the first CUDA gradient average. Declared before `universe` so it is destroyed before MPI is
    /// finalised.
    nccl: RefCell<Option<NcclComm>>,
    /// `None` in a single process not started by mpirun. Dropping it finalises MPI.
    universe: Option<Universe>,
}

impl std::fmt::Debug for Ddp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ddp")
            .field("world", &self.world)
            .field("options", &self.options)
            .field("mpi", &self.universe.is_some())
            .field("nccl", &self.nccl.borrow())
            .finish()
    }
}

impl Ddp {
    /// Rank 0 of 1 without any MPI when not launched by mpirun (see [`launched_by_mpirun`]); otherwise
    /// initialises MPI, which can happen once per process: a second `init` there is an error. MPI is finalised
    /// when the `Ddp` drops.
    pub fn init(options: DdpOptions) -> Result<Ddp, TrainError> {
        if options.bucket_bytes == 0 {
            return Err(TrainError::Config("ddp bucket_bytes must be positive".into()));
        }
        if !launched_by_mpirun() {
            return Ok(Ddp {
                world: WorldInfo { rank: 0, size: 1 },
                options,
                nccl: RefCell::new(None),
                universe: None,
            });
        }
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or_else(|| {
            TrainError::Distributed("MPI is already initialised in this process (create one Ddp per process)".into())
        })?;
        if threading == mpi::Threading::Single {
            tracing::warn!("MPI provides only {threading:?} threading; keep the process single-threaded around MPI");
        }
        let comm = universe.world();
        let (rank, size) = (usize::try_from(comm.rank()), usize::try_from(comm.size()));
        let (Ok(rank), Ok(size)) = (rank, size) else {
            return Err(TrainError::Distributed("MPI reported a negative rank or size".into()));
        };
        Ok(Ddp { world: WorldInfo { rank, size }, options, nccl: RefCell::new(None), universe: Some(universe) })
    }

    /// This process's rank and the number of processes.
    pub fn world(&self) -> WorldInfo {
        self.world
    }

    /// True on rank 0, the one that logs, evaluates and writes checkpoints.
    pub fn is_root(&self) -> bool {
        self.world.rank == 0
    }

    /// MPI's world communicator, when there is more than one rank.
    fn comm(&self) -> Option<SimpleCommunicator> {
        match &self.universe {
            Some(universe) if self.world.size > 1 => Some(universe.world()),
            _ => None,
        }
    }

    /// Copies rank 0's values into every rank's tensors, in place (under no_grad), so the replicas start
    /// identical: pass the parameters and the buffers (batch-norm running statistics). Any dtype and device
    /// (CUDA tensors go through host memory: this runs once per training, not per step). Collective: every rank
    /// passes tensors of the same shapes and dtypes, in the same order. A no-op for a single process.
    pub fn broadcast(&self, tensors: &[Tensor]) -> Result<(), TrainError> {
        let Some(comm) = self.comm() else { return Ok(()) };
        let _no_grad = tch::no_grad_guard();
        let root = comm.process_at_rank(0);
        for tensor in tensors {
            if !tensor.defined() {
                return Err(TrainError::Distributed("broadcast of an undefined tensor".into()));
            }
            let kind = tensor.f_kind()?;
            let numel = tensor.numel();
            let mut bytes = vec![0u8; numel.saturating_mul(kind.elt_size_in_bytes())];
            if self.is_root() {
                tensor.f_copy_data_u8(&mut bytes, numel)?;
            }
            for chunk in bytes.chunks_mut(MPI_MAX_COUNT) {
                root.broadcast_into(chunk);
            }
            if !self.is_root() {
                let value = Tensor::f_from_data_size(&bytes, &tensor.size(), kind)?;
                tensor.shallow_clone().f_copy_(&value)?;
            }
        }
        Ok(())
    }

    /// Replaces each parameter's `.grad()` with its mean over the ranks.
    ///
    /// Gradients are packed into buckets of at most `bucket_bytes` (flattened, concatenated, as f32), summed over
    /// the ranks one bucket at a time, divided by the world size and copied back (in the gradient's own dtype).
    /// A trainable parameter whose gradient is undefined counts as zeros and has a defined gradient afterwards, so
    /// ranks never disagree on the layout; frozen parameters (not requiring grad) are skipped. CPU gradients go
    /// through MPI, CUDA ones through NCCL (all on one device). Collective: every rank passes the same parameter
    /// list. A no-op for a single process.
    pub fn average_gradients(&self, params: &[Tensor]) -> Result<(), TrainError> {
        let Some(comm) = self.comm() else { return Ok(()) };
        let mut cpu = Vec::new();
        let mut cuda = Vec::new();
        for param in params {
            let Some(grad) = bucket::gradient(param)? else { continue };
            match grad.device() {
                Device::Cpu => cpu.push(grad),
                Device::Cuda(index) => cuda.push((index, grad)),
                other => return Err(TrainError::Distributed(format!("gradients on {other:?} are not supported"))),
            }
        }
        let _no_grad = tch::no_grad_guard();
        for range in bucket::plan(&bucket::wire_bytes(&cpu), self.options.bucket_bytes) {
            self.mpi_average(&comm, &cpu[range])?;
        }
        if let Some(&(device, _)) = cuda.first() {
            if let Some((other, _)) = cuda.iter().find(|(d, _)| *d != device) {
                return Err(TrainError::Distributed(format!(
                    "gradients on cuda:{device} and cuda:{other}: one device per process"
                )));
            }
            let grads: Vec<Tensor> = cuda.into_iter().map(|(_, g)| g).collect();
            self.nccl_average(&comm, device, &grads)?;
        }
        Ok(())
    }

    fn mpi_average(&self, comm: &SimpleCommunicator, grads: &[Tensor]) -> Result<(), TrainError> {
        let flat = bucket::flatten(grads)?;
        let send = Vec::<f32>::try_from(&flat)?;
        let mut sum = vec![0f32; send.len()];
        for (s, r) in send.chunks(MPI_MAX_COUNT).zip(sum.chunks_mut(MPI_MAX_COUNT)) {
            comm.all_reduce_into(s, r, SystemOperation::sum());
        }
        let mean = Tensor::f_from_slice(&sum)?.f_div_scalar(self.world.size as f64)?;
        bucket::scatter_back(&mean, grads)
    }

    fn nccl_average(&self, comm: &SimpleCommunicator, device: usize, grads: &[Tensor]) -> Result<(), TrainError> {
        let mut slot = self.nccl.borrow_mut();
        let nccl = match &mut *slot {
            Some(nccl) => nccl,
            empty => empty.insert(self.nccl_init(comm, device)?),
        };
        if nccl.device() != device {
            return Err(TrainError::Distributed(format!(
                "gradients moved from cuda:{} to cuda:{device} between steps",
                nccl.device()
            )));
        }
        for range in bucket::plan(&bucket::wire_bytes(grads), self.options.bucket_bytes) {
            let mut flat = bucket::flatten(&grads[range.clone()])?;
            nccl.all_reduce_sum_(&flat)?;
            let _ = flat.f_div_scalar_(self.world.size as f64)?;
            bucket::scatter_back(&flat, &grads[range])?;
        }
        Ok(())
    }

    /// Creates the NCCL communicator: every rank first agrees that NCCL works everywhere (otherwise the ranks
    /// that can go on would wait forever in NCCL for the one that cannot), then rank 0's unique id travels over MPI.
    fn nccl_init(&self, comm: &SimpleCommunicator, device: usize) -> Result<NcclComm, TrainError> {
        let local = nccl_available();
        let mut all_ok = 0i32;
        comm.all_reduce_into(&i32::from(local.is_ok()), &mut all_ok, SystemOperation::min());
        local?;
        if all_ok == 0 {
            return Err(TrainError::Distributed("NCCL is unavailable on another rank".into()));
        }
        // Byte 0 says whether rank 0 managed to make an id, so a failure there fails every rank, not just one.
        let mut message = [0u8; 1 + NCCL_ID_BYTES];
        let mut root_error = None;
        if self.is_root() {
            match NcclComm::unique_id() {
                Ok(id) => {
                    message[0] = 1;
                    message[1..].copy_from_slice(&id);
                }
                Err(e) => root_error = Some(e),
            }
        }
        comm.process_at_rank(0).broadcast_into(&mut message[..]);
        if let Some(e) = root_error {
            return Err(e);
        }
        let mut id = [0u8; NCCL_ID_BYTES];
        id.copy_from_slice(&message[1..]);
        if message[0] != 1 {
            return Err(TrainError::Distributed("rank 0 could not create an NCCL id".into()));
        }
        NcclComm::new(device, self.world.rank, self.world.size, &id)
    }

    /// Sums `values` element-wise over the ranks and returns the totals on every rank (for metrics: losses,
    /// correct counts). Collective: every rank passes the same number of values.
    pub fn sum_f64(&self, values: &[f64]) -> Result<Vec<f64>, TrainError> {
        let Some(comm) = self.comm() else { return Ok(values.to_vec()) };
        let mut sum = vec![0f64; values.len()];
        for (s, r) in values.chunks(MPI_MAX_COUNT).zip(sum.chunks_mut(MPI_MAX_COUNT)) {
            comm.all_reduce_into(s, r, SystemOperation::sum());
        }
        Ok(sum)
    }

    /// Waits until every rank gets here.
    pub fn barrier(&self) -> Result<(), TrainError> {
        if let Some(comm) = self.comm() {
            comm.barrier();
        }
        Ok(())
    }

    /// Ends the whole job with exit status `code`: under mpirun every rank is killed (a rank that merely returned
    /// would leave the others blocked in their next collective); in a single process it just exits.
    pub fn abort(&self, code: i32) -> ! {
        match self.comm() {
            Some(comm) => comm.abort(code),
            None => std::process::exit(code),
        }
    }
}

impl Drop for Ddp {
    fn drop(&mut self) {
        // Finalising MPI while the other ranks wait in a collective would hang the job; a panic must end it.
        if std::thread::panicking()
            && let Some(comm) = self.comm()
        {
            eprintln!("rank {} panicked: aborting the MPI job", self.world.rank);
            comm.abort(101);
        }
    }
}
