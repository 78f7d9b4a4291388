//! Ready-made [`Component`]s a service opts into: the logger (tracing
//! reload), a PostgreSQL pool (sqlx), a Redis pool (deadpool), an
//! OpenAI-style LLM client (reqwest) and the metrics settings.
//!
//! Each one is told where its section lives in the service's config type
//! (an accessor function and the section's path), so any config that embeds
//! [`LogConfig`], [`DatabaseConfig`], [`RedisConfig`], [`LlmConfig`] or
//! [`MetricsConfig`] can use them. The reference service
//! ([`reference_components`]) registers all five.
//!
//! ```text
//!   prepare(cfg)      ──▶ Instance (built and checked, not yet visible)
//!   swap (the node)   ──▶ previous Instance   (atomic; requests see the new one)
//!   retire (the node) ──▶ background drain for `grace`, then close
//! ```

pub mod database;
pub mod llm;
pub mod logger;
pub mod redis;

use std::{future::Future, sync::Arc, time::Duration};

use crate::{
    config::{Config, DatabaseConfig, LlmConfig, LogConfig, MetricsConfig, RedisConfig},
    metrics::NodeMetrics,
    service::Component,
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
    /// A service's own component failed (see [`ComponentError::fatal`] and
    /// [`ComponentError::retryable`]).
    #[error("{source}")]
    Service {
        /// The component's own error.
        source: Box<dyn std::error::Error + Send + Sync>,
        /// Whether trying again later may succeed.
        retryable: bool,
    },
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
            ComponentError::Service { retryable, .. } => *retryable,
        }
    }

    /// A failure that needs other settings first (a bad value).
    pub fn fatal(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ComponentError::Service { source: e.into(), retryable: false }
    }

    /// A failure that may pass on its own (a dependency down or slow).
    pub fn retryable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ComponentError::Service { source: e.into(), retryable: true }
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

/// Reads a section of the service config.
pub type Section<C, T> = fn(&C) -> Option<&T>;

/// Log level and format, applied through the node's tracing reload handles.
pub struct LoggerComponent<C> {
    logger: Arc<Logger>,
    path: String,
    get: fn(&C) -> &LogConfig,
}

impl<C> LoggerComponent<C> {
    /// Drives `logger` (the node's: [`crate::NodeBuilder::logger`]) from the
    /// section at `path`.
    pub fn new(logger: Arc<Logger>, path: &str, get: fn(&C) -> &LogConfig) -> Self {
        Self { logger, path: path.into(), get }
    }
}

impl<C: Send + Sync + 'static> Component<C> for LoggerComponent<C> {
    type Instance = LogConfig;

    fn name(&self) -> &'static str {
        "logger"
    }
    fn paths(&self) -> Vec<String> {
        vec![self.path.clone()]
    }
    async fn prepare(&self, config: &C) -> Result<LogConfig, ComponentError> {
        let settings = (self.get)(config);
        Logger::check(settings)?;
        Ok(settings.clone())
    }
    fn swapped(&self, live: Option<&Arc<LogConfig>>) {
        if let Some(s) = live {
            self.logger.set(s.clone());
        }
    }
}

/// A connection pool the node can run as a critical component: built
/// lazily at boot (so a node boots, not ready, while the server is down),
/// connected and checked on reload, drained, then closed.
pub trait Pool: Send + Sync + Sized + 'static {
    /// Its config section.
    type Settings: Send + Sync + 'static;
    /// Component name.
    const NAME: &'static str;
    /// A pool that connects on first use.
    fn lazy(settings: &Self::Settings) -> Result<Self, ComponentError>;
    /// A pool with a connection made and checked.
    fn connect(settings: &Self::Settings) -> impl Future<Output = Result<Self, ComponentError>> + Send;
    /// One round trip on a pooled connection.
    fn check(&self) -> impl Future<Output = Result<(), ComponentError>> + Send;
    /// Closes every connection.
    fn shut(&self) -> impl Future<Output = ()> + Send;
}

impl Pool for Database {
    type Settings = DatabaseConfig;
    const NAME: &'static str = "database";
    fn lazy(settings: &DatabaseConfig) -> Result<Self, ComponentError> {
        Ok(Database::lazy(settings)?)
    }
    async fn connect(settings: &DatabaseConfig) -> Result<Self, ComponentError> {
        Ok(Database::connect(settings).await?)
    }
    async fn check(&self) -> Result<(), ComponentError> {
        Ok(Database::check(self).await?)
    }
    async fn shut(&self) {
        self.close().await;
    }
}

impl Pool for RedisPool {
    type Settings = RedisConfig;
    const NAME: &'static str = "redis";
    fn lazy(settings: &RedisConfig) -> Result<Self, ComponentError> {
        Ok(RedisPool::build(settings)?)
    }
    async fn connect(settings: &RedisConfig) -> Result<Self, ComponentError> {
        Ok(RedisPool::connect(settings).await?)
    }
    async fn check(&self) -> Result<(), ComponentError> {
        Ok(self.ping().await?)
    }
    async fn shut(&self) {
        self.close();
    }
}

/// A [`Pool`] as a component. Critical when enabled: the node cannot serve
/// without it.
pub struct PoolComponent<C, P: Pool> {
    path: String,
    get: Section<C, P::Settings>,
    grace: Duration,
}

