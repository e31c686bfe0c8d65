//! The object store: one global resourceVersion counter like etcd's revision, the current
//! objects, a bounded per-kind event history (the watch cache window), the broadcast that feeds
//! open watches, and rollback of that history to serve consistent snapshots (continue tokens,
//! `resourceVersionMatch=Exact`).

pub mod persist;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::{broadcast, watch};

use crate::resources::Kind;
use crate::status::ApiError;

/// How many events a watcher may fall behind before its stream is closed, as the API server
/// does with an unresponsive watcher.
const BROADCAST_CAPACITY: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        Self { kind, namespace: namespace.to_string(), name: name.to_string() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: Kind,
    pub etype: EventType,
    /// The object after the change (for a deletion: its last state, with the deletion's RV).
    pub object: Arc<Value>,
    /// The object before the change.
    pub prev: Option<Arc<Value>>,
}

struct History {
    events: VecDeque<Arc<Event>>,
    /// Every resourceVersion at or above this one can still be watched from.
    compacted: u64,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<ObjKey, Arc<Value>>,
    history: HashMap<Kind, History>,
    capacity: usize,
}

/// What a mutation closure decides.
pub enum Mutation {
    /// Store this object (its resourceVersion is set by the store).
    Put(Value),
    /// Remove the object.
    Delete,
    /// Remove the object, whose last state is this one (an update that removed the last
    /// finalizer of a terminating object).
    DeleteWith(Value),
}

/// A committed (or dry-run) mutation.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The stored object (for a deletion: its last state).
    pub object: Arc<Value>,
    pub created: bool,
    pub deleted: bool,
}

/// Where a watch starts.
pub enum WatchFrom {
    /// Synthetic ADDED events for the current objects first (resourceVersion unset or "0").
    Current,
    /// Events after this resourceVersion.
    After(u64),
}

pub struct WatchStart {
    pub initial: Vec<Arc<Event>>,
    pub rx: broadcast::Receiver<Arc<Event>>,
    pub rv: u64,
}

pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Event>>,
    rv_tx: watch::Sender<u64>,
    persister: Option<persist::Persister>,
}

pub fn object_rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn set_rv(obj: &mut Value, rv: u64) {
    let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if m.insert("resourceVersion".into(), rv.to_string().into()).is_none() {
        // Keep ObjectMeta's field order: resourceVersion comes right after uid.
        let fields: Vec<(String, Value)> = std::mem::take(m).into_iter().collect();
        let order = |k: &str| crate::resources::schema::META_ORDER.iter().position(|f| *f == k).unwrap_or(usize::MAX);
        let mut fields = fields;
        fields.sort_by_key(|(k, _)| order(k));
        m.extend(fields);
    }
}

