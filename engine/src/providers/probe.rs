//! What a GPU provider needs on this machine, checked before ONNX Runtime is asked for it:
//! the provider compiled into the loaded ONNX Runtime, its shared library beside
//! `libonnxruntime.so`, and every library that one needs (read from its ELF `DT_NEEDED`
//! entries and opened one by one, so the error lists all of them, not just the first the
//! loader trips over). Opening libraries is the crate's only `unsafe`.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};

use ort::ep::ExecutionProvider;

use super::Provider;

/// The ONNX Runtime release kiln pins; its GPU wheel is what users install for these providers.
pub const ORT_GPU_WHEEL: &str = "onnxruntime-gpu==1.31.1";

/// Why a provider cannot run here, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub reason: String,
    pub install: Vec<String>,
}

impl std::error::Error for Unavailable {}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)?;
        if !self.install.is_empty() {
            write!(f, ". To fix: {}", self.install.join("; "))?;
        }
        Ok(())
    }
}

/// Facts about this machine that go into the TensorRT engine cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub gpu: String,
    pub tensorrt: String,
    pub onnxruntime: String,
}

/// Whether the loaded ONNX Runtime lists `provider` (a CPU-only build lists neither GPU provider).
pub fn compiled_in(provider: &Provider) -> Result<bool, String> {
    let listed = match provider {
        Provider::Cpu => return Ok(true),
        Provider::Cuda(_) => ort::ep::CUDA::is_available(),
        Provider::TensorRt(..) => ort::ep::TensorRT::is_available(),
    };
    listed.map_err(|e| e.to_string())
}

/// The directory ONNX Runtime loads provider libraries from: that of the real library file.
fn runtime_dir(ort_library: &Path) -> PathBuf {
    let real = std::fs::canonicalize(ort_library).unwrap_or_else(|_| ort_library.to_path_buf());
    real.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Checks that `provider` can be registered with the ONNX Runtime loaded from `ort_library`.
pub fn check(provider: &Provider, ort_library: &Path) -> Result<(), Unavailable> {
    let Some(file) = provider.library_file() else { return Ok(()) };
    let name = provider.ort_name();
    let gpu_runtime = format!(
        "install PyPI {ORT_GPU_WHEEL} and point kiln at its onnxruntime/capi/libonnxruntime.so.1.31.1 \
         (KILN_ORT_LIBRARY or --ort-library)"
    );
    match compiled_in(provider) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Unavailable {
                reason: format!(
                    "the ONNX Runtime library {} was built without the {name} (a CPU-only build)",
                    ort_library.display()
                ),
                install: vec![gpu_runtime],
            });
        }
        Err(e) => {
            return Err(Unavailable { reason: format!("cannot list ONNX Runtime's providers: {e}"), install: vec![] });
        }
    }
    let library = runtime_dir(ort_library).join(file);
    if !library.is_file() {
        return Err(Unavailable {
            reason: format!("{name}'s library {} is missing", library.display()),
            install: vec![gpu_runtime],
        });
    }
    let mut missing = missing_libraries(&library).map_err(|e| Unavailable { reason: e, install: vec![] })?;
    // Opened at run time rather than linked, so DT_NEEDED does not list it: cuDNN for
    // convolutions (ONNX Runtime 1.31's CUDA provider dlopens it).
    for soname in RUNTIME_LOADED {
        if !missing.iter().any(|m| m == soname) && !loads(soname) {
            missing.push((*soname).to_string());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut install: Vec<String> = Vec::new();
    for soname in &missing {
        let hint = install_hint(soname).to_string();
        if !install.contains(&hint) {
            install.push(hint);
        }
    }
    install.push("then put their directories on LD_LIBRARY_PATH".into());
    Err(Unavailable { reason: format!("{name} needs {} which the loader cannot find", missing.join(", ")), install })
}

/// Libraries both GPU providers open at run time without linking them.
const RUNTIME_LOADED: &[&str] = &["libcudnn.so.9"];

/// What provides a library, in words a user can act on.
pub fn install_hint(soname: &str) -> &'static str {
    let stem = soname.split(".so").next().unwrap_or(soname);
    match stem {
        "libnvinfer" | "libnvonnxparser" | "libnvinfer_plugin" => {
            "install TensorRT 10 for CUDA 13 (PyPI tensorrt-cu13-libs 10.x, or NVIDIA's TensorRT 10 tar/deb packages)"
        }
        "libcudnn" => "install cuDNN 9 for CUDA 13 (PyPI nvidia-cudnn-cu13, or NVIDIA's cuDNN 9 packages)",
        "libcuda" => "install the NVIDIA driver (libcuda.so.1 comes with it; 580 or newer for CUDA 13)",
        "libcudart" | "libcublas" | "libcublasLt" | "libcurand" | "libcufft" | "libnvrtc" => {
            "install the CUDA 13 runtime libraries (the CUDA 13 toolkit, or PyPI nvidia-cuda-runtime 13.x, \
             nvidia-cublas 13.x and nvidia-curand 10.4.x, which land in site-packages/nvidia/cu13/lib)"
        }
        _ => "install the package that provides it",
    }
}

