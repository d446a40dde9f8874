//! Ferry's resources: the shape users see in `ferryctl get` and write with `ferryctl apply`.
//!
//! They follow the seed product's layout (`metadata` + `spec`, lowercase spec field names) so its users feel
//! at home. Specs are typed: `apply` parses each document by its `metadata.type`, so a typo in a field name is
//! an error, not a silently ignored key.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// API group of every Ferry resource type.
pub const GROUP: &str = "ferry.dev";
/// Label carrying the cluster a resource belongs to (`--selector ferry.dev/cluster=NAME`).
pub const LABEL_CLUSTER: &str = "ferry.dev/cluster";
/// Label carrying the member a resource belongs to.
pub const LABEL_MEMBER: &str = "ferry.dev/member";
/// The one id of `EtcdBackupOverallStatuses`.
pub const OVERALL_STATUS_ID: &str = "etcdbackup-overall-status";
/// The one id of `EtcdBackupS3Configs`.
pub const S3_CONFIG_ID: &str = "etcd-backup-s3-conf";
/// The one id of `EtcdBackupEncryptionConfigs`.
pub const ENCRYPTION_CONFIG_ID: &str = "etcd-backup-encryption";

/// A point in time as the seed product writes it: `{seconds, nanos}` since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Timestamp {
    pub seconds: i64,
    #[serde(default)]
    pub nanos: i32,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// Human-readable UTC form for tables, e.g. `2026-11-21 05:41:22 UTC`.
    pub fn human(&self) -> String {
        // RFC 3339 (and humantime, which panics past it) ends with year 9999.
        const YEAR_10000: u64 = 253_402_300_800;
        match u64::try_from(self.seconds) {
            Ok(s) if s < YEAR_10000 => {
                let t = UNIX_EPOCH + Duration::from_secs(s);
                let iso = humantime::format_rfc3339_seconds(t).to_string();
                format!("{} UTC", iso.trim_end_matches('Z').replace('T', " "))
            }
            _ => format!("{}s since 1970", self.seconds),
        }
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 },
            Err(_) => Self::default(),
        }
    }
}

/// Every resource type Ferry serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ResourceType {
    EtcdBackupS3Config,
    EtcdBackupOverallStatus,
    EtcdBackupStatus,
    EtcdManualBackup,
    EtcdBackup,
    Cluster,
    Agent,
    AgentCredential,
    EtcdBackupEncryptionConfig,
    AdminCredential,
    EtcdRestore,
    EtcdRestoreStatus,
}

/// `get`/`apply` named a type Ferry does not have.
#[derive(Debug, thiserror::Error)]
#[error("unknown resource type {0:?}; known types: {known}", known = ResourceType::known_list())]
pub struct UnknownType(pub String);

impl ResourceType {
    pub const ALL: [ResourceType; 12] = [
        Self::EtcdBackupS3Config,
        Self::EtcdBackupOverallStatus,
        Self::EtcdBackupStatus,
        Self::EtcdManualBackup,
        Self::EtcdBackup,
        Self::Cluster,
        Self::Agent,
        Self::AgentCredential,
        Self::EtcdBackupEncryptionConfig,
        Self::AdminCredential,
        Self::EtcdRestore,
        Self::EtcdRestoreStatus,
    ];

    /// Singular CamelCase name, e.g. `EtcdBackupStatus`.
    pub fn singular(self) -> &'static str {
        match self {
            Self::EtcdBackupS3Config => "EtcdBackupS3Config",
            Self::EtcdBackupOverallStatus => "EtcdBackupOverallStatus",
            Self::EtcdBackupStatus => "EtcdBackupStatus",
            Self::EtcdManualBackup => "EtcdManualBackup",
            Self::EtcdBackup => "EtcdBackup",
            Self::Cluster => "Cluster",
            Self::Agent => "Agent",
            Self::AgentCredential => "AgentCredential",
            Self::EtcdBackupEncryptionConfig => "EtcdBackupEncryptionConfig",
            Self::AdminCredential => "AdminCredential",
            Self::EtcdRestore => "EtcdRestore",
            Self::EtcdRestoreStatus => "EtcdRestoreStatus",
        }
    }

    /// Plural CamelCase name, e.g. `EtcdBackupStatuses`.
    pub fn plural(self) -> &'static str {
        match self {
            Self::EtcdBackupS3Config => "EtcdBackupS3Configs",
            Self::EtcdBackupOverallStatus => "EtcdBackupOverallStatuses",
            Self::EtcdBackupStatus => "EtcdBackupStatuses",
            Self::EtcdManualBackup => "EtcdManualBackups",
            Self::EtcdBackup => "EtcdBackups",
            Self::Cluster => "Clusters",
            Self::Agent => "Agents",
            Self::AgentCredential => "AgentCredentials",
            Self::EtcdBackupEncryptionConfig => "EtcdBackupEncryptionConfigs",
            Self::AdminCredential => "AdminCredentials",
            Self::EtcdRestore => "EtcdRestores",
            Self::EtcdRestoreStatus => "EtcdRestoreStatuses",
        }
    }

    /// Full name as it appears in `metadata.type`, e.g. `EtcdBackupStatuses.ferry.dev`.
    pub fn full_name(self) -> String {
        format!("{}.{GROUP}", self.plural())
    }

    /// Namespace the resources of this type live in: the seed's (Omni's) namespaces, so that its documented
    /// YAML applies with only the group renamed. `default` holds configuration, `ephemeral` requests and
    /// live state, `metrics` status, `external` what lives outside the state store (the backups).
    pub fn namespace(self) -> &'static str {
        match self {
            Self::EtcdBackupS3Config
            | Self::Cluster
            | Self::AgentCredential
            | Self::AdminCredential
            | Self::EtcdBackupEncryptionConfig
            | Self::EtcdRestore => "default",
            Self::EtcdManualBackup | Self::Agent => "ephemeral",
            Self::EtcdBackupOverallStatus | Self::EtcdBackupStatus | Self::EtcdRestoreStatus => "metrics",
            Self::EtcdBackup => "external",
        }
    }

    /// Whether users may `apply`/`delete` this type; the others are written by Ferry itself.
    pub fn user_writable(self) -> bool {
        matches!(
            self,
            Self::EtcdBackupS3Config
                | Self::EtcdManualBackup
                | Self::Cluster
                | Self::EtcdBackupEncryptionConfig
                | Self::EtcdRestore
        )
    }

    /// Parses any case-insensitive singular, plural or full form.
    pub fn parse(name: &str) -> Result<Self, UnknownType> {
        let lower = name.to_ascii_lowercase();
        let bare = lower.strip_suffix(&format!(".{GROUP}")).unwrap_or(&lower);
        Self::ALL
            .into_iter()
            .find(|t| bare == t.singular().to_ascii_lowercase() || bare == t.plural().to_ascii_lowercase())
            .ok_or_else(|| UnknownType(name.to_string()))
    }

    fn known_list() -> String {
        Self::ALL.iter().map(|t| t.full_name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full_name())
    }
}

