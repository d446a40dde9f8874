//! Property tests of the coordinator's decoders of outside input: cron strings and intervals of a cluster's
//! backup configuration, manifests read from the bucket, and `ferryctl template` documents (with their
//! humantime durations). Whatever the input: an error, never a panic.

use std::time::Duration;

use ferry_common::resources::{BackupConfiguration, ProtoDuration, Retention};
use ferry_coordinator::config::Bounds;
use ferry_coordinator::schedule::plan::plan;
use ferry_coordinator::store::Manifest;
use proptest::prelude::*;

fn bounds() -> Bounds {
    Bounds {
        min_interval: Duration::from_secs(60),
        max_interval: Duration::from_secs(86_400),
        jitter_fraction: 0.05,
        max_jitter: Duration::from_secs(300),
        min_drill_interval: Duration::from_secs(3600),
    }
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn cron_strings_never_panic_the_planner(schedule in "[0-9*/,\\- A-Za-z?#LW]{0,60}") {
        let cfg = BackupConfiguration { interval: None, schedule, retention: None, drillinterval: None, encryption: None, pointintime: None };
        let _ = plan(&cfg, &bounds());
    }

    #[test]
    fn intervals_and_retentions_never_panic_the_planner(
        seconds in any::<i64>(),
        nanos in any::<i32>(),
        keep in any::<(u32, u32, u32, u32)>(),
    ) {
        let retention = Some(Retention { keeplast: keep.0, hourly: keep.1, daily: keep.2, weekly: keep.3 });
        let interval = Some(ProtoDuration { seconds, nanos });
        let cfg = BackupConfiguration { interval, schedule: String::new(), retention, drillinterval: None, encryption: None, pointintime: None };
        let _ = plan(&cfg, &bounds());
    }

    #[test]
    fn manifests_from_the_bucket_never_panic(text in "(?s).{0,400}") {
        let _ = serde_json::from_str::<Manifest>(&text);
    }

    #[test]
    fn manifest_shaped_json_never_panics(id in ".{0,70}", cluster in ".{0,70}", snapshot in ".{0,200}", n in any::<i64>()) {
        let text = format!(
            "{{\"format\":1,\"id\":{},\"deployment\":{},\"backup\":{{\"cluster\":{},\"createdat\":{{\"seconds\":{n}}},\
             \"snapshot\":{},\"size\":{n},\"rawsize\":0,\"member\":\"\",\"memberid\":\"\",\"etcdclusterid\":\"\",\
             \"etcdversion\":\"\",\"revision\":{n},\"sha256\":\"\",\"rawsha256\":\"\",\"zstdlevel\":3}}}}",
            q(&id), q(&cluster), q(&cluster), q(&snapshot)
        );
        let _ = serde_json::from_str::<Manifest>(&text);
    }

    #[test]
    fn template_documents_never_panic(name in ".{0,70}", every in ".{0,30}", keep in ".{0,30}", raw in "(?s).{0,300}") {
        let doc = format!(
            "kind: Cluster\nname: {}\nfeatures:\n  backupConfiguration:\n    interval: {}\n    schedule: {}\n    \
             retention:\n      keepLast: {}\n",
            q(&name), q(&every), q(&keep), q(&keep)
        );
        let _ = ferry_coordinator::cli::template::parse(&doc);
        let _ = ferry_coordinator::cli::template::parse(&raw);
        let _ = humantime::parse_duration(&every);
    }
}
