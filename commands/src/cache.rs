//! Recently written aggregates, kept in memory so that the next command on
//! the same stream needs no read (issue 10, docs/performance.md "Append").
//!
//! An entry is an aggregate's state after a successful commit, with the
//! sequence of its last event and that event's chain hash. It is never a
//! source of truth: the append that follows a command decided on a cached
//! state requires the stored head to still be exactly that event (same
//! sequence, same hash: the hash commits to the whole stream before it), and
//! the (type, id, sequence) key refuses a second event at the next
//! sequence. Another writer (in this process or another one), a purge, or
//! anything else that moved the stream therefore turns a stale entry into a
//! conflict, and the command is retried against the state read afresh.
//!
//! Entries are taken out of the cache while a command uses them (so two
//! tasks never share one state, and no aggregate needs `Clone`), and put
//! back only after the commit succeeded. Only `EventStore::execute` takes
//! them: its command either appends (and the append proves the state) or is
//! refused or appends nothing, and then it is decided again on a fresh read. A unit of work that fails,
//! conflicts, is limited or is dropped leaves nothing behind. Bounded: at
//! most `capacity` entries (least recently used go first), each for at most
//! [`TTL`].

use std::any::Any;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

/// How long an entry may serve commands after its commit.
pub const TTL: Duration = Duration::from_secs(120);
/// Entries kept by default (`CASEBOOK_AGGREGATE_CACHE`).
pub const DEFAULT_CAPACITY: usize = 4096;
/// The largest capacity accepted. An entry is a whole aggregate's state
/// (a ticket's with its drafts and each message's workflow: kilobytes),
/// and the map is sized for the capacity up front.
pub const MAX_CAPACITY: usize = 65_536;

/// An aggregate as it stood after a commit.
pub(crate) struct Cached {
    pub state: Box<dyn Any + Send + Sync>,
    /// The sequence of the stream's last event.
    pub version: usize,
    /// That event's chain hash.
    pub head: String,
}

struct Entry {
    cached: Cached,
    stored_at: Instant,
}

type Key = (&'static str, String);

/// A bounded LRU of aggregate states, keyed by aggregate type and id.
pub struct AggregateCache {
    entries: Option<Mutex<LruCache<Key, Entry>>>,
    ttl: Duration,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for AggregateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateCache")
            .field("capacity", &self.capacity())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl AggregateCache {
    /// A cache of at most `capacity` aggregates (clamped to
    /// [`MAX_CAPACITY`]); `0` keeps nothing.
    pub fn new(capacity: usize) -> Self {
        Self::with_ttl(capacity, TTL)
    }

    /// Like [`new`](Self::new) with another time to live.
    pub fn with_ttl(capacity: usize, ttl: Duration) -> Self {
        Self {
            entries: NonZeroUsize::new(capacity.min(MAX_CAPACITY))
                .map(|n| Mutex::new(LruCache::new(n))),
            ttl,
            hits: Default::default(),
            misses: Default::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.entries.as_ref().map_or(0, |e| lock(e).cap().get())
    }

    /// How many entries it holds now (expired ones included until touched).
    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, |e| lock(e).len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Commands served from the cache, and those that had to read the
    /// stream, since start.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.hits.load(Relaxed), self.misses.load(Relaxed))
    }

    /// Takes the entry out, if there is a fresh one of that type.
    pub(crate) fn take<A: 'static>(
        &self,
        aggregate_type: &'static str,
        id: &str,
    ) -> Option<Cached> {
        use std::sync::atomic::Ordering::Relaxed;
        let entries = self.entries.as_ref()?;
        let key = (aggregate_type, id.to_string());
        let entry = lock(entries).pop(&key);
        let fresh = entry
            .filter(|e| e.stored_at.elapsed() < self.ttl)
            .filter(|e| e.cached.state.is::<A>());
        match fresh {
            Some(e) => {
                self.hits.fetch_add(1, Relaxed);
                crate::metrics::AGGREGATE_CACHE
                    .with_label_values(&["hit"])
                    .inc();
                Some(e.cached)
            }
            None => {
                self.misses.fetch_add(1, Relaxed);
                crate::metrics::AGGREGATE_CACHE
                    .with_label_values(&["miss"])
                    .inc();
                None
            }
        }
    }

    /// Stores a stream's state after a successful commit. An entry already
    /// there for a later sequence (another task's later commit) stays.
    pub(crate) fn put(&self, aggregate_type: &'static str, id: String, cached: Cached) {
        let Some(entries) = self.entries.as_ref() else {
            return;
        };
        let mut entries = lock(entries);
        let key = (aggregate_type, id);
        if let Some(existing) = entries.peek(&key) {
            if existing.cached.version > cached.version && existing.stored_at.elapsed() < self.ttl {
                return;
            }
        }
        entries.put(
            key,
            Entry {
                cached,
                stored_at: Instant::now(),
            },
        );
    }

    /// Forgets every stream listed (aggregate type, id).
    pub(crate) fn evict_all<'a>(&self, streams: impl IntoIterator<Item = (&'static str, &'a str)>) {
        if let Some(entries) = self.entries.as_ref() {
            let mut entries = lock(entries);
            for (t, id) in streams {
                entries.pop(&(t, id.to_string()));
            }
        }
    }
}

