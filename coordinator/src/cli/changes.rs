//! `ferryctl changes CLUSTER [--since TIME] [--until TIME] [--prefix P] [--limit N] [-o table|json]`: what
//! changed in a cluster's change log, to find the revision of a bad change before restoring to just before it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use ferry_common::client::Session;
use ferry_common::config::FerryConfig;
use ferry_common::protocol::{expect_frame, AdminRequest, AdminResponse, ChangeRow};
use ferry_common::segment::EventKind;

use super::request::Answered;

/// Rows asked for when `--limit` is not given.
pub const DEFAULT_LIMIT: u64 = 1000;
/// The most rows one listing may ask for: bounds ferryctl's memory and the coordinator's work.
pub const MAX_LIMIT: u64 = 100_000;

/// Output formats of `changes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// One JSON object per line.
    Json,
}

/// `--since`/`--until` as given: a moment, or how long before now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeArg {
    /// Unix ms.
    At(i64),
    Ago(Duration),
}

impl TimeArg {
    /// RFC 3339 (`2026-12-07T03:00:00Z`, fractions kept) or a duration meaning that long ago (`15m`, `2h`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Ok(d) = humantime::parse_duration(t) {
            return Ok(Self::Ago(d));
        }
        let at = humantime::parse_rfc3339_weak(t).map_err(|_| {
            format!(
                "{s:?} is neither a time nor a duration: give RFC 3339 (e.g. 2026-12-07T03:00:00Z) or how long ago \
                 (e.g. 15m, 2h, 3d)"
            )
        })?;
        let ms = at.duration_since(UNIX_EPOCH).map_err(|_| format!("{s:?} is before 1970"))?.as_millis();
        Ok(Self::At(i64::try_from(ms).map_err(|_| format!("{s:?} is too far in the future"))?))
    }

    /// Unix ms, with `Ago` counted back from `now_ms`.
    pub fn resolve(self, now_ms: i64) -> Result<i64, String> {
        match self {
            Self::At(ms) => Ok(ms),
            Self::Ago(d) => i64::try_from(d.as_millis())
                .ok()
                .and_then(|ago| now_ms.checked_sub(ago))
                .filter(|ms| *ms >= 0)
                .ok_or_else(|| format!("{} ago is before 1970", humantime::format_duration(d))),
        }
    }
}

/// What `changes` was asked for.
#[derive(Debug, Clone)]
pub struct ChangesArgs {
    pub cluster: String,
    pub since: Option<TimeArg>,
    pub until: Option<TimeArg>,
    pub prefix: String,
    pub limit: u64,
    pub format: Format,
}

/// The request for `args`, times resolved against `now_ms`; refused when the bounds are backwards.
pub fn request(args: &ChangesArgs, now_ms: i64) -> Result<AdminRequest> {
    if !(1..=MAX_LIMIT).contains(&args.limit) {
        bail!("--limit {} is out of bounds: give 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})", args.limit);
    }
    let resolve = |flag: &str, t: Option<TimeArg>| -> Result<Option<i64>> {
        t.map(|t| t.resolve(now_ms)).transpose().map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
    };
    let since_ms = resolve("since", args.since)?;
    let until_ms = resolve("until", args.until)?;
    if let (Some(s), Some(u)) = (since_ms, until_ms) {
        if s > u {
            bail!("--since {} is after --until {}: give the earlier time to --since", rfc3339(s), rfc3339(u));
        }
    }
    Ok(AdminRequest::Changes {
        cluster: args.cluster.clone(),
        since_ms,
        until_ms,
        prefix: args.prefix.as_bytes().to_vec(),
        limit: args.limit,
    })
}

/// Sends the listing request and gathers its pages until the one with `more: false`.
pub async fn fetch(cfg: &FerryConfig, request: AdminRequest, limit: u64) -> Result<Vec<ChangeRow>> {
    let mut s = Session::open(&cfg.coordinator, &cfg.ca, &cfg.client_pem(), &request).await?;
    let result = async {
        let mut rows = Vec::new();
        loop {
            match expect_frame(&mut s.recv).await.context("read the change listing")? {
                AdminResponse::Changes { rows: page, more } => {
                    rows.extend(page);
                    // A coordinator that ignores the limit must not make ferryctl grow without end.
                    if rows.len() as u64 > limit {
                        bail!("the coordinator sent more than the {limit} changes asked for");
                    }
                    if !more {
                        return Ok(rows);
                    }
                }
                AdminResponse::Error { kind, message } => return Err(Answered { kind, message }.into()),
                other => bail!("unexpected response {other:?}"),
            }
        }
    }
    .await;
    s.close().await;
    result
}

