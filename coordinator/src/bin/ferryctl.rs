//! `ferryctl`: the coordinator's resource-oriented CLI.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use ferry_common::client::Session;
use ferry_common::config::{AgentCredentials, FerryConfig, CREDENTIALS_CA, CREDENTIALS_CERT, CREDENTIALS_KEY};
use ferry_common::encryption::Identities;
use ferry_common::protocol::{AdminRequest, AdminResponse, ApplyOutcome, CaStep, RevokeTarget, PROTOCOL_VERSION};
use ferry_common::resources::{Resource, ResourceType, Selector, Spec, Timestamp};
use ferry_common::tls::CertifiedPem;
use ferry_coordinator::cli::changes::{self, ChangesArgs, TimeArg, DEFAULT_LIMIT, MAX_LIMIT};
use ferry_coordinator::cli::complete::TypeName;
use ferry_coordinator::cli::download::fetch;
use ferry_coordinator::cli::render::{render, render_with_statuses, Format};
use ferry_coordinator::cli::request::{call, exit_code, EXIT_REFUSED};
use ferry_coordinator::cli::{backup_now, pointintime, request, template, watch};

/// How long `backup verify` waits for its throw-away etcd to answer.
const VERIFY_ETCD_TIMEOUT: Duration = Duration::from_secs(30);

