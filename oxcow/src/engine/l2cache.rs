//! A bounded cache of decoded L2 tables, keyed by their host offset. Least recently
//! used tables are evicted first; the lock is held only to look up or insert, never
//! across I/O.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// A decoded L2 table: one u64 per entry, or two (entry, bitmap) with extended L2.
pub type L2Table = Arc<[u64]>;

#[derive(Debug)]
pub struct L2Cache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tick: u64,
    tables: HashMap<u64, (L2Table, u64)>,
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least one).
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn get(&self, offset: u64) -> Option<L2Table> {
        let mut g = self.inner.lock();
        g.tick += 1;
        let tick = g.tick;
        let e = g.tables.get_mut(&offset)?;
        e.1 = tick;
        Some(e.0.clone())
    }

    pub fn insert(&self, offset: u64, table: L2Table) {
        let mut g = self.inner.lock();
        g.tick += 1;
        let tick = g.tick;
        if g.tables.len() >= self.capacity && !g.tables.contains_key(&offset) {
            // A linear scan is fine: the cache holds at most a few thousand tables
            // and eviction happens once per table read from disk.
            if let Some(victim) = g.tables.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k) {
                g.tables.remove(&victim);
            }
        }
        g.tables.insert(offset, (table, tick));
    }

    pub fn len(&self) -> usize {
        self.inner.lock().tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let c = L2Cache::new(2);
        c.insert(1, Arc::from(vec![1u64]));
        c.insert(2, Arc::from(vec![2u64]));
        assert!(c.get(1).is_some());
        c.insert(3, Arc::from(vec![3u64]));
        assert!(c.get(2).is_none());
        assert!(c.get(1).is_some());
        assert!(c.get(3).is_some());
        assert_eq!(c.len(), 2);
    }
}
