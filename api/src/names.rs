//! Certificate names: a peer is identified by the DNS names (SANs) of its
//! certificate, and authorisation entries match them, `*` allowed only as the
//! whole first label of a pattern. Pure.

/// Whether `name` is a host name a certificate may identify a peer by:
/// labels of 1-63 letters, digits and `-`, not starting or ending with `-`,
/// 253 characters at most. A wildcard (`*.site-a.example.com`) names no host:
/// presented by a client it must never match anything.
pub fn is_host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Whether `pattern` (lower case, validated by the CRD schema) matches `name`,
/// a name presented in a certificate (never matched unless a host name).
pub fn matches(pattern: &str, name: &str) -> bool {
    if !is_host_name(name) {
        return false;
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        // Exactly one label in front of the suffix: `*.b.c` matches `a.b.c` only.
        Some(suffix) => name
            .strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => name == pattern,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_is_exactly_one_first_label() {
        assert!(matches("*.site-a.example.com", "host1.site-a.example.com"));
        assert!(matches("*.site-a.example.com", "HOST1.site-a.example.com."));
        assert!(!matches("*.site-a.example.com", "site-a.example.com"));
        assert!(!matches("*.site-a.example.com", "a.b.site-a.example.com"));
        assert!(!matches("*.site-a.example.com", "evil-site-a.example.com"));
        assert!(!matches("*.site-a.example.com", "host1.site-a.example.com.evil.org"));
        assert!(matches("db.site-a.example.com", "db.site-a.example.com"));
        assert!(!matches("db.site-a.example.com", "db2.site-a.example.com"));
    }

    #[test]
    fn a_wildcard_presented_in_a_certificate_never_matches() {
        assert!(!matches("*.site-a.example.com", "*.site-a.example.com"));
        assert!(!matches("*.site-a.example.com", "a*.site-a.example.com"));
        assert!(!matches("db.site-a.example.com", "db .site-a.example.com"));
        assert!(!matches("*.site-a.example.com", &format!("{}.site-a.example.com", "a".repeat(64))));
        assert!(matches("*.site-a.example.com", &format!("{}.site-a.example.com", "a".repeat(63))));
        assert!(!is_host_name("-a.example.com") && !is_host_name("") && !is_host_name("a..b"));
    }
}
