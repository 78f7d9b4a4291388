//! The SDK a service embeds: its own config type ([`ServiceConfig`]) and its
//! own reloadable components ([`Component`]).
//!
//! ```text
//!   your Config: Deserialize + Serialize + JsonSchema + ServiceConfig
//!        │   FORMAT (yaml/json/toml), RESTART_ONLY paths, check() → every violation
//!        ▼
//!   Node::<Config>::builder(opts)
//!        .component(YourComponent)  ──▶ Slot<Instance>: what request handlers read
//!        .start()                   ──▶ Node<Config>: pipeline, triggers, fencing,
//!                                       persistence, status, metrics, rollback
//! ```
//!
//! A component says which config paths drive it, builds an instance for a
//! config (`prepare`: built and checked, not yet visible), checks the live
//! one (`health`) and says whether a failure rolls the reload back
//! (`critical`). The node does the rest: it swaps the new instance in
//! atomically (an `ArcSwap` slot per component), gives the previous one back
//! on rollback, and retires it after in-flight work let go of it (or the
//! component's `grace` ran out), then calls `close`.

use std::{
    any::{Any, TypeId},
    collections::HashMap,
    fmt,
    future::Future,
    marker::PhantomData,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use arc_swap::ArcSwapOption;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Serialize, de::DeserializeOwned};

use confroll_common::{
    document::{self, ConfigError, Format, Violation},
    secrets::SecretPaths,
};
use confroll_proto::v1 as pb;

use crate::components::ComponentError;

/// A service's config type.
///
/// Parsing is strict where the type says so (`#[serde(deny_unknown_fields)]`
/// makes a typo an error that names the field); [`ServiceConfig::check`]
/// adds the rules types cannot express. Secret fields are marked in the
/// schema: `#[schemars(extend("x-confroll-secret" = true))]` (or
/// `"writeOnly": true`) hides the whole value, `"url-password"` only a URL's
/// password. Marked values never reach a diff, a report, a log or the
/// coordinator's history.
pub trait ServiceConfig:
    Serialize + DeserializeOwned + JsonSchema + Clone + fmt::Debug + Send + Sync + 'static
{
    /// The document format of this service (one service, one format).
    const FORMAT: Format = Format::Yaml;

    /// Dotted paths (a section, or one field) whose change needs a process
    /// restart: a reload that touches one is refused, by the node and by the
    /// coordinator at submit.
    const RESTART_ONLY: &'static [&'static str] = &[];

    /// Business rules: every violation, each with its dotted path. Empty
    /// means valid.
    fn check(&self) -> Vec<Violation> {
        Vec::new()
    }
}

/// Parses and checks a document of service config `C`: size, encoding,
/// syntax, types and unknown keys (with their path), then
/// [`ServiceConfig::check`] (every violation).
pub fn parse<C: ServiceConfig>(bytes: &[u8]) -> Result<C, ConfigError> {
    let config: C = document::parse(bytes, C::FORMAT)?;
    let violations = config.check();
    if violations.is_empty() { Ok(config) } else { Err(ConfigError::Rules(violations)) }
}

/// What a node knows of its config type, derived once per type.
#[derive(Clone)]
pub struct Described {
    /// The JSON Schema (draft 2020-12).
    pub schema: serde_json::Value,
    /// The secret fields marked in it.
    pub secrets: SecretPaths,
    /// Dotted paths whose change needs a restart.
    pub restart_only: Vec<String>,
    /// What the node publishes at registration, and its id.
    pub published: (pb::ServiceSchema, String),
}

impl Described {
    /// The description of documents in `format` checked by `schema`.
    pub fn new(schema: serde_json::Value, restart_only: Vec<String>, format: Format) -> Described {
        let secrets = SecretPaths::from_schema(&schema);
        let json_schema = schema.to_string();
        let format = format.to_string();
        let id = confroll_common::schema_id(&json_schema, &restart_only, &format);
        let published = (pb::ServiceSchema { json_schema, restart_only: restart_only.clone(), format }, id);
        Described { schema, secrets, restart_only, published }
    }
}

