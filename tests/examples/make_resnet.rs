//! Writes a generated ResNet fixture: `make_resnet 18|50 OUT.onnx [CLASSES]`.
//! Used by the build benchmark, which needs a ResNet-50 without libtorch.

use anyhow::{Context, bail};
use kiln_tests::resnet::{Depth, resnet};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (depth, out) = match args.as_slice() {
        [d, out, ..] if d == "18" => (Depth::R18, out),
        [d, out, ..] if d == "50" => (Depth::R50, out),
        _ => bail!("usage: make_resnet 18|50 OUT.onnx [CLASSES]"),
    };
    let classes =
        args.get(2).map(|c| c.parse::<usize>()).transpose().context("CLASSES must be a number")?.unwrap_or(1000);
    kiln_onnx::save(&resnet(depth, classes, 42)?, out)?;
    println!("wrote {out}");
    Ok(())
}
