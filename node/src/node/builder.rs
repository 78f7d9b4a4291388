//! Putting a node together: [`NodeBuilder`] (options, components, then
//! boot), and the reference service's `Node::start`.

use std::{
    any::{Any, TypeId},
    collections::HashMap,
    sync::{Arc, atomic::AtomicU64},
    time::SystemTime,
};

use arc_swap::{ArcSwap, ArcSwapOption};

use super::{Inner, LiveConfig, Node, NodeOptions, StartError, read_limited};
use crate::{
    components::{
        ComponentError, DatabaseComponent, LlmClient, LlmComponent, Logger, RedisComponent, RedisPool,
        database::Database,
    },
    config::{Config, LogConfig},
    journal::Journal,
    metrics::NodeMetrics,
    report::Trigger,
    service::{Codec, Component, Erased, ServiceConfig, Slot, Slotted},
    state::{Fencing, StateDir},
};
use confroll_common::sha256_hex;

impl Node<Config> {
    /// Boots a node of the reference service, with its five components
    /// ([`crate::components::reference_components`]). See
    /// [`NodeBuilder::start`].
    pub async fn start(opts: NodeOptions) -> Result<Node, StartError> {
        let grace = opts.grace;
        let mut b = Node::<Config>::builder(opts)?;
        crate::components::reference_components(&mut b, grace);
        b.start().await
    }

    /// The live PostgreSQL pool (`None` with `profile: lite`).
    pub fn database(&self) -> Option<Arc<Database>> {
        self.slot::<DatabaseComponent<Config>>()?.get()
    }

    /// The live Redis pool (`None` with `profile: lite`).
    pub fn redis(&self) -> Option<Arc<RedisPool>> {
        self.slot::<RedisComponent<Config>>()?.get()
    }

    /// The live LLM client (`None` without an `llm` section).
    pub fn llm(&self) -> Option<Arc<LlmClient>> {
        self.slot::<LlmComponent<Config>>()?.get()
    }
}

/// Puts a node together: its options, then its components, then
/// [`NodeBuilder::start`].
pub struct NodeBuilder<C> {
    opts: NodeOptions,
    codec: Codec<C>,
    logger: Arc<Logger>,
    dispatch: tracing::Dispatch,
    metrics: Arc<NodeMetrics>,
    components: Vec<Box<dyn Erased<C>>>,
    slots: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl<C: ServiceConfig> NodeBuilder<C> {
    /// The node's tracing reload handles, for a
    /// [`LoggerComponent`](crate::components::LoggerComponent).
    pub fn logger(&self) -> &Arc<Logger> {
        &self.logger
    }

    /// The node's metrics, for a
    /// [`MetricsComponent`](crate::components::MetricsComponent) or the
    /// service's own series.
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.metrics
    }

    /// Reads documents with `codec` instead of `C`'s own ([`Codec::of`]):
    /// for a node whose format and schema are known at run time only.
    pub fn codec(&mut self, codec: Codec<C>) -> &mut Self {
        self.codec = codec;
        self
    }

    /// Adds a component; returns the slot its live instance is read from.
    /// Components are reported, and prepared results ordered, in the order
    /// they are added.
    pub fn component<R: Component<C>>(&mut self, component: R) -> Slot<R::Instance> {
        let (erased, slot) = Slotted::new(component);
        self.components.push(Box::new(erased));
        self.slots.insert(TypeId::of::<R>(), Box::new(slot.clone()));
        slot
    }

    /// Boots the node: from the state dir's last applied config when there
    /// is one, else from the config file (or `initial_config`). A config
    /// file edited while the node was down is applied right after boot.
    /// Each component's boot instance is built under the reload timeout.
    pub async fn start(self) -> Result<Node<C>, StartError> {
        let NodeBuilder { opts, codec, logger, dispatch, metrics, components, slots } = self;
        let state = opts.state_dir.as_ref().map(StateDir::open).transpose().map_err(StartError::State)?;
        let persisted = match &state {
            Some(s) => s.load_config().map_err(StartError::State)?,
            None => None,
        };
        let fencing = match &state {
            Some(s) => s.load_fencing().map_err(StartError::State)?,
            None => Fencing::default(),
        };
        let journal = state.as_ref().map(|s| Journal::open(s.path())).transpose().map_err(StartError::State)?;
        let file_bytes = match &opts.config_path {
            Some(p) => Some(read_limited(p).await.map_err(|source| StartError::Read { path: p.clone(), source })?),
            None => None,
        };
        let (content, version, source, file_sha, cluster_id) = match (&persisted, &file_bytes, &opts.initial_config) {
            (Some(p), _, _) => {
                (p.content.clone().into_bytes(), p.version, Trigger::Boot, p.file_sha256.clone(), p.cluster_id.clone())
            }
            (None, Some(b), _) => (b.clone(), 1, Trigger::File, Some(sha256_hex(b)), String::new()),
            (None, None, Some(b)) => (b.clone(), 1, Trigger::Api, None, String::new()),
            (None, None, None) => return Err(StartError::NoConfig),
        };
        let config: C = codec.parse(&content)?;
        let timeout = opts.reload_timeout;
        for c in &components {
            match tokio::time::timeout(timeout, c.boot(&config)).await {
                Ok(r) => r.map_err(StartError::Component)?,
                Err(_) => return Err(StartError::Component(ComponentError::PrepareTimedOut(timeout))),
            }
        }
        metrics.config_version.set(version as i64);
        let applied = LiveConfig {
            sha256: sha256_hex(&content),
            content: String::from_utf8(content).unwrap_or_default(),
            config,
            version,
            applied_at: SystemTime::now(),
            source,
            cluster_id,
        };
        let node = Node {
            inner: Arc::new(Inner {
                live: ArcSwap::from_pointee(applied),
                codec,
                components,
                slots,
                logger,
                metrics,
                reload_lock: tokio::sync::Mutex::new(()),
                fencing: std::sync::Mutex::new(fencing),
                last_report: ArcSwapOption::empty(),
                reload_seq: AtomicU64::new(0),
                file_sha: ArcSwapOption::new(file_sha.map(Arc::new)),
                state,
                journal,
                dispatch,
                version_tx: tokio::sync::watch::Sender::new(version),
                opts,
            }),
        };
        if persisted.is_none() {
            node.persist(&node.config());
        }
        // The file changed while we were down: apply it now.
        if let (Some(_), Some(b)) = (&persisted, &file_bytes)
            && node.inner.file_sha.load().as_deref().map(String::as_str) != Some(&sha256_hex(b))
        {
            let report = node.reload_from_file(Trigger::File).await;
            tracing::info!(status = report.status.as_str(), "applied config file changed while the node was down");
        }
        tracing::info!(node = %node.id(), version, "node started");
        Ok(node)
    }
}

impl<C: ServiceConfig> Node<C> {
    /// A builder for a node of service config `C`: add its components, then
    /// start it.
    pub fn builder(opts: NodeOptions) -> Result<NodeBuilder<C>, StartError> {
        let metrics = NodeMetrics::new(&opts.id, &opts.service);
        let (logger, dispatch) =
            Logger::new(&LogConfig::default(), opts.log_target).map_err(|e| StartError::Component(e.into()))?;
        Ok(NodeBuilder {
            opts,
            codec: Codec::of(),
            logger: Arc::new(logger),
            dispatch,
            metrics,
            components: Vec::new(),
            slots: HashMap::new(),
        })
    }
}
