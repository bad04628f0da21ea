//! Plan files: the optimised graph, its weights and the build settings.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! "KILNPLAN" | u32 format version | u64 header length | u64 blob length
//! header: JSON { settings, graph } (constants as references into the blob)
//! zero padding to a multiple of 64 bytes
//! blob: every constant tensor at a 64-byte-aligned offset
//! u32 CRC32 of everything before it
//! ```
//!
//! A plan is tied to the kiln that built it (kernels and op semantics may
//! change between versions), to the target arch and to the build precision;
//! loading refuses a mismatch rather than running it subtly wrong. Nothing in
//! the file is trusted: every length, offset and id is checked, so a corrupt
//! or truncated plan is an error, never a crash.

mod blob;
mod header;
#[cfg(test)]
mod tests;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::graph::{Graph, GraphError, Precision};
use header::Header;

pub const MAGIC: &[u8; 8] = b"KILNPLAN";
/// Bumped whenever the layout or the header schema changes.
pub const FORMAT_VERSION: u32 = 1;
/// The kiln version written into plans and required of plans loaded.
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Magic, format version, header length, blob length.
const PREAMBLE: usize = 8 + 4 + 8 + 8;
const CRC_LEN: usize = 4;

/// A range of values one symbolic dimension takes at run time (TensorRT's
/// optimisation profile): kernels are tuned for `opt` and must work up to `max`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub symbol: String,
    pub min: usize,
    pub opt: usize,
    pub max: usize,
}

/// How a plan was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSettings {
    pub kiln_version: String,
    /// Target, e.g. `cpu-reference` or `sm_90`.
    pub arch: String,
    pub precision: Precision,
    pub profiles: Vec<Profile>,
    /// File name of the model the plan was built from.
    pub source: String,
}

impl BuildSettings {
    /// Settings for this kiln version, with no profiles.
    pub fn new(arch: impl Into<String>, precision: Precision, source: impl Into<String>) -> Self {
        Self {
            kiln_version: KILN_VERSION.to_string(),
            arch: arch.into(),
            precision,
            profiles: Vec::new(),
            source: source.into(),
        }
    }
}

/// A built engine: settings plus the optimised graph with its weights.
#[derive(Debug, Clone)]
pub struct Plan {
    pub settings: BuildSettings,
    pub graph: Graph,
}

/// What the loader requires of a plan; `None` accepts anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expect {
    pub arch: Option<String>,
    pub precision: Option<Precision>,
}

fn plan_err(m: impl Into<String>) -> GraphError {
    GraphError::Plan(m.into())
}

/// Serialises a plan. FP32 weights with FP16 storage are written as FP16.
pub fn to_bytes(plan: &Plan) -> Vec<u8> {
    let mut blob = Vec::new();
    let graph = header::graph_to_rec(&plan.graph, &mut blob);
    let header = Header { settings: plan.settings.clone(), graph };
    // Cannot fail: every map in the header has string keys and every custom
    // serializer writes plain numbers or strings. An empty header would still
    // be refused on load rather than misread.
    let json = serde_json::to_vec(&header).unwrap_or_default();
    assemble(&json, &blob)
}

fn assemble(header: &[u8], blob: &[u8]) -> Vec<u8> {
    let start = (PREAMBLE + header.len()).next_multiple_of(blob::ALIGN);
    let mut out = Vec::with_capacity(start + blob.len() + CRC_LEN);
    out.extend_from_slice(MAGIC);
    out.extend(FORMAT_VERSION.to_le_bytes());
    out.extend((header.len() as u64).to_le_bytes());
    out.extend((blob.len() as u64).to_le_bytes());
    out.extend_from_slice(header);
    out.resize(start, 0);
    out.extend_from_slice(blob);
    let crc = crc32fast::hash(&out);
    out.extend(crc.to_le_bytes());
    out
}

