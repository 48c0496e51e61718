//! UDP echo server on tokio's `current_thread` runtime, written the way a tokio user would:
//! one `UdpSocket`, `recv_from` into a buffer, `send_to` the datagram back, in a loop. The
//! buffer is 8192 bytes, the largest datagram braid's echo takes too (Twisted's default
//! `maxPacketSize`), so both truncate alike.
//!
//! `udp_echo_tokio --port N` (0 picks a free port); prints `listening on udp 127.0.0.1:PORT`.

use tokio::net::UdpSocket;

const MAX_PACKET_SIZE: usize = 8192;

fn main() -> std::io::Result<()> {
    let args = braid_bench::Args::parse(&[]);
    let port: u16 = args.num("port", 0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async move {
        let socket = UdpSocket::bind(("127.0.0.1", port)).await?;
        println!("listening on udp {}", socket.local_addr()?);
        let mut buf = vec![0u8; MAX_PACKET_SIZE];
        loop {
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(e) => {
                    // An ICMP error queued on the socket: report it and go on serving.
                    eprintln!("recv_from: {e}");
                    continue;
                }
            };
            if let Err(e) = socket.send_to(&buf[..n], peer).await {
                eprintln!("send_to {peer}: {e}");
            }
        }
    })
}
