//! From a request target to a file under the served directory, without
//! ever leaving it.
//!
//! Two steps. [`resolve`] turns the target (`/a/b%20c/?q`) into decoded,
//! checked segments: raw `.` and `..` segments are resolved (one that
//! would climb above the root is refused), and any segment whose decoding
//! is `.` or `..`, holds `/`, `\`, NUL or another control character, or
//! is not UTF-8 (overlong forms included) is refused, so no decoded name
//! can mean anything but one file name. Then [`open_beneath`] opens that
//! relative path from the root's descriptor with `openat2(RESOLVE_BENEATH)`,
//! so the kernel itself refuses a symlink (or `..` in one) that leads
//! outside, unless symlinks are followed on purpose.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// A request target, checked and decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    /// The decoded segments, without empty ones, `.` or `..`.
    pub segments: Vec<String>,
    /// The target's path ended with `/` (a directory was asked for).
    pub trailing_slash: bool,
    /// What followed `?`, undecoded.
    pub query: Option<String>,
}

impl RequestPath {
    /// The segments joined as a relative file system path (`a/b`); empty
    /// for the root.
    pub fn relative(&self) -> PathBuf {
        self.segments.iter().collect()
    }

    /// The path as a URL path again (`/a/b%20c/`), each segment encoded.
    pub fn to_url(&self) -> String {
        let mut out = String::from("/");
        for (i, s) in self.segments.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            encode_segment(s.as_bytes(), &mut out);
        }
        if self.trailing_slash && !self.segments.is_empty() {
            out.push('/');
        }
        out
    }
}

/// Why a target was refused; each maps to a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an origin-form (`/...`) or absolute-form (`http://host/...`)
    /// target, a bad `%` escape, a forbidden byte or a segment that is not
    /// one file name: 400.
    BadRequest,
    /// `..` that climbs above the root: 400.
    AboveRoot,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode_segment(raw: &[u8]) -> Result<String, PathError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let (hi, lo) = match (raw.get(i + 1).and_then(|&b| hex(b)), raw.get(i + 2).and_then(|&b| hex(b)))
            {
                (Some(hi), Some(lo)) => (hi, lo),
                _ => return Err(PathError::BadRequest),
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    if out.iter().any(|&b| b < 0x20 || b == 0x7f || b == b'/' || b == b'\\') {
        return Err(PathError::BadRequest);
    }
    // `from_utf8` refuses overlong forms (`%c0%ae` for `.`), surrogates and
    // truncated sequences.
    let s = String::from_utf8(out).map_err(|_| PathError::BadRequest)?;
    if s == "." || s == ".." {
        return Err(PathError::BadRequest);
    }
    Ok(s)
}

/// Checks and decodes a request target (see the module's text).
pub fn resolve(target: &str) -> Result<RequestPath, PathError> {
    let mut rest = target;
    for scheme in ["http://", "https://"] {
        if rest.as_bytes().get(..scheme.len()).is_some_and(|p| p.eq_ignore_ascii_case(scheme.as_bytes())) {
            let after = &rest[scheme.len()..];
            rest = after.find('/').map_or("/", |i| &after[i..]);
            if after.find('/').is_none() {
                // `http://host?q`: the query of the root.
                if let Some(q) = after.find('?') {
                    rest = &after[q..];
                }
            }
            break;
        }
    }
    let (path, query) = match rest.find('?') {
        Some(i) => (&rest[..i], Some(rest[i + 1..].to_string())),
        None => (rest, None),
    };
    let path = if path.is_empty() && rest.starts_with('?') { "/" } else { path };
    if !path.starts_with('/') || path.contains('#') {
        return Err(PathError::BadRequest);
    }
    let mut segments: Vec<String> = Vec::new();
    let mut trailing_slash = true;
    for raw in path[1..].split('/') {
        trailing_slash = false;
        match raw {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = true;
            }
            _ => segments.push(decode_segment(raw.as_bytes())?),
        }
    }
    Ok(RequestPath { segments, trailing_slash, query })
}

/// Appends `bytes` percent-encoded for a path segment: everything but
/// RFC 3986's unreserved characters and a few safe sub-delimiters.
pub fn encode_segment(bytes: &[u8], out: &mut String) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Why a file could not be opened beneath the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Nothing there (or a file where a directory was needed): 404.
    NotFound,
    /// It leads outside the root (a symlink), or may not be read: 403.
    Forbidden,
    /// Something else went wrong (logged): 500.
    Other(Errno),
}

