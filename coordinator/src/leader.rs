//! Leader election among coordinator replicas that share a state etcd: etcd's election API on a lease this
//! replica keeps alive. Only the leader schedules, runs jobs, commits and applies retention; the others
//! redirect clients to it.
//!
//! A replica that cannot renew its lease must stop leading before etcd lets another replica in: it steps down
//! [`STEP_DOWN_MARGIN`] before the lease can have expired, counted from when the last successful renewal was
//! *sent*, so a partition from the state etcd ends its term while the lease still holds off the others.

use std::time::Duration;

use etcd_client::{Client, ElectionClient, LeaseClient};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::{EtcdStoreOptions, StateError};

/// Lease time-to-live: a dead leader is replaced this long after its last renewal (plus an election).
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// A term ends this long before the lease could expire, so two leaders never overlap.
const STEP_DOWN_MARGIN: Duration = Duration::from_secs(1);
/// A failed campaign is retried after this pause.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Bound on a single election or lease request.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// This replica's side of the election.
#[derive(Clone)]
pub struct Election {
    client: Client,
    /// The election's name: `<prefix>leader`.
    name: String,
    /// What this replica announces when it leads: its client address.
    me: String,
}

/// A term of leadership; `lost` fires when it ends (lease not renewed in time, or [`Term::resign`]).
pub struct Term {
    pub lost: CancellationToken,
    /// This term's election key and the revision it was created at: the state store fences every write on
    /// it ([`crate::state::EtcdStore::fence`]), so nothing this replica writes lands after the term ended.
    pub fence: (String, i64),
    lease: i64,
    client: Client,
}

impl Election {
    /// Connects to the state etcd (a connection of its own, so lease renewals do not queue behind state reads).
    pub async fn connect(options: &EtcdStoreOptions, me: String) -> Result<Self, StateError> {
        let client = Client::connect(options.endpoints.clone(), Some(options.connect_options(None)?))
            .await
            .map_err(|e| StateError::Etcd(format!("connect for the leader election: {e}")))?;
        Ok(Self { client, name: format!("{}leader", options.prefix), me })
    }

    /// Campaigns until this replica leads (`Some`) or `cancel` fires (`None`).
    pub async fn campaign(&self, cancel: &CancellationToken) -> Option<Term> {
        loop {
            match self.try_campaign(cancel).await {
                Ok(term) => return term,
                Err(e) => warn!("failed to campaign for leadership, retrying: {e}"),
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY_PAUSE) => {}
                () = cancel.cancelled() => return None,
            }
        }
    }

    async fn try_campaign(&self, cancel: &CancellationToken) -> Result<Option<Term>, String> {
        let mut leases = self.client.lease_client();
        let sent = Instant::now();
        let grant = tokio::time::timeout(RPC_TIMEOUT, leases.grant(LEASE_TTL.as_secs() as i64, None))
            .await
            .map_err(|_| "lease grant timed out".to_string())?
            .map_err(|e| format!("lease grant: {e}"))?;
        let lease = grant.id();
        let lost = CancellationToken::new();
        tokio::spawn(keep_alive(leases, lease, sent + Duration::from_secs(grant.ttl().max(0) as u64), lost.clone()));
        let mut term = Term { lost: lost.clone(), fence: (String::new(), 0), lease, client: self.client.clone() };
        let mut elections: ElectionClient = self.client.election_client();
        tokio::select! {
            r = elections.campaign(self.name.as_str(), self.me.as_str(), lease) => match r {
                Ok(resp) if !lost.is_cancelled() => {
                    let Some(key) = resp.leader() else {
                        term.resign().await;
                        return Err("the campaign answered without a leader key".into());
                    };
                    term.fence = (String::from_utf8_lossy(key.key()).into_owned(), key.rev());
                    info!(lease = format!("{lease:x}"), revision = key.rev(), "elected leader");
                    Ok(Some(term))
                }
                Ok(_) => Err("elected on a lease that just expired".into()),
                Err(e) => {
                    term.resign().await;
                    Err(format!("campaign: {e}"))
                }
            },
            () = lost.cancelled() => {
                term.resign().await;
                Err("lost the lease while campaigning".into())
            }
            () = cancel.cancelled() => {
                term.resign().await;
                Ok(None)
            }
        }
    }

    /// The client address of the current leader, if there is one and etcd answers.
    pub async fn leader(&self) -> Option<String> {
        let mut elections = self.client.election_client();
        let resp = tokio::time::timeout(RPC_TIMEOUT, elections.leader(self.name.as_str())).await.ok()?.ok()?;
        let kv = resp.kv()?;
        kv.value_str().ok().map(str::to_owned)
    }
}

impl Term {
    /// Ends the term now: revokes the lease, which removes this replica's election key so another replica
    /// takes over at once instead of after the lease's time-to-live.
    pub async fn resign(self) {
        self.lost.cancel();
        let mut leases = self.client.lease_client();
        if let Err(e) = tokio::time::timeout(RPC_TIMEOUT, leases.revoke(self.lease))
            .await
            .unwrap_or_else(|_| Err(etcd_client::Error::LeaseKeepAliveError("lease revoke timed out".into())))
        {
            warn!("failed to revoke the leader lease (another replica takes over when it expires): {e}");
        }
    }
}

/// Renews `lease` every [`RENEW_EVERY`] until `lost` fires; fires it when a renewal is overdue.
async fn keep_alive(mut leases: LeaseClient, lease: i64, mut expires: Instant, lost: CancellationToken) {
    let mut stream = None;
    loop {
        if Instant::now() + STEP_DOWN_MARGIN >= expires {
            warn!("the leader lease could not be renewed in time; stepping down");
            lost.cancel();
        }
        tokio::select! {
            () = tokio::time::sleep(RENEW_EVERY) => {}
            () = lost.cancelled() => return,
        }
        if stream.is_none() {
            match tokio::time::timeout(RPC_TIMEOUT.min(RENEW_EVERY), leases.keep_alive(lease)).await {
                Ok(Ok(s)) => stream = Some(s),
                Ok(Err(e)) => warn!("failed to open the lease keep-alive stream: {e}"),
                Err(_) => warn!("opening the lease keep-alive stream timed out"),
            }
        }
        let Some((keeper, responses)) = stream.as_mut() else { continue };
        let sent = Instant::now();
        let renewed = tokio::time::timeout(RENEW_EVERY, async {
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match renewed {
            Ok(Ok(Some(r))) if r.ttl() > 0 => expires = sent + Duration::from_secs(r.ttl() as u64),
            Ok(Ok(Some(_))) => {
                warn!("the leader lease expired; stepping down");
                lost.cancel();
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => stream = None,
        }
    }
}
