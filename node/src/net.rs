//! Small networking helpers shared by confroll's gRPC servers.

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};

/// The connections `listener` accepts, with `TCP_NODELAY` set. tonic sets it
/// only on sockets it accepts itself; without it, small answers wait ~40 ms
/// for a delayed ACK.
pub fn nodelay_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}
