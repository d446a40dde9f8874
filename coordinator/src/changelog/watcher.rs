//! One watch epoch, on the coordinator's side: the assignment, then every message of the agent checked before
//! anything is signed or indexed. The agent may be a stolen node's: it can only ever add to its own
//! cluster's log, in order, while it holds the current epoch; it cannot name where a segment goes, skip
//! ahead of what the other members report, or replace a stored segment (the PUT refuses an existing object).

use anyhow::{anyhow, bail, Context, Result};
use ferry_common::protocol::{
    read_frame_within, write_frame, JobRequest, SegmentInfo, SegmentTarget, WatchAssignment, WatchMsg, WatchReply,
    DATA_CHUNK,
};
use ferry_common::resources::Timestamp;
use ferry_common::segment::object_name;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::index::{self, Head, SegmentEntry};
use super::Inner;
use crate::agents::LiveAgent;

/// Largest frame a watcher may send: a data chunk and its framing.
const MAX_WATCH_FRAME: usize = DATA_CHUNK + 4096;
/// How far beyond what the cluster's other members report a watcher's revisions may go (they report every
/// 10 s; 100 000 is 10 000 revisions a second). Beyond it the watcher is not believed.
const REVISION_SLACK: i64 = 100_000;
/// Gaps announced ahead of the covered revision (their segments before them still on the way) kept at most.
const MAX_PENDING_GAPS: usize = 16;
/// etcd versions whose watch could lose or repeat events near a compaction.
const WATCH_FIXED_IN: [(u64, u64, u64); 2] = [(3, 4, 36), (3, 5, 18)];

/// A segment announced and not stored yet.
struct Pending {
    info: SegmentInfo,
    name: String,
    /// The local store: its bytes so far.
    data: Option<Vec<u8>>,
}

struct Watch<'a> {
    inner: &'a Inner,
    cluster: &'a str,
    member: &'a str,
    epoch: u64,
    head: Head,
    encrypted: bool,
    started: bool,
    pending: Option<Pending>,
    pending_gaps: Vec<(i64, i64, String)>,
}

pub(super) async fn run(
    inner: &Inner,
    cluster: &str,
    agent: &LiveAgent,
    epoch: u64,
    cancel: &CancellationToken,
) -> Result<()> {
    let deps = &inner.deps;
    let head = inner.head(cluster)?.unwrap_or_default();
    let recipients = crate::encryption::recipients_for(deps.state.as_ref(), cluster)?;
    let target = deps.store.segment_target()?;
    let assignment = WatchAssignment {
        epoch,
        lineage: head.lineage,
        from_revision: if head.start_revision == 0 { 0 } else { head.covered_revision + 1 },
        prev_sha256: head.last_sha256(),
        recipients: recipients.clone(),
        zstd_level: deps.settings.zstd_level,
        cut_after_ms: deps.settings.cut_after.as_millis() as u64,
        cut_bytes: deps.settings.cut_bytes,
        spool_bytes: deps.settings.spool_bytes,
        coordinator_time: Timestamp::now(),
        target: target.clone(),
    };
    let (mut send, mut recv) = agent.conn.open_bi().await.context("open the watch stream")?;
    write_frame(&mut send, &JobRequest::Watch(Box::new(assignment))).await.context("send the watch assignment")?;
    let mut w = Watch {
        inner,
        cluster,
        member: &agent.member,
        epoch,
        head,
        encrypted: !recipients.is_empty(),
        started: false,
        pending: None,
        pending_gaps: Vec::new(),
    };
    let local = matches!(target, SegmentTarget::Coordinator);
    loop {
        let msg = tokio::select! {
            m = read_frame_within::<_, WatchMsg>(&mut recv, MAX_WATCH_FRAME) => m,
            () = cancel.cancelled() => {
                let _ = write_frame(&mut send, &WatchReply::Stop { reason: "the coordinator ended this watch (the log turned off, a restore, a stalled watch, or a shutdown)".into() }).await;
                let _ = send.finish();
                return Ok(());
            }
        };
        let Some(msg) = msg.context("read from the watcher")? else { bail!("the agent ended the watch") };
        if !inner.is_current(cluster, epoch) {
            let _ = write_frame(&mut send, &WatchReply::Stop { reason: "this watch epoch is over".into() }).await;
            return Ok(());
        }
        match w.handle(msg, local, cancel).await {
            Ok(Some(reply)) => write_frame(&mut send, &reply).await.context("answer the watcher")?,
            Ok(None) => {}
            Err(e) => {
                // Whatever was refused, the agent learns only that it was: the reason goes to the log and status.
                warn!("refusing the watcher: {e:#}");
                let _ =
                    write_frame(&mut send, &WatchReply::Stop { reason: "refused; see the coordinator's log".into() })
                        .await;
                let _ = send.finish();
                return Err(e);
            }
        }
    }
}

