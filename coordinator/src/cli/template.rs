//! Cluster templates (`ferryctl cluster template -f FILE diff|sync`), the seed product's second way to
//! configure backups.
//!
//! A template is YAML documents. The `kind: Cluster` one carries `name` and
//! `features.backupConfiguration.{interval | schedule, retention, drillInterval, encryption, pointInTime}`; Ferry
//! owns exactly that. Documents of other kinds and fields Ferry does not manage (`kubernetes`, `talos`,
//! `ControlPlane`, `Workers`, …) are accepted and reported as ignored, so a template shared with other tools
//! still works.

use std::time::Duration;

use ferry_common::resources::{
    validate_name, BackupConfiguration, ClusterSpec, EncryptionSettings, Metadata, PointInTime, ProtoDuration,
    Resource, ResourceType, RestoreFrom, Retention, Spec,
};
use serde::Deserialize;
use serde_yaml_ng::Value;

/// What a template asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub name: String,
    pub spec: ClusterSpec,
}

/// A template that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("template document {doc}: {msg}")]
pub struct TemplateError {
    pub doc: usize,
    pub msg: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TemplateBackup {
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    retention: Option<TemplateRetention>,
    #[serde(default)]
    drill_interval: Option<String>,
    /// `encryption: {recipients: [age1…]}`: this cluster's age recipients (an empty list: unencrypted).
    #[serde(default)]
    encryption: Option<EncryptionSettings>,
    /// `pointInTime: {enabled: true, window: 7d}`: the change log; kept as YAML to word its errors (below).
    #[serde(default)]
    point_in_time: Option<Value>,
}

/// `features.backupConfiguration.pointInTime`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplatePointInTime {
    #[serde(default)]
    enabled: Option<bool>,
    /// A humantime duration; absent: 7 days.
    #[serde(default)]
    window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TemplateRetention {
    #[serde(default, alias = "keeplast")]
    keep_last: u32,
    #[serde(default)]
    hourly: u32,
    #[serde(default)]
    daily: u32,
    #[serde(default)]
    weekly: u32,
}

/// Parses a template into the clusters it describes, plus notices about what was ignored.
pub fn parse(text: &str) -> Result<(Vec<Desired>, Vec<String>), TemplateError> {
    let mut out = Vec::new();
    let mut notices = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let err = |msg: String| TemplateError { doc, msg };
        let value = Value::deserialize(de).map_err(|e| err(format!("not valid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let Value::Mapping(map) = value else { return Err(err("expected a mapping with `kind`".into())) };
        let kind = map.get("kind").and_then(Value::as_str).ok_or_else(|| err("no `kind`".into()))?;
        if kind != "Cluster" {
            notices.push(format!("document {doc}: kind {kind} is not managed by Ferry; ignored"));
            continue;
        }
        let name = map
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| err("the Cluster document has no `name`".into()))?
            .to_string();
        validate_name("cluster", &name).map_err(|e| err(e.to_string()))?;
        let mut backup = None;
        let mut restorefrom = None;
        for (k, v) in &map {
            match k.as_str().unwrap_or_default() {
                "kind" | "name" => {}
                "features" => {
                    let Value::Mapping(features) = v else { return Err(err("`features` must be a mapping".into())) };
                    for (fk, fv) in features {
                        match fk.as_str().unwrap_or_default() {
                            "backupConfiguration" => {
                                let b: TemplateBackup = serde_yaml_ng::from_value(fv.clone())
                                    .map_err(|e| err(format!("features.backupConfiguration: {e}")))?;
                                backup = Some(convert(b).map_err(err)?);
                            }
                            "restoreFrom" => {
                                let r: TemplateRestoreFrom = serde_yaml_ng::from_value(fv.clone())
                                    .map_err(|e| err(format!("features.restoreFrom: {e}")))?;
                                restorefrom = Some(convert_restore_from(&name, r).map_err(err)?);
                            }
                            other => notices
                                .push(format!("cluster {name}: features.{other} is not managed by Ferry; ignored")),
                        }
                    }
                }
                other => notices.push(format!("cluster {name}: field {other} is not managed by Ferry; ignored")),
            }
        }
        if out.iter().any(|d: &Desired| d.name == name) {
            return Err(err(format!("cluster {name} appears twice")));
        }
        out.push(Desired { name, spec: ClusterSpec { backupconfiguration: backup, restorefrom } });
    }
    if out.is_empty() {
        return Err(TemplateError { doc: 0, msg: "no `kind: Cluster` document in the template".into() });
    }
    Ok((out, notices))
}

/// `features.restoreFrom`: the cluster this new one boots from.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TemplateRestoreFrom {
    cluster: String,
    #[serde(default = "latest")]
    backup: String,
    members: u32,
    #[serde(default)]
    mode: String,
}

fn latest() -> String {
    "latest".into()
}

fn convert_restore_from(name: &str, r: TemplateRestoreFrom) -> Result<RestoreFrom, String> {
    validate_name("cluster", &r.cluster).map_err(|e| format!("features.restoreFrom.cluster: {e}"))?;
    if r.cluster == name {
        return Err(format!(
            "features.restoreFrom.cluster is {name} itself: a cluster restores its own backups with `ferryctl restore`"
        ));
    }
    if r.members == 0 || r.members > 9 {
        return Err(format!(
            "features.restoreFrom.members {} is not a control plane's size: give the new cluster's member count (1 to 9, e.g. 3)",
            r.members
        ));
    }
    if !matches!(r.mode.as_str(), "" | "seed-join" | "all-members") {
        return Err(format!("features.restoreFrom.mode {:?}: give seed-join (the default) or all-members", r.mode));
    }
    Ok(RestoreFrom { cluster: r.cluster, backup: r.backup, members: r.members, mode: r.mode })
}

fn convert(b: TemplateBackup) -> Result<BackupConfiguration, String> {
    let duration = |field: &str, s: Option<String>| -> Result<Option<ProtoDuration>, String> {
        let Some(s) = s else { return Ok(None) };
        let d: Duration = humantime::parse_duration(&s)
            .map_err(|e| format!("features.backupConfiguration.{field} {s:?}: {e} (use e.g. 1h, 30m)"))?;
        Ok(Some(ProtoDuration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }))
    };
    let interval = duration("interval", b.interval)?;
    let drillinterval = duration("drillInterval", b.drill_interval)?;
    let retention =
        b.retention.map(|r| Retention { keeplast: r.keep_last, hourly: r.hourly, daily: r.daily, weekly: r.weekly });
    if let Some(e) = &b.encryption {
        ferry_common::encryption::parse_recipients(&e.recipients)
            .map_err(|e| format!("features.backupConfiguration.encryption.recipients: {e}"))?;
    }
    let pointintime = b.point_in_time.map(convert_point_in_time).transpose()?;
    Ok(BackupConfiguration {
        interval,
        schedule: b.schedule.unwrap_or_default(),
        retention,
        drillinterval,
        encryption: b.encryption,
        pointintime,
    })
}

