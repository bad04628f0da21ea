//! The CUDA compile check that needs no GPU: every kernel in `sources::ALL` is compiled by NVRTC
//! for `compute_90` and `compute_80` and assembled by `ptxas -arch=sm_XY -v`; a compile error or
//! any register spill fails, and registers per kernel are printed.
//!
//! NVRTC and ptxas come from the pinned PyPI wheels that `scripts/setup-cuda` installs
//! (`KILN_CUDA_HOME`, default `<workspace>/.kiln/cuda`). cudarc dlopen()s `libnvrtc.so.13` by
//! name, and glibc reads `LD_LIBRARY_PATH` only when a process starts, so [`ptxas_check`] re-runs
//! the `nvrtc_*` tests of this binary in a child process with `$KILN_CUDA_HOME/lib` on it.
//! Missing packages fail the check (CI installs them) unless `KILN_SKIP_PTXAS=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_kernels::KernelError;
use kiln_kernels::sources::{self, KernelSource};
use kiln_kernels::toolchain::compile_ptx;

/// Set in the child process, whose `LD_LIBRARY_PATH` holds NVRTC.
const CHILD: &str = "KILN_PTXAS_CHILD";
const ARCHS: [(&str, &str); 2] = [("compute_90", "sm_90"), ("compute_80", "sm_80")];

fn cuda_home() -> PathBuf {
    match std::env::var_os("KILN_CUDA_HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.kiln/cuda"),
    }
}

#[test]
fn ptxas_check() {
    if std::env::var("KILN_SKIP_PTXAS").as_deref() == Ok("1") {
        println!("skipped: KILN_SKIP_PTXAS=1");
        return;
    }
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let home = cuda_home();
    let lib = home.join("lib");
    assert!(
        lib.join("libnvrtc.so.13").is_file() && home.join("bin/ptxas").is_file(),
        "NVRTC/ptxas not found under KILN_CUDA_HOME={}: run `scripts/setup-cuda` (pinned PyPI \
         nvidia-cuda-nvrtc/nvcc 13.0), point KILN_CUDA_HOME at a CUDA 13.0 toolkit, or set KILN_SKIP_PTXAS=1",
        home.display()
    );
    let mut path = lib.into_os_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
        path.push(":");
        path.push(old);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args(["nvrtc_", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", path)
        .env("KILN_CUDA_HOME", &home)
        .env(CHILD, "1")
        .output()
        .expect("re-run the test binary");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    print!("{text}");
    assert!(out.status.success(), "NVRTC/ptxas check failed:\n{text}");
    assert!(text.contains("test result: ok. 2 passed"), "child ran an unexpected set of tests:\n{text}");
}

/// What `ptxas -v` reports for one entry function.
#[derive(Debug, Default, PartialEq, Eq)]
struct Usage {
    function: String,
    registers: u32,
    spill_stores: u64,
    spill_loads: u64,
    stack: u64,
}

/// Parses `ptxas -v` output (stderr) into per-function usage.
fn parse_ptxas(out: &str) -> Vec<Usage> {
    let mut all: Vec<Usage> = Vec::new();
    let number_before = |line: &str, unit: &str| -> Option<u64> {
        let head = &line[..line.find(unit)?];
        head.split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
    };
    for line in out.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            all.push(Usage { function: name.to_owned(), ..Usage::default() });
        } else if let Some(u) = all.last_mut() {
            if line.contains("spill stores") {
                u.spill_stores = number_before(line, " bytes spill stores").unwrap_or(u64::MAX);
                u.spill_loads = number_before(line, " bytes spill loads").unwrap_or(u64::MAX);
                u.stack = number_before(line, " bytes stack frame").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                u.registers = number_before(line, " registers").and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
            }
        }
    }
    all
}

fn assemble(src: &KernelSource, virt: &str, sm: &str, ptxas: &Path, dir: &Path) -> Vec<Usage> {
    let ptx = match compile_ptx(src, virt) {
        Ok(ptx) => ptx,
        Err(e) => panic!("{e}"),
    };
    let input = dir.join(format!("{}-{virt}.ptx", src.name));
    std::fs::write(&input, ptx).expect("write PTX");
    let out = Command::new(ptxas)
        .arg(format!("-arch={sm}"))
        .arg("-v")
        .arg("-o")
        .arg(dir.join(format!("{}-{sm}.cubin", src.name)))
        .arg(&input)
        .output()
        .expect("run ptxas");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ptxas -arch={sm} rejected {} ({virt}):\n{log}", src.name);
    parse_ptxas(&log)
}

#[test]
fn nvrtc_kernels_assemble_without_spills() {
    if std::env::var_os(CHILD).is_none() {
        return; // run by `ptxas_check` with NVRTC on the library path
    }
    let home = cuda_home();
    let ptxas = home.join("bin/ptxas");
    let dir = std::env::temp_dir().join(format!("kiln-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut spills = Vec::new();
    println!(
        "{:<12} {:<24} {:<6} {:>9} {:>7} {:>13}",
        "kernel", "function", "arch", "registers", "stack", "spill st/ld"
    );
    for src in sources::ALL {
        for (virt, sm) in ARCHS {
            let usage = assemble(src, virt, sm, &ptxas, &dir);
            for f in src.functions {
                assert!(usage.iter().any(|u| u.function == *f), "{}: no entry {f} for {sm} in ptxas output", src.name);
            }
            for u in &usage {
                println!(
                    "{:<12} {:<24} {:<6} {:>9} {:>7} {:>6}/{:<6}",
                    src.name, u.function, sm, u.registers, u.stack, u.spill_stores, u.spill_loads
                );
                if u.spill_stores != 0 || u.spill_loads != 0 {
                    spills.push(format!("{}::{} on {sm}", src.name, u.function));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(spills.is_empty(), "register spills in: {}", spills.join(", "));
}

#[test]
fn nvrtc_compile_error_carries_the_log() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let bad = KernelSource {
        name: "broken",
        source: "extern \"C\" __global__ void f() { undeclared(); }",
        functions: &["f"],
    };
    match compile_ptx(&bad, "sm_90") {
        Err(KernelError::Compile { kernel, arch, log }) => {
            assert_eq!((kernel.as_str(), arch.as_str()), ("broken", "compute_90"));
            assert!(log.contains("undeclared"), "log: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    let version = kiln_kernels::toolchain::nvrtc_version().expect("NVRTC version");
    assert_eq!(version.0, 13, "the pinned NVRTC is CUDA 13.x, got {version:?}");
}

#[test]
fn parses_ptxas_verbose_output() {
    let out = "ptxas info    : 0 bytes gmem\n\
        ptxas info    : Compiling entry function 'kiln_preprocess' for 'sm_90'\n\
        ptxas info    : Function properties for kiln_preprocess\n\
        \x20   16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
        ptxas info    : Used 40 registers, used 0 barriers, 400 bytes cmem[0]\n\
        ptxas info    : Compiling entry function 'other' for 'sm_90'\n\
        ptxas info    : Function properties for other\n\
        \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
        ptxas info    : Used 8 registers, used 0 barriers, 368 bytes cmem[0]\n";
    let usage = parse_ptxas(out);
    assert_eq!(
        usage,
        vec![
            Usage { function: "kiln_preprocess".into(), registers: 40, spill_stores: 8, spill_loads: 12, stack: 16 },
            Usage { function: "other".into(), registers: 8, spill_stores: 0, spill_loads: 0, stack: 0 },
        ]
    );
}
