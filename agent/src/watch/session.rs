//! The watch loop over any byte stream (a QUIC stream, or a test's duplex playing the coordinator): whole
//! revisions into segments, segments into the spool, the uploader and one writer task for every message to
//! the coordinator, one reader task for its replies.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use ferry_common::protocol::{read_frame, write_frame, FrameError, SegmentTarget, WatchMsg, WatchReply};
use ferry_common::segment::LeaseGrant;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::assemble::{Assembled, Assembler};
use super::clock::Clock;
use super::segmenter::Segmenter;
use super::source::{Input, Leases};
use super::spool::{Spool, SPOOL_FULL};
use super::upload::Uploader;
use crate::metrics::METRICS;

/// How often the open segment's age is looked at (cuts happen without new events too).
const CUT_CHECK: Duration = Duration::from_millis(250);
/// `Covered` at most this often.
const COVERED_EVERY: Duration = Duration::from_secs(1);
/// Messages queued for the writer: small, local-store chunks are 256 KiB each.
const OUT_QUEUE: usize = 8;
/// Lease ids remembered, and new ones looked up per cut (the rest at the next cut).
const MAX_KNOWN_LEASES: usize = 100_000;
const MAX_NEW_LEASES_PER_CUT: usize = 1_000;
/// Time a cut may spend looking up new leases (the watch waits meanwhile); the rest at the next cut.
const LEASE_LOOKUP_BUDGET: Duration = Duration::from_secs(2);
/// How long the last messages (`Failed`) get to leave.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Everything one watch needs besides its streams.
pub struct Session<L> {
    pub assembler: Assembler,
    pub segmenter: Segmenter,
    pub spool: Spool,
    pub leases: L,
    pub clock: Clock,
    pub target: SegmentTarget,
    /// The sha256 of the last segment stored (the next trailer names it).
    pub prev_sha256: [u8; 32],
    /// Where the etcd watch resumes after a break.
    pub next: Arc<AtomicI64>,
    pub input: mpsc::Receiver<Input>,
}

/// How a watch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The coordinator said `Stop`.
    Stopped(String),
    /// The coordinator closed the stream.
    Closed,
    /// Our side failed (sent as `Failed`).
    Failed(String),
}

