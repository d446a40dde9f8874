//! Fetching a stored backup for `ferryctl backup download|verify` and point-in-time rebuilds.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ferry_common::client::Session;
use ferry_common::config::FerryConfig;
use ferry_common::encryption::Identities;
use ferry_common::progress::{Lines, Progress};
use ferry_common::protocol::{expect_frame, AdminRequest, AdminResponse};
use ferry_common::resources::{EtcdBackupSpec, Spec};
use ferry_common::snapshot::VerifyingWriter;

use super::request::Answered;

/// Fetches a backup through `VerifyingWriter`: the file appears at `output` only if every check passed.
pub async fn fetch(
    cfg: &FerryConfig,
    cluster: String,
    backup_id: String,
    output: &Path,
    decompress: bool,
    identities: Option<&Identities>,
) -> Result<EtcdBackupSpec> {
    let request = AdminRequest::Download { cluster, backup_id };
    let mut s = Session::open(&cfg.coordinator, &cfg.ca, &cfg.client_pem(), &request).await?;
    let result = async {
        let (id, backup) = match expect_frame(&mut s.recv).await.context("read response")? {
            AdminResponse::DownloadStart(r) => match r.spec {
                Spec::EtcdBackup(b) => (r.metadata.id, b),
                other => bail!("unexpected download header {other:?}"),
            },
            AdminResponse::Error { kind, message } => return Err(Answered { kind, message }.into()),
            other => bail!("unexpected response {other:?}"),
        };
        let mut w = VerifyingWriter::create(output, &backup, decompress, identities)?;
        let mut progress = Progress::new(format!("download {id}"), backup.size, Lines::Stderr);
        loop {
            match expect_frame(&mut s.recv).await.context("read backup data")? {
                AdminResponse::Data(d) => {
                    w.write(&d)?;
                    progress.set(w.bytes());
                }
                AdminResponse::DownloadEnd => break,
                AdminResponse::Error { kind, message } => return Err(Answered { kind, message }.into()),
                other => bail!("unexpected response {other:?}"),
            }
        }
        w.finish()?;
        progress.finish();
        Ok(backup)
    }
    .await;
    s.close().await;
    result
}
