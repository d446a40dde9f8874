//! `ferryctl restore CLUSTER`: applies an `EtcdRestores` resource (after removing a finished one) and, with
//! `--wait`, follows the cluster's `EtcdRestoreStatuses` with a progress line until it is done or failed.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ferry_common::config::FerryConfig;
use ferry_common::protocol::{AdminRequest, AdminResponse};
use ferry_common::resources::{
    restore_phase, EtcdRestoreSpec, EtcdRestoreStatusSpec, Resource, ResourceType, Spec, Timestamp,
};

use super::request::{call, get, is_server_failure, WorkFailed};

/// The status moves at each member step (seconds apart); each poll is one short request.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// What `ferryctl restore` was asked.
pub struct RestoreArgs {
    pub cluster: String,
    pub backup: String,
    pub before: Option<Timestamp>,
    pub mode: Option<String>,
    pub lost: Vec<String>,
    pub yes: bool,
    pub wait: Option<Duration>,
    /// `ferryctl member replace`: the member to replace (mode replace-member, no backup).
    pub member: Option<String>,
}

/// The `EtcdRestores` resource for `args`.
pub fn resource(a: &RestoreArgs) -> Resource {
    Resource::new(
        &a.cluster,
        Spec::EtcdRestore(EtcdRestoreSpec {
            backup: a.backup.clone(),
            before: a.before,
            mode: a.mode.clone().unwrap_or_default(),
            lostmembers: a.lost.clone(),
            confirm: if a.yes { a.cluster.clone() } else { String::new() },
            member: a.member.clone().unwrap_or_default(),
            fromcluster: String::new(),
        }),
    )
}

async fn status(cfg: &FerryConfig, cluster: &str) -> Result<Option<EtcdRestoreStatusSpec>> {
    // Listed rather than asked for by id: a cluster never restored has none, which is no error.
    Ok(get(cfg, ResourceType::EtcdRestoreStatus, None, None).await?.into_iter().find_map(|r| match r.spec {
        Spec::EtcdRestoreStatus(s) if r.metadata.id == cluster => Some(s),
        _ => None,
    }))
}

pub async fn run(cfg: &FerryConfig, a: RestoreArgs) -> Result<()> {
    let cluster = &a.cluster;
    // A restore is immutable: a finished one (done or failed) makes room for the new one.
    let existing = get(cfg, ResourceType::EtcdRestore, None, None).await?;
    if existing.iter().any(|r| r.metadata.id == *cluster) {
        let finished = status(cfg, cluster).await?.is_some_and(|s| restore_phase::is_final(&s.phase));
        if finished {
            match call(cfg, AdminRequest::Delete { rt: ResourceType::EtcdRestore, id: cluster.clone() }).await? {
                AdminResponse::Deleted => {}
                other => bail!("unexpected response {other:?}"),
            }
        }
    }
    let before = status(cfg, cluster).await?.map(|s| s.restoreid);
    match call(cfg, AdminRequest::Apply { resources: vec![resource(&a)] }).await? {
        AdminResponse::Applied(_) => {}
        other => bail!("unexpected response {other:?}"),
    }
    match &a.member {
        Some(m) => println!("replacement of member {m} of cluster {cluster} requested"),
        None => println!("restore of cluster {cluster} from backup {} requested", describe_backup(&a)),
    }
    let Some(timeout) = a.wait else {
        println!("follow it with `ferryctl get -w etcdrestorestatus {cluster}`");
        return Ok(());
    };
    follow(cfg, cluster, before, timeout).await
}

fn describe_backup(a: &RestoreArgs) -> String {
    match a.before {
        Some(t) => format!("{} before {}", a.backup, t.human()),
        None => a.backup.clone(),
    }
}

/// Polls the status until the new restore (not `before`, the one that was there) is done or failed.
async fn follow(cfg: &FerryConfig, cluster: &str, before: Option<String>, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_line = String::new();
    let mut last_error = None;
    loop {
        if Instant::now() >= deadline {
            let why = last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
            return Err(WorkFailed(format!(
                "the restore of cluster {cluster} did not finish within {}{why}; it goes on: `ferryctl get -w etcdrestorestatus {cluster}`",
                humantime::format_duration(timeout)
            ))
            .into());
        }
        match status(cfg, cluster).await {
            Ok(Some(st)) if Some(&st.restoreid) != before.as_ref() || before.is_none() => {
                last_error = None;
                let line = progress_line(&st);
                if line != last_line {
                    eprintln!("{line}");
                    last_line = line;
                }
                if st.phase == restore_phase::DONE && st.verified.is_none() {
                    println!("{} done: the member was replaced and serves", st.restoreid);
                    return Ok(());
                }
                if st.phase == restore_phase::DONE {
                    let v = st.verified.unwrap_or_default();
                    println!(
                        "restore {} done: every member verified (cluster id {}, revision {}, {} keys, hash {:x}) and serving; a fresh backup was started",
                        st.restoreid, v.etcdclusterid, v.revision, v.keys, v.hash
                    );
                    return Ok(());
                }
                if st.phase == restore_phase::FAILED {
                    return Err(WorkFailed(format!("the restore of cluster {cluster} failed: {}", st.error)).into());
                }
            }
            Ok(_) => {}
            Err(e) if is_server_failure(&e) => last_error = Some(format!("{e:#}")),
            Err(e) => return Err(e),
        }
        tokio::time::sleep(POLL_EVERY.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// `restore prod-17…: restoring · cp1 rebuilt 120 MiB · cp2 held · waiting: …`
fn progress_line(st: &EtcdRestoreStatusSpec) -> String {
    let mut parts = vec![format!("restore {}: {}", st.restoreid, st.phase)];
    for m in &st.members {
        let step = if m.step.is_empty() { "-" } else { &m.step };
        if m.bytes > 0 {
            parts.push(format!("{} {step} {}", m.member, crate::restore::plan::human(m.bytes)));
        } else {
            parts.push(format!("{} {step}", m.member));
        }
    }
    if !st.waiting.is_empty() {
        parts.push(format!("waiting: {}", st.waiting));
    }
    parts.join(" · ")
}
