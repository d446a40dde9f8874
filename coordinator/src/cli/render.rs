//! ferryctl's library half: rendering resources as table, YAML or JSON.

use std::time::Duration;

use anyhow::Result;
use ferry_common::resources::{
    restore_mode, status, BackupConfiguration, DrillStatus, Resource, ResourceType, Spec, Timestamp, DRILL_WARNING,
};

/// Output formats of `get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
}

/// Renders resources; `single` when one ID was asked for (JSON then prints an object, not an array).
pub fn render(rt: ResourceType, resources: &[Resource], format: Format, single: bool) -> Result<String> {
    Ok(match format {
        Format::Json => {
            let values: Vec<_> = resources.iter().map(Resource::to_value).collect();
            let mut s = if single && values.len() == 1 {
                serde_json::to_string_pretty(&values[0])?
            } else {
                serde_json::to_string_pretty(&values)?
            };
            s.push('\n');
            s
        }
        Format::Yaml => {
            let mut s = String::new();
            for (i, r) in resources.iter().enumerate() {
                if i > 0 {
                    s.push_str("---\n");
                }
                s.push_str(&serde_yaml_ng::to_string(&r.to_value())?);
            }
            s
        }
        Format::Table => table(rt, resources),
    })
}

fn ts(t: &Option<Timestamp>) -> String {
    t.map(|t| t.human()).unwrap_or_else(|| "-".into())
}

fn bytes(n: u64) -> String {
    ferry_common::progress::human_bytes(n)
}

/// A cluster's automatic backups in one cell: the interval, the cron schedule, or `off`.
fn backup_schedule(b: Option<&BackupConfiguration>) -> String {
    let Some(b) = b else { return "off".into() };
    if let Some(i) = b.interval {
        return humantime::format_duration(Duration::from_secs(i.seconds.max(0) as u64)).to_string();
    }
    match b.schedule.trim() {
        "" => "off".into(),
        cron => format!("cron {cron:?}"),
    }
}

/// A drill's result in a word, with its error or warning.
fn drill_result(d: &DrillStatus) -> String {
    match d.result {
        status::OK => "Ok".into(),
        status::ERROR => format!("Error: {}", d.error),
        DRILL_WARNING => format!("Warning: {}", d.warning),
        _ => "Unknown".into(),
    }
}

