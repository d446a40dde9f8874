//! The registry of live agents and the `Agents` resources: who is connected now (in memory, with their latest
//! facts) and who ever registered (in the state store).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_common::protocol::EtcdFacts;
use ferry_common::resources::{
    AgentSpec, ClusterSpec, Resource, ResourceType, Spec, Timestamp, LABEL_CLUSTER, LABEL_MEMBER,
};

use crate::lock;
use crate::metrics::Metrics;
use crate::state::{StateError, StateStore};

/// An agent connected right now.
#[derive(Clone)]
pub struct LiveAgent {
    pub member: String,
    pub conn: quinn::Connection,
    pub conn_id: u64,
    pub facts: Option<EtcdFacts>,
    pub software_version: String,
    pub address: SocketAddr,
    pub connected_since: Timestamp,
    pub last_heard: Timestamp,
}

impl LiveAgent {
    /// Whether the agent's latest report reached its etcd member (and named it).
    pub fn reaches_etcd(&self) -> bool {
        self.facts.as_ref().is_some_and(|f| f.error.is_none() && f.member_id != 0)
    }
}

/// The registry; cheap to clone (a handle).
#[derive(Clone)]
pub struct Agents {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    /// Live agents by (cluster, member).
    live: Mutex<HashMap<(String, String), LiveAgent>>,
    /// Per cluster, the highest revision reported, when it was first seen and when it was last persisted.
    highest: Mutex<HashMap<String, HighestRevision>>,
    /// Per member: whether its record, last written when, says connected.
    written: Mutex<HashMap<(String, String), (bool, std::time::Instant)>>,
    /// Members that connected at least once since start (a further connection is a reconnect).
    seen: Mutex<std::collections::HashSet<(String, String)>>,
    next_conn_id: AtomicU64,
}

/// A member's record is written at most this often, but for a disconnect its record does not show yet:
/// one certificate reconnecting in a loop (1 174 times in 20 s in a hostile review) costs a write every few
/// seconds, not three per connection. `get agents` overlays the live state, so a skipped write hides nothing.
const PERSIST_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A cluster's highest revision as the registry tracks it.
#[derive(Clone, Copy, Default)]
struct HighestRevision {
    revision: i64,
    at: Timestamp,
    persisted: i64,
    persisted_at: i64,
}

/// A cluster's highest revision is written to the state store at most this often (agents report every
/// 10 s; a write per report would be most of the coordinator's writes). The restore bump's margin covers
/// what a crash loses in between.
const PERSIST_HIGHEST_EVERY_SECONDS: i64 = 60;
/// Reported revisions above this are ignored as nonsense (at a million writes a second, a cluster needs 30
/// years to get here); a lying agent must not push its cluster's restore towards etcd's i64 limit.
const MAX_PLAUSIBLE_REVISION: i64 = 1 << 50;

