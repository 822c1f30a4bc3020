//! Queue depths on the fake: the same counts, from its rows.

use std::collections::BTreeMap;

use async_trait::async_trait;
use postbox_core::{Depth, QueueDepth, Result, validate_queue};

use crate::broker::FakeBroker;

#[async_trait]
impl Depth for FakeBroker {
    async fn queue_depths(&self, queue: Option<&str>) -> Result<Vec<QueueDepth>> {
        if let Some(queue) = queue {
            validate_queue(queue)?;
        }
        let now = self.now();
        let state = self.shared.state.lock();
        let wanted = |q: &str| queue.is_none_or(|w| w == q);
        let mut depths: BTreeMap<String, QueueDepth> = BTreeMap::new();
        fn entry<'a>(depths: &'a mut BTreeMap<String, QueueDepth>, q: &str) -> &'a mut QueueDepth {
            depths
                .entry(q.to_owned())
                .or_insert_with(|| QueueDepth::new(q.to_owned()))
        }
        for row in state.rows.values().filter(|r| wanted(&r.queue)) {
            let depth = entry(&mut depths, &row.queue);
            if row.lease.is_some() {
                depth.leased += 1;
            } else if row.next_attempt_at > now {
                depth.scheduled += 1;
            } else {
                depth.ready += 1;
                let waited = (now - row.next_attempt_at).to_std().unwrap_or_default();
                depth.oldest_ready = Some(depth.oldest_ready.map_or(waited, |w| w.max(waited)));
            }
        }
        for dead in state.dead.values().filter(|d| wanted(&d.letter.queue)) {
            entry(&mut depths, &dead.letter.queue).dead += 1;
        }
        Ok(depths.into_values().collect())
    }
}
