use std::time::Duration;

/// Scheduling parameters for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct BatcherConfig {
    /// Largest number of items (images, sequences) in one executed batch.
    pub max_batch_size: usize,
    /// How long the oldest queued request may wait for the batch to fill.
    pub max_queue_delay: Duration,
    /// Requests admitted but not yet executing; beyond it `infer` refuses at once.
    pub max_queue_size: usize,
    /// Executor threads pulling batches concurrently.
    pub instance_count: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self { max_batch_size: 8, max_queue_delay: Duration::from_millis(2), max_queue_size: 1024, instance_count: 1 }
    }
}

impl BatcherConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_batch_size == 0 {
            return Err("max_batch_size must be at least 1".into());
        }
        if self.max_queue_size == 0 {
            return Err("max_queue_size must be at least 1".into());
        }
        if self.instance_count == 0 {
            return Err("instance_count must be at least 1".into());
        }
        Ok(())
    }
}