impl Store {
    /// A store holding `objects` at revision `rv`; older revisions are outside the window.
    pub fn new(
        rv: u64,
        objects: Vec<Value>,
        capacity: usize,
        persister: Option<persist::Persister>,
    ) -> anyhow::Result<Self> {
        let mut map = BTreeMap::new();
        for o in objects {
            let kind = persist::kind_of(&o)?;
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            map.insert(ObjKey::new(kind, ns, name), Arc::new(o));
        }
        let history = Kind::ALL.into_iter().map(|k| (k, History { events: VecDeque::new(), compacted: rv })).collect();
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (rv_tx, _) = watch::channel(rv);
        Ok(Self {
            inner: Mutex::new(Inner { rv, objects: map, history, capacity: capacity.max(1) }),
            tx,
            rv_tx,
            persister,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every change is applied at once).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// Follows the revision counter (for a list that waits for a newer revision).
    pub fn subscribe_rv(&self) -> watch::Receiver<u64> {
        self.rv_tx.subscribe()
    }

    pub fn get(&self, key: &ObjKey) -> Option<Arc<Value>> {
        self.lock().objects.get(key).cloned()
    }

    /// Objects of `kind` (optionally one namespace) at the current revision, in key order.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> (u64, Vec<Arc<Value>>) {
        let g = self.lock();
        let items = g
            .objects
            .iter()
            .filter(|(k, _)| k.kind == kind && namespace.is_none_or_eq(&k.namespace))
            .map(|(_, v)| v.clone())
            .collect();
        (g.rv, items)
    }

    /// Objects of `kind` as they were at revision `at`, rebuilt by undoing newer events.
    pub fn list_at(&self, kind: Kind, namespace: Option<&str>, at: u64) -> Result<Vec<Arc<Value>>, SnapshotError> {
        let g = self.lock();
        if at > g.rv {
            return Err(SnapshotError::TooLarge { current: g.rv });
        }
        let h = &g.history[&kind];
        if at < h.compacted {
            return Err(SnapshotError::Compacted);
        }
        let mut objs: BTreeMap<ObjKey, Arc<Value>> =
            g.objects.iter().filter(|(k, _)| k.kind == kind).map(|(k, v)| (k.clone(), v.clone())).collect();
        for ev in h.events.iter().rev().take_while(|e| e.rv > at) {
            let key = key_of(kind, &ev.object);
            match ev.etype {
                EventType::Added => {
                    objs.remove(&key);
                }
                EventType::Modified | EventType::Deleted => {
                    if let Some(p) = &ev.prev {
                        objs.insert(key, p.clone());
                    }
                }
            }
        }
        Ok(objs.into_iter().filter(|(k, _)| namespace.is_none_or_eq(&k.namespace)).map(|(_, v)| v).collect())
    }

    /// Applies `f` to the current object under the store lock and commits what it decides.
    /// A `Put` equal to the stored object is a no-op: no new revision, no event (as the API
    /// server skips writes that change nothing).
    pub async fn mutate(
        &self,
        key: &ObjKey,
        dry_run: bool,
        f: impl FnOnce(Option<&Value>) -> Result<Mutation, ApiError>,
    ) -> Result<Outcome, ApiError> {
        let (outcome, snapshot) = {
            let mut g = self.lock();
            let current = g.objects.get(key).cloned();
            let decision = f(current.as_deref())?;
            let next_rv = g.rv + 1;
            let (etype, mut object) = match decision {
                Mutation::Put(mut obj) => {
                    if let Some(cur) = &current {
                        set_rv(&mut obj, object_rv(cur));
                        if &obj == cur.as_ref() {
                            return Ok(Outcome { object: cur.clone(), created: false, deleted: false });
                        }
                    }
                    let t = if current.is_some() { EventType::Modified } else { EventType::Added };
                    (t, obj)
                }
                Mutation::Delete | Mutation::DeleteWith(_) if current.is_none() => {
                    return Err(ApiError::not_found(key.kind.group(), key.kind.plural(), &key.name))
                }
                Mutation::DeleteWith(last) => (EventType::Deleted, last),
                Mutation::Delete => match &current {
                    Some(cur) => (EventType::Deleted, cur.as_ref().clone()),
                    None => return Err(ApiError::not_found(key.kind.group(), key.kind.plural(), &key.name)),
                },
            };
            set_rv(&mut object, next_rv);
            let object = Arc::new(object);
            let outcome = Outcome {
                object: object.clone(),
                created: etype == EventType::Added,
                deleted: etype == EventType::Deleted,
            };
            if dry_run {
                return Ok(outcome);
            }
            g.rv = next_rv;
            match etype {
                EventType::Deleted => {
                    g.objects.remove(key);
                }
                _ => {
                    g.objects.insert(key.clone(), object.clone());
                }
            }
            let ev = Arc::new(Event { rv: next_rv, kind: key.kind, etype, object, prev: current });
            let cap = g.capacity;
            let h = g.history.get_mut(&key.kind).expect("every kind has a history");
            h.events.push_back(ev.clone());
            while h.events.len() > cap {
                if let Some(old) = h.events.pop_front() {
                    h.compacted = old.rv;
                }
            }
            // Sent under the lock so that watchers see events in revision order and a watch
            // started under the same lock misses none.
            let _receivers = self.tx.send(ev).unwrap_or(0);
            self.rv_tx.send_replace(next_rv);
            let snapshot = self.persister.as_ref().map(|_| persist::snapshot(&g));
            (outcome, snapshot)
        };
        if let (Some(p), Some(s)) = (&self.persister, snapshot) {
            p.save(s).await.map_err(|e| ApiError::internal(format!("persisting state: {e:#}")))?;
        }
        Ok(outcome)
    }

    /// Starts a watch on `kind`: the events it must send first and the live feed after them.
    pub fn watch(&self, kind: Kind, from: WatchFrom) -> Result<WatchStart, u64> {
        let g = self.lock();
        let rx = self.tx.subscribe();
        let initial = match from {
            WatchFrom::Current => g
                .objects
                .iter()
                .filter(|(k, _)| k.kind == kind)
                .map(|(_, v)| {
                    Arc::new(Event { rv: object_rv(v), kind, etype: EventType::Added, object: v.clone(), prev: None })
                })
                .collect(),
            WatchFrom::After(n) => {
                let h = &g.history[&kind];
                if n < h.compacted {
                    return Err(h.compacted);
                }
                h.events.iter().filter(|e| e.rv > n).cloned().collect()
            }
        };
        Ok(WatchStart { initial, rx, rv: g.rv })
    }

    /// Drops the whole history: every resourceVersion older than the current one is expired.
    pub fn compact_now(&self) -> u64 {
        let mut g = self.lock();
        let rv = g.rv;
        for h in g.history.values_mut() {
            h.events.clear();
            h.compacted = rv;
        }
        rv
    }

    /// The oldest resourceVersion each kind can still be watched from.
    pub fn window(&self) -> Vec<(Kind, u64, usize)> {
        let g = self.lock();
        Kind::ALL.into_iter().map(|k| (k, g.history[&k].compacted, g.history[&k].events.len())).collect()
    }

    /// Runs `f` with the current revision while no change can be committed, and hands it the
    /// events still queued for `rx` (a bookmark must not overtake an event).
    pub fn drain_at_current(
        &self,
        rx: &mut broadcast::Receiver<Arc<Event>>,
    ) -> Result<(u64, Vec<Arc<Event>>), broadcast::error::RecvError> {
        let g = self.lock();
        let mut pending = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(ev) => pending.push(ev),
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Closed) => return Err(broadcast::error::RecvError::Closed),
                Err(broadcast::error::TryRecvError::Lagged(n)) => return Err(broadcast::error::RecvError::Lagged(n)),
            }
        }
        Ok((g.rv, pending))
    }
}

