//! A shard's webhook events on their way to the webhook hub: gathered while the shard works and
//! appended to the hub's queue in one step when its current task yields (one lock per batch of
//! events instead of one per event; the hub takes the queue on its own schedule).

use crate::webhooks::{Event, Webhooks};
use futures_lite::future::poll_fn;
use std::cell::RefCell;
use std::task::{Poll, Waker};

/// The events of one shard not yet handed over, and its pump's waker.
#[derive(Default)]
pub(super) struct Outbox {
    events: RefCell<Vec<(u32, Event)>>,
    pump: RefCell<Option<Waker>>,
}

impl Outbox {
    /// An event of app `app`; the pump is woken by the first of a batch.
    pub(super) fn push(&self, app: u32, event: Event) {
        let mut events = self.events.borrow_mut();
        events.push((app, event));
        if events.len() == 1 {
            if let Some(pump) = self.pump.borrow_mut().take() {
                pump.wake();
            }
        }
    }

    /// Hands what is gathered to the hub now.
    pub(super) fn hand_over(&self, webhooks: &Webhooks) {
        let batch = std::mem::take(&mut *self.events.borrow_mut());
        if !batch.is_empty() {
            webhooks.emit_all(batch);
        }
    }

    /// The pump task: hands each batch to the hub (never waiting for it).
    pub(super) async fn pump(&self, webhooks: &Webhooks) {
        loop {
            poll_fn(|cx| {
                if self.events.borrow().is_empty() {
                    *self.pump.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            self.hand_over(webhooks);
        }
    }
}
