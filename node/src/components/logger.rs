//! Log level and format, switched at runtime through `tracing_subscriber`
//! reload layers: one wraps the filter, one wraps the boxed format layer.
//! `Handle::modify` rebuilds the callsite interest cache, so a level change
//! takes effect for every callsite at once.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing_subscriber::{EnvFilter, Layer, Registry, layer::Layered, layer::SubscriberExt, reload};

use crate::config::{LogConfig, LogFormat};

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type FormatLayer = Box<dyn Layer<Filtered> + Send + Sync>;

/// Why log settings were refused. Fatal: the config must change.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// `log.level` is not a valid filter directive.
    #[error("log.level `{level}`: {reason}")]
    InvalidLevel {
        /// The refused directive.
        level: String,
        /// The parser's reason.
        reason: tracing_subscriber::filter::ParseError,
    },
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard output (the service binary).
    Stdout,
    /// Standard error.
    Stderr,
    /// Nowhere (embedded nodes in tests and benchmarks).
    Discard,
}

/// The logger component: reload handles plus the settings they carry.
pub struct Logger {
    current: ArcSwap<LogConfig>,
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<FormatLayer, Filtered>,
    target: LogTarget,
}

impl Logger {
    /// Builds the subscriber for `cfg`. The caller installs the returned
    /// dispatch (globally in the binary) or keeps it alive (embedded).
    pub fn new(cfg: &LogConfig, target: LogTarget) -> Result<(Logger, tracing::Dispatch), LoggerError> {
        let (filter_layer, filter) = reload::Layer::new(filter_for(&cfg.level)?);
        let (format_layer, format) = reload::Layer::new(format_layer(cfg.format, target));
        let subscriber = Registry::default().with(filter_layer).with(format_layer);
        let logger = Logger { current: ArcSwap::from_pointee(cfg.clone()), filter, format, target };
        Ok((logger, tracing::Dispatch::new(subscriber)))
    }

    /// Validates settings without applying them.
    pub(crate) fn check(cfg: &LogConfig) -> Result<(), LoggerError> {
        filter_for(&cfg.level).map(|_| ())
    }

    /// Applies `next`; returns the settings it replaced.
    pub(crate) fn set(&self, next: Arc<LogConfig>) -> Arc<LogConfig> {
        let prev = self.current.swap(next.clone());
        if prev.level != next.level {
            match filter_for(&next.level) {
                Ok(f) => {
                    if let Err(e) = self.filter.modify(|old| *old = f) {
                        tracing::warn!(error = %e, "log filter reload failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "log filter rejected"),
            }
        }
        if prev.format != next.format {
            let layer = format_layer(next.format, self.target);
            if let Err(e) = self.format.modify(|old| *old = layer) {
                tracing::warn!(error = %e, "log format reload failed");
            }
        }
        prev
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<LogConfig> {
        self.current.load_full()
    }
}

fn filter_for(level: &str) -> Result<EnvFilter, LoggerError> {
    EnvFilter::try_new(level).map_err(|reason| LoggerError::InvalidLevel { level: level.to_owned(), reason })
}

fn format_layer(format: LogFormat, target: LogTarget) -> FormatLayer {
    use std::io::IsTerminal;
    let ansi = match target {
        LogTarget::Stdout => std::io::stdout().is_terminal(),
        LogTarget::Stderr => std::io::stderr().is_terminal(),
        LogTarget::Discard => false,
    };
    let base = tracing_subscriber::fmt::layer().with_ansi(ansi);
    match (format, target) {
        (LogFormat::Json, LogTarget::Stdout) => base.json().with_writer(std::io::stdout).boxed(),
        (LogFormat::Json, LogTarget::Stderr) => base.json().with_writer(std::io::stderr).boxed(),
        (LogFormat::Json, LogTarget::Discard) => base.json().with_writer(std::io::sink).boxed(),
        (LogFormat::Text, LogTarget::Stdout) => base.with_writer(std::io::stdout).boxed(),
        (LogFormat::Text, LogTarget::Stderr) => base.with_writer(std::io::stderr).boxed(),
        (LogFormat::Text, LogTarget::Discard) => base.with_writer(std::io::sink).boxed(),
    }
}
