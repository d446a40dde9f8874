//! The gate's file protocol: `command.json`, written only by the agent, says what the gate must do;
//! `status.json`, written only by the gate, says what it did. Both are replaced atomically (`NAME.tmp`,
//! fsync, rename, fsync of the directory), so a reader sees the old file or the new one, never half of one,
//! and a written command survives a power cut.
//!
//! Also here: etcd's flags as the gate reads them ([`EtcdArgs`]) and rewrites them ([`effective_args`]).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The agent's command, in the gate directory.
pub const COMMAND_FILE: &str = "command.json";
/// The gate's report, in the gate directory.
pub const STATUS_FILE: &str = "status.json";

/// What the agent asks of the gate (`command.json`). A missing file is the default: generation 0, etcd
/// running on its own arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateCommand {
    /// Bumped by every new command; the gate acts when it differs from the one it applied last.
    pub generation: u64,
    /// Who asked (a restore id): for logs and status.
    pub owner: String,
    /// Stop etcd and keep it stopped.
    pub hold: bool,
    /// `(flag, value)` pairs replacing etcd's own (`("--listen-client-urls", "http://127.0.0.1:2379")`),
    /// used when not held.
    pub overrides: Vec<(String, String)>,
}

/// What the gate is doing with etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateState {
    /// etcd runs (`pid`).
    Running,
    /// etcd is stopped and stays stopped until a command without `hold`.
    Held,
    /// The old etcd is gone, the new one about to be spawned.
    Starting,
    /// etcd is being stopped, or has exited and the gate with it.
    Stopping,
}

impl std::fmt::Display for GateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Held => "held",
            Self::Starting => "starting",
            Self::Stopping => "stopping",
        })
    }
}

/// etcd's own configuration, read from its arguments: what a restore plan needs to know about the member.
/// Empty strings for flags that are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdArgs {
    pub name: String,
    /// `--data-dir`, or the gate's own `--data-dir` when etcd's arguments do not say.
    pub data_dir: String,
    pub initial_advertise_peer_urls: String,
    pub listen_client_urls: String,
    pub advertise_client_urls: String,
    pub initial_cluster: String,
    pub initial_cluster_token: String,
}

impl EtcdArgs {
    /// Reads the flags from etcd's arguments, in both forms (`--flag=value`, `--flag value`); like etcd's
    /// flag parser, the last occurrence wins. `data_dir` is the fallback for `--data-dir`.
    pub fn parse(args: &[String], data_dir: &str) -> Self {
        Self::parse_with_env(args, |_| None, data_dir)
    }

    /// [`Self::parse`], taking a flag absent from `args` from etcd's environment variable for it (`--name`:
    /// `ETCD_NAME`), as etcd itself does: distribution units configure etcd so (Debian's sets `ETCD_NAME` and
    /// `ETCD_DATA_DIR`). `data_dir` is the fallback when neither says.
    pub fn parse_with_env(args: &[String], env: impl Fn(&str) -> Option<String>, data_dir: &str) -> Self {
        let get = |flag: &str| flag_value(args, flag).or_else(|| env(&env_var(flag))).unwrap_or_default();
        let mut parsed = Self {
            name: get("--name"),
            data_dir: get("--data-dir"),
            initial_advertise_peer_urls: get("--initial-advertise-peer-urls"),
            listen_client_urls: get("--listen-client-urls"),
            advertise_client_urls: get("--advertise-client-urls"),
            initial_cluster: get("--initial-cluster"),
            initial_cluster_token: get("--initial-cluster-token"),
        };
        if parsed.data_dir.is_empty() {
            data_dir.clone_into(&mut parsed.data_dir);
        }
        parsed
    }
}

/// The environment variable etcd reads for `flag`: `--listen-client-urls` → `ETCD_LISTEN_CLIENT_URLS`.
/// etcd refuses to start when a flag is given both ways, so an overridden flag's variable is unset.
pub fn env_var(flag: &str) -> String {
    format!("ETCD_{}", flag_name(flag).to_ascii_uppercase().replace('-', "_"))
}

