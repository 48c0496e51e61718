//! The HTML page listing a directory that has no index file.

use std::fmt::Write as _;
use std::fs::File;
use std::time::{Duration, UNIX_EPOCH};

use super::path::encode_segment;

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name, as bytes (file names need not be UTF-8).
    pub name: Vec<u8>,
    /// A directory (listed with a trailing `/`).
    pub dir: bool,
    /// Size in bytes (files only).
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

/// Most entries listed; beyond them the page says how many were left out.
pub const MAX_ENTRIES: usize = 10_000;

/// The entries of the open directory `dir` but hidden ones (names that
/// start with `.`), directories first, then files,
/// each sorted by name; with the count of entries left out beyond
/// [`MAX_ENTRIES`].
pub fn read(dir: &File) -> std::io::Result<(Vec<Entry>, usize)> {
    let mut entries = Vec::new();
    let mut skipped = 0;
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let name = e.file_name().to_bytes();
        // Hidden files (`.git`, `.env`) are not listed, as nginx's
        // autoindex does not; they are still served if asked for by name.
        if name.starts_with(b".") {
            continue;
        }
        if entries.len() >= MAX_ENTRIES {
            skipped += 1;
            continue;
        }
        // Symlinks are listed as what they point to; a broken one as itself.
        let stat = rustix::fs::statat(dir, e.file_name(), rustix::fs::AtFlags::empty())
            .or_else(|_| rustix::fs::statat(dir, e.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW));
        let Ok(st) = stat else { continue };
        let dir = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
        entries.push(Entry {
            name: name.to_vec(),
            dir,
            size: if dir { 0 } else { st.st_size as u64 },
            mtime: st.st_mtime.max(0) as u64,
        });
    }
    entries.sort_by(|a, b| b.dir.cmp(&a.dir).then_with(|| a.name.cmp(&b.name)));
    Ok((entries, skipped))
}

/// `s` with `& < > " '` escaped for HTML text and attributes.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn human(size: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = size as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{size} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `2026-12-02 17:50` (UTC), from the HTTP date's fields.
fn when(mtime: u64) -> String {
    // `Sun, 06 Nov 1994 08:49:37 GMT` → 1994-11-06 08:49.
    let d = super::date::format(UNIX_EPOCH + Duration::from_secs(mtime));
    let p: Vec<&str> = d.split(' ').collect();
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| *m == p[2])
        .map_or(0, |i| i + 1);
    format!("{}-{month:02}-{} {}", p[3], p[1], &p[4][..5])
}

/// The listing page of the directory at URL path `url_path` (decoded,
/// ending in `/`).
pub fn page(url_path: &str, entries: &[Entry], skipped: usize) -> String {
    let title = escape_html(url_path);
    let mut html = String::with_capacity(512 + entries.len() * 160);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Index of {title}</title>\n<style>\n\
         body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}\n\
         table {{ border-collapse: collapse; }}\n\
         th, td {{ padding: 0.2em 1.2em 0.2em 0; text-align: left; }}\n\
         td.size {{ text-align: right; font-variant-numeric: tabular-nums; }}\n\
         a {{ text-decoration: none; }} a:hover {{ text-decoration: underline; }}\n\
         </style>\n</head>\n<body>\n<h1>Index of {title}</h1>\n<table>\n\
         <thead><tr><th>Name</th><th>Size</th><th>Last modified</th></tr></thead>\n<tbody>\n"
    );
    if url_path != "/" {
        html.push_str("<tr><td><a href=\"../\">../</a></td><td class=\"size\">-</td><td></td></tr>\n");
    }
    for e in entries {
        let mut href = String::new();
        encode_segment(&e.name, &mut href);
        let mut shown = escape_html(&String::from_utf8_lossy(&e.name));
        let mut href = escape_html(&href);
        if e.dir {
            href.push('/');
            shown.push('/');
        }
        let size = if e.dir { "-".to_string() } else { human(e.size) };
        let title = if e.dir { String::new() } else { format!(" title=\"{} bytes\"", e.size) };
        let _ = writeln!(
            html,
            "<tr><td><a href=\"./{href}\">{shown}</a></td><td class=\"size\"{title}>{size}</td><td>{}</td></tr>",
            when(e.mtime)
        );
    }
    html.push_str("</tbody>\n</table>\n");
    if skipped > 0 {
        let _ = writeln!(html, "<p>{skipped} more entries not listed.</p>");
    }
    html.push_str("</body>\n</html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_names_and_links_them_encoded() {
        let entries = vec![
            Entry { name: b"sub".to_vec(), dir: true, size: 0, mtime: 0 },
            Entry { name: b"<b>&\"x\".txt".to_vec(), dir: false, size: 2048, mtime: 784_111_777 },
            Entry { name: b"a b#?.txt".to_vec(), dir: false, size: 5, mtime: 0 },
        ];
        let html = page("/d<ir>/", &entries, 0);
        assert!(html.contains("<title>Index of /d&lt;ir&gt;/</title>"));
        assert!(html.contains("<a href=\"./sub/\">sub/</a>"));
        assert!(
            html.contains("<a href=\"./%3Cb%3E&amp;%22x%22.txt\">&lt;b&gt;&amp;&quot;x&quot;.txt</a>"),
            "{html}"
        );
        assert!(html.contains("href=\"./a%20b%23%3F.txt\""));
        assert!(html.contains("2.0 KiB") && html.contains("1994-11-06 08:49"));
        assert!(html.contains("href=\"../\""));
        assert!(!page("/", &entries, 0).contains("href=\"../\""));
    }
}
