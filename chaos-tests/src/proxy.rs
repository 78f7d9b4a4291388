//! A userspace TCP proxy that adds link delay and blackholes.
//!
//! # Why it exists
//!
//! The chaos harness runs every process in its own network namespace on a
//! bridge. The kernel it runs on has no `netem` qdisc, so link *delay* cannot be
//! done with `tc`. Packet loss, partitions and hard blackholes are done with
//! nft rules; delay (and a gentle, stall-only blackhole) is done here, in the
//! test process itself.
//!
//! # How it is placed
//!
//! A [`FaultProxy`] listens on an address in the hub namespace (the tokio
//! runtime it is started on runs on a thread that has entered that namespace)
//! and forwards every connection it accepts to one real `target`. The harness
//! installs an nft DNAT rule on the source host that rewrites the destination
//! of that host's traffic for `target` to the proxy's [`FaultProxy::local_addr`],
//! so the client believes it talks to `target` directly. One proxy models one
//! directed link (one source host's view of one destination).
//!
//! # Semantics
//!
//! * **Bytes are forwarded unchanged**, in order, in both directions.
//! * **Delay** ([`FaultProxy::set_delay`]) is one-way and is added to each
//!   direction independently, *per chunk read*: a chunk read at time `t` is
//!   written at `t + delay` (the delay in force when it was read). Each
//!   direction has a queue and a writer that sleeps until the head's due time,
//!   so delay adds latency without limiting throughput (many chunks can be in
//!   flight at once, like on a long fat link). Order is always preserved: if
//!   the delay is lowered, later chunks wait behind earlier ones rather than
//!   overtaking them. A half-close (EOF) travels through the same queue, so it
//!   is delivered after the data before it, one delay later. A delay of zero
//!   is pass-through. The TCP handshake itself is not delayed (the client's
//!   handshake completes against the proxy's socket). At most
//!   [`MAX_QUEUED_BYTES`] are queued per direction; beyond that the proxy stops
//!   reading and the sender sees ordinary TCP backpressure.
//! * **Blackhole** ([`FaultProxy::set_blackhole`]) *stalls*, it never drops:
//!   while it is on, the proxy reads nothing from either side of any
//!   connection (kernel buffers fill, senders stall, nobody sees a reset) and
//!   writes nothing, so data already queued is held, not delivered. New
//!   connections are accepted (the handshake with the proxy's listener
//!   completes, as it would in the kernel's accept queue anyway) but the proxy
//!   does not connect to the target until the blackhole is lifted. When it is
//!   lifted everything resumes with no byte lost or duplicated, so a stream
//!   that crossed a blackhole is intact (from the endpoints' view the link was
//!   merely very slow; their own timeouts may of course fire). Dropping bytes
//!   instead would corrupt live streams in a way no real network does (TCP
//!   would retransmit); real loss is nft's job.
//! * **Errors** (connect refused, reset, …) end that one connection quietly
//!   (logged at `debug`): both its sockets are closed.
//! * **Shutdown**: dropping the [`FaultProxy`], or [`FaultProxy::stop`], closes
//!   the listener and every connection it made. `stop` waits until that is
//!   done; `Drop` only requests it (the tasks end on their runtime's next turn).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// The most bytes one read takes from a socket (one queued chunk at most).
const CHUNK_SIZE: usize = 64 * 1024;

/// The most bytes queued (read but not yet written) per direction of one
/// connection; when reached, the proxy stops reading from that side until the
/// writer catches up.
pub const MAX_QUEUED_BYTES: usize = 8 * 1024 * 1024;

/// The largest delay [`FaultProxy::set_delay`] accepts; longer delays are
/// clamped to it.
pub const MAX_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Counters of one [`FaultProxy`] since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProxyStats {
    /// Connections accepted from clients (whether or not the target was reached).
    pub connections_accepted: u64,
    /// Connections accepted whose tasks have not ended yet.
    pub connections_active: u64,
    /// Bytes written to the target (client → target), all connections.
    pub bytes_to_target: u64,
    /// Bytes written back to clients (target → client), all connections.
    pub bytes_to_client: u64,
}

/// A running fault proxy: listens on one address and forwards every
/// connection to one target, with an adjustable delay and blackhole.
///
/// See the [module documentation](self) for the exact semantics. Dropping it
/// closes the listener and all of its connections.
#[derive(Debug)]
pub struct FaultProxy {
    local_addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    cancel: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// State shared by the handle, the accept loop and every connection task.
#[derive(Debug)]
struct Shared {
    /// Current one-way delay, in nanoseconds.
    delay_nanos: AtomicU64,
    /// `true` while blackholed.
    blackhole: watch::Sender<bool>,
    connections_accepted: AtomicU64,
    connections_active: AtomicU64,
    bytes_to_target: AtomicU64,
    bytes_to_client: AtomicU64,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::Relaxed))
    }
}