/// The `DT_NEEDED` entries of the ELF shared library `path`. Only the headers and the
/// dynamic section are read (the CUDA provider library is ~280 MB).
pub fn needed_libraries(path: &Path) -> Result<Vec<String>, String> {
    use object::read::elf::ElfFile64;
    let err = |e: &dyn std::fmt::Display| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| err(&e))?;
    let cache = object::ReadCache::new(file);
    let elf = ElfFile64::<object::Endianness, _>::parse(&cache).map_err(|e| err(&e))?;
    let endian = elf.endian();
    let table = elf.elf_section_table().dynamic_table(endian, elf.data()).map_err(|e| err(&e))?;
    let mut needed = Vec::new();
    for entry in table.iter() {
        if entry.tag == object::elf::DT_NEEDED {
            let name = table.string(entry).map_err(|e| err(&e))?;
            needed.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(needed)
}

/// The libraries `path` needs that the dynamic loader cannot open from this process.
pub fn missing_libraries(path: &Path) -> Result<Vec<String>, String> {
    Ok(needed_libraries(path)?.into_iter().filter(|soname| !loads(soname)).collect())
}

/// Whether the loader finds and can initialise `soname` (searched as ONNX Runtime's
/// provider library would: LD_LIBRARY_PATH, the loader cache, the default directories).
fn loads(soname: &str) -> bool {
    // SAFETY: opening a shared library runs its initialisers; these are the same libraries
    // ONNX Runtime opens when the provider is registered, and the handle is closed at once.
    unsafe { libloading::Library::new(soname) }.is_ok()
}

/// The TensorRT version libnvinfer reports (`getInferLibVersion`: major·10000 + minor·100 + patch).
pub fn tensorrt_version() -> Option<String> {
    // SAFETY: as in `loads`; `getInferLibVersion` takes no arguments and returns an int32
    // in every TensorRT release since 5.
    let version = unsafe {
        let lib = libloading::Library::new("libnvinfer.so.10").ok()?;
        let get: libloading::Symbol<'_, unsafe extern "C" fn() -> i32> = lib.get(b"getInferLibVersion").ok()?;
        get()
    };
    Some(format!("{}.{}.{}", version / 10000, (version / 100) % 100, version % 100))
}

/// The device's name and compute capability from NVML (e.g. `NVIDIA H200 (sm_90)`).
/// `device` is a CUDA ordinal; under `CUDA_VISIBLE_DEVICES` it is looked up in that list
/// (indices or `GPU-…` UUIDs), since NVML numbers every GPU of the host.
pub fn gpu_identity(device: u32) -> Result<String, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML (the NVIDIA driver) is unavailable: {e}"))?;
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let entry = visible.as_deref().and_then(|v| v.split(',').nth(device as usize)).map(str::trim);
    let dev = match entry {
        Some(uuid) if uuid.starts_with("GPU-") || uuid.starts_with("MIG-") => nvml.device_by_uuid(uuid),
        Some(index) => match index.parse::<u32>() {
            Ok(i) => nvml.device_by_index(i),
            Err(_) => return Err(format!("CUDA_VISIBLE_DEVICES entry {index:?} is neither an index nor a UUID")),
        },
        None => nvml.device_by_index(device),
    }
    .map_err(|e| format!("GPU {device}: {e}"))?;
    let name = dev.name().map_err(|e| format!("GPU {device}: {e}"))?;
    let cc = dev.cuda_compute_capability().map_err(|e| format!("GPU {device}: {e}"))?;
    Ok(format!("{name} (sm_{}{})", cc.major, cc.minor))
}

/// The ONNX Runtime release (from the real library's file name, `libonnxruntime.so.1.31.1`)
/// and its build string (`git-commit-id=…`), which names the exact build.
pub fn onnxruntime_version(ort_library: &Path) -> String {
    let real = std::fs::canonicalize(ort_library).unwrap_or_else(|_| ort_library.to_path_buf());
    let file = real.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let release = file.split_once(".so.").map_or("unknown release", |(_, v)| v).to_string();
    format!("{release} ({})", ort::info())
}

/// The cache-key facts for a TensorRT session on `device` with the runtime from `ort_library`.
pub fn environment(device: u32, ort_library: &Path) -> Result<Environment, Unavailable> {
    let gpu = gpu_identity(device)
        .map_err(|reason| Unavailable { reason, install: vec![install_hint("libcuda.so.1").to_string()] })?;
    let tensorrt = tensorrt_version().ok_or_else(|| Unavailable {
        reason: "libnvinfer.so.10 does not report its version (getInferLibVersion)".into(),
        install: vec![install_hint("libnvinfer.so.10").to_string()],
    })?;
    Ok(Environment { gpu, tensorrt, onnxruntime: onnxruntime_version(ort_library) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_libraries_of_a_real_library() -> Result<(), String> {
        // The test binary itself is an ELF executable that needs libc.
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let needed = needed_libraries(&exe)?;
        assert!(needed.iter().any(|n| n.starts_with("libc.so")), "{needed:?}");
        assert!(missing_libraries(&exe)?.is_empty(), "this process's own libraries load");
        assert!(needed_libraries(Path::new("/nonexistent/lib.so")).is_err());
        Ok(())
    }

    #[test]
    fn hints_name_what_to_install() {
        assert!(install_hint("libnvinfer.so.10").contains("TensorRT 10"));
        assert!(install_hint("libnvonnxparser.so.10").contains("TensorRT 10"));
        assert!(install_hint("libcudnn.so.9").contains("cuDNN 9"));
        assert!(install_hint("libcublasLt.so.13").contains("CUDA 13"));
        assert!(install_hint("libcuda.so.1").contains("driver"));
        assert!(!loads("libkiln-does-not-exist.so.7"));
    }
}
