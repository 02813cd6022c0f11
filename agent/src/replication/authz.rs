//! Which primaries a replica site accepts (Hyper-V's authorisation entries):
//! a primary is identified by the DNS names (SANs) of its client certificate.
//! Pure logic; the gRPC service calls it on every request.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One AuthorizationEntry as the agent enforces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// The AuthorizationEntry's name (quoted in denials).
    pub name: String,
    /// An exact DNS name, or `*.` + suffix matching exactly one more label.
    pub allowed_primary_server: String,
    pub storage: PathBuf,
    pub trust_group: String,
}

/// A site's acceptance rules (ReplicationServer + AuthorizationEntries).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteConfig {
    pub allow_any_server: bool,
    pub default_storage: Option<PathBuf>,
    #[serde(default = "default_group")]
    pub default_trust_group: String,
    #[serde(default)]
    pub entries: Vec<Entry>,
}

fn default_group() -> String {
    "default".into()
}

/// What an accepted primary may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The certificate name that matched.
    pub primary: String,
    pub storage: PathBuf,
    pub trust_group: String,
    /// The entry that matched (`allowAnyServer` when none did).
    pub rule: String,
}

/// Why a primary was refused; the message names the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("the client certificate carries no DNS name; primaries are authorised by DNS name")]
    NoDnsName,
    #[error(
        "no AuthorizationEntry matches {names} and allowAnyServer is off: add an entry whose \
         allowedPrimaryServer matches one of these names"
    )]
    NoMatchingEntry { names: String },
    #[error(
        "replica belongs to trust group {replica_group:?}, but {names} is authorised only for \
         trust group(s) {granted}: a primary may only replicate into its own trust group"
    )]
    WrongTrustGroup { replica_group: String, names: String, granted: String },
    #[error("allowAnyServer is on but the ReplicationServer has no defaultStorageLocation")]
    NoDefaultStorage,
    #[error(
        "the client certificate's DNS names ({names}) are wildcards or not host names; a primary is \
         authorised by its own host name: issue its certificate for that"
    )]
    NoHostName { names: String },
    #[error(
        "{names} is the controller's certificate name (--controller-name): the controller may use the \
         control API only, never the replication API"
    )]
    ControllerIdentity { names: String },
}

pub use vmreplica_api::names::{is_host_name, matches};

impl SiteConfig {
    /// Entries matching any of `names`, exact matches before wildcards, then by name.
    fn matching<'a>(&'a self, names: &'a [String]) -> impl Iterator<Item = (&'a Entry, &'a String)> + 'a {
        let mut found: Vec<(&Entry, &String)> = self
            .entries
            .iter()
            .filter_map(|e| names.iter().find(|n| matches(&e.allowed_primary_server, n)).map(|n| (e, n)))
            .collect();
        found.sort_by_key(|(e, _)| (e.allowed_primary_server.starts_with("*."), e.name.clone()));
        found.into_iter()
    }

    /// Authorises a primary presenting `names` to create a new replica.
    pub fn authorize(&self, names: &[String]) -> Result<Grant, Denied> {
        if names.is_empty() {
            return Err(Denied::NoDnsName);
        }
        let hosts: Vec<String> = names.iter().filter(|n| is_host_name(n)).cloned().collect();
        if hosts.is_empty() {
            return Err(Denied::NoHostName { names: names.join(", ") });
        }
        let names = &hosts[..];
        if let Some((e, n)) = self.matching(names).next() {
            return Ok(Grant {
                primary: n.clone(),
                storage: e.storage.clone(),
                trust_group: e.trust_group.clone(),
                rule: format!("AuthorizationEntry {}", e.name),
            });
        }
        if self.allow_any_server {
            let storage = self.default_storage.clone().ok_or(Denied::NoDefaultStorage)?;
            return Ok(Grant {
                primary: names[0].clone(),
                storage,
                trust_group: self.default_trust_group.clone(),
                rule: "allowAnyServer".into(),
            });
        }
        Err(Denied::NoMatchingEntry { names: names.join(", ") })
    }

