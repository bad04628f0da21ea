//! Data-parallel primitives under a real `mpirun -n 2`: the `two_ranks_*` tests launch this very test binary as
//! MPI ranks, each running one `#[ignore]`d `worker_*` test (which does nothing unless `KILN_DDP_WORKER` is set).
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_trainer::TrainError;
use kiln_trainer::ddp::{Ddp, DdpOptions, NCCL_ID_BYTES, NcclComm, WorldInfo, launched_by_mpirun, nccl_available};
use tch::{Device, Kind, Tensor};

const WORKER_ENV: &str = "KILN_DDP_WORKER";
const TIMEOUT: Duration = Duration::from_secs(120);

struct MpiRun {
    /// `None` when the job outlived [`TIMEOUT`] and was killed.
    status: Option<ExitStatus>,
    output: String,
}

fn find_mpirun() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("mpirun")).find(|p| p.is_file())
}

/// Runs the worker test `name` as `ranks` MPI processes; `None` (after saying why) when mpirun is missing.
fn mpirun_worker(name: &str, ranks: usize) -> Option<MpiRun> {
    let Some(mpirun) = find_mpirun() else {
        println!("skipping: mpirun is not on PATH (install openmpi-bin)");
        return None;
    };
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(mpirun)
        .args(["--oversubscribe", "-n", &ranks.to_string()])
        .arg(exe)
        .args(["--exact", name, "--ignored", "--nocapture", "--test-threads", "1"])
        .env(WORKER_ENV, "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Containers often forbid the cross-process memory copy (CMA) that Open MPI's shared-memory transport
        // tries first for large messages.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes while waiting, or a chatty job blocks on a full pipe and looks like a hang.
    let (tx, rx) = mpsc::channel();
    for mut pipe in [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as _),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = tx.send(text);
        });
    }
    drop(tx);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > TIMEOUT {
            // SIGTERM first: mpirun then kills its ranks, which SIGKILL would orphan.
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut output = String::new();
    for _ in 0..2 {
        if let Ok(text) = rx.recv_timeout(Duration::from_secs(10)) {
            output.push_str(&text);
        }
    }
    println!("--- mpirun {name} ({:?}, {:.1} s):\n{output}", status, start.elapsed().as_secs_f64());
    Some(MpiRun { status, output })
}

/// Skips a worker unless mpirun started it for a `two_ranks_*` test.
fn is_worker() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

#[test]
fn two_ranks_broadcast_average_sum() {
    let Some(run) = mpirun_worker("worker_collectives", 2) else { return };
    let status = run.status.expect("mpirun timed out");
    assert!(status.success(), "mpirun failed: {status:?}");
    // A worker filtered out by a typo would "pass" having run nothing; each rank signs off explicitly.
    for rank in 0..2 {
        assert!(run.output.contains(&format!("ddp worker rank {rank} of 2 ok")), "rank {rank} did not finish");
    }
}

#[test]
fn two_ranks_a_panicking_rank_fails_the_job_instead_of_hanging() {
    let Some(run) = mpirun_worker("worker_rank1_panics", 2) else { return };
    let status = run.status.expect("the job hung: a panic must abort all ranks");
    assert!(!status.success(), "mpirun succeeded although rank 1 panicked");
    assert!(run.output.contains("deliberate failure on rank 1"), "rank 1 did not reach its panic");
    assert!(!run.output.contains("rank 0 passed the barrier"));
}

