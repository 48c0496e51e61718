//! The static-file resource: files under one directory, with index files,
//! listings, validators, conditional and range requests.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use super::date;
use super::listing;
use super::path::{OpenError, Root};
use super::range::{self, Ranges};
use super::resource::{Request, Resource};
use super::response::{Body, Response};

/// Serves the files under a directory (Twisted's `static.File`).
pub struct StaticFiles {
    root: Root,
    index: Option<String>,
    listing: bool,
}

impl StaticFiles {
    /// Serves `dir`; symlinks may lead outside it only if
    /// `follow_symlinks`. Index file `index.html`, listings on.
    pub fn new(dir: &Path, follow_symlinks: bool) -> std::io::Result<Self> {
        Ok(StaticFiles {
            root: Root::open(dir, follow_symlinks)?,
            index: Some("index.html".into()),
            listing: true,
        })
    }

    /// The file served for a directory (`None`: never one).
    pub fn index(mut self, name: Option<&str>) -> Self {
        self.index = name.filter(|n| !n.is_empty()).map(String::from);
        self
    }

    /// Whether a directory without an index file is listed (else 403).
    pub fn listing(mut self, on: bool) -> Self {
        self.listing = on;
        self
    }

    fn open_error(&self, e: OpenError) -> Response {
        match e {
            OpenError::NotFound => Response::error(404),
            OpenError::Forbidden => Response::error(403),
            OpenError::Other(errno) => {
                tracing::warn!(target: "braid", "http: opening a file under {}: {errno}", self.root.path().display());
                Response::error(500)
            }
        }
    }
}

/// The `Content-Type` for a file name: from its extension, else plain text.
pub fn content_type(name: &str) -> String {
    match mime_guess::from_path(name).first_raw() {
        Some(m) => m.to_string(),
        None => "text/plain; charset=utf-8".to_string(),
    }
}

/// True if an `If-None-Match` list matches `etag` (weak comparison).
fn none_match(header: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    header.split(',').any(|t| t.trim() == "*" || bare(t) == bare(etag))
}

fn serve_file(request: &Request<'_>, file: File, meta: &std::fs::Metadata, name: &str) -> Response {
    let size = meta.len();
    let mtime = meta.modified().map_or(0, date::unix_seconds);
    let etag = format!("\"{mtime:x}-{size:x}\"");
    let last_modified = date::format(UNIX_EPOCH + Duration::from_secs(mtime));
    let validators =
        |r: Response| r.header("Last-Modified", last_modified.clone()).header("ETag", etag.clone());
    // RFC 9110 §13.2.2: If-None-Match first; If-Modified-Since only without it.
    let not_modified = match request.header("If-None-Match") {
        Some(inm) => none_match(inm, &etag),
        None => request
            .header("If-Modified-Since")
            .and_then(date::parse)
            .is_some_and(|since| mtime <= date::unix_seconds(since)),
    };
    if not_modified {
        return validators(Response::new(304));
    }
    let kind = content_type(name);
    let mut ranges = match request.header("Range") {
        Some(r) if request.method() == "GET" => range::parse(r, size),
        _ => Ranges::Ignore,
    };
    if let Some(if_range) = request.header("If-Range") {
        // Only a strong validator that still matches keeps the range.
        let still = if if_range.trim().starts_with('"') {
            if_range.trim() == etag
        } else {
            if_range.trim() == last_modified
        };
        if !still {
            ranges = Ranges::Ignore;
        }
    }
    match ranges {
        Ranges::Unsatisfiable => {
            validators(Response::error(416).header("Content-Range", format!("bytes */{size}")))
        }
        Ranges::Single(first, last) => validators(
            Response::new(206)
                .header("Content-Type", kind)
                .header("Content-Range", format!("bytes {first}-{last}/{size}"))
                .body(Body::File { file, offset: first, len: last - first + 1 }),
        ),
        Ranges::Ignore | Ranges::Multiple => validators(
            Response::new(200)
                .header("Content-Type", kind)
                .header("Accept-Ranges", "bytes")
                .body(Body::File { file, offset: 0, len: size }),
        ),
    }
}

impl Resource for StaticFiles {
    fn render(&self, request: &Request<'_>) -> Response {
        let rel: std::path::PathBuf = request.segments().iter().collect();
        let file = match self.root.open_file(&rel) {
            Ok(f) => f,
            Err(e) => return self.open_error(e),
        };
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(target: "braid", "http: reading a file's metadata: {e}");
                return Response::error(500);
            }
        };
        let kind = meta.file_type();
        let name = request.segments().last().map_or("", String::as_str);
        if kind.is_file() {
            // `/file.txt/` names a directory that is not there.
            if request.path.trailing_slash {
                return Response::error(404);
            }
            return serve_file(request, file, &meta, name);
        }
        if !kind.is_dir() {
            // FIFOs, sockets, devices: never served.
            return Response::error(403);
        }
        if !request.path.trailing_slash {
            let mut to = request.path.to_url();
            to.push('/');
            if let Some(q) = request.query() {
                to.push('?');
                to.push_str(q);
            }
            return Response::error(301).header("Location", to);
        }
        if let Some(index) = &self.index {
            match self.root.open_file(&rel.join(index)) {
                Ok(f) => {
                    if let Some(m) = f.metadata().ok().filter(|m| m.is_file()) {
                        return serve_file(request, f, &m, index);
                    }
                }
                Err(OpenError::NotFound) => {}
                Err(e) => return self.open_error(e),
            }
        }
        if !self.listing {
            return Response::error(403);
        }
        match listing::read(&file) {
            Ok((entries, skipped)) => {
                let url = request.path.segments.iter().fold(String::from("/"), |mut s, seg| {
                    s.push_str(seg);
                    s.push('/');
                    s
                });
                Response::html(200, listing::page(&url, &entries, skipped))
            }
            Err(e) => {
                tracing::warn!(target: "braid", "http: listing a directory: {e}");
                Response::error(500)
            }
        }
    }
}