/// Resource metadata, as the seed product shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub namespace: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub id: String,
    /// Bumped by the coordinator on every change.
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub created: Option<Timestamp>,
    #[serde(default)]
    pub updated: Option<Timestamp>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Metadata {
    pub fn new(rt: ResourceType, id: impl Into<String>) -> Self {
        Self {
            namespace: rt.namespace().to_string(),
            type_name: rt.full_name(),
            id: id.into(),
            version: 0,
            phase: "running".into(),
            created: None,
            updated: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    /// Whether this resource matches a `KEY=VALUE` selector.
    pub fn matches(&self, selector: &Selector) -> bool {
        self.labels.get(&selector.key) == Some(&selector.value)
    }

    /// Refuses labels and annotations beyond [`MAX_LABELS`], [`MAX_LABEL_KEY`], [`MAX_LABEL_VALUE`] and
    /// [`MAX_ANNOTATION_VALUE`]: every listing carries them, so one resource cannot make listings huge.
    pub fn check_sizes(&self) -> Result<(), String> {
        for (what, map, max_value) in
            [("label", &self.labels, MAX_LABEL_VALUE), ("annotation", &self.annotations, MAX_ANNOTATION_VALUE)]
        {
            if map.len() > MAX_LABELS {
                return Err(format!("{} has {} {what}s; at most {MAX_LABELS} are allowed", self.id, map.len()));
            }
            for (k, v) in map {
                if k.is_empty() || k.len() > MAX_LABEL_KEY {
                    return Err(format!(
                        "{} has a {what} key of {} bytes; keys take 1-{MAX_LABEL_KEY} bytes",
                        self.id,
                        k.len()
                    ));
                }
                if v.len() > max_value {
                    return Err(format!(
                        "{} has {what} {k:?} of {} bytes; values take at most {max_value} bytes",
                        self.id,
                        v.len()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Labels (and annotations) per resource.
pub const MAX_LABELS: usize = 32;
/// Bytes of a label or annotation key (Kubernetes: 253-byte prefix + 63-byte name; Ferry's are short).
pub const MAX_LABEL_KEY: usize = 128;
/// Bytes of a label value (Kubernetes allows 63; some room for free text).
pub const MAX_LABEL_VALUE: usize = 256;
/// Bytes of an annotation value: notes, not payloads.
pub const MAX_ANNOTATION_VALUE: usize = 4096;

/// `--selector KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    pub key: String,
    pub value: String,
}

impl std::str::FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok(Self { key: k.to_string(), value: v.to_string() }),
            _ => Err(format!("selector {s:?} is not KEY=VALUE (e.g. {LABEL_CLUSTER}=prod)")),
        }
    }
}

/// `EtcdManualBackups.ferry.dev`: id = cluster; applying it with a fresh `backupat` asks for a backup now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdManualBackupSpec {
    pub backupat: Timestamp,
}

/// Backup status codes, numbered as in the seed product.
pub mod status {
    pub const UNKNOWN: i32 = 0;
    pub const OK: i32 = 1;
    pub const ERROR: i32 = 2;
    pub const RUNNING: i32 = 3;

    pub fn name(code: i32) -> &'static str {
        match code {
            OK => "Ok",
            ERROR => "Error",
            RUNNING => "Running",
            _ => "Unknown",
        }
    }
}

/// `EtcdBackupStatuses.ferry.dev`: id = cluster.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdBackupStatusSpec {
    /// 0 unknown, 1 ok, 2 error, 3 running.
    #[serde(default)]
    pub status: i32,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub lastbackuptime: Option<Timestamp>,
    #[serde(default)]
    pub lastbackupattempt: Option<Timestamp>,
    /// Raw snapshot bytes read so far by the running backup.
    #[serde(default)]
    pub bytesdone: u64,
    /// Member the latest (or running) backup was taken from.
    #[serde(default)]
    pub member: String,
    /// What the running backup is waiting for (no agent of the cluster connected, e.g. while agents move to
    /// a new coordinator leader); empty otherwise.
    #[serde(default)]
    pub waiting: String,
    /// The highest etcd revision an agent of this cluster reported (0: none yet); a restore is bumped
    /// above it so that Kubernetes' watch caches never see a revision twice.
    #[serde(default)]
    pub highestrevision: i64,
    /// When the coordinator first saw [`Self::highestrevision`].
    #[serde(default)]
    pub highestrevisionat: Option<Timestamp>,
    /// The revision floor handed to the members restoring one backup, kept so that they all get the same
    /// bump although restored members report their new, higher revisions in between.
    #[serde(default)]
    pub restoreplan: Option<RestorePlan>,
    /// The latest restore drill (absent before the first).
    #[serde(default)]
    pub drill: Option<DrillStatus>,
    /// The latest check, before a backup, that the members hold the same data.
    #[serde(default)]
    pub membercheck: Option<MemberCheck>,
    /// The change log (absent while point-in-time recovery is off and never was on).
    #[serde(default)]
    pub pointintime: Option<PointInTimeStatus>,
}

/// [`EtcdBackupStatusSpec::pointintime`]: how much of the cluster's history the change log holds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointInTimeStatus {
    #[serde(default)]
    pub enabled: bool,
    /// The member watching now (empty: none).
    #[serde(default)]
    pub watcher: String,
    /// The log's branch: each restore of the cluster starts a new one (the earlier ones stay as they were).
    #[serde(default)]
    pub lineage: u32,
    #[serde(default)]
    pub epoch: u64,
    /// The first revision of the log (the log holds `startrevision..=coveredrevision`, minus the gaps).
    #[serde(default)]
    pub startrevision: i64,
    #[serde(default)]
    pub starttime: Option<Timestamp>,
    /// Every revision up to this one is stored (or was a gap).
    #[serde(default)]
    pub coveredrevision: i64,
    /// When the coordinator learnt that [`Self::coveredrevision`] is covered.
    #[serde(default)]
    pub coveredtime: Option<Timestamp>,
    #[serde(default)]
    pub segments: u64,
    #[serde(default)]
    pub storedbytes: u64,
    /// Revisions lost for good, newest last (at most the last 100).
    #[serde(default)]
    pub gaps: Vec<ChangeLogGap>,
    /// Why the log is not being written right now (no agent, a failed watch); empty while it is.
    #[serde(default)]
    pub error: String,
    /// The latest check of the log against the full backups (absent before the first).
    #[serde(default)]
    pub verification: Option<LogVerification>,
}

/// The check that proves the change log complete: the full backup `tobackup` rebuilt from `frombackup` plus
/// the log's revisions `fromrevision+1..=torevision`, compared key by key (value, create and mod revision,
/// version, lease) with `tobackup` itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogVerification {
    pub time: Option<Timestamp>,
    /// 1 passed, 2 failed (the `status` codes).
    pub result: i32,
    pub frombackup: String,
    pub tobackup: String,
    pub fromrevision: i64,
    pub torevision: i64,
    /// Keys compared.
    #[serde(default)]
    pub keys: u64,
    /// What differs first (a key and how), or why the check could not run.
    #[serde(default)]
    pub error: String,
}