/// A document parser of a [`Codec`].
type Parser<C> = dyn Fn(&[u8]) -> Result<C, ConfigError> + Send + Sync;

/// How a node reads its documents and what it says about them: the parser,
/// the schema it publishes, the secret marks and the restart-only paths.
///
/// [`Codec::of`] derives it from `C`'s [`ServiceConfig`] impl (what every
/// node built with [`crate::Node::builder`] uses). A node whose format and
/// schema are only known at run time (the `confroll-agent` sidecar: opaque
/// text, a file bundle, or a schema given on its command line) builds one
/// with [`Codec::new`] and gives it to
/// [`crate::NodeBuilder::codec`].
pub struct Codec<C> {
    parse: Arc<Parser<C>>,
    described: Arc<Described>,
}

impl<C> Clone for Codec<C> {
    fn clone(&self) -> Self {
        Codec { parse: self.parse.clone(), described: self.described.clone() }
    }
}

impl<C: ServiceConfig> Codec<C> {
    /// `C`'s own: [`parse`] and [`described`].
    pub fn of() -> Codec<C> {
        Codec { parse: Arc::new(parse::<C>), described: Arc::new(described::<C>().clone()) }
    }
}

impl<C: Serialize> Codec<C> {
    /// A codec that parses with `parse` and publishes `described`.
    pub fn new(
        described: Described,
        parse: impl Fn(&[u8]) -> Result<C, ConfigError> + Send + Sync + 'static,
    ) -> Codec<C> {
        Codec { parse: Arc::new(parse), described: Arc::new(described) }
    }

    /// Parses and checks a document.
    pub fn parse(&self, bytes: &[u8]) -> Result<C, ConfigError> {
        (self.parse)(bytes)
    }

    /// The schema, secret marks and published form.
    pub fn described(&self) -> &Described {
        &self.described
    }

    /// The raw secret values in `config` (for scrubbing error texts).
    pub fn secret_values(&self, config: &C) -> Vec<String> {
        if self.described.secrets.is_empty() {
            return Vec::new();
        }
        let doc = serde_json::to_value(config).unwrap_or_default();
        self.described.secrets.secret_values(&doc)
    }

    /// `config` as JSON with every secret value hidden.
    pub fn redacted_json(&self, config: &C) -> serde_json::Value {
        let mut doc = serde_json::to_value(config).unwrap_or_default();
        self.described.secrets.redact(&mut doc);
        doc
    }
}

/// The schema, secret paths and published form of `C`, computed on first use.
pub fn described<C: ServiceConfig>() -> &'static Described {
    static ALL: OnceLock<Mutex<HashMap<TypeId, &'static Described>>> = OnceLock::new();
    let mut all = ALL.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    all.entry(TypeId::of::<C>()).or_insert_with(|| {
        let schema = serde_json::to_value(schemars::schema_for!(C)).unwrap_or_default();
        let restart_only: Vec<String> = C::RESTART_ONLY.iter().map(|p| (*p).to_owned()).collect();
        // One per config type for the life of the process.
        Box::leak(Box::new(Described::new(schema, restart_only, C::FORMAT)))
    })
}

/// The raw secret values in `config` (for scrubbing error texts).
pub fn secret_values<C: ServiceConfig>(config: &C) -> Vec<String> {
    let doc = serde_json::to_value(config).unwrap_or_default();
    described::<C>().secrets.secret_values(&doc)
}

/// `config` as JSON with every value its schema marks secret hidden: the
/// only form that reaches status and logs.
pub fn redacted_json<C: ServiceConfig>(config: &C) -> serde_json::Value {
    let mut doc = serde_json::to_value(config).unwrap_or_default();
    described::<C>().secrets.redact(&mut doc);
    doc
}