/// The served directory, held open so every lookup starts from it.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    path: PathBuf,
    follow_symlinks: bool,
    /// `openat2` works here (false on kernels before 5.6 or behind a
    /// filter that refuses it: then the canonical path is checked).
    beneath: std::cell::Cell<bool>,
}

impl Root {
    /// Opens `path` as the root; `follow_symlinks` lets symlinks lead
    /// outside it.
    pub fn open(path: &Path, follow_symlinks: bool) -> std::io::Result<Root> {
        let path = path.canonicalize()?;
        let dir =
            rustix::fs::open(&path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Root { dir, path, follow_symlinks, beneath: std::cell::Cell::new(true) })
    }

    /// The root's canonical path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `relative` (from [`RequestPath::relative`]) for reading,
    /// never blocking (a FIFO opens at once; the caller refuses what is not
    /// a regular file or a directory).
    pub fn open_file(&self, relative: &Path) -> Result<File, OpenError> {
        let rel: &Path = if relative.as_os_str().is_empty() { Path::new(".") } else { relative };
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
        let opened = if self.follow_symlinks {
            rustix::fs::openat(self.dir.as_fd(), rel, flags, Mode::empty())
        } else if self.beneath.get() {
            let r = rustix::fs::openat2(
                self.dir.as_fd(),
                rel,
                flags,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
            );
            match r {
                Err(Errno::NOSYS) | Err(Errno::PERM) => {
                    self.beneath.set(false);
                    return self.open_file(relative);
                }
                other => other,
            }
        } else {
            // Without openat2: the canonical path must stay under the root.
            let full = self.path.join(rel);
            match full.canonicalize() {
                Ok(real) if real.starts_with(&self.path) => {
                    rustix::fs::open(&real, flags | OFlags::NOFOLLOW, Mode::empty())
                }
                Ok(_) => Err(Errno::XDEV),
                Err(e) => Err(Errno::from_io_error(&e).unwrap_or(Errno::NOENT)),
            }
        };
        match opened {
            Ok(fd) => Ok(File::from(fd)),
            Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::NAMETOOLONG) => Err(OpenError::NotFound),
            Err(Errno::XDEV) | Err(Errno::LOOP) | Err(Errno::ACCESS) | Err(Errno::PERM) => {
                Err(OpenError::Forbidden)
            }
            Err(e) => Err(OpenError::Other(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tree whose links lead out of the root (to a sibling, and by `..`).
    fn tree() -> &'static Path {
        static TREE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        TREE.get_or_init(|| {
            let base = std::env::temp_dir().join(format!("braid-http-path-{}", std::process::id()));
            let root = base.join("root");
            std::fs::create_dir_all(root.join("a/b")).unwrap();
            std::fs::create_dir_all(base.join("out")).unwrap();
            std::fs::write(base.join("out/secret"), "s").unwrap();
            std::fs::write(base.join("secret"), "s").unwrap();
            std::fs::write(root.join("a/f"), "f").unwrap();
            let _ = std::os::unix::fs::symlink(base.join("out"), root.join("a/out"));
            let _ = std::os::unix::fs::symlink("../../secret", root.join("a/up"));
            let _ = std::os::unix::fs::symlink("../../out", root.join("a/upd"));
            let _ = std::os::unix::fs::symlink("f", root.join("a/in"));
            root.canonicalize().unwrap()
        })
    }

    #[test]
    fn symlinks_inside_open_and_those_out_are_forbidden() {
        let r = Root::open(tree(), false).unwrap();
        assert!(r.open_file(Path::new("a/in")).is_ok());
        for out in ["a/out/secret", "a/up", "a/upd/secret", "a/out"] {
            assert_eq!(r.open_file(Path::new(out)).err(), Some(OpenError::Forbidden), "{out}");
        }
        assert_eq!(r.open_file(Path::new("a/nothing")).err(), Some(OpenError::NotFound));
        let open = Root::open(tree(), true).unwrap();
        assert!(open.open_file(Path::new("a/up")).is_ok(), "followed on purpose");
        // Without openat2 the canonical path is checked instead.
        r.beneath.set(false);
        assert!(r.open_file(Path::new("a/in")).is_ok());
        for out in ["a/out/secret", "a/up", "a/upd/secret"] {
            assert_eq!(
                r.open_file(Path::new(out)).err(),
                Some(OpenError::Forbidden),
                "{out} without openat2"
            );
        }
    }

    fn segs(t: &str) -> Result<Vec<String>, PathError> {
        resolve(t).map(|p| p.segments)
    }

    #[test]
    fn decodes_and_normalizes() {
        assert_eq!(segs("/"), Ok(vec![]));
        assert_eq!(segs("/a/b%20c"), Ok(vec!["a".into(), "b c".into()]));
        assert_eq!(segs("//a///b/"), Ok(vec!["a".into(), "b".into()]));
        assert_eq!(segs("/a/./b/../c"), Ok(vec!["a".into(), "c".into()]));
        assert_eq!(segs("/%C3%A9t%C3%A9"), Ok(vec!["été".into()]));
        assert_eq!(segs("http://example.org/x?y"), Ok(vec!["x".into()]));
        assert_eq!(segs("HTTP://example.org"), Ok(vec![]));
        let p = resolve("/d/?q=1").unwrap();
        assert!(p.trailing_slash);
        assert_eq!(p.query.as_deref(), Some("q=1"));
        assert!(!resolve("/d").unwrap().trailing_slash);
        assert!(resolve("/d/..").unwrap().trailing_slash);
    }

    #[test]
    fn refuses_every_traversal_and_bad_byte() {
        for t in [
            "/..",
            "/../etc/passwd",
            "/a/../../b",
            "/%2e%2e/etc",
            "/%2E%2E",
            "/a/%2e%2e/%2e%2e/b",
            "/.%2e/x",
            "/%2e",
            "/a%2fb",
            "/a%2F..%2Fb",
            "/a\\b",
            "/%5c..%5cb",
            "/a%00b",
            "/%c0%ae%c0%ae/x",
            "/%c0%af",
            "/%e0%80%ae",
            "/%ff",
            "/a%",
            "/a%4",
            "/a%zz",
            "*",
            "a/b",
            "",
            "/a#b",
            "/%0a",
            "/%7f",
        ] {
            assert!(resolve(t).is_err(), "{t:?} was accepted as {:?}", resolve(t));
        }
    }

    #[test]
    fn to_url_round_trips() {
        let p = resolve("/a%20b/%C3%A9/").unwrap();
        assert_eq!(p.to_url(), "/a%20b/%C3%A9/");
        assert_eq!(resolve(&p.to_url()).unwrap(), p);
    }

    proptest! {
        // No target decodes to a segment that could step out of, or across,
        // directories, and re-encoding gives back the same path.
        #[test]
        fn resolved_segments_are_plain_names(t in "(/|[a-z.%/\\\\]|%2[eEfF]|%5[cC]|%00|%[0-9a-fA-F]{2}){0,24}") {
            if let Ok(p) = resolve(&t) {
                for s in &p.segments {
                    prop_assert!(!s.is_empty() && s != "." && s != "..");
                    prop_assert!(!s.contains('/') && !s.contains('\\') && !s.contains('\0'));
                }
                prop_assert_eq!(resolve(&p.to_url()).map(|q| q.segments), Ok(p.segments.clone()));
            }
        }

        // Whatever a target resolves to opens inside the root or not at
        // all, with symlinks out of it and `..` in them (the kernel's name
        // for the open descriptor says where it is).
        #[test]
        fn nothing_opens_outside_the_root(
            parts in proptest::collection::vec(prop_oneof![
                Just("a"), Just("f"), Just("out"), Just("up"), Just("in"), Just("secret"), Just(".."),
                Just("%2e%2e"), Just("."), Just(""), Just("b"), Just("upd"),
            ], 0..6),
        ) {
            let root = tree();
            let target = format!("/{}", parts.join("/"));
            if let Ok(p) = resolve(&target) {
                let r = Root::open(root, false).unwrap();
                if let Ok(f) = r.open_file(&p.relative()) {
                    use std::os::fd::AsRawFd;
                    let real = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
                    prop_assert!(real.starts_with(root), "{target} opened {real:?}");
                }
            }
        }

        #[test]
        fn resolve_never_panics(t in "\\PC{0,64}") {
            let _ = resolve(&t);
        }
    }
}
