//! Topic names: `persistent://tenant/namespace/topic`, with short forms for the defaults.

use std::fmt;
use std::str::FromStr;

/// Tenant used for short topic names.
pub const DEFAULT_TENANT: &str = "public";
/// Namespace used for short topic names.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest accepted name part (tenant, namespace or topic), in bytes.
pub const MAX_NAME_PART_BYTES: usize = 255;

/// A fully qualified, validated topic name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName {
    tenant: String,
    namespace: String,
    topic: String,
}

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic name {name:?}: {reason}")]
pub struct InvalidTopicName {
    pub name: String,
    pub reason: String,
}

impl TopicName {
    /// Parses `topic`, `tenant/namespace/topic` or `persistent://tenant/namespace/topic`.
    pub fn parse(name: &str) -> Result<Self, InvalidTopicName> {
        let bad = |reason: String| InvalidTopicName { name: name.to_string(), reason };
        let rest = match name.split_once("://") {
            Some(("persistent", rest)) => rest,
            Some((scheme, _)) => {
                return Err(bad(format!("unsupported domain {scheme:?}: only persistent:// topics exist")));
            }
            None => name,
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let (tenant, namespace, topic) = match parts.as_slice() {
            [t] if !name.contains("://") => (DEFAULT_TENANT, DEFAULT_NAMESPACE, *t),
            [tenant, ns, t] => (*tenant, *ns, *t),
            _ => {
                return Err(bad(
                    "expected TOPIC, TENANT/NAMESPACE/TOPIC or persistent://TENANT/NAMESPACE/TOPIC".to_string()
                ));
            }
        };
        for (what, part) in [("tenant", tenant), ("namespace", namespace), ("topic", topic)] {
            validate_name_part(what, part).map_err(bad)?;
        }
        Ok(TopicName { tenant: tenant.to_string(), namespace: namespace.to_string(), topic: topic.to_string() })
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn local_name(&self) -> &str {
        &self.topic
    }

    /// `tenant/namespace/topic`: the topic's path in the metadata store.
    pub fn path(&self) -> String {
        format!("{}/{}/{}", self.tenant, self.namespace, self.topic)
    }
}

/// Checks one part of a name (tenant, namespace, topic; `what` names it in the error): letters,
/// digits and `-_.=:` (Pulsar's set), not empty, `.` or `..`.
pub fn validate_name_part(what: &str, part: &str) -> Result<(), String> {
    if part.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if part.len() > MAX_NAME_PART_BYTES {
        return Err(format!("{what} is {} bytes, above the maximum of {MAX_NAME_PART_BYTES}", part.len()));
    }
    if part == "." || part == ".." {
        return Err(format!("{what} may not be {part:?}"));
    }
    if let Some(c) = part.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.=:".contains(*c))) {
        return Err(format!("{what} contains {c:?}; allowed are letters, digits and - _ . = :"));
    }
    Ok(())
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "persistent://{}/{}/{}", self.tenant, self.namespace, self.topic)
    }
}

impl FromStr for TopicName {
    type Err = InvalidTopicName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicName::parse(s)
    }
}

/// Validates a subscription name with the same rules as a topic name part.
pub fn validate_subscription_name(name: &str) -> Result<(), String> {
    validate_name_part("subscription name", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_full_names_agree() {
        let short = TopicName::parse("my-topic").expect("short");
        let full = TopicName::parse("persistent://public/default/my-topic").expect("full");
        let path = TopicName::parse("public/default/my-topic").expect("path");
        assert_eq!(short, full);
        assert_eq!(short, path);
        assert_eq!(short.to_string(), "persistent://public/default/my-topic");
        assert_eq!(short.path(), "public/default/my-topic");
    }

    #[test]
    fn invalid_names_are_refused_with_the_reason() {
        for (name, needle) in [
            ("", "topic is empty"),
            ("a/b", "expected TOPIC"),
            ("persistent://a/b", "expected TOPIC"),
            ("non-persistent://a/b/c", "unsupported domain"),
            ("a b", "contains ' '"),
            ("public/default/..", "may not be"),
            ("persistent://t//x", "namespace is empty"),
        ] {
            let err = TopicName::parse(name).expect_err(name).to_string();
            assert!(err.contains(needle), "{name:?}: {err}");
        }
        let long = "x".repeat(MAX_NAME_PART_BYTES + 1);
        assert!(TopicName::parse(&long).is_err());
    }
}
