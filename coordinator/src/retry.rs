//! One way to wait between attempts of a store operation that failed for a
//! retryable reason: 50 ms, doubling up to 1 s, and never past the moment
//! the caller's term is lost (which the replica's run loop also signals on
//! shutdown). A deposed leader stops retrying at once instead of sleeping
//! its way through writes that can no longer land.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The pauses between attempts of one operation.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    /// First pause.
    const FIRST: Duration = Duration::from_millis(50);
    /// Longest pause: a store that recovers is used again within a second.
    const MAX: Duration = Duration::from_secs(1);

    /// Pauses starting at 50 ms.
    pub(crate) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// Sleeps the next pause; `false` (at once) when `stop` fires first or
    /// already fired: give up.
    pub(crate) async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let pause = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pauses_double_up_to_a_second_and_stop_at_once_when_told() {
        let stop = CancellationToken::new();
        let mut b = Backoff::new();
        let mut pauses = Vec::new();
        for _ in 0..7 {
            let t = tokio::time::Instant::now();
            assert!(b.wait(&stop).await);
            pauses.push(t.elapsed().as_millis());
        }
        assert_eq!(pauses, vec![50, 100, 200, 400, 800, 1000, 1000]);
        let t = tokio::time::Instant::now();
        let canceller = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                stop.cancel();
            })
        };
        assert!(!b.wait(&stop).await, "a stop mid-pause gives up");
        assert_eq!(t.elapsed().as_millis(), 300, "at once, not after the pause");
        canceller.await.unwrap();
        assert!(!b.wait(&stop).await, "an earlier stop gives up without sleeping");
        assert_eq!(t.elapsed().as_millis(), 300);
    }
}
