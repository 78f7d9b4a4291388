//! The SDK with a service's own config type and components, in process (no
//! servers): TOML parsing with every violation, restart-only paths, only
//! the affected components reloaded, a critical health failure rolled back
//! (config and instance), a non-critical failure degraded, a retired
//! instance closed only after in-flight work let go of it, secrets scrubbed
//! from errors and hidden in diffs, and the schema a node publishes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use confroll_node::{
    Component, ComponentError, Format, Node, NodeOptions, ServiceConfig, Slot, Violation,
    report::ReloadStatus,
    service::{described, parse},
};
use serde::{Deserialize, Serialize};

const TOKEN: &str = "tok-9f8e7d-secret";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Cfg {
    greeting: String,
    limit: u32,
    #[schemars(extend("x-confroll-secret" = true))]
    token: String,
    port: u16,
}

impl ServiceConfig for Cfg {
    const FORMAT: Format = Format::Toml;
    const RESTART_ONLY: &'static [&'static str] = &["port"];
    fn check(&self) -> Vec<Violation> {
        let mut v = Vec::new();
        if self.greeting.is_empty() {
            v.push(Violation::new("greeting", "must not be empty"));
        }
        if self.limit > 1000 {
            v.push(Violation::new("limit", "must be at most 1000"));
        }
        v
    }
}

fn doc(greeting: &str, limit: u32, token: &str, port: u16) -> String {
    format!("greeting = \"{greeting}\"\nlimit = {limit}\ntoken = \"{token}\"\nport = {port}\n")
}

/// Critical; its backend takes limits below 500 only, and its health error
/// quotes the token (the node must scrub it).
struct Limiter {
    closed: Arc<AtomicUsize>,
}

struct Limit {
    n: u32,
    token: String,
}

impl Component<Cfg> for Limiter {
    type Instance = Limit;
    fn name(&self) -> &'static str {
        "limiter"
    }
    fn paths(&self) -> Vec<String> {
        vec!["limit".into(), "token".into()]
    }
    fn critical(&self, _: &Cfg) -> bool {
        true
    }
    async fn prepare(&self, c: &Cfg) -> Result<Limit, ComponentError> {
        Ok(Limit { n: c.limit, token: c.token.clone() })
    }
    async fn health(&self, live: &Limit) -> Result<(), ComponentError> {
        match live.n < 500 {
            true => Ok(()),
            false => Err(ComponentError::retryable(format!("backend refuses {} with key {}", live.n, live.token))),
        }
    }
    fn grace(&self) -> Duration {
        Duration::from_secs(30)
    }
    async fn close(&self, _: Arc<Limit>) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Not critical: a greeting of "fail" cannot be built.
struct Greeter;

impl Component<Cfg> for Greeter {
    type Instance = String;
    fn name(&self) -> &'static str {
        "greeter"
    }
    fn paths(&self) -> Vec<String> {
        vec!["greeting".into()]
    }
    async fn prepare(&self, c: &Cfg) -> Result<String, ComponentError> {
        match c.greeting.as_str() {
            "fail" => Err(ComponentError::fatal("cannot greet like that")),
            g => Ok(g.to_owned()),
        }
    }
}

async fn start() -> (Node<Cfg>, Slot<Limit>, Slot<String>, Arc<AtomicUsize>) {
    let mut opts = NodeOptions::new("sdk-1");
    opts.initial_config = Some(doc("hello", 10, TOKEN, 8080).into_bytes());
    let mut b = Node::<Cfg>::builder(opts).unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let limiter = b.component(Limiter { closed: closed.clone() });
    let greeter = b.component(Greeter);
    (b.start().await.unwrap(), limiter, greeter, closed)
}

