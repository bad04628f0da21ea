//! Tactic selection and the timing cache.
//!
//! A tactic is one candidate algorithm of a library call (a cuBLASLt matmul
//! algo, a cuDNN convolution algo). At load, every GEMM and convolution with
//! more than one candidate is timed on the GPU and the fastest is kept. The
//! result is remembered under a key naming the device, the library versions
//! and the exact call (shapes, types, epilogue), in memory and in a timing
//! cache file reused across loads and builds — the part of TensorRT's build
//! time users complain about most is re-timing what was timed before.
//! `kiln build` on a GPU also writes the choices into the plan's per-node
//! kernel slots, so a plan carries its tactics to the machines it runs on.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::CudaError;

const FORMAT: u32 = 1;
/// Prefix of a tactic line in a plan node's kernel slot: `tactic <key> => <algo>`.
const PLAN_PREFIX: &str = "tactic ";
const PLAN_SEP: &str = " => ";

/// One remembered choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// The library's id of the winning candidate.
    pub algo: String,
    /// Its measured time per call, in milliseconds (0 when taken from a plan).
    pub ms: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    entries: BTreeMap<String, Choice>,
}

/// Tactic choices by key, optionally backed by a file.
#[derive(Debug, Default, Clone)]
pub struct TimingCache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, Choice>,
    dirty: bool,
}

impl TimingCache {
    /// An in-memory cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `path` if it exists (a missing file is an empty cache; a damaged
    /// one is an error rather than silently re-timed, so the user learns of it).
    pub fn open(path: &Path) -> Result<Self, CudaError> {
        let err = |reason: String| CudaError::TimingCache { path: path.to_owned(), reason };
        let entries = match std::fs::read(path) {
            Ok(bytes) => {
                let file: CacheFile =
                    serde_json::from_slice(&bytes).map_err(|e| err(format!("not a kiln timing cache: {e}")))?;
                if file.format != FORMAT {
                    return Err(err(format!("format {} (this kiln reads {FORMAT}); delete the file", file.format)));
                }
                file.entries
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(err(format!("read: {e}"))),
        };
        Ok(Self { path: Some(path.to_owned()), entries, dirty: false })
    }

    pub fn get(&self, key: &str) -> Option<&Choice> {
        self.entries.get(key)
    }

    pub fn insert(&mut self, key: String, choice: Choice) {
        if self.entries.get(&key) != Some(&choice) {
            self.entries.insert(key, choice);
            self.dirty = true;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the file (atomically: temporary file, then rename) if anything changed.
    pub fn save(&mut self) -> Result<(), CudaError> {
        let Some(path) = self.path.clone().filter(|_| self.dirty) else { return Ok(()) };
        let err = |reason: String| CudaError::TimingCache { path: path.clone(), reason };
        let file = CacheFile { format: FORMAT, entries: self.entries.clone() };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| err(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("create directory: {e}")))?;
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(format!("write: {e}"))
        })?;
        self.dirty = false;
        Ok(())
    }

    /// Adds the choices recorded in a plan node's kernel slot.
    pub fn seed_from_kernel_slot(&mut self, slot: &str) {
        for line in slot.lines() {
            if let Some((key, algo)) = line.strip_prefix(PLAN_PREFIX).and_then(|l| l.split_once(PLAN_SEP)) {
                self.entries.entry(key.to_owned()).or_insert(Choice { algo: algo.to_owned(), ms: 0.0 });
            }
        }
    }
}

/// The kernel-slot text recording `choices` (key, algo) for one node.
pub fn kernel_slot(choices: &[(String, String)]) -> String {
    choices.iter().map(|(k, a)| format!("{PLAN_PREFIX}{k}{PLAN_SEP}{a}")).collect::<Vec<_>>().join("\n")
}

/// Index of the fastest candidate: `time(i)` measures candidate `i` (an error
/// means the library refused it for this call, and it is skipped). `None`
/// when every candidate failed.
pub fn fastest(count: usize, mut time: impl FnMut(usize) -> Result<f64, CudaError>) -> Option<(usize, f64)> {
    let mut best: Option<(usize, f64)> = None;
    for i in 0..count {
        match time(i) {
            Ok(ms) if ms.is_finite() && best.is_none_or(|(_, b)| ms < b) => best = Some((i, ms)),
            Ok(_) => {}
            Err(e) => tracing::debug!(candidate = i, error = %e, "tactic refused"),
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fastest_skips_refused_candidates() {
        let times = [Ok(3.0), Err(CudaError::Dnn("refused".into())), Ok(1.5), Ok(f64::NAN), Ok(2.0)];
        let pick = fastest(times.len(), |i| match &times[i] {
            Ok(t) => Ok(*t),
            Err(_) => Err(CudaError::Dnn("refused".into())),
        });
        assert_eq!(pick, Some((2, 1.5)));
        assert_eq!(fastest(2, |_| Err(CudaError::Blas("no".into()))), None);
        assert_eq!(fastest(0, |_| Ok(1.0)), None);
    }

    #[test]
    fn cache_round_trips_through_its_file_and_plan_slots() -> Result<(), CudaError> {
        let dir = std::env::temp_dir().join(format!("kiln-timing-cache-{}", std::process::id()));
        let path = dir.join("sub").join("timing.json");
        let mut cache = TimingCache::open(&path)?;
        assert!(cache.is_empty());
        cache.insert("H100|gemm m=8".into(), Choice { algo: "a21-t18".into(), ms: 0.25 });
        cache.save()?;
        let again = TimingCache::open(&path)?;
        assert_eq!(again.get("H100|gemm m=8").map(|c| c.algo.as_str()), Some("a21-t18"));

        let slot = kernel_slot(&[("k1".into(), "IMPLICIT_PRECOMP_GEMM".into()), ("k2".into(), "a1".into())]);
        let mut seeded = TimingCache::new();
        seeded.seed_from_kernel_slot(&slot);
        seeded.seed_from_kernel_slot("not a tactic line");
        assert_eq!(seeded.len(), 2);
        assert_eq!(seeded.get("k1").map(|c| c.algo.as_str()), Some("IMPLICIT_PRECOMP_GEMM"));

        std::fs::write(&path, b"{ damaged").map_err(|e| CudaError::InvalidArgument(e.to_string()))?;
        assert!(matches!(TimingCache::open(&path), Err(CudaError::TimingCache { .. })));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
