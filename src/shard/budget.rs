//! The process-wide budget for bytes held in incomplete WebSocket messages
//! (`max_partial_message_bytes`). Each shard keeps its own total in its `Node` slot; the slots
//! are summed only when a shard is over its fair share, so the common case costs no sharing.

use super::conn::Conn;
use super::Shard;
use crate::protocol::codes;
use std::rc::Rc;

impl Shard {
    /// Records what `conn`'s frame reader now holds for incomplete messages. When the process
    /// is over `max_partial_message_bytes`, shards over their fair share close connections,
    /// longest holders first.
    pub fn account_partial(&self, conn: &Conn, held: usize, mid_message: bool) {
        let held = u32::try_from(held).unwrap_or(u32::MAX);
        let old = conn.partial_bytes.replace(held);
        if !mid_message {
            conn.partial_since.set(None);
        } else if conn.partial_since.get().is_none() {
            conn.partial_since.set(Some(self.now_secs()));
        }
        if old == held {
            return;
        }
        let total = self
            .node
            .partial_bytes_of(self.id)
            .saturating_sub(old as usize)
            + held as usize;
        self.node.set_partial_bytes_of(self.id, total);
        let budget = self.node.config.max_partial_message_bytes;
        if total > budget / self.node.shards && self.node.partial_bytes_total() > budget {
            self.shed_partial_messages(budget / 10 * 9);
        }
    }

    /// Closes (1008) this shard's connections that have held an incomplete message longest,
    /// until the process is under `target`: slow or hostile half-messages go before fresh ones.
    fn shed_partial_messages(&self, target: usize) {
        let mut holders: Vec<Rc<Conn>> = self
            .conns
            .borrow()
            .values()
            .filter(|c| c.partial_bytes.get() > 0 && !c.discard_input.get())
            .cloned()
            .collect();
        holders.sort_by_key(|c| (c.partial_since.get().unwrap_or(u32::MAX), c.id));
        let now = self.now_secs();
        for conn in holders {
            if self.node.partial_bytes_total() <= target {
                break;
            }
            let freed = conn.partial_bytes.replace(0) as usize;
            let own = self.node.partial_bytes_of(self.id);
            self.node
                .set_partial_bytes_of(self.id, own.saturating_sub(freed));
            conn.discard_input.set(true);
            conn.close_without_error(
                Some(codes::POLICY_VIOLATION),
                "Server memory for incomplete messages is exhausted",
                now,
            );
        }
    }
}
