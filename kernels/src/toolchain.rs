//! NVRTC compilation of the embedded kernels and the on-disk kernel cache.
//!
//! cudarc *panics* when it has to load a CUDA library that is absent, so every entry point here
//! first probes the libraries with dlopen ([`cuda_available`], [`nvrtc_available`]) and returns
//! [`KernelError::CudaUnavailable`] instead; nothing in this module panics without CUDA.
//!
//! Kernels are compiled to PTX for the device's virtual architecture (`compute_XY`) and loaded
//! with the driver, which assembles the PTX for the exact GPU. The PTX is cached on disk, keyed
//! by sha256 over (source, arch, NVRTC version, kiln version, compile options), so a process
//! compiles each kernel once per machine, not once per start.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, PinnedHostSlice};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use sha2::{Digest, Sha256};

use crate::KernelError;
use crate::cuda_sys;
use crate::sources::KernelSource;

/// Bumped when the cache entry format or the way keys are built changes.
const CACHE_FORMAT: &str = "kiln-kernel-cache/1";
const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");
/// First line of every cache entry: the sha256 of the PTX that follows, so that a truncated or
/// otherwise damaged file is detected and recompiled rather than handed to the driver.
const ENTRY_HEADER: &str = "// kiln-kernel-cache sha256:";

/// NVRTC options used for every kernel (part of the cache key). No fast-math: the kernels must
/// match their CPU reference implementations to 1e-5.
fn compile_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_owned()]
}

/// `Ok` when the NVRTC library can be loaded (enough for [`compile_ptx`]; no GPU needed).
pub fn nvrtc_available() -> Result<(), KernelError> {
    if cuda_sys::nvrtc_library_present() {
        Ok(())
    } else {
        Err(KernelError::CudaUnavailable(
            "NVRTC library (libnvrtc.so.13) not found on the library path (LD_LIBRARY_PATH)".into(),
        ))
    }
}

/// `Ok` when the CUDA driver and NVRTC libraries are present and at least one device exists.
pub fn cuda_available() -> Result<(), KernelError> {
    device_count().and_then(|n| {
        if n > 0 { Ok(()) } else { Err(KernelError::CudaUnavailable("the CUDA driver reports no device".into())) }
    })
}

fn device_count() -> Result<usize, KernelError> {
    if !cuda_sys::driver_library_present() {
        return Err(KernelError::CudaUnavailable(
            "CUDA driver library (libcuda.so) not found: no NVIDIA driver".into(),
        ));
    }
    nvrtc_available()?;
    let n = CudaContext::device_count()
        .map_err(|e| KernelError::CudaUnavailable(format!("CUDA driver initialisation failed: {e:?}")))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// NVRTC's version, queried once per process.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    static VERSION: OnceLock<Result<(i32, i32), String>> = OnceLock::new();
    nvrtc_available()?;
    VERSION.get_or_init(cuda_sys::nvrtc_version).clone().map_err(KernelError::CudaUnavailable)
}

/// `compute_XY` for `sm_XY`, `compute_XY` or `XY` (PTX is generated for the virtual architecture).
pub fn virtual_arch(arch: &str) -> Result<String, KernelError> {
    let digits = arch.strip_prefix("sm_").or_else(|| arch.strip_prefix("compute_")).unwrap_or(arch);
    let valid = (2..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
    if valid {
        Ok(format!("compute_{digits}"))
    } else {
        Err(KernelError::InvalidArgument(format!("GPU architecture {arch:?}: expected sm_XY or compute_XY")))
    }
}

/// Compiles one kernel source to PTX for `arch` (`sm_90` or `compute_90`). Needs only libnvrtc,
/// no GPU. No disk cache here: this is what the cache is filled from, and what the CI check calls.
pub fn compile_ptx(src: &KernelSource, arch: &str) -> Result<String, KernelError> {
    let arch = virtual_arch(arch)?;
    nvrtc_available()?;
    // cudarc turns these into C strings with `expect`: refuse them here instead of panicking.
    if src.source.contains('\0') || src.name.contains('\0') {
        return Err(KernelError::InvalidArgument(format!("kernel {}: NUL byte in source or name", src.name)));
    }
    let opts = CompileOptions {
        options: compile_options(&arch),
        name: Some(format!("{}.cu", src.name)),
        ..Default::default()
    };
    let compile_error = |log: String| KernelError::Compile { kernel: src.name.to_owned(), arch: arch.clone(), log };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src.source, opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => compile_error(log.to_string_lossy().into_owned()),
        other => compile_error(format!("{other:?}")),
    })?;
    let bytes = ptx.as_bytes().ok_or_else(|| compile_error("NVRTC returned no PTX image".into()))?;
    let bytes = bytes.split(|&b| b == 0).next().unwrap_or_default();
    String::from_utf8(bytes.to_vec()).map_err(|_| compile_error("NVRTC returned PTX that is not UTF-8".into()))
}