/// Which way a pipe carries bytes (for the counters and logs).
#[derive(Debug, Clone, Copy)]
enum Direction {
    ToTarget,
    ToClient,
}

impl FaultProxy {
    /// Binds `listen` (port 0 picks a free port) and starts forwarding every
    /// accepted connection to `target`, with no delay and no blackhole.
    ///
    /// Must be called on a tokio runtime; the proxy's tasks run on it.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            delay_nanos: AtomicU64::new(0),
            blackhole: watch::Sender::new(false),
            connections_accepted: AtomicU64::new(0),
            connections_active: AtomicU64::new(0),
            bytes_to_target: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
        });
        let (cancel, cancel_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, target, Arc::clone(&shared), cancel_rx));
        tracing::debug!(%local_addr, %target, "fault proxy started");
        Ok(FaultProxy { local_addr, target, shared, cancel, task: Some(task) })
    }

    /// The address the proxy listens on (the DNAT destination).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address every connection is forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Sets the one-way delay added to each direction of every connection
    /// (clamped to [`MAX_DELAY`]). It applies to chunks read after the call;
    /// chunks already queued keep their due time. Zero is pass-through.
    pub fn set_delay(&self, d: Duration) {
        let nanos = u64::try_from(d.min(MAX_DELAY).as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Turns the blackhole on or off. While on, nothing is read from or
    /// written to any connection and new connections are not forwarded; data
    /// is held, not dropped, and flows again when it is turned off.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.send_replace(on);
    }

    /// A snapshot of the proxy's counters.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            connections_accepted: s.connections_accepted.load(Ordering::Relaxed),
            connections_active: s.connections_active.load(Ordering::Relaxed),
            bytes_to_target: s.bytes_to_target.load(Ordering::Relaxed),
            bytes_to_client: s.bytes_to_client.load(Ordering::Relaxed),
        }
    }

    /// Closes the listener and every connection, and waits until they are
    /// closed.
    pub async fn stop(mut self) {
        self.cancel.send_replace(true);
        if let Some(task) = self.task.take() {
            // The accept loop closes the listener, then aborts and awaits
            // every connection task.
            let _ = task.await;
        }
        tracing::debug!(local_addr = %self.local_addr, "fault proxy stopped");
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cancel.send_replace(true);
        if let Some(task) = self.task.take() {
            // Aborting the accept loop drops its listener and its `JoinSet`,
            // which aborts every connection task (closing their sockets).
            task.abort();
        }
    }
}

/// Resolves once `cancel` is set (or its sender is gone).
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    let _ = cancel.wait_for(|c| *c).await;
}

/// Accepts connections until cancelled; owns every connection task.
async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    shared: Arc<Shared>,
    mut cancel: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = cancelled(&mut cancel) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            res = listener.accept() => match res {
                Ok((client, peer)) => {
                    shared.connections_accepted.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(handle_conn(client, peer, target, Arc::clone(&shared)));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::debug!(%target, error = %e, "fault proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Decrements the active-connection counter when a connection task ends
/// (including by abort).
struct ActiveGuard(Arc<Shared>);

impl ActiveGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.connections_active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(shared))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs one accepted connection to completion (or error).
async fn handle_conn(client: TcpStream, peer: SocketAddr, target: SocketAddr, shared: Arc<Shared>) {
    let _active = ActiveGuard::new(&shared);
    // A blackholed link forwards nothing, not even the connection attempt.
    let mut blackhole = shared.blackhole.subscribe();
    let _ = blackhole.wait_for(|on| !*on).await;
    let server = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, %target, error = %e, "fault proxy: connect to target failed");
            return;
        }
    };
    // The proxy must not add Nagle delays of its own on top of the endpoints'.
    for s in [&client, &server] {
        if let Err(e) = s.set_nodelay(true) {
            tracing::debug!(%peer, %target, error = %e, "fault proxy: set_nodelay failed");
        }
    }
    let (client_rd, client_wr) = client.into_split();
    let (server_rd, server_wr) = server.into_split();
    let up = pipe(client_rd, server_wr, Direction::ToTarget, &shared);
    let down = pipe(server_rd, client_wr, Direction::ToClient, &shared);
    // The first error in either direction drops everything, closing both sockets.
    match tokio::try_join!(up, down) {
        Ok(_) => tracing::debug!(%peer, %target, "fault proxy: connection closed"),
        Err(e) => tracing::debug!(%peer, %target, error = %e, "fault proxy: connection ended"),
    }
}

