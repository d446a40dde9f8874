//! `ferryctl`: the coordinator's resource-oriented CLI.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use ferry_common::config::{AgentCredentials, FerryConfig};
use ferry_common::protocol::{expect_frame, AdminRequest, AdminResponse, ApplyOutcome};
use ferry_common::resources::{Resource, ResourceType, Selector, Spec};
use ferry_common::tls::CertifiedPem;
use ferry_coordinator::ctl::{render, Format, Session};
use ferry_coordinator::template;
use sha2::{Digest, Sha256};

/// ferryctl: manage a Ferry coordinator.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Path of the ferryconfig (the coordinator writes STATE_DIR/admin.ferryconfig).
    #[arg(long, env = "FERRYCONFIG", global = true)]
    ferryconfig: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List resources of a type, or show one.
    Get {
        /// Resource type, e.g. etcdbackupstatus, Clusters, agents.ferry.dev.
        #[arg(value_name = "TYPE")]
        rt: String,
        id: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
        /// Only resources with this label, KEY=VALUE.
        #[arg(short = 'l', long)]
        selector: Option<Selector>,
    },
    /// Create or update resources from a YAML file (`-f -` reads standard input).
    Apply {
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Delete a resource.
    Delete {
        #[arg(value_name = "TYPE")]
        rt: String,
        id: String,
    },
    /// Write credentials for an agent of one cluster member, for `ferry-agent --credentials DIR`.
    AgentCredentials {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        member: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Work with stored backups.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Work with clusters.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Cluster templates: `ferryctl cluster template -f FILE diff|sync`.
    Template {
        /// The template file (`-` reads standard input).
        #[arg(short, long, global = true)]
        file: Option<PathBuf>,
        #[command(subcommand)]
        action: TemplateAction,
    },
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum TemplateAction {
    /// Show what `sync` would change, as a unified diff.
    Diff,
    /// Apply the template's clusters.
    Sync,
}

#[derive(Subcommand, Debug)]
enum BackupCommand {
    /// Fetch a backup, verify its sha256 and write it (zstd as stored, or the etcd snapshot with --decompress).
    Download {
        cluster: String,
        backup_id: String,
        #[arg(short, long)]
        output: PathBuf,
        /// Write the plain etcd snapshot (restorable with `etcdctl snapshot restore`).
        #[arg(long)]
        decompress: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn load_config(path: Option<&Path>) -> Result<FerryConfig> {
    let path = path.ok_or_else(|| {
        anyhow!("no ferryconfig given; pass --ferryconfig PATH or set FERRYCONFIG (the coordinator writes STATE_DIR/admin.ferryconfig)")
    })?;
    Ok(FerryConfig::load(path)?)
}

async fn call(cfg: &FerryConfig, request: AdminRequest) -> Result<AdminResponse> {
    let mut s = Session::open(cfg, &request).await?;
    let response = expect_frame(&mut s.recv).await.context("read response")?;
    s.close().await;
    match response {
        AdminResponse::Error { message } => Err(anyhow!(message)),
        r => Ok(r),
    }
}

async fn run(cli: Cli) -> Result<()> {
    let cfg = || load_config(cli.ferryconfig.as_deref());
    match cli.command {
        Command::Get { rt, id, output, selector } => {
            let rt = ResourceType::parse(&rt)?;
            let single = id.is_some();
            match call(&cfg()?, AdminRequest::Get { rt, id, selector }).await? {
                AdminResponse::Resources(rs) => print!("{}", render(rt, &rs, output, single)?),
                other => bail!("unexpected response {other:?}"),
            }
        }
        Command::Apply { file } => {
            let resources = Resource::parse_documents(&read_input(&file)?)?;
            match call(&cfg()?, AdminRequest::Apply { resources }).await? {
                AdminResponse::Applied(outcomes) => print_outcomes(outcomes),
                other => bail!("unexpected response {other:?}"),
            }
        }
        Command::Delete { rt, id } => {
            let rt = ResourceType::parse(&rt)?;
            call(&cfg()?, AdminRequest::Delete { rt, id: id.clone() }).await?;
            println!("{rt}/{id} deleted");
        }
        Command::AgentCredentials { cluster, member, out } => {
            match call(&cfg()?, AdminRequest::AgentCredentials { cluster: cluster.clone(), member: member.clone() })
                .await?
            {
                AdminResponse::Credentials { ca_pem, cert_pem, key_pem } => {
                    AgentCredentials { ca_pem, client: CertifiedPem { cert_pem, key_pem } }.save(&out)?;
                    println!("wrote credentials for agent {cluster}/{member} to {}", out.display());
                }
                other => bail!("unexpected response {other:?}"),
            }
        }
        Command::Backup { command: BackupCommand::Download { cluster, backup_id, output, decompress } } => {
            download(&cfg()?, cluster, backup_id, &output, decompress).await?;
        }
        Command::Cluster { command: ClusterCommand::Template { file, action } } => {
            let file = file.ok_or_else(|| anyhow!("give the template with -f FILE"))?;
            template(&cfg()?, &file, action).await?;
        }
    }
    Ok(())
}

fn read_input(file: &Path) -> Result<String> {
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("read standard input")?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))
    }
}

async fn template(cfg: &FerryConfig, file: &Path, action: TemplateAction) -> Result<()> {
    let (clusters, notices) = template::parse(&read_input(file)?)?;
    for n in notices {
        eprintln!("notice: {n}");
    }
    let current = match call(cfg, AdminRequest::Get { rt: ResourceType::Cluster, id: None, selector: None }).await? {
        AdminResponse::Resources(rs) => rs,
        other => bail!("unexpected response {other:?}"),
    };
    let mut changed = Vec::new();
    for d in &clusters {
        let cur = current.iter().find(|r| r.metadata.id == d.name);
        let cur_spec = cur.and_then(|r| match &r.spec {
            Spec::Cluster(c) => Some(c),
            _ => None,
        });
        let diff = template::diff(&d.name, cur_spec, &d.spec);
        if diff.is_empty() {
            continue;
        }
        if action == TemplateAction::Diff {
            print!("{diff}");
        }
        changed.push(template::resource(d, cur));
    }
    if action == TemplateAction::Sync {
        if changed.is_empty() {
            println!("in sync: nothing to change");
            return Ok(());
        }
        match call(cfg, AdminRequest::Apply { resources: changed }).await? {
            AdminResponse::Applied(outcomes) => print_outcomes(outcomes),
            other => bail!("unexpected response {other:?}"),
        }
    }
    Ok(())
}

fn print_outcomes(outcomes: Vec<ApplyOutcome>) {
    for o in outcomes {
        match o {
            ApplyOutcome::Created { rt, id } => println!("{rt}/{id} created"),
            ApplyOutcome::Updated { rt, id } => println!("{rt}/{id} updated"),
            ApplyOutcome::Unchanged { rt, id } => println!("{rt}/{id} unchanged"),
        }
    }
}

/// Writes through a temp file beside the target and renames only after every check passed.
async fn download(
    cfg: &FerryConfig,
    cluster: String,
    backup_id: String,
    output: &Path,
    decompress: bool,
) -> Result<()> {
    let mut s = Session::open(cfg, &AdminRequest::Download { cluster, backup_id }).await?;
    let backup = match expect_frame(&mut s.recv).await.context("read response")? {
        AdminResponse::DownloadStart(r) => match r.spec {
            Spec::EtcdBackup(b) => b,
            other => bail!("unexpected download header {other:?}"),
        },
        AdminResponse::Error { message } => bail!(message),
        other => bail!("unexpected response {other:?}"),
    };
    let tmp = output.with_file_name(format!(
        ".{}.part",
        output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "download".into())
    ));
    let result = async {
        let file = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        let mut sink = Sink::new(file, decompress)?;
        let mut sha = Sha256::new();
        let mut bytes = 0u64;
        loop {
            match expect_frame(&mut s.recv).await.context("read backup data")? {
                AdminResponse::Data(d) => {
                    sha.update(&d);
                    bytes += d.len() as u64;
                    sink.write(&d)?;
                }
                AdminResponse::DownloadEnd => break,
                AdminResponse::Error { message } => bail!(message),
                other => bail!("unexpected response {other:?}"),
            }
        }
        let got = hex::encode(sha.finalize());
        if got != backup.sha256 || bytes != backup.size {
            bail!("downloaded {bytes} bytes with sha256 {got}, but the backup's manifest says {} bytes with sha256 {}: the stored backup is damaged", backup.size, backup.sha256);
        }
        sink.finish(&backup.rawsha256, backup.rawsize)
    }
    .await;
    s.close().await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, output).with_context(|| format!("rename into {}", output.display()))?;
    println!(
        "wrote {} ({}, sha256 verified)",
        output.display(),
        if decompress { "etcd snapshot" } else { "zstd as stored" }
    );
    Ok(())
}

