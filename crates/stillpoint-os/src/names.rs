//! Names that become file names, socket paths or snapshot names.
//!
//! Two tools, for two kinds of input:
//! - [`validate_name`] for names a user chooses (VM names, `backup-image --name`): one rule,
//!   checked where the name enters, with an error naming the argument. `../x` never gets near
//!   a path.
//! - [`file_name`] for strings that must map to a file name whatever they hold (a VM reference
//!   of another platform, a disk id): an injective escaping, so two different strings never
//!   share a lease or state file.

use crate::error::{Error, Result};

/// Longest accepted name: it becomes part of Unix socket paths (108 bytes in all).
pub const MAX_NAME_LEN: usize = 64;

/// Checks a name that becomes a directory or file name, part of socket paths, QEMU's `-name`
/// or a snapshot's VM name: 1 to [`MAX_NAME_LEN`] letters, digits, `-`, `_` or `.`, starting
/// with a letter or digit (so never `.`, `..` or a hidden file). `what` names the argument in
/// the error (`VM name`, `--name` …).
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let starts_well = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let problem = if name.is_empty() {
        Some("is empty".to_owned())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!(
            "is {} characters long (at most {MAX_NAME_LEN})",
            name.len()
        ))
    } else if !valid_chars || !starts_well {
        Some("must be letters, digits, `-`, `_` or `.`, starting with a letter or digit".to_owned())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(Error::InvalidName {
            what: what.to_owned(),
            name: shorten(name),
            problem,
        }),
    }
}

/// A long bad name is quoted by its start only (the error stays readable).
fn shorten(name: &str) -> String {
    const SHOWN: usize = 80;
    if name.chars().count() <= SHOWN {
        return name.to_owned();
    }
    let start: String = name.chars().take(SHOWN).collect();
    format!("{start}…")
}

/// Escapes any string into one file name component, injectively: letters, digits, `-`, `_`
/// and `.` stay (so ordinary names keep their file names), every other byte — and `%` itself,
/// and a leading `.` — becomes `%XX`. The result never contains `/`, is never `.`/`..`, and
/// never starts with `.`; the empty string becomes `%` (no other input gives a lone `%`).
pub fn file_name(text: &str) -> String {
    if text.is_empty() {
        return "%".to_owned();
    }
    let mut out = String::with_capacity(text.len());
    for (index, byte) in text.bytes().enumerate() {
        let keep = byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'_')
            || (byte == b'.' && index > 0);
        if keep {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["demo", "vm-1", "a.b_c", "9", &"x".repeat(64)] {
            assert!(validate_name("VM name", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".",
            "..",
            "../x",
            "../../x",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            let error = validate_name("VM name", bad).expect_err(bad).to_string();
            assert!(error.starts_with("invalid VM name `"), "{error}");
        }
        let error = validate_name("--name", &"y".repeat(300))
            .unwrap_err()
            .to_string();
        assert!(error.contains("300 characters long"), "{error}");
        assert!(
            error.len() < 200,
            "the error quotes the whole name: {error}"
        );
    }

    #[test]
    fn ordinary_names_keep_their_file_names() {
        assert_eq!(file_name("vm-1.x_y"), "vm-1.x_y");
        assert_eq!(file_name("a b"), "a%20b");
        assert_eq!(file_name("a_b"), "a_b");
        assert_eq!(file_name("../x"), "%2E.%2Fx");
        assert_eq!(file_name("kubevirt:ns/vm"), "kubevirt%3Ans%2Fvm");
        assert_eq!(file_name("100%"), "100%25");
        assert_eq!(file_name(""), "%");
    }

    /// The inverse of [`file_name`]: its existence is what makes the escaping injective.
    fn unescape(name: &str) -> Option<String> {
        if name == "%" {
            return Some(String::new());
        }
        let bytes = name.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = name.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()
    }

    proptest! {
        #[test]
        fn file_names_are_injective_and_safe(a in any::<String>(), b in any::<String>()) {
            let (fa, fb) = (file_name(&a), file_name(&b));
            prop_assert_eq!(unescape(&fa), Some(a.clone()));
            if a != b {
                prop_assert_ne!(&fa, &fb);
            }
            prop_assert!(!fa.contains('/') && !fa.starts_with('.') && !fa.is_empty());
        }

        #[test]
        fn near_names_stay_apart(stem in "[a-z]{0,4}", sep in "[ _./:%-]") {
            let a = format!("{stem}{sep}x");
            let b = format!("{stem}_x");
            prop_assert_eq!(file_name(&a) == file_name(&b), a == b);
        }
    }
}