#[tokio::test]
async fn only_affected_components_reload_and_a_retired_one_closes_after_its_last_request() {
    let (node, limiter, greeter, closed) = start().await;
    assert_eq!(limiter.get().unwrap().n, 10);
    assert_eq!(greeter.get().unwrap().as_str(), "hello");
    // A request in flight holds the current limiter.
    let in_flight = limiter.get().unwrap();

    let r = node.apply(doc("hello", 20, TOKEN, 8080)).await;
    assert_eq!(r.status, ReloadStatus::Applied, "{r:?}");
    let touched: Vec<_> = r.components.iter().map(|c| (c.component, c.status)).collect();
    assert_eq!(touched, [("limiter", "reloaded")], "the greeter is not touched");
    assert_eq!(limiter.get().unwrap().n, 20);
    assert_eq!(node.config().config.limit, 20);

    // The retired limiter is closed only once the request let go of it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(closed.load(Ordering::SeqCst), 0, "closed under a request in flight");
    assert_eq!(in_flight.n, 10, "the request keeps the instance it started with");
    drop(in_flight);
    confroll_testkit::wait::eventually(Duration::from_secs(5), "the retired limiter closed", || async {
        (closed.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_critical_health_failure_rolls_back_config_and_instance_with_the_secret_scrubbed() {
    let (node, limiter, _, _) = start().await;
    let r = node.apply(doc("hello", 900, TOKEN, 8080)).await;
    assert_eq!(r.status, ReloadStatus::RolledBack, "{r:?}");
    let e = r.error.unwrap();
    assert!(e.contains("limiter health failed") && e.contains("backend refuses 900"), "{e}");
    assert!(!e.contains(TOKEN), "the secret reached the report: {e}");
    assert_eq!(limiter.get().unwrap().n, 10, "the previous instance is back");
    assert_eq!(node.config().config.limit, 10, "the previous config is back");
    assert_eq!(node.config().version, 1);
    assert!(node.health().await.healthy);
}

#[tokio::test]
async fn a_non_critical_failure_degrades_and_keeps_the_previous_instance() {
    let (node, _, greeter, _) = start().await;
    let r = node.apply(doc("fail", 10, TOKEN, 8080)).await;
    assert_eq!(r.status, ReloadStatus::Degraded, "{r:?}");
    assert!(r.error.unwrap().contains("greeter: cannot greet like that"));
    assert_eq!(greeter.get().unwrap().as_str(), "hello", "the previous greeter stays");
    assert_eq!(node.config().config.greeting, "fail", "the new config runs");
}

#[tokio::test]
async fn bad_input_is_refused_with_every_violation_and_changes_nothing() {
    let (node, limiter, _, _) = start().await;
    let refused = [
        (doc("", 5000, TOKEN, 8080), vec!["`greeting` must not be empty", "`limit` must be at most 1000"]),
        (doc("hello", 10, TOKEN, 9090), vec!["`port` is restart-only"]),
        (format!("{}extra = 1\n", doc("hello", 10, TOKEN, 8080)), vec!["extra"]),
        ("greeting: hello\nlimit: 10\n".to_owned(), vec!["TOML"]),
    ];
    for (content, needles) in refused {
        let r = node.apply(content.clone()).await;
        assert_eq!(r.status, ReloadStatus::Rejected, "{content}: {r:?}");
        let e = r.error.unwrap_or_default();
        for n in needles {
            assert!(e.contains(n), "`{n}` missing from: {e}");
        }
        assert!(!e.contains(TOKEN), "{e}");
    }
    assert_eq!(node.config().version, 1);
    assert_eq!(limiter.get().unwrap().n, 10);
    // The dry run says the same without running anything.
    let v = node.validate(doc("hello", 20, "other-token", 8080).as_bytes()).await;
    assert!(v.errors.is_empty(), "{:?}", v.errors);
    assert_eq!(v.affected, ["limiter"]);
    let shown = format!("{:?}", v.diff);
    assert!(shown.contains("token") && !shown.contains("other-token") && !shown.contains(TOKEN), "{shown}");
}

#[test]
fn the_published_schema_carries_format_restart_only_and_secret_marks() {
    let d = described::<Cfg>();
    let paths: Vec<String> = d.secrets.paths().iter().map(ToString::to_string).collect();
    assert_eq!(paths, ["token"]);
    let (schema, id) = &d.published;
    assert_eq!(schema.format, "toml");
    assert_eq!(schema.restart_only, ["port"]);
    assert_eq!(*id, confroll_common::schema_id(&schema.json_schema, &schema.restart_only, "toml"));
    let e = parse::<Cfg>(b"greeting = 1\n").unwrap_err().to_string();
    assert!(e.contains("greeting"), "{e}");
}

#[tokio::test]
async fn the_status_routes_serve_any_service_with_its_secrets_hidden() {
    let (node, _, _, _) = start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = confroll_node::http::status_routes(node.clone());
    let server = tokio::spawn(async move { axum::serve(listener, routes).await });
    let get = |path: &str| reqwest::get(format!("http://{addr}{path}"));
    let status: serde_json::Value = get("/api/v2/config/status").await.unwrap().json().await.unwrap();
    assert_eq!(status["config"]["limit"], 10);
    assert_eq!(status["config"]["token"], "<redacted>");
    assert!(!status.to_string().contains(TOKEN));
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    let health: serde_json::Value = ready.json().await.unwrap();
    let names: Vec<&str> =
        health["components"].as_array().unwrap().iter().map(|c| c["component"].as_str().unwrap()).collect();
    assert_eq!(names, ["limiter", "greeter"]);
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains("confroll_config_version"), "{metrics}");
    server.abort();
}

/// A component whose state lives outside the process (what
/// `confroll-agent` does with a program's files): the dry run runs its
/// `check`, and its `activate` puts an instance into effect, after a swap
/// and again after a rollback.
struct Outside {
    /// What is "in effect" outside: every activation, in order.
    effects: Arc<parking_lot::Mutex<Vec<u32>>>,
}

impl Component<Cfg> for Outside {
    type Instance = u32;
    fn name(&self) -> &'static str {
        "outside"
    }
    fn paths(&self) -> Vec<String> {
        vec![String::new()]
    }
    fn critical(&self, _: &Cfg) -> bool {
        true
    }
    async fn check(&self, c: &Cfg) -> Result<(), ComponentError> {
        match c.limit {
            13 => Err(ComponentError::fatal("the outside check refuses 13")),
            _ => Ok(()),
        }
    }
    async fn prepare(&self, c: &Cfg) -> Result<u32, ComponentError> {
        Ok(c.limit)
    }
    async fn activate(&self, live: Option<Arc<u32>>) -> Result<(), ComponentError> {
        let n = *live.unwrap();
        self.effects.lock().push(n);
        match n {
            666 => Err(ComponentError::retryable("the program did not take 666")),
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn a_component_with_outside_state_is_checked_activated_and_restored() {
    let mut opts = NodeOptions::new("sdk-2");
    opts.initial_config = Some(doc("hello", 10, TOKEN, 8080).into_bytes());
    let mut b = Node::<Cfg>::builder(opts).unwrap();
    let effects = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let slot = b.component(Outside { effects: effects.clone() });
    let node = b.start().await.unwrap();

    // The dry run runs the component's check and names it.
    let v = node.validate(doc("hello", 13, TOKEN, 8080).as_bytes()).await;
    assert_eq!(v.errors, ["outside: the outside check refuses 13"]);
    assert!(effects.lock().is_empty(), "a dry run changes nothing");

    // A reload activates the new instance.
    let r = node.apply(doc("hello", 20, TOKEN, 8080)).await;
    assert_eq!(r.status, ReloadStatus::Applied, "{r:?}");
    assert_eq!(*effects.lock(), [20]);

    // An activation that fails rolls back, and the previous instance is
    // put into effect again.
    let r = node.apply(doc("hello", 666, TOKEN, 8080)).await;
    assert_eq!(r.status, ReloadStatus::RolledBack, "{r:?}");
    assert!(r.error.unwrap().contains("the program did not take 666"));
    assert_eq!(*effects.lock(), [20, 666, 20]);
    assert_eq!(*slot.get().unwrap(), 20);
    assert_eq!(node.config().config.limit, 20);
}

#[tokio::test]
async fn a_change_written_before_the_file_watch_is_armed_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, doc("hello", 10, TOKEN, 8080)).unwrap();
    let mut opts = NodeOptions::new("sdk-3");
    opts.config_path = Some(path.clone());
    let mut b = Node::<Cfg>::builder(opts).unwrap();
    b.component(Greeter);
    let node = b.start().await.unwrap();

    // Written after the node read the file, before the watch exists: no
    // event will ever tell of it.
    std::fs::write(&path, doc("bonjour", 10, TOKEN, 8080)).unwrap();
    let watch = confroll_node::triggers::FileWatch::arm(path.clone()).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut versions = node.watch_version();
    let task = tokio::spawn(watch.run(node.clone(), Duration::from_millis(50), stop.clone()));
    // Bounded wait for the catch-up reload (no event, no sleep in between).
    tokio::time::timeout(Duration::from_secs(10), versions.wait_for(|v| *v == 2)).await.unwrap().unwrap();
    assert_eq!(node.config().config.greeting, "bonjour");
    assert_eq!(node.last_report().unwrap().trigger, confroll_node::report::Trigger::File);
    stop.cancel();
    task.await.unwrap().unwrap();
}
