//! The certificate directory behind the `tls:DIRECTORY` server endpoint:
//! one certificate per server name, chosen by the name the client asks for
//! (SNI), as Twisted's `tls:` server endpoint (after txsni) does.
//!
//! Each `NAME.pem` file holds the chain for NAME (leaf first) and its
//! private key. `*.DOMAIN.pem` is a wildcard: it serves any name one label
//! below DOMAIN (`a.DOMAIN`, not `a.b.DOMAIN`, as certificate wildcards
//! match). A name with non-ASCII letters is matched in its IDNA form, the
//! form clients send. A client that names no server, or a name no file
//! serves, gets the default: the first usable file by file name, not
//! counting wildcards (unless there are only wildcards).
//!
//! Files that cannot serve are skipped and said so: a private key without
//! a certificate, a key that does not match its certificate, a file that
//! cannot be read or holds no PEM are warnings naming the file; a
//! certificate without a key (a CA or chain file kept alongside) is
//! ignored, logged only at debug level. A directory without one usable
//! file is an error naming it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::hostname::Host;
use super::EndpointError;

/// The certificates of a directory, by server name.
#[derive(Debug)]
pub struct SniDirectory {
    inner: Arc<ByName>,
    warnings: Vec<String>,
}

/// What a handshake looks names up in (shared with rustls).
#[derive(Debug)]
struct ByName {
    /// The default file's name and its certificate.
    default: (String, Arc<CertifiedKey>),
    /// Exact names, lower-case ASCII.
    exact: HashMap<String, (String, Arc<CertifiedKey>)>,
    /// Wildcards, by the domain below the `*`.
    wildcard: HashMap<String, (String, Arc<CertifiedKey>)>,
}

impl ByName {
    fn lookup(&self, name: Option<&str>) -> &(String, Arc<CertifiedKey>) {
        let Some(name) = name else { return &self.default };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(found) = self.exact.get(&name) {
            return found;
        }
        name.split_once('.').and_then(|(_, domain)| self.wildcard.get(domain)).unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.lookup(hello.server_name()).1.clone())
    }
}

/// What one file gave.
enum Loaded {
    Usable(Arc<CertifiedKey>),
    /// Skipped, with a warning.
    Warning(String),
    /// Skipped quietly (debug level).
    Ignored(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_file(file: &Path) -> Loaded {
    let shown = file.display();
    let pem = match std::fs::read(file) {
        Ok(pem) => pem,
        Err(e) => return Loaded::Warning(format!("tls: '{shown}': {e}; skipped")),
    };
    let certs = match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
        Ok(certs) => certs,
        Err(e) => return Loaded::Warning(format!("tls: '{shown}': bad PEM ({e}); skipped")),
    };
    let key = match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(key) => Some(key),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => None,
        Err(e) => return Loaded::Warning(format!("tls: '{shown}': bad PEM ({e}); skipped")),
    };
    match (certs.is_empty(), key) {
        (false, Some(key)) => match CertifiedKey::from_der(certs, key, &provider()) {
            Ok(certified) => Loaded::Usable(Arc::new(certified)),
            Err(rustls::Error::InconsistentKeys(_)) => Loaded::Warning(format!(
                "tls: '{shown}': the private key does not match the certificate; skipped"
            )),
            Err(e) => Loaded::Warning(format!("tls: '{shown}': {e}; skipped")),
        },
        (true, Some(_)) => {
            Loaded::Warning(format!("tls: '{shown}': a private key without a certificate; skipped"))
        }
        (false, None) => {
            Loaded::Ignored(format!("tls: '{shown}': a certificate without a private key; ignored"))
        }
        (true, None) => Loaded::Warning(format!("tls: '{shown}': no certificate or key in it; skipped")),
    }
}