/// A range of revisions the change log lost.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeLogGap {
    pub fromrevision: i64,
    pub torevision: i64,
    pub reason: String,
    pub at: Timestamp,
    /// The full backup taken to close it (empty until one is stored).
    #[serde(default)]
    pub closedby: String,
}

/// Result of a restore drill: the newest backup restored into a throw-away etcd and read back.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillStatus {
    /// When the drill ended.
    #[serde(default)]
    pub time: Option<Timestamp>,
    /// The backup restored.
    #[serde(default)]
    pub backup: String,
    /// 1 ok, 2 error, 4 warning (restored, but far fewer keys than the previous drill read).
    #[serde(default)]
    pub result: i32,
    #[serde(default)]
    pub revision: i64,
    /// Every key the restored etcd holds.
    #[serde(default)]
    pub keys: u64,
    /// Keys per Kubernetes resource (`/registry/<resource>/`).
    #[serde(default)]
    pub resources: BTreeMap<String, u64>,
    #[serde(default)]
    pub durationseconds: f64,
    #[serde(default)]
    pub error: String,
    /// What dropped since the previous drill, when the result is a warning.
    #[serde(default)]
    pub warning: String,
    /// The newest backup that passed a drill without a warning and whose restored key space agrees with
    /// another member's etcd (`agreement`): retention never deletes it.
    #[serde(default)]
    pub lastpassedbackup: String,
    /// Whether the restored key space's etcd hash agrees with another member's (not the backing-up member's),
    /// at which revision; or why it was not compared.
    #[serde(default)]
    pub agreement: String,
    /// When a drill last passed (ok or warning).
    #[serde(default)]
    pub lastsuccesstime: Option<Timestamp>,
    /// The backup of the latest passed drill before this backup's: what the counts are compared with.
    #[serde(default)]
    pub baselinebackup: String,
    #[serde(default)]
    pub baselineresources: BTreeMap<String, u64>,
}

/// Drill results besides the [`status`] codes.
pub const DRILL_WARNING: i32 = 4;

/// The members' key spaces compared with etcd's `HashKV` before a backup.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberCheck {
    #[serde(default)]
    pub time: Option<Timestamp>,
    /// The revision compared at (0: no comparison was possible).
    #[serde(default)]
    pub revision: i64,
    /// Members whose data differs from the majority's; never chosen for a backup.
    #[serde(default)]
    pub diverged: Vec<String>,
    /// Members that did not answer.
    #[serde(default)]
    pub unreachable: Vec<String>,
    /// Why, in words (empty when every answering member agrees).
    #[serde(default)]
    pub message: String,
}

/// See [`EtcdBackupStatusSpec::restoreplan`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestorePlan {
    /// The backup being restored.
    pub backup: String,
    pub highestrevision: i64,
    #[serde(default)]
    pub highestrevisionat: Option<Timestamp>,
    /// When the first member asked; the plan holds for [`RESTORE_PLAN_HOLDS_SECONDS`] after it.
    pub createdat: Timestamp,
    /// The etcd cluster id the cluster's agents reported when the plan was made (0: none known). Seen moving
    /// past `highestrevision` after that, that etcd was not down for a restore: the plan is made anew. A
    /// restored member has a new cluster id, so its bumped revision does not move the plan.
    #[serde(default)]
    pub etcdclusterid: u64,
}

/// How long the members restoring one backup keep getting the same revision floor: long enough for an
/// operator to restore every member of a cluster, short enough that a later restore of the same backup
/// (after the restored cluster served writes) plans anew.
pub const RESTORE_PLAN_HOLDS_SECONDS: i64 = 24 * 3600;