impl Watch<'_> {
    async fn handle(&mut self, msg: WatchMsg, local: bool, cancel: &CancellationToken) -> Result<Option<WatchReply>> {
        match msg {
            WatchMsg::Started { from_revision, member_id, etcd_version } => {
                if self.started {
                    bail!("the watcher started twice");
                }
                self.started = true;
                self.check_member(member_id)?;
                warn_old_etcd(&etcd_version);
                if self.head.start_revision == 0 {
                    if from_revision < 1 || !self.plausible(from_revision) {
                        bail!("the watcher starts the log at revision {from_revision}, which etcd has not reached");
                    }
                    self.head.start_revision = from_revision;
                    self.head.start_time = Some(Timestamp::now());
                    self.head.covered_revision = from_revision - 1;
                    self.head.covered_time = Some(Timestamp::now());
                    info!(from_revision, "the change log starts");
                } else if from_revision != self.head.covered_revision + 1 {
                    bail!(
                        "the watcher started at revision {from_revision}, not at {} where the log goes on",
                        self.head.covered_revision + 1
                    );
                }
                self.save("")?;
                Ok(None)
            }
            WatchMsg::Segment(info) => {
                self.need_started()?;
                if self.pending.is_some() {
                    bail!("a segment was announced while another is not stored yet");
                }
                self.check_segment(&info)?;
                let name = object_name(self.head.lineage, info.first_revision, info.last_revision, self.epoch);
                if local {
                    self.pending = Some(Pending { info, name, data: Some(Vec::new()) });
                    return Ok(None);
                }
                let request = self.inner.deps.store.segment_url(self.cluster, &name, &info).await?;
                let first_revision = info.first_revision;
                self.pending = Some(Pending { info, name, data: None });
                Ok(Some(WatchReply::SegmentUrl { first_revision, request }))
            }
            WatchMsg::SegmentData(bytes) => {
                let p = self.pending.as_mut().ok_or_else(|| anyhow!("segment data without a segment"))?;
                let data = p.data.as_mut().ok_or_else(|| anyhow!("segment data for an S3 segment"))?;
                if data.len() as u64 + bytes.len() as u64 > p.info.size {
                    bail!("more segment data than the {} bytes announced", p.info.size);
                }
                data.extend_from_slice(&bytes);
                Ok(None)
            }
            WatchMsg::SegmentEnd => {
                let mut p = self.pending.take().ok_or_else(|| anyhow!("a segment end without a segment"))?;
                let data = p.data.take().ok_or_else(|| anyhow!("a segment end for an S3 segment"))?;
                self.inner.deps.store.put_segment(self.cluster, &p.name, data, &p.info, cancel).await?;
                self.stored(p).map(Some)
            }
            WatchMsg::Uploaded { first_revision } => {
                let p = self.pending.take().ok_or_else(|| anyhow!("an upload without a segment"))?;
                if p.data.is_some() || p.info.first_revision != first_revision {
                    bail!("the upload of revision {first_revision} is not the segment announced");
                }
                self.inner.deps.store.check_segment(self.cluster, &p.name, &p.info, cancel).await?;
                self.stored(p).map(Some)
            }
            WatchMsg::Covered { revision } => {
                self.need_started()?;
                if self.pending.is_some() || revision <= self.head.covered_revision {
                    // A segment on its way covers it, or it says nothing new.
                    return Ok(None);
                }
                if !self.plausible(revision) {
                    bail!("the watcher claims revision {revision} covered, beyond what the other members report");
                }
                if self.pending_gaps.iter().any(|(from, _, _)| *from <= revision) {
                    bail!("the watcher claims revision {revision} covered across a gap it announced");
                }
                self.head.covered_revision = revision;
                self.head.covered_time = Some(Timestamp::now());
                self.save("")?;
                Ok(None)
            }
            WatchMsg::Gap { from_revision, to_revision, reason } => {
                self.need_started()?;
                if to_revision < from_revision || !self.plausible(to_revision) {
                    bail!("a gap of revisions {from_revision}..={to_revision} cannot be");
                }
                if from_revision <= self.head.covered_revision + 1 && self.pending.is_none() {
                    if to_revision > self.head.covered_revision {
                        let from = self.head.covered_revision + 1;
                        self.inner.gap(self.cluster, &mut self.head, from, to_revision, bounded(&reason));
                        self.apply_pending_gaps();
                        self.save("")?;
                    }
                } else {
                    if self.pending_gaps.len() >= MAX_PENDING_GAPS {
                        bail!("too many gaps announced ahead of the covered revision");
                    }
                    self.pending_gaps.push((from_revision, to_revision, bounded(&reason)));
                }
                Ok(None)
            }
            WatchMsg::Failed { error } => bail!("the agent's watch failed: {}", bounded(&error)),
        }
    }

    fn need_started(&self) -> Result<()> {
        if !self.started {
            bail!("the watcher sent a message before it started");
        }
        Ok(())
    }

    fn check_member(&self, member_id: u64) -> Result<()> {
        let reported = self
            .inner
            .deps
            .agents
            .live(self.cluster)
            .into_iter()
            .find(|a| a.member == self.member)
            .and_then(|a| a.facts)
            .map(|f| f.member_id);
        if reported.is_some_and(|id| id != 0 && id != member_id) {
            bail!("the watcher watches etcd member {member_id:x}, not its own member");
        }
        Ok(())
    }

    /// Whether `revision` is within reach of what the cluster's other members report (a lone member is
    /// believed).
    fn plausible(&self, revision: i64) -> bool {
        let others = self
            .inner
            .deps
            .agents
            .live(self.cluster)
            .into_iter()
            .filter(|a| a.member != self.member)
            .filter_map(|a| a.facts.filter(|f| f.error.is_none()).map(|f| f.revision))
            .max();
        others.is_none_or(|r| revision <= r.saturating_add(REVISION_SLACK))
    }

    fn check_segment(&self, info: &SegmentInfo) -> Result<()> {
        let next = self.head.covered_revision + 1;
        if info.first_revision != next {
            bail!("the segment starts at revision {}, not at {next} where the log goes on", info.first_revision);
        }
        if info.last_revision < info.first_revision || !self.plausible(info.last_revision) {
            bail!("the segment ends at revision {}, which cannot be", info.last_revision);
        }
        // Every revision has at least one event.
        let revisions = (info.last_revision - info.first_revision + 1) as u64;
        if info.events < revisions {
            bail!("the segment holds {} events for {revisions} revisions", info.events);
        }
        if info.prev_sha256 != self.head.last_sha256() {
            bail!("the segment does not follow the last stored one (its previous hash differs)");
        }
        if self.pending_gaps.iter().any(|(from, _, _)| *from <= info.last_revision) {
            bail!("the segment runs across a gap the watcher announced");
        }
        Ok(())
    }

    /// Indexes a segment that landed, moves the covered revision and answers `Stored`.
    fn stored(&mut self, p: Pending) -> Result<WatchReply> {
        if !self.inner.is_current(self.cluster, self.epoch) {
            bail!("the watch epoch ended before its segment was indexed");
        }
        self.inner.deps.state.still_leading()?;
        let info = &p.info;
        // The agent's times place changes for `changes` and restores to a time: never after now, never before
        // the log began, in order.
        let ms = |t: Timestamp| t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000);
        let now = ms(Timestamp::now());
        let floor = self.head.start_time.map_or(0, ms).min(now);
        let last_time_ms = info.last_time_ms.clamp(floor, now);
        let first_time_ms = info.first_time_ms.clamp(floor, last_time_ms);
        let entry = SegmentEntry {
            lineage: self.head.lineage,
            first_revision: info.first_revision,
            last_revision: info.last_revision,
            epoch: self.epoch,
            name: p.name.clone(),
            size: info.size,
            sha256: hex::encode(info.sha256),
            prev_sha256: hex::encode(info.prev_sha256),
            events: info.events,
            plain_bytes: info.plain_bytes,
            first_time_ms,
            last_time_ms,
            encrypted: self.encrypted,
            stored_at: Timestamp::now(),
        };
        index::save_segment(self.inner.deps.state.as_ref(), self.cluster, &entry)?;
        self.head.covered_revision = info.last_revision;
        self.head.covered_time = Some(Timestamp::now());
        self.head.last_sha256 = entry.sha256.clone();
        self.head.segments += 1;
        self.head.stored_bytes += info.size;
        self.apply_pending_gaps();
        self.save("")?;
        Ok(WatchReply::Stored {
            first_revision: info.first_revision,
            last_revision: info.last_revision,
            coordinator_time: Timestamp::now(),
        })
    }

    /// Gaps announced ahead of the covered revision take effect once the segments before them are stored.
    fn apply_pending_gaps(&mut self) {
        self.pending_gaps.sort_by_key(|(from, _, _)| *from);
        while let Some((from, to, _)) = self.pending_gaps.first().cloned() {
            if from > self.head.covered_revision + 1 {
                break;
            }
            let (_, _, reason) = self.pending_gaps.remove(0);
            if to > self.head.covered_revision {
                let from = self.head.covered_revision + 1;
                self.inner.gap(self.cluster, &mut self.head, from, to, reason);
            }
        }
    }

    fn save(&self, error: &str) -> Result<()> {
        if !self.inner.is_current(self.cluster, self.epoch) {
            bail!("the watch epoch ended");
        }
        self.inner.save_head(self.cluster, &self.head, self.member, error)?;
        Ok(())
    }
}

/// An agent's words, cut to what a status line shows.
fn bounded(s: &str) -> String {
    s.chars().take(300).collect()
}

fn warn_old_etcd(version: &str) {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let v = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let old = WATCH_FIXED_IN.iter().any(|fixed| v.0 == fixed.0 && v.1 == fixed.1 && v < *fixed);
    if old {
        warn!(etcd_version = %version, "etcd before 3.4.36 / 3.5.18 can lose or repeat watch events near a compaction; the log's check against full backups catches it, upgrading etcd avoids it");
    }
}
