//! A service with a config and a component of its own, on confroll-node:
//! feature flags and a rate limiter whose quota store must answer.
//! `cargo run -p confroll-node --example flags -- --help`; guide: docs/embedding.md.
use std::{collections::BTreeMap, net::SocketAddr};

use clap::Parser;
use confroll_node::{
    Component, ComponentError, Format, Node, ServiceConfig, Violation,
    wiring::{self, NodeArgs},
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Feature flags, read on every request.
    #[serde(default)]
    features: BTreeMap<String, bool>,
    /// Requests per second and client (1..=10000).
    rate_limit: u32,
    /// `ip:port` of the quota store the limiter counts in.
    quota_store: String,
    /// Key of the quota store: never in a diff, status, history or log.
    #[schemars(extend("x-confroll-secret" = true))]
    quota_key: String,
    /// Port the service listens on: fixed at boot.
    listen_port: u16,
}

impl ServiceConfig for Config {
    const FORMAT: Format = Format::Toml;
    const RESTART_ONLY: &'static [&'static str] = &["listen_port"];
    fn check(&self) -> Vec<Violation> {
        let mut v = Vec::new();
        if !(1..=10_000).contains(&self.rate_limit) {
            v.push(Violation::new("rate_limit", format!("must be 1..=10000 (got {})", self.rate_limit)));
        }
        if self.quota_store.parse::<SocketAddr>().is_err() {
            v.push(Violation::new("quota_store", "must be ip:port"));
        }
        v
    }
}

/// Rebuilt when its settings change; critical: no quota store, no rollout.
struct Limiter;
struct Limits {
    per_second: u32,
    store: SocketAddr,
}

impl Component<Config> for Limiter {
    type Instance = Limits;
    fn name(&self) -> &'static str {
        "limiter"
    }
    fn paths(&self) -> Vec<String> {
        vec!["rate_limit".into(), "quota_store".into()]
    }
    fn critical(&self, _: &Config) -> bool {
        true
    }
    async fn prepare(&self, c: &Config) -> Result<Limits, ComponentError> {
        Ok(Limits { per_second: c.rate_limit, store: c.quota_store.parse().map_err(ComponentError::fatal)? })
    }
    async fn health(&self, live: &Limits) -> Result<(), ComponentError> {
        tokio::net::TcpStream::connect(live.store).await.map(drop).map_err(ComponentError::retryable)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = NodeArgs::parse();
    let mut builder = Node::<Config>::builder(args.options("flags"))?;
    let limiter = builder.component(Limiter);
    let node = builder.start().await?;
    tracing::dispatcher::set_global_default(node.dispatch().clone())?;
    // What a request does: one config and one limiter for its whole life.
    let (live, limits) = (node.config(), limiter.get().expect("the limiter is always enabled"));
    let beta = live.config.features.get("beta").copied().unwrap_or(false);
    tracing::info!(beta, per_second = limits.per_second, version = live.version, "serving");
    wiring::serve(node, args.wiring().await?, wiring::shutdown_on_signals()).await?;
    Ok(())
}
