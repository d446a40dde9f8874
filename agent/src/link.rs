//! The agent's link to the coordinator: dial (agents may sit behind NAT, so they always dial), say hello,
//! report etcd facts periodically, and run the jobs the coordinator sends. Reconnects with backoff whenever
//! the link drops, and starts fine before the coordinator is up.
//!
//! The coordinator may be several replicas (`--coordinator ADDR,ADDR,…`): the agent dials them in turn, and a
//! replica that does not lead names the one that does, which the agent dials next.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_common::backoff::Backoff;
use ferry_common::client::{bind_address_for, coordinator_addresses};
use ferry_common::config::AgentCredentials;
use ferry_common::protocol::{
    expect_frame, read_frame, write_frame, AgentMsg, EtcdFacts, Hello, HelloReply, Intent, JobRequest, RenewAnswer,
    RenewCsr, RenewReply,
};
use ferry_common::tls::{
    key_matches_certificate, new_key_and_csr, pem_serial_and_expiry, quinn_agent_config, resolve, CertifiedPem,
    Identity,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::etcd::EtcdMember;
use crate::metrics::METRICS;

/// How often the agent reports its member's facts.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Reconnect backoff: jittered, so a restarted coordinator is not hit by every agent at once.
const RECONNECT_BACKOFF: Backoff = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(30), jitter: 0.5 };
/// A QUIC handshake that takes longer than this is abandoned and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// With several coordinator replicas a silent one is given up on sooner: another answers (a dead leader is
/// dialed last in a round, and its 10 s would delay the next round; ferryctl does the same).
const REPLICA_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause before dialing the next replica or the leader a replica named (no backoff within a round).
const NEXT_REPLICA_DELAY: Duration = Duration::from_millis(200);

/// How long running backups get to finish after SIGTERM before they are cancelled (and their uploads aborted).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long the agent waits for the coordinator's answer to its signing request, and for the end of the
/// renewal stream after its own answer.
const RENEW_ANSWER_WAIT: Duration = Duration::from_secs(30);
/// After saving a renewed certificate, how often the agent looks whether its job streams are done, to end the
/// link and reconnect with the new certificate (whose first use revokes the old one at the coordinator).
const SWITCH_CHECK: Duration = Duration::from_secs(1);

pub struct Link {
    pub coordinator: String,
    /// The `--credentials` directory: read before every connection, so a renewed certificate saved there
    /// (or one an operator put there) is used from the next connection on.
    pub credentials_dir: std::path::PathBuf,
    /// The credentials last read successfully; used when the directory cannot be read.
    pub credentials: AgentCredentials,
    pub etcd: EtcdMember,
    /// Running backup jobs, waited for at shutdown.
    pub jobs: tokio_util::task::TaskTracker,
    /// How this node runs the compression.
    pub pipeline: crate::job::PipelineSettings,
    /// The member's gate and data dir, for orchestrated restores (`None`: the agent takes no part in them).
    pub restore: Option<crate::restore_steps::RestoreSetup>,
    /// Restore steps run one at a time.
    pub restore_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Where a change-log watch spools its segments.
    pub spool_dir: std::path::PathBuf,
}

