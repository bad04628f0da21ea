//! GPU tests: the pinned pipeline gives the same results as sequential copies + launches, reuses
//! a bounded pool of pinned buffers, and accepts batches staged on other threads.

use std::collections::HashSet;
use std::sync::mpsc;
use std::time::Duration;

use kiln_kernels::pipeline::{Pipeline, PipelineConfig};

use crate::toolchain::{SCALE, expected, launch_scale};

fn batch(b: usize) -> Vec<u8> {
    let len = 10_000 + b * 3_001; // different lengths, all ≤ the slot size below
    (0..len).map(|i| ((i * 7 + b * 13) % 256) as u8).collect()
}

#[test]
fn pipelined_results_equal_sequential_and_pool_is_reused() {
    let Some(gpu) = crate::gpu() else { return };
    let f = gpu.function(&SCALE, "kiln_test_scale").expect("kernel");
    let pipeline = Pipeline::new(&gpu, PipelineConfig { slots: 2, slot_bytes: 64 << 10 }).expect("pipeline");
    let stream = pipeline.compute_stream().clone();
    let batches: Vec<Vec<u8>> = (0..12).map(batch).collect();
    let mut outs = Vec::new();
    let mut buffers = HashSet::new();
    for (b, data) in batches.iter().enumerate() {
        let staged = pipeline
            .stage(|buf| {
                buffers.insert(buf.as_ptr() as usize);
                buf[..data.len()].copy_from_slice(data);
                data.len()
            })
            .expect("stage");
        let mut out = stream.alloc_zeros::<f32>(data.len()).expect("alloc");
        pipeline.submit(staged, |s, dev| launch_scale(&f, s, dev, &mut out, b as f32)).expect("submit");
        outs.push(out);
    }
    pipeline.synchronize().expect("sync");
    assert!(buffers.len() <= 2, "{} distinct pinned buffers for a 2-slot pool", buffers.len());
    for (b, (data, out)) in batches.iter().zip(&outs).enumerate() {
        let got = stream.clone_dtoh(out).expect("dtoh");
        // Sequential reference on the Gpu's own stream: plain copy, then launch.
        let dev = gpu.stream.clone_htod(data).expect("htod");
        let mut seq = gpu.stream.alloc_zeros::<f32>(data.len()).expect("alloc");
        launch_scale(&f, &gpu.stream, &dev.slice(..), &mut seq, b as f32).expect("launch");
        assert_eq!(got, gpu.stream.clone_dtoh(&seq).expect("dtoh"), "batch {b} differs from sequential");
        assert_eq!(got, expected(data, b as f32), "batch {b} differs from the CPU");
    }
}

#[test]
fn acquire_blocks_while_every_slot_is_staged() {
    let Some(gpu) = crate::gpu() else { return };
    let pipeline = Pipeline::new(&gpu, PipelineConfig { slots: 2, slot_bytes: 4096 }).expect("pipeline");
    let a = pipeline.stage(|_| 1).expect("a");
    let b = pipeline.stage(|_| 1).expect("b");
    assert_ne!(a.slot(), b.slot());
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let pipeline = &pipeline;
        s.spawn(move || {
            let c = pipeline.stage(|_| 1).map(|c| c.slot());
            let _ = tx.send(c.ok());
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "a third slot was handed out");
        drop(a); // unsubmitted: the slot returns to the pool
        let got = rx.recv_timeout(Duration::from_secs(10)).expect("woken").expect("staged");
        assert!(got < 2);
    });
    drop(b);
}

#[test]
fn batches_staged_on_other_threads() {
    let Some(gpu) = crate::gpu() else { return };
    let f = gpu.function(&SCALE, "kiln_test_scale").expect("kernel");
    let pipeline = Pipeline::new(&gpu, PipelineConfig { slots: 3, slot_bytes: 64 << 10 }).expect("pipeline");
    let stream = pipeline.compute_stream().clone();
    let mut results = Vec::new();
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        for t in 0..4 {
            let tx = tx.clone();
            let pipeline = &pipeline;
            s.spawn(move || {
                for i in 0..4 {
                    let b = t * 4 + i;
                    let data = batch(b);
                    let staged = pipeline
                        .stage(|buf| {
                            buf[..data.len()].copy_from_slice(&data);
                            data.len()
                        })
                        .expect("stage");
                    tx.send((b, staged)).expect("send");
                }
            });
        }
        drop(tx);
        for (b, staged) in rx {
            let mut out = stream.alloc_zeros::<f32>(staged.len()).expect("alloc");
            pipeline.submit(staged, |s, dev| launch_scale(&f, s, dev, &mut out, 2.0)).expect("submit");
            results.push((b, out));
        }
    });
    pipeline.synchronize().expect("sync");
    assert_eq!(results.len(), 16);
    for (b, out) in &results {
        assert_eq!(stream.clone_dtoh(out).expect("dtoh"), expected(&batch(*b), 2.0), "batch {b}");
    }
}
