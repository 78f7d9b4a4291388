//! PostgreSQL pool (sqlx). A pool cannot be resized in place, so a reload
//! builds a new one, runs `SELECT 1` on it, swaps it in, and drains the old.

use std::{str::FromStr, time::Duration};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::{DatabaseConfig, scrub};

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
    fn options(cfg: &DatabaseConfig) -> Result<(PgPoolOptions, PgConnectOptions, Vec<String>), String> {
        let secrets: Vec<String> = cfg.url.secret().into_iter().collect();
        let connect = PgConnectOptions::from_str(cfg.url.expose())
            .map_err(|e| format!("database.url: {}", scrub(&e.to_string(), &secrets)))?;
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_conns)
            .min_connections(cfg.min_conns)
            .acquire_timeout(cfg.acquire_timeout.0)
            .idle_timeout(Some(cfg.idle_timeout.0));
        Ok((pool, connect, secrets))
    }

    /// A pool that connects on first use (boot: the node starts even when
    /// the database is down, and reports not-ready).
    pub(crate) fn lazy(cfg: &DatabaseConfig) -> Result<Self, String> {
        let (opts, connect, secrets) = Self::options(cfg)?;
        Ok(Self { pool: opts.connect_lazy_with(connect), secrets, check_timeout: cfg.acquire_timeout.0 })
    }

    /// Builds a pool and proves it works with `SELECT 1`.
    pub(crate) async fn connect(cfg: &DatabaseConfig) -> Result<Self, String> {
        let (opts, connect, secrets) = Self::options(cfg)?;
        let pool =
            opts.connect_with(connect).await.map_err(|e| format!("connect: {}", scrub(&e.to_string(), &secrets)))?;
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
    pub async fn check(&self) -> Result<(), String> {
        let q = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool);
        match tokio::time::timeout(self.check_timeout, q).await {
            Ok(Ok(1)) => Ok(()),
            Ok(Ok(n)) => Err(format!("SELECT 1 returned {n}")),
            Ok(Err(e)) => Err(format!("SELECT 1: {}", scrub(&e.to_string(), &self.secrets))),
            Err(_) => Err(format!("SELECT 1 timed out after {:?}", self.check_timeout)),
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
