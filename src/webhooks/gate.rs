//! Which events become webhooks, and when (a single node; the events of one channel arrive in
//! order from its home shard):
//! - the 3-second rule (reference §6.4): `channel_vacated` and `member_removed` wait 3 s; a
//!   channel occupied again (a user back) within them sends neither the departure nor the
//!   return;
//! - cache misses: one per channel per `cache_miss_window`.

use super::Event;
use ahash::AHashMap;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a departure waits before its webhook goes.
pub const LEAVE_DELAY: Duration = Duration::from_secs(3);

/// A departure: the channel (vacated) or the channel and user (member removed).
type Departure = (u32, String, Option<String>);

/// Departures waiting out their delay, and recent cache misses.
pub struct Gate {
    miss_window: Duration,
    /// In order of arrival, so of due time: (due, app, event, ticket).
    waiting: VecDeque<(Instant, u32, Event, u64)>,
    /// The ticket of each departure still to be sent; a return removes it.
    departures: AHashMap<Departure, u64>,
    next_ticket: u64,
    /// Departures waiting, per app.
    waiting_per_app: AHashMap<u32, usize>,
    /// When each channel's last `cache_miss` went, and the same in time order (to forget
    /// them once their window is over).
    misses: AHashMap<(u32, String), Instant>,
    misses_in_order: VecDeque<(Instant, (u32, String))>,
}

fn departure(app: u32, event: &Event) -> Option<Departure> {
    match event {
        Event::ChannelVacated { channel } | Event::ChannelOccupied { channel } => {
            Some((app, channel.clone(), None))
        }
        Event::MemberRemoved { channel, user_id } | Event::MemberAdded { channel, user_id } => {
            Some((app, channel.clone(), Some(user_id.clone())))
        }
        _ => None,
    }
}

impl Gate {
    /// A gate with this cache-miss window.
    pub fn new(miss_window: Duration) -> Gate {
        Gate {
            miss_window,
            waiting: VecDeque::new(),
            departures: AHashMap::new(),
            next_ticket: 0,
            waiting_per_app: AHashMap::new(),
            misses: AHashMap::new(),
            misses_in_order: VecDeque::new(),
        }
    }

    /// Departures waiting, of every app.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Departures of `app` waiting.
    pub fn waiting_of(&self, app: u32) -> usize {
        self.waiting_per_app.get(&app).copied().unwrap_or(0)
    }

    /// Whether admitting this event could hold it (a departure): what a bound has to count.
    pub fn is_departure(event: &Event) -> bool {
        matches!(
            event,
            Event::ChannelVacated { .. } | Event::MemberRemoved { .. }
        )
    }

    /// An event as it happens: Some to send it now; None when it waits (a departure) or is
    /// not sent (a return within the delay, a repeated cache miss).
    pub fn admit(&mut self, app: u32, event: Event, now: Instant) -> Option<Event> {
        match event {
            Event::ChannelVacated { .. } | Event::MemberRemoved { .. } => {
                let key = departure(app, &event)?;
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                self.departures.insert(key, ticket);
                self.waiting
                    .push_back((now + LEAVE_DELAY, app, event, ticket));
                *self.waiting_per_app.entry(app).or_insert(0) += 1;
                None
            }
            Event::ChannelOccupied { .. } | Event::MemberAdded { .. } => {
                let key = departure(app, &event)?;
                match self.departures.remove(&key) {
                    Some(_) => None,
                    None => Some(event),
                }
            }
            Event::CacheMiss { ref channel } => {
                self.forget_old_misses(now);
                let key = (app, channel.clone());
                if self.misses.contains_key(&key) {
                    return None;
                }
                self.misses.insert(key.clone(), now);
                self.misses_in_order.push_back((now, key));
                Some(event)
            }
            _ => Some(event),
        }
    }