/// One queued chunk: `data` is `None` for end of stream.
struct Chunk {
    due: Instant,
    data: Option<Vec<u8>>,
    /// Holds this chunk's share of the direction's byte budget until written.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Carries one direction until end of stream has been delivered.
async fn pipe(rd: OwnedReadHalf, wr: OwnedWriteHalf, dir: Direction, shared: &Arc<Shared>) -> io::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(MAX_QUEUED_BYTES));
    tokio::try_join!(read_side(rd, tx, budget, shared), write_side(wr, rx, dir, shared))?;
    Ok(())
}

/// Reads chunks, stamps each with its due time and queues it; queues end of
/// stream on EOF. Reads nothing while blackholed.
async fn read_side(
    mut rd: OwnedReadHalf,
    tx: mpsc::UnboundedSender<Chunk>,
    budget: Arc<Semaphore>,
    shared: &Shared,
) -> io::Result<()> {
    let mut blackhole = shared.blackhole.subscribe();
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        // The sender lives in `shared`, so this cannot fail.
        let _ = blackhole.wait_for(|on| !*on).await;
        // `read` is cancel-safe: if the blackhole comes on first, nothing is lost.
        let n = tokio::select! {
            biased;
            _ = blackhole.wait_for(|on| *on) => continue,
            r = rd.read(&mut buf) => r?,
        };
        let due = Instant::now() + shared.delay();
        if n == 0 {
            // If the writer is gone it failed, and its error ends the connection.
            let _ = tx.send(Chunk { due, data: None, _permit: None });
            return Ok(());
        }
        // n <= CHUNK_SIZE, which fits a u32.
        let permit = Arc::clone(&budget)
            .acquire_many_owned(n as u32)
            .await
            .map_err(|_| io::Error::other("fault proxy: byte budget closed"))?;
        if tx.send(Chunk { due, data: Some(buf[..n].to_vec()), _permit: Some(permit) }).is_err() {
            return Ok(());
        }
    }
}