impl Link {
    /// Runs until `cancel` fires; then waits up to [`SHUTDOWN_GRACE`] for running jobs, and cancels them
    /// through `jobs_cancel` if they are still running.
    pub async fn run(mut self, cancel: CancellationToken, jobs_cancel: CancellationToken) -> Result<()> {
        let mut client = quinn_agent_config(&self.credentials.ca_pem, &self.credentials.client)
            .context("build TLS config from --credentials")?;
        // One UDP socket per address family, made when the coordinator's address first resolves to it: a socket
        // bound to 0.0.0.0 cannot reach an IPv6 coordinator, nor one bound to [::] an IPv4 one everywhere.
        let mut endpoint: Option<quinn::Endpoint> = None;
        let mut failures: u32 = 0;
        let mut last_facts = EtcdFacts::default();
        let addresses = coordinator_addresses(&self.coordinator);
        anyhow::ensure!(!addresses.is_empty(), "--coordinator names no address");
        // The replica to dial next, dials in this round (a backoff after each full round), and the leader a
        // replica named (dialed first when set).
        let (mut next, mut round, mut redirect) = (0usize, 0usize, None::<String>);
        while !cancel.is_cancelled() {
            let target = redirect.take().unwrap_or_else(|| addresses[next % addresses.len()].clone());
            self.reload_credentials(&mut client);
            let client = &client;
            let mut linked = false;
            let result = async {
                let (addr, server_name) = resolve(&target).await?;
                let bind = bind_address_for(addr);
                let ep = match endpoint.take() {
                    Some(ep) if ep.local_addr().is_ok_and(|a| a.is_ipv6() == bind.is_ipv6()) => ep,
                    old => {
                        if let Some(old) = old {
                            old.close(0u32.into(), b"address family changed");
                        }
                        let ep = quinn::Endpoint::client(bind).with_context(|| format!("open UDP socket on {bind}"))?;
                        ep
                    }
                };
                let ep = endpoint.insert(ep);
                ep.set_default_client_config(client.clone());
                self.session(ep, addr, &server_name, &cancel, &jobs_cancel, &mut last_facts, &mut failures, &mut linked)
                    .await
            }
            .await;
            match result {
                Ok(Some(leader)) => {
                    info!(?leader, "{target} does not lead; dialing the leader");
                    redirect = leader.filter(|l| *l != target);
                }
                Ok(None) => {}
                Err(e) => warn!("coordinator link to {target} failed: {e:#}"),
            }
            if cancel.is_cancelled() {
                break;
            }
            // A link that was up just ended (a SIGKILLed leader): the other replicas first, from the one after
            // it, in a fresh round; the one that failed comes last.
            if linked {
                if let Some(p) = addresses.iter().position(|a| *a == target) {
                    next = p;
                }
                round = 0;
            }
            // Another replica or the leader is worth a try at once; after a whole round, back off.
            if redirect.is_none() {
                next += 1;
                round += 1;
            }
            if redirect.is_some() || round < addresses.len() {
                tokio::select! {
                    _ = tokio::time::sleep(NEXT_REPLICA_DELAY) => {}
                    _ = cancel.cancelled() => {}
                }
                continue;
            }
            round = 0;
            failures = failures.saturating_add(1);
            let delay = RECONNECT_BACKOFF.delay(failures);
            info!(delay_ms = delay.as_millis() as u64, "reconnecting to the coordinator");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => {}
            }
        }
        drain(&self.jobs, &jobs_cancel).await;
        if let Some(endpoint) = endpoint {
            endpoint.close(0u32.into(), b"agent shutting down");
            endpoint.wait_idle().await;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn session(
        &self,
        endpoint: &quinn::Endpoint,
        addr: std::net::SocketAddr,
        server_name: &str,
        cancel: &CancellationToken,
        jobs_cancel: &CancellationToken,
        last_facts: &mut EtcdFacts,
        failures: &mut u32,
        linked: &mut bool,
    ) -> Result<Option<Option<String>>> {
        let connecting = endpoint.connect(addr, server_name).context("start QUIC connection")?;
        let limit =
            if coordinator_addresses(&self.coordinator).len() > 1 { REPLICA_CONNECT_TIMEOUT } else { CONNECT_TIMEOUT };
        let conn = tokio::time::timeout(limit, connecting)
            .await
            .context("QUIC handshake timed out")?
            .context("QUIC handshake")?;
        let (mut send, mut recv) = conn.open_bi().await.context("open control stream")?;
        write_frame(&mut send, &Hello::new(Intent::AgentLink)).await.context("send hello")?;
        match expect_frame(&mut recv).await.context("read hello reply")? {
            HelloReply::Ok { software_version, .. } => info!(%software_version, "registered with the coordinator"),
            HelloReply::Refused { reason } => bail!("the coordinator refused this agent: {reason}"),
            HelloReply::NotLeader { leader } => {
                conn.close(0u32.into(), b"going to the leader");
                return Ok(Some(leader));
            }
        }
        *failures = 0;
        *linked = true;
        METRICS.coordinator_connected.set(1);
        let _disconnected = DisconnectedOnDrop;
        let mut ticker = tokio::time::interval(REPORT_INTERVAL);
        // A renewed certificate was saved: the link ends (and the agent dials again with it) as soon as no job
        // stream is open, so the old certificate stops being used early and the new one is proven.
        let renewed = std::sync::Arc::new(tokio::sync::Notify::new());
        let open_streams = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut switch_to_renewed = false;
        let mut switch_check = tokio::time::interval(SWITCH_CHECK);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let facts = self.facts(last_facts).await;
                    write_frame(&mut send, &AgentMsg::Report(facts)).await.context("send report")?;
                }
                () = renewed.notified(), if !switch_to_renewed => {
                    info!("reconnecting with the renewed certificate once no job runs");
                    switch_to_renewed = true;
                }
                _ = switch_check.tick(), if switch_to_renewed => {
                    if open_streams.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                        info!("reconnecting with the renewed certificate");
                        conn.close(0u32.into(), b"reconnecting with a renewed certificate");
                        return Ok(None);
                    }
                }
                incoming = conn.accept_bi() => {
                    let (job_send, mut job_recv) = incoming.context("coordinator link closed")?;
                    let open = StreamOpen::new(&open_streams);
                    let renewed = renewed.clone();
                    let etcd = self.etcd.clone();
                    let pipeline = self.pipeline;
                    let credentials_dir = self.credentials_dir.clone();
                    let restore = self.restore.clone();
                    let restore_lock = self.restore_lock.clone();
                    let watch_settings = crate::watch::WatchSettings {
                        cluster: self.cluster(),
                        spool_dir: self.spool_dir.clone(),
                    };
                    // Jobs get their own token: at shutdown they may finish within the grace period.
                    let cancel = jobs_cancel.child_token();
                    // Created here so the job's span hangs under this agent's (cluster, member) span.
                    let job_span = info_span!("job");
                    self.jobs.spawn(async move {
                        let _open = open;
                        let request: JobRequest = match expect_frame(&mut job_recv).await {
                            Ok(r) => r,
                            Err(e) => return warn!("failed to read job request: {e:#}"),
                        };
                        match request {
                            JobRequest::Backup(job) => {
                                let span = info_span!(parent: &job_span, "backup", backup_id = %job.backup_id);
                                async move {
                                    info!(zstd_level = job.zstd_level, "backup started");
                                    match crate::job::run(etcd, job, pipeline, job_send, job_recv, cancel).await {
                                        Ok(()) => info!("backup committed"),
                                        Err(e) => warn!("backup failed: {e:#}"),
                                    }
                                }.instrument(span).await
                            }
                            JobRequest::RenewCredentials => {
                                let span = info_span!(parent: &job_span, "renew");
                                async move {
                                    let mut send = job_send;
                                    match renew(&credentials_dir, &mut send, &mut job_recv).await {
                                        Ok(()) => renewed.notify_one(),
                                        Err(e) => warn!("failed to renew the certificate: {e:#}"),
                                    }
                                }.instrument(span).await
                            }
                            JobRequest::Restore(step) => {
                                let span = info_span!(parent: &job_span, "restore_step");
                                crate::restore_steps::run(etcd, restore, restore_lock, step, job_send, job_recv, cancel)
                                    .instrument(span)
                                    .await
                            }
                            JobRequest::Watch(assignment) => {
                                let span = info_span!(parent: &job_span, "watch", epoch = assignment.epoch);
                                async move {
                                    info!(from_revision = assignment.from_revision, "change-log watch started");
                                    match crate::watch::run(etcd, *assignment, watch_settings, job_send, job_recv, cancel).await {
                                        Ok(()) => info!("change-log watch ended"),
                                        Err(e) => warn!("change-log watch failed: {e:#}"),
                                    }
                                }.instrument(span).await
                            }
                            JobRequest::HashKv { revision } => {
                                let span = info_span!(parent: &job_span, "hashkv", revision);
                                async move {
                                    let reply = etcd.hash_kv(revision).await;
                                    let mut send = job_send;
                                    if let Err(e) = write_frame(&mut send, &reply).await {
                                        return warn!("failed to send HashKV reply: {e:#}");
                                    }
                                    let _ = send.finish();
                                }.instrument(span).await
                            }
                        }
                    });
                }
                _ = cancel.cancelled() => {
                    // Take no new jobs, but keep the link (which running jobs stream over) until they finish
                    // or the grace period ends.
                    drain(&self.jobs, jobs_cancel).await;
                    conn.close(0u32.into(), b"agent shutting down");
                    return Ok(None);
                }
            }
        }
    }

    /// Reads the credentials directory again; a change (a renewed certificate) takes effect for the next
    /// connection. Unreadable or unusable files keep the last good credentials in use.
    fn reload_credentials(&mut self, client: &mut quinn::ClientConfig) {
        let loaded = match AgentCredentials::load(&self.credentials_dir) {
            Ok(c) => c,
            Err(e) => return warn!("failed to read --credentials again, keeping the ones in use: {e}"),
        };
        if loaded.client.cert_pem == self.credentials.client.cert_pem && loaded.ca_pem == self.credentials.ca_pem {
            return;
        }
        match quinn_agent_config(&loaded.ca_pem, &loaded.client) {
            Ok(c) => {
                info!("using the new certificate in --credentials");
                *client = c;
                self.credentials = loaded;
            }
            Err(e) => warn!("the new certificate in --credentials is unusable, keeping the one in use: {e}"),
        }
    }

    /// The cluster this agent's certificate names (empty if it names none: not an agent certificate).
    fn cluster(&self) -> String {
        match Identity::from_pem(&self.credentials.client.cert_pem) {
            Ok(Identity::Agent { cluster, .. }) => cluster,
            _ => String::new(),
        }
    }

    /// Current facts, or the last good ones marked with the error when etcd cannot be reached.
    async fn facts(&self, last: &mut EtcdFacts) -> EtcdFacts {
        match self.etcd.facts().await {
            Ok(f) => {
                METRICS.etcd_up.set(1);
                *last = f.clone();
                f
            }
            Err(e) => {
                METRICS.etcd_up.set(0);
                warn!("failed to read etcd member status: {e:#}");
                EtcdFacts { error: Some(format!("{e:#}")), ..last.clone() }
            }
        }
    }
}