/// Runs `changes` with the [`request`] made of `args`: the listing on standard output, a note on standard
/// error when it stopped at the limit.
pub async fn run(cfg: &FerryConfig, args: &ChangesArgs, request: AdminRequest) -> Result<()> {
    let rows = fetch(cfg, request, args.limit).await?;
    let out = match args.format {
        Format::Table => table(&rows),
        Format::Json => json_lines(&rows)?,
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes()).context("write the listing")?;
    if rows.is_empty() && args.format == Format::Table {
        eprintln!("no changes in cluster {}'s change log match", args.cluster);
    }
    if rows.len() as u64 == args.limit {
        eprintln!(
            "note: stopped at --limit {}; there may be more: narrow with --since, --until or --prefix, or raise \
             --limit (up to {MAX_LIMIT})",
            args.limit
        );
    }
    Ok(())
}

/// Now, Unix ms: what `--since 15m` counts back from.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Unix ms as RFC 3339 in UTC with milliseconds.
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| format!("{ms}ms"), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn op(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Put => "put",
        EventKind::Delete => "delete",
    }
}

/// A key for a terminal: lossy UTF-8, with backslashes, control characters and the invisible ones that can
/// disguise a key (zero widths, bidi overrides) escaped, so what is printed is what is stored.
pub fn printable_key(key: &[u8]) -> String {
    let mut out = String::with_capacity(key.len());
    for c in String::from_utf8_lossy(key).chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if invisible(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Format characters that print as nothing or reorder the text around them.
fn invisible(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}' | '\u{ad}')
}

/// `REVISION  TIME (UTC)  OP  KEY  VALUE-SIZE`, aligned.
pub fn table(rows: &[ChangeRow]) -> String {
    let mut cells: Vec<[String; 5]> = vec![["REVISION", "TIME (UTC)", "OP", "KEY", "VALUE-SIZE"].map(String::from)];
    for r in rows {
        let time = chrono::DateTime::from_timestamp_millis(r.time_ms)
            .map_or_else(|| format!("{}ms", r.time_ms), |t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string());
        let size = match r.kind {
            EventKind::Put => r.value_size.to_string(),
            EventKind::Delete => "-".into(),
        };
        cells.push([r.revision.to_string(), time, op(r.kind).into(), printable_key(&r.key), size]);
    }
    let widths: Vec<usize> = (0..5).map(|c| cells.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in cells {
        let line: Vec<String> = row.iter().enumerate().map(|(i, cell)| format!("{cell:<w$}", w = widths[i])).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// One JSON object per line: `{"revision","time","op","key","key_base64","value_size"}`; `key` is lossy UTF-8,
/// `key_base64` the exact bytes.
pub fn json_lines(rows: &[ChangeRow]) -> Result<String> {
    let mut out = String::new();
    for r in rows {
        let v = serde_json::json!({
            "revision": r.revision,
            "time": rfc3339(r.time_ms),
            "op": op(r.kind),
            "key": String::from_utf8_lossy(&r.key),
            "key_base64": base64::engine::general_purpose::STANDARD.encode(&r.key),
            "value_size": r.value_size,
        });
        out.push_str(&serde_json::to_string(&v)?);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_617_200_000; // 2026-12-07T04:20:00Z

    fn args(since: Option<&str>, until: Option<&str>) -> ChangesArgs {
        ChangesArgs {
            cluster: "prod".into(),
            since: since.map(|s| TimeArg::parse(s).unwrap()),
            until: until.map(|s| TimeArg::parse(s).unwrap()),
            prefix: "/registry/".into(),
            limit: DEFAULT_LIMIT,
            format: Format::Table,
        }
    }

    #[test]
    fn times_are_rfc3339_or_how_long_ago() {
        assert_eq!(TimeArg::parse("2026-12-07T03:00:00Z"), Ok(TimeArg::At(1_796_612_400_000)));
        assert_eq!(TimeArg::parse("2026-12-07T03:00:00.250Z"), Ok(TimeArg::At(1_796_612_400_250)));
        assert_eq!(TimeArg::parse("15m"), Ok(TimeArg::Ago(Duration::from_secs(900))));
        assert_eq!(TimeArg::parse("15m").unwrap().resolve(NOW), Ok(NOW - 900_000));
        assert_eq!(TimeArg::parse("1h 30m").unwrap().resolve(NOW), Ok(NOW - 5_400_000));
        assert_eq!(TimeArg::parse("2026-12-07T03:00:00Z").unwrap().resolve(NOW), Ok(1_796_612_400_000));
        for bad in ["yesterday", "15", "2026-12-07", "03:00", "-5m", ""] {
            let e = TimeArg::parse(bad).unwrap_err();
            assert!(e.contains("RFC 3339") && e.contains("15m"), "{bad:?}: {e}");
        }
        let e = TimeArg::parse("100years").unwrap().resolve(NOW).unwrap_err();
        assert!(e.contains("before 1970"), "{e}");
    }

    #[test]
    fn the_request_carries_the_bounds_and_refuses_them_backwards() {
        let r = request(&args(Some("15m"), Some("2026-12-07T04:19:00Z")), NOW).unwrap();
        let AdminRequest::Changes { cluster, since_ms, until_ms, prefix, limit } = r else { panic!("{r:?}") };
        assert_eq!(cluster, "prod");
        assert_eq!((since_ms, until_ms), (Some(NOW - 900_000), Some(NOW - 60_000)));
        assert_eq!((prefix, limit), (b"/registry/".to_vec(), DEFAULT_LIMIT));
        let open = request(&args(None, None), NOW).unwrap();
        assert!(matches!(open, AdminRequest::Changes { since_ms: None, until_ms: None, .. }), "{open:?}");
        let e = request(&args(Some("5m"), Some("1h")), NOW).unwrap_err().to_string();
        assert!(e.contains("--since 2026-12-07T04:15:00.000Z is after --until 2026-12-07T03:20:00.000Z"), "{e}");
        let e = request(&ChangesArgs { limit: MAX_LIMIT + 1, ..args(None, None) }, NOW).unwrap_err().to_string();
        assert!(e.contains("--limit 100001") && e.contains("1 to 100000"), "{e}");
    }

    fn row(revision: i64, kind: EventKind, key: &[u8], value_size: u64) -> ChangeRow {
        ChangeRow { revision, time_ms: NOW + 123, kind, key: key.to_vec(), value_size }
    }

    #[test]
    fn keys_print_as_stored_with_the_unprintable_escaped() {
        assert_eq!(printable_key(b"/registry/pods/default/web-0"), "/registry/pods/default/web-0");
        assert_eq!(printable_key(b"a\nb\tc\\d\x1b[31m\x7f"), "a\\nb\\tc\\\\d\\x1b[31m\\x7f");
        assert_eq!(printable_key("pod\u{202e}gnp.exe\u{200b}".as_bytes()), "pod\\u{202e}gnp.exe\\u{200b}");
        assert_eq!(printable_key(b"caf\xc3\xa9 \xff"), "caf\u{e9} \u{fffd}");
    }

    #[test]
    fn the_table_lists_revision_time_op_key_and_size() {
        let rows = [row(1234, EventKind::Put, b"/registry/a", 512), row(1235, EventKind::Delete, b"k\n", 0)];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(
            lines[0].split("   ").map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>(),
            ["REVISION", "TIME (UTC)", "OP", "KEY", "VALUE-SIZE"]
        );
        assert_eq!(lines[1], "1234       2026-12-07 04:20:00.123   put      /registry/a   512");
        assert_eq!(lines[2], "1235       2026-12-07 04:20:00.123   delete   k\\n           -");
        assert_eq!(table(&[]).lines().count(), 1);
    }

    #[test]
    fn json_is_one_object_per_line_with_the_exact_key_in_base64() {
        let rows = [row(7, EventKind::Put, b"/a\xff", 3), row(8, EventKind::Delete, b"/b", 0)];
        let out = json_lines(&rows).unwrap();
        let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(
            lines[0],
            serde_json::json!({
                "revision": 7, "time": "2026-12-07T04:20:00.123Z", "op": "put", "key": "/a\u{fffd}",
                "key_base64": "L2H/", "value_size": 3,
            })
        );
        assert_eq!(lines[1]["op"], "delete");
        assert_eq!(lines.len(), 2);
        assert_eq!(json_lines(&[]).unwrap(), "");
    }
}
