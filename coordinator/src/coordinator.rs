//! The coordinator's shared state: the state store, the backup store, the CA and the live agents.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use ferry_common::protocol::EtcdFacts;
use ferry_common::resources::{
    AgentSpec, ClusterSpec, EtcdBackupOverallStatusSpec, EtcdBackupStatusSpec, Resource, ResourceType, Spec, Timestamp,
    LABEL_CLUSTER, LABEL_MEMBER, OVERALL_STATUS_ID,
};
use ferry_common::tls::CertAuthority;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::schedule::Bounds;
use crate::scheduler::Scheduler;
use crate::state::StateStore;
use crate::store::BackupStore;
use tokio::sync::Semaphore;

/// Coordinator settings that jobs need.
#[derive(Debug, Clone)]
pub struct Settings {
    /// zstd level agents compress with.
    pub zstd_level: i32,
    /// S3 multipart part size in bytes.
    pub part_size: u64,
    /// S3 parts uploading at once per job.
    pub parts_in_flight: u32,
    /// Upload cap per job in bytes per second; 0 = unlimited.
    pub upload_limit_bps: u64,
    /// Download cap per job in bytes per second; 0 = unlimited.
    pub download_limit_bps: u64,
    /// Limits and jitter of automatic backups.
    pub bounds: Bounds,
    /// Backups running at once across clusters.
    pub max_concurrent_backups: usize,
}

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

pub struct Coordinator {
    pub state: Arc<dyn StateStore>,
    pub store: BackupStore,
    pub ca: CertAuthority,
    pub settings: Settings,
    /// Process-wide cancellation: parent of every connection's and job's token.
    pub cancel: CancellationToken,
    /// Connection and job tasks, joined at shutdown.
    pub tasks: TaskTracker,
    /// Live agents by (cluster, member).
    agents: Mutex<HashMap<(String, String), LiveAgent>>,
    /// Clusters with a backup running or queued.
    running: Mutex<HashSet<String>>,
    /// Job slots: at most `max_concurrent_backups` backups transfer at once.
    pub job_slots: Arc<Semaphore>,
    pub scheduler: Scheduler,
    pub metrics: Metrics,
    /// Set once the QUIC listener is up (for `/readyz`).
    pub listening: std::sync::atomic::AtomicBool,
    next_conn_id: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves consistent data (each critical section is one
    // map operation), so poisoning is not a reason to stop serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks a cluster as backing up; the mark is removed when this is dropped.
pub struct RunningGuard {
    coord: Arc<Coordinator>,
    cluster: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        lock(&self.coord.running).remove(&self.cluster);
    }
}

impl Coordinator {
    pub fn new(
        state: Arc<dyn StateStore>,
        store: BackupStore,
        ca: CertAuthority,
        settings: Settings,
    ) -> Result<Arc<Self>> {
        let slots = settings.max_concurrent_backups.max(1);
        let coord = Arc::new(Self {
            state,
            store,
            ca,
            settings,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            agents: Mutex::new(HashMap::new()),
            running: Mutex::new(HashSet::new()),
            job_slots: Arc::new(Semaphore::new(slots)),
            scheduler: Scheduler::default(),
            metrics: Metrics::default(),
            listening: std::sync::atomic::AtomicBool::new(false),
            next_conn_id: AtomicU64::new(1),
        });
        coord.init_resources()?;
        Ok(coord)
    }