/// `EtcdBackupOverallStatuses.ferry.dev`: id `etcdbackup-overall-status`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdBackupOverallStatusSpec {
    /// `local` or `s3`.
    pub configurationname: String,
    /// Empty when the store is usable.
    #[serde(default)]
    pub configurationerror: String,
    /// The latest per-cluster backup status.
    #[serde(default)]
    pub lastbackupstatus: Option<EtcdBackupStatusSpec>,
    #[serde(default)]
    pub configurationattempt: u32,
}

/// `EtcdBackups.ferry.dev`: one stored backup, read from its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdBackupSpec {
    pub cluster: String,
    pub createdat: Timestamp,
    /// Object key (S3) or path (local store) of the compressed snapshot.
    pub snapshot: String,
    /// Stored (compressed) size in bytes.
    pub size: u64,
    /// Size of etcd's snapshot (database plus trailing hash) in bytes.
    pub rawsize: u64,
    pub member: String,
    pub memberid: String,
    pub etcdclusterid: String,
    pub etcdversion: String,
    /// etcd revision observed when the snapshot began.
    pub revision: i64,
    /// sha256 of the stored (compressed) object.
    pub sha256: String,
    /// sha256 of etcd's snapshot bytes (what `zstd -d` gives back).
    pub rawsha256: String,
    pub zstdlevel: i32,
    pub startedat: Timestamp,
    pub finishedat: Timestamp,
    /// Set when the object is an age file of the zstd stream; null for plain zstd, absent in manifests
    /// written before encryption existed. (Never skipped when null: postcard, on the wire, is not
    /// self-describing.)
    #[serde(default)]
    pub encryption: Option<BackupEncryption>,
    /// Set for a backup the coordinator derived (the state at a point in time, rebuilt from a full backup and
    /// the change log): where it came from. Null for a backup an agent took.
    #[serde(default)]
    pub derivedfrom: Option<DerivedFrom>,
}

/// Where a derived backup came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DerivedFrom {
    /// The full backup the rebuild started from.
    pub backup: String,
    /// Its snapshot's revision, and the revision rebuilt: the change log's revisions in between were applied.
    pub baserevision: i64,
    pub revision: i64,
}

/// How a stored backup is encrypted: what a restore needs and what it checks after decrypting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupEncryption {
    /// The age recipients (X25519 public keys, `age1…`) it is encrypted to: the identity of any one opens it.
    /// A recipient is the public fingerprint of its identity (`age-keygen -y KEYFILE` prints it).
    pub recipients: Vec<String>,
    /// Size of the zstd stream inside (what `age -d` gives back).
    pub zstdsize: u64,
    /// sha256 of that zstd stream.
    pub zstdsha256: String,
}

impl EtcdBackupSpec {
    /// The same backup as the zstd stream inside it: what a reader gets from a coordinator that decrypted it.
    pub fn decrypted(&self) -> Self {
        match &self.encryption {
            Some(e) => Self { size: e.zstdsize, sha256: e.zstdsha256.clone(), encryption: None, ..self.clone() },
            None => self.clone(),
        }
    }
}

impl BackupConfiguration {
    /// Whether it asks for automatic backups (an interval or a schedule). Without either, the rest
    /// (encryption, retention, drills) applies to the cluster's manual backups.
    pub fn is_automatic(&self) -> bool {
        self.interval.is_some() || !self.schedule.trim().is_empty()
    }
}

/// `Clusters.ferry.dev`: id = cluster name. Exists once an agent of the cluster registers.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Automatic backups; `null` or absent turns them off.
    #[serde(default)]
    pub backupconfiguration: Option<BackupConfiguration>,
    /// A new cluster that boots from another cluster's backup (a template's `features.restoreFrom`).
    #[serde(default)]
    pub restorefrom: Option<RestoreFrom>,
}

/// [`ClusterSpec::restorefrom`]: once `members` agents of the new cluster are connected (their gates hold
/// etcd, `ferry-agent gate --start-held`), the coordinator restores them from `cluster`'s `backup`, once.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreFrom {
    pub cluster: String,
    /// A backup id of `cluster`, or `latest`.
    pub backup: String,
    /// How many members the new cluster has: the restore starts once that many agents are connected.
    pub members: u32,
    /// As [`EtcdRestoreSpec::mode`].
    #[serde(default)]
    pub mode: String,
}

/// A duration as the seed product writes it: `{seconds, nanos}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtoDuration {
    pub seconds: i64,
    #[serde(default)]
    pub nanos: i32,
}

/// `spec.backupconfiguration` of a cluster: when to back up automatically and what to keep.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfiguration {
    /// Time between backups (from the newest one). Exactly one of `interval` and `schedule` is set.
    #[serde(default)]
    pub interval: Option<ProtoDuration>,
    /// A 5-field cron expression in UTC, e.g. `0 */6 * * *`.
    #[serde(default)]
    pub schedule: String,
    /// Which backups to keep; absent keeps every backup.
    #[serde(default)]
    pub retention: Option<Retention>,
    /// Time between restore drills of the newest backup; absent: no drills.
    #[serde(default)]
    pub drillinterval: Option<ProtoDuration>,
    /// This cluster's encryption, in place of the `EtcdBackupEncryptionConfigs` one (an empty list of
    /// recipients stores this cluster's backups unencrypted); absent follows that resource.
    #[serde(default)]
    pub encryption: Option<EncryptionSettings>,
    /// The continuous change log between full backups (point-in-time recovery); absent: off.
    #[serde(default)]
    pub pointintime: Option<PointInTime>,
}

/// `spec.backupconfiguration.pointintime`: keep a log of every etcd revision, restorable for `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointInTime {
    #[serde(default)]
    pub enabled: bool,
    /// How far back the log keeps every moment restorable; absent: 7 days.
    #[serde(default)]
    pub window: Option<ProtoDuration>,
}

impl PointInTime {
    pub const DEFAULT_WINDOW_SECONDS: i64 = 7 * 24 * 3600;

    pub fn window_seconds(&self) -> i64 {
        self.window.map_or(Self::DEFAULT_WINDOW_SECONDS, |w| w.seconds)
    }
}

