//! Link flags for everything built from this crate (the binary, tests, benches).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        // Without an rpath the binaries only start with LD_LIBRARY_PATH set by hand.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // `--as-needed` drops libtorch_cuda (nothing references it by symbol), and then
        // CUDA silently never works; keep it whenever this libtorch ships it.
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