/// Checks the framing (magic, version, lengths, checksum) and returns the
/// header and blob bytes.
fn split(bytes: &[u8]) -> Result<(&[u8], &[u8]), GraphError> {
    let n = bytes.len();
    if !bytes.starts_with(MAGIC) {
        return Err(if MAGIC.starts_with(bytes) {
            plan_err(format!("truncated: {n} bytes is shorter than the plan header"))
        } else {
            plan_err("not a kiln plan (bad magic; expected the file to start with KILNPLAN)")
        });
    }
    let (Some(version), Some(header_len), Some(blob_len)) =
        (bytes.get(8..12), bytes.get(12..20), bytes.get(20..PREAMBLE))
    else {
        return Err(plan_err(format!("truncated: {n} bytes is shorter than the plan header")));
    };
    let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default());
    let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    let version = le32(version);
    if version != FORMAT_VERSION {
        return Err(plan_err(format!(
            "plan format version {version} is not supported (this kiln reads version {FORMAT_VERSION}); \
             rebuild the plan with this kiln"
        )));
    }
    let (header_len, blob_len) = (le64(header_len), le64(blob_len));
    let layout = usize::try_from(header_len).ok().and_then(|h| {
        let blob_start = PREAMBLE.checked_add(h)?.checked_next_multiple_of(blob::ALIGN)?;
        let blob_end = blob_start.checked_add(usize::try_from(blob_len).ok()?)?;
        Some((PREAMBLE + h, blob_start, blob_end, blob_end.checked_add(CRC_LEN)?))
    });
    let Some((header_end, blob_start, blob_end, total)) = layout else {
        return Err(plan_err(format!(
            "header ({header_len} bytes) and weights ({blob_len} bytes) are impossibly large"
        )));
    };
    if n < total {
        return Err(plan_err(format!(
            "truncated: the plan declares {total} bytes ({header_len} header, {blob_len} weights) but has {n}"
        )));
    }
    if n > total {
        return Err(plan_err(format!("{} unexpected bytes after the checksum", n - total)));
    }
    let stored = le32(&bytes[blob_end..]);
    let computed = crc32fast::hash(&bytes[..blob_end]);
    if stored != computed {
        return Err(plan_err(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x}): the plan is corrupt"
        )));
    }
    Ok((&bytes[PREAMBLE..header_end], &bytes[blob_start..blob_end]))
}

fn check_settings(s: &BuildSettings, expect: &Expect) -> Result<(), GraphError> {
    if s.kiln_version != KILN_VERSION {
        return Err(plan_err(format!(
            "plan was built by kiln {}, this is kiln {KILN_VERSION}; rebuild it (kernels and op semantics may differ)",
            s.kiln_version
        )));
    }
    if let Some(arch) = expect.arch.as_ref().filter(|a| **a != s.arch) {
        return Err(plan_err(format!("plan was built for arch {}, but this device needs {arch}; rebuild it", s.arch)));
    }
    if let Some(p) = expect.precision.filter(|p| *p != s.precision) {
        return Err(plan_err(format!("plan was built for precision {:?}, but {p:?} was requested", s.precision)));
    }
    for p in &s.profiles {
        if !(p.min <= p.opt && p.opt <= p.max) {
            return Err(plan_err(format!(
                "profile {}: min {} ≤ opt {} ≤ max {} does not hold",
                p.symbol, p.min, p.opt, p.max
            )));
        }
    }
    Ok(())
}

/// Parses and checks a plan, refusing one built by another kiln, for another
/// arch or precision than `expect` asks, or damaged in any way.
pub fn from_bytes(bytes: &[u8], expect: &Expect) -> Result<Plan, GraphError> {
    let (header, blob) = split(bytes)?;
    let header: Header =
        serde_json::from_slice(header).map_err(|e| plan_err(format!("the header is not valid: {e}")))?;
    check_settings(&header.settings, expect)?;
    let graph = header::rec_to_graph(header.graph, blob).map_err(|e| plan_err(format!("invalid graph: {e}")))?;
    Ok(Plan { settings: header.settings, graph })
}

/// Writes a plan file.
pub fn save(plan: &Plan, path: &Path) -> Result<(), GraphError> {
    std::fs::write(path, to_bytes(plan)).map_err(|e| GraphError::Io { path: path.to_path_buf(), reason: e.to_string() })
}

/// Reads and checks a plan file (see [`from_bytes`]).
pub fn load(path: &Path, expect: &Expect) -> Result<Plan, GraphError> {
    let bytes = std::fs::read(path).map_err(|e| GraphError::Io { path: path.to_path_buf(), reason: e.to_string() })?;
    from_bytes(&bytes, expect).map_err(|e| match e {
        GraphError::Plan(m) => GraphError::Plan(format!("{}: {m}", path.display())),
        other => other,
    })
}
