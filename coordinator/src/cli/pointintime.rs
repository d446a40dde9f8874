//! Point-in-time on ferryctl's machine: `backup download --at`, `get-key --at` and the plan a point-in-time
//! restore shows first. The coordinator resolves the point ([`plan`]); the full backup and the segments are
//! fetched with every hash checked and the state rebuilt in a throw-away etcd on unix sockets here
//! (`pointintime::materialize`), so an encrypted cluster's identity never has to be on the coordinator.

use std::io::Write as _;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use ferry_common::client::Session;
use ferry_common::config::FerryConfig;
use ferry_common::encryption::Identities;
use ferry_common::progress::{Lines, Progress};
use ferry_common::protocol::{expect_frame, AdminRequest, AdminResponse, PlanSegment, PointInTime, PointInTimePlan};
use ferry_common::resources::{Resource, Spec};
use ferry_common::segment::EventKind;
use tokio_util::sync::CancellationToken;

use super::changes::TimeArg;
use super::download::fetch;
use super::request::{call, Answered};
use crate::pointintime::diff::Diff;
use crate::pointintime::materialize::{rebuild_plan, save, Rebuilt, Source};
use crate::pointintime::open_segment_blocking;
use crate::pointintime::plan::human_ms;

/// A point as ferryctl's flags give it.
#[derive(Debug, Clone, Copy)]
pub enum At {
    Time(TimeArg),
    Revision(i64),
    BeforeRevision(i64),
    Latest,
}

impl At {
    /// From the mutually exclusive flags (at most one is set; none is an error naming them).
    pub fn from_flags(time: Option<TimeArg>, revision: Option<i64>, before: Option<i64>, latest: bool) -> Result<Self> {
        match (time, revision, before, latest) {
            (Some(t), None, None, false) => Ok(Self::Time(t)),
            (None, Some(r), None, false) => Ok(Self::Revision(r)),
            (None, None, Some(r), false) => Ok(Self::BeforeRevision(r)),
            (None, None, None, true) => Ok(Self::Latest),
            _ => bail!("give exactly one point: a time (--at / --to-time), a revision (--at-revision / --to-revision) or --before-revision"),
        }
    }

    fn request(self) -> Result<PointInTime> {
        Ok(match self {
            Self::Time(t) => PointInTime::Time(t.resolve(now_ms()).map_err(|e| anyhow!(e))?),
            Self::Revision(r) => PointInTime::Revision(r),
            Self::BeforeRevision(r) => PointInTime::BeforeRevision(r),
            Self::Latest => PointInTime::Latest,
        })
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Asks the coordinator how to rebuild `cluster` at `at`.
pub async fn plan(cfg: &FerryConfig, cluster: &str, at: At, through_covered: bool) -> Result<PointInTimePlan> {
    let request = AdminRequest::PointInTime { cluster: cluster.to_string(), at: at.request()?, through_covered };
    match call(cfg, request).await? {
        AdminResponse::PointInTimePlan(p) => Ok(*p),
        other => bail!("unexpected response {other:?}"),
    }
}

/// Fetches bases and segments from the coordinator, one request each.
struct Fetcher<'a> {
    cfg: &'a FerryConfig,
    cluster: String,
    identities: Option<&'a Identities>,
}

impl Source for Fetcher<'_> {
    async fn base(&mut self, base: &Resource, out: &Path) -> Result<bool> {
        fetch(self.cfg, self.cluster.clone(), base.metadata.id.clone(), out, true, self.identities).await?;
        Ok(true)
    }

    async fn segment(&mut self, s: &PlanSegment) -> Result<Vec<u8>> {
        let request = AdminRequest::Segment { cluster: self.cluster.clone(), name: s.name.clone() };
        let mut session = Session::open(&self.cfg.coordinator, &self.cfg.ca, &self.cfg.client_pem(), &request).await?;
        let result = async {
            let mut out = Vec::with_capacity(s.size as usize);
            loop {
                match expect_frame(&mut session.recv).await.context("read segment")? {
                    AdminResponse::Data(d) => {
                        if out.len() + d.len() > s.size as usize {
                            bail!("segment {} is longer than the {} bytes indexed", s.name, s.size);
                        }
                        out.extend_from_slice(&d);
                    }
                    AdminResponse::DownloadEnd => return Ok(out),
                    AdminResponse::Error { kind, message } => return Err(Answered { kind, message }.into()),
                    other => bail!("unexpected response {other:?}"),
                }
            }
        }
        .await;
        session.close().await;
        result
    }
}

