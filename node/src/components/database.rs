//! PostgreSQL pool (sqlx). A pool cannot be resized in place, so a reload
//! builds a new one, runs `SELECT 1` on it, swaps it in, and drains the old.

use std::{str::FromStr, time::Duration};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::{DatabaseConfig, scrub};

/// Why the PostgreSQL pool could not be built or failed its check.
///
/// Messages are sqlx's, with the URL's secrets scrubbed (so the error carries
/// text rather than the `sqlx::Error`, which may quote the URL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatabaseError {
    /// `database.url` is not a usable PostgreSQL URL. Fatal: the config
    /// must change.
    #[error("database.url: {0}")]
    InvalidUrl(String),
    /// The pool could not open a connection. Retryable.
    #[error("connect: {0}")]
    Connect(String),
    /// `SELECT 1` failed. Retryable.
    #[error("SELECT 1: {0}")]
    Query(String),
    /// `SELECT 1` answered something else than 1. Retryable.
    #[error("SELECT 1 returned {0}")]
    WrongAnswer(i32),
    /// `SELECT 1` did not answer within the acquire timeout. Retryable.
    #[error("SELECT 1 timed out after {0:?}")]
    Timeout(Duration),
}

impl DatabaseError {
    /// Whether trying again later may succeed (the database may come back);
    /// false when the config itself is wrong.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, DatabaseError::InvalidUrl(_))
    }
}

/// A live PostgreSQL pool and the settings it was built with.
#[derive(Debug)]
pub struct Database {
    pool: PgPool,
    /// Secrets of the URL, to scrub from error texts.
    secrets: Vec<String>,
    /// Bound on each health check.
    check_timeout: Duration,
}

impl Database {
    fn options(cfg: &DatabaseConfig) -> Result<(PgPoolOptions, PgConnectOptions, Vec<String>), DatabaseError> {
        let secrets: Vec<String> = cfg.url.secret().into_iter().collect();
        let connect = PgConnectOptions::from_str(cfg.url.expose())
            .map_err(|e| DatabaseError::InvalidUrl(scrub(&e.to_string(), &secrets)))?;
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_conns)
            .min_connections(cfg.min_conns)
            .acquire_timeout(cfg.acquire_timeout.0)
            .idle_timeout(Some(cfg.idle_timeout.0));
        Ok((pool, connect, secrets))
    }

    /// A pool that connects on first use (boot: the node starts even when
    /// the database is down, and reports not-ready).
    pub(crate) fn lazy(cfg: &DatabaseConfig) -> Result<Self, DatabaseError> {
        let (opts, connect, secrets) = Self::options(cfg)?;
        Ok(Self { pool: opts.connect_lazy_with(connect), secrets, check_timeout: cfg.acquire_timeout.0 })
    }

    /// Builds a pool and proves it works with `SELECT 1`.
    pub(crate) async fn connect(cfg: &DatabaseConfig) -> Result<Self, DatabaseError> {
        let (opts, connect, secrets) = Self::options(cfg)?;
        let pool =
            opts.connect_with(connect).await.map_err(|e| DatabaseError::Connect(scrub(&e.to_string(), &secrets)))?;
        let db = Self { pool, secrets, check_timeout: cfg.acquire_timeout.0 };
        if let Err(e) = db.check().await {
            db.pool.close().await;
            return Err(e);
        }
        Ok(db)
    }

    /// The sqlx pool, for queries.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `SELECT 1`, bounded by the acquire timeout.
    pub async fn check(&self) -> Result<(), DatabaseError> {
        let q = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool);
        match tokio::time::timeout(self.check_timeout, q).await {
            Ok(Ok(1)) => Ok(()),
            Ok(Ok(n)) => Err(DatabaseError::WrongAnswer(n)),
            Ok(Err(e)) => Err(DatabaseError::Query(scrub(&e.to_string(), &self.secrets))),
            Err(_) => Err(DatabaseError::Timeout(self.check_timeout)),
        }
    }

    /// Refuses new acquires and waits for checked-out connections.
    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }

    /// Configured maximum pool size (for status and tests).
    pub fn max_connections(&self) -> u32 {
        self.pool.options().get_max_connections()
    }
}
