//! A bounded cache of decoded L2 tables, keyed by their host offset. Least recently
//! used clean tables are evicted first; a dirty table (changed in memory, not yet
//! written) is never dropped, so nobody reads its stale copy from disk. The lock is
//! held only to look up, insert or change a table, never across I/O.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// A decoded L2 table: one u64 per entry, or two (entry, bitmap) with extended L2.
pub type L2Table = Arc<Vec<u64>>;

#[derive(Debug)]
pub struct L2Cache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Entry {
    table: L2Table,
    tick: u64,
    dirty: bool,
}

#[derive(Debug, Default)]
struct Inner {
    tick: u64,
    tables: HashMap<u64, Entry>,
}

impl Inner {
    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Drops least recently used clean tables until there is room for one more.
    fn make_room(&mut self, capacity: usize) {
        while self.tables.len() >= capacity {
            // A linear scan is fine: the cache holds at most a few thousand tables
            // and eviction happens once per table read from disk.
            let victim = self
                .tables
                .iter()
                .filter(|(_, e)| !e.dirty)
                .min_by_key(|(_, e)| e.tick)
                .map(|(k, _)| *k);
            match victim {
                Some(v) => {
                    self.tables.remove(&v);
                }
                None => break,
            }
        }
    }
}

impl L2Cache {
    /// A cache holding at most `capacity` clean tables (at least one).
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
        let tick = g.touch();
        let e = g.tables.get_mut(&offset)?;
        e.tick = tick;
        Some(e.table.clone())
    }

    /// Caches a table just read from disk, unless the cache already holds one for
    /// that offset (possibly newer); returns the cached table.
    pub fn insert_clean(&self, offset: u64, table: L2Table) -> L2Table {
        let mut g = self.inner.lock();
        let tick = g.touch();
        if let Some(e) = g.tables.get_mut(&offset) {
            e.tick = tick;
            return e.table.clone();
        }
        g.make_room(self.capacity);
        g.tables.insert(
            offset,
            Entry {
                table: table.clone(),
                tick,
                dirty: false,
            },
        );
        table
    }

    /// Caches a table that differs from disk (a new one, or a changed one).
    pub fn insert_dirty(&self, offset: u64, table: Vec<u64>) {
        let mut g = self.inner.lock();
        let tick = g.touch();
        if !g.tables.contains_key(&offset) {
            g.make_room(self.capacity);
        }
        g.tables.insert(
            offset,
            Entry {
                table: Arc::new(table),
                tick,
                dirty: true,
            },
        );
    }

    /// Changes the cached table at `offset` in place (copying it only if readers hold
    /// it) and marks it dirty. Returns false when the table is not cached.
    pub fn modify(&self, offset: u64, f: impl FnOnce(&mut Vec<u64>)) -> bool {
        let mut g = self.inner.lock();
        let tick = g.touch();
        let Some(e) = g.tables.get_mut(&offset) else {
            return false;
        };
        f(Arc::make_mut(&mut e.table));
        e.tick = tick;
        e.dirty = true;
        true
    }

    /// The dirty tables, by offset.
    pub fn dirty(&self) -> Vec<(u64, L2Table)> {
        let g = self.inner.lock();
        let mut v: Vec<_> = g
            .tables
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(k, e)| (*k, e.table.clone()))
            .collect();
        v.sort_unstable_by_key(|(k, _)| *k);
        v
    }

    /// Marks a table clean after it was written, if it has not changed since.
    pub fn mark_clean(&self, offset: u64, written: &L2Table) {
        let mut g = self.inner.lock();
        if let Some(e) = g.tables.get_mut(&offset) {
            if Arc::ptr_eq(&e.table, written) {
                e.dirty = false;
            }
        }
    }

    /// Forgets every table (the image was emptied).
    pub fn clear(&self) {
        self.inner.lock().tables.clear();
    }

    /// Forgets a table (its cluster was freed).
    pub fn remove(&self, offset: u64) {
        self.inner.lock().tables.remove(&offset);
    }

    /// More tables than the capacity: some dirty ones should be written out.
    pub fn over_capacity(&self) -> bool {
        self.inner.lock().tables.len() > self.capacity
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
    fn evicts_least_recently_used_clean_tables() {
        let c = L2Cache::new(2);
        c.insert_clean(1, Arc::new(vec![1u64]));
        c.insert_clean(2, Arc::new(vec![2u64]));
        assert!(c.get(1).is_some());
        c.insert_clean(3, Arc::new(vec![3u64]));
        assert!(c.get(2).is_none());
        assert!(c.get(1).is_some());
        assert!(c.get(3).is_some());
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn dirty_tables_stay_and_are_not_overwritten_by_stale_reads() {
        let c = L2Cache::new(1);
        c.insert_dirty(1, vec![7]);
        c.insert_clean(2, Arc::new(vec![2]));
        assert_eq!(*c.get(1).unwrap(), vec![7]);
        assert_eq!(*c.insert_clean(1, Arc::new(vec![0])), vec![7]);
        assert!(c.modify(1, |t| t[0] = 8));
        let d = c.dirty();
        assert_eq!(d.len(), 1);
        c.mark_clean(1, &d[0].1);
        assert!(c.dirty().is_empty());
    }
}
