//! The hot path of a shard: its table of local subscribers, the delivery of one frame to all of
//! a channel's local sockets, and the flusher that writes every socket the delivery touched.

use super::conn::Conn;
use crate::channels::local::LocalChannels;
use crate::channels::ChannelKey;
use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// One shard's subscribers by channel, and the sockets with frames waiting to be written. Owned
/// by the shard; touches only the connections in its table.
#[derive(Default)]
pub struct Fanout {
    subscribers: RefCell<LocalChannels<Conn>>,
    /// Sockets with frames queued by a delivery, for the flusher; and a spare list to swap in.
    dirty: RefCell<Vec<Rc<Conn>>>,
    dirty_spare: RefCell<Vec<Rc<Conn>>>,
    flusher_waker: RefCell<Option<Waker>>,
}

impl Fanout {
    /// Adds a confirmed subscriber: it gets every frame delivered to the channel from now on.
    pub fn add(&self, key: ChannelKey, conn: Rc<Conn>) {
        self.subscribers.borrow_mut().add(key, conn);
    }

    /// Removes a subscriber.
    pub fn remove(&self, key: &ChannelKey, conn: &Conn) {
        self.subscribers.borrow_mut().remove(key, conn);
    }

    /// The channel's subscribers on this shard, copied (for callers that act on each).
    pub fn subscribers(&self, key: &ChannelKey) -> Vec<Rc<Conn>> {
        self.subscribers.borrow().subscribers(key).to_vec()
    }

    /// One frame, many sockets, no copy and no encoding per socket. The frame is queued and the
    /// socket listed as dirty; the flusher writes every dirty socket once the current burst of
    /// messages is handled, so a socket with several pending frames gets them in one `sendmsg`,
    /// and no socket task is woken unless its kernel buffer is full. Returns how many sockets
    /// turned out to be slow consumers (and are being closed).
    pub fn deliver(
        &self,
        key: &ChannelKey,
        frame: Rc<[u8]>,
        except: Option<u64>,
        max_queued: usize,
    ) -> u64 {
        let slow = {
            let local = self.subscribers.borrow();
            let mut dirty = self.dirty.borrow_mut();
            let mut slow = 0u64;
            let mut queued = 0u64;
            for conn in local.subscribers(key) {
                if Some(conn.id) == except || conn.is_closing() {
                    continue;
                }
                if !conn.queue(frame.clone(), max_queued) {
                    slow += 1;
                    continue;
                }
                queued += 1;
                if !conn.dirty.replace(true) {
                    dirty.push(conn.clone());
                }
            }
            crate::metrics::here().frames_delivered.add(queued);
            slow
        };
        if let Some(w) = self.flusher_waker.borrow_mut().take() {
            w.wake();
        }
        slow
    }

    /// The flusher task: writes the sockets deliveries made dirty, one `sendmsg` each for all
    /// its pending frames. A socket whose kernel buffer is full is handed to its own task, which
    /// waits until it can write.
    pub async fn flusher(&self) {
        loop {
            poll_fn(|cx| {
                if self.dirty.borrow().is_empty() {
                    *self.flusher_waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            let mut batch = std::mem::take(&mut *self.dirty_spare.borrow_mut());
            std::mem::swap(&mut batch, &mut *self.dirty.borrow_mut());
            for conn in batch.drain(..) {
                conn.dirty.set(false);
                let fd = conn.fd.get();
                if fd < 0 {
                    continue;
                }
                match conn.flush(fd) {
                    Ok(true) => {}
                    Ok(false) => conn.wake(),
                    Err(_) => conn.abort(),
                }
            }
            *self.dirty_spare.borrow_mut() = batch;
        }
    }
}
