//! Every GPU test of kiln-cuda, in one target so that it can be carried to a GPU
//! machine as one binary. Without a GPU each test prints why it skipped; with
//! `KILN_REQUIRE_GPU=1` a missing GPU fails instead.

mod engine;
mod int8;
mod kernels;
mod libs;

use kiln_cuda::device::Device;

/// The GPU to test on, or `None` (skip) with the reason printed.
pub fn device() -> Option<Device> {
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(std::env::var("KILN_REQUIRE_GPU").as_deref() != Ok("1"), "KILN_REQUIRE_GPU=1 but no GPU: {e}");
            println!("skipped: {e}");
            None
        }
    }
}