/// One renewal, on the stream the coordinator opened: a new key pair made here, a signing request for it sent,
/// the certificate the coordinator signed saved beside the key as a new version of the credentials directory
/// ([`AgentCredentials::save_version`]). The key never leaves this process but into that directory. Ends
/// once the coordinator has read the answer (it ends the stream), so that a reconnect does not cut it off.
async fn renew(dir: &std::path::Path, send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) -> Result<()> {
    let current = AgentCredentials::load(dir).context("read the credentials in use")?;
    let identity = Identity::from_pem(&current.client.cert_pem)?;
    let new = new_key_and_csr(&identity).context("make a key pair")?;
    write_frame(send, &RenewCsr { csr_pem: new.csr_pem.clone() }).await.context("send the signing request")?;
    let answer = tokio::time::timeout(RENEW_ANSWER_WAIT, expect_frame(recv))
        .await
        .context("no answer to the signing request within the timeout")?
        .context("read the answer to the signing request")?;
    let (cert_pem, ca_pem) = match answer {
        RenewAnswer::Signed { cert_pem, ca_pem, serial: _, not_after: _ } => (cert_pem, ca_pem),
        RenewAnswer::Refused { reason } => bail!("the coordinator refused the signing request: {reason}"),
    };
    let saved = save_renewed(dir, &identity, CertifiedPem { cert_pem, key_pem: new.key_pem }, ca_pem);
    let reply = match &saved {
        Ok(()) => RenewReply::Saved,
        Err(e) => {
            warn!("failed to save the renewed certificate: {e:#}");
            RenewReply::Failed { error: format!("{e:#}") }
        }
    };
    write_frame(send, &reply).await.context("answer the renewal")?;
    let _ = send.finish();
    let _ = tokio::time::timeout(RENEW_ANSWER_WAIT, read_frame::<_, RenewAnswer>(recv)).await;
    saved
}

