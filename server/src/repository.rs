//! The live model repository: every loaded model version, swappable while serving.
//! Requests take a snapshot (`Arc`) of what they need, so a load or unload never waits
//! for traffic and traffic never sees a half-loaded model: a new version set replaces
//! the old one in one step, only after every version in it loaded and warmed up. A
//! failed load leaves the previous versions serving. Retired versions finish the
//! requests they hold and stop when the last one drops them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use crate::ServerError;
use crate::config::BackendKind;
use crate::error::{ApiError, ErrorKind};
use crate::metrics::Metrics;
use crate::model::Model;

/// The loaded versions of one model, newest last.
pub(crate) type Versions = BTreeMap<u64, Arc<Model>>;

#[derive(Debug)]
pub(crate) struct Repository {
    root: PathBuf,
    ort_library: PathBuf,
    backend: Option<BackendKind>,
    metrics: Arc<Metrics>,
    table: RwLock<Arc<HashMap<String, Versions>>>,
    /// Serialises load/unload so a slow load cannot resurrect a model unloaded meanwhile.
    admin: Mutex<()>,
    /// Versions replaced or unloaded that may still be finishing requests; shutdown
    /// drains them too.
    retired: Mutex<Vec<Weak<Model>>>,
}

/// Model names are directory names under the repository: one plain path component.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

impl Repository {
    /// Loads every model directory (one holding a `config.toml`) under `root`.
    pub(crate) fn open(
        root: &Path,
        ort_library: &Path,
        backend: Option<BackendKind>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServerError> {
        let io = |e: std::io::Error| ServerError::Repository { path: root.to_path_buf(), reason: e.to_string() };
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(io)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join("config.toml").is_file())
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            return Err(ServerError::Repository {
                path: root.to_path_buf(),
                reason: "no model directories (each needs a config.toml); run `make setup`".into(),
            });
        }
        let repo = Self {
            root: root.to_path_buf(),
            ort_library: ort_library.to_path_buf(),
            backend,
            metrics,
            table: RwLock::new(Arc::new(HashMap::new())),
            admin: Mutex::new(()),
            retired: Mutex::new(Vec::new()),
        };
        let mut table = HashMap::new();
        for dir in dirs {
            let versions = repo.load_dir(&dir)?;
            if let Some(name) = versions.values().next().map(|m| m.name.clone()) {
                table.insert(name, versions);
            }
        }
        *repo.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        Ok(repo)
    }

    fn load_dir(&self, dir: &Path) -> Result<Versions, ServerError> {
        let models = Model::load_all(dir, &self.ort_library, self.backend, &self.metrics)?;
        for m in &models {
            self.metrics.set_model_ready(&m.name, &m.version.to_string(), true);
            self.metrics.set_model_backend(&m.backend_labels(), true);
        }
        Ok(models.into_iter().map(|m| (m.version, m)).collect())
    }

    /// What is loaded now; cheap, and unaffected by later loads and unloads.
    pub(crate) fn snapshot(&self) -> Arc<HashMap<String, Versions>> {
        Arc::clone(&self.table.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// A loaded model: the given version, or the newest.
    pub(crate) fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<Model>, ApiError> {
        let table = self.snapshot();
        let versions = table.get(name).ok_or_else(|| ApiError::new(ErrorKind::ModelNotFound, "unknown model"))?;
        let model = match version {
            Some(v) => versions.get(&v),
            None => versions.values().next_back(),
        };
        model.cloned().ok_or_else(|| ApiError::new(ErrorKind::ModelNotFound, "unknown model version"))
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.snapshot().contains_key(name)
    }

    /// (Re)loads `name` from disk, replacing its versions only if all of them load.
    /// Blocking: call from a blocking context.
    pub(crate) fn load(&self, name: &str) -> Result<(), ServerError> {
        if !valid_name(name) {
            return Err(ServerError::Repository { path: self.root.clone(), reason: "invalid model name".into() });
        }
        let dir = self.root.join(name);
        if !dir.join("config.toml").is_file() {
            return Err(ServerError::Repository { path: dir, reason: "no such model directory".into() });
        }
        let _admin = self.admin.lock().unwrap_or_else(PoisonError::into_inner);
        let versions = self.load_dir(&dir)?;
        let retired = self.swap(name, Some(versions));
        self.mark_retired(name, retired);
        Ok(())
    }

    /// Stops serving `name`; in-flight requests still finish. False if it was not loaded.
    pub(crate) fn unload(&self, name: &str) -> bool {
        let _admin = self.admin.lock().unwrap_or_else(PoisonError::into_inner);
        match self.swap(name, None) {
            Some(old) => {
                self.mark_retired(name, Some(old));
                true
            }
            None => false,
        }
    }

    fn swap(&self, name: &str, versions: Option<Versions>) -> Option<Versions> {
        let mut guard = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let mut table = HashMap::clone(&guard);
        let old = match versions {
            Some(v) => table.insert(name.to_string(), v),
            None => table.remove(name),
        };
        *guard = Arc::new(table);
        old
    }

    fn mark_retired(&self, name: &str, retired: Option<Versions>) {
        let current = self.snapshot();
        let mut draining = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        draining.retain(|m| m.strong_count() > 0);
        for (version, model) in retired.into_iter().flatten() {
            if current.get(name).is_none_or(|now| !now.contains_key(&version)) {
                self.metrics.set_model_ready(name, &version.to_string(), false);
            }
            // A reload may serve the same version on another backend: withdraw this one's
            // series unless the current model publishes identical labels.
            let labels = model.backend_labels();
            if current.get(name).and_then(|now| now.get(&version)).is_none_or(|m| m.backend_labels() != labels) {
                self.metrics.set_model_backend(&labels, false);
            }
            draining.push(Arc::downgrade(&model));
        }
    }

    /// Stops every model, served or retired but still held, draining its queue. Blocking.
    pub(crate) fn shutdown(&self) {
        let retired: Vec<Arc<Model>> =
            self.retired.lock().unwrap_or_else(PoisonError::into_inner).iter().filter_map(Weak::upgrade).collect();
        for model in self.snapshot().values().flat_map(|v| v.values()).chain(&retired) {
            model.batcher.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names_cannot_escape_the_repository() {
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", "x\0", "é", &"a".repeat(129)] {
            assert!(!valid_name(bad), "{bad:?} accepted");
        }
        for good in ["efficientnet_lite0", "add-sub.v2", "M1"] {
            assert!(valid_name(good), "{good:?} refused");
        }
    }
}
