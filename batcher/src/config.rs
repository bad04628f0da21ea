use std::time::Duration;

/// Scheduling parameters for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct BatcherConfig {
    /// Largest number of items (images, sequences) in one executed batch.
    pub max_batch_size: usize,
    /// How long the oldest queued request may wait for the batch to fill. With
    /// `target_p99` set this is the upper bound of the adaptive delay.
    pub max_queue_delay: Duration,
    /// Batch sizes worth dispatching at once, without waiting out the delay.
    pub preferred_batch_sizes: Vec<usize>,
    /// Requests admitted but not yet executing; beyond it requests are refused at once.
    pub max_queue_size: usize,
    /// Executor threads pulling batches concurrently.
    pub instance_count: usize,
    /// Deadline for requests that set none; `None` waits indefinitely.
    pub default_timeout: Option<Duration>,
    /// Priority levels `1..=priority_levels`, 1 the highest.
    pub priority_levels: u32,
    /// Level of requests that ask for none.
    pub default_priority: u32,
    /// Anti-starvation: a waiting request competes one level higher for every
    /// `priority_aging` it has waited.
    pub priority_aging: Duration,
    /// Adaptive delay: tune the effective queue delay so that the p99 latency stays
    /// under this target. `None` uses `max_queue_delay` as a fixed delay.
    pub target_p99: Option<Duration>,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(2),
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 1024,
            instance_count: 1,
            default_timeout: None,
            priority_levels: 1,
            default_priority: 1,
            priority_aging: Duration::from_millis(100),
            target_p99: None,
        }
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
        if let Some(p) = self.preferred_batch_sizes.iter().find(|&&p| p == 0 || p > self.max_batch_size) {
            return Err(format!("preferred batch size {p} must be between 1 and max_batch_size"));
        }
        if self.priority_levels == 0 || !(1..=self.priority_levels).contains(&self.default_priority) {
            return Err("default_priority must be between 1 and priority_levels".into());
        }
        if self.priority_aging.is_zero() {
            return Err("priority_aging must be positive".into());
        }
        if self.target_p99.is_some_and(|t| t.is_zero()) {
            return Err("target_p99 must be positive".into());
        }
        Ok(())
    }
}
