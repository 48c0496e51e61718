//! `Roots::system()`: the system's trusted authorities, as the platform
//! (or `SSL_CERT_FILE`) names them. Its own test binary, because it sets
//! that process-wide variable to a bundle the test made, so the result
//! does not depend on what the machine has installed.

mod tls_support;

use braid::testing::StringTransport;
use braid::tls::{Roots, TlsProtocol};
use braid::Protocol;
use tls_support::Ca;

#[test]
fn system_roots_come_from_ssl_cert_file_and_are_trusted() {
    let ca = Ca::new();
    let files = tls_support::Files::new(&ca, &["localhost"]);
    std::env::set_var("SSL_CERT_FILE", &files.ca);
    std::env::remove_var("SSL_CERT_DIR");
    let roots = Roots::system().expect("the bundle in SSL_CERT_FILE");
    assert_eq!(roots.len(), 1);
    // A client with those roots accepts a server the CA signed.
    let client_config = braid::tls::ClientConfig::new(roots).unwrap();
    struct Quiet;
    impl Protocol for Quiet {
        fn data_received(&mut self, _: &[u8]) {}
    }
    let mut client = TlsProtocol::client(Box::new(Quiet), &client_config, "localhost", None).unwrap();
    let mut server = TlsProtocol::server(Box::new(Quiet), &ca.server(), None);
    let (ct, st) = (StringTransport::new(), StringTransport::new());
    st.connect(&mut server);
    ct.connect(&mut client);
    for _ in 0..10 {
        let c = ct.take();
        st.feed(&mut server, &c);
        let s = st.take();
        ct.feed(&mut client, &s);
    }
    assert!(client.transport().tls().unwrap().handshake_complete());
    assert!(!ct.disconnecting(), "the certificate was trusted");
}

#[test]
fn no_roots_at_all_is_a_clear_error() {
    let e = braid::tls::ClientConfig::new(Roots::empty()).unwrap_err().to_string();
    assert!(e.contains("no certificate authority"), "{e}");
}