impl SniDirectory {
    /// Reads every `*.pem` file in `dir`. Warnings are logged (and kept,
    /// see [`warnings`](SniDirectory::warnings)); an unreadable directory,
    /// or one with no usable file, is an error naming it.
    pub fn load(dir: impl AsRef<Path>) -> Result<SniDirectory, EndpointError> {
        let dir = dir.as_ref();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| EndpointError(format!("tls: directory '{}': {e}", dir.display())))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pem") && !p.is_dir())
            .collect();
        files.sort();
        let mut warnings = Vec::new();
        let mut default = None;
        let mut first_wildcard = None;
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for file in &files {
            let stem = file.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let certified = match load_file(file) {
                Loaded::Usable(c) => c,
                Loaded::Warning(w) => {
                    tracing::warn!(target: "braid", "{w}");
                    warnings.push(w);
                    continue;
                }
                Loaded::Ignored(why) => {
                    tracing::debug!(target: "braid", "{why}");
                    continue;
                }
            };
            let entry = (stem.clone(), certified);
            let (table, name, first) = match stem.strip_prefix("*.") {
                Some(domain) => (&mut wildcard, domain, &mut first_wildcard),
                None => (&mut exact, stem.as_str(), &mut default),
            };
            if first.is_none() {
                *first = Some(entry.clone());
            }
            match Host::encode(name) {
                Host::Name(ascii) => {
                    table.insert(ascii.trim_end_matches('.').to_owned(), entry);
                }
                Host::Ip(ip) => {
                    table.insert(ip.to_string(), entry);
                }
                Host::Invalid(_) => {
                    let w = format!(
                        "tls: '{}': '{stem}' is not a host name; served only as the default",
                        file.display()
                    );
                    tracing::warn!(target: "braid", "{w}");
                    warnings.push(w);
                }
            }
        }
        let Some(default) = default.or(first_wildcard) else {
            return Err(EndpointError(format!(
                "tls: no usable certificate in '{}' (each NAME.pem must hold a certificate chain and its key)",
                dir.display()
            )));
        };
        Ok(SniDirectory { inner: Arc::new(ByName { default, exact, wildcard }), warnings })
    }

    /// What was skipped and why, one line per file, as logged.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The file (its name without `.pem`) that serves a client asking for
    /// `name` (`None`: a client that sends no name).
    pub fn chosen_for(&self, name: Option<&str>) -> &str {
        &self.inner.lookup(name).0
    }

    /// A server configuration that chooses from these certificates.
    pub fn server_config(&self) -> Result<crate::tls::ServerConfig, EndpointError> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| EndpointError(format!("tls: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(self.inner.clone());
        Ok(crate::tls::ServerConfig::from_rustls(Arc::new(config)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key pair and a self-signed certificate for `names`, as PEM.
    fn leaf(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let certified = rcgen::generate_simple_self_signed(names).unwrap();
        (certified.cert.pem(), certified.signing_key.serialize_pem())
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("braid-sni-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    // §4.13 item 23: the default for no name or an unknown one; a wildcard
    // for one label below its domain; IDNA names matched in ASCII.
    #[test]
    fn names_choose_files_and_the_rest_get_the_default() {
        let d = dir("names");
        for name in ["a.test", "*.wild.test", "bücher.test"] {
            // The certificate carries the ASCII form, as real ones do.
            let (c, k) = leaf(&[&name.replace("bücher", "xn--bcher-kva")]);
            std::fs::write(d.join(format!("{name}.pem")), format!("{c}{k}")).unwrap();
        }
        let sni = SniDirectory::load(&d).unwrap();
        assert!(sni.warnings().is_empty(), "{:?}", sni.warnings());
        // '*' sorts first, but a wildcard is not the default.
        assert_eq!(sni.chosen_for(None), "a.test");
        assert_eq!(sni.chosen_for(Some("a.test")), "a.test");
        assert_eq!(sni.chosen_for(Some("A.Test.")), "a.test");
        assert_eq!(sni.chosen_for(Some("x.wild.test")), "*.wild.test");
        assert_eq!(sni.chosen_for(Some("xn--bcher-kva.test")), "bücher.test");
        assert_eq!(sni.chosen_for(Some("nobody.test")), "a.test", "the default");
        assert_eq!(sni.chosen_for(Some("wild.test")), "a.test", "a wildcard needs a label");
        assert_eq!(sni.chosen_for(Some("x.y.wild.test")), "a.test", "a wildcard is one label");
        std::fs::remove_file(d.join("a.test.pem")).unwrap();
        std::fs::remove_file(d.join("bücher.test.pem")).unwrap();
        let sni = SniDirectory::load(&d).unwrap();
        assert_eq!(sni.chosen_for(None), "*.wild.test", "only a wildcard: it is the default");
        let _ = std::fs::remove_dir_all(&d);
    }
}