impl<L: Leases> Session<L> {
    /// Runs the watch, `started` sent first, until it ends; the spool is left for the caller to clean.
    pub async fn run<R, W>(mut self, started: WatchMsg, send: W, mut recv: R, cancel: CancellationToken) -> Ended
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out, out_rx) = mpsc::channel::<WatchMsg>(OUT_QUEUE);
        let writer = tokio::spawn(write_all(send, out_rx));
        let tasks = cancel.child_token();
        let _stop_tasks = tasks.clone().drop_guard();
        let (reply_tx, replies) = mpsc::channel::<WatchReply>(4);
        let mut reader = tokio::spawn(async move {
            loop {
                match read_frame::<_, WatchReply>(&mut recv).await {
                    Ok(Some(WatchReply::Stop { reason })) => return Ended::Stopped(reason),
                    Ok(Some(reply)) => {
                        if reply_tx.send(reply).await.is_err() {
                            return Ended::Closed;
                        }
                    }
                    Ok(None) => return Ended::Closed,
                    Err(e) => return Ended::Failed(format!("read the coordinator's replies: {e}")),
                }
            }
        });
        let uploader = Uploader {
            spool: self.spool.clone(),
            out: out.clone(),
            replies,
            target: self.target.clone(),
            clock: self.clock.clone(),
            cancel: tasks.clone(),
        };
        let mut uploader = tokio::spawn(uploader.run());
        let ended = if out.send(started).await.is_err() {
            Ended::Failed("the watch stream is closed".into())
        } else {
            tokio::select! {
                ended = self.watch(&out, &cancel) => ended,
                r = &mut reader => r.unwrap_or_else(|e| Ended::Failed(format!("reader task: {e}"))),
                r = &mut uploader => match r {
                    Ok(Ok(())) => Ended::Failed("the uploader stopped".into()),
                    Ok(Err(e)) => Ended::Failed(format!("{e:#}")),
                    Err(e) => Ended::Failed(format!("uploader task: {e}")),
                },
            }
        };
        tasks.cancel();
        reader.abort();
        uploader.abort();
        if let Ended::Failed(error) = &ended {
            let _ = tokio::time::timeout(FLUSH_WAIT, out.send(WatchMsg::Failed { error: error.clone() })).await;
        }
        drop(out);
        let _ = tokio::time::timeout(FLUSH_WAIT, writer).await;
        info!(next = self.assembler.next(), duplicates = self.assembler.duplicates, "the watch ended");
        ended
    }

    /// The etcd side: until etcd fails, the writer fails or `cancel` fires.
    async fn watch(&mut self, out: &mpsc::Sender<WatchMsg>, cancel: &CancellationToken) -> Ended {
        let mut cut_check = tokio::time::interval(CUT_CHECK);
        let mut covered_check = tokio::time::interval(COVERED_EVERY);
        let mut covered = self.assembler.next() - 1;
        let mut known = HashSet::new();
        let mut found = Vec::new();
        loop {
            let step = tokio::select! {
                _ = cancel.cancelled() => return Ended::Failed("the agent is shutting down".into()),
                input = self.input.recv() => match input {
                    Some(Input::Response(resp)) => {
                        self.assembler.push(resp, self.clock.now_ms(), &mut found);
                        self.take(&mut found, &mut known).await
                    }
                    Some(Input::Interrupted) => {
                        self.assembler.interrupted();
                        Ok(())
                    }
                    Some(Input::Failed(e)) => return Ended::Failed(e),
                    None => return Ended::Failed("etcd's watch ended".into()),
                },
                _ = cut_check.tick() => {
                    if self.segmenter.due(Instant::now()) {
                        self.cut(&mut known).await
                    } else {
                        Ok(())
                    }
                }
                _ = covered_check.tick() => {
                    let proven = self.assembler.proven();
                    if proven > covered && self.segmenter.range().is_none() && self.spool.is_empty() {
                        covered = proven;
                        out.send(WatchMsg::Covered { revision: proven }).await.map_err(|_| anyhow!("the watch stream is closed"))
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(e) = step {
                return Ended::Failed(format!("{e:#}"));
            }
        }
    }

    /// Puts what the assembler found into segments.
    async fn take(&mut self, found: &mut Vec<Assembled>, known: &mut HashSet<i64>) -> Result<()> {
        for a in std::mem::take(found) {
            match a {
                Assembled::Revision(r) => {
                    self.segmenter.push(&r, Instant::now())?;
                    METRICS.changelog_revisions.inc();
                    if self.segmenter.due(Instant::now()) {
                        self.cut(known).await?;
                    }
                }
                Assembled::Gap { from, to, reason } => {
                    // A segment's revisions rise by one: the gap closes the open one.
                    self.cut(known).await?;
                    warn!(from, to, "change-log gap: {reason}");
                    self.gap(from, to, &reason);
                }
            }
        }
        self.next.store(self.assembler.next(), Ordering::SeqCst);
        Ok(())
    }

    fn gap(&self, from: i64, to: i64, reason: &str) {
        METRICS.changelog_gaps.inc();
        self.spool.gap(from, to, reason);
    }

    /// Cuts the open segment (if any) and spools it, or records a gap when the spool is full.
    async fn cut(&mut self, known: &mut HashSet<i64>) -> Result<()> {
        let Some((_, last)) = self.segmenter.range() else { return Ok(()) };
        let (grants, listed) = self.lease_grants(known, last).await;
        let Some(cut) = self.segmenter.take() else { return Ok(()) };
        // Finishing zstd, sealing, hashing and writing a few MiB: off the async threads.
        let (prev, spool, leases) = (self.prev_sha256, self.spool.clone(), grants.clone());
        let (info, spooled) = tokio::task::spawn_blocking(move || {
            let sealed = cut.seal(&leases, prev)?;
            let spooled = spool.offer(sealed.info.clone(), &sealed.bytes)?;
            Ok::<_, anyhow::Error>((sealed.info, spooled))
        })
        .await
        .map_err(|e| anyhow!("sealing task: {e}"))??;
        METRICS.changelog_segments.inc();
        let (first, last) = (info.first_revision, info.last_revision);
        if spooled {
            self.prev_sha256 = info.sha256;
            if let Some(listed) = listed {
                known.retain(|id| listed.contains(id));
            }
            known.extend(grants.iter().map(|g| g.id).take(MAX_KNOWN_LEASES.saturating_sub(known.len())));
            tracing::debug!(first, last, size = info.size, "segment spooled");
        } else {
            warn!(first, last, spooled = self.spool.bytes(), "the spool is full: segment dropped");
            self.gap(first, last, SPOOL_FULL);
        }
        Ok(())
    }

    /// The leases etcd holds that no stored segment recorded yet, and every lease etcd holds (`None` when
    /// etcd could not say: the segment goes without lease records).
    async fn lease_grants(&mut self, known: &HashSet<i64>, last: i64) -> (Vec<LeaseGrant>, Option<HashSet<i64>>) {
        let listed = match self.leases.list().await {
            Ok(l) => l,
            Err(e) => {
                warn!("no lease records in this segment: {e:#}");
                return (Vec::new(), None);
            }
        };
        let mut grants = Vec::new();
        let started = Instant::now();
        for &id in listed.iter().filter(|id| !known.contains(id)).take(MAX_NEW_LEASES_PER_CUT) {
            if started.elapsed() >= LEASE_LOOKUP_BUDGET {
                break;
            }
            match self.leases.granted_ttl(id).await {
                Ok(Some(ttl)) => grants.push(LeaseGrant { id, granted_ttl: ttl, seen_at_revision: last }),
                Ok(None) => {}
                Err(e) => {
                    warn!("lease records of this segment are incomplete: {e:#}");
                    break;
                }
            }
        }
        (grants, Some(listed.into_iter().collect()))
    }
}

/// The writer task: every message to the coordinator, in order; the stream is finished when all senders
/// are gone.
async fn write_all<W: AsyncWrite + Unpin>(mut send: W, mut rx: mpsc::Receiver<WatchMsg>) -> Result<(), FrameError> {
    while let Some(msg) = rx.recv().await {
        if let Err(e) = write_frame(&mut send, &msg).await {
            info!("the watch stream broke: {e}");
            return Err(e);
        }
    }
    send.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::assemble::Response;
    use crate::watch::segmenter::tests::{params, read};
    use ferry_common::protocol::expect_frame;
    use ferry_common::resources::Timestamp;
    use ferry_common::segment::{Event, EventKind};

    struct FakeLeases;

    impl Leases for FakeLeases {
        async fn list(&mut self) -> Result<Vec<i64>> {
            Ok(vec![7])
        }
        async fn granted_ttl(&mut self, _id: i64) -> Result<Option<i64>> {
            Ok(Some(60))
        }
    }

    fn put(rev: i64, key: &str) -> (i64, Event) {
        let e = Event {
            kind: EventKind::Put,
            key: key.into(),
            value: b"v".to_vec(),
            create_revision: rev,
            version: 1,
            lease: 0,
        };
        (rev, e)
    }

    struct Harness {
        tx: mpsc::Sender<Input>,
        send: tokio::io::WriteHalf<tokio::io::DuplexStream>,
        recv: tokio::io::ReadHalf<tokio::io::DuplexStream>,
        done: tokio::task::JoinHandle<Ended>,
        _dir: tempfile::TempDir,
    }

    fn start(from: i64, spool_bytes: u64) -> Harness {
        start_to(from, spool_bytes, SegmentTarget::Coordinator)
    }

    fn start_to(from: i64, spool_bytes: u64, target: SegmentTarget) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (tx, input) = mpsc::channel(16);
        let session = Session {
            assembler: Assembler::new(from),
            segmenter: Segmenter::new(params(Duration::from_millis(200), u64::MAX)),
            spool: Spool::open(dir.path(), spool_bytes).unwrap(),
            leases: FakeLeases,
            clock: Clock::new(Timestamp { seconds: 1_000, nanos: 0 }, Instant::now()),
            target,
            prev_sha256: [5; 32],
            next: Arc::new(AtomicI64::new(from)),
            input,
        };
        let (agent, coordinator) = tokio::io::duplex(1 << 20);
        let (agent_recv, agent_send) = tokio::io::split(agent);
        let (recv, send) = tokio::io::split(coordinator);
        let started = WatchMsg::Started { from_revision: from, member_id: 3, etcd_version: "3.5.16".into() };
        let done = tokio::spawn(session.run(started, agent_send, agent_recv, CancellationToken::new()));
        Harness { tx, send, recv, done, _dir: dir }
    }

    impl Harness {
        async fn msg(&mut self) -> WatchMsg {
            tokio::time::timeout(Duration::from_secs(10), expect_frame(&mut self.recv)).await.unwrap().unwrap()
        }

        async fn events(&self, events: Vec<(i64, Event)>) {
            self.tx.send(Input::Response(Response { events, ..Default::default() })).await.unwrap();
        }

        /// A segment sent on the stream: its announcement and bytes.
        async fn segment(&mut self) -> (ferry_common::protocol::SegmentInfo, Vec<u8>) {
            let WatchMsg::Segment(info) = self.msg().await else { panic!("a segment") };
            let mut bytes = Vec::new();
            loop {
                match self.msg().await {
                    WatchMsg::SegmentData(d) => bytes.extend(d),
                    WatchMsg::SegmentEnd => break,
                    other => panic!("{other:?}"),
                }
            }
            (info, bytes)
        }

        async fn stored(&mut self, info: &ferry_common::protocol::SegmentInfo) {
            let reply = WatchReply::Stored {
                first_revision: info.first_revision,
                last_revision: info.last_revision,
                coordinator_time: Timestamp { seconds: 2_000, nanos: 0 },
            };
            write_frame(&mut self.send, &reply).await.unwrap();
        }
    }

    #[tokio::test]
    async fn revisions_become_chained_segments_then_idle_time_is_covered() {
        let mut h = start(10, 1 << 20);
        assert!(matches!(h.msg().await, WatchMsg::Started { from_revision: 10, .. }));
        h.events(vec![put(10, "/a"), put(10, "/b"), put(11, "/c")]).await;
        let (info, bytes) = h.segment().await;
        assert_eq!((info.first_revision, info.last_revision, info.events), (10, 11, 3));
        assert_eq!(info.prev_sha256, [5; 32], "the first segment names the assignment's last one");
        assert_eq!(info.size, bytes.len() as u64);
        let (revs, trailer) = read(&bytes);
        assert_eq!(revs.len(), 2);
        assert!(revs[0].time_ms >= 1_000_000 && revs[0].time_ms < 1_010_000, "coordinator time");
        assert_eq!(trailer.prev_sha256, [5; 32]);
        h.stored(&info).await;
        // A skipped revision: the open segment is cut before the gap, then the gap, then the rest.
        h.events(vec![put(12, "/d"), put(14, "/e")]).await;
        let (second, _) = h.segment().await;
        assert_eq!((second.first_revision, second.last_revision), (12, 12));
        use sha2::Digest;
        assert_eq!(info.sha256, <[u8; 32]>::from(sha2::Sha256::digest(&bytes)), "the stored object's hash");
        assert_eq!(second.prev_sha256, info.sha256, "the chain links stored objects");
        h.stored(&second).await;
        assert!(matches!(h.msg().await, WatchMsg::Gap { from_revision: 13, to_revision: 13, .. }));
        let (third, bytes) = h.segment().await;
        assert_eq!((third.first_revision, third.last_revision), (14, 14));
        assert_eq!(third.prev_sha256, second.sha256);
        assert_eq!(read(&bytes).0[0].events[0].key, b"/e");
        h.stored(&third).await;
        // Idle: progress at 14 proves nothing new; at 14 after everything was stored, Covered.
        h.tx.send(Input::Response(Response { header_revision: 14, ..Default::default() })).await.unwrap();
        assert!(matches!(h.msg().await, WatchMsg::Covered { revision: 14 }));
        write_frame(&mut h.send, &WatchReply::Stop { reason: "over".into() }).await.unwrap();
        assert_eq!(h.done.await.unwrap(), Ended::Stopped("over".into()));
    }

    #[tokio::test]
    async fn a_full_spool_is_a_gap_and_the_watch_goes_on() {
        // Room for one small segment: the coordinator takes none, so the next ones are dropped.
        let mut h = start(1, 150);
        assert!(matches!(h.msg().await, WatchMsg::Started { .. }));
        h.events(vec![put(1, "/a")]).await;
        let (first, _) = h.segment().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.events(vec![put(2, "/b")]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.events(vec![put(3, "/c")]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        h.stored(&first).await;
        match h.msg().await {
            WatchMsg::Gap { from_revision: 2, to_revision: 3, reason } => assert_eq!(reason, SPOOL_FULL),
            other => panic!("{other:?}"),
        }
        h.tx.send(Input::Failed("etcd is gone".into())).await.unwrap();
        assert!(matches!(h.msg().await, WatchMsg::Failed { .. }), "etcd's side ended: Failed");
        assert!(matches!(h.done.await.unwrap(), Ended::Failed(_)));
    }

    /// A one-connection-at-a-time HTTP server answering every request with `statuses` in turn; returns its
    /// address and the bodies and headers it received.
    async fn s3_stub(statuses: Vec<u16>) -> (String, mpsc::Receiver<(String, Vec<u8>)>) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            for status in statuses {
                let (conn, _) = listener.accept().await.unwrap();
                let mut conn = BufReader::new(conn);
                let (mut head, mut len) = (String::new(), 0usize);
                loop {
                    let mut line = String::new();
                    conn.read_line(&mut line).await.unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; len];
                conn.read_exact(&mut body).await.unwrap();
                let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                conn.get_mut().write_all(reply.as_bytes()).await.unwrap();
                let _ = tx.send((head, body)).await;
            }
        });
        (format!("http://{addr}"), rx)
    }

    fn presigned(base: &str, info: &ferry_common::protocol::SegmentInfo) -> ferry_common::protocol::PresignedRequest {
        ferry_common::protocol::PresignedRequest {
            method: "PUT".into(),
            url: format!("{base}/bucket/seg-{}?X-Amz-Signature=secret", info.first_revision),
            headers: vec![("If-None-Match".into(), "*".into()), ("x-test".into(), "signed".into())],
            expires_at: Timestamp { seconds: 4_000_000_000, nanos: 0 },
        }
    }

    #[tokio::test]
    async fn s3_segments_are_put_with_the_signed_headers_and_an_existing_object_fails_the_watch() {
        let (base, mut received) = s3_stub(vec![200, 412]).await;
        let mut h = start_to(1, 1 << 20, SegmentTarget::S3 { cacert: String::new() });
        assert!(matches!(h.msg().await, WatchMsg::Started { .. }));
        h.events(vec![put(1, "/a")]).await;
        let WatchMsg::Segment(info) = h.msg().await else { panic!("a segment") };
        let url = WatchReply::SegmentUrl { first_revision: 1, request: presigned(&base, &info) };
        write_frame(&mut h.send, &url).await.unwrap();
        assert!(matches!(h.msg().await, WatchMsg::Uploaded { first_revision: 1 }));
        let (head, body) = received.recv().await.unwrap();
        assert!(head.starts_with("PUT /bucket/seg-1?X-Amz-Signature=secret"), "{head}");
        assert!(head.to_ascii_lowercase().contains("if-none-match: *"), "{head}");
        assert_eq!(body.len() as u64, info.size);
        assert_eq!(read(&body).0[0].revision, 1);
        h.stored(&info).await;
        // The next object exists already: not retried, the watch fails saying so.
        h.events(vec![put(2, "/b")]).await;
        let WatchMsg::Segment(info) = h.msg().await else { panic!("a segment") };
        let url = WatchReply::SegmentUrl { first_revision: 2, request: presigned(&base, &info) };
        write_frame(&mut h.send, &url).await.unwrap();
        match h.msg().await {
            WatchMsg::Failed { error } => assert!(error.contains("already exists"), "{error}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(h.done.await.unwrap(), Ended::Failed(_)));
    }
}
