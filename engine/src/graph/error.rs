use std::path::PathBuf;

/// One node the importer or shape inference could not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIssue {
    pub node: String,
    pub op: String,
    pub reason: String,
}

impl std::fmt::Display for NodeIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.node, self.op, self.reason)
    }
}

fn list(issues: &[NodeIssue]) -> String {
    issues.iter().map(|i| format!("\n  - {i}")).collect()
}

/// Errors of the builder: import, inference, passes, execution, plan files.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("cannot read {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("not a valid ONNX model: {0}")]
    Onnx(String),
    #[error("{} unsupported node(s):{}", .0.len(), list(.0))]
    Unsupported(Vec<NodeIssue>),
    #[error("shape inference failed at {0}")]
    Inference(NodeIssue),
    #[error("execution failed at {0}")]
    Execution(NodeIssue),
    #[error("invalid graph: {0}")]
    Invalid(String),
    #[error("input {name}: {reason}")]
    Input { name: String, reason: String },
    #[error("plan file: {0}")]
    Plan(String),
}
