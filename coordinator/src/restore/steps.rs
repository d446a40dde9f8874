//! Sending one restore step to one agent and reading its answer.

use std::time::Duration;

use ferry_common::protocol::{
    expect_frame_within, write_frame, JobRequest, RebuildPlan, RestoreStep, StepDone, StepMsg, MAX_AGENT_MESSAGE_FRAME,
};

use crate::agents::LiveAgent;
use crate::api::Api;
use crate::store::Manifest;

/// Why a step has no result.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum StepError {
    /// The link broke or the agent did not answer in time: the step may be sent again (every step is
    /// idempotent on the agent).
    #[error("{0}")]
    Lost(String),
    /// The agent answered that the step failed; `touched`: after changing the data dir.
    #[error("{error}")]
    Failed { error: String, touched: bool },
}

/// Sends `step` and waits for its result.
pub(super) async fn ask(agent: &LiveAgent, step: RestoreStep, limit: Duration) -> Result<StepDone, StepError> {
    let asked = async {
        let (mut send, mut recv) =
            agent.conn.open_bi().await.map_err(|e| StepError::Lost(format!("open stream: {e}")))?;
        write_frame(&mut send, &JobRequest::Restore(step))
            .await
            .map_err(|e| StepError::Lost(format!("send step: {e}")))?;
        let _ = send.finish();
        read_result(&mut recv, &mut |_| {}).await
    };
    match tokio::time::timeout(limit, asked).await {
        Ok(r) => r,
        Err(_) => Err(StepError::Lost(format!("no answer within {}s", limit.as_secs()))),
    }
}

/// Reads `Progress` messages (passed to `progress`) until the result.
async fn read_result(
    recv: &mut quinn::RecvStream,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<StepDone, StepError> {
    loop {
        match expect_frame_within::<_, StepMsg>(recv, MAX_AGENT_MESSAGE_FRAME).await {
            Ok(StepMsg::Progress { bytes }) => progress(bytes),
            Ok(StepMsg::Done(d)) => return Ok(d),
            Ok(StepMsg::Failed { error, touched }) => return Err(StepError::Failed { error, touched }),
            Err(e) => return Err(StepError::Lost(format!("read answer: {e}"))),
        }
    }
}

/// Sends a `Rebuild` and, once the agent asks for it, the backup (as for a restore request).
pub(super) async fn rebuild(
    agent: &LiveAgent,
    plan: RebuildPlan,
    api: &Api,
    manifest: &Manifest,
    progress: &mut (dyn FnMut(u64) + Send),
    limit: Duration,
) -> Result<StepDone, StepError> {
    let asked = async {
        let (mut send, mut recv) =
            agent.conn.open_bi().await.map_err(|e| StepError::Lost(format!("open stream: {e}")))?;
        write_frame(&mut send, &JobRequest::Restore(RestoreStep::Rebuild(Box::new(plan))))
            .await
            .map_err(|e| StepError::Lost(format!("send step: {e}")))?;
        // The agent asks for the bytes with a first `Progress`, or answers at once (already rebuilt, refused).
        match expect_frame_within::<_, StepMsg>(&mut recv, MAX_AGENT_MESSAGE_FRAME).await {
            Ok(StepMsg::Progress { .. }) => {}
            Ok(StepMsg::Done(d)) => return Ok(d),
            Ok(StepMsg::Failed { error, touched }) => return Err(StepError::Failed { error, touched }),
            Err(e) => return Err(StepError::Lost(format!("read answer: {e}"))),
        }
        let sending = async {
            if let Err(e) = api.send_backup(manifest, &mut send).await {
                tracing::warn!(member = %agent.member, "failed to send the backup for a restore: {e:#}");
            }
            let _ = send.finish();
        };
        let (_, result) = tokio::join!(sending, read_result(&mut recv, progress));
        result
    };
    match tokio::time::timeout(limit, asked).await {
        Ok(r) => r,
        Err(_) => Err(StepError::Lost(format!("the rebuild did not finish within {}s", limit.as_secs()))),
    }
}
