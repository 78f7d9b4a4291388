//! The swappable components and the one place that knows how to build,
//! swap, health-check and drain each of them.
//!
//! Every component lives behind its own `ArcSwap` slot. Request handlers take
//! an `Arc` to the instance they start with (`load_full`) and keep it until
//! they finish, so a swap never pulls an instance out from under in-flight
//! work. The previous instance is drained in the background: we wait until
//! nobody but us holds it (or the grace period ends), then close it.
//!
//! ```text
//!   prepare(kind, cfg) ──▶ Instance (built and checked, not yet visible)
//!   swap(Instance)     ──▶ previous Instance      (atomic; requests see the new one)
//!   retire(previous)   ──▶ background drain, then close (also for an
//!                          instance a rollback takes out again)
//! ```

pub mod database;
pub mod llm;
pub mod logger;
pub mod redis;

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwapOption;
use serde::Serialize;

use crate::{
    config::{Config, MetricsConfig},
    metrics::NodeMetrics,
};
pub use database::{Database, DatabaseError};
pub use llm::{LlmBuildError, LlmClient, LlmHealthError};
pub use logger::{LogTarget, Logger, LoggerError};
pub use redis::{RedisError, RedisPool};

/// Why a component could not be built, prepared or health-checked. The
/// Display text is the component's own (what reload reports and logs show).
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// Log settings refused.
    #[error(transparent)]
    Logger(#[from] LoggerError),
    /// PostgreSQL pool.
    #[error(transparent)]
    Database(#[from] DatabaseError),
    /// Redis pool.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// LLM HTTP client could not be built.
    #[error(transparent)]
    LlmBuild(#[from] LlmBuildError),
    /// LLM endpoint failed its health check.
    #[error(transparent)]
    LlmHealth(#[from] LlmHealthError),
    /// Building and checking a new instance took longer than the reload
    /// timeout. Retryable.
    #[error("timed out after {0:?}")]
    PrepareTimedOut(Duration),
    /// The health check took longer than the reload timeout. Retryable.
    #[error("health check timed out after {0:?}")]
    HealthTimedOut(Duration),
}

impl ComponentError {
    /// Whether trying again later may succeed (a dependency that is down or
    /// slow), as opposed to settings that must change first.
    pub fn is_retryable(&self) -> bool {
        match self {
            ComponentError::Logger(_) | ComponentError::LlmBuild(_) => false,
            ComponentError::Database(e) => e.is_retryable(),
            ComponentError::Redis(e) => e.is_retryable(),
            ComponentError::LlmHealth(e) => e.is_retryable(),
            ComponentError::PrepareTimedOut(_) | ComponentError::HealthTimedOut(_) => true,
        }
    }
}

/// The hot-reloadable components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentKind {
    /// Log level and format.
    Logger,
    /// PostgreSQL pool. Critical.
    Database,
    /// Redis pool. Critical.
    Redis,
    /// LLM HTTP client.
    Llm,
    /// Metrics collection and labels.
    Metrics,
}

impl ComponentKind {
    /// Every component, in reload-report order.
    pub const ALL: [ComponentKind; 5] = [
        ComponentKind::Logger,
        ComponentKind::Database,
        ComponentKind::Redis,
        ComponentKind::Llm,
        ComponentKind::Metrics,
    ];

    /// Lower-case name used in reports and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Logger => "logger",
            ComponentKind::Database => "database",
            ComponentKind::Redis => "redis",
            ComponentKind::Llm => "llm",
            ComponentKind::Metrics => "metrics",
        }
    }

    /// The config section that drives the component.
    pub fn section(self) -> &'static str {
        match self {
            ComponentKind::Logger => "log",
            ComponentKind::Database => "database",
            ComponentKind::Redis => "redis",
            ComponentKind::Llm => "llm",
            ComponentKind::Metrics => "metrics",
        }
    }

    /// Whether `config` makes this component critical: enabled, and the node
    /// cannot serve without it. A critical component that fails rolls the
    /// reload back and makes the node unhealthy. The database and Redis always
    /// are; the LLM endpoint is when its section says `required: true`.
    pub fn is_critical_in(self, config: &Config) -> bool {
        match self {
            ComponentKind::Database | ComponentKind::Redis => self.enabled_in(config),
            ComponentKind::Llm => config.llm.as_ref().is_some_and(|l| l.required),
            ComponentKind::Logger | ComponentKind::Metrics => false,
        }
    }

    /// Whether `config` runs this component at all.
    pub fn enabled_in(self, config: &Config) -> bool {
        match self {
            ComponentKind::Logger | ComponentKind::Metrics => true,
            ComponentKind::Database => config.database_enabled().is_some(),
            ComponentKind::Redis => config.redis_enabled().is_some(),
            ComponentKind::Llm => config.llm.is_some(),
        }
    }
}

/// How long a retired instance may keep serving in-flight work before it is
/// closed.
#[derive(Debug, Clone, Copy)]
pub struct Grace {
    /// PostgreSQL pool drain (default 5 s).
    pub database: Duration,
    /// Redis pool drain (default 2 s).
    pub redis: Duration,
}

impl Default for Grace {
    fn default() -> Self {
        Self { database: Duration::from_secs(5), redis: Duration::from_secs(2) }
    }
}