/// What the gate did last (`status.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateStatus {
    /// The generation of the last command fully applied.
    pub applied_generation: u64,
    pub state: GateState,
    /// etcd's pid while it runs.
    pub pid: Option<u32>,
    /// The owner of the command applied.
    pub owner: String,
    /// The overrides in force (those of the command applied).
    pub overrides: Vec<(String, String)>,
    /// etcd's configuration, from its own (base) arguments.
    pub etcd: EtcdArgs,
    /// etcd's arguments as the gate was given them (after the program).
    pub base_args: Vec<String>,
    /// The arguments etcd runs (or would run) with: `base_args` with the overrides applied.
    pub effective_args: Vec<String>,
    pub updated_at_unix: u64,
    /// The gate's own pid.
    pub gate_pid: u32,
}

/// The name `flag` with its dashes, whatever the caller wrote: `listen-client-urls`, `-listen-client-urls`
/// and `--listen-client-urls` are one flag to etcd (Go's flag package takes one dash or two).
fn flag_name(flag: &str) -> &str {
    flag.trim_start_matches('-')
}

/// Whether `arg` is flag `name` (bare: `--name`/`-name`) or carries its value (`--name=v`/`-name=v`);
/// `Some(value)` in the second case.
fn matches_flag<'a>(arg: &'a str, name: &str) -> Option<Option<&'a str>> {
    let rest = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    match rest.split_once('=') {
        Some((n, value)) if n == name => Some(Some(value)),
        None if rest == name => Some(None),
        _ => None,
    }
}

/// The value `flag` has in `args` (its last occurrence), if it is there.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let name = flag_name(flag);
    let mut found = None;
    let mut i = 0;
    while i < args.len() {
        match matches_flag(&args[i], name) {
            Some(Some(value)) => found = Some(value.to_owned()),
            Some(None) => match args.get(i + 1) {
                Some(next) if !next.starts_with("--") => {
                    found = Some(next.clone());
                    i += 1;
                }
                // A bare flag with no value after it: etcd would refuse it; nothing to read.
                _ => {}
            },
            None => {}
        }
        i += 1;
    }
    found
}

/// `base` with every overridden flag replaced: each occurrence of the flag in either form (`--f=v`, or
/// `--f` followed by a value that does not start with `--`) is removed and `--f=value` appended, in the
/// order of `overrides`.
pub fn effective_args(base: &[String], overrides: &[(String, String)]) -> Vec<String> {
    let mut args = base.to_vec();
    for (flag, value) in overrides {
        let name = flag_name(flag);
        let mut kept = Vec::with_capacity(args.len() + 1);
        let mut i = 0;
        while i < args.len() {
            match matches_flag(&args[i], name) {
                Some(Some(_)) => {}
                Some(None) => {
                    if args.get(i + 1).is_some_and(|next| !next.starts_with("--")) {
                        i += 1;
                    }
                }
                None => kept.push(args[i].clone()),
            }
            i += 1;
        }
        kept.push(format!("--{name}={value}"));
        args = kept;
    }
    args
}

/// Writes `dir/name` atomically: `name.tmp` is written and fsynced, renamed over `name`, and `dir` fsynced.
/// A `name.tmp` a crash left behind is replaced (removed, never followed if it is a link). Mode 0644 inside
/// a 0700 directory: readable by the other side when the agent and etcd run as different users.
pub fn write_atomic(dir: &Path, name: &str, body: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let written = (|| -> std::io::Result<()> {
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("write {}", path.display()))
}

/// `dir/name` parsed as JSON; `Ok(None)` when the file does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> anyhow::Result<Option<T>> {
    let path = dir.join(name);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    serde_json::from_slice(&text).map(Some).with_context(|| format!("parse {}", path.display()))
}

