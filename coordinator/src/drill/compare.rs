//! The sanity check of a drill against the one before it: a backup of an emptied cluster restores perfectly
//! and is still not the backup to keep. Pure, so it is tested without etcd.

use std::collections::BTreeMap;

/// A resource losing more than this share of its keys since the previous drill is flagged.
pub const DROP_PERCENT: u64 = 20;
/// Resources with fewer keys than this in the previous drill are not judged (a few objects come and go).
pub const MIN_BASELINE_KEYS: u64 = 10;

/// The resources whose key count fell by more than [`DROP_PERCENT`] from `before` to `now`, in words;
/// empty when nothing dropped (or there is nothing to compare with).
pub fn drops(before: &BTreeMap<String, u64>, now: &BTreeMap<String, u64>) -> Vec<String> {
    let mut out = Vec::new();
    for (resource, &was) in before {
        if was < MIN_BASELINE_KEYS {
            continue;
        }
        let is = now.get(resource).copied().unwrap_or(0);
        // is < was × (100 − DROP_PERCENT) / 100, in integers.
        if is * 100 < was * (100 - DROP_PERCENT) {
            out.push(format!("{resource} {was} → {is} (−{}%)", (was - is) * 100 / was));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(v: &[(&str, u64)]) -> BTreeMap<String, u64> {
        v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }

    #[test]
    fn a_drop_beyond_the_threshold_is_flagged_and_small_resources_are_not_judged() {
        let before = counts(&[("pods", 100), ("namespaces", 20), ("leases", 5)]);
        assert!(drops(&before, &counts(&[("pods", 81), ("namespaces", 20), ("leases", 0)])).is_empty());
        let flagged = drops(&before, &counts(&[("pods", 79), ("namespaces", 2)]));
        assert_eq!(flagged, ["namespaces 20 → 2 (−90%)", "pods 100 → 79 (−21%)"]);
        assert!(drops(&BTreeMap::new(), &counts(&[("pods", 1)])).is_empty(), "nothing to compare with");
    }
}