fn arange(n: i64, kind: Kind) -> Tensor {
    Tensor::arange(n, (kind, Device::Cpu))
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

#[test]
#[ignore = "MPI worker: launched by two_ranks_broadcast_average_sum"]
fn worker_collectives() {
    if !is_worker() {
        return;
    }
    // 64-byte buckets: 16 f32s, so the parameters below span several buckets and some get one of their own.
    let ddp = Ddp::init(DdpOptions { bucket_bytes: 64 }).unwrap();
    let WorldInfo { rank, size } = ddp.world();
    assert_eq!(size, 2);
    assert!(rank < 2);
    assert_eq!(ddp.is_root(), rank == 0);
    assert_eq!(ddp.sum_f64(&[rank as f64]).unwrap(), vec![1.0], "ranks are not 0 and 1");
    let r = rank as i64;

    // broadcast: every dtype a model holds, a parameter that requires grad, and a non-contiguous view.
    let weight = (arange(7, Kind::Float) + 100 * r).set_requires_grad(true);
    let running_var = Tensor::full([3, 4], r as f64 + 0.25, (Kind::Double, Device::Cpu));
    let batches_tracked = Tensor::from_slice(&[10 * r + 5]);
    let mask = Tensor::from_slice(&[rank == 0, rank == 1]);
    let base = (arange(6, Kind::Float) + 50 * r).view([2, 3]);
    let transposed = base.tr();
    ddp.broadcast(&[
        weight.shallow_clone(),
        running_var.shallow_clone(),
        batches_tracked.shallow_clone(),
        mask.shallow_clone(),
        transposed,
    ])
    .unwrap();
    assert!(same(&weight, &arange(7, Kind::Float)));
    assert!(weight.requires_grad());
    assert!(same(&running_var, &Tensor::full([3, 4], 0.25, (Kind::Double, Device::Cpu))));
    assert!(same(&batches_tracked, &Tensor::from_slice(&[5i64])));
    assert!(same(&mask, &Tensor::from_slice(&[true, false])));
    assert!(same(&base, &arange(6, Kind::Float).view([2, 3])));

    // average_gradients: the gradient of Σ p·c is c, with c = (arange + i)·(rank + 1), so the mean over the two
    // ranks is (arange + i)·1.5, exact in f32 and f16.
    let shapes: [(&[i64], Kind); 7] = [
        (&[3], Kind::Float),
        (&[5, 7], Kind::Float), // 140 bytes: a bucket of its own
        (&[1], Kind::Float),
        (&[13], Kind::Float),
        (&[2, 2, 2], Kind::Float),
        (&[40], Kind::Float), // 160 bytes
        (&[6], Kind::Half),   // mixed precision: reduced as f32, written back as f16
    ];
    let coefficient = |i: usize, shape: &[i64], kind: Kind, scale: f64| {
        ((arange(shape.iter().product(), Kind::Float) + i as f64) * scale).view(shape).to_kind(kind)
    };
    let params: Vec<Tensor> =
        shapes.iter().map(|(shape, kind)| Tensor::ones(*shape, (*kind, Device::Cpu)).set_requires_grad(true)).collect();
    let unused = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let rank0_only = Tensor::ones([5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let frozen = Tensor::ones([3], (Kind::Float, Device::Cpu));
    let mut loss = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    for (i, (p, (shape, kind))) in params.iter().zip(&shapes).enumerate() {
        loss += (p * coefficient(i, shape, *kind, (rank + 1) as f64)).sum(Kind::Float);
    }
    if rank == 0 {
        loss += (&rank0_only * coefficient(9, &[5], Kind::Float, 1.0)).sum(Kind::Float);
    }
    loss.sum(Kind::Float).backward();
    assert!(!unused.grad().defined());
    assert_eq!(rank0_only.grad().defined(), rank == 0);

    let mut all: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
    all.insert(2, unused.shallow_clone());
    all.insert(4, frozen.shallow_clone());
    all.push(rank0_only.shallow_clone());
    ddp.average_gradients(&all).unwrap();

    for (i, (p, (shape, kind))) in params.iter().zip(&shapes).enumerate() {
        let grad = p.grad();
        let expected = coefficient(i, shape, *kind, 1.5);
        assert!(same(&grad, &expected), "param {i} {shape:?} {kind:?}: {grad} != {expected}");
    }
    assert!(same(&unused.grad(), &Tensor::zeros([4], (Kind::Float, Device::Cpu))), "an undefined grad averages to 0");
    assert!(same(&rank0_only.grad(), &coefficient(9, &[5], Kind::Float, 0.5)), "one rank's grad halves");
    assert!(!frozen.grad().defined(), "a frozen parameter has no gradient to average");
    // The averaged gradients are the parameters' own: a second round sees them, identical on both ranks.
    ddp.average_gradients(&all).unwrap();
    assert!(same(&params[1].grad(), &coefficient(1, &[5, 7], Kind::Float, 1.5)));

    assert_eq!(ddp.sum_f64(&[rank as f64 + 1.0, 0.5, -2.0 * rank as f64]).unwrap(), vec![3.0, 1.0, -2.0]);
    assert_eq!(ddp.sum_f64(&[]).unwrap(), Vec::<f64>::new());
    ddp.barrier().unwrap();
    assert!(Ddp::init(DdpOptions::default()).is_err(), "MPI initialises once per process");
    println!("ddp worker rank {rank} of {size} ok");
}

#[test]
#[ignore = "MPI worker: launched by two_ranks_a_panicking_rank_fails_the_job_instead_of_hanging"]
fn worker_rank1_panics() {
    if !is_worker() {
        return;
    }
    let ddp = Ddp::init(DdpOptions::default()).unwrap();
    assert_ne!(ddp.world().rank, 1, "deliberate failure on rank 1");
    // Rank 0 would wait here forever if rank 1's panic merely ended rank 1.
    ddp.barrier().unwrap();
    println!("rank 0 passed the barrier");
}

#[test]
fn single_process_is_rank_0_of_1_and_changes_nothing() {
    if launched_by_mpirun() {
        println!("skipping: this test binary itself runs under mpirun");
        return;
    }
    let ddp = Ddp::init(DdpOptions::default()).unwrap();
    assert_eq!(ddp.world(), WorldInfo { rank: 0, size: 1 });
    assert!(ddp.is_root());
    assert_eq!(DdpOptions::default().bucket_bytes, 25 << 20);
    assert!(Ddp::init(DdpOptions { bucket_bytes: 0 }).is_err());

    let a = Tensor::ones([3, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let b = Tensor::ones([5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let unused = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    ((&a * 3.0).sum(Kind::Float) + (&b * arange(5, Kind::Float)).sum(Kind::Float)).backward();
    let (grad_a, grad_b) = (a.grad().copy(), b.grad().copy());
    ddp.average_gradients(&[a.shallow_clone(), b.shallow_clone(), unused.shallow_clone()]).unwrap();
    assert!(same(&a.grad(), &grad_a));
    assert!(same(&b.grad(), &grad_b));
    assert!(!unused.grad().defined());

    let before = a.copy();
    ddp.broadcast(&[a.shallow_clone()]).unwrap();
    assert!(same(&a, &before));
    assert_eq!(ddp.sum_f64(&[1.5, -2.0]).unwrap(), vec![1.5, -2.0]);
    ddp.barrier().unwrap();
    // Several single-process contexts may coexist: none of them touches MPI.
    drop(Ddp::init(DdpOptions::default()).unwrap());
}

#[test]
fn without_cuda_nccl_is_an_error_not_a_panic() {
    if nccl_available().is_ok() {
        println!("skipping: NCCL is usable here (see nccl_single_rank_all_reduce)");
        return;
    }
    for result in [
        nccl_available().map(|_| ()),
        NcclComm::unique_id().map(|_| ()),
        NcclComm::new(0, 0, 1, &[0; NCCL_ID_BYTES]).map(|_| ()),
    ] {
        match result {
            Err(TrainError::Distributed(message)) => {
                println!("{message}");
                assert!(message.contains("NCCL"), "{message}");
            }
            other => panic!("expected a distributed error, got {other:?}"),
        }
    }
}

/// Needs a CUDA GPU and NCCL (`libnccl.so` → libtorch's `libnccl.so.2` on `LD_LIBRARY_PATH`).
/// Skips without a GPU, unless `KILN_REQUIRE_GPU=1` makes that a failure.
#[test]
fn nccl_single_rank_all_reduce() {
    if !tch::Cuda::is_available() {
        assert!(
            std::env::var("KILN_REQUIRE_GPU").as_deref() != Ok("1"),
            "KILN_REQUIRE_GPU=1 but libtorch sees no CUDA device"
        );
        println!("skipped: no CUDA device");
        return;
    }
    nccl_available().unwrap();
    let gpu = Device::Cuda(0);
    let id = NcclComm::unique_id().unwrap();
    let comm = NcclComm::new(0, 0, 1, &id).unwrap();
    assert_eq!(comm.device(), 0);
    // Big enough that NCCL's kernel, queued behind libtorch's producing kernels, would expose a stream mix-up.
    let n = 1 << 24;
    let expected = Tensor::arange(n, (Kind::Float, Device::Cpu)) * 3.0;
    let tensor = Tensor::arange(n, (Kind::Float, gpu)) * 3.0;
    comm.all_reduce_sum_(&tensor).unwrap();
    let doubled = &tensor * 2.0;
    assert!(same(&tensor.to(Device::Cpu), &expected));
    assert!(same(&doubled.to(Device::Cpu), &(&expected * 2.0)));

    let cpu = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let half = Tensor::ones([4], (Kind::Half, gpu));
    let strided = Tensor::ones([4, 4], (Kind::Float, gpu)).tr();
    for bad in [&cpu, &half, &strided] {
        assert!(matches!(comm.all_reduce_sum_(bad), Err(TrainError::Distributed(_))));
    }

    // The whole Ddp path on CUDA parameters in a single process: no collectives, nothing changes.
    let ddp = Ddp::init(DdpOptions::default()).unwrap();
    let p = Tensor::ones([3], (Kind::Float, gpu)).set_requires_grad(true);
    (&p * 2.0).sum(Kind::Float).backward();
    ddp.average_gradients(&[p.shallow_clone()]).unwrap();
    assert!(same(&p.grad().to(Device::Cpu), &Tensor::full([3], 2.0, (Kind::Float, Device::Cpu))));
    drop(comm);
}