/// The command in force in `dir`: the default when `command.json` is missing.
pub fn read_command(dir: &Path) -> anyhow::Result<GateCommand> {
    Ok(read_json(dir, COMMAND_FILE)?.unwrap_or_default())
}

/// Writes `command.json` (the agent's side).
pub fn write_command(dir: &Path, command: &GateCommand) -> anyhow::Result<()> {
    let body = serde_json::to_vec_pretty(command).context("encode the gate command")?;
    write_atomic(dir, COMMAND_FILE, &body)
}

/// Writes `status.json` (the gate's side).
pub fn write_status(dir: &Path, status: &GateStatus) -> anyhow::Result<()> {
    let body = serde_json::to_vec_pretty(status).context("encode the gate status")?;
    write_atomic(dir, STATUS_FILE, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    fn over(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(f, v)| ((*f).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn an_override_replaces_the_flag_in_both_forms_and_every_occurrence() {
        let base = strings(&[
            "--name=m1",
            "--listen-client-urls",
            "http://a:1",
            "--data-dir=/d",
            "--listen-client-urls=http://b:2",
            "-listen-client-urls",
            "http://c:3",
            "--snapshot-count",
            "10",
        ]);
        let args = effective_args(&base, &over(&[("--listen-client-urls", "http://z:9")]));
        assert_eq!(
            args,
            strings(&["--name=m1", "--data-dir=/d", "--snapshot-count", "10", "--listen-client-urls=http://z:9"])
        );
    }

    #[test]
    fn an_absent_flag_is_appended_and_overrides_apply_in_order() {
        let base = strings(&["--name", "m1"]);
        let args = effective_args(
            &base,
            &over(&[("--initial-cluster-state", "existing"), ("--name", "m2"), ("--initial-cluster-state", "new")]),
        );
        assert_eq!(args, strings(&["--name=m2", "--initial-cluster-state=new"]));
        assert_eq!(effective_args(&base, &[]), base, "no overrides: etcd's own args");
    }

    #[test]
    fn a_value_that_looks_like_a_flag_is_handled_as_documented() {
        // `--name` followed by a flag has no value of its own: only `--name` goes, `--data-dir /d` stays.
        let base = strings(&["--name", "--data-dir", "/d"]);
        assert_eq!(effective_args(&base, &over(&[("--name", "m1")])), strings(&["--data-dir", "/d", "--name=m1"]));
        // A single-dash value is a value (etcd's log level, a negative number...).
        let base = strings(&["--quota-backend-bytes", "-1", "--name", "m1"]);
        assert_eq!(
            effective_args(&base, &over(&[("--quota-backend-bytes", "8589934592")])),
            strings(&["--name", "m1", "--quota-backend-bytes=8589934592"])
        );
        // An override whose value starts with dashes is written in the `=` form, so it stays its value.
        let args = effective_args(&[], &over(&[("--log-outputs", "--weird")]));
        assert_eq!(args, strings(&["--log-outputs=--weird"]));
        // A flag whose name only starts like the overridden one is another flag.
        let base = strings(&["--listen-client-urls-extra=x", "--listen-client-http-urls", "y"]);
        let args = effective_args(&base, &over(&[("--listen-client-urls", "u")]));
        assert_eq!(
            args,
            strings(&["--listen-client-urls-extra=x", "--listen-client-http-urls", "y", "--listen-client-urls=u"])
        );
    }

    #[test]
    fn etcd_args_are_read_in_both_forms_with_the_data_dir_fallback() {
        let args = strings(&[
            "--name=m1",
            "--initial-advertise-peer-urls",
            "https://10.0.0.1:2380",
            "--listen-client-urls=https://127.0.0.1:2379,https://10.0.0.1:2379",
            "--advertise-client-urls",
            "https://10.0.0.1:2379",
            "--initial-cluster=m1=https://10.0.0.1:2380",
            "--initial-cluster-token",
            "tok",
            "--name",
            "m1-last",
        ]);
        let etcd = EtcdArgs::parse(&args, "/var/lib/etcd");
        assert_eq!(
            etcd,
            EtcdArgs {
                name: "m1-last".into(),
                data_dir: "/var/lib/etcd".into(),
                initial_advertise_peer_urls: "https://10.0.0.1:2380".into(),
                listen_client_urls: "https://127.0.0.1:2379,https://10.0.0.1:2379".into(),
                advertise_client_urls: "https://10.0.0.1:2379".into(),
                initial_cluster: "m1=https://10.0.0.1:2380".into(),
                initial_cluster_token: "tok".into(),
            }
        );
        let etcd = EtcdArgs::parse(&strings(&["--data-dir", "/own", "--name"]), "/fallback");
        assert_eq!(etcd.data_dir, "/own");
        assert_eq!(etcd.name, "", "a bare flag at the end has no value");
        assert_eq!(etcd.initial_cluster, "");
        let env = |var: &str| match var {
            "ETCD_NAME" => Some("from-env".to_owned()),
            "ETCD_DATA_DIR" => Some("/env".to_owned()),
            _ => None,
        };
        let etcd = EtcdArgs::parse_with_env(&strings(&["--name=flag"]), env, "/fallback");
        assert_eq!((etcd.name.as_str(), etcd.data_dir.as_str()), ("flag", "/env"), "a flag wins over the environment");
        assert_eq!(EtcdArgs::parse(&[], "/fallback").data_dir, "/fallback");
        assert_eq!(env_var("--initial-cluster-token"), "ETCD_INITIAL_CLUSTER_TOKEN");
    }

    #[test]
    fn command_and_status_round_trip_through_the_documented_json() {
        let command = GateCommand {
            generation: 7,
            owner: "restore-42".into(),
            hold: false,
            overrides: over(&[("--listen-client-urls", "http://127.0.0.1:1")]),
        };
        let json: serde_json::Value = serde_json::to_value(&command).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"generation": 7, "owner": "restore-42", "hold": false,
                "overrides": [["--listen-client-urls", "http://127.0.0.1:1"]]})
        );
        assert_eq!(serde_json::from_value::<GateCommand>(json).unwrap(), command);

        let status = GateStatus {
            applied_generation: 7,
            state: GateState::Held,
            pid: None,
            owner: "restore-42".into(),
            overrides: vec![],
            etcd: EtcdArgs { name: "m1".into(), data_dir: "/d".into(), ..EtcdArgs::default() },
            base_args: strings(&["--name=m1"]),
            effective_args: strings(&["--name=m1"]),
            updated_at_unix: 1_700_000_000,
            gate_pid: 1,
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "held");
        assert_eq!(json["pid"], serde_json::Value::Null);
        assert_eq!(json["etcd"]["initial_cluster_token"], "");
        for field in
            ["applied_generation", "owner", "overrides", "base_args", "effective_args", "updated_at_unix", "gate_pid"]
        {
            assert!(json.get(field).is_some(), "status.json has {field}");
        }
        assert_eq!(serde_json::from_value::<GateStatus>(json).unwrap(), status);
    }

    #[test]
    fn atomic_writes_replace_the_file_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_command(dir.path()).unwrap(), GateCommand::default(), "missing file: the default");
        // A temp file a crash left behind, even a link, is replaced, not followed.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("command.json.tmp")).unwrap();
        let mut command = GateCommand { generation: 1, owner: "a".into(), hold: true, overrides: vec![] };
        write_command(dir.path(), &command).unwrap();
        command.generation = 2;
        write_command(dir.path(), &command).unwrap();
        assert_eq!(read_command(dir.path()).unwrap(), command);
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        let names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "no temp file left: {names:?}");

        fs::write(dir.path().join(COMMAND_FILE), b"{\"generation\": ").unwrap();
        let err = format!("{:#}", read_command(dir.path()).unwrap_err());
        assert!(err.contains("command.json") && err.contains("EOF"), "{err}");
    }
}