    fn init_resources(&self) -> Result<()> {
        let mut overall = match self.state.get(ResourceType::EtcdBackupOverallStatus, OVERALL_STATUS_ID)? {
            Some(Resource { spec: Spec::EtcdBackupOverallStatus(s), .. }) => s,
            _ => EtcdBackupOverallStatusSpec::default(),
        };
        overall.configurationname = self.store.name().to_string();
        overall.configurationerror = match &self.store {
            BackupStore::Local(_) => String::new(),
            // Until a config is applied; set again once the stored one (if any) is checked.
            BackupStore::S3(_) => "not initialized".to_string(),
        };
        self.metrics.store_configuration_error.set(i64::from(!overall.configurationerror.is_empty()));
        self.state.put(Resource::new(OVERALL_STATUS_ID, Spec::EtcdBackupOverallStatus(overall)))?;
        // Nothing is connected at start; agents that were, reconnect and say so.
        for mut r in self.state.list(ResourceType::Agent)? {
            if let Spec::Agent(a) = &mut r.spec {
                if a.connected {
                    a.connected = false;
                    self.state.put(r)?;
                }
            }
        }
        // A backup marked running when the coordinator stopped did not finish.
        for mut r in self.state.list(ResourceType::EtcdBackupStatus)? {
            if let Spec::EtcdBackupStatus(s) = &mut r.spec {
                if s.status == ferry_common::resources::status::RUNNING {
                    s.status = ferry_common::resources::status::ERROR;
                    s.error = "the coordinator restarted while this backup ran".into();
                    self.state.put(r)?;
                }
            }
        }
        Ok(())
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// An agent connected: remember it, and make sure its cluster and status resources exist.
    pub fn agent_connected(&self, cluster: &str, agent: LiveAgent) -> Result<()> {
        if self.state.get(ResourceType::Cluster, cluster)?.is_none() {
            let mut r = Resource::new(cluster, Spec::Cluster(ClusterSpec::default()));
            r.metadata.labels.insert(LABEL_CLUSTER.into(), cluster.into());
            self.state.put(r)?;
        }
        if self.state.get(ResourceType::EtcdBackupStatus, cluster)?.is_none() {
            let mut r = Resource::new(cluster, Spec::EtcdBackupStatus(EtcdBackupStatusSpec::default()));
            r.metadata.labels.insert(LABEL_CLUSTER.into(), cluster.into());
            self.state.put(r)?;
        }
        let old = lock(&self.agents).insert((cluster.to_string(), agent.member.clone()), agent.clone());
        if let Some(old) = old {
            old.conn.close(0u32.into(), b"replaced by a newer connection of the same agent");
        }
        self.count_agents(cluster);
        self.persist_agent(cluster, &agent, true)
    }

    /// A report arrived.
    pub fn agent_reported(&self, cluster: &str, member: &str, conn_id: u64, facts: EtcdFacts) -> Result<()> {
        let first = {
            let mut agents = lock(&self.agents);
            let Some(a) = agents.get_mut(&(cluster.to_string(), member.to_string())) else { return Ok(()) };
            if a.conn_id != conn_id {
                return Ok(());
            }
            let first = a.facts.is_none();
            a.facts = Some(facts);
            a.last_heard = Timestamp::now();
            first.then(|| a.clone())
        };
        self.count_agents(cluster);
        // Persist the first report only; later ones live in memory (`get agents` overlays them).
        match first {
            Some(a) => self.persist_agent(cluster, &a, true),
            None => Ok(()),
        }
    }

    /// The agent's connection ended.
    pub fn agent_disconnected(&self, cluster: &str, member: &str, conn_id: u64) -> Result<()> {
        let gone = {
            let mut agents = lock(&self.agents);
            let key = (cluster.to_string(), member.to_string());
            match agents.get(&key) {
                Some(a) if a.conn_id == conn_id => agents.remove(&key),
                _ => None,
            }
        };
        self.count_agents(cluster);
        match gone {
            Some(a) => self.persist_agent(cluster, &a, false),
            None => Ok(()),
        }
    }

    fn persist_agent(&self, cluster: &str, a: &LiveAgent, connected: bool) -> Result<()> {
        let mut r = Resource::new(format!("{cluster}/{}", a.member), Spec::Agent(agent_spec(cluster, a, connected)));
        r.metadata.labels.insert(LABEL_CLUSTER.into(), cluster.into());
        r.metadata.labels.insert(LABEL_MEMBER.into(), a.member.clone());
        self.state.put(r)?;
        Ok(())
    }

    /// Agents as `get agents` shows them: every agent that ever registered, live facts overlaid.
    pub fn agent_resources(&self) -> Result<Vec<Resource>> {
        let live = lock(&self.agents).clone();
        let mut out = self.state.list(ResourceType::Agent)?;
        for r in &mut out {
            if let Spec::Agent(spec) = &mut r.spec {
                if let Some(a) = live.get(&(spec.cluster.clone(), spec.member.clone())) {
                    *spec = agent_spec(&spec.cluster.clone(), a, true);
                }
            }
        }
        Ok(out)
    }

    /// Connected agents of a cluster.
    pub fn live_agents(&self, cluster: &str) -> Vec<LiveAgent> {
        lock(&self.agents).iter().filter(|((c, _), _)| c == cluster).map(|(_, a)| a.clone()).collect()
    }

    /// Whether an agent of `cluster` ever registered.
    pub fn cluster_known(&self, cluster: &str) -> Result<bool> {
        Ok(self
            .state
            .list(ResourceType::Agent)?
            .iter()
            .any(|r| matches!(&r.spec, Spec::Agent(a) if a.cluster == cluster)))
    }

    /// Marks `cluster` as backing up, or says it already is.
    pub fn try_start(self: &Arc<Self>, cluster: &str) -> Option<RunningGuard> {
        lock(&self.running)
            .insert(cluster.to_string())
            .then(|| RunningGuard { coord: self.clone(), cluster: cluster.to_string() })
    }

    pub fn count_retention_deletion(&self, cluster: &str) {
        self.metrics.retention_deleted.get_or_create(&Metrics::cluster(cluster)).inc();
    }

    fn count_agents(&self, cluster: &str) {
        let (n, reachable) = {
            let agents = lock(&self.agents);
            let live: Vec<&LiveAgent> = agents.iter().filter(|((c, _), _)| c == cluster).map(|(_, a)| a).collect();
            let reachable = live.iter().filter(|a| a.facts.as_ref().is_some_and(|f| f.error.is_none())).count();
            (live.len(), reachable)
        };
        let labels = Metrics::cluster(cluster);
        self.metrics.agents_connected.get_or_create(&labels).set(n as i64);
        self.metrics.etcd_reachable_agents.get_or_create(&labels).set(reachable as i64);
    }

    pub fn any_running(&self) -> bool {
        !lock(&self.running).is_empty()
    }

    pub fn is_running(&self, cluster: &str) -> bool {
        lock(&self.running).contains(cluster)
    }

    /// Records the outcome of a store configuration attempt in the overall status.
    pub fn set_configuration_status(&self, error: &str, count_attempt: bool) -> Result<()> {
        let mut o = match self.state.get(ResourceType::EtcdBackupOverallStatus, OVERALL_STATUS_ID)? {
            Some(o) => o,
            None => {
                Resource::new(OVERALL_STATUS_ID, Spec::EtcdBackupOverallStatus(EtcdBackupOverallStatusSpec::default()))
            }
        };
        self.metrics.store_configuration_error.set(i64::from(!error.is_empty()));
        if let Spec::EtcdBackupOverallStatus(s) = &mut o.spec {
            s.configurationname = self.store.name().to_string();
            s.configurationerror = error.to_string();
            if count_attempt {
                s.configurationattempt += 1;
            }
        }
        self.state.put(o)?;
        Ok(())
    }

    /// The overall status's configuration error ("" when the store is usable).
    pub fn configuration_error(&self) -> Result<String> {
        Ok(match self.state.get(ResourceType::EtcdBackupOverallStatus, OVERALL_STATUS_ID)? {
            Some(Resource { spec: Spec::EtcdBackupOverallStatus(s), .. }) => s.configurationerror,
            _ => String::new(),
        })
    }

    /// Changes a cluster's backup status and mirrors it into the overall status.
    pub fn update_status(&self, cluster: &str, f: impl FnOnce(&mut EtcdBackupStatusSpec)) -> Result<()> {
        let mut r = match self.state.get(ResourceType::EtcdBackupStatus, cluster)? {
            Some(r) => r,
            None => {
                let mut r = Resource::new(cluster, Spec::EtcdBackupStatus(EtcdBackupStatusSpec::default()));
                r.metadata.labels.insert(LABEL_CLUSTER.into(), cluster.into());
                r
            }
        };
        let Spec::EtcdBackupStatus(spec) = &mut r.spec else { anyhow::bail!("status of {cluster} has the wrong type") };
        f(spec);
        let latest = spec.clone();
        self.state.put(r)?;
        if let Some(mut o) = self.state.get(ResourceType::EtcdBackupOverallStatus, OVERALL_STATUS_ID)? {
            if let Spec::EtcdBackupOverallStatus(s) = &mut o.spec {
                s.lastbackupstatus = Some(latest);
            }
            self.state.put(o)?;
        }
        Ok(())
    }
}

impl ferry_common::observe::Observed for Coordinator {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    fn ready(&self) -> Result<(), String> {
        // The state store is open once the coordinator exists; what remains is the QUIC listener.
        if self.listening.load(std::sync::atomic::Ordering::Relaxed) {
            Ok(())
        } else {
            Err("the QUIC listener is not up yet".into())
        }
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
        leader: f.leader,
        etcderror: f.error.unwrap_or_default(),
        agentversion: a.software_version.clone(),
        connectedsince: Some(a.connected_since),
        lastheard: Some(a.last_heard),
        address: a.address.to_string(),
    }
}
