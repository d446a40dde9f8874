//! ferryctl's library half: rendering resources as table, YAML or JSON.

use std::time::Duration;

use anyhow::Result;
use ferry_common::resources::{
    restore_mode, status, BackupConfiguration, DrillStatus, PointInTimeStatus, Resource, ResourceType, Spec, Timestamp,
    DRILL_WARNING,
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
    render_with_statuses(rt, resources, format, single, None)
}

/// [`render`], with the clusters' EtcdBackupStatuses at hand: a `get cluster` table then shows how far each
/// cluster's change log covers (the coordinator keeps that in the status, not on the cluster).
pub fn render_with_statuses(
    rt: ResourceType,
    resources: &[Resource],
    format: Format,
    single: bool,
    statuses: Option<&[Resource]>,
) -> Result<String> {
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
        Format::Table => table(rt, resources, statuses, Timestamp::now()),
    })
}

/// `ferryctl ca status` (and the answer to a rotation step).
pub fn ca_status(st: &ferry_common::protocol::CaStatus, format: Format) -> Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(st)? + "\n",
        Format::Yaml => serde_yaml_ng::to_string(st)?,
        Format::Table => {
            let mut s = String::new();
            if !st.message.is_empty() {
                s.push_str(&format!("{}\n\n", st.message));
            }
            let ca = |c: &ferry_common::protocol::CaInfo| {
                format!("{} (serial {}, valid until {})", c.name, c.serial, c.notafter.human())
            };
            s.push_str(&format!("CURRENT  {}\n", ca(&st.current)));
            match (&st.next, &st.rotatingsince) {
                (Some(next), since) => {
                    s.push_str(&format!("NEXT     {} — rotating since {}\n", ca(next), ts(since)));
                    if st.membersonoldca.is_empty() {
                        s.push_str("no member is on the old CA: `ferryctl ca rotate finish` locks nobody out\n");
                    } else {
                        s.push_str(&format!("members on the old CA: {}\n", st.membersonoldca.join(", ")));
                    }
                    if !st.adminsonoldca.is_empty() {
                        s.push_str(&format!(
                            "admin certificates of the old CA (they stop working at finish): {}\n",
                            st.adminsonoldca.join(", ")
                        ));
                    }
                }
                (None, _) => s.push_str("no rotation under way\n"),
            }
            s
        }
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

fn duration(seconds: i64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0) as u64)).to_string()
}

/// How long ago, in its two largest units (`12s`, `5m 3s`, `2h 10m`, `3d 4h`): enough to read at a glance.
fn ago(then: Timestamp, now: Timestamp) -> String {
    const UNITS: [(&str, i64); 4] = [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)];
    let secs = (now.seconds - then.seconds).max(0);
    let i = UNITS.iter().position(|&(_, u)| secs >= u).unwrap_or(UNITS.len() - 1);
    let (big, b) = UNITS[i];
    let first = format!("{}{big}", secs / b);
    match UNITS.get(i + 1) {
        Some(&(small, s)) if secs % b / s > 0 => format!("{first} {}{small}", secs % b / s),
        _ => first,
    }
}

/// A change log's status while it is on; `None` when it is off (or never was on).
fn log_on(s: &Option<PointInTimeStatus>) -> Option<&PointInTimeStatus> {
    s.as_ref().filter(|p| p.enabled)
}

/// How far a change log covers: `rev 1234 (12s ago)`, or `-` while nothing is.
fn covered(p: &PointInTimeStatus, now: Timestamp) -> String {
    match (p.coveredrevision, p.coveredtime) {
        (0, _) => "-".into(),
        (rev, Some(t)) => format!("rev {rev} ({} ago)", ago(t, now)),
        (rev, None) => format!("rev {rev}"),
    }
}

/// A change log's gaps: their count, with how many no full backup has closed yet.
fn gaps(p: &PointInTimeStatus) -> String {
    let open = p.gaps.iter().filter(|g| g.closedby.is_empty()).count();
    match (p.gaps.len(), open) {
        (n, 0) => n.to_string(),
        (n, open) => format!("{n} ({open} open)"),
    }
}