/// One built instance of a component (`None`: the component is disabled).
pub(crate) enum Instance {
    Logger(Arc<crate::config::LogConfig>),
    Database(Option<Arc<Database>>),
    Redis(Option<Arc<RedisPool>>),
    Llm(Option<Arc<LlmClient>>),
    Metrics(Arc<MetricsConfig>),
}

/// The live components of a node.
pub struct Components {
    /// Tracing reload handles.
    pub(crate) logger: Logger,
    /// Live PostgreSQL pool; `None` when disabled (`profile: lite`).
    pub(crate) database: ArcSwapOption<Database>,
    /// Live Redis pool; `None` when disabled.
    pub(crate) redis: ArcSwapOption<RedisPool>,
    /// Live LLM client; `None` when no `llm` section.
    pub(crate) llm: ArcSwapOption<LlmClient>,
    /// Registry and its reloadable settings.
    pub(crate) metrics: Arc<NodeMetrics>,
    /// Drain periods.
    pub(crate) grace: Grace,
}

impl Components {
    /// Builds every component for boot. Pools connect lazily so a node can
    /// start (and report not-ready) while its database is down.
    pub(crate) fn boot(
        config: &Config,
        logger: Logger,
        metrics: Arc<NodeMetrics>,
        grace: Grace,
    ) -> Result<Self, ComponentError> {
        let database = config.database_enabled().map(Database::lazy).transpose()?.map(Arc::new);
        let redis = config.redis_enabled().map(RedisPool::build).transpose()?.map(Arc::new);
        let llm = config.llm.as_ref().map(LlmClient::new).transpose()?.map(Arc::new);
        metrics.set_settings(config.metrics.clone());
        Ok(Self {
            logger,
            database: ArcSwapOption::new(database),
            redis: ArcSwapOption::new(redis),
            llm: ArcSwapOption::new(llm),
            metrics,
            grace,
        })
    }

    /// Builds and checks a new instance for `config`, without exposing it.
    pub(crate) async fn prepare(&self, kind: ComponentKind, config: &Config) -> Result<Instance, ComponentError> {
        Ok(match kind {
            ComponentKind::Logger => {
                Logger::check(&config.log)?;
                Instance::Logger(Arc::new(config.log.clone()))
            }
            ComponentKind::Database => match config.database_enabled() {
                None => Instance::Database(None),
                Some(db) => Instance::Database(Some(Arc::new(Database::connect(db).await?))),
            },
            ComponentKind::Redis => match config.redis_enabled() {
                None => Instance::Redis(None),
                Some(r) => Instance::Redis(Some(Arc::new(RedisPool::connect(r).await?))),
            },
            ComponentKind::Llm => Instance::Llm(config.llm.as_ref().map(LlmClient::new).transpose()?.map(Arc::new)),
            ComponentKind::Metrics => Instance::Metrics(Arc::new(config.metrics.clone())),
        })
    }

    /// Makes `instance` live; returns the one it replaced.
    pub(crate) fn swap(&self, instance: Instance) -> Instance {
        match instance {
            Instance::Logger(s) => Instance::Logger(self.logger.set(s)),
            Instance::Database(p) => Instance::Database(self.database.swap(p)),
            Instance::Redis(p) => Instance::Redis(self.redis.swap(p)),
            Instance::Llm(c) => Instance::Llm(self.llm.swap(c)),
            Instance::Metrics(s) => Instance::Metrics(self.metrics.swap_settings(s)),
        }
    }

    /// Drains a replaced instance in the background, then closes it.
    pub(crate) fn retire(&self, instance: Instance) {
        match instance {
            Instance::Database(Some(p)) => drain(p, self.grace.database, |p| async move { p.close().await }),
            Instance::Redis(Some(p)) => drain(p, self.grace.redis, |p| async move { p.close() }),
            // In-flight LLM calls own an Arc to their client; it is freed when
            // the last one finishes. Logger and metrics hold no resources.
            _ => {}
        }
    }

    /// Health of the live instance of `kind`.
    pub(crate) async fn health(&self, kind: ComponentKind) -> Result<(), ComponentError> {
        match kind {
            ComponentKind::Logger | ComponentKind::Metrics => Ok(()),
            ComponentKind::Database => match self.database.load_full() {
                Some(db) => Ok(db.check().await?),
                None => Ok(()),
            },
            ComponentKind::Redis => match self.redis.load_full() {
                Some(r) => Ok(r.ping().await?),
                None => Ok(()),
            },
            ComponentKind::Llm => match self.llm.load_full() {
                Some(c) => Ok(c.health().await?),
                None => Ok(()),
            },
        }
    }

    /// Closes every pool now (shutdown).
    pub(crate) async fn close(&self) {
        if let Some(db) = self.database.swap(None) {
            db.close().await;
        }
        if let Some(r) = self.redis.swap(None) {
            r.close();
        }
    }
}

/// Waits until nobody else holds `item` (every in-flight request that took it
/// has finished) or `grace` runs out, then runs `close`.
fn drain<T, F, Fut>(item: Arc<T>, grace: Duration, close: F)
where
    T: Send + Sync + 'static,
    F: FnOnce(Arc<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + grace;
        while Arc::strong_count(&item) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let holders = Arc::strong_count(&item) - 1;
        if holders > 0 {
            tracing::warn!(holders, "grace period over; closing a retired component still in use");
        }
        close(item).await;
    });
}
