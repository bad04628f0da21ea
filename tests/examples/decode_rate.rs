//! CPU JPEG decode throughput per core for JPEG-sized inputs (500×375, quality 90), the
//! host side of the GPU preprocessing pipeline: `decode_rate [SECONDS]`.
//! The JPEG is made from the sample photo (`make setup`), so no file is downloaded.

use std::time::{Duration, Instant};

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::args().nth(1).map(|s| s.parse()).transpose().context("SECONDS")?.unwrap_or(3.0);
    let photo = kiln_image::decode(&kiln_tests::photo("china.jpg")?)?;
    let small = image::imageops::resize(&photo, 500, 375, image::imageops::FilterType::Triangle);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&small)?;
    // One thread: the rate per core (decode threads scale with cores in the pipeline).
    let _ = kiln_image::decode(&jpeg)?;
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed() < Duration::from_secs_f64(secs) {
        let img = kiln_image::decode(&jpeg)?;
        anyhow::ensure!(img.width() == 500 && img.height() == 375, "unexpected size");
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!("decode 500×375 JPEG ({} KB): {rate:.0} images/s per core ({n} in {secs} s)", jpeg.len() / 1024);
    Ok(())
}
