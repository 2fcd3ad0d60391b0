//! The shard's side of the mesh between shards: one outgoing queue per shard (this one
//! included), drained in order by a pump task each, and the questions this shard is waiting on.
//!
//! Messages to this shard itself take the same road (its own queue, drained by its own pump), so
//! a handler never runs inside another one: nothing that holds a `RefCell` borrow can be
//! re-entered by a message it sends.

use super::messages::{Answer, ChannelInfo, ChannelStats, Question, ShardMsg};
use ahash::AHashMap;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Messages waiting for one peer beyond which producers are slowed (see `Shard::backpressure`).
/// Receivers never block on a send (that could deadlock two shards), so sends go through here.
const OUTBOX_SOFT_LIMIT: usize = 64 * 1024;

/// Outgoing queues and pending questions of one shard.
pub(super) struct Mesh {
    outbox: RefCell<Vec<VecDeque<ShardMsg>>>,
    pump_wakers: RefCell<Vec<Option<Waker>>>,
    next_question: Cell<u64>,
    awaiting: Awaiting,
}

/// Questions sent and not answered yet, one table per kind of answer, so that each asker gets
/// its own type back.
#[derive(Default)]
struct Awaiting {
    channel: Pending<ChannelInfo>,
    presence_users: Pending<Vec<String>>,
    occupied: Pending<Vec<(String, ChannelStats)>>,
    barrier: Pending<()>,
}

/// Asked questions whose answers are a `T`, by question id.
struct Pending<T> {
    slots: RefCell<AHashMap<u64, Rc<Slot<T>>>>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            slots: RefCell::new(AHashMap::new()),
        }
    }
}

/// Where an answer lands, and the asker to wake.
struct Slot<T> {
    value: RefCell<Option<T>>,
    waker: RefCell<Option<Waker>>,
}

impl<T> Pending<T> {
    fn open(&self, id: u64) -> Rc<Slot<T>> {
        let slot = Rc::new(Slot {
            value: RefCell::new(None),
            waker: RefCell::new(None),
        });
        self.slots.borrow_mut().insert(id, slot.clone());
        slot
    }

    fn fill(&self, id: u64, value: T) {
        let Some(slot) = self.slots.borrow_mut().remove(&id) else {
            return;
        };
        *slot.value.borrow_mut() = Some(value);
        let waker = slot.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Slot<T> {
    async fn wait(&self) -> T {
        poll_fn(|cx| match self.value.borrow_mut().take() {
            Some(value) => Poll::Ready(value),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl Mesh {
    pub(super) fn new(shards: usize) -> Mesh {
        Mesh {
            outbox: RefCell::new((0..shards).map(|_| VecDeque::new()).collect()),
            pump_wakers: RefCell::new((0..shards).map(|_| None).collect()),
            next_question: Cell::new(0),
            awaiting: Awaiting::default(),
        }
    }

    /// Queues `msg` for `shard` (this one included); its pump sends it in order.
    pub(super) fn send(&self, shard: usize, msg: ShardMsg) {
        self.outbox.borrow_mut()[shard].push_back(msg);
        crate::metrics::here().mesh_queue_depth.add(1);
        if let Some(w) = self.pump_wakers.borrow_mut()[shard].take() {
            w.wake();
        }
    }

    /// The next message queued for `shard`, if any.
    pub(super) fn pop(&self, shard: usize) -> Option<ShardMsg> {
        let msg = self.outbox.borrow_mut()[shard].pop_front();
        if msg.is_some() {
            crate::metrics::here().mesh_queue_depth.add(-1);
        }
        msg
    }

    /// Resolves once a message is queued for `shard`.
    pub(super) async fn queued(&self, shard: usize) {
        poll_fn(|cx| {
            if self.outbox.borrow()[shard].is_empty() {
                self.pump_wakers.borrow_mut()[shard] = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    /// Some queue is far behind: producers should wait.
    pub(super) fn backlogged(&self) -> bool {
        self.outbox
            .borrow()
            .iter()
            .any(|q| q.len() > OUTBOX_SOFT_LIMIT)
    }

    fn question_id(&self) -> u64 {
        let id = self.next_question.get() + 1;
        self.next_question.set(id);
        id
    }

    /// Sends `question` to `shard` and returns its id; the answer lands in `pending`.
    fn ask<T>(
        &self,
        me: usize,
        shard: usize,
        pending: &Pending<T>,
        question: Question,
    ) -> Rc<Slot<T>> {
        let id = self.question_id();
        let slot = pending.open(id);
        let msg = ShardMsg::Ask {
            origin: me,
            id,
            question,
        };
        self.send(shard, msg);
        slot
    }

    /// Asks `shard` for a channel's counts (and cached event).
    pub(super) async fn ask_channel(
        &self,
        me: usize,
        shard: usize,
        key: crate::channels::ChannelKey,
        with_cache: bool,
    ) -> ChannelInfo {
        let question = Question::Channel { key, with_cache };
        let slot = self.ask(me, shard, &self.awaiting.channel, question);
        slot.wait().await
    }

    /// Asks `shard` for a presence channel's user ids.
    pub(super) async fn ask_presence_users(
        &self,
        me: usize,
        shard: usize,
        key: crate::channels::ChannelKey,
    ) -> Vec<String> {
        let question = Question::PresenceUsers(key);
        let slot = self.ask(me, shard, &self.awaiting.presence_users, question);
        slot.wait().await
    }

    /// Asks `shard` for the occupied channels of `app` homed there.
    pub(super) async fn ask_occupied(
        &self,
        me: usize,
        shard: usize,
        app: u32,
        prefix: String,
    ) -> Vec<(String, ChannelStats)> {
        let question = Question::Occupied { app, prefix };
        let slot = self.ask(me, shard, &self.awaiting.occupied, question);
        slot.wait().await
    }

    /// Resolves once `shard` has handled everything this shard sent it before.
    pub(super) async fn barrier(&self, me: usize, shard: usize) {
        let slot = self.ask(me, shard, &self.awaiting.barrier, Question::Barrier);
        slot.wait().await
    }

    /// An answer arrived: hand it to the asker waiting for that kind of answer.
    pub(super) fn answered(&self, id: u64, answer: Answer) {
        let awaiting = &self.awaiting;
        match answer {
            Answer::Channel(info) => awaiting.channel.fill(id, info),
            Answer::PresenceUsers(ids) => awaiting.presence_users.fill(id, ids),
            Answer::Occupied(list) => awaiting.occupied.fill(id, list),
            Answer::Barrier => awaiting.barrier.fill(id, ()),
        }
    }
}
