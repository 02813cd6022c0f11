//! Names that arrive over the wire and become paths: only plain labels, so no
//! name can climb out of (`..`), jump out of (`/abs`), or hide in (`.x`) the
//! storage location.

/// Why a name from the wire was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {name:?} is not allowed: use 1-253 characters of a-z, 0-9, '-' and '.', \
     starting and ending with a letter or digit"
)]
pub struct BadName {
    pub what: &'static str,
    pub name: String,
}

/// Checks a VM or disk id that will name a directory.
pub fn check(what: &'static str, name: &str) -> Result<(), BadName> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 253
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && !name.contains("..");
    if ok { Ok(()) } else { Err(BadName { what, name: name.to_owned() }) }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn only_plain_labels_pass() {
        for good in ["ledger-db", "vm1", "a.b-c", "root"] {
            assert!(check("vm id", good).is_ok(), "{good}");
        }
        let long = "a".repeat(254);
        for bad in
            ["", "..", ".", "../etc", "a/b", "/abs", ".hidden", "a..b", "UPPER", "x\0y", "trailing-", &long]
        {
            let err = check("vm id", bad).unwrap_err();
            assert!(err.to_string().contains("is not allowed"), "{bad}");
        }
    }
}
