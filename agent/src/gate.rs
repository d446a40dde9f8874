//! STUB until the gate branch is merged: the agent-side API only.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct EtcdArgs {
    pub name: String,
    pub data_dir: String,
    pub initial_advertise_peer_urls: String,
    pub listen_client_urls: String,
    pub advertise_client_urls: String,
    pub initial_cluster: String,
    pub initial_cluster_token: String,
}

#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct GateStatus {
    pub applied_generation: u64,
    pub state: String,
    pub pid: Option<u32>,
    pub owner: String,
    pub overrides: Vec<(String, String)>,
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct GateCommand {
    pub generation: u64,
    pub owner: String,
    pub hold: bool,
    pub overrides: Vec<(String, String)>,
}

pub struct GateControl {
    dir: PathBuf,
}

impl GateControl {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn status(&self) -> Result<Option<GateStatus>> {
        bail!("no gate in {}", self.dir.display())
    }
    pub fn command(&self) -> Result<GateCommand> {
        bail!("no gate")
    }
    pub async fn hold(&self, _owner: &str, _timeout: Duration) -> Result<GateStatus> {
        bail!("no gate")
    }
    pub async fn start(&self, _owner: &str, _o: Vec<(String, String)>, _timeout: Duration) -> Result<GateStatus> {
        bail!("no gate")
    }
    pub async fn release(&self, _owner: &str, _timeout: Duration) -> Result<GateStatus> {
        bail!("no gate")
    }
}
