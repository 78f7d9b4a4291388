//! Redis pool (deadpool-redis): the config has a pool size, so a pool rather
//! than one multiplexed connection. A reload builds a new pool, `PING`s it,
//! swaps it in and drains the old one.

use std::time::Duration;

use deadpool_redis::{Config as PoolCfg, Connection, PoolConfig, Runtime, Timeouts};

use crate::config::{RedisConfig, scrub};

/// Why the Redis pool could not be built, or a call on it failed.
///
/// Messages are the client's, with the URL's secrets scrubbed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    /// `redis.url` is not a usable Redis URL. Fatal: the config must change.
    #[error("redis.url: {0}")]
    InvalidUrl(String),
    /// No pooled connection could be had (connect failed, pool closed or
    /// exhausted). Retryable.
    #[error("redis: {0}")]
    Pool(String),
    /// The command failed on its connection. Retryable.
    #[error("redis: {0}")]
    Command(String),
    /// The command did not finish within the configured timeout. Retryable.
    #[error("redis: timed out after {0:?}")]
    Timeout(Duration),
    /// `PING` answered something else than `PONG`. Retryable.
    #[error("PING answered {0:?}")]
    UnexpectedPong(String),
    /// `PING` failed (the inner error says how).
    #[error("PING: {0}")]
    Ping(Box<RedisError>),
}

impl RedisError {
    /// Whether trying again later may succeed (the server may come back);
    /// false when the config itself is wrong.
    pub fn is_retryable(&self) -> bool {
        match self {
            RedisError::InvalidUrl(_) => false,
            RedisError::Ping(inner) => inner.is_retryable(),
            _ => true,
        }
    }
}

/// A live Redis pool.
pub struct RedisPool {
    pool: deadpool_redis::Pool,
    /// Per-command timeout.
    timeout: Duration,
    /// Secrets of the URL, to scrub from error texts.
    secrets: Vec<String>,
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPool").field("max_size", &self.max_size()).finish()
    }
}

impl RedisPool {
    /// Builds the pool (connections are opened on demand).
    pub(crate) fn build(cfg: &RedisConfig) -> Result<Self, RedisError> {
        let secrets: Vec<String> = cfg.url.secret().into_iter().collect();
        let mut pc = PoolCfg::from_url(cfg.url.expose());
        let t = Some(cfg.timeout.0);
        pc.pool = Some(PoolConfig {
            max_size: cfg.pool_size as usize,
            timeouts: Timeouts { wait: t, create: t, recycle: t },
            ..PoolConfig::default()
        });
        let pool = pc
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| RedisError::InvalidUrl(scrub(&e.to_string(), &secrets)))?;
        Ok(Self { pool, timeout: cfg.timeout.0, secrets })
    }

    /// Builds a pool and proves it works with `PING` (closed again if not).
    pub(crate) async fn connect(cfg: &RedisConfig) -> Result<Self, RedisError> {
        let pool = Self::build(cfg)?;
        if let Err(e) = pool.ping().await {
            pool.close();
            return Err(e);
        }
        Ok(pool)
    }

    /// A pooled connection.
    pub async fn get(&self) -> Result<Connection, RedisError> {
        self.pool.get().await.map_err(|e| RedisError::Pool(scrub(&e.to_string(), &self.secrets)))
    }

    /// Runs `cmd` on a pooled connection under the configured timeout.
    pub async fn query<T: deadpool_redis::redis::FromRedisValue>(
        &self,
        cmd: &deadpool_redis::redis::Cmd,
    ) -> Result<T, RedisError> {
        let fut = async {
            let mut conn = self.get().await?;
            cmd.query_async::<T>(&mut conn).await.map_err(|e| RedisError::Command(scrub(&e.to_string(), &self.secrets)))
        };
        tokio::time::timeout(self.timeout, fut).await.unwrap_or_else(|_| Err(RedisError::Timeout(self.timeout)))
    }

    /// `PING`, expecting `PONG`.
    pub async fn ping(&self) -> Result<(), RedisError> {
        match self.query::<String>(&deadpool_redis::redis::cmd("PING")).await {
            Ok(p) if p == "PONG" => Ok(()),
            Ok(p) => Err(RedisError::UnexpectedPong(p)),
            Err(e) => Err(RedisError::Ping(Box::new(e))),
        }
    }

    /// Configured maximum pool size.
    pub fn max_size(&self) -> usize {
        self.pool.status().max_size
    }

    /// Closes the pool: waiting `get`s fail, idle connections are dropped.
    pub(crate) fn close(&self) {
        self.pool.close();
    }
}
