//! Fixtures shared by the batcher's test targets.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long an executor may stay blocked on a gate before giving up, so a broken
/// batcher fails a test instead of hanging it.
pub const BLOCK_LIMIT: Duration = Duration::from_secs(3);

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A latch the test opens; executors wait on it (with a time limit).
#[derive(Debug, Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn open(&self) {
        *lock(&self.open) = true;
        self.cv.notify_all();
    }

    /// True once open; false if it stayed closed for `BLOCK_LIMIT`.
    pub fn wait(&self) -> bool {
        let guard = lock(&self.open);
        let (guard, _) =
            self.cv.wait_timeout_while(guard, BLOCK_LIMIT, |open| !*open).unwrap_or_else(PoisonError::into_inner);
        *guard
    }
}

/// Opens the gate when dropped, so a failing test never leaves executors blocked.
#[derive(Debug)]
pub struct OpenOnDrop(pub Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}