/// Where downloaded bytes go: the file as stored, or through a zstd decoder with the raw bytes hashed.
enum Sink {
    Stored(std::fs::File),
    Decompressed(zstd::stream::write::Decoder<'static, HashingWriter>),
}

struct HashingWriter {
    file: std::fs::File,
    sha: Sha256,
    bytes: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Sink {
    fn new(file: std::fs::File, decompress: bool) -> Result<Self> {
        Ok(if decompress {
            Sink::Decompressed(zstd::stream::write::Decoder::new(HashingWriter { file, sha: Sha256::new(), bytes: 0 })?)
        } else {
            Sink::Stored(file)
        })
    }

    fn write(&mut self, d: &[u8]) -> Result<()> {
        match self {
            Sink::Stored(f) => f.write_all(d)?,
            Sink::Decompressed(dec) => dec.write_all(d).context("zstd decompress")?,
        }
        Ok(())
    }

    fn finish(self, raw_sha256: &str, raw_size: u64) -> Result<()> {
        let file = match self {
            Sink::Stored(f) => f,
            Sink::Decompressed(mut dec) => {
                dec.flush().context("zstd decompress")?;
                let w = dec.into_inner();
                let got = hex::encode(w.sha.finalize());
                if got != raw_sha256 || w.bytes != raw_size {
                    bail!("decompressed {} bytes with sha256 {got}, but the manifest says {raw_size} bytes with sha256 {raw_sha256}", w.bytes);
                }
                w.file
            }
        };
        file.sync_all()?;
        Ok(())
    }
}
