//! A precise timer for open-loop sends. tokio's timer has a 1 ms resolution (and epoll a
//! 1 ms timeout), so a request scheduled with it goes out up to ~2 ms late — and since
//! open-loop latency counts from the scheduled time, that lateness would show up in
//! every percentile. One helper thread sleeps on a condition variable (nanosecond
//! timeouts) and wakes the tasks whose time has come; no core is burnt spinning.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Instant;

#[derive(Debug)]
struct Entry {
    due: Instant,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

#[derive(Debug, Default)]
struct State {
    heap: BinaryHeap<Reverse<Entry>>,
    seq: u64,
    stopped: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// Handle to the timer thread; cloning shares it.
#[derive(Debug, Clone)]
pub(crate) struct Ticker {
    shared: Arc<Shared>,
}

impl Ticker {
    pub(crate) fn start() -> std::io::Result<(Self, JoinHandle<()>)> {
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new().name("kiln-bench-ticker".into()).spawn(move || run(&thread_shared))?;
        Ok((Self { shared }, handle))
    }

    /// Completes at (or a few tens of microseconds after) `due`.
    pub(crate) fn sleep_until(&self, due: Instant) -> Sleep {
        Sleep { ticker: self.clone(), due }
    }

    pub(crate) fn stop(&self) {
        self.lock().stopped = true;
        self.shared.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn run(shared: &Shared) {
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if state.stopped {
            return;
        }
        let now = Instant::now();
        let mut ready = Vec::new();
        while state.heap.peek().is_some_and(|e| e.0.due <= now) {
            if let Some(Reverse(e)) = state.heap.pop() {
                ready.push(e.waker);
            }
        }
        if !ready.is_empty() {
            // Wake outside the lock: a woken task may register its next sleep at once.
            drop(state);
            ready.into_iter().for_each(Waker::wake);
            state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        state = match state.heap.peek().map(|e| e.0.due) {
            None => shared.changed.wait(state).unwrap_or_else(|e| e.into_inner()),
            Some(due) => shared.changed.wait_timeout(state, due - now).unwrap_or_else(|e| e.into_inner()).0,
        };
    }
}

/// Future returned by [`Ticker::sleep_until`].
#[derive(Debug)]
pub(crate) struct Sleep {
    ticker: Ticker,
    due: Instant,
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.due {
            return Poll::Ready(());
        }
        let mut state = self.ticker.lock();
        if state.stopped {
            return Poll::Ready(());
        }
        // A spurious poll registers again; the extra wake-up is harmless.
        let earliest = state.heap.peek().is_none_or(|e| self.due < e.0.due);
        state.seq += 1;
        let seq = state.seq;
        state.heap.push(Reverse(Entry { due: self.due, seq, waker: cx.waker().clone() }));
        drop(state);
        if earliest {
            self.ticker.shared.changed.notify_one();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sleeps_end_in_order_and_close_to_their_time() -> std::io::Result<()> {
        let (ticker, handle) = Ticker::start()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let start = Instant::now();
        let lateness = rt.block_on(async {
            let tasks: Vec<_> = [30u64, 10, 20]
                .into_iter()
                .map(|ms| {
                    let t = ticker.clone();
                    let due = start + Duration::from_millis(ms);
                    tokio::spawn(async move {
                        t.sleep_until(due).await;
                        Instant::now() - due
                    })
                })
                .collect();
            let mut late = Vec::new();
            for task in tasks {
                late.push(task.await.unwrap_or(Duration::MAX));
            }
            late
        });
        ticker.stop();
        let _ = handle.join();
        // Never early; on an idle machine a few tens of µs late. The bound is loose for busy CI.
        assert!(lateness.iter().all(|l| *l < Duration::from_millis(200)), "{lateness:?}");
        Ok(())
    }
}