/// A PostgreSQL pool (sqlx; reload: new pool + `SELECT 1`).
pub type DatabaseComponent<C> = PoolComponent<C, Database>;
/// A Redis pool (deadpool-redis; reload: new pool + `PING`).
pub type RedisComponent<C> = PoolComponent<C, RedisPool>;

impl<C, P: Pool> PoolComponent<C, P> {
    /// A pool from the section `get` returns (`None`: disabled) at `path`;
    /// a retired pool drains for `grace`.
    pub fn new(path: &str, get: Section<C, P::Settings>, grace: Duration) -> Self {
        Self { path: path.into(), get, grace }
    }
}

impl<C: Send + Sync + 'static, P: Pool> Component<C> for PoolComponent<C, P> {
    type Instance = P;

    fn name(&self) -> &'static str {
        P::NAME
    }
    fn paths(&self) -> Vec<String> {
        vec![self.path.clone()]
    }
    fn enabled(&self, config: &C) -> bool {
        (self.get)(config).is_some()
    }
    fn critical(&self, _: &C) -> bool {
        true
    }
    async fn boot(&self, config: &C) -> Result<P, ComponentError> {
        P::lazy(section(self.get, config)?)
    }
    async fn prepare(&self, config: &C) -> Result<P, ComponentError> {
        P::connect(section(self.get, config)?).await
    }
    async fn health(&self, live: &P) -> Result<(), ComponentError> {
        live.check().await
    }
    fn grace(&self) -> Duration {
        self.grace
    }
    async fn close(&self, retired: Arc<P>) {
        retired.shut().await;
    }
}

/// An OpenAI-style LLM client. Critical only when its section says
/// `required: true`; otherwise a failure leaves the node degraded.
pub struct LlmComponent<C> {
    path: String,
    get: Section<C, LlmConfig>,
}

impl<C> LlmComponent<C> {
    /// A client from the section `get` returns (`None`: disabled) at `path`.
    pub fn new(path: &str, get: Section<C, LlmConfig>) -> Self {
        Self { path: path.into(), get }
    }
}

impl<C: Send + Sync + 'static> Component<C> for LlmComponent<C> {
    type Instance = LlmClient;

    fn name(&self) -> &'static str {
        "llm"
    }
    fn paths(&self) -> Vec<String> {
        vec![self.path.clone()]
    }
    fn enabled(&self, config: &C) -> bool {
        (self.get)(config).is_some()
    }
    fn critical(&self, config: &C) -> bool {
        (self.get)(config).is_some_and(|l| l.required)
    }
    // In-flight calls own an Arc to their client; it is freed when the last
    // one finishes, so no grace and no close.
    async fn prepare(&self, config: &C) -> Result<LlmClient, ComponentError> {
        Ok(LlmClient::new(section(self.get, config)?)?)
    }
    async fn health(&self, live: &LlmClient) -> Result<(), ComponentError> {
        Ok(live.health().await?)
    }
}

/// Metrics collection and extra labels, applied to the node's registry.
pub struct MetricsComponent<C> {
    metrics: Arc<NodeMetrics>,
    path: String,
    get: fn(&C) -> &MetricsConfig,
}

impl<C> MetricsComponent<C> {
    /// Drives `metrics` (the node's: [`crate::NodeBuilder::metrics`]) from
    /// the section at `path`.
    pub fn new(metrics: Arc<NodeMetrics>, path: &str, get: fn(&C) -> &MetricsConfig) -> Self {
        Self { metrics, path: path.into(), get }
    }
}

impl<C: Send + Sync + 'static> Component<C> for MetricsComponent<C> {
    type Instance = MetricsConfig;

    fn name(&self) -> &'static str {
        "metrics"
    }
    fn paths(&self) -> Vec<String> {
        vec![self.path.clone()]
    }
    async fn prepare(&self, config: &C) -> Result<MetricsConfig, ComponentError> {
        Ok((self.get)(config).clone())
    }
    fn swapped(&self, live: Option<&Arc<MetricsConfig>>) {
        if let Some(s) = live {
            self.metrics.swap_settings(s.clone());
        }
    }
}

/// The section of an enabled component (the node calls `boot` and
/// `prepare` only when `enabled` said yes).
fn section<C, T>(get: Section<C, T>, config: &C) -> Result<&T, ComponentError> {
    get(config).ok_or_else(|| ComponentError::fatal("internal: the section of an enabled component is missing"))
}

/// Registers the reference service's five components, in report order:
/// logger, database, redis, llm, metrics.
pub fn reference_components(b: &mut crate::NodeBuilder<Config>, grace: Grace) {
    let logger = LoggerComponent::new(b.logger().clone(), "log", |c: &Config| &c.log);
    b.component(logger);
    b.component(DatabaseComponent::new("database", Config::database_enabled, grace.database));
    b.component(RedisComponent::new("redis", Config::redis_enabled, grace.redis));
    b.component(LlmComponent::new("llm", |c: &Config| c.llm.as_ref()));
    let metrics = MetricsComponent::new(b.metrics().clone(), "metrics", |c: &Config| &c.metrics);
    b.component(metrics);
}