/// A reloadable component of a service with config `C`.
///
/// The node keeps the live instance in a [`Slot`]; request handlers read it
/// there and keep the `Arc` for the whole request, so a swap never pulls an
/// instance out from under in-flight work.
pub trait Component<C>: Send + Sync + 'static {
    /// What a reload builds and swaps (a pool, a client, settings…).
    type Instance: Send + Sync + 'static;

    /// Name in reload reports, health and metric labels.
    fn name(&self) -> &'static str;

    /// Dotted config paths that drive the component: a change at or under
    /// one of them rebuilds it.
    fn paths(&self) -> Vec<String>;

    /// Whether `config` runs the component at all (a disabled component's
    /// slot is empty and it is never health-checked).
    fn enabled(&self, _config: &C) -> bool {
        true
    }

    /// Whether a failure under `config` is critical: a critical component
    /// that fails to prepare, or fails its health check after the swap,
    /// rolls the reload back and makes the node unhealthy. A non-critical
    /// one keeps its previous instance and the reload ends `degraded`.
    fn critical(&self, _config: &C) -> bool {
        false
    }

    /// Builds the boot instance. Defaults to [`Component::prepare`];
    /// override it to start without the dependency (a pool that connects
    /// lazily, so the node can boot while its database is down).
    fn boot(&self, config: &C) -> impl Future<Output = Result<Self::Instance, ComponentError>> + Send {
        self.prepare(config)
    }

    /// Builds and checks a new instance for `config`, without making it
    /// visible. Bounded by the node's reload timeout.
    fn prepare(&self, config: &C) -> impl Future<Output = Result<Self::Instance, ComponentError>> + Send;

    /// A dry-run check of `config` deeper than parsing (a program's own
    /// config test, say), run by [`crate::Node::validate`] (what the
    /// coordinator's submit check calls on the canary) for the components
    /// the candidate affects. Changes nothing. Bounded by the reload timeout.
    fn check(&self, _config: &C) -> impl Future<Output = Result<(), ComponentError>> + Send {
        async { Ok(()) }
    }

    /// Puts the instance now in its slot into effect outside the process,
    /// for components whose state lives elsewhere (files a program reads,
    /// a program to signal): called after the swap of a reload, and again
    /// after a rollback swapped the previous instance back. A failure after
    /// a reload counts as a failed health check (a critical component rolls
    /// the reload back, which activates the previous instance again).
    /// Bounded by the reload timeout.
    fn activate(&self, _live: Option<Arc<Self::Instance>>) -> impl Future<Output = Result<(), ComponentError>> + Send {
        async { Ok(()) }
    }

    /// Live health of the instance in service. Bounded by the reload timeout.
    fn health(&self, _live: &Self::Instance) -> impl Future<Output = Result<(), ComponentError>> + Send {
        async { Ok(()) }
    }

    /// Called after every swap (boot, reload, rollback) with the instance
    /// now in service, for components that push settings somewhere else
    /// (a log filter, a registry).
    fn swapped(&self, _live: Option<&Arc<Self::Instance>>) {}

    /// How long a retired instance may keep serving in-flight work before
    /// [`Component::close`] runs anyway.
    fn grace(&self) -> Duration {
        Duration::ZERO
    }

    /// Closes a retired instance once nobody else holds it (or the grace
    /// period ended).
    fn close(&self, _retired: Arc<Self::Instance>) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Where a component's live instance is: cheap to clone, wait-free to read.
pub struct Slot<T> {
    cell: Arc<ArcSwapOption<T>>,
}

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Slot { cell: self.cell.clone() }
    }
}

impl<T> Slot<T> {
    fn new() -> Self {
        Slot { cell: Arc::new(ArcSwapOption::empty()) }
    }

    /// The instance in service (`None`: the component is disabled). Keep
    /// the `Arc` for the whole request.
    pub fn get(&self) -> Option<Arc<T>> {
        self.cell.load_full()
    }
}

/// An instance built by `prepare`, or one taken out by a swap.
pub(crate) struct Staged(Box<dyn Any + Send + Sync>);

