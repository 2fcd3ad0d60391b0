//! The live table of apps. Every connection, channel and counter names its app by a slot number
//! that never changes for the life of the process, so that a reload (SIGHUP) can add, change,
//! disable or remove apps while their connections and in-flight messages keep valid numbers:
//! - a changed app keeps its slot, and readers see the new settings from their next look;
//! - a removed app's slot keeps a disabled copy (its connections are closed with 4003, and it is
//!   no longer found by key or id); the same id added back gets the same slot;
//! - a new app takes a slot never used before. The table has room for `capacity()` apps, fixed at
//!   start, because per-app counters are sized by it.
//!
//! Reads are lock-free (`arc_swap`): a shard looks an app up on every client event.

use crate::config::AppConfig;
use ahash::AHashMap;
use arc_swap::{ArcSwap, Guard};
use std::sync::{Arc, Mutex};

/// Slots for apps beyond those configured at start, so that reloads can add apps.
pub const SPARE_SLOTS: usize = 256;

/// An app's settings as of the moment it was looked up.
pub type AppRef = Guard<Arc<AppConfig>>;

/// Which slot each live app's key and id name.
#[derive(Default)]
struct Index {
    by_key: AHashMap<String, u32>,
    by_id: AHashMap<String, u32>,
}

/// What a reload changed, by app id (never a secret).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Apps that were not served before.
    pub added: Vec<String>,
    /// Apps no longer served (their connections are closed with 4003).
    pub removed: Vec<String>,
    /// Apps whose settings changed (including `enabled`).
    pub changed: Vec<String>,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The apps, by slot.
pub struct AppTable {
    slots: Box<[ArcSwap<AppConfig>]>,
    /// What a slot out of range reads as.
    nothing: Arc<AppConfig>,
    /// Slots ever given to an app (the rest are free).
    used: Mutex<Vec<bool>>,
    index: ArcSwap<Index>,
}

impl AppTable {
    /// The apps configured at start, in slots 0.., with `SPARE_SLOTS` free slots after them.
    pub fn new(apps: &[AppConfig]) -> AppTable {
        let capacity = apps.len() + SPARE_SLOTS;
        let unused = Arc::new(disabled_copy(&AppConfig::default()));
        let slots = (0..capacity)
            .map(|i| match apps.get(i) {
                Some(app) => ArcSwap::from_pointee(app.clone()),
                None => ArcSwap::new(unused.clone()),
            })
            .collect();
        let mut index = Index::default();
        for (i, app) in apps.iter().enumerate() {
            index.by_key.insert(app.key.clone(), i as u32);
            index.by_id.insert(app.id.clone(), i as u32);
        }
        let used = (0..capacity).map(|i| i < apps.len()).collect();
        AppTable {
            slots,
            nothing: unused,
            used: Mutex::new(used),
            index: ArcSwap::from_pointee(index),
        }
    }

    /// Slots in the table: apps served now or since the start, and free ones.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The app in `slot` (a number `by_key`/`by_id` gave out). A slot out of range, or never
    /// used, reads as a disabled app.
    pub fn get(&self, slot: u32) -> AppRef {
        match self.slots.get(slot as usize) {
            Some(app) => app.load(),
            None => Guard::from_inner(self.nothing.clone()),
        }
    }

    /// `get`, as an `Arc` to keep (across awaits; `get` is for short looks).
    pub fn get_full(&self, slot: u32) -> Arc<AppConfig> {
        Guard::into_inner(self.get(slot))
    }

    /// The slot of the live app whose key clients connect with.
    pub fn by_key(&self, key: &str) -> Option<u32> {
        self.index.load().by_key.get(key).copied()
    }

    /// The slot of the live app whose id the HTTP API names.
    pub fn by_id(&self, id: &str) -> Option<u32> {
        self.index.load().by_id.get(id).copied()
    }

    /// Every live app with its slot, in slot order.
    pub fn live(&self) -> Vec<(u32, Arc<AppConfig>)> {
        let index = self.index.load();
        let mut slots: Vec<u32> = index.by_id.values().copied().collect();
        slots.sort_unstable();
        slots
            .into_iter()
            .map(|slot| (slot, self.slots[slot as usize].load_full()))
            .collect()
    }