/// Says what the plan resolved to, before anything is fetched.
fn describe(p: &PointInTimePlan) {
    let when = if p.time_ms > 0 { format!(" (received {})", human_ms(p.time_ms)) } else { String::new() };
    eprintln!("point: revision {} of cluster {}{when}, lineage {}", p.revision, p.cluster, p.lineage);
    let segs: Vec<&PlanSegment> = p.segments.iter().filter(|s| s.first_revision <= p.revision).collect();
    let bytes: u64 = segs.iter().map(|s| s.size).sum();
    if let Some(Spec::EtcdBackup(b)) = p.bases.first().map(|r| &r.spec) {
        eprintln!(
            "base:  backup {} (revision {}, {}, {} stored), then {} segment(s) of the change log ({} bytes)",
            p.bases[0].metadata.id,
            b.revision,
            b.createdat.human(),
            crate::restore::plan::human(b.size),
            segs.len(),
            bytes
        );
    }
}

/// Rebuilds the plan's point under `scratch` (see `materialize::rebuild_plan`), with a progress line.
async fn rebuild_here(
    cfg: &FerryConfig,
    p: &PointInTimePlan,
    identities: Option<&Identities>,
    scratch: &Path,
    base_only: bool,
    cancel: &CancellationToken,
) -> Result<Rebuilt> {
    let mut fetcher = Fetcher { cfg, cluster: p.cluster.clone(), identities };
    let mut progress: Option<Progress> = None;
    let target = p.revision;
    let mut tick = |from: i64, r: i64| {
        let todo = (target - from).max(0) as u64;
        let line =
            progress.get_or_insert_with(|| Progress::new(format!("apply {todo} revision(s)"), todo, Lines::Stderr));
        line.set((r - from) as u64);
    };
    let rebuilt = rebuild_plan(p, identities, scratch, base_only, &mut fetcher, &mut tick, cancel).await?;
    if let Some(line) = progress {
        line.finish();
    }
    Ok(rebuilt)
}

fn scratch_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("ferry-pit-").tempdir().context("create a scratch dir")
}

/// `ferryctl backup download CLUSTER --at …`: a plain etcd snapshot of the state at the point.
pub async fn download_at(
    cfg: &FerryConfig,
    cluster: &str,
    at: At,
    output: &Path,
    identities: Option<&Identities>,
) -> Result<()> {
    if output.exists() {
        bail!("{} exists already; give a new file (-o)", output.display());
    }
    let p = plan(cfg, cluster, at, false).await?;
    describe(&p);
    let base_encrypted = p.bases.iter().any(|b| matches!(&b.spec, Spec::EtcdBackup(s) if s.encryption.is_some()));
    let log_encrypted = p.segments.iter().any(|s| s.encrypted && s.first_revision <= p.revision);
    if identities.is_none() && (base_encrypted || log_encrypted) {
        eprintln!("the cluster's backups are encrypted and no --identity was given: the coordinator rebuilds the point with its own");
        return download_from_coordinator(cfg, cluster, p.revision, output).await;
    }
    let scratch = scratch_dir()?;
    let cancel = CancellationToken::new();
    let rebuilt = rebuild_here(cfg, &p, identities, scratch.path(), false, &cancel).await?;
    let o = save(rebuilt, output).await?;
    println!(
        "wrote {}: cluster {cluster} at revision {} (base revision {} + {} revision(s), {} event(s) from {} segment(s), every hash checked; {:.1}s); restore it with `etcdutl snapshot restore`",
        output.display(),
        o.revision,
        o.base_revision,
        o.revisions_applied,
        o.events_applied,
        o.segments_read,
        o.elapsed.as_secs_f64()
    );
    if o.leases_unknown > 0 {
        eprintln!(
            "note: {} lease(s) were granted with a TTL of an hour: the log did not record their TTL",
            o.leases_unknown
        );
    }
    Ok(())
}

