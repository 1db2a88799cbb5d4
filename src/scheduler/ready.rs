//! [`ReadyQueue`]: the in-memory FIFO of messages ready for one destination, with the count
//! of workers serving it and when it last made progress (for the watchdog).
//!
//! Invariants: messages leave in the order they came; each leaves with the destination's
//! most recent route plan; the watchdog's clock restarts when mail reaches an idle queue (no
//! mail, no worker), not on every push; the worker and shaping-wait counts never go below
//! zero.

use crate::routing::route::RoutePlan;
use crate::shaping::Lane;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_queue::MessageId;

pub struct ReadyQueue {
    key: String,
    /// The most recent route plan for this destination; all its messages share the host set,
    /// and a fresh plan carries a fresh order of equal-preference hosts.
    plan: Option<RoutePlan>,
    messages: VecDeque<MessageId>,
    workers: usize,
    last_progress: Instant,
    /// The shaping lane (pool, bucket) of this queue's mail.
    pub lane: Option<Arc<Lane>>,
    /// Workers now waiting for shaping (rate, suspension, connection slot): a queue slow only
    /// because of them is not stuck.
    shaping_waits: usize,
}

impl ReadyQueue {
    pub fn new(key: String) -> ReadyQueue {
        ReadyQueue {
            key,
            plan: None,
            messages: VecDeque::new(),
            workers: 0,
            last_progress: Instant::now(),
            lane: None,
            shaping_waits: 0,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn push(&mut self, id: MessageId, plan: RoutePlan) {
        if self.messages.is_empty() && self.workers == 0 {
            // The watchdog measures from when there was work to do.
            self.last_progress = Instant::now();
        }
        self.plan = Some(plan);
        self.messages.push_back(id);
    }

    /// Takes `id` out of the queue (a live drain claims it); whether it was waiting here.
    pub fn take(&mut self, id: MessageId) -> bool {
        let before = self.messages.len();
        self.messages.retain(|m| *m != id);
        self.messages.len() != before
    }

    pub fn pop(&mut self) -> Option<(MessageId, RoutePlan)> {
        let id = self.messages.pop_front()?;
        let plan = self.plan.clone()?;
        Some((id, plan))
    }

    /// How many more workers to start: one per waiting message, up to `max` in all. Workers
    /// are added as a backlog builds, so a trickle of mail keeps one connection.
    pub fn workers_wanted(&self, max: usize) -> usize {
        self.messages.len().min(max).saturating_sub(self.workers)
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn worker_started(&mut self) {
        self.workers += 1;
    }

    pub fn worker_stopped(&mut self) {
        self.workers = self.workers.saturating_sub(1);
    }

    pub fn shaping_wait(&mut self, waiting: bool) {
        if waiting {
            self.shaping_waits += 1;
        } else {
            self.shaping_waits = self.shaping_waits.saturating_sub(1);
            self.last_progress = Instant::now();
        }
    }

    pub fn progressed(&mut self) {
        self.last_progress = Instant::now();
    }

    /// No mail and no workers: the queue can be dropped.
    pub fn is_idle(&self) -> bool {
        self.messages.is_empty() && self.workers == 0
    }

    /// Mail is waiting and either nobody serves it or nothing finished for `period` while
    /// some worker was not waiting for shaping.
    pub fn is_stuck(&self, now: Instant, period: Duration) -> bool {
        !self.messages.is_empty()
            && (self.workers == 0
                || (now.duration_since(self.last_progress) >= period
                    && self.shaping_waits < self.workers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsPolicy;
    use tern_queue::IdGenerator;

    fn plan() -> RoutePlan {
        RoutePlan {
            key: "route:sink.test".into(),
            hops: Vec::new(),
            tls: TlsPolicy::Opportunistic,
            tls_label: "opportunistic",
            dane: None,
            auth: None,
        }
    }

    #[test]
    fn workers_grow_with_the_backlog_up_to_the_limit() {
        let ids = IdGenerator::new(None);
        let mut q = ReadyQueue::new("k".into());
        assert_eq!(q.workers_wanted(4), 0);
        q.push(ids.next(), plan());
        assert_eq!(q.workers_wanted(4), 1);
        q.worker_started();
        assert_eq!(q.workers_wanted(4), 0, "one message, one worker");
        for _ in 0..10 {
            q.push(ids.next(), plan());
        }
        assert_eq!(q.workers_wanted(4), 3, "capped at the limit");
        let first = q.pop().unwrap().0;
        assert!(q.pop().unwrap().0 > first, "FIFO");
    }

    #[test]
    fn stuck_means_waiting_mail_and_no_worker_or_no_progress() {
        let ids = IdGenerator::new(None);
        let mut q = ReadyQueue::new("k".into());
        let now = Instant::now();
        let period = Duration::from_secs(60);
        assert!(!q.is_stuck(now, period), "empty is never stuck");
        q.push(ids.next(), plan());
        assert!(q.is_stuck(now, period), "mail and no worker");
        q.worker_started();
        assert!(!q.is_stuck(now, period));
        assert!(
            q.is_stuck(Instant::now() + period, period),
            "no progress for a period"
        );
        q.progressed();
        assert!(!q.is_stuck(Instant::now(), period));
        q.pop();
        q.worker_stopped();
        assert!(q.is_idle());
    }

    fn plan_for(key: &str) -> RoutePlan {
        RoutePlan {
            key: key.into(),
            ..plan()
        }
    }

    #[test]
    fn pop_is_fifo_and_every_message_gets_the_latest_plan() {
        let ids = IdGenerator::new(None);
        let mut q = ReadyQueue::new("mx:sink.test".into());
        assert_eq!(q.key(), "mx:sink.test");
        assert!(q.is_empty() && q.pop().is_none());
        let pushed: Vec<MessageId> = (0..5).map(|_| ids.next()).collect();
        for (i, &id) in pushed.iter().enumerate() {
            q.push(id, plan_for(&format!("plan-{i}")));
        }
        assert_eq!(q.len(), 5);
        let mut popped = Vec::new();
        while let Some((id, plan)) = q.pop() {
            assert_eq!(plan.key, "plan-4", "a fresh plan replaces the older ones");
            popped.push(id);
        }
        assert_eq!(popped, pushed, "first in, first out");
        assert!(q.is_empty());
    }

    #[test]
    fn watchdog_clock_starts_when_mail_arrives_at_an_idle_queue() {
        let ids = IdGenerator::new(None);
        let period = Duration::from_secs(60);

        let mut idle = ReadyQueue::new("k".into());
        let before = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        idle.push(ids.next(), plan());
        idle.worker_started();
        assert!(
            !idle.is_stuck(before + period, period),
            "measured from the push, not from the queue's creation"
        );

        // A push to a queue that has a worker is no progress.
        let mut busy = ReadyQueue::new("k".into());
        busy.worker_started();
        let before = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        busy.push(ids.next(), plan());
        assert!(busy.is_stuck(before + period, period));
    }

    #[test]
    fn workers_waiting_for_shaping_are_not_stuck() {
        let ids = IdGenerator::new(None);
        let period = Duration::from_secs(60);
        let mut q = ReadyQueue::new("k".into());
        q.push(ids.next(), plan());
        q.worker_started();
        q.worker_started();
        q.shaping_wait(true);
        assert!(
            q.is_stuck(Instant::now() + period, period),
            "one of two workers is free"
        );
        q.shaping_wait(true);
        assert!(
            !q.is_stuck(Instant::now() + period, period),
            "every worker waits for shaping"
        );
        let waited = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        q.shaping_wait(false);
        assert!(
            !q.is_stuck(waited + period, period),
            "the end of a wait is progress"
        );
    }

    #[test]
    fn counters_never_go_below_zero() {
        let ids = IdGenerator::new(None);
        let period = Duration::from_secs(60);
        let mut q = ReadyQueue::new("k".into());
        q.worker_stopped();
        q.shaping_wait(false);
        assert_eq!(q.workers(), 0);
        assert_eq!(q.workers_wanted(4), 0, "no mail, no new worker");
        q.push(ids.next(), plan());
        q.worker_started();
        assert_eq!(q.workers(), 1, "no debt left from the extra stop");
        q.shaping_wait(true);
        assert!(
            !q.is_stuck(Instant::now() + period, period),
            "the one worker waits for shaping: no debt left from the extra end of a wait"
        );
        q.pop();
        q.worker_stopped();
        assert!(q.is_idle());
    }
}