fn table(rt: ResourceType, resources: &[Resource]) -> String {
    let header: Vec<&str> = match rt {
        ResourceType::EtcdBackupStatus => {
            vec![
                "ID",
                "STATUS",
                "ERROR",
                "LAST BACKUP TIME",
                "LAST BACKUP ATTEMPT",
                "BYTES DONE",
                "LAST DRILL",
                "DRILL",
                "DRILL KEYS",
                "DIVERGED MEMBERS",
            ]
        }
        ResourceType::EtcdBackupOverallStatus => vec![
            "ID",
            "CONFIGURATION NAME",
            "CONFIGURATION ERROR",
            "LAST BACKUP STATUS",
            "LAST BACKUP ERROR",
            "LAST BACKUP TIME",
            "CONFIGURATION ATTEMPT",
        ],
        ResourceType::EtcdManualBackup => vec!["ID", "BACKUP AT"],
        ResourceType::EtcdBackup => {
            vec!["ID", "CLUSTER", "CREATED AT", "SIZE", "RAW SIZE", "MEMBER", "REVISION", "SHA256", "ENCRYPTED"]
        }
        ResourceType::EtcdBackupEncryptionConfig => vec!["ID", "RECIPIENTS"],
        ResourceType::Cluster => vec!["ID", "BACKUP INTERVAL", "DRILL INTERVAL"],
        ResourceType::Agent => {
            vec![
                "ID",
                "CONNECTED",
                "LEADER",
                "MEMBER ID",
                "ETCD VERSION",
                "AGENT VERSION",
                "DB SIZE",
                "APPLIED INDEX",
                "CONNECTED SINCE",
                "LAST HEARD",
                "ERROR",
            ]
        }
        ResourceType::AgentCredential => vec!["ID", "CLUSTER", "MEMBER", "ISSUED AT", "NOT AFTER", "REVOKED"],
        ResourceType::AdminCredential => vec!["ID", "ACCESS", "ISSUED AT", "NOT AFTER", "REVOKED"],
        ResourceType::EtcdBackupS3Config => {
            vec!["ID", "BUCKET", "REGION", "ENDPOINT", "PREFIX", "ACCESS KEY ID", "SECRET ACCESS KEY"]
        }
        ResourceType::EtcdRestore => vec!["ID", "BACKUP", "BEFORE", "MODE", "LOST MEMBERS"],
        ResourceType::EtcdRestoreStatus => {
            vec!["ID", "RESTORE", "PHASE", "BACKUP", "MEMBERS", "STARTED AT", "FINISHED AT", "WAITING", "ERROR"]
        }
    };
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in resources {
        let id = r.metadata.id.clone();
        rows.push(match &r.spec {
            Spec::EtcdBackupStatus(s) => vec![
                id,
                status::name(s.status).into(),
                s.error.clone(),
                ts(&s.lastbackuptime),
                ts(&s.lastbackupattempt),
                bytes(s.bytesdone),
                s.drill.as_ref().map_or_else(String::new, |d| ts(&d.time)),
                s.drill.as_ref().map_or_else(String::new, drill_result),
                s.drill.as_ref().filter(|d| d.result != status::ERROR).map_or_else(String::new, |d| d.keys.to_string()),
                s.membercheck.as_ref().map_or_else(String::new, |m| m.diverged.join(",")),
            ],
            Spec::EtcdBackupOverallStatus(s) => {
                let last = s.lastbackupstatus.clone().unwrap_or_default();
                vec![
                    id,
                    s.configurationname.clone(),
                    s.configurationerror.clone(),
                    status::name(last.status).into(),
                    last.error,
                    ts(&last.lastbackuptime),
                    s.configurationattempt.to_string(),
                ]
            }
            Spec::EtcdManualBackup(s) => vec![id, s.backupat.human()],
            Spec::EtcdBackup(s) => vec![
                id,
                s.cluster.clone(),
                s.createdat.human(),
                bytes(s.size),
                bytes(s.rawsize),
                s.member.clone(),
                s.revision.to_string(),
                s.sha256.chars().take(12).collect(),
                s.encryption.as_ref().map_or_else(|| "no".into(), |e| format!("{} recipients", e.recipients.len())),
            ],
            Spec::EtcdBackupEncryptionConfig(s) => vec![id, s.recipients.join(",")],
            Spec::Cluster(s) => vec![
                id,
                backup_schedule(s.backupconfiguration.as_ref()),
                s.backupconfiguration.as_ref().and_then(|b| b.drillinterval).map_or_else(String::new, |d| {
                    humantime::format_duration(std::time::Duration::from_secs(d.seconds.max(0) as u64)).to_string()
                }),
            ],
            Spec::Agent(s) => vec![
                id,
                s.connected.to_string(),
                s.leader.to_string(),
                s.memberid.clone(),
                s.etcdversion.clone(),
                s.agentversion.clone(),
                bytes(s.dbsize.max(0) as u64),
                s.raftappliedindex.to_string(),
                ts(&s.connectedsince),
                ts(&s.lastheard),
                s.etcderror.clone(),
            ],
            Spec::AgentCredential(s) => vec![
                id,
                s.cluster.clone(),
                s.member.clone(),
                s.issuedat.human(),
                s.notafter.human(),
                s.revokedat.map_or_else(|| "no".to_string(), |t| t.human()),
            ],
            Spec::AdminCredential(s) => vec![
                id,
                if s.readonly { "read-only" } else { "full" }.to_string(),
                s.issuedat.human(),
                s.notafter.human(),
                s.revokedat.map_or_else(|| "no".to_string(), |t| t.human()),
            ],
            Spec::EtcdBackupS3Config(s) => {
                let s = s.redacted();
                vec![id, s.bucket, s.region, s.endpoint, s.prefix, s.accesskeyid, s.secretaccesskey]
            }
            Spec::EtcdRestore(s) => vec![
                id,
                s.backup.clone(),
                ts(&s.before),
                if s.mode.is_empty() { restore_mode::SEED_JOIN.to_string() } else { s.mode.clone() },
                s.lostmembers.join(","),
            ],
            Spec::EtcdRestoreStatus(s) => vec![
                id,
                s.restoreid.clone(),
                s.phase.clone(),
                s.plan.as_ref().map_or_else(String::new, |p| p.backup.clone()),
                s.members.iter().map(|m| format!("{}:{}", m.member, m.step)).collect::<Vec<_>>().join(","),
                ts(&s.startedat),
                ts(&s.finishedat),
                s.waiting.clone(),
                s.error.clone(),
            ],
        });
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().enumerate().map(|(i, cell)| format!("{cell:<w$}", w = widths[i])).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use ferry_common::resources::{ClusterSpec, ProtoDuration};

    use super::*;

    fn cluster(b: Option<BackupConfiguration>) -> Resource {
        Resource::new("c", Spec::Cluster(ClusterSpec { backupconfiguration: b, restorefrom: None }))
    }

    #[test]
    fn get_clusters_shows_interval_cron_or_off() {
        let every =
            BackupConfiguration { interval: Some(ProtoDuration { seconds: 3600, nanos: 0 }), ..Default::default() };
        let cron = BackupConfiguration { schedule: "0 */6 * * *".into(), ..Default::default() };
        let rs = [cluster(Some(every)), cluster(Some(cron)), cluster(None)];
        let out = table(ResourceType::Cluster, &rs);
        let rows: Vec<&str> = out.lines().skip(1).map(|l| l.split_once("   ").map_or("", |(_, v)| v.trim())).collect();
        assert_eq!(rows, ["1h", "cron \"0 */6 * * *\"", "off"], "{out}");
    }
}