    /// Authorises a primary presenting `names` for an existing replica of
    /// `trust_group`: some matching entry must grant that trust group.
    pub fn authorize_for(&self, names: &[String], trust_group: &str) -> Result<Grant, Denied> {
        let first = self.authorize(names)?;
        if first.trust_group == trust_group {
            return Ok(first);
        }
        let hosts: Vec<String> = names.iter().filter(|n| is_host_name(n)).cloned().collect();
        let names = &hosts[..];
        if let Some((e, n)) = self.matching(names).find(|(e, _)| e.trust_group == trust_group) {
            return Ok(Grant {
                primary: n.clone(),
                storage: e.storage.clone(),
                trust_group: e.trust_group.clone(),
                rule: format!("AuthorizationEntry {}", e.name),
            });
        }
        let mut granted: Vec<&str> = self.matching(names).map(|(e, _)| e.trust_group.as_str()).collect();
        if self.allow_any_server {
            granted.push(&self.default_trust_group);
        }
        granted.dedup();
        Err(Denied::WrongTrustGroup {
            replica_group: trust_group.into(),
            names: names.join(", "),
            granted: granted.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, pattern: &str, group: &str) -> Entry {
        Entry {
            name: name.into(),
            allowed_primary_server: pattern.into(),
            storage: format!("/srv/{name}").into(),
            trust_group: group.into(),
        }
    }

    #[test]
    fn a_wildcard_presented_in_a_certificate_never_matches() {
        let cfg = SiteConfig {
            entries: vec![entry("a-wild", "*.site-a.example.com", "finance")],
            allow_any_server: true,
            default_storage: Some("/srv/any".into()),
            default_trust_group: "default".into(),
        };
        // Not even allowAnyServer records a wildcard as the primary's name.
        let err = cfg.authorize(&["*.site-a.example.com".into()]).unwrap_err();
        assert!(matches!(err, Denied::NoHostName { .. }), "{err}");
        assert!(err.to_string().contains("wildcards or not host names"), "{err}");
        // A real name beside it is the one that counts.
        let g = cfg.authorize(&["*.site-a.example.com".into(), "h1.site-a.example.com".into()]).unwrap();
        assert_eq!((g.primary.as_str(), g.trust_group.as_str()), ("h1.site-a.example.com", "finance"));
    }

    #[test]
    fn exact_entries_win_over_wildcards_and_trust_groups_are_enforced() {
        let cfg = SiteConfig {
            entries: vec![
                entry("a-wild", "*.site-a.example.com", "finance"),
                entry("a-db", "db.site-a.example.com", "hr"),
            ],
            ..Default::default()
        };
        let names = |n: &str| vec![n.to_owned()];
        let g = cfg.authorize(&names("db.site-a.example.com")).unwrap();
        assert_eq!((g.trust_group.as_str(), g.rule.as_str()), ("hr", "AuthorizationEntry a-db"));
        let g = cfg.authorize(&names("web.site-a.example.com")).unwrap();
        assert_eq!(g.trust_group, "finance");
        assert_eq!(g.storage, PathBuf::from("/srv/a-wild"));
        // db is also matched by the wildcard, so it may write into finance replicas.
        assert_eq!(
            cfg.authorize_for(&names("db.site-a.example.com"), "finance").unwrap().rule,
            "AuthorizationEntry a-wild"
        );
        let err = cfg.authorize_for(&names("web.site-a.example.com"), "hr").unwrap_err();
        assert!(
            err.to_string().contains("trust group \"hr\"") && err.to_string().contains("finance"),
            "{err}"
        );
        let err = cfg.authorize(&names("x.site-b.example.com")).unwrap_err();
        assert!(matches!(err, Denied::NoMatchingEntry { .. }));
        assert!(err.to_string().contains("x.site-b.example.com"));
        assert_eq!(cfg.authorize(&[]), Err(Denied::NoDnsName));
    }

    #[test]
    fn allow_any_server_uses_the_defaults() {
        let mut cfg = SiteConfig {
            allow_any_server: true,
            default_trust_group: "default".into(),
            ..Default::default()
        };
        assert_eq!(cfg.authorize(&["x.example.org".into()]), Err(Denied::NoDefaultStorage));
        cfg.default_storage = Some("/srv/any".into());
        let g = cfg.authorize(&["x.example.org".into()]).unwrap();
        assert_eq!((g.rule.as_str(), g.trust_group.as_str()), ("allowAnyServer", "default"));
    }
}
