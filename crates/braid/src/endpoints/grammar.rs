//! The endpoint description grammar (Twisted's `_tokenize`/`_parse`):
//! `kind:arg:arg:key=value:...`.
//!
//! - `:` separates fields; the first field is the kind.
//! - `\` makes the next character literal, so `\:` is a colon inside a
//!   field and `\\` a backslash; [`quote`] adds these escapes.
//! - The first unescaped `=` in a field splits a key from its value; later
//!   ones belong to the value (`a=b=c` is key `a`, value `b=c`).
//! - Fields without a key are positional arguments, in order.
//!
//! A description ending in a lone `\` is an error, not a silent guess.

use std::fmt;

/// A parsed description: its kind, positional arguments and `key=value`
/// arguments (in the order given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    /// The kind, as written (look it up case-insensitively).
    pub kind: String,
    /// The positional fields.
    pub args: Vec<String>,
    /// The `key=value` fields.
    pub kwargs: Vec<(String, String)>,
}

/// A description that does not parse, or names what cannot be built. The
/// message names the field at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointError(pub String);

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EndpointError {}

/// Parses `desc` into its kind and arguments.
pub fn parse(desc: &str) -> Result<Description, EndpointError> {
    // Each field: the text before its first unescaped `=` (if any) and the rest.
    let mut fields: Vec<(String, Option<String>)> = Vec::new();
    let mut current = String::new();
    let mut value: Option<String> = None;
    let mut chars = desc.chars();
    while let Some(c) = chars.next() {
        let literal = match c {
            '\\' => match chars.next() {
                Some(next) => next,
                None => return Err(EndpointError(format!("{desc:?} ends with a lone backslash"))),
            },
            ':' => {
                fields.push((std::mem::take(&mut current), value.take()));
                continue;
            }
            '=' if value.is_none() => {
                value = Some(String::new());
                continue;
            }
            other => other,
        };
        match value.as_mut() {
            Some(v) => v.push(literal),
            None => current.push(literal),
        }
    }
    fields.push((current, value));
    let mut fields = fields.into_iter();
    let (kind, kind_value) = fields.next().unwrap_or_default();
    if kind.is_empty() || kind_value.is_some() {
        return Err(EndpointError(format!(
            "{desc:?} does not start with an endpoint type (such as tcp:8080)"
        )));
    }
    let mut parsed = Description { kind, args: Vec::new(), kwargs: Vec::new() };
    for (key, value) in fields {
        match value {
            Some(v) => parsed.kwargs.push((key, v)),
            None => parsed.args.push(key),
        }
    }
    Ok(parsed)
}

/// Escapes `arg` so that it parses back as one field, unchanged
/// (Twisted's `quoteStringArgument`).
pub fn quote(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    for c in arg.chars() {
        if matches!(c, '\\' | ':' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Description {
    /// The value of `key` (the last one given wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.kwargs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Positional argument `index`, or else the keyword `key` (Twisted
    /// lets most fields be given either way).
    pub fn arg_or(&self, index: usize, key: &str) -> Option<&str> {
        self.get(key).or_else(|| self.args.get(index).map(String::as_str))
    }

    /// Refuses keywords this kind does not know, naming the first.
    pub fn only(&self, known: &[&str]) -> Result<(), EndpointError> {
        match self.kwargs.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(EndpointError(format!(
                "{}: unknown argument '{k}' (known: {})",
                self.kind,
                known.join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// Refuses more positional arguments than `max`.
    pub fn at_most(&self, max: usize) -> Result<(), EndpointError> {
        match self.args.get(max) {
            Some(extra) => Err(EndpointError(format!("{}: unexpected argument '{extra}'", self.kind))),
            None => Ok(()),
        }
    }

    /// A number field: `what` names it in the error.
    pub fn number<T: std::str::FromStr>(&self, text: &str, what: &str) -> Result<T, EndpointError> {
        text.parse().map_err(|_| EndpointError(format!("{}: {what} '{text}' is not a number", self.kind)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kw(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn fields_keywords_and_positionals() {
        let d = parse("tcp:8080:interface=127.0.0.1:backlog=10").unwrap();
        assert_eq!(d.kind, "tcp");
        assert_eq!(d.args, vec!["8080"]);
        assert_eq!(d.kwargs, kw(&[("interface", "127.0.0.1"), ("backlog", "10")]));
        assert_eq!(d.arg_or(0, "port"), Some("8080"));
        assert_eq!(d.get("backlog"), Some("10"));
        // The colons of an IPv6 address must be escaped; unescaped, they
        // split the field.
        let d = parse("tcp:8080:interface=::1").unwrap();
        assert_eq!(d.args, vec!["8080", "", "1"]);
        assert_eq!(d.kwargs, kw(&[("interface", "")]));
        let d = parse(r"tcp:8080:interface=\:\:1").unwrap();
        assert_eq!(d.kwargs, kw(&[("interface", "::1")]));
    }

    // §4.13 item 25: escapes, quoting, `=` inside a value.
    #[test]
    fn escapes_and_implied_escapes() {
        let d = parse(r"unix:/var/run/x\:y\\z:mode=660").unwrap();
        assert_eq!(d.args, vec![r"/var/run/x:y\z"]);
        let d = parse("x:a=b=c").unwrap();
        assert_eq!(d.kwargs, kw(&[("a", "b=c")]));
        let d = parse(r"x:a\=b=c").unwrap();
        assert_eq!(d.kwargs, kw(&[("a=b", "c")]));
        assert_eq!(quote(r"a:b\c=d"), r"a\:b\\c\=d");
        assert!(parse("tcp:80\\").is_err());
        assert!(parse("").is_err());
        assert!(parse("=x").is_err());
        let d = parse("tcp").unwrap();
        assert!(d.args.is_empty() && d.kwargs.is_empty());
        let d = parse("tcp::").unwrap();
        assert_eq!(d.args, vec!["", ""]);
    }

    proptest! {
        // Quoting then parsing gives back the same arguments, whatever they hold.
        #[test]
        fn quoting_round_trips(
            args in proptest::collection::vec(".*", 0..5),
            kwargs in proptest::collection::vec(("[^=]+", ".*"), 0..5),
        ) {
            let mut desc = String::from("kind");
            for a in &args {
                desc.push(':');
                desc.push_str(&quote(a));
            }
            for (k, v) in &kwargs {
                desc.push(':');
                desc.push_str(&quote(k));
                desc.push('=');
                desc.push_str(&quote(v));
            }
            let d = parse(&desc).unwrap();
            prop_assert_eq!(d.kind, "kind");
            // A quoted positional that is empty is still a field.
            prop_assert_eq!(d.args, args);
            prop_assert_eq!(d.kwargs, kwargs);
        }

        // Any text parses or is refused: never a panic.
        #[test]
        fn any_text_is_handled(desc in ".*") {
            let _ = parse(&desc);
        }
    }
}
