//! The sanity check of a drill against the one before it: a backup of an emptied cluster restores perfectly
//! and is still not the backup to keep. Pure, so it is tested without etcd.

use std::collections::BTreeMap;

/// A resource losing more than this share of its keys since the previous drill is flagged (default of
/// `--drill-key-drop-percent`): a fifth of the pods gone is more than a rollout's churn.
pub const DEFAULT_DROP_PERCENT: u8 = 20;
/// Resources with fewer keys than this in the previous drill are not judged (default of
/// `--drill-key-drop-min-keys`): a few objects come and go.
pub const DEFAULT_MIN_BASELINE_KEYS: u64 = 10;

/// When a drop in a resource's key count is flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDrop {
    /// More than this share lost (0–100) is flagged: 0 flags any loss, 100 none.
    percent: u8,
    /// Resources with fewer keys before are not judged (at least 1).
    min_keys: u64,
}

/// A threshold the coordinator refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyDropError {
    /// Not a share.
    #[error(
        "--drill-key-drop-percent is {0}: it is a share of a resource's keys, 0 to 100 (0 flags any loss, 100 none)"
    )]
    Percent(u64),
    /// Zero would judge resources that had no keys.
    #[error("--drill-key-drop-min-keys is 0: it must be at least 1 (resources with fewer keys before are not judged)")]
    MinKeys,
}

impl Default for KeyDrop {
    fn default() -> Self {
        Self { percent: DEFAULT_DROP_PERCENT, min_keys: DEFAULT_MIN_BASELINE_KEYS }
    }
}

impl KeyDrop {
    /// A threshold, checked.
    pub fn new(percent: u64, min_keys: u64) -> Result<Self, KeyDropError> {
        let percent = u8::try_from(percent).ok().filter(|p| *p <= 100).ok_or(KeyDropError::Percent(percent))?;
        if min_keys == 0 {
            return Err(KeyDropError::MinKeys);
        }
        Ok(Self { percent, min_keys })
    }

    /// The resources whose key count fell by more than the threshold from `before` to `now`, in words;
    /// empty when nothing dropped (or there is nothing to compare with).
    pub fn drops(&self, before: &BTreeMap<String, u64>, now: &BTreeMap<String, u64>) -> Vec<String> {
        let mut out = Vec::new();
        for (resource, &was) in before {
            if was < self.min_keys {
                continue;
            }
            let is = now.get(resource).copied().unwrap_or(0);
            // is < was × (100 − percent) / 100, in integers (u128: no overflow whatever the counts).
            let kept = u128::from(100 - self.percent);
            if u128::from(is) * 100 < u128::from(was) * kept {
                out.push(format!("{resource} {was} → {is} (−{}%)", (u128::from(was - is) * 100) / u128::from(was)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(v: &[(&str, u64)]) -> BTreeMap<String, u64> {
        v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }

    #[test]
    fn a_drop_beyond_the_threshold_is_flagged_and_small_resources_are_not_judged() {
        let t = KeyDrop::default();
        let before = counts(&[("pods", 100), ("namespaces", 20), ("leases", 5)]);
        assert!(t.drops(&before, &counts(&[("pods", 81), ("namespaces", 20), ("leases", 0)])).is_empty());
        let flagged = t.drops(&before, &counts(&[("pods", 79), ("namespaces", 2)]));
        assert_eq!(flagged, ["namespaces 20 → 2 (−90%)", "pods 100 → 79 (−21%)"]);
        assert!(t.drops(&BTreeMap::new(), &counts(&[("pods", 1)])).is_empty(), "nothing to compare with");
    }

    #[test]
    fn the_threshold_is_configurable_within_its_bounds() {
        let before = counts(&[("pods", 100), ("leases", 5)]);
        let now = counts(&[("pods", 95), ("leases", 4)]);
        assert!(KeyDrop::default().drops(&before, &now).is_empty());
        let strict = KeyDrop::new(0, 1).unwrap();
        assert_eq!(strict.drops(&before, &now), ["leases 5 → 4 (−20%)", "pods 100 → 95 (−5%)"]);
        let lenient = KeyDrop::new(100, 1).unwrap();
        assert!(lenient.drops(&before, &counts(&[])).is_empty(), "100 % flags nothing");
        let half = KeyDrop::new(50, 6).unwrap();
        assert_eq!(half.drops(&before, &counts(&[("pods", 49)])), ["pods 100 → 49 (−51%)"], "leases not judged");
        assert!(half.drops(&before, &counts(&[("pods", 50)])).is_empty(), "exactly 50 % lost is not more than 50 %");

        assert_eq!(KeyDrop::new(101, 10), Err(KeyDropError::Percent(101)));
        assert_eq!(KeyDrop::new(u64::MAX, 10), Err(KeyDropError::Percent(u64::MAX)));
        assert_eq!(KeyDrop::new(20, 0), Err(KeyDropError::MinKeys));
        let msg = KeyDropError::Percent(150).to_string();
        assert!(msg.contains("--drill-key-drop-percent is 150") && msg.contains("0 to 100"), "{msg}");
        let big = KeyDrop::default().drops(&counts(&[("x", u64::MAX)]), &counts(&[("x", 1)]));
        assert_eq!(big.len(), 1, "no overflow on huge counts");
    }
}