/// ferryctl: manage a Ferry coordinator.
#[derive(Parser, Debug)]
#[command(name = "ferryctl", version)]
struct Cli {
    /// Path of the ferryconfig (the coordinator writes STATE_DIR/admin.ferryconfig).
    #[arg(long, env = "FERRYCONFIG", global = true)]
    ferryconfig: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum CredentialsCommand {
    /// Revoke agent certificates: every one of a member, or one by serial. The coordinator refuses them from
    /// now on and closes their open connections.
    Revoke {
        #[arg(long, requires = "member", conflicts_with = "serial")]
        cluster: Option<String>,
        #[arg(long, requires = "cluster")]
        member: Option<String>,
        /// The serial shown by `ferryctl get agentcredentials`.
        #[arg(long, required_unless_present = "cluster")]
        serial: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCredentialsCommand {
    /// Revoke an admin certificate (full or read-only) by serial: the coordinator refuses it from now on and
    /// closes its open connections. Revoking the one in STATE_DIR/admin.ferryconfig and restarting the
    /// coordinator writes that file anew (rotation).
    Revoke {
        /// The serial shown by `ferryctl get admincredentials`.
        #[arg(long)]
        serial: String,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// The CAs in force and, during a rotation, the members and admin certificates still on the old one.
    Status {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Rotate the CA without a backup pause: `start` makes a new CA, trusted beside the old one, that signs
    /// every certificate from then on (connected agents renew onto it at once); `finish` trusts only the new
    /// one once no member is left on the old.
    Rotate {
        #[command(subcommand)]
        step: RotateStep,
    },
}

#[derive(Subcommand, Debug)]
enum RotateStep {
    Start,
    Finish {
        /// Finish even though these members are still on the old CA: they are locked out until given new
        /// credentials with `ferryctl agent-credentials`.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List resources of a type, or show one; with -w, then every change until interrupted.
    Get {
        /// Resource type, e.g. etcdbackupstatus, Clusters, agents.ferry.dev.
        #[arg(value_name = "TYPE", value_parser = TypeName, hide_possible_values = true)]
        rt: String,
        id: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
        /// Only resources with this label, KEY=VALUE.
        #[arg(short = 'l', long)]
        selector: Option<Selector>,
        /// After the current state, print every change (polling the coordinator every second) until
        /// interrupted.
        #[arg(short, long)]
        watch: bool,
    },
    /// Create or update resources from a YAML file (`-f -` reads standard input).
    Apply {
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Delete a resource.
    Delete {
        #[arg(value_name = "TYPE", value_parser = TypeName, hide_possible_values = true)]
        rt: String,
        id: String,
    },
    /// Write credentials for an agent of one cluster member, for `ferry-agent --credentials DIR` (the member's
    /// older certificates are revoked); `agent-credentials revoke` revokes them.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    AgentCredentials {
        #[command(subcommand)]
        command: Option<CredentialsCommand>,
        #[arg(long, required = true)]
        cluster: Option<String>,
        #[arg(long, required = true)]
        member: Option<String>,
        #[arg(long, required = true)]
        out: Option<PathBuf>,
        /// How long the certificate is valid, e.g. 90d, 12h.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        valid_for: std::time::Duration,
        /// Owner of the written files, USER[:GROUP] (names or numeric ids; GROUP defaults to USER's primary
        /// group), for an agent that does not run as root, e.g. `--owner etcd` for the systemd unit's `User=etcd`.
        /// Needs root.
        #[arg(long, value_name = "USER[:GROUP]")]
        owner: Option<String>,
    },
    /// Write an admin ferryconfig: full (`ferry://admin`), or with --read-only one that can `get` and nothing
    /// else (`ferry://admin-ro`). Every one is recorded (`get admincredentials`); `admin-credentials revoke`
    /// revokes one.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    AdminCredentials {
        #[command(subcommand)]
        command: Option<AdminCredentialsCommand>,
        #[arg(long)]
        read_only: bool,
        #[arg(long, required = true)]
        out: Option<PathBuf>,
        /// How long the certificate is valid, e.g. 90d, 12h.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        valid_for: std::time::Duration,
    },
    /// The coordinator's CAs: their status, and their rotation without a backup pause.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Work with stored backups.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Restore a whole cluster from a backup, through its members' gates (an EtcdRestores resource):
    /// every member held, restored, started on a loopback URL, verified, then released.
    Restore {
        cluster: String,
        /// A backup id, or `latest` (the newest; with --before, the newest before that time).
        #[arg(long, default_value = "latest")]
        backup: String,
        /// With `--backup latest`: the newest backup taken before this time (RFC 3339, e.g. 2026-12-07T03:00:00Z).
        #[arg(long, value_parser = parse_time)]
        before: Option<Timestamp>,
        /// `seed-join` (default: one member restored, the others added back) or `all-members`.
        #[arg(long)]
        mode: Option<String>,
        /// Members whose agents cannot answer, declared gone: left out of the restored cluster (MEMBER,…).
        #[arg(long, value_delimiter = ',')]
        lost: Vec<String>,
        #[command(flatten)]
        point: PointArgs,
        /// With a point: print the plan and what the restore would change, and stop (also what a point without
        /// --yes does). With --yes the coordinator rebuilds the state at the point, stores it as a derived
        /// backup and restores that.
        #[arg(long)]
        dry_run: bool,
        /// An age identity file (0600) that opens the change log, if the cluster's backups are encrypted.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        #[command(flatten)]
        follow: Follow,
    },
    /// Print a key's value at a point in the change log (`--prefix`: every key under it, as JSON lines), to
    /// re-create one object without rolling the cluster back.
    GetKey {
        cluster: String,
        key: String,
        /// The time: RFC 3339 (e.g. 2026-12-07T03:00:00Z) or how long ago (e.g. 15m).
        #[arg(long, value_name = "TIME", value_parser = TimeArg::parse, required_unless_present = "at_revision")]
        at: Option<TimeArg>,
        /// The revision (the state after it).
        #[arg(long, value_name = "N", conflicts_with = "at")]
        at_revision: Option<i64>,
        /// Every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// raw: the value alone (default for one key); json: etcd's key/value JSON, one line per key.
        #[arg(short, long, value_enum)]
        output: Option<pointintime::KeyFormat>,
        /// An age identity file (0600) that opens the cluster's backups and change log, if encrypted.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// List what changed in a cluster's change log (point-in-time recovery), in revision order: revision,
    /// time, put or delete, key and value size. Find the revision of a bad change before restoring to just
    /// before it.
    Changes {
        cluster: String,
        /// Changes at or after this time: RFC 3339 (e.g. 2026-12-07T03:00:00Z) or how long ago (e.g. 15m, 2h).
        #[arg(long, value_name = "TIME", value_parser = TimeArg::parse)]
        since: Option<TimeArg>,
        /// Changes at or before this time: RFC 3339 or how long ago, as --since.
        #[arg(long, value_name = "TIME", value_parser = TimeArg::parse)]
        until: Option<TimeArg>,
        /// Only keys starting with this, e.g. /registry/deployments/.
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
        /// At most this many changes (the oldest are listed).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT,
              value_parser = clap::value_parser!(u64).range(1..=MAX_LIMIT))]
        limit: u64,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: changes::Format,
    },
    /// Work with a cluster's members.
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
    /// Work with clusters.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Encryption at rest (age): make identities; backups are encrypted to the recipients of an
    /// EtcdBackupEncryptionConfigs resource or a cluster's spec.backupconfiguration.encryption.
    Encryption {
        #[command(subcommand)]
        command: EncryptionCommand,
    },
    /// Print ferryctl's version, the coordinator's, and the protocol version each speaks.
    Version {
        /// Only ferryctl's own version (no coordinator needed).
        #[arg(long)]
        client: bool,
    },
    /// Print a shell completion script, e.g. `source <(ferryctl completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum MemberCommand {
    /// Replace a member's data with a fresh copy from the others, while the cluster keeps quorum without it:
    /// leadership moved away, the member held and removed, its data dir moved aside (kept), added back as a
    /// learner, started, promoted once caught up, released. Follow it with `get etcdrestorestatus CLUSTER`.
    Replace {
        cluster: String,
        member: String,
        #[command(flatten)]
        follow: Follow,
    },
}

/// A point in the change log to restore to (instead of a backup).
#[derive(clap::Args, Debug)]
struct PointArgs {
    /// Restore the state at this time: RFC 3339 (e.g. 2026-12-07T03:00:00Z) or how long ago (e.g. 15m),
    /// resolved to a revision with the coordinator's clock.
    #[arg(long, value_name = "TIME", value_parser = TimeArg::parse, conflicts_with_all = ["to_revision", "before_revision", "backup", "before"])]
    to_time: Option<TimeArg>,
    /// Restore the state at this revision (its changes included).
    #[arg(long, value_name = "N", conflicts_with_all = ["before_revision", "backup", "before"])]
    to_revision: Option<i64>,
    /// Restore everything before this revision, not its changes (a bad change found with `ferryctl changes`).
    #[arg(long, value_name = "N", conflicts_with_all = ["backup", "before"])]
    before_revision: Option<i64>,
}

/// What `restore` and `member replace` share.
#[derive(clap::Args, Debug)]
struct Follow {
    /// Go ahead although the cluster (for `member replace`: the member) is healthy; without it the refusal
    /// says what would be lost.
    #[arg(long)]
    yes: bool,
    /// Follow it with a progress line; exit 0 once verified and serving, 2 if it fails.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up waiting after this long (the work goes on).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30m", requires = "wait")]
    timeout: Duration,
}

/// An RFC 3339 time, e.g. 2026-12-07T03:00:00Z.
fn parse_time(s: &str) -> Result<Timestamp, String> {
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is not a time: {e}; give RFC 3339, e.g. 2026-12-07T03:00:00Z"))?;
    let d = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("{s:?} is before 1970"))?;
    Ok(Timestamp { seconds: d.as_secs() as i64, nanos: 0 })
}

#[derive(Subcommand, Debug)]
enum EncryptionCommand {
    /// Write a new age identity to FILE (0600, the format of `age-keygen`; never overwrites) and print its
    /// recipient (age1…) alone on standard output. Keep the file off the etcd nodes.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
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
    /// Back a cluster up now (applies an EtcdManualBackups resource with backupat = now).
    Now {
        cluster: String,
        /// Follow the backup with a progress line; exit 0 once it is stored, 2 if it fails.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (e.g. 90s, 10m).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m", requires = "wait")]
        timeout: Duration,
    },
    /// Store the state at a point as a backup of its own (a derived backup, restorable like any: what
    /// `restore --to-…` restores), rebuilt by the coordinator from a full backup and the change log.
    Derive {
        cluster: String,
        /// RFC 3339 (e.g. 2026-12-07T03:00:00Z) or how long ago (e.g. 15m), resolved with the coordinator's clock.
        #[arg(long, value_name = "TIME", value_parser = TimeArg::parse, required_unless_present = "at_revision", conflicts_with = "at_revision")]
        at: Option<TimeArg>,
        /// The state at this revision (its changes included).
        #[arg(long, value_name = "N")]
        at_revision: Option<i64>,
    },
    /// Check a backup without touching production: download, verify every hash, restore it into a scratch dir
    /// with etcd's own tool, and report revision, key count and DB size.
    Verify {
        cluster: String,
        /// A backup id, or `latest`.
        backup_id: String,
        /// An age identity file (0600) that opens the backup, if it is encrypted.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// Fetch a backup, verify its sha256 and write it (zstd as stored, or the etcd snapshot with --decompress).
    Download {
        cluster: String,
        /// A backup id, or `latest`; not with --at / --at-revision.
        #[arg(required_unless_present_any = ["at", "at_revision"], conflicts_with_all = ["at", "at_revision"])]
        backup_id: Option<String>,
        #[arg(short, long)]
        output: PathBuf,
        /// Write the plain etcd snapshot (restorable with `etcdctl snapshot restore`).
        #[arg(long)]
        decompress: bool,
        /// The state at this time, rebuilt from a full backup and the change log here, as a plain etcd
        /// snapshot: RFC 3339 (e.g. 2026-12-07T03:00:00Z) or how long ago (e.g. 15m).
        #[arg(long, value_name = "TIME", value_parser = TimeArg::parse, conflicts_with = "at_revision")]
        at: Option<TimeArg>,
        /// The state at this revision, as --at.
        #[arg(long, value_name = "N")]
        at_revision: Option<i64>,
        /// An age identity file (0600) that opens the backup (and change log), if encrypted: with --decompress
        /// or a point. Without them an encrypted backup is written as stored (an age file: `age -d -i FILE | zstd -d`).
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_REFUSED } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = run(cli).await {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(exit_code(&e));
    }
}

fn load_config(path: Option<&Path>) -> Result<FerryConfig> {
    let path = path.ok_or_else(|| {
        anyhow!("no ferryconfig given; pass --ferryconfig PATH or set FERRYCONFIG (the coordinator writes STATE_DIR/admin.ferryconfig)")
    })?;
    Ok(FerryConfig::load(path)?)
}

async fn run(cli: Cli) -> Result<()> {
    let cfg = || load_config(cli.ferryconfig.as_deref());
    match cli.command {
        Command::Get { rt, id, output, selector, watch: true } => {
            let rt = ResourceType::parse(&rt)?;
            watch::run(&cfg()?, rt, id, selector, output).await?;
        }
        Command::Get { rt, id, output, selector, watch: false } => {
            let rt = ResourceType::parse(&rt)?;
            let single = id.is_some();
            let cfg = cfg()?;
            match call(&cfg, AdminRequest::Get { rt, id, selector }).await? {
                AdminResponse::Resources(rs) if rt == ResourceType::Cluster && output == Format::Table => {
                    // The change log's coverage lives in the clusters' statuses; without them the column says
                    // only whether it is on, rather than failing the listing.
                    let statuses = request::get(&cfg, ResourceType::EtcdBackupStatus, None, None).await.ok();
                    print!("{}", render_with_statuses(rt, &rs, output, single, statuses.as_deref())?)
                }
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
        Command::AgentCredentials { command: Some(CredentialsCommand::Revoke { cluster, member, serial }), .. } => {
            let target = match (cluster, member, serial) {
                (Some(cluster), Some(member), None) => RevokeTarget::Member { cluster, member },
                (None, None, Some(serial)) => RevokeTarget::Serial(serial.to_ascii_lowercase()),
                _ => bail!("give --cluster and --member, or --serial"),
            };
            match call(&cfg()?, AdminRequest::RevokeAgentCredentials(target)).await? {
                AdminResponse::Revoked(serials) if serials.is_empty() => {
                    println!(
                        "nothing to revoke: no unrevoked certificate matches (see `ferryctl get agentcredentials`)"
                    )
                }
                AdminResponse::Revoked(serials) => {
                    for s in serials {
                        println!("agent certificate {s} revoked");
                    }
                }
                other => bail!("unexpected response {other:?}"),
            }
        }
        Command::AgentCredentials { command: None, cluster, member, out, owner, valid_for } => {
            let (Some(cluster), Some(member), Some(out)) = (cluster, member, out) else {
                bail!("agent-credentials needs --cluster, --member and --out");
            };
            // Checked before asking the coordinator, so a typo in the user name issues nothing.
            let owner = owner.as_deref().map(Owner::parse).transpose()?;
            let request = AdminRequest::AgentCredentials {
                cluster: cluster.clone(),
                member: member.clone(),
                valid_for_seconds: valid_for.as_secs(),
            };
            match call(&cfg()?, request).await? {
                AdminResponse::Credentials { ca_pem, cert_pem, key_pem, serial, not_after } => {
                    if let Some(owner) = &owner {
                        // The directory first: without root this fails before any key is written.
                        std::fs::create_dir_all(&out).with_context(|| format!("create --out {}", out.display()))?;
                        owner.chown(&out)?;
                    }
                    AgentCredentials { ca_pem, client: CertifiedPem { cert_pem, key_pem } }.save(&out)?;
                    if let Some(owner) = &owner {
                        for name in [CREDENTIALS_CA, CREDENTIALS_CERT, CREDENTIALS_KEY] {
                            owner.chown(&out.join(name))?;
                        }
                    }
                    let owned = owner.map(|o| format!(", owned by {}", o.spec)).unwrap_or_default();
                    println!(
                        "wrote credentials for agent {cluster}/{member} to {}{owned} (serial {serial}, valid until {})",
                        out.display(),
                        not_after.human()
                    );
                }
                other => bail!("unexpected response {other:?}"),
            }
        }
        Command::Ca { command } => {
            let (step, output) = match command {
                CaCommand::Status { output } => (CaStep::Status, output),
                CaCommand::Rotate { step: RotateStep::Start } => (CaStep::Start, Format::Table),
                CaCommand::Rotate { step: RotateStep::Finish { force } } => (CaStep::Finish { force }, Format::Table),
            };
            match call(&cfg()?, AdminRequest::Ca(step)).await? {
                AdminResponse::Ca(status) => print!("{}", ferry_coordinator::cli::render::ca_status(&status, output)?),
                other => bail!("unexpected response {other:?}"),
            }
        }
        Command::AdminCredentials { command: Some(AdminCredentialsCommand::Revoke { serial }), .. } => {
            let serial = serial.to_ascii_lowercase();
            match call(&cfg()?, AdminRequest::RevokeAdminCredentials { serial: serial.clone() }).await? {
                AdminResponse::Revoked(serials) if serials.is_empty() => {
                    println!("admin certificate {serial} was already revoked")
                }
                AdminResponse::Revoked(_) => println!("admin certificate {serial} revoked"),
                other => bail!("unexpected response {other:?}"),
            }
        }
        Command::AdminCredentials { command: None, read_only, out, valid_for } => {
            let out = out.ok_or_else(|| anyhow!("admin-credentials needs --out FILE"))?;
            let cfg = cfg()?;
            let valid_for_seconds = valid_for.as_secs();
            let request = if read_only {
                AdminRequest::ReadOnlyAdminCredentials { valid_for_seconds }
            } else {
                AdminRequest::AdminCredentials { valid_for_seconds }
            };
            let access = if read_only { "read-only admin" } else { "admin" };
            match call(&cfg, request).await? {
                AdminResponse::Credentials { ca_pem, cert_pem, key_pem, serial, not_after } => {
                    FerryConfig { coordinator: cfg.coordinator.clone(), ca: ca_pem, cert: cert_pem, key: key_pem }
                        .save(&out)?;
                    println!(
                        "wrote {access} credentials to {} (serial {serial}, valid until {})",
                        out.display(),
                        not_after.human()
                    );
                }
                other => bail!("unexpected response {other:?}"),
            }
        }
        Command::Backup {
            command: BackupCommand::Download { cluster, backup_id, output, decompress, at, at_revision, identity },
        } => {
            let ids = identity.as_deref().map(Identities::load).transpose()?;
            if at.is_some() || at_revision.is_some() {
                let point = pointintime::At::from_flags(at, at_revision, None, false)?;
                pointintime::download_at(&cfg()?, &cluster, point, &output, ids.as_ref()).await?;
            } else {
                if ids.is_some() && !decompress {
                    bail!("--identity opens the backup for --decompress (or a point); without them the backup is written as stored");
                }
                let backup_id = backup_id.ok_or_else(|| anyhow!("give a backup id (or latest), or --at"))?;
                download(&cfg()?, cluster, backup_id, &output, decompress, ids.as_ref()).await?;
            }
        }
        Command::GetKey { cluster, key, at, at_revision, prefix, output, identity } => {
            let ids = identity.as_deref().map(Identities::load).transpose()?;
            let point = pointintime::At::from_flags(at, at_revision, None, false)?;
            let format =
                output.unwrap_or(if prefix { pointintime::KeyFormat::Json } else { pointintime::KeyFormat::Raw });
            pointintime::get_key(&cfg()?, &cluster, key.as_bytes(), prefix, point, format, ids.as_ref()).await?;
        }
        Command::Encryption { command: EncryptionCommand::Keygen { out } } => {
            let new = ferry_common::encryption::keygen();
            let mut f = ferry_common::config::create_private(&out)
                .with_context(|| format!("create {} (it must not exist yet)", out.display()))?;
            std::io::Write::write_all(&mut f, new.file_text.as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("write {}", out.display()))?;
            eprintln!("wrote the identity to {} (0600); keep it off the etcd nodes", out.display());
            println!("{}", new.recipient);
        }
        Command::Backup { command: BackupCommand::Now { cluster, wait, timeout } } => {
            backup_now::run(&cfg()?, &cluster, wait.then_some(timeout)).await?;
        }
        Command::Backup { command: BackupCommand::Derive { cluster, at, at_revision } } => {
            let cfg = cfg()?;
            let point = pointintime::At::from_flags(at, at_revision, None, false)?;
            let plan = pointintime::plan(&cfg, &cluster, point, false).await?;
            pointintime::derive(&cfg, &cluster, plan.revision).await?;
        }
        Command::Backup { command: BackupCommand::Verify { cluster, backup_id, identity } } => {
            let ids = identity.as_deref().map(Identities::load).transpose()?;
            verify(&cfg()?, cluster, backup_id, ids.as_ref()).await?;
        }
        Command::Restore {
            cluster,
            point: PointArgs { to_time, to_revision, before_revision },
            dry_run,
            identity,
            mode,
            lost,
            follow: Follow { yes, wait, timeout },
            ..
        } if to_time.is_some() || to_revision.is_some() || before_revision.is_some() || dry_run => {
            let ids = identity.as_deref().map(Identities::load).transpose()?;
            let point = if to_time.is_none() && to_revision.is_none() && before_revision.is_none() {
                pointintime::At::Latest
            } else {
                pointintime::At::from_flags(to_time, to_revision, before_revision, false)?
            };
            let cfg = cfg()?;
            let revision = pointintime::show_plan(&cfg, &cluster, point, ids.as_ref()).await?;
            if dry_run || !yes {
                println!(
                    "nothing was restored{}; pass --yes to restore {cluster} to revision {revision}",
                    if dry_run { " (--dry-run)" } else { "" }
                );
                return Ok(());
            }
            // The revision shown, not the time again: what is restored is what the plan said.
            let backup = pointintime::derive(&cfg, &cluster, revision).await?;
            let args = ferry_coordinator::cli::restore::RestoreArgs {
                cluster,
                backup,
                before: None,
                mode,
                lost,
                yes,
                wait: wait.then_some(timeout),
                member: None,
            };
            ferry_coordinator::cli::restore::run(&cfg, args).await?;
        }
        Command::Restore { cluster, backup, before, mode, lost, follow: Follow { yes, wait, timeout }, .. } => {
            let args = ferry_coordinator::cli::restore::RestoreArgs {
                cluster,
                backup,
                before,
                mode,
                lost,
                yes,
                wait: wait.then_some(timeout),
                member: None,
            };
            ferry_coordinator::cli::restore::run(&cfg()?, args).await?;
        }
        Command::Changes { cluster, since, until, prefix, limit, output } => {
            let args = ChangesArgs { cluster, since, until, prefix: prefix.unwrap_or_default(), limit, format: output };
            // Before the ferryconfig is read: backwards times are the input's fault whatever the config.
            let request = changes::request(&args, changes::now_ms())?;
            changes::run(&cfg()?, &args, request).await?;
        }
        Command::Member {
            command: MemberCommand::Replace { cluster, member, follow: Follow { yes, wait, timeout } },
        } => {
            let args = ferry_coordinator::cli::restore::RestoreArgs {
                cluster,
                backup: String::new(),
                before: None,
                mode: Some(ferry_common::resources::restore_mode::REPLACE_MEMBER.to_string()),
                lost: Vec::new(),
                yes,
                wait: wait.then_some(timeout),
                member: Some(member),
            };
            ferry_coordinator::cli::restore::run(&cfg()?, args).await?;
        }
        Command::Cluster { command: ClusterCommand::Template { file, action } } => {
            let file = file.ok_or_else(|| anyhow!("give the template with -f FILE"))?;
            template(&cfg()?, &file, action).await?;
        }
        Command::Version { client } => {
            println!("ferryctl:    {} (protocol {PROTOCOL_VERSION})", env!("CARGO_PKG_VERSION"));
            if !client {
                let cfg = cfg()?;
                let server = Session::hello(&cfg.coordinator, &cfg.ca, &cfg.client_pem()).await?;
                println!(
                    "coordinator: {} (protocol {}) at {}",
                    server.software_version, server.protocol_version, cfg.coordinator
                );
            }
        }
        Command::Completion { shell } => {
            // Into a buffer first: clap_complete panics on a write error (e.g. `| head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ferryctl", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script).context("write the completion script")?;
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

async fn download(
    cfg: &FerryConfig,
    cluster: String,
    backup_id: String,
    output: &Path,
    decompress: bool,
    identities: Option<&Identities>,
) -> Result<()> {
    let backup = fetch(cfg, cluster, backup_id, output, decompress, identities).await?;
    let what = match (decompress, backup.encryption.is_some()) {
        (true, false) => "etcd snapshot; sha256 of object and snapshot and etcd's own hash verified",
        (true, true) => {
            "etcd snapshot, decrypted; sha256 of object, zstd stream and snapshot and etcd's own hash verified"
        }
        (false, false) => "zstd as stored; sha256 verified",
        (false, true) => "age-encrypted zstd as stored; sha256 verified (open it with `age -d -i KEYFILE | zstd -d`)",
    };
    println!("wrote {} ({what})", output.display());
    Ok(())
}

/// Checks a backup end to end without touching production: download, every hash, then etcd's own restore
/// into a scratch dir and a throw-away etcd on it (`restore_check`, the same as the coordinator's drills).
async fn verify(cfg: &FerryConfig, cluster: String, backup_id: String, identities: Option<&Identities>) -> Result<()> {
    let scratch = tempfile::Builder::new().prefix("ferry-verify-").tempdir().context("create a scratch dir")?;
    let snapshot = scratch.path().join("snapshot.db");
    let backup = fetch(cfg, cluster.clone(), backup_id, &snapshot, true, identities).await?;
    println!("downloaded and decompressed: sha256 of the object, of the snapshot, and etcd's own hash match");
    let status = ferry_common::snapshot::status(&snapshot)?;
    let dir = scratch.path().to_owned();
    let restored = tokio::task::spawn_blocking(move || {
        let never = tokio_util::sync::CancellationToken::new();
        ferry_coordinator::restore_check::restore_and_read(&snapshot, &dir, VERIFY_ETCD_TIMEOUT, &never)
    })
    .await
    .context("the restore check panicked")??;
    println!("restored with {} snapshot restore into a scratch dir", ferry_common::snapshot::restore_tool());
    println!("backup:    {cluster}/{}", backup.createdat.human());
    println!("member:    {}", backup.member);
    println!("revision:  {}", restored.revision);
    println!("keys:      {}", restored.keys);
    println!("db size:   {} bytes ({} stored)", status.total_size, backup.size);
    println!("OK");
    Ok(())
}

/// `agent-credentials --owner USER[:GROUP]`, resolved to numeric ids.
#[derive(Debug)]
struct Owner {
    spec: String,
    uid: u32,
    gid: u32,
}

impl Owner {
    /// Resolves names through /etc/passwd and /etc/group (where kubeadm hosts and distribution packages keep
    /// system users such as `etcd`); numeric ids are taken as they are.
    fn parse(spec: &str) -> Result<Self> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            bail!("--owner {spec:?}: expected USER or USER:GROUP, e.g. --owner etcd or --owner etcd:etcd");
        }
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let entry = passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() >= 4 && f[0] == user);
        let (uid, primary_gid) = match (user.parse::<u32>(), entry) {
            (Ok(uid), _) => (uid, None),
            (Err(_), Some(f)) => (
                f[2].parse().with_context(|| format!("/etc/passwd has a bad uid for user {user:?}"))?,
                f[3].parse().ok(),
            ),
            (Err(_), None) => bail!(
                "--owner {spec:?}: no user {user:?} in /etc/passwd; create it (e.g. `useradd --system {user}`) or give numeric ids (--owner UID:GID)"
            ),
        };
        let gid = match group {
            None => primary_gid.ok_or_else(|| {
                anyhow!("--owner {spec:?}: uid {uid} has no entry in /etc/passwd to take a group from; give one: --owner {uid}:GID")
            })?,
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => {
                    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
                    let f = groups
                        .lines()
                        .map(|l| l.split(':').collect::<Vec<_>>())
                        .find(|f| f.len() >= 3 && f[0] == g)
                        .ok_or_else(|| {
                            anyhow!("--owner {spec:?}: no group {g:?} in /etc/group; create it or give a numeric gid")
                        })?;
                    f[2].parse().with_context(|| format!("/etc/group has a bad gid for group {g:?}"))?
                }
            },
        };
        Ok(Self { spec: spec.to_string(), uid, gid })
    }

    fn chown(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                anyhow!(
                    "chown {} to --owner {}: permission denied; giving files to another user needs root (run `sudo ferryctl agent-credentials …`)",
                    path.display(),
                    self.spec
                )
            } else {
                anyhow!("chown {} to --owner {}: {e}", path.display(), self.spec)
            }
        })
    }
}