/// Age recipients backups are encrypted to (`EtcdBackupEncryptionConfigs.ferry.dev` spec, and a cluster's
/// `spec.backupconfiguration.encryption`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionSettings {
    /// X25519 recipients (`age1…`, from `ferryctl encryption keygen` or `age-keygen`); any one's identity
    /// opens a backup. Public keys only: no identity is ever given to Ferry through a resource.
    #[serde(default)]
    pub recipients: Vec<String>,
}

/// A retention policy: the newest `keeplast`, plus the newest backup of each of the last `hourly` hours,
/// `daily` days and `weekly` weeks. The newest successful backup is always kept, and so is the newest backup
/// of a second member when everything else kept came from one member (one node's backups are never all
/// that is left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default)]
    pub keeplast: u32,
    #[serde(default)]
    pub hourly: u32,
    #[serde(default)]
    pub daily: u32,
    #[serde(default)]
    pub weekly: u32,
}

/// `Agents.ferry.dev`: id `<cluster>/<member>`, one per agent that ever registered.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    pub cluster: String,
    pub member: String,
    pub connected: bool,
    /// etcd member ID, hex.
    pub memberid: String,
    pub etcdclusterid: String,
    pub etcdversion: String,
    pub dbsize: i64,
    pub raftappliedindex: u64,
    /// The member's etcd revision at the last report.
    #[serde(default)]
    pub revision: i64,
    /// The newest compaction whose key-space hash etcd holds, as the agent saw it happen (0: none yet): the
    /// revision the members' data are compared at without stalling etcd.
    #[serde(default)]
    pub hashedcompaction: i64,
    pub leader: bool,
    /// Empty when the agent reaches its etcd member.
    #[serde(default)]
    pub etcderror: String,
    pub agentversion: String,
    #[serde(default)]
    pub connectedsince: Option<Timestamp>,
    #[serde(default)]
    pub lastheard: Option<Timestamp>,
    pub address: String,
}

/// `AgentCredentials.ferry.dev`: id = the certificate's serial (hex), one per agent certificate ever issued.
/// The coordinator accepts an agent certificate only when it is recorded here and not revoked.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentCredentialSpec {
    pub serial: String,
    pub cluster: String,
    pub member: String,
    pub issuedat: Timestamp,
    pub notafter: Timestamp,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default)]
    pub revokedat: Option<Timestamp>,
    /// The serial this certificate renewed (its predecessor), for a certificate issued by a renewal.
    #[serde(default)]
    pub renewedfrom: Option<String>,
    /// When the agent answered that it saved this renewed certificate: its predecessor is not renewed again.
    #[serde(default)]
    pub savedat: Option<Timestamp>,
    /// When a connection first presented this certificate. A renewed certificate in use revokes its
    /// predecessor.
    #[serde(default)]
    pub firstusedat: Option<Timestamp>,
    /// The successor whose use revoked this certificate: a connection presenting this one afterwards is an
    /// old copy (stolen?), counted in `ferry_agent_predecessor_certificate_used_total`.
    #[serde(default)]
    pub supersededby: Option<String>,
}

/// `AdminCredentials.ferry.dev`: id = the certificate's serial (hex), one per admin certificate (full or
/// read-only) ever issued, the coordinator's own `admin.ferryconfig` included. The coordinator accepts an admin
/// certificate only when it is recorded here and not revoked.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminCredentialSpec {
    pub serial: String,
    /// `ferry://admin-ro` (may only `get`) rather than `ferry://admin`.
    pub readonly: bool,
    pub issuedat: Timestamp,
    pub notafter: Timestamp,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default)]
    pub revokedat: Option<Timestamp>,
}

/// `EtcdBackupS3Configs.ferry.dev` (used by the S3 store).
#[derive(Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdBackupS3ConfigSpec {
    pub bucket: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub endpoint: String,
    #[serde(default)]
    pub accesskeyid: String,
    #[serde(default)]
    pub secretaccesskey: String,
    #[serde(default)]
    pub sessiontoken: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub cacert: String,
}

/// What `get` shows in place of a secret.
pub const REDACTED: &str = "***";

impl EtcdBackupS3ConfigSpec {
    /// A copy fit to show: secrets replaced by `***`.
    pub fn redacted(&self) -> Self {
        let hide = |s: &str| if s.is_empty() { String::new() } else { REDACTED.to_string() };
        Self { secretaccesskey: hide(&self.secretaccesskey), sessiontoken: hide(&self.sessiontoken), ..self.clone() }
    }
}

impl fmt::Debug for EtcdBackupS3ConfigSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.redacted();
        f.debug_struct("EtcdBackupS3ConfigSpec")
            .field("bucket", &r.bucket)
            .field("region", &r.region)
            .field("endpoint", &r.endpoint)
            .field("accesskeyid", &r.accesskeyid)
            .field("secretaccesskey", &r.secretaccesskey)
            .field("sessiontoken", &r.sessiontoken)
            .field("prefix", &r.prefix)
            .finish_non_exhaustive()
    }
}

/// `EtcdRestores.ferry.dev` (namespace `default`, id = cluster): restore the whole cluster from one backup.
/// Immutable once created; the coordinator carries it out and reports in [`EtcdRestoreStatusSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdRestoreSpec {
    /// A backup id of this cluster, or `latest` (the newest; with `before`, the newest taken before it).
    pub backup: String,
    /// With `latest`: the newest backup created before this time.
    #[serde(default)]
    pub before: Option<Timestamp>,
    /// `all-members` (every member restored from the snapshot with one new cluster token) or `seed-join`
    /// (one member restored, the others added back as learners and promoted). Empty: `seed-join`.
    #[serde(default)]
    pub mode: String,
    /// Members whose agents cannot answer and that the operator declares gone: left out of the plan.
    #[serde(default)]
    pub lostmembers: Vec<String>,
    /// The cluster's name: required while a majority of its members is healthy (what would be lost is in
    /// the refusal).
    #[serde(default)]
    pub confirm: String,
    /// `replace-member` only: the member whose data dir is replaced by a fresh copy from the others.
    #[serde(default)]
    pub member: String,
    /// The cluster whose backup is restored, when not this one: allowed only into a cluster whose spec says
    /// `restorefrom` that cluster.
    #[serde(default)]
    pub fromcluster: String,
}