/// The kernel cache directory: `$KILN_KERNEL_CACHE`, else `$XDG_CACHE_HOME/kiln/kernels`, else
/// `~/.cache/kiln/kernels`; `None` when none of them is set (the cache is then skipped).
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|k| std::env::var_os(k))
}

/// [`cache_dir`] over an arbitrary environment (tests cannot safely set process variables).
pub fn cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("KILN_KERNEL_CACHE") {
        return Some(dir);
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(xdg) = set("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("kiln").join("kernels"));
    }
    set("HOME").map(|home| home.join(".cache").join("kiln").join("kernels"))
}

/// The cache key (hex sha256) of `src` compiled for `arch` by NVRTC `nvrtc`.
pub fn cache_key(src: &KernelSource, arch: &str, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    // Length-prefix every field so that no two different tuples hash the same bytes.
    let fields = [
        CACHE_FORMAT.to_owned(),
        KILN_VERSION.to_owned(),
        format!("nvrtc {}.{}", nvrtc.0, nvrtc.1),
        arch.to_owned(),
        compile_options(arch).join(" "),
        src.name.to_owned(),
        src.source.to_owned(),
    ];
    for f in &fields {
        h.update((f.len() as u64).to_le_bytes());
        h.update(f.as_bytes());
    }
    hex(&h.finalize())
}

/// Where the entry for `key` lives in `dir`: readable names, the key keeps them distinct.
pub fn cache_path(dir: &Path, src: &KernelSource, arch: &str, key: &str) -> PathBuf {
    let short = key.get(..32).unwrap_or(key);
    let name: String = src.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect();
    dir.join(format!("{name}-{arch}-{short}.ptx"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The PTX stored at `path`, or `None` if it is missing, unreadable or damaged (then recompiled).
pub fn read_cache_entry(path: &Path) -> Option<String> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "kernel cache entry unreadable; recompiling");
            return None;
        }
    };
    let parsed = String::from_utf8(text).ok().and_then(|text| {
        let (header, body) = text.split_once('\n')?;
        let sum = header.strip_prefix(ENTRY_HEADER)?;
        (sum == hex(&Sha256::digest(body.as_bytes())) && !body.contains('\0')).then(|| body.to_owned())
    });
    if parsed.is_none() {
        tracing::warn!(path = %path.display(), "kernel cache entry damaged; recompiling");
    }
    parsed
}

/// Writes `ptx` to `path` atomically (temporary file in the same directory, then rename), so a
/// concurrent reader or a crash never leaves a half-written entry under the final name.
pub fn write_cache_entry(path: &Path, ptx: &str) -> Result<(), KernelError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let err = |reason: String| KernelError::Cache { path: path.to_owned(), reason };
    let dir = path.parent().ok_or_else(|| err("no parent directory".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| err(format!("create directory: {e}")))?;
    let tmp = path.with_extension(format!("tmp.{}.{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{ENTRY_HEADER}{}", hex(&Sha256::digest(ptx.as_bytes())))?;
        f.write_all(ptx.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(format!("write: {e}"))
    })
}

/// PTX for `src` on `arch`, from the disk cache when a valid entry exists, else compiled (and
/// stored; a cache that cannot be written is logged and skipped, never an error).
/// `fresh` skips the lookup (used when a cached entry failed to load).
fn cached_ptx(src: &KernelSource, arch: &str, dir: Option<&Path>, fresh: bool) -> Result<(String, bool), KernelError> {
    let arch = virtual_arch(arch)?;
    let path = match dir {
        Some(dir) => Some(cache_path(dir, src, &arch, &cache_key(src, &arch, nvrtc_version()?))),
        None => None,
    };
    if let Some(path) = path.as_deref().filter(|_| !fresh)
        && let Some(ptx) = read_cache_entry(path)
    {
        tracing::debug!(kernel = src.name, path = %path.display(), "kernel cache hit");
        return Ok((ptx, true));
    }
    let started = std::time::Instant::now();
    let ptx = compile_ptx(src, &arch)?;
    tracing::info!(kernel = src.name, arch = %arch, ms = started.elapsed().as_millis() as u64, "compiled kernel with NVRTC");
    if let Some(path) = path.as_deref()
        && let Err(e) = write_cache_entry(path, &ptx)
    {
        tracing::warn!(error = %e, "kernel cache not written");
    }
    Ok((ptx, false))
}