/// `backup download --at` rebuilt by the coordinator: its snapshot streamed into `output` (through a temp
/// file beside it, renamed only once etcd's trailing hash checks out).
async fn download_from_coordinator(cfg: &FerryConfig, cluster: &str, revision: i64, output: &Path) -> Result<()> {
    use sha2::Digest as _;
    let request =
        AdminRequest::PointInTimeSnapshot { cluster: cluster.to_string(), at: PointInTime::Revision(revision) };
    let mut session = Session::open(&cfg.coordinator, &cfg.ca, &cfg.client_pem(), &request).await?;
    let part = output.with_extension("part");
    let result = async {
        match expect_frame(&mut session.recv).await.context("read response")? {
            AdminResponse::PointInTimePlan(_) => {}
            AdminResponse::Error { kind, message } => return Err(Answered { kind, message }.into()),
            other => bail!("unexpected response {other:?}"),
        }
        let mut f =
            ferry_common::config::create_private(&part).with_context(|| format!("create {}", part.display()))?;
        // etcd's snapshot ends with the sha256 of everything before it: hash all but the last 32 bytes.
        let mut hash = sha2::Sha256::new();
        let mut tail: Vec<u8> = Vec::new();
        let mut total = 0u64;
        loop {
            match expect_frame(&mut session.recv).await.context("read the snapshot")? {
                AdminResponse::Data(d) => {
                    f.write_all(&d).with_context(|| format!("write {}", part.display()))?;
                    total += d.len() as u64;
                    tail.extend_from_slice(&d);
                    if tail.len() > 32 {
                        let cut = tail.len() - 32;
                        hash.update(&tail[..cut]);
                        tail.drain(..cut);
                    }
                }
                AdminResponse::DownloadEnd => break,
                AdminResponse::Error { kind, message } => return Err(Answered { kind, message }.into()),
                other => bail!("unexpected response {other:?}"),
            }
        }
        let sum: [u8; 32] = hash.finalize().into();
        if tail.len() != 32 || tail[..] != sum[..] {
            bail!("the snapshot the coordinator sent fails etcd's own hash ({total} bytes); nothing was written");
        }
        f.sync_all().with_context(|| format!("sync {}", part.display()))?;
        std::fs::rename(&part, output).with_context(|| format!("rename {} to {}", part.display(), output.display()))?;
        Ok(total)
    }
    .await;
    session.close().await;
    match result {
        Ok(total) => {
            println!(
                "wrote {}: cluster {cluster} at revision {revision}, rebuilt by the coordinator ({total} bytes, etcd's hash checked); restore it with `etcdutl snapshot restore`",
                output.display()
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            Err(e)
        }
    }
}

/// How `get-key` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyFormat {
    /// The value's bytes alone (one key).
    Raw,
    /// etcd's key/value JSON (key and value base64), one line per key.
    Json,
}

/// One key's state as `get-key` prints it.
struct Kv {
    key: Vec<u8>,
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: i64,
}

fn print_kv(kv: &Kv, format: KeyFormat) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        KeyFormat::Raw => out.write_all(&kv.value)?,
        KeyFormat::Json => {
            let b64 = base64::engine::general_purpose::STANDARD;
            let line = serde_json::json!({
                "key": b64.encode(&kv.key),
                "create_revision": kv.create_revision,
                "mod_revision": kv.mod_revision,
                "version": kv.version,
                "value": b64.encode(&kv.value),
                "lease": kv.lease,
            });
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `ferryctl get-key CLUSTER KEY --at …`: a key's value (or a subtree's keys) at the point. One key is looked
/// for in the log first, newest segment back: its last change at or before the point answers without a
/// full backup; otherwise (or with `--prefix`) the state is rebuilt.
pub async fn get_key(
    cfg: &FerryConfig,
    cluster: &str,
    key: &[u8],
    prefix: bool,
    at: At,
    format: KeyFormat,
    identities: Option<&Identities>,
) -> Result<()> {
    if prefix && format == KeyFormat::Raw {
        bail!("--prefix prints JSON lines (one per key); drop -o raw");
    }
    let p = plan(cfg, cluster, at, false).await?;
    describe(&p);
    let name = String::from_utf8_lossy(key).into_owned();
    if !prefix {
        let mut fetcher = Fetcher { cfg, cluster: p.cluster.clone(), identities };
        for s in p.segments.iter().rev().filter(|s| s.first_revision <= p.revision) {
            let stored = fetcher.segment(s).await?;
            let opened = open_segment_blocking(s, stored, identities).await?;
            let last = opened
                .revisions
                .iter()
                .rev()
                .filter(|r| r.revision <= p.revision)
                .find_map(|r| r.events.iter().find(|e| e.key == key).map(|e| (r.revision, r.time_ms, e.clone())));
            if let Some((revision, time_ms, e)) = last {
                if e.kind == EventKind::Delete {
                    return Err(Answered {
                        kind: ferry_common::protocol::ErrorKind::NotFound,
                        message: format!(
                            "key {name:?} did not exist at revision {}: it was deleted at revision {revision} ({}); `--at-revision {}` shows its last value",
                            p.revision,
                            human_ms(time_ms),
                            revision - 1
                        ),
                    }
                    .into());
                }
                eprintln!("found in the change log: last changed at revision {revision} ({})", human_ms(time_ms));
                let kv = Kv {
                    key: e.key,
                    value: e.value,
                    create_revision: e.create_revision,
                    mod_revision: revision,
                    version: e.version,
                    lease: e.lease,
                };
                return print_kv(&kv, format);
            }
        }
    }
    // A key the log does not touch between the base and the point holds the base's value: the base alone
    // answers (every segment up to the point was read above).
    let scratch = scratch_dir()?;
    let cancel = CancellationToken::new();
    let mut rebuilt = rebuild_here(cfg, &p, identities, scratch.path(), !prefix, &cancel).await?;
    let opts = if prefix { Some(etcd_client::GetOptions::new().with_prefix()) } else { None };
    let resp = rebuilt.client.get(key.to_vec(), opts).await.context("read the rebuilt state")?;
    if resp.kvs().is_empty() {
        let what = if prefix { format!("no key under {name:?}") } else { format!("key {name:?} did not exist") };
        return Err(Answered {
            kind: ferry_common::protocol::ErrorKind::NotFound,
            message: format!("{what} at revision {} of cluster {cluster}", p.revision),
        }
        .into());
    }
    for kv in resp.kvs() {
        print_kv(
            &Kv {
                key: kv.key().to_vec(),
                value: kv.value().to_vec(),
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
                version: kv.version(),
                lease: kv.lease(),
            },
            format,
        )?;
    }
    Ok(())
}