/// How a template turns the change log on, for error messages.
const POINT_IN_TIME_EXAMPLE: &str = "pointInTime: {enabled: true, window: 7d}";

fn convert_point_in_time(v: Value) -> Result<PointInTime, String> {
    const FIELD: &str = "features.backupConfiguration.pointInTime";
    let p: TemplatePointInTime =
        serde_yaml_ng::from_value(v).map_err(|e| format!("{FIELD}: {e}; write it as `{POINT_IN_TIME_EXAMPLE}`"))?;
    let enabled = p.enabled.ok_or_else(|| {
        format!("{FIELD} has no `enabled`: say `enabled: true` to keep the change log (or false), e.g. `{POINT_IN_TIME_EXAMPLE}`")
    })?;
    let window = match p.window {
        None => None,
        Some(s) => {
            let d = humantime::parse_duration(&s)
                .map_err(|e| format!("{FIELD}.window {s:?}: {e} (use e.g. 7d, 36h; the default is 7d)"))?;
            let w = ProtoDuration {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: d.subsec_nanos() as i32,
            };
            // Checked here as the coordinator checks it on apply, but worded in the template's terms.
            crate::schedule::plan::point_in_time_window(&w).map_err(|e| {
                format!("{FIELD}.window {s:?} {e}; give between 1h and 400d in whole seconds, e.g. 7d (the default)")
            })?;
            Some(w)
        }
    };
    Ok(PointInTime { enabled, window })
}

/// The diff header name of a cluster: `Clusters.ferry.dev(default/NAME)`.
pub fn header(name: &str) -> String {
    let rt = ResourceType::Cluster;
    format!("{}({}/{name})", rt.full_name(), rt.namespace())
}

/// The part of a Cluster resource a template manages, as YAML, for diffing. Empty when there is none.
pub fn render(name: &str, spec: Option<&ClusterSpec>) -> String {
    let Some(spec) = spec else { return String::new() };
    let meta = Metadata::new(ResourceType::Cluster, name);
    let v = serde_json::json!({
        "metadata": { "namespace": meta.namespace, "type": meta.type_name, "id": name },
        "spec": Spec::Cluster(spec.clone()).to_value(),
    });
    serde_yaml_ng::to_string(&v).unwrap_or_default()
}

/// A unified diff from the current cluster to the desired one; empty when nothing would change.
pub fn diff(name: &str, current: Option<&ClusterSpec>, desired: &ClusterSpec) -> String {
    let (old, new) = (render(name, current), render(name, Some(desired)));
    if old == new {
        return String::new();
    }
    let h = header(name);
    similar::TextDiff::from_lines(&old, &new).unified_diff().context_radius(3).header(&h, &h).to_string()
}

