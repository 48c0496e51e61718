//! TLS echo server on tokio-rustls and tokio's `current_thread` runtime, written the way a
//! tokio user would: an accept loop, one task per connection that runs the handshake, then
//! reads into a buffer and `write_all`s it back (and flushes, as tokio-rustls asks). Accepted
//! sockets get TCP_NODELAY (see below).
//!
//! `tls_echo_tokio --port N --tls-cert PEM --tls-key PEM` (0 picks a free port); prints
//! `listening on 127.0.0.1:PORT`. Same rustls, same `ring` provider, same configuration as
//! braid's `ServerConfig` (see `braid_bench::tls::server_config`).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

fn main() -> std::io::Result<()> {
    let args = braid_bench::Args::parse(&[]);
    let port: u16 = args.num("port", 0);
    let (Some(cert), Some(key)) = (args.get("tls-cert"), args.get("tls-key")) else {
        braid_bench::die("--tls-cert PEM and --tls-key PEM are required")
    };
    let config = braid_bench::tls::server_config(cert.as_ref(), key.as_ref())
        .unwrap_or_else(|e| braid_bench::die(&format!("--tls-cert/--tls-key: {e}")));
    braid_bench::raise_nofile_limit();
    let acceptor = TlsAcceptor::from(config);
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        println!("listening on {}", listener.local_addr()?);
        loop {
            let (socket, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            // Without it Nagle holds the first echo behind the unacknowledged session tickets
            // until the client's delayed ACK, which caps short connections far below the CPU's
            // pace; braid happens to send both in one write. A tokio user would set it.
            let _ = socket.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else { return };
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if tls.write_all(&buf[..n]).await.is_err() || tls.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}
