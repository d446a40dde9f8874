//! `ferryctl changes`: the change log's rows, in pages.

use anyhow::{Context, Result};
use ferry_common::protocol::{write_frame, AdminResponse};
use ferry_common::resources::validate_name;
use quinn::SendStream;

use super::{reply_error, Api, ApiError};
use crate::changelog::changes::{ChangesError, Query};

/// Rows listed at most in one request.
pub(super) const MAX_ROWS: u64 = 100_000;
/// Rows per page: a key may be up to 1.5 MiB (etcd's request limit) but rows carry no values; 2 000 rows of
/// ordinary keys are far below a frame, and a page is cut earlier when its keys are long.
const ROWS_PER_PAGE: usize = 2_000;
const PAGE_KEY_BYTES: usize = ferry_common::protocol::LISTING_PAGE_BYTES / 2;

impl Api {
    pub(super) async fn changes(&self, cluster: &str, mut q: Query, send: &mut SendStream) -> Result<()> {
        if let Err(e) = validate_name("cluster", cluster) {
            return reply_error(send, ApiError::Invalid(e.to_string())).await;
        }
        if q.limit == 0 || q.limit as u64 > MAX_ROWS {
            let e = ApiError::Invalid(format!("--limit must be within 1..={MAX_ROWS}, not {}", q.limit));
            return reply_error(send, e).await;
        }
        if let (Some(a), Some(b)) = (q.since_ms, q.until_ms) {
            if a > b {
                return reply_error(send, ApiError::Invalid("--since is after --until".into())).await;
            }
        }
        q.prefix.truncate(64 * 1024);
        let rows = match self.changelog.changes(cluster, &q, &self.cancel).await {
            Ok(rows) => rows,
            Err(e) => {
                let e = match e {
                    ChangesError::NoLog(_) => ApiError::NotFound(e.to_string()),
                    ChangesError::Encrypted(_) => ApiError::Invalid(e.to_string()),
                    ChangesError::Store(s) => s.into(),
                    other => ApiError::Internal(other.to_string()),
                };
                return reply_error(send, e).await;
            }
        };
        if rows.is_empty() {
            return write_frame(send, &AdminResponse::Changes { rows, more: false }).await.context("send changes");
        }
        let mut page = Vec::new();
        let mut key_bytes = 0;
        let mut rows = rows.into_iter().peekable();
        while let Some(row) = rows.next() {
            key_bytes += row.key.len();
            page.push(row);
            let more = rows.peek().is_some();
            if !more || page.len() >= ROWS_PER_PAGE || key_bytes >= PAGE_KEY_BYTES {
                let rows = std::mem::take(&mut page);
                write_frame(send, &AdminResponse::Changes { rows, more }).await.context("send changes")?;
                key_bytes = 0;
            }
        }
        Ok(())
    }
}

impl Api {
    /// `AdminRequest::PointInTime`: how to rebuild a cluster's state at a point, or why it cannot be.
    pub(super) async fn point_in_time(
        &self,
        cluster: &str,
        at: ferry_common::protocol::PointInTime,
        through_covered: bool,
    ) -> Result<AdminResponse, ApiError> {
        use crate::pointintime::plan::PlanError;
        use ferry_common::protocol::PointInTime as P;
        validate_name("cluster", cluster).map_err(|e| ApiError::Invalid(e.to_string()))?;
        if let P::Revision(n) | P::BeforeRevision(n) = at {
            if n < 1 {
                return Err(ApiError::Invalid(format!("revision {n} is not an etcd revision (they start at 1)")));
            }
        }
        match self.changelog.plan(cluster, at, through_covered, &self.cancel).await {
            Ok(plan) => Ok(AdminResponse::PointInTimePlan(Box::new(plan))),
            Err(e) => Err(match e {
                PlanError::NoLog(_) => ApiError::NotFound(e.to_string()),
                PlanError::Outside(_) | PlanError::Gap(_) | PlanError::NoBase(_) => ApiError::Invalid(e.to_string()),
                PlanError::Store(s) => s.into(),
                other => ApiError::Internal(other.to_string()),
            }),
        }
    }

    /// `AdminRequest::Segment`: one indexed segment's stored bytes as `Data` frames, then `DownloadEnd`.
    pub(super) async fn segment(&self, cluster: &str, name: &str, send: &mut SendStream) -> Result<()> {
        if let Err(e) = validate_name("cluster", cluster) {
            return reply_error(send, ApiError::Invalid(e.to_string())).await;
        }
        // Only a segment the index holds for this cluster: never a key a caller made up. Looked up by the
        // lineage and first revision its name says (a rebuild asks for hundreds, one request each).
        let indexed = match ferry_common::segment::parse_object_name(name) {
            Some((lineage, first, _, _)) => {
                match crate::changelog::index::segment(self.state.as_ref(), cluster, lineage, first) {
                    Ok(entry) => entry.is_some_and(|s| s.name == name),
                    Err(e) => return reply_error(send, ApiError::Internal(e.to_string())).await,
                }
            }
            None => false,
        };
        if !indexed {
            let e = ApiError::NotFound(format!(
                "cluster {cluster} has no change-log segment {name:?}; a point-in-time plan names the segments to read"
            ));
            return reply_error(send, e).await;
        }
        let bytes = match self.store.read_segment(cluster, name, &self.cancel).await {
            Ok(b) => b,
            Err(e) => return reply_error(send, e.into()).await,
        };
        for chunk in bytes.chunks(ferry_common::protocol::DATA_CHUNK) {
            write_frame(send, &AdminResponse::Data(chunk.to_vec())).await.context("send segment")?;
        }
        write_frame(send, &AdminResponse::DownloadEnd).await.context("send segment end")
    }
}