/// The object-safe form of a [`Component`] the runtime drives.
pub(crate) trait Erased<C>: Send + Sync {
    fn name(&self) -> &'static str;
    fn paths(&self) -> &[String];
    fn enabled(&self, config: &C) -> bool;
    fn critical(&self, config: &C) -> bool;
    fn boot<'a>(&'a self, config: &'a C) -> BoxFuture<'a, Result<(), ComponentError>>;
    fn prepare<'a>(&'a self, config: &'a C) -> BoxFuture<'a, Result<Staged, ComponentError>>;
    fn swap(&self, staged: Staged) -> Staged;
    fn retire(&self, staged: Staged);
    fn check<'a>(&'a self, config: &'a C) -> BoxFuture<'a, Result<(), ComponentError>>;
    fn activate(&self) -> BoxFuture<'_, Result<(), ComponentError>>;
    fn health(&self) -> BoxFuture<'_, Result<(), ComponentError>>;
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// A [`Component`] with its slot.
pub(crate) struct Slotted<C, R: Component<C>> {
    component: Arc<R>,
    slot: Slot<R::Instance>,
    paths: Vec<String>,
    _config: PhantomData<fn(&C)>,
}

impl<C: 'static, R: Component<C>> Slotted<C, R> {
    pub(crate) fn new(component: R) -> (Self, Slot<R::Instance>) {
        let slot = Slot::new();
        let paths = component.paths();
        (Slotted { component: Arc::new(component), slot: slot.clone(), paths, _config: PhantomData }, slot)
    }
}

type Held<I> = Option<Arc<I>>;

impl<C: Sync + 'static, R: Component<C>> Erased<C> for Slotted<C, R> {
    fn name(&self) -> &'static str {
        self.component.name()
    }

    fn paths(&self) -> &[String] {
        &self.paths
    }

    fn enabled(&self, config: &C) -> bool {
        self.component.enabled(config)
    }

    fn critical(&self, config: &C) -> bool {
        self.component.enabled(config) && self.component.critical(config)
    }

    fn boot<'a>(&'a self, config: &'a C) -> BoxFuture<'a, Result<(), ComponentError>> {
        Box::pin(async move {
            let instance = match self.component.enabled(config) {
                true => Some(Arc::new(self.component.boot(config).await?)),
                false => None,
            };
            self.slot.cell.store(instance.clone());
            self.component.swapped(instance.as_ref());
            Ok(())
        })
    }

    fn prepare<'a>(&'a self, config: &'a C) -> BoxFuture<'a, Result<Staged, ComponentError>> {
        Box::pin(async move {
            let instance: Held<R::Instance> = match self.component.enabled(config) {
                true => Some(Arc::new(self.component.prepare(config).await?)),
                false => None,
            };
            Ok(Staged(Box::new(instance)))
        })
    }

    fn swap(&self, staged: Staged) -> Staged {
        let next = *staged.0.downcast::<Held<R::Instance>>().unwrap_or_else(|_| Box::new(None));
        let previous = self.slot.cell.swap(next.clone());
        self.component.swapped(next.as_ref());
        Staged(Box::new(previous))
    }

    fn retire(&self, staged: Staged) {
        let Ok(held) = staged.0.downcast::<Held<R::Instance>>() else { return };
        let Some(item) = *held else { return };
        let (component, grace) = (self.component.clone(), self.component.grace());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + grace;
            while Arc::strong_count(&item) > 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let holders = Arc::strong_count(&item) - 1;
            if holders > 0 && !grace.is_zero() {
                tracing::warn!(
                    component = component.name(),
                    holders,
                    "grace period over; closing a retired instance still in use"
                );
            }
            component.close(item).await;
        });
    }

    fn check<'a>(&'a self, config: &'a C) -> BoxFuture<'a, Result<(), ComponentError>> {
        Box::pin(async move {
            match self.component.enabled(config) {
                true => self.component.check(config).await,
                false => Ok(()),
            }
        })
    }

    fn activate(&self) -> BoxFuture<'_, Result<(), ComponentError>> {
        Box::pin(self.component.activate(self.slot.get()))
    }

    fn health(&self) -> BoxFuture<'_, Result<(), ComponentError>> {
        Box::pin(async move {
            match self.slot.get() {
                Some(live) => self.component.health(&live).await,
                None => Ok(()),
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(live) = self.slot.cell.swap(None) {
                self.component.close(live).await;
            }
        })
    }
}