impl Agents {
    /// A registry with nobody connected; records left "connected" by an earlier run are marked disconnected.
    pub fn new(state: Arc<dyn StateStore>, metrics: Arc<Metrics>) -> Result<Self, StateError> {
        for mut r in state.list(ResourceType::Agent)? {
            if let Spec::Agent(a) = &mut r.spec {
                if a.connected {
                    a.connected = false;
                    state.put(r)?;
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                state,
                metrics,
                live: Mutex::new(HashMap::new()),
                highest: Mutex::new(HashMap::new()),
                written: Mutex::new(HashMap::new()),
                seen: Mutex::new(std::collections::HashSet::new()),
                next_conn_id: AtomicU64::new(1),
            }),
        })
    }

    /// A fresh id for a connection, to tell an agent's old connection from its new one.
    pub fn next_conn_id(&self) -> u64 {
        self.inner.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// An agent connected: remember it, and make sure its cluster and status resources exist.
    pub fn connected(&self, cluster: &str, agent: LiveAgent) -> Result<(), StateError> {
        let state = &self.inner.state;
        // Insert-if-absent in one transaction: a first registration never overwrites a cluster an operator is
        // applying at the same moment (a read then a separate write could).
        if state.get(ResourceType::Cluster, cluster)?.is_none() {
            state.transact(&mut |tx| {
                if tx.get(ResourceType::Cluster, cluster)?.is_none() {
                    let mut r = Resource::new(cluster, Spec::Cluster(ClusterSpec::default()));
                    r.metadata.labels.insert(LABEL_CLUSTER.into(), cluster.into());
                    tx.put(r)?;
                }
                Ok(())
            })?;
        }
        crate::status::ensure_exists(state.as_ref(), cluster)?;
        let key = (cluster.to_string(), agent.member.clone());
        if !lock(&self.inner.seen).insert(key.clone()) {
            self.inner
                .metrics
                .agent_reconnects
                .get_or_create(&self.inner.metrics.member_series(cluster, &agent.member))
                .inc();
        }
        let old = lock(&self.inner.live).insert(key, agent.clone());
        if let Some(old) = old {
            old.conn.close(0u32.into(), b"replaced by a newer connection of the same agent");
        }
        self.count(cluster);
        self.persist(cluster, &agent, true)
    }

    /// A report arrived.
    pub fn reported(&self, cluster: &str, member: &str, conn_id: u64, facts: EtcdFacts) -> Result<(), StateError> {
        let revision = facts.error.is_none().then_some(facts.revision);
        let key = (cluster.to_string(), member.to_string());
        // The record says disconnected although the agent is live (its connect's write fell in a throttled
        // window): this report writes it.
        let stale = lock(&self.inner.written).get(&key).is_none_or(|(connected, _)| !connected);
        let (first, reachability_changed) = {
            let mut live = lock(&self.inner.live);
            let Some(a) = live.get_mut(&key) else { return Ok(()) };
            if a.conn_id != conn_id {
                return Ok(());
            }
            let first = a.facts.is_none() || stale;
            let was_reachable = a.facts.as_ref().is_some_and(|f| f.error.is_none());
            let changed = was_reachable != facts.error.is_none();
            a.facts = Some(facts);
            a.last_heard = Timestamp::now();
            (first.then(|| a.clone()), changed)
        };
        // Recount only when this report turned etcd reachable or unreachable: a count scans every live agent.
        if reachability_changed {
            self.count(cluster);
        }
        if let Some(revision) = revision {
            self.saw_revision(cluster, revision)?;
        }
        // Persist the first report only (or one whose record is stale); later ones live in memory (`get agents`
        // overlays them).
        match first {
            Some(a) => self.persist(cluster, &a, true),
            None => Ok(()),
        }
    }

    /// Tracks the highest revision of `cluster`, persisting it when it grew and was last written a while ago.
    fn saw_revision(&self, cluster: &str, revision: i64) -> Result<(), StateError> {
        if !(1..=MAX_PLAUSIBLE_REVISION).contains(&revision) {
            return Ok(());
        }
        let now = Timestamp::now();
        let to_persist = {
            let mut highest = lock(&self.inner.highest);
            let h = highest.entry(cluster.to_owned()).or_default();
            if revision > h.revision {
                (h.revision, h.at) = (revision, now);
            }
            let due = h.revision > h.persisted && now.seconds - h.persisted_at >= PERSIST_HIGHEST_EVERY_SECONDS;
            if due {
                (h.persisted, h.persisted_at) = (h.revision, now.seconds);
            }
            due.then_some(*h)
        };
        match to_persist {
            Some(h) => crate::status::raise_highest_revision(self.inner.state.as_ref(), cluster, h.revision, h.at),
            None => Ok(()),
        }
    }

    /// The highest revision an agent of `cluster` reported since the coordinator started, and when.
    pub fn highest_revision(&self, cluster: &str) -> Option<(i64, Timestamp)> {
        lock(&self.inner.highest).get(cluster).map(|h| (h.revision, h.at))
    }

    /// The agent's connection ended.
    pub fn disconnected(&self, cluster: &str, member: &str, conn_id: u64) -> Result<(), StateError> {
        let gone = {
            let mut live = lock(&self.inner.live);
            let key = (cluster.to_string(), member.to_string());
            match live.get(&key) {
                Some(a) if a.conn_id == conn_id => live.remove(&key),
                _ => None,
            }
        };
        self.count(cluster);
        match gone {
            Some(a) => self.persist(cluster, &a, false),
            None => Ok(()),
        }
    }

    fn persist(&self, cluster: &str, a: &LiveAgent, connected: bool) -> Result<(), StateError> {
        {
            let now = std::time::Instant::now();
            let mut written = lock(&self.inner.written);
            let key = (cluster.to_string(), a.member.clone());
            let due = match written.get(&key) {
                None => true,
                // A disconnect is written exactly when the record still says connected: it must not say that.
                Some((was_connected, _)) if !connected => *was_connected,
                Some((_, at)) => now.duration_since(*at) >= PERSIST_EVERY,
            };
            if !due {
                return Ok(());
            }
            written.insert(key, (connected, now));
        }
        let mut r = Resource::new(format!("{cluster}/{}", a.member), Spec::Agent(agent_spec(cluster, a, connected)));
        r.metadata.labels.insert(LABEL_CLUSTER.into(), cluster.into());
        r.metadata.labels.insert(LABEL_MEMBER.into(), a.member.clone());
        self.inner.state.put(r)?;
        Ok(())
    }

    /// Agents as `get agents` shows them: every agent that ever registered, live facts overlaid.
    pub fn resources(&self) -> Result<Vec<Resource>, StateError> {
        let live = lock(&self.inner.live).clone();
        let mut out = self.inner.state.list(ResourceType::Agent)?;
        for r in &mut out {
            if let Spec::Agent(spec) = &mut r.spec {
                if let Some(a) = live.get(&(spec.cluster.clone(), spec.member.clone())) {
                    *spec = agent_spec(&spec.cluster.clone(), a, true);
                }
            }
        }
        Ok(out)
    }

    /// The members of `cluster` whose agent ever registered, connected or not.
    pub fn members(&self, cluster: &str) -> Result<Vec<String>, StateError> {
        let all = self.inner.state.list(ResourceType::Agent)?;
        Ok(all
            .into_iter()
            .filter_map(|r| match r.spec {
                Spec::Agent(a) if a.cluster == cluster => Some(a.member),
                _ => None,
            })
            .collect())
    }

    /// Connected agents of a cluster.
    pub fn live(&self, cluster: &str) -> Vec<LiveAgent> {
        lock(&self.inner.live).iter().filter(|((c, _), _)| c == cluster).map(|(_, a)| a.clone()).collect()
    }

    /// Whether a connected agent of `cluster` reaches its etcd member (so a backup can start).
    pub fn any_reaches_etcd(&self, cluster: &str) -> bool {
        lock(&self.inner.live)
            .iter()
            .any(|((c, _), a)| c == cluster && a.facts.as_ref().is_some_and(|f| f.error.is_none()))
    }

    /// Whether an agent of `cluster` ever registered.
    pub fn cluster_known(&self, cluster: &str) -> Result<bool, StateError> {
        Ok(self
            .inner
            .state
            .list_labeled(ResourceType::Agent, LABEL_CLUSTER, cluster)?
            .iter()
            .any(|r| matches!(&r.spec, Spec::Agent(a) if a.cluster == cluster)))
    }

    /// Sets the cluster's connected and etcd-reachable agent gauges.
    fn count(&self, cluster: &str) {
        let (connected, reachable) = {
            let live = lock(&self.inner.live);
            let agents: Vec<&LiveAgent> = live.iter().filter(|((c, _), _)| c == cluster).map(|(_, a)| a).collect();
            let reachable = agents.iter().filter(|a| a.facts.as_ref().is_some_and(|f| f.error.is_none())).count();
            (agents.len(), reachable)
        };
        let labels = Metrics::cluster(cluster);
        self.inner.metrics.agents_connected.get_or_create(&labels).set(connected as i64);
        self.inner.metrics.etcd_reachable_agents.get_or_create(&labels).set(reachable as i64);
    }
}

fn agent_spec(cluster: &str, a: &LiveAgent, connected: bool) -> AgentSpec {
    let f = a.facts.clone().unwrap_or_default();
    AgentSpec {
        cluster: cluster.to_string(),
        member: a.member.clone(),
        connected,
        memberid: format!("{:x}", f.member_id),
        etcdclusterid: format!("{:x}", f.cluster_id),
        etcdversion: f.etcd_version,
        dbsize: f.db_size,
        raftappliedindex: f.raft_applied_index,
        revision: f.revision,
        hashedcompaction: f.hashed_compactions.last().copied().unwrap_or_default(),
        leader: f.leader,
        etcderror: f.error.unwrap_or_default(),
        agentversion: a.software_version.clone(),
        connectedsince: Some(a.connected_since),
        lastheard: Some(a.last_heard),
        address: a.address.to_string(),
    }
}