/// The resource `sync` applies: the desired spec, keeping the current resource's labels.
pub fn resource(d: &Desired, current: Option<&Resource>) -> Resource {
    let mut r = Resource::new(d.name.clone(), Spec::Cluster(d.spec.clone()));
    if let Some(c) = current {
        r.metadata.labels = c.metadata.labels.clone();
        r.metadata.annotations = c.metadata.annotations.clone();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
kind: Cluster
name: prod
kubernetes:
  version: v1.31.0
talos:
  version: v1.8.0
features:
  diskEncryption: true
  backupConfiguration:
    interval: 1h
    retention:
      keepLast: 5
      daily: 7
---
kind: ControlPlane
machines: [a, b, c]
---
kind: Workers
machines: [d]
"#;

    #[test]
    fn a_shared_template_parses_with_notices_for_what_ferry_ignores() {
        let (clusters, notices) = parse(TEMPLATE).unwrap();
        assert_eq!(clusters.len(), 1);
        let b = clusters[0].spec.backupconfiguration.clone().unwrap();
        assert_eq!(b.interval, Some(ProtoDuration { seconds: 3600, nanos: 0 }));
        assert_eq!(b.retention, Some(Retention { keeplast: 5, daily: 7, ..Default::default() }));
        for word in ["kubernetes", "talos", "diskEncryption", "ControlPlane", "Workers"] {
            assert!(notices.iter().any(|n| n.contains(word)), "no notice for {word}: {notices:?}");
        }
    }

    #[test]
    fn diff_shows_the_change_and_is_empty_when_in_sync() {
        let (clusters, _) = parse(TEMPLATE).unwrap();
        let want = &clusters[0].spec;
        let d = diff("prod", Some(&ClusterSpec::default()), want);
        assert!(d.starts_with("--- Clusters.ferry.dev(default/prod)\n+++ Clusters.ferry.dev(default/prod)\n"), "{d}");
        assert!(d.contains("+    interval:") && d.contains("-  backupconfiguration: null"), "{d}");
        assert_eq!(diff("prod", Some(want), want), "");
    }

    fn point_in_time(yaml: &str) -> Result<Option<PointInTime>, String> {
        let t = format!("kind: Cluster\nname: p\nfeatures:\n  backupConfiguration:\n    interval: 1h\n{yaml}");
        parse(&t)
            .map(|(c, _)| c[0].spec.backupconfiguration.as_ref().and_then(|b| b.pointintime))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn point_in_time_turns_the_change_log_on_with_its_window() {
        let days = |n: i64| Some(ProtoDuration { seconds: n * 86_400, nanos: 0 });
        let on = point_in_time("    pointInTime: {enabled: true, window: 14d}\n").unwrap();
        assert_eq!(on, Some(PointInTime { enabled: true, window: days(14) }));
        // No window: the default (7 days), left absent as on a cluster applied without one.
        let on = point_in_time("    pointInTime:\n      enabled: true\n").unwrap().unwrap();
        assert_eq!((on.window, on.window_seconds()), (None, 7 * 86_400));
        let off = point_in_time("    pointInTime: {enabled: false, window: 2d}\n").unwrap();
        assert_eq!(off, Some(PointInTime { enabled: false, window: days(2) }));
        assert_eq!(point_in_time("").unwrap(), None);
    }

    #[test]
    fn point_in_time_shows_in_the_diff() {
        let (clusters, _) = parse(TEMPLATE).unwrap();
        let mut want = clusters[0].spec.clone();
        let current = want.clone();
        if let Some(b) = want.backupconfiguration.as_mut() {
            b.pointintime = Some(PointInTime { enabled: true, window: None });
        }
        let d = diff("prod", Some(&current), &want);
        assert!(d.contains("-    pointintime: null") && d.contains("+      enabled: true"), "{d}");
    }

    #[test]
    fn bad_point_in_time_says_the_field_and_the_fix() {
        for (yaml, needles) in [
            ("    pointInTime: {enabled: true, window: soon}\n", &["pointInTime.window \"soon\"", "7d"][..]),
            (
                "    pointInTime: {enabled: true, window: 30m}\n",
                &["pointInTime.window \"30m\"", "shorter than 1h", "between 1h and 400d"],
            ),
            ("    pointInTime: {enabled: true, window: 500d}\n", &["longer than 400d"]),
            ("    pointInTime: {enabled: true, window: 2h 5ms}\n", &["whole seconds"]),
            ("    pointInTime: {window: 7d}\n", &["no `enabled`", "enabled: true"]),
            ("    pointInTime: true\n", &["features.backupConfiguration.pointInTime", "{enabled: true, window: 7d}"]),
            ("    pointInTime: {enabled: yes please}\n", &["pointInTime", "{enabled: true, window: 7d}"]),
            ("    pointInTime: {enable: true}\n", &["enable", "{enabled: true, window: 7d}"]),
        ] {
            let e = point_in_time(yaml).unwrap_err();
            for n in needles {
                assert!(e.contains(n), "{yaml:?}: {n:?} not in {e:?}");
            }
        }
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        let e = parse("kind: Cluster\nfeatures:\n  backupConfiguration:\n    interval: 1h\n").unwrap_err().to_string();
        assert!(e.contains("no `name`"), "{e}");
        let e = parse("kind: Cluster\nname: p\nfeatures:\n  backupConfiguration:\n    interval: soon\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("interval") && e.contains("1h"), "{e}");
        let e = parse("kind: Cluster\nname: p\nfeatures:\n  backupConfiguration:\n    intervall: 1h\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("intervall"), "{e}");
        assert!(parse("kind: Workers\n").unwrap_err().to_string().contains("no `kind: Cluster`"));
    }
}