/// A cluster's change-log cells: its window (`off`, `7d`) and how far it covers, from the cluster's
/// status; the second is empty when the statuses were not read.
fn cluster_point_in_time(
    id: &str,
    b: Option<&BackupConfiguration>,
    statuses: Option<&[Resource]>,
    now: Timestamp,
) -> [String; 2] {
    let Some(p) = b.and_then(|b| b.pointintime).filter(|p| p.enabled) else { return ["off".into(), String::new()] };
    let cover = statuses.map_or_else(String::new, |all| {
        let status = all.iter().find_map(|r| match &r.spec {
            Spec::EtcdBackupStatus(s) if r.metadata.id == id => log_on(&s.pointintime),
            _ => None,
        });
        match status {
            Some(s) if s.coveredrevision == 0 && !s.error.is_empty() => format!("- ({})", s.error),
            Some(s) => covered(s, now),
            None => "-".into(),
        }
    });
    [duration(p.window_seconds()), cover]
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

fn table(rt: ResourceType, resources: &[Resource], statuses: Option<&[Resource]>, now: Timestamp) -> String {
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
                "LOG COVERED",
                "LOG LAG",
                "LOG GAPS",
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
        ResourceType::Cluster => vec!["ID", "BACKUP INTERVAL", "DRILL INTERVAL", "POINT-IN-TIME", "COVERED"],
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
                log_on(&s.pointintime).map_or_else(|| "off".into(), |p| covered(p, now)),
                log_on(&s.pointintime)
                    .and_then(|p| p.coveredtime.filter(|_| p.coveredrevision > 0))
                    .map_or_else(String::new, |t| ago(t, now)),
                log_on(&s.pointintime).map_or_else(String::new, gaps),
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
            Spec::Cluster(s) => {
                let b = s.backupconfiguration.as_ref();
                let [window, cover] = cluster_point_in_time(&id, b, statuses, now);
                vec![
                    id,
                    backup_schedule(b),
                    b.and_then(|b| b.drillinterval).map_or_else(String::new, |d| duration(d.seconds)),
                    window,
                    cover,
                ]
            }
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
    use ferry_common::resources::{ChangeLogGap, ClusterSpec, EtcdBackupStatusSpec, PointInTime, ProtoDuration};

    use super::*;

    const NOW: Timestamp = Timestamp { seconds: 1_796_617_200, nanos: 0 };

    /// The cells of a table's rows (header left out), split on the column gaps.
    fn cells(out: &str) -> Vec<Vec<String>> {
        let header = out.lines().next().unwrap_or_default();
        let starts: Vec<usize> = header
            .char_indices()
            .filter(|&(i, c)| c != ' ' && (i == 0 || header[..i].ends_with("   ")))
            .map(|(i, _)| i)
            .collect();
        out.lines()
            .skip(1)
            .map(|l| {
                let chars: Vec<char> = l.chars().collect();
                (0..starts.len())
                    .map(|c| {
                        let end = starts.get(c + 1).copied().unwrap_or(chars.len()).min(chars.len());
                        chars[starts[c].min(chars.len())..end].iter().collect::<String>().trim().to_string()
                    })
                    .collect()
            })
            .collect()
    }

    fn cluster(b: Option<BackupConfiguration>) -> Resource {
        Resource::new("c", Spec::Cluster(ClusterSpec { backupconfiguration: b, restorefrom: None }))
    }

    #[test]
    fn get_clusters_shows_interval_cron_or_off() {
        let every =
            BackupConfiguration { interval: Some(ProtoDuration { seconds: 3600, nanos: 0 }), ..Default::default() };
        let cron = BackupConfiguration { schedule: "0 */6 * * *".into(), ..Default::default() };
        let rs = [cluster(Some(every)), cluster(Some(cron)), cluster(None)];
        let out = table(ResourceType::Cluster, &rs, None, NOW);
        let rows: Vec<String> = cells(&out).into_iter().map(|r| r[1].clone()).collect();
        assert_eq!(rows, ["1h", "cron \"0 */6 * * *\"", "off"], "{out}");
    }

    fn status(id: &str, p: Option<PointInTimeStatus>) -> Resource {
        Resource::new(id, Spec::EtcdBackupStatus(EtcdBackupStatusSpec { pointintime: p, ..Default::default() }))
    }

    fn log(rev: i64, secs_ago: i64) -> PointInTimeStatus {
        PointInTimeStatus {
            enabled: true,
            coveredrevision: rev,
            coveredtime: Some(Timestamp { seconds: NOW.seconds - secs_ago, nanos: 0 }),
            ..Default::default()
        }
    }

    #[test]
    fn get_clusters_shows_the_change_log_window_and_how_far_it_covers() {
        let with_log = |window: Option<i64>| {
            let p = PointInTime { enabled: true, window: window.map(|seconds| ProtoDuration { seconds, nanos: 0 }) };
            Some(BackupConfiguration { pointintime: Some(p), ..Default::default() })
        };
        let named =
            |id: &str, b| Resource::new(id, Spec::Cluster(ClusterSpec { backupconfiguration: b, restorefrom: None }));
        let kept_off = BackupConfiguration {
            pointintime: Some(PointInTime { enabled: false, window: Some(ProtoDuration { seconds: 7200, nanos: 0 }) }),
            ..Default::default()
        };
        let rs = [
            named("live", with_log(None)),
            named("new", with_log(Some(2 * 86_400))),
            named("failing", with_log(None)),
            named("plain", None),
            named("stopped", Some(kept_off)),
        ];
        let broken = PointInTimeStatus { enabled: true, error: "no agent connected".into(), ..Default::default() };
        let statuses = [status("live", Some(log(1234, 12))), status("failing", Some(broken)), status("plain", None)];
        let out = table(ResourceType::Cluster, &rs, Some(&statuses), NOW);
        let got: Vec<(String, String)> = cells(&out).into_iter().map(|r| (r[3].clone(), r[4].clone())).collect();
        let want = [
            ("7days", "rev 1234 (12s ago)"),
            ("2days", "-"),
            ("7days", "- (no agent connected)"),
            ("off", ""),
            ("off", ""),
        ];
        assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())), "{out}");
        // Statuses not read (e.g. `get -w`): the window only.
        let out = table(ResourceType::Cluster, &rs[..1], None, NOW);
        assert_eq!(cells(&out)[0][3..], ["7days".to_string(), String::new()], "{out}");
    }

    #[test]
    fn get_etcdbackupstatus_shows_covered_revision_lag_and_gaps() {
        let gap = |closedby: &str| ChangeLogGap {
            fromrevision: 5,
            torevision: 9,
            closedby: closedby.into(),
            ..Default::default()
        };
        let gapped = PointInTimeStatus { gaps: vec![gap("prod-1"), gap("")], ..log(900, 3 * 3600 + 125) };
        let rs = [
            status("live", Some(log(1234, 12))),
            status("gapped", Some(gapped)),
            status("starting", Some(PointInTimeStatus { enabled: true, ..Default::default() })),
            status("off", None),
            status("turned-off", Some(PointInTimeStatus { enabled: false, ..log(5, 5) })),
        ];
        let out = table(ResourceType::EtcdBackupStatus, &rs, None, NOW);
        let got: Vec<Vec<String>> = cells(&out).into_iter().map(|r| r[10..].to_vec()).collect();
        let want = [
            ["rev 1234 (12s ago)", "12s", "0"],
            ["rev 900 (3h 2m ago)", "3h 2m", "2 (1 open)"],
            ["-", "", "0"],
            ["off", "", ""],
            ["off", "", ""],
        ];
        assert_eq!(got, want.map(|r| r.map(String::from).to_vec()), "{out}");
    }

    #[test]
    fn ago_reads_at_a_glance() {
        let at = |secs_ago: i64| ago(Timestamp { seconds: NOW.seconds - secs_ago, nanos: 0 }, NOW);
        assert_eq!(
            [at(0), at(12), at(60), at(303), at(7800), at(7205), at(3 * 86_400 + 4 * 3600 + 59)],
            ["0s", "12s", "1m", "5m 3s", "2h 10m", "2h", "3d 4h"]
        );
        assert_eq!(at(-30), "0s", "a clock ahead of ferryctl's is no time ago, not a negative one");
    }
}