/// The lock, even after a panic elsewhere: every operation leaves the LRU
/// consistent, and a lost entry only costs a read.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Counter(u32);
    struct Other;

    fn cached(n: u32, version: usize) -> Cached {
        Cached {
            state: Box::new(Counter(n)),
            version,
            head: format!("h{version}"),
        }
    }

    fn state(c: Cached) -> u32 {
        c.state.downcast_ref::<Counter>().expect("a counter").0
    }

    #[test]
    fn take_removes_the_entry_so_two_tasks_never_share_a_state() {
        let cache = AggregateCache::new(8);
        cache.put("t", "a".into(), cached(1, 1));
        let first = cache.take::<Counter>("t", "a").expect("cached");
        assert_eq!((first.version, first.head.as_str()), (1, "h1"));
        assert_eq!(state(first), 1);
        assert!(cache.take::<Counter>("t", "a").is_none());
        assert_eq!(cache.hits_and_misses(), (1, 1));
    }

    #[test]
    fn least_recently_used_entries_leave_first() {
        let cache = AggregateCache::new(2);
        cache.put("t", "a".into(), cached(1, 1));
        cache.put("t", "b".into(), cached(2, 1));
        cache.put("t", "c".into(), cached(3, 1));
        assert_eq!(cache.len(), 2);
        assert!(cache.take::<Counter>("t", "a").is_none());
        assert!(cache.take::<Counter>("t", "b").is_some());
        assert!(cache.take::<Counter>("t", "c").is_some());
    }

    #[test]
    fn an_expired_entry_is_not_served() {
        let cache = AggregateCache::with_ttl(8, Duration::from_millis(20));
        cache.put("t", "a".into(), cached(1, 1));
        std::thread::sleep(Duration::from_millis(40));
        assert!(cache.take::<Counter>("t", "a").is_none());
    }

    #[test]
    fn an_older_commit_does_not_replace_a_later_one() {
        let cache = AggregateCache::new(8);
        cache.put("t", "a".into(), cached(2, 10));
        cache.put("t", "a".into(), cached(1, 5));
        assert_eq!(cache.take::<Counter>("t", "a").map(|c| c.version), Some(10));
        cache.put("t", "a".into(), cached(1, 5));
        cache.put("t", "a".into(), cached(2, 10));
        assert_eq!(cache.take::<Counter>("t", "a").map(|c| c.version), Some(10));
    }

    #[test]
    fn a_state_of_another_type_is_not_served() {
        let cache = AggregateCache::new(8);
        cache.put("t", "a".into(), cached(1, 1));
        assert!(cache.take::<Other>("t", "a").is_none());
    }

    #[test]
    fn eviction_and_a_zero_capacity_keep_nothing() {
        let cache = AggregateCache::new(8);
        cache.put("t", "a".into(), cached(1, 1));
        cache.put("t", "b".into(), cached(1, 1));
        cache.evict_all([("t", "a"), ("t", "b")]);
        assert!(cache.is_empty());
        let off = AggregateCache::new(0);
        off.put("t", "a".into(), cached(1, 1));
        assert!(off.take::<Counter>("t", "a").is_none());
        assert_eq!(off.capacity(), 0);
    }
}
