//! Writes `tests/fixtures/int8-chain.onnx` (see `kiln_tests::int8_chain`).

fn main() -> anyhow::Result<()> {
    let path = kiln_tests::workspace_root().join(kiln_tests::int8_chain::FIXTURE);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    kiln_onnx::save(&kiln_tests::int8_chain::model()?, &path)?;
    println!("wrote {}", path.display());
    Ok(())
}