/// What a restore to the point would change, read from the log after it (`restore --to-… ` without `--yes`,
/// or with `--dry-run`).
/// Has the coordinator rebuild the state at `revision` and store it as a derived backup; returns its id.
pub async fn derive(cfg: &FerryConfig, cluster: &str, revision: i64) -> Result<String> {
    eprintln!("rebuilding the state at revision {revision} on the coordinator and storing it as a backup…");
    let request = AdminRequest::DeriveBackup { cluster: cluster.to_string(), at: PointInTime::Revision(revision) };
    match call(cfg, request).await? {
        AdminResponse::Derived { backup, plan: _ } => {
            let from = match &backup.spec {
                Spec::EtcdBackup(s) => s.derivedfrom.clone(),
                _ => None,
            };
            match from {
                Some(f) => println!(
                    "stored the state at revision {} as derived backup {} (backup {} at revision {} and the change log after it)",
                    f.revision, backup.metadata.id, f.backup, f.baserevision
                ),
                None => println!("stored derived backup {}", backup.metadata.id),
            }
            Ok(backup.metadata.id.clone())
        }
        other => bail!("unexpected response {other:?}"),
    }
}

/// Prints the plan to restore `cluster` to `at` and what it would change; returns the revision it resolved to.
pub async fn show_plan(cfg: &FerryConfig, cluster: &str, at: At, identities: Option<&Identities>) -> Result<i64> {
    let p = plan(cfg, cluster, at, true).await?;
    describe(&p);
    let mut fetcher = Fetcher { cfg, cluster: p.cluster.clone(), identities };
    let mut diff = Diff::new(p.revision);
    let mut read = 0u64;
    for s in p.segments.iter().filter(|s| s.last_revision > p.revision) {
        let stored = fetcher.segment(s).await?;
        let opened = open_segment_blocking(s, stored, identities).await?;
        for r in &opened.revisions {
            diff.add(r);
        }
        read += 1;
    }
    let undone = (p.covered_revision - p.revision).max(0);
    println!(
        "a restore of {cluster} to revision {} undoes {undone} revision(s) up to {} (covered {}), read from {read} segment(s):",
        p.revision,
        p.covered_revision,
        if p.covered_time_ms > 0 { human_ms(p.covered_time_ms) } else { "now".into() }
    );
    let counts = diff.counts();
    if counts.is_empty() {
        println!("  nothing changes");
    } else {
        println!("  {:<40} {:>10} {:>10} {:>10}", "PREFIX", "RESTORED", "REVERTED", "REMOVED");
        for (prefix, c) in counts {
            println!("  {prefix:<40} {:>10} {:>10} {:>10}", c.deleted, c.changed, c.created);
        }
        println!("  (restored: deleted since the point; reverted: changed since; removed: created since)");
    }
    Ok(p.revision)
}