/// One opened GPU: its context, a default (non-blocking) stream, and the kernels loaded so far.
#[derive(Debug)]
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    arch: String,
    name: String,
    cache_dir: Option<PathBuf>,
    /// Loaded modules, keyed by the address and length of the (static) source text.
    modules: Mutex<HashMap<(usize, usize), Arc<CudaModule>>>,
}

impl Gpu {
    /// Opens device `ordinal`. `Err(CudaUnavailable)` without a driver, NVRTC or device.
    pub fn open(ordinal: usize) -> Result<Gpu, KernelError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(KernelError::CudaUnavailable(format!("no CUDA device {ordinal} ({count} present)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(KernelError::driver("create context"))?;
        let (major, minor) = ctx.compute_capability().map_err(KernelError::driver("compute capability"))?;
        let name = ctx.name().map_err(KernelError::driver("device name"))?;
        // A non-blocking stream: the legacy default stream would serialise with the pipeline's streams.
        let stream = ctx.new_stream().map_err(KernelError::driver("create stream"))?;
        Ok(Gpu {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            name,
            cache_dir: cache_dir(),
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Uses `dir` as the kernel cache instead of [`cache_dir`]'s (`None`: no disk cache).
    pub fn set_cache_dir(&mut self, dir: Option<PathBuf>) {
        self.cache_dir = dir;
    }

    /// The device's architecture, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `len` bytes of zeroed page-locked host memory (cacheable, not write-combined), the kind
    /// that H2D copies run from at full PCIe speed and asynchronously.
    pub fn alloc_pinned(&self, len: usize) -> Result<PinnedHostSlice<u8>, KernelError> {
        cuda_sys::alloc_pinned_zeroed(&self.ctx, len).map_err(|e| KernelError::Driver(format!("pinned alloc: {e:?}")))
    }

    /// Function `name` of `src`: the module is compiled (or read from the disk cache) and loaded
    /// on first use, then reused for this `Gpu`.
    pub fn function(&self, src: &KernelSource, name: &str) -> Result<CudaFunction, KernelError> {
        if !src.functions.contains(&name) || name.contains('\0') {
            return Err(KernelError::InvalidArgument(format!("kernel {} has no function {name:?}", src.name)));
        }
        let module = self.module(src)?;
        module
            .load_function(name)
            .map_err(|e| KernelError::Driver(format!("load function {name} of {}: {e:?}", src.name)))
    }

    fn module(&self, src: &KernelSource) -> Result<Arc<CudaModule>, KernelError> {
        let key = (src.source.as_ptr() as usize, src.source.len());
        let mut modules = self.modules.lock().map_err(|_| KernelError::Driver("module table poisoned".into()))?;
        if let Some(m) = modules.get(&key) {
            return Ok(m.clone());
        }
        let (ptx, from_cache) = cached_ptx(src, &self.arch, self.cache_dir.as_deref(), false)?;
        let module = match self.ctx.load_module(Ptx::from_src(ptx)) {
            Ok(m) => m,
            // A valid-looking cache entry the driver rejects (e.g. written by another driver
            // version): compile afresh, overwrite it, and try once more.
            Err(e) if from_cache => {
                tracing::warn!(kernel = src.name, error = ?e, "cached PTX rejected by the driver; recompiling");
                let (ptx, _) = cached_ptx(src, &self.arch, self.cache_dir.as_deref(), true)?;
                self.ctx
                    .load_module(Ptx::from_src(ptx))
                    .map_err(|e| KernelError::Driver(format!("load module {}: {e:?}", src.name)))?
            }
            Err(e) => return Err(KernelError::Driver(format!("load module {}: {e:?}", src.name))),
        };
        modules.insert(key, module.clone());
        Ok(module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: KernelSource =
        KernelSource { name: "t", source: "extern \"C\" __global__ void f() {}", functions: &["f"] };

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn no_cuda_is_an_error_value_not_a_panic() {
        // Whatever this machine has, no call panics, and a missing device is CudaUnavailable.
        let available = cuda_available();
        assert!(matches!(available, Ok(()) | Err(KernelError::CudaUnavailable(_))), "{available:?}");
        assert!(matches!(Gpu::open(usize::MAX), Err(KernelError::CudaUnavailable(_))));
        if !cuda_sys::driver_library_present() {
            assert!(matches!(available, Err(KernelError::CudaUnavailable(_))));
            assert!(matches!(Gpu::open(0), Err(KernelError::CudaUnavailable(_))));
        }
        if !cuda_sys::nvrtc_library_present() {
            assert!(matches!(compile_ptx(&SRC, "sm_90"), Err(KernelError::CudaUnavailable(_))));
            assert!(matches!(nvrtc_version(), Err(KernelError::CudaUnavailable(_))));
        }
    }

    #[test]
    fn cache_dir_precedence() {
        let all = [("KILN_KERNEL_CACHE", "/k"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(cache_dir_from(env(&all)), Some(PathBuf::from("/k")));
        assert_eq!(cache_dir_from(env(&all[1..])), Some(PathBuf::from("/x/kiln/kernels")));
        assert_eq!(cache_dir_from(env(&all[2..])), Some(PathBuf::from("/h/.cache/kiln/kernels")));
        // Empty and relative values are ignored.
        let odd = [("KILN_KERNEL_CACHE", ""), ("XDG_CACHE_HOME", "rel"), ("HOME", "/h")];
        assert_eq!(cache_dir_from(env(&odd)), Some(PathBuf::from("/h/.cache/kiln/kernels")));
        assert_eq!(cache_dir_from(env(&[])), None);
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let base = cache_key(&SRC, "compute_90", (13, 0));
        assert_eq!(base.len(), 64);
        assert_eq!(base, cache_key(&SRC, "compute_90", (13, 0)));
        let other_src = KernelSource { source: "extern \"C\" __global__ void f() { }", ..SRC };
        assert_ne!(base, cache_key(&other_src, "compute_90", (13, 0)));
        assert_ne!(base, cache_key(&SRC, "compute_80", (13, 0)));
        assert_ne!(base, cache_key(&SRC, "compute_90", (13, 1)));
        let path = cache_path(Path::new("/c"), &SRC, "compute_90", &base);
        assert_eq!(path, PathBuf::from(format!("/c/t-compute_90-{}.ptx", &base[..32])));
    }

    #[test]
    fn virtual_arch_forms() {
        assert_eq!(virtual_arch("sm_90").ok().as_deref(), Some("compute_90"));
        assert_eq!(virtual_arch("compute_80").ok().as_deref(), Some("compute_80"));
        assert_eq!(virtual_arch("120").ok().as_deref(), Some("compute_120"));
        for bad in ["sm_9a", "", "sm_", "gfx90a", "sm_1234"] {
            assert!(matches!(virtual_arch(bad), Err(KernelError::InvalidArgument(_))), "{bad}");
        }
    }

    #[test]
    fn cache_entries_round_trip_and_damage_is_detected() {
        let dir = std::env::temp_dir().join(format!("kiln-kernel-cache-test-{}", std::process::id()));
        let path = dir.join("sub").join("k.ptx");
        assert_eq!(read_cache_entry(&path), None, "missing entry");
        let ptx = ".version 9.0\n.target sm_90\n// body\n";
        write_cache_entry(&path, ptx).expect("write");
        assert_eq!(read_cache_entry(&path).as_deref(), Some(ptx));
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.join("sub")).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![OsString::from("k.ptx")]);
        // Truncated, flipped, header-less and non-UTF-8 entries all read as misses.
        let good = std::fs::read(&path).expect("read");
        let damaged: [Vec<u8>; 4] = [
            good[..good.len() - 3].to_vec(),
            good.iter().map(|&b| if b == b'9' { b'8' } else { b }).collect(),
            ptx.as_bytes().to_vec(),
            vec![0xff, 0xfe, b'\n'],
        ];
        for bytes in damaged {
            std::fs::write(&path, bytes).expect("write damaged");
            assert_eq!(read_cache_entry(&path), None);
        }
        // A rewrite repairs it.
        write_cache_entry(&path, ptx).expect("rewrite");
        assert_eq!(read_cache_entry(&path).as_deref(), Some(ptx));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unwritable_cache_is_an_error_value_not_a_panic() {
        // A path below a regular file cannot be created.
        let file = std::env::temp_dir().join(format!("kiln-kernel-cache-file-{}", std::process::id()));
        std::fs::write(&file, b"x").expect("write");
        let err = write_cache_entry(&file.join("k.ptx"), "ptx");
        assert!(matches!(err, Err(KernelError::Cache { .. })), "{err:?}");
        let _ = std::fs::remove_file(&file);
    }
}
