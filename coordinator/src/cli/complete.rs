//! Shell completions: the TYPE argument of `get` and `delete` completes to Ferry's resource types.

use clap::builder::{PossibleValue, TypedValueParser};
use ferry_common::resources::ResourceType;

/// The types' lowercase plural names (`&'static str`: clap without its `string` feature takes no `String`).
const TYPE_NAMES: [&str; ResourceType::ALL.len()] = [
    "etcdbackups3configs",
    "etcdbackupoverallstatuses",
    "etcdbackupstatuses",
    "etcdmanualbackups",
    "etcdbackups",
    "clusters",
    "agents",
    "agentcredentials",
    "etcdbackupencryptionconfigs",
    "admincredentials",
    "etcdrestores",
    "etcdrestorestatuses",
];

/// TYPE of `get` and `delete`: any string is taken as given (ferryctl parses it, any case, singular or
/// plural, and names the known types when it is wrong), but completions and `--help` offer the types'
/// lowercase plural names.
#[derive(Debug, Clone, Copy)]
pub struct TypeName;

impl TypedValueParser for TypeName {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        clap::builder::StringValueParser::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(TYPE_NAMES.into_iter().map(PossibleValue::new)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_offered_name_parses() {
        let names: Vec<String> =
            TypeName.possible_values().into_iter().flatten().map(|n| n.get_name().to_string()).collect();
        let want: Vec<String> = ResourceType::ALL.iter().map(|t| t.plural().to_ascii_lowercase()).collect();
        assert_eq!(names, want, "every type, in ResourceType::ALL's order");
    }
}