/// The restore modes [`EtcdRestoreSpec::mode`] takes.
pub mod restore_mode {
    pub const ALL_MEMBERS: &str = "all-members";
    pub const SEED_JOIN: &str = "seed-join";
    /// Not a restore from a backup: one member removed, wiped and added back (`ferryctl member replace`).
    pub const REPLACE_MEMBER: &str = "replace-member";
}

/// Phases of a restore, in order ([`EtcdRestoreStatusSpec::phase`]).
pub mod restore_phase {
    /// Accepted, not planned yet (waiting for agents to describe their members).
    pub const PENDING: &str = "pending";
    pub const PLANNED: &str = "planned";
    pub const HOLDING: &str = "holding";
    pub const RESTORING: &str = "restoring";
    pub const JOINING: &str = "joining";
    pub const VERIFYING: &str = "verifying";
    pub const DONE: &str = "done";
    pub const FAILED: &str = "failed";

    /// Whether a restore in this phase is over.
    pub fn is_final(phase: &str) -> bool {
        phase == DONE || phase == FAILED
    }
}

/// `EtcdRestoreStatuses.ferry.dev` (namespace `metrics`, id = cluster): how the cluster's restore goes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdRestoreStatusSpec {
    /// The restore this status is about (the plan's id; empty until planned).
    #[serde(default)]
    pub restoreid: String,
    /// See [`restore_phase`].
    #[serde(default)]
    pub phase: String,
    /// What the restore waits for right now, in words (an agent not answering, etcd not healthy yet).
    #[serde(default)]
    pub waiting: String,
    /// Why the restore failed, and what state the members are left in.
    #[serde(default)]
    pub error: String,
    /// Fixed once, before anything is touched; never recomputed.
    #[serde(default)]
    pub plan: Option<RestorePlanned>,
    #[serde(default)]
    pub members: Vec<MemberRestoreStatus>,
    #[serde(default)]
    pub startedat: Option<Timestamp>,
    #[serde(default)]
    pub finishedat: Option<Timestamp>,
    /// What verification found (absent until it passed).
    #[serde(default)]
    pub verified: Option<RestoreVerified>,
}

/// The plan of one restore.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestorePlanned {
    pub restoreid: String,
    pub mode: String,
    /// The backup restored (resolved: never `latest`).
    pub backup: String,
    /// The revision etcd reported when the backup began.
    pub backuprevision: i64,
    /// Its key count, from a drill of that backup (0: never drilled, not compared).
    pub backupkeys: u64,
    /// Agent member names, in order; the first is the seed.
    pub members: Vec<PlannedMember>,
    pub lostmembers: Vec<String>,
    pub initialclustertoken: String,
    /// `--initial-cluster` of the restored cluster (in `seed-join`: the seed alone).
    pub initialcluster: String,
    /// The highest revision the cluster was seen at, and the bump above it.
    pub highestrevision: i64,
    pub bumpby: u64,
    pub createdat: Timestamp,
    /// `replace-member`: the serving member that removes, adds and promotes the replaced one.
    #[serde(default)]
    pub helper: String,
    /// The cluster the backup belongs to (a new cluster restored from another's backup).
    #[serde(default)]
    pub backupcluster: String,
}

/// A member as planned: the agent's member name and etcd's own name and peer URLs (from its gate).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedMember {
    pub member: String,
    pub etcdname: String,
    pub peerurls: String,
}

/// One member's progress through a restore.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRestoreStatus {
    pub member: String,
    /// The last step done: `held`, `removed`, `wiped`, `rebuilt`, `added`, `started`, `joined`, `released`.
    #[serde(default)]
    pub step: String,
    /// Backup bytes the member fetched so far.
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub error: String,
}

/// What a passed verification saw: every member at one revision with one hash and key count.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreVerified {
    pub etcdclusterid: String,
    pub revision: i64,
    pub hash: u32,
    pub keys: u64,
    pub time: Option<Timestamp>,
}

/// A resource's spec, typed by its resource type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Spec {
    EtcdBackupS3Config(EtcdBackupS3ConfigSpec),
    EtcdBackupOverallStatus(EtcdBackupOverallStatusSpec),
    EtcdBackupStatus(EtcdBackupStatusSpec),
    EtcdManualBackup(EtcdManualBackupSpec),
    EtcdBackup(EtcdBackupSpec),
    Cluster(ClusterSpec),
    Agent(AgentSpec),
    AgentCredential(AgentCredentialSpec),
    EtcdBackupEncryptionConfig(EncryptionSettings),
    AdminCredential(AdminCredentialSpec),
    EtcdRestore(EtcdRestoreSpec),
    EtcdRestoreStatus(EtcdRestoreStatusSpec),
}

impl Spec {
    pub fn resource_type(&self) -> ResourceType {
        match self {
            Self::EtcdBackupS3Config(_) => ResourceType::EtcdBackupS3Config,
            Self::EtcdBackupOverallStatus(_) => ResourceType::EtcdBackupOverallStatus,
            Self::EtcdBackupStatus(_) => ResourceType::EtcdBackupStatus,
            Self::EtcdManualBackup(_) => ResourceType::EtcdManualBackup,
            Self::EtcdBackup(_) => ResourceType::EtcdBackup,
            Self::Cluster(_) => ResourceType::Cluster,
            Self::Agent(_) => ResourceType::Agent,
            Self::AgentCredential(_) => ResourceType::AgentCredential,
            Self::EtcdBackupEncryptionConfig(_) => ResourceType::EtcdBackupEncryptionConfig,
            Self::AdminCredential(_) => ResourceType::AdminCredential,
            Self::EtcdRestore(_) => ResourceType::EtcdRestore,
            Self::EtcdRestoreStatus(_) => ResourceType::EtcdRestoreStatus,
        }
    }

