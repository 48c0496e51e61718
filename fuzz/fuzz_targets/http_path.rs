//! Request-target resolution (`protocols::http::path`): any target, then
//! the file it opens in a fixed tree whose sibling holds a secret and
//! whose symlinks lead out. Properties: no panic; resolved segments are
//! plain names; re-encoding round-trips; whatever opens is inside the
//! root (checked by the kernel's name for the open descriptor).
#![no_main]

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use braid::protocols::http::path::{resolve, Root};
use libfuzzer_sys::fuzz_target;

fn tree() -> &'static PathBuf {
    static TREE: OnceLock<PathBuf> = OnceLock::new();
    TREE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("braid-fuzz-http-path-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(base.join("out")).unwrap();
        std::fs::write(base.join("out/secret"), "s").unwrap();
        std::fs::write(base.join("secret"), "s").unwrap();
        std::fs::write(root.join("a/f"), "f").unwrap();
        let _ = std::os::unix::fs::symlink(base.join("out"), root.join("a/out"));
        let _ = std::os::unix::fs::symlink("../../secret", root.join("a/up"));
        let _ = std::os::unix::fs::symlink("f", root.join("a/in"));
        root.canonicalize().unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let target = String::from_utf8_lossy(data);
    let Ok(p) = resolve(&target) else { return };
    for s in &p.segments {
        assert!(!s.is_empty() && s != "." && s != "..", "{s:?}");
        assert!(!s.contains('/') && !s.contains('\\') && !s.contains('\0'), "{s:?}");
    }
    assert_eq!(resolve(&p.to_url()).map(|q| q.segments), Ok(p.segments.clone()));
    let root_path = tree();
    thread_local! {
        static ROOT: Root = Root::open(tree(), false).unwrap();
    }
    ROOT.with(|root| {
        if let Ok(f) = root.open_file(&p.relative()) {
            let real = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
            assert!(real.starts_with(root_path), "{target:?} opened {real:?}, outside the root");
        }
    });
});
