//! The `Range` header (RFC 9110 §14.2), for byte ranges of one file.

/// What a `Range` header asks of a representation of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranges {
    /// Not a byte range the server understands (or bad syntax): ignored,
    /// the whole file is sent.
    Ignore,
    /// One satisfiable range, `first..=last`.
    Single(u64, u64),
    /// Several ranges: answered with the whole file (200), as a
    /// multipart answer is not made.
    Multiple,
    /// No range overlaps the file: 416.
    Unsatisfiable,
}

fn number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// One spec: `Some(None)` if valid but unsatisfiable.
fn spec(s: &str, size: u64) -> Option<Option<(u64, u64)>> {
    let (a, b) = s.trim().split_once('-')?;
    match (a.trim(), b.trim()) {
        ("", n) => {
            let n = number(n)?;
            Some((n > 0 && size > 0).then(|| (size - n.min(size), size - 1)))
        }
        (a, "") => {
            let a = number(a)?;
            Some((a < size).then(|| (a, size - 1)))
        }
        (a, b) => {
            let (a, b) = (number(a)?, number(b)?);
            if a > b {
                return None;
            }
            Some((a < size).then(|| (a, b.min(size - 1))))
        }
    }
}

/// Parses `value` for a representation of `size` bytes.
pub fn parse(value: &str, size: u64) -> Ranges {
    let Some((unit, set)) = value.split_once('=') else { return Ranges::Ignore };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Ranges::Ignore;
    }
    let specs: Vec<&str> = set.split(',').filter(|s| !s.trim().is_empty()).collect();
    if specs.is_empty() || specs.len() > 100 {
        return Ranges::Ignore;
    }
    let mut parsed = Vec::with_capacity(specs.len());
    for s in &specs {
        match spec(s, size) {
            Some(r) => parsed.push(r),
            None => return Ranges::Ignore,
        }
    }
    let satisfiable: Vec<(u64, u64)> = parsed.into_iter().flatten().collect();
    match (specs.len(), satisfiable.as_slice()) {
        (_, []) => Ranges::Unsatisfiable,
        (1, [(a, b)]) => Ranges::Single(*a, *b),
        _ => Ranges::Multiple,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn single_ranges() {
        assert_eq!(parse("bytes=0-99", 1000), Ranges::Single(0, 99));
        assert_eq!(parse("bytes=900-", 1000), Ranges::Single(900, 999));
        assert_eq!(parse("bytes=-100", 1000), Ranges::Single(900, 999));
        assert_eq!(parse("bytes=-5000", 1000), Ranges::Single(0, 999));
        assert_eq!(parse("bytes=990-2000", 1000), Ranges::Single(990, 999));
        assert_eq!(parse("Bytes = 1-1", 1000), Ranges::Single(1, 1));
        assert_eq!(parse("bytes=1000-", 1000), Ranges::Unsatisfiable);
        assert_eq!(parse("bytes=-0", 1000), Ranges::Unsatisfiable);
        assert_eq!(parse("bytes=0-", 0), Ranges::Unsatisfiable);
        assert_eq!(parse("bytes=0-1,5-6", 1000), Ranges::Multiple);
        for bad in [
            "",
            "bytes",
            "bytes=",
            "items=0-1",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=1",
            "bytes=--1",
            "bytes=0-1,x",
        ] {
            assert_eq!(parse(bad, 1000), Ranges::Ignore, "{bad:?}");
        }
    }

    proptest! {
        // A single range is always inside the file and non-empty.
        #[test]
        fn single_is_within_the_file(v in "(bytes|BYTES)=[0-9-]{0,12}", size in 0u64..10_000) {
            if let Ranges::Single(a, b) = parse(&v, size) {
                prop_assert!(a <= b && b < size);
            }
        }
    }
}