/// Writes each queued chunk at its due time, in order; shuts the write side
/// down after the last one. Writes nothing while blackholed.
async fn write_side(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Chunk>,
    dir: Direction,
    shared: &Shared,
) -> io::Result<()> {
    let mut blackhole = shared.blackhole.subscribe();
    while let Some(chunk) = rx.recv().await {
        if chunk.due > Instant::now() {
            tokio::time::sleep_until(chunk.due).await;
        }
        let _ = blackhole.wait_for(|on| !*on).await;
        let Some(data) = chunk.data else {
            wr.shutdown().await?;
            return Ok(());
        };
        wr.write_all(&data).await?;
        let counter = match dir {
            Direction::ToTarget => &shared.bytes_to_target,
            Direction::ToClient => &shared.bytes_to_client,
        };
        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    // The reader stopped without an end of stream: it failed, and its error
    // ends the connection.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::timeout;

    /// An echo server on 127.0.0.1: echoes every byte and half-closes after EOF.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    /// A server that reads until EOF, then answers with the byte count
    /// (8 bytes, big endian) and closes.
    async fn count_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    if s.read_to_end(&mut all).await.is_ok() {
                        let _ = s.write_all(&(all.len() as u64).to_be_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    async fn proxy_to(target: SocketAddr) -> FaultProxy {
        FaultProxy::start("127.0.0.1:0".parse().unwrap(), target).await.unwrap()
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, msg);
    }

    #[tokio::test]
    async fn round_trips_one_mib_unchanged() {
        let proxy = proxy_to(echo_server().await).await;
        let data: Vec<u8> = (0..1usize << 20).map(|i| (i * 31 % 251) as u8).collect();
        let s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        timeout(Duration::from_secs(10), rd.read_to_end(&mut back)).await.unwrap().unwrap();
        writer.await.unwrap();
        assert!(back == data, "echoed bytes differ (got {} bytes)", back.len());
        let stats = proxy.stats();
        assert_eq!(stats.connections_accepted, 1);
        assert_eq!(stats.bytes_to_target, data.len() as u64);
        assert_eq!(stats.bytes_to_client, data.len() as u64);
    }

    #[tokio::test]
    async fn delay_applies_once_each_way_per_round_trip() {
        let proxy = proxy_to(echo_server().await).await;
        proxy.set_delay(Duration::from_millis(200));
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let start = Instant::now();
        round_trip(&mut s, b"ping").await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(400), "round trip took only {took:?}");
        assert!(
            took < Duration::from_secs(3),
            "round trip took {took:?}: is the delay applied more than once each way?"
        );
    }

    #[tokio::test]
    async fn delay_does_not_limit_throughput() {
        let proxy = proxy_to(echo_server().await).await;
        proxy.set_delay(Duration::from_millis(100));
        let s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (mut rd, mut wr) = s.into_split();
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            for i in 0..100u8 {
                wr.write_all(&[i; 512]).await.unwrap();
                // Keep the chunks apart so the proxy reads (and delays) each on its own.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            wr
        });
        let mut back = vec![0u8; 100 * 512];
        timeout(Duration::from_secs(10), rd.read_exact(&mut back)).await.unwrap().unwrap();
        let took = start.elapsed();
        drop(writer.await.unwrap());
        for (i, chunk) in back.chunks(512).enumerate() {
            assert!(chunk.iter().all(|&b| usize::from(b) == i), "chunk {i} corrupted or reordered");
        }
        assert!(took >= Duration::from_millis(200), "100 chunks took only {took:?}");
        // Serialised, 100 chunks would take 10 s.
        assert!(took < Duration::from_secs(5), "100 chunks took {took:?}: delay is serialising chunks");
    }

    #[tokio::test]
    async fn lowering_the_delay_preserves_order() {
        let proxy = proxy_to(echo_server().await).await;
        proxy.set_delay(Duration::from_millis(300));
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        let start = Instant::now();
        s.write_all(b"a").await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        proxy.set_delay(Duration::ZERO);
        s.write_all(b"b").await.unwrap();
        let mut back = [0u8; 2];
        timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(&back, b"ab");
        assert!(start.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn half_close_is_delivered_after_queued_data() {
        let proxy = proxy_to(count_server().await).await;
        proxy.set_delay(Duration::from_millis(50));
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(&vec![7u8; 100_000]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await.unwrap().unwrap();
        assert_eq!(answer, 100_000u64.to_be_bytes());
        // Both directions finished, so the connection's task ends.
        timeout(Duration::from_secs(2), async {
            while proxy.stats().connections_active != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("connection task did not end after both directions closed");
    }

    #[tokio::test]
    async fn blackhole_stalls_and_resumes_with_data_intact() {
        let proxy = proxy_to(echo_server().await).await;
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut s, b"before").await;

        proxy.set_blackhole(true);
        let before = proxy.stats();
        s.write_all(b"hello through the blackhole").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(timeout(Duration::from_millis(300), s.read(&mut buf)).await.is_err(), "read did not stall");
        let during = proxy.stats();
        assert_eq!(during.bytes_to_target, before.bytes_to_target, "bytes crossed the blackhole");

        proxy.set_blackhole(false);
        let mut back = [0u8; 27];
        timeout(Duration::from_secs(2), s.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(&back, b"hello through the blackhole");
        round_trip(&mut s, b"after").await;
    }

    #[tokio::test]
    async fn blackhole_holds_new_connections_until_healed() {
        let proxy = proxy_to(echo_server().await).await;
        proxy.set_blackhole(true);
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 16];
        assert!(timeout(Duration::from_millis(300), s.read(&mut buf)).await.is_err(), "read did not stall");
        let stats = proxy.stats();
        assert_eq!(stats.connections_accepted, 1);
        assert_eq!(stats.bytes_to_target, 0);

        proxy.set_blackhole(false);
        let mut back = [0u8; 4];
        timeout(Duration::from_secs(2), s.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(&back, b"held");
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_client_connections() {
        let proxy = proxy_to(echo_server().await).await;
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut s, b"ping").await;
        drop(proxy);
        let mut buf = [0u8; 16];
        match timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(n)) => panic!("read {n} bytes from a closed proxy"),
            Err(_) => panic!("client connection still open 1 s after the proxy was dropped"),
        }
    }

    #[tokio::test]
    async fn stop_closes_listener_and_connections() {
        let proxy = proxy_to(echo_server().await).await;
        let addr = proxy.local_addr();
        let mut s = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut s, b"ping").await;
        timeout(Duration::from_secs(2), proxy.stop()).await.expect("stop hung");
        let mut buf = [0u8; 16];
        match timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(n)) => panic!("read {n} bytes from a stopped proxy"),
            Err(_) => panic!("client connection still open 1 s after stop"),
        }
        assert!(TcpStream::connect(addr).await.is_err(), "listener still accepting after stop");
    }

    #[tokio::test]
    async fn stop_also_ends_blackholed_connections() {
        let proxy = proxy_to(echo_server().await).await;
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut s, b"ping").await;
        proxy.set_blackhole(true);
        s.write_all(b"stuck").await.unwrap();
        timeout(Duration::from_secs(2), proxy.stop()).await.expect("stop hung");
        let mut buf = [0u8; 16];
        match timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(n)) => panic!("read {n} bytes from a stopped proxy"),
            Err(_) => panic!("client connection still open 1 s after stop"),
        }
    }
}