    /// Serves `apps` from now on (already validated as a whole). `check` may refuse the change of
    /// one app (`old` None: a new app) with a reason; then nothing changes.
    pub fn replace(
        &self,
        apps: &[AppConfig],
        check: impl Fn(Option<&AppConfig>, &AppConfig) -> Result<(), String>,
    ) -> Result<Changes, String> {
        let mut used = self.used.lock().map_err(|_| "the app table is poisoned")?;
        let old_index = self.index.load_full();
        // Slots first, checked, before anything is stored.
        let mut placed = Vec::with_capacity(apps.len());
        let mut free = (0..self.capacity()).filter(|&i| !used[i]);
        for app in apps {
            let slot = match old_index.by_id.get(&app.id) {
                Some(&slot) => slot as usize,
                None => match self.slot_of_removed(&used, &app.id) {
                    Some(slot) => slot,
                    None => free.next().ok_or_else(|| {
                        format!(
                            "apps: no room for app {}: a reload can add {SPARE_SLOTS} apps to \
                             those served at start; restart to add more",
                            app.id
                        )
                    })?,
                },
            };
            let old = old_index
                .by_id
                .contains_key(&app.id)
                .then(|| self.slots[slot].load_full());
            check(old.as_deref(), app).map_err(|e| format!("app {}: {e}", app.id))?;
            placed.push((slot, app));
        }
        let mut changes = Changes::default();
        let mut index = Index::default();
        for (slot, app) in &placed {
            let old = self.slots[*slot].load();
            match old_index.by_id.contains_key(&app.id) {
                false => changes.added.push(app.id.clone()),
                true if **old != **app => changes.changed.push(app.id.clone()),
                true => {}
            }
            if **old != **app {
                self.slots[*slot].store(Arc::new((*app).clone()));
            }
            used[*slot] = true;
            index.by_key.insert(app.key.clone(), *slot as u32);
            index.by_id.insert(app.id.clone(), *slot as u32);
        }
        for (id, &slot) in &old_index.by_id {
            if !index.by_id.contains_key(id) {
                let old = self.slots[slot as usize].load_full();
                self.slots[slot as usize].store(Arc::new(disabled_copy(&old)));
                changes.removed.push(id.clone());
            }
        }
        changes.removed.sort();
        self.index.store(Arc::new(index));
        Ok(changes)
    }

    /// The slot an app with this id had before it was removed.
    fn slot_of_removed(&self, used: &[bool], id: &str) -> Option<usize> {
        (0..self.capacity()).find(|&i| used[i] && self.slots[i].load().id == id)
    }
}

/// A removed app as its slot keeps it: disabled, with its id (for logs) and no credentials.
fn disabled_copy(app: &AppConfig) -> AppConfig {
    AppConfig {
        id: app.id.clone(),
        enabled: false,
        ..AppConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(id: &str, key: &str) -> AppConfig {
        AppConfig {
            id: id.into(),
            key: key.into(),
            secret: format!("{id}-secret"),
            ..AppConfig::default()
        }
    }

    fn allow(_: Option<&AppConfig>, _: &AppConfig) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn reloads_keep_slots_and_reuse_a_removed_apps_slot_for_its_id_only() {
        let table = AppTable::new(&[app("a", "ka"), app("b", "kb")]);
        assert_eq!((table.by_key("kb"), table.by_id("a")), (Some(1), Some(0)));

        let mut b = app("b", "kb2");
        b.max_connections = 5;
        let changes = table.replace(&[b, app("c", "kc")], allow).unwrap();
        assert_eq!(changes.added, ["c"]);
        assert_eq!(changes.removed, ["a"]);
        assert_eq!(changes.changed, ["b"]);
        assert_eq!(table.by_key("kb"), None);
        assert_eq!(table.by_key("kb2"), Some(1));
        assert_eq!(table.get(1).max_connections, 5);
        assert_eq!(table.by_id("a"), None);
        assert!(
            !table.get(0).enabled,
            "a removed app's slot reads as disabled"
        );
        assert_eq!(table.get(0).secret, "", "and keeps no secret");
        let c = table.by_id("c").unwrap();
        assert!(c >= 2, "a new app takes a slot never used");

        // `a` comes back: its old slot.
        let changes = table
            .replace(&[app("a", "ka"), app("b", "kb2"), app("c", "kc")], allow)
            .unwrap();
        assert_eq!(changes.added, ["a"]);
        assert_eq!(table.by_id("a"), Some(0));
        assert!(table.get(0).enabled);
        let live: Vec<String> = table.live().iter().map(|(_, a)| a.id.clone()).collect();
        assert_eq!(live, ["a", "b", "c"]);
        assert!(table.replace(&[], allow).unwrap().removed.len() == 3);
    }

    #[test]
    fn a_refused_app_or_a_full_table_changes_nothing() {
        let table = AppTable::new(&[app("a", "ka")]);
        let refuse = |old: Option<&AppConfig>, _: &AppConfig| match old {
            None => Err("new apps refused".to_string()),
            Some(_) => Ok(()),
        };
        let mut changed = app("a", "ka");
        changed.max_connections = 9;
        let err = table
            .replace(&[changed, app("z", "kz")], refuse)
            .unwrap_err();
        assert_eq!(err, "app z: new apps refused");
        assert_eq!(table.get(0).max_connections, 0);
        assert_eq!(table.by_id("z"), None);

        let many: Vec<AppConfig> = (0..=SPARE_SLOTS + 1)
            .map(|i| app(&format!("n{i}"), &format!("k{i}")))
            .collect();
        let err = table.replace(&many, allow).unwrap_err();
        assert!(err.contains("no room"), "{err}");
        assert_eq!(table.by_id("a"), Some(0));
        assert_eq!(table.by_id("n0"), None);
    }

    #[test]
    fn out_of_range_slots_read_as_disabled() {
        let table = AppTable::new(&[app("a", "ka")]);
        assert!(!table.get(u32::MAX).enabled);
        assert!(!table.get(5).enabled);
    }
}
