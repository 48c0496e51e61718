//! The access log, one line per response in the combined log format
//! (Apache's and nginx's default).

use std::cell::RefCell;
use std::io::Write;
use std::time::SystemTime;

/// Where access log lines go.
pub struct AccessLog {
    out: RefCell<Box<dyn Write>>,
}

/// Quotes what a client sent for the log: `"` and `\` escaped, bytes
/// outside printable ASCII as `\xHH`, so a line is always one line.
fn escape(out: &mut String, s: &[u8]) {
    for &b in s {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02X}")),
        }
    }
}

/// One response, as logged.
pub struct Entry<'a> {
    /// The client's address (without port).
    pub client: &'a str,
    /// The request line, or `None` if none was read.
    pub request_line: Option<&'a [u8]>,
    /// The status sent.
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    /// The `Referer` header.
    pub referer: Option<&'a [u8]>,
    /// The `User-Agent` header.
    pub user_agent: Option<&'a [u8]>,
}

impl AccessLog {
    /// Logs to `out` (stderr, a file).
    pub fn new(out: Box<dyn Write>) -> Self {
        AccessLog { out: RefCell::new(out) }
    }

    /// The line for `e`, without its newline.
    pub fn line(e: &Entry<'_>, at: SystemTime) -> String {
        let mut s = String::with_capacity(160);
        s.push_str(e.client);
        s.push_str(" - - [");
        s.push_str(&super::date::format_log(at));
        s.push_str("] \"");
        match e.request_line {
            Some(r) => escape(&mut s, r),
            None => s.push('-'),
        }
        s.push_str(&format!("\" {} {} \"", e.status, e.bytes));
        escape(&mut s, e.referer.unwrap_or(b"-"));
        s.push_str("\" \"");
        escape(&mut s, e.user_agent.unwrap_or(b"-"));
        s.push('"');
        s
    }

    /// Writes one line; a failing log is reported once per failure and
    /// never stops serving.
    pub fn log(&self, e: &Entry<'_>) {
        let mut line = Self::line(e, SystemTime::now());
        line.push('\n');
        let mut out = self.out.borrow_mut();
        if let Err(err) = out.write_all(line.as_bytes()).and_then(|_| out.flush()) {
            tracing::warn!(target: "braid", "http: writing the access log: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn combined_format_with_escapes() {
        let e = Entry {
            client: "127.0.0.1",
            request_line: Some(b"GET /a\"b\n HTTP/1.1"),
            status: 200,
            bytes: 42,
            referer: None,
            user_agent: Some(b"curl/8"),
        };
        let at = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            AccessLog::line(&e, at),
            "127.0.0.1 - - [06/Nov/1994:08:49:37 +0000] \"GET /a\\\"b\\x0A HTTP/1.1\" 200 42 \"-\" \"curl/8\""
        );
    }
}