    /// The spec alone, as a JSON value (what YAML/JSON output shows under `spec`).
    pub fn to_value(&self) -> serde_json::Value {
        let v = match self {
            Self::EtcdBackupS3Config(s) => serde_json::to_value(s),
            Self::EtcdBackupOverallStatus(s) => serde_json::to_value(s),
            Self::EtcdBackupStatus(s) => serde_json::to_value(s),
            Self::EtcdManualBackup(s) => serde_json::to_value(s),
            Self::EtcdBackup(s) => serde_json::to_value(s),
            Self::Cluster(s) => serde_json::to_value(s),
            Self::Agent(s) => serde_json::to_value(s),
            Self::AgentCredential(s) => serde_json::to_value(s),
            Self::EtcdBackupEncryptionConfig(s) => serde_json::to_value(s),
            Self::AdminCredential(s) => serde_json::to_value(s),
            Self::EtcdRestore(s) => serde_json::to_value(s),
            Self::EtcdRestoreStatus(s) => serde_json::to_value(s),
        };
        v.unwrap_or(serde_json::Value::Null)
    }

    fn from_value(rt: ResourceType, v: serde_json::Value) -> Result<Self, serde_json::Error> {
        Ok(match rt {
            ResourceType::EtcdBackupS3Config => Self::EtcdBackupS3Config(serde_json::from_value(v)?),
            ResourceType::EtcdBackupOverallStatus => Self::EtcdBackupOverallStatus(serde_json::from_value(v)?),
            ResourceType::EtcdBackupStatus => Self::EtcdBackupStatus(serde_json::from_value(v)?),
            ResourceType::EtcdManualBackup => Self::EtcdManualBackup(serde_json::from_value(v)?),
            ResourceType::EtcdBackup => Self::EtcdBackup(serde_json::from_value(v)?),
            ResourceType::Cluster => Self::Cluster(serde_json::from_value(v)?),
            ResourceType::Agent => Self::Agent(serde_json::from_value(v)?),
            ResourceType::AgentCredential => Self::AgentCredential(serde_json::from_value(v)?),
            ResourceType::EtcdBackupEncryptionConfig => Self::EtcdBackupEncryptionConfig(serde_json::from_value(v)?),
            ResourceType::AdminCredential => Self::AdminCredential(serde_json::from_value(v)?),
            ResourceType::EtcdRestore => Self::EtcdRestore(serde_json::from_value(v)?),
            ResourceType::EtcdRestoreStatus => Self::EtcdRestoreStatus(serde_json::from_value(v)?),
        })
    }
}

/// One resource: metadata plus typed spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub metadata: Metadata,
    pub spec: Spec,
}

/// A YAML/JSON document could not be read as a Ferry resource.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("document {doc}: not valid YAML: {error}")]
    Yaml { doc: usize, error: serde_yaml_ng::Error },
    #[error("document {doc}: {msg}")]
    Shape { doc: usize, msg: String },
    #[error("document {doc}: {error}")]
    UnknownType { doc: usize, error: UnknownType },
    #[error("document {doc} ({rt} {id:?}): invalid spec: {error}")]
    Spec { doc: usize, rt: ResourceType, id: String, error: serde_json::Error },
    #[error("no resources in input; expected YAML documents with `metadata` and `spec`")]
    Empty,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    metadata: RawMetadata,
    #[serde(default)]
    spec: serde_json::Value,
}

#[derive(Deserialize)]
struct RawMetadata {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(rename = "type")]
    type_name: String,
    id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    // version, phase, created, updated, owner: written by Ferry; accepted so `get -o yaml` output re-applies.
    #[serde(flatten)]
    _rest: BTreeMap<String, serde_json::Value>,
}

impl Resource {
    pub fn new(id: impl Into<String>, spec: Spec) -> Self {
        Self { metadata: Metadata::new(spec.resource_type(), id), spec }
    }

    pub fn resource_type(&self) -> ResourceType {
        self.spec.resource_type()
    }

    /// The resource as users see it: `{metadata, spec}` with the spec untagged.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::json!({ "metadata": self.metadata, "spec": self.spec.to_value() })
    }

    /// Parses a multi-document YAML (or JSON) text into resources, checking each document's type and spec.
    pub fn parse_documents(text: &str) -> Result<Vec<Resource>, ParseError> {
        let mut out = Vec::new();
        for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let doc = i + 1;
            let value = serde_yaml_ng::Value::deserialize(de).map_err(|error| ParseError::Yaml { doc, error })?;
            if value.is_null() {
                continue; // an empty document, e.g. a trailing `---`
            }
            let raw: RawResource = serde_yaml_ng::from_value(value).map_err(|e| ParseError::Shape {
                doc,
                msg: format!("not a Ferry resource ({e}); expected `metadata: {{type, id}}` and `spec`"),
            })?;
            let rt =
                ResourceType::parse(&raw.metadata.type_name).map_err(|error| ParseError::UnknownType { doc, error })?;
            if let Some(ns) = &raw.metadata.namespace {
                if ns != rt.namespace() {
                    return Err(ParseError::Shape {
                        doc,
                        msg: format!(
                            "{rt} lives in namespace {:?}, not {ns:?}: set `metadata.namespace: {}` (or leave it out)",
                            rt.namespace(),
                            rt.namespace()
                        ),
                    });
                }
            }
            let id = raw.metadata.id;
            let spec =
                Spec::from_value(rt, raw.spec).map_err(|error| ParseError::Spec { doc, rt, id: id.clone(), error })?;
            let mut metadata = Metadata::new(rt, id);
            metadata.labels = raw.metadata.labels;
            metadata.annotations = raw.metadata.annotations;
            metadata.check_sizes().map_err(|msg| ParseError::Shape { doc, msg })?;
            out.push(Resource { metadata, spec });
        }
        if out.is_empty() {
            return Err(ParseError::Empty);
        }
        Ok(out)
    }
}