    /// Forgets the cache misses whose window is over (oldest first: each is looked at once).
    fn forget_old_misses(&mut self, now: Instant) {
        while let Some((at, _)) = self.misses_in_order.front() {
            if now.duration_since(*at) < self.miss_window {
                break;
            }
            if let Some((at, key)) = self.misses_in_order.pop_front() {
                if self.misses.get(&key) == Some(&at) {
                    self.misses.remove(&key);
                }
            }
        }
    }

    /// When the next departure is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.front().map(|(due, ..)| *due)
    }

    /// The departures due by `now` that nothing cancelled (all of them when `all`, at exit).
    pub fn due(&mut self, now: Instant, all: bool) -> Vec<(u32, Event)> {
        let mut out = Vec::new();
        while let Some((due, ..)) = self.waiting.front() {
            if *due > now && !all {
                break;
            }
            let Some((_, app, event, ticket)) = self.waiting.pop_front() else {
                break;
            };
            if let Some(n) = self.waiting_per_app.get_mut(&app) {
                *n = n.saturating_sub(1);
            }
            let Some(key) = departure(app, &event) else {
                continue;
            };
            // Still the latest departure, not cancelled by a return.
            if self.departures.get(&key) == Some(&ticket) {
                self.departures.remove(&key);
                out.push((app, event));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vacated() -> Event {
        Event::ChannelVacated {
            channel: "c".into(),
        }
    }
    fn occupied() -> Event {
        Event::ChannelOccupied {
            channel: "c".into(),
        }
    }

    #[test]
    fn a_quick_return_sends_neither_the_departure_nor_the_return() {
        let mut gate = Gate::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(gate.admit(0, occupied(), t0), Some(occupied()));
        assert_eq!(gate.admit(0, vacated(), t0), None);
        assert_eq!(gate.admit(0, occupied(), t0 + Duration::from_secs(1)), None);
        assert!(gate.due(t0 + Duration::from_secs(4), false).is_empty());
        // The same channel of another app is another channel.
        assert_eq!(gate.admit(1, occupied(), t0), Some(occupied()));
    }

    #[test]
    fn a_departure_that_lasts_is_sent_once_after_the_delay() {
        let mut gate = Gate::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(gate.admit(0, vacated(), t0), None);
        assert!(gate.due(t0 + Duration::from_secs(2), false).is_empty());
        assert_eq!(gate.next_due(), Some(t0 + LEAVE_DELAY));
        assert_eq!(gate.due(t0 + LEAVE_DELAY, false), vec![(0, vacated())]);
        assert_eq!(gate.waiting(), 0);
        // Leave, return, leave again: only the last departure counts, at its own time.
        assert_eq!(gate.admit(0, vacated(), t0), None);
        assert_eq!(gate.admit(0, occupied(), t0), None);
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(gate.admit(0, vacated(), t1), None);
        assert!(gate.due(t0 + LEAVE_DELAY, false).is_empty());
        assert_eq!(gate.due(t1 + LEAVE_DELAY, false), vec![(0, vacated())]);
    }

    #[test]
    fn members_are_matched_by_user() {
        let mut gate = Gate::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let member = |user: &str, added: bool| {
            let (channel, user_id) = ("presence-c".to_string(), user.to_string());
            match added {
                true => Event::MemberAdded { channel, user_id },
                false => Event::MemberRemoved { channel, user_id },
            }
        };
        assert_eq!(gate.admit(0, member("a", false), t0), None);
        assert_eq!(
            gate.admit(0, member("b", true), t0),
            Some(member("b", true))
        );
        assert_eq!(gate.admit(0, member("a", true), t0), None);
        assert!(gate.due(t0 + LEAVE_DELAY, true).is_empty());
    }

    #[test]
    fn cache_misses_once_per_window() {
        let mut gate = Gate::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let miss = || Event::CacheMiss {
            channel: "cache-c".into(),
        };
        assert_eq!(gate.admit(0, miss(), t0), Some(miss()));
        assert_eq!(gate.admit(0, miss(), t0 + Duration::from_secs(4)), None);
        assert_eq!(
            gate.admit(0, miss(), t0 + Duration::from_secs(5)),
            Some(miss())
        );
    }
}
