//! A TCP proxy on tokio's `current_thread` runtime, written the way a tokio
//! user would: an accept loop, one task per connection, `connect` to the
//! destination, then `tokio::io::copy_bidirectional`. The peer for braid's
//! `portforward` in `bench-all`.
//!
//! `proxy_tokio --port N --to HOST:PORT` (0 picks a free port); prints
//! `listening on 127.0.0.1:PORT`.

use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let args = braid_bench::Args::parse(&[]);
    let port: u16 = args.num("port", 0);
    let to = args.get("to").unwrap_or_else(|| braid_bench::die("--to HOST:PORT is required")).to_string();
    braid_bench::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        println!("listening on {}", listener.local_addr()?);
        loop {
            let (mut client, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            let to = to.clone();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(&to).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    })
}