/// A cluster or member name is not usable.
#[derive(Debug, thiserror::Error)]
#[error("invalid {what} name {name:?}: use 1-63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit")]
pub struct InvalidName {
    pub what: &'static str,
    pub name: String,
}

/// Checks a backup id (`<cluster>-<unix seconds>[-N]`, or `latest`) before it becomes part of a path or key:
/// the name rule, with room for the suffix.
pub fn validate_backup_id(id: &str) -> Result<(), InvalidName> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id.as_bytes()[id.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(InvalidName { what: "backup id", name: id.to_string() })
    }
}

/// Checks a cluster or member name: DNS-label-like, because it becomes part of object keys and certificate SANs.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(InvalidName { what, name: name.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_past_year_9999_or_before_1970_print_without_panicking() {
        assert_eq!(Timestamp { seconds: 0, nanos: 0 }.human(), "1970-01-01 00:00:00 UTC");
        assert_eq!(Timestamp { seconds: 253_402_300_800, nanos: 0 }.human(), "253402300800s since 1970");
        assert_eq!(Timestamp { seconds: i64::MAX, nanos: 0 }.human(), format!("{}s since 1970", i64::MAX));
        assert_eq!(Timestamp { seconds: -5, nanos: 0 }.human(), "-5s since 1970");
    }

    #[test]
    fn type_names_parse_in_every_form() {
        for s in ["etcdbackupstatus", "EtcdBackupStatuses", "etcdbackupstatuses.ferry.dev", "ETCDBACKUPSTATUS"] {
            assert_eq!(ResourceType::parse(s).unwrap(), ResourceType::EtcdBackupStatus, "{s}");
        }
        assert_eq!(ResourceType::parse("agents").unwrap(), ResourceType::Agent);
        let e = ResourceType::parse("pods").unwrap_err().to_string();
        assert!(e.contains("unknown resource type \"pods\"") && e.contains("Clusters.ferry.dev"), "{e}");
    }

    #[test]
    fn manual_backup_document_parses() {
        let text = "metadata:\n  namespace: ephemeral\n  type: EtcdManualBackups.ferry.dev\n  id: prod\nspec:\n  backupat:\n    seconds: 1700000000\n    nanos: 0\n---\n";
        let rs = Resource::parse_documents(text).unwrap();
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].metadata.id, "prod");
        assert_eq!(
            rs[0].spec,
            Spec::EtcdManualBackup(EtcdManualBackupSpec { backupat: Timestamp { seconds: 1_700_000_000, nanos: 0 } })
        );
    }

    /// The seed's documented YAML, with `omni.sidero.dev` replaced by `ferry.dev`, applies as written.
    #[test]
    fn seed_documented_yaml_parses() {
        let manual = "metadata:\n  namespace: ephemeral\n  type: EtcdManualBackups.ferry.dev\n  id: talos-default\n\
                      spec:\n  backupat:\n    seconds: 1701163200\n    nanos: 0\n";
        assert_eq!(Resource::parse_documents(manual).unwrap()[0].resource_type(), ResourceType::EtcdManualBackup);
        let s3 =
            "metadata:\n  namespace: default\n  type: EtcdBackupS3Configs.ferry.dev\n  id: etcd-backup-s3-conf\n  \
                  version: undefined\n  owner:\n  phase: running\n  created: 2023-12-12T17:43:12+00:00\n  \
                  updated: 2023-12-12T17:43:12+00:00\nspec:\n  bucket: mybucket\n  region: us-east-1\n  \
                  endpoint: http://127.0.0.1:9000\n  accesskeyid: access\n  secretaccesskey: secret123\n  \
                  sessiontoken: \"\"\n";
        assert_eq!(Resource::parse_documents(s3).unwrap()[0].resource_type(), ResourceType::EtcdBackupS3Config);
    }

    #[test]
    fn wrong_namespace_names_the_right_one() {
        let e = Resource::parse_documents(
            "metadata: {namespace: default, type: EtcdManualBackups.ferry.dev, id: x}\nspec: {backupat: {seconds: 1, nanos: 0}}",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("lives in namespace \"ephemeral\", not \"default\"")
                && e.contains("metadata.namespace: ephemeral"),
            "{e}"
        );
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        let e = Resource::parse_documents("metadata: [").unwrap_err().to_string();
        assert!(e.contains("not valid YAML"), "{e}");
        let e = Resource::parse_documents("metadata: {type: Pods, id: x}\nspec: {}").unwrap_err().to_string();
        assert!(e.contains("unknown resource type"), "{e}");
        let e = Resource::parse_documents("metadata: {type: EtcdManualBackups.ferry.dev, id: x}\nspec: {backupAt: 1}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid spec") && e.contains("backupAt"), "{e}");
        assert!(matches!(Resource::parse_documents("---\n"), Err(ParseError::Empty)));
    }

    #[test]
    fn get_output_reapplies() {
        let mut r = Resource::new("prod", Spec::Cluster(ClusterSpec::default()));
        r.metadata.version = 3;
        r.metadata.created = Some(Timestamp::now());
        let yaml = serde_yaml_ng::to_string(&r.to_value()).unwrap();
        let back = Resource::parse_documents(&yaml).unwrap();
        assert_eq!(back[0].spec, r.spec);
    }

    #[test]
    fn s3_secrets_are_redacted_in_debug() {
        let s = EtcdBackupS3ConfigSpec {
            bucket: "b".into(),
            secretaccesskey: "hunter2".into(),
            sessiontoken: "tok".into(),
            ..Default::default()
        };
        let d = format!("{s:?}");
        assert!(!d.contains("hunter2") && !d.contains("tok\"") && d.contains("***"), "{d}");
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("cluster", "prod-eu1").is_ok());
        assert!(validate_name("cluster", "Prod").is_err());
        assert!(validate_name("cluster", "a/b").is_err());
        assert!(validate_name("cluster", "").is_err());
        assert!(validate_name("cluster", "-a").is_err());
    }
}
