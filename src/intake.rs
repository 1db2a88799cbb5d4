//! Intake (floor 5): what SMTP sessions and HTTP injection hand a finished submission to. It
//! chooses the source-IP pool (before any stage strips control headers), runs the ordered
//! pre-enqueue [`Stage`]s (the sidecar, the unsubscribe stage, then send time), and commits what they produced
//! through [`Enqueue`] as one message under one queue id.
//!
//! Invariants: [`Intake::accept_report`] returns only once everything is durable (the
//! session's `250` waits for it); a stage never fails a message, only the spool can; only
//! trusted submissions ([`Submission::trusted`]) go through the stages.

use std::sync::Arc;

use tern_queue::{MessageId, SpoolError};

use crate::enqueue::{Accepted, Enqueue};
use crate::message::{Prepared, Stage, Submission};

#[derive(Clone)]
pub struct Intake {
    stages: Arc<[Arc<dyn Stage>]>,
    enqueue: Enqueue,
}

impl Intake {
    /// `stages` run in this order on every submission (and on every message an earlier stage
    /// made of it).
    pub fn new(stages: Vec<Arc<dyn Stage>>, enqueue: Enqueue) -> Intake {
        Intake {
            stages: stages.into(),
            enqueue,
        }
    }

    /// `Err(SpoolError::Full)` when a message of `size` bytes would be refused for space now:
    /// a session can say so at MAIL FROM, before the client sends the content.
    pub fn room_for(&self, size: u64) -> Result<(), SpoolError> {
        self.enqueue.room_for(size)
    }

    /// Makes the submission durable and returns the queue id reported to the client.
    pub async fn accept(&self, sub: Submission) -> Result<MessageId, SpoolError> {
        Ok(self.accept_parts(sub).await?[0])
    }

    /// Like [`Intake::accept`], but returns the id of every part (one per destination
    /// domain, in commit order); the first is the queue id.
    pub async fn accept_parts(&self, sub: Submission) -> Result<Vec<MessageId>, SpoolError> {
        Ok(self.accept_report(sub).await?.ids)
    }

    /// Like [`Intake::accept_parts`], with the sidecar's per-recipient report. A message that
    /// asks for the sidecar becomes one submission per recipient, all committed together
    /// under one queue id.
    pub async fn accept_report(&self, mut sub: Submission) -> Result<Accepted, SpoolError> {
        // Another tern node's trace (`tern queue drain`): always taken out, kept only from a
        // trusted client (relay network, AUTH, the API), never from anyone on the internet.
        let trace = crate::message::take_header(&mut sub.content, crate::message::RELAY_HEADER)
            .filter(|_| sub.trusted)
            .and_then(|v| crate::message::RelayTrace::parse(&v));
        // The campaign it was rendered for travels beside the trace and counts only with one
        // (a drain's, from the same trusted peer). Looked for only then: the plain path pays
        // no second header scan, and any other trusted message loses the header with every
        // `X-Tern-*` header in the sidecar stage.
        let relayed_campaign = match trace {
            Some(_) => crate::message::take_header_first_line(
                &mut sub.content,
                crate::message::RELAY_CAMPAIGN_HEADER,
            )
            .and_then(|v| crate::message::parse_relay_campaign(&v)),
            None => None,
        };
        let requested = sub.pool.take();
        let pool = self
            .enqueue
            .choose_pool(requested, &mut sub.content, &sub.sender);
        // Untrusted mail (anyone's, to the bounce domains) skips every stage: no campaign
        // rendering, no send-time planning or engagement records for it.
        let stages: &[Arc<dyn Stage>] = if sub.trusted { &self.stages } else { &[] };
        let mut messages = vec![Prepared::new(sub)];
        for stage in stages {
            let mut next = Vec::with_capacity(messages.len());
            for message in messages {
                next.extend(stage.apply(message).await);
            }
            messages = next;
        }
        // The stages do not render drained mail again (its control headers went at the first
        // node), so its envelopes keep the campaign the first node rendered it for: the
        // delivery log, the events and the campaign's results count it here.
        if let Some(tag) = relayed_campaign {
            for message in messages.iter_mut().filter(|m| m.campaign.is_none()) {
                message.campaign = Some(tag.clone());
            }
        }
        self.enqueue.commit_traced(messages, pool, trace).await
    }
}