pub enum SnapshotError {
    Compacted,
    TooLarge { current: u64 },
}

fn key_of(kind: Kind, obj: &Value) -> ObjKey {
    ObjKey::new(
        kind,
        obj["metadata"]["namespace"].as_str().unwrap_or_default(),
        obj["metadata"]["name"].as_str().unwrap_or_default(),
    )
}

trait NamespaceFilter {
    fn is_none_or_eq(&self, ns: &str) -> bool;
}

impl NamespaceFilter for Option<&str> {
    fn is_none_or_eq(&self, ns: &str) -> bool {
        match self {
            None => true,
            Some(want) => *want == ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cm(name: &str, v: &str) -> Value {
        json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": name, "namespace": "ns"}, "data": {"v": v}})
    }

    async fn put(s: &Store, name: &str, v: &str) -> u64 {
        let key = ObjKey::new(Kind::ConfigMap, "ns", name);
        let o = s.mutate(&key, false, |_| Ok(Mutation::Put(cm(name, v)))).await.unwrap();
        object_rv(&o.object)
    }

    #[tokio::test]
    async fn revisions_history_and_snapshots() {
        let s = Store::new(10, vec![], 3, None).unwrap();
        assert_eq!(put(&s, "a", "1").await, 11);
        assert_eq!(put(&s, "a", "1").await, 11, "a no-op write keeps the revision");
        assert_eq!(put(&s, "b", "1").await, 12);
        assert_eq!(put(&s, "a", "2").await, 13);
        let key = ObjKey::new(Kind::ConfigMap, "ns", "b");
        s.mutate(&key, false, |_| Ok(Mutation::Delete)).await.unwrap();
        assert_eq!(s.current_rv(), 14);

        let at12 = s.list_at(Kind::ConfigMap, None, 12).ok().unwrap();
        let names: Vec<_> = at12.iter().map(|o| (o["metadata"]["name"].clone(), o["data"]["v"].clone())).collect();
        assert_eq!(names, vec![(json!("a"), json!("1")), (json!("b"), json!("1"))]);
        // Capacity 3: event 11 fell out, so 11 is the oldest servable revision.
        assert!(matches!(s.list_at(Kind::ConfigMap, None, 10), Err(SnapshotError::Compacted)));
        assert_eq!(s.watch(Kind::ConfigMap, WatchFrom::After(10)).err(), Some(11), "expired, 11 the oldest");
        let w = s.watch(Kind::ConfigMap, WatchFrom::After(11)).ok().unwrap();
        let rvs: Vec<_> = w.initial.iter().map(|e| (e.rv, e.etype)).collect();
        assert_eq!(rvs, vec![(12, EventType::Added), (13, EventType::Modified), (14, EventType::Deleted)]);
        s.compact_now();
        assert_eq!(s.watch(Kind::ConfigMap, WatchFrom::After(13)).err(), Some(14), "expired, 14 the oldest");
        assert!(s.watch(Kind::ConfigMap, WatchFrom::After(14)).is_ok());
    }
}
