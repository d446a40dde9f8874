//! `ferryctl get -w TYPE [ID]`: the current state, then every change, until interrupted.
//!
//! It polls the coordinator every [`WATCH_EVERY`] and prints what differs from the previous answer: a
//! server-side watch would need a long-lived stream per watcher for what is, in practice, an operator looking
//! at a backup run for a minute.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use ferry_common::config::FerryConfig;
use ferry_common::resources::{Resource, ResourceType, Selector};

use super::render::{render, Format};
use super::request::{get, is_not_found};

/// How often the coordinator is asked: a backup's status moves about once a second.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// What one poll changed, in the order to print it.
#[derive(Debug, PartialEq)]
pub enum Change<'a> {
    Changed(&'a Resource),
    Deleted(&'a str),
}

/// The changes from `before` to `now` (both keyed by id): new or different resources, then deletions.
pub fn diff<'a>(before: &'a BTreeMap<String, Resource>, now: &'a BTreeMap<String, Resource>) -> Vec<Change<'a>> {
    let mut out: Vec<Change> =
        now.iter().filter(|(id, r)| before.get(*id) != Some(*r)).map(|(_, r)| Change::Changed(r)).collect();
    out.extend(before.keys().filter(|id| !now.contains_key(*id)).map(|id| Change::Deleted(id)));
    out
}

/// Watches until the process is interrupted. Only the first answer's errors end it (a wrong type or id);
/// later ones are reported on stderr and the watch goes on.
pub async fn run(
    cfg: &FerryConfig,
    rt: ResourceType,
    id: Option<String>,
    selector: Option<Selector>,
    format: Format,
) -> Result<()> {
    let first = get(cfg, rt, id.clone(), selector.clone()).await?;
    let mut seen = by_id(first);
    emit(rt, format, &seen.values().map(Change::Changed).collect::<Vec<_>>(), true)?;
    let mut failing = false;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let now = match get(cfg, rt, id.clone(), selector.clone()).await {
            Ok(rs) => by_id(rs),
            // The one resource watched is gone: that is a change to show, not the end.
            Err(e) if id.is_some() && is_not_found(&e) => BTreeMap::new(),
            Err(e) => {
                if !failing {
                    eprintln!("warning: {}; still watching", format!("{e:#}").replace('\n', " "));
                }
                failing = true;
                continue;
            }
        };
        failing = false;
        emit(rt, format, &diff(&seen, &now), false)?;
        seen = now;
    }
}

fn by_id(rs: Vec<Resource>) -> BTreeMap<String, Resource> {
    rs.into_iter().map(|r| (r.metadata.id.clone(), r)).collect()
}

/// Prints changes: table rows (the header only on the first print), YAML documents, or JSON objects.
fn emit(rt: ResourceType, format: Format, changes: &[Change], first: bool) -> Result<()> {
    let mut out = String::new();
    for c in changes {
        match (c, format) {
            (Change::Changed(r), Format::Table) => {
                let t = render(rt, std::slice::from_ref(*r), Format::Table, true)?;
                let skip = usize::from(!(first && out.is_empty()));
                t.lines().skip(skip).for_each(|l| {
                    out.push_str(l);
                    out.push('\n');
                });
            }
            (Change::Changed(r), Format::Yaml) => {
                if !(first && out.is_empty()) {
                    out.push_str("---\n");
                }
                out.push_str(&render(rt, std::slice::from_ref(*r), Format::Yaml, true)?);
            }
            (Change::Changed(r), Format::Json) => {
                out.push_str(&render(rt, std::slice::from_ref(*r), Format::Json, true)?)
            }
            (Change::Deleted(id), Format::Table) => out.push_str(&format!("{id}   (deleted)\n")),
            // YAML and JSON stay parseable: deletions are said on stderr.
            (Change::Deleted(id), _) => eprintln!("{rt}/{id} deleted"),
        }
    }
    if first && changes.is_empty() && format == Format::Table {
        eprintln!("no {} yet; watching", rt.plural());
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use ferry_common::resources::{EtcdBackupStatusSpec, Spec};

    use super::*;

    fn st(id: &str, bytes: u64) -> (String, Resource) {
        let spec = EtcdBackupStatusSpec { bytesdone: bytes, ..Default::default() };
        (id.to_string(), Resource::new(id, Spec::EtcdBackupStatus(spec)))
    }

    #[test]
    fn only_what_changed_is_printed_again() {
        let before: BTreeMap<_, _> = [st("a", 1), st("b", 1), st("gone", 1)].into();
        let now: BTreeMap<_, _> = [st("a", 1), st("b", 2), st("new", 0)].into();
        let d = diff(&before, &now);
        assert_eq!(d, vec![Change::Changed(&now["b"]), Change::Changed(&now["new"]), Change::Deleted("gone")]);
        assert!(diff(&now, &now).is_empty());
    }
}
