//! Waiting for something to become true, with a deadline and a message.

use std::time::{Duration, Instant};

/// Polls `f` every 25 ms until it returns `Some`; panics after `within`
/// naming `what`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Blocks until something accepts connections on `addr`; panics after
/// `within`.
pub fn wait_for_port(addr: std::net::SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr} after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_first_value() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), "three calls", || {
            n += 1;
            let now = n;
            async move { (now == 3).then_some(now) }
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for nothing")]
    async fn eventually_names_what_it_waited_for() {
        eventually(Duration::from_millis(50), "nothing", || async { None::<()> }).await;
    }
}