/// Saves a renewed certificate and its key as a new version of the credentials directory (switched to with
/// one rename), after checking that it is for the same cluster and member as the one in use, that the key is
/// the certificate's, and that the pair builds a TLS config.
fn save_renewed(dir: &std::path::Path, identity: &Identity, client: CertifiedPem, ca_pem: String) -> Result<()> {
    let new = Identity::from_pem(&client.cert_pem)?;
    anyhow::ensure!(new == *identity, "the renewed certificate is for {new:?}, not {identity:?}");
    anyhow::ensure!(
        key_matches_certificate(&client.cert_pem, &client.key_pem)?,
        "the renewed certificate is not for the key this agent made"
    );
    let (serial, not_after) = pem_serial_and_expiry(&client.cert_pem)?;
    let creds = AgentCredentials { ca_pem, client };
    // The pair must work before it replaces the one in use.
    quinn_agent_config(&creds.ca_pem, &creds.client).context("check the renewed certificate")?;
    let version = creds.save_version(dir, &serial).with_context(|| format!("write {}", dir.display()))?;
    let not_after = ferry_common::resources::Timestamp::from(not_after);
    info!(%serial, not_after = %not_after.human(), version = %version.display(), "saved the renewed certificate");
    Ok(())
}

/// A job stream open on the link, counted until its task ends.
struct StreamOpen(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl StreamOpen {
    fn new(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Lets running jobs finish within [`SHUTDOWN_GRACE`], then cancels the rest and waits for their cleanup.
async fn drain(jobs: &tokio_util::task::TaskTracker, jobs_cancel: &CancellationToken) {
    jobs.close();
    if jobs.is_empty() {
        return;
    }
    info!(grace_s = SHUTDOWN_GRACE.as_secs(), "waiting for running backups before exiting");
    if tokio::time::timeout(SHUTDOWN_GRACE, jobs.wait()).await.is_err() {
        warn!("backups still running after the grace period; cancelling them (their uploads are aborted)");
        jobs_cancel.cancel();
        jobs.wait().await;
    }
}

/// Marks the link down when a session ends, however it ends.
struct DisconnectedOnDrop;

impl Drop for DisconnectedOnDrop {
    fn drop(&mut self) {
        METRICS.coordinator_connected.set(0);
    }
}
