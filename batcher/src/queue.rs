//! The scheduler's pending requests: one FIFO per priority level, with aging so that
//! no level starves. Rule: a request of level `l` that has waited `w` competes as level
//! `max(1, l - floor(w / priority_aging))`; among equal effective levels the oldest
//! goes first. A request therefore waits at most `(l - 1) × priority_aging` before it
//! competes with the highest level, and from then on only with older requests.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::{Executor, Job};

pub(crate) struct Pending<E: Executor> {
    levels: Vec<VecDeque<Job<E>>>,
    aging: Duration,
    items: usize,
}

impl<E: Executor> Pending<E> {
    pub(crate) fn new(levels: u32, aging: Duration) -> Self {
        Self { levels: (0..levels.max(1)).map(|_| VecDeque::new()).collect(), aging, items: 0 }
    }

    fn level_of(&self, job: &Job<E>) -> usize {
        (job.priority.max(1) as usize - 1).min(self.levels.len() - 1)
    }

    pub(crate) fn push(&mut self, job: Job<E>) {
        let level = self.level_of(&job);
        self.items += job.items;
        self.levels[level].push_back(job);
    }

    /// Puts back jobs returned by [`Pending::take`], restoring the previous order.
    pub(crate) fn restore(&mut self, jobs: Vec<Job<E>>) {
        for job in jobs.into_iter().rev() {
            let level = self.level_of(&job);
            self.items += job.items;
            self.levels[level].push_front(job);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.levels.iter().all(VecDeque::is_empty)
    }

    /// Items queued, counting requests that already left (cleared lazily).
    pub(crate) fn items(&self) -> usize {
        self.items
    }

    /// Drops requests that expired or were cancelled from the queue fronts, so that
    /// `oldest` and `items` describe live work.
    pub(crate) fn purge_fronts(&mut self) {
        for queue in &mut self.levels {
            while queue.front().is_some_and(|j| !j.ticket.is_queued()) {
                if let Some(job) = queue.pop_front() {
                    self.items -= job.items;
                }
            }
        }
    }

    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.levels.iter().filter_map(|q| q.front().map(|j| j.enqueued)).min()
    }

    fn effective_level(&self, level: usize, enqueued: Instant, now: Instant) -> usize {
        let waited = now.saturating_duration_since(enqueued);
        let steps = (waited.as_nanos() / self.aging.as_nanos().max(1)).min(usize::MAX as u128) as usize;
        level.saturating_sub(steps)
    }

    /// The level whose front request goes next.
    fn next_level(&self, now: Instant) -> Option<usize> {
        self.levels
            .iter()
            .enumerate()
            .filter_map(|(l, q)| q.front().map(|j| ((self.effective_level(l, j.enqueued, now), j.enqueued), l)))
            .min_by_key(|(key, _)| *key)
            .map(|(_, l)| l)
    }

    /// Takes requests in scheduling order while they fit in `limit` items; stops at the
    /// first that does not fit, so order is kept. Requests no longer queued are dropped.
    pub(crate) fn take(&mut self, limit: usize, now: Instant) -> (Vec<Job<E>>, usize) {
        let mut jobs = Vec::new();
        let mut items = 0;
        loop {
            self.purge_fronts();
            let Some(level) = self.next_level(now) else { break };
            let fits = self.levels[level].front().is_some_and(|j| items + j.items <= limit);
            if !fits {
                break;
            }
            if let Some(job) = self.levels[level].pop_front() {
                self.items -= job.items;
                items += job.items;
                jobs.push(job);
            }
        }
        (jobs, items)
    }

    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Job<E>> + '_ {
        self.items = 0;
        self.levels.iter_mut().flat_map(|q| q.drain(..))
    }
}