impl Api {
    /// `AdminRequest::PointInTimeSnapshot`: the plan, then the rebuilt snapshot's bytes.
    pub(super) async fn point_in_time_snapshot(
        &self,
        cluster: &str,
        at: ferry_common::protocol::PointInTime,
        send: &mut SendStream,
    ) -> Result<()> {
        let plan = match self.point_in_time(cluster, at, false).await {
            Ok(AdminResponse::PointInTimePlan(p)) => p,
            Ok(other) => return write_frame(send, &other).await.context("send response"),
            Err(e) => return reply_error(send, e).await,
        };
        let scratch_root = self.changelog.deps().scratch.clone();
        let scratch = match std::fs::create_dir_all(&scratch_root)
            .and_then(|()| tempfile::Builder::new().prefix(&format!("{cluster}-pit-")).tempdir_in(&scratch_root))
        {
            Ok(d) => d,
            Err(e) => return reply_error(send, ApiError::Internal(format!("create a scratch dir: {e}"))).await,
        };
        let out = scratch.path().join("point.db");
        let span = tracing::info_span!("pointintime", %cluster, revision = plan.revision);
        let rebuilt = tracing::Instrument::instrument(
            self.changelog.rebuild_to_file(&plan, scratch.path(), &out, &self.cancel),
            span,
        )
        .await;
        let outcome = match rebuilt {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(%cluster, error = %format!("{e:#}"), "point-in-time rebuild failed");
                return reply_error(send, ApiError::Invalid(format!("{e:#}"))).await;
            }
        };
        tracing::info!(%cluster, revision = outcome.revision, revisions = outcome.revisions_applied, secs = outcome.elapsed.as_secs_f64(), "rebuilt a point in time");
        write_frame(send, &AdminResponse::PointInTimePlan(plan)).await.context("send the plan")?;
        let mut f = tokio::fs::File::open(&out).await.with_context(|| format!("open {}", out.display()))?;
        let mut buf = vec![0u8; ferry_common::protocol::DATA_CHUNK];
        loop {
            use tokio::io::AsyncReadExt as _;
            let n = f.read(&mut buf).await.context("read the rebuilt snapshot")?;
            if n == 0 {
                break;
            }
            write_frame(send, &AdminResponse::Data(buf[..n].to_vec())).await.context("send snapshot")?;
        }
        write_frame(send, &AdminResponse::DownloadEnd).await.context("send snapshot end")
    }
}

impl Api {
    /// Rebuilds the state at `at` and stores it as a derived backup of `cluster` (what a restore to a point
    /// restores).
    pub(super) async fn derive_backup(
        &self,
        cluster: &str,
        at: ferry_common::protocol::PointInTime,
    ) -> Result<AdminResponse, ApiError> {
        let plan = match self.point_in_time(cluster, at, false).await? {
            AdminResponse::PointInTimePlan(p) => p,
            other => return Err(ApiError::Internal(format!("unexpected plan answer {other:?}"))),
        };
        let encrypted = plan.segments.iter().any(|s| s.encrypted && s.first_revision <= plan.revision);
        if encrypted && self.settings.identities.is_none() {
            return Err(ApiError::Invalid(format!(
                "the change log of {cluster} is encrypted and this coordinator has no --identity, so it cannot rebuild \
                 the state at revision {} to restore it; start the coordinator with --identity FILE, or rebuild the \
                 state with `ferryctl backup download {cluster} --at-revision {} --identity FILE -o OUT` and restore \
                 that file by hand (docs/RESTORE.md)",
                plan.revision, plan.revision
            )));
        }
        let scratch_root = self.changelog.deps().scratch.clone();
        let scratch = std::fs::create_dir_all(&scratch_root)
            .and_then(|()| tempfile::Builder::new().prefix(&format!("{cluster}-derive-")).tempdir_in(&scratch_root))
            .map_err(|e| ApiError::Internal(format!("create a scratch dir: {e}")))?;
        let out = scratch.path().join("point.db");
        let startedat = ferry_common::resources::Timestamp::now();
        let span = tracing::info_span!("derive", %cluster, revision = plan.revision);
        let outcome = tracing::Instrument::instrument(
            self.changelog.rebuild_to_file(&plan, scratch.path(), &out, &self.cancel),
            span.clone(),
        )
        .await
        .map_err(|e| ApiError::Invalid(format!("{e:#}")))?;
        let base = plan
            .bases
            .iter()
            .find(|b| b.metadata.id == outcome.base_id)
            .and_then(|b| match &b.spec {
                ferry_common::resources::Spec::EtcdBackup(s) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| ApiError::Internal(format!("the rebuild's base {} is not in the plan", outcome.base_id)))?;
        let recipients = crate::encryption::recipients_for(self.state.as_ref(), cluster)?;
        let derive = crate::pointintime::derive::Derive {
            cluster,
            snapshot: &out,
            base: &base,
            from: ferry_common::resources::DerivedFrom {
                backup: outcome.base_id.clone(),
                baserevision: outcome.base_revision,
                revision: outcome.revision,
            },
            recipients,
            zstd_level: self.settings.zstd_level,
            startedat,
        };
        let stored = tracing::Instrument::instrument(
            crate::pointintime::derive::store(
                &self.store,
                self.settings.identities.as_ref(),
                derive,
                scratch.path(),
                &self.cancel,
            ),
            span,
        )
        .await
        .map_err(|e| ApiError::Internal(format!("store the derived backup: {e:#}")))?;
        tracing::info!(%cluster, backup = %stored.id, base = %outcome.base_id, revision = outcome.revision, revisions = outcome.revisions_applied, "stored a derived backup");
        Ok(AdminResponse::Derived { backup: Box::new(super::backups::backup_resource(stored)), plan })
    }
}
