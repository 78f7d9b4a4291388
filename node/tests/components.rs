//! Component swaps: what each reload touches, what it leaves alone, and how
//! failures of critical and non-critical components end.

mod common;

use std::{sync::Arc, time::Duration};

use axum::{Json, Router, routing::get, routing::post};
use common::{Cfg, RedisServer, Served, dead_port};
use confroll_node::ReloadStatus;

/// A small OpenAI-style endpoint: `/v1/models`, and `/v1/chat/completions`
/// that answers with the model it was asked for. Each chat call is announced
/// on the returned receiver as it arrives, then held until the returned gate
/// is opened (`send(true)`); the gate stays open after that.
async fn llm_endpoint() -> (String, tokio::sync::mpsc::UnboundedReceiver<()>, tokio::sync::watch::Sender<bool>) {
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let app = Router::new().route("/v1/models", get(|| async { Json(serde_json::json!({"data": []})) })).route(
        "/v1/chat/completions",
        post(move |Json(body): Json<serde_json::Value>| {
            let (arrived_tx, mut gate_rx) = (arrived_tx.clone(), gate_rx.clone());
            async move {
                let _ = arrived_tx.send(());
                gate_rx.wait_for(|open| *open).await.expect("gate sender kept by the test");
                Json(serde_json::json!({
                    "model": body["model"],
                    "choices": [{"message": {"role": "assistant", "content": format!("echo: {}", body["messages"][0]["content"])}}]
                }))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}/v1"), arrived, gate)
}

#[tokio::test]
async fn llm_calls_in_flight_finish_on_the_old_client() {
    let (endpoint, mut arrived, gate) = llm_endpoint().await;
    let mut cfg = Cfg::standard();
    cfg.llm = Some((endpoint.clone(), "model-a".into()));
    let s = Served::start(&cfg).await;
    let db_before = s.node.database().unwrap();

    // A call starts on model-a …
    let url = s.url("/api/v2/llm/chat");
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new().post(url).json(&serde_json::json!({"prompt": "hi"})).send().await.unwrap()
    });
    tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .expect("timed out after 10s waiting for the first chat call to reach the LLM endpoint")
        .expect("LLM endpoint gone");
    // … the model changes while it is held at the endpoint …
    cfg.llm = Some((endpoint, "model-b".into()));
    let report = s.node.apply(cfg.yaml()).await;
    assert_eq!(report.status, ReloadStatus::Applied, "{report:?}");
    assert_eq!(report.components.iter().map(|c| c.component).collect::<Vec<_>>(), ["llm"]);
    // … and, let go, it still completes, on model-a.
    gate.send(true).unwrap();
    let r = in_flight.await.unwrap();
    assert_eq!(r.status(), 200);
    let reply: serde_json::Value = r.json().await.unwrap();
    assert_eq!(reply["model"], "model-a");
    assert_eq!(reply["content"], "echo: \"hi\"");
    // New calls use model-b; the database pool was never touched.
    assert_eq!(s.node.llm().unwrap().chat("again").await.unwrap().model, "model-b");
    assert!(Arc::ptr_eq(&db_before, &s.node.database().unwrap()));
}

#[tokio::test]
async fn log_level_and_format_switch_at_runtime() {
    let s = Served::start(&Cfg::standard()).await;
    let debug_on = || tracing::dispatcher::with_default(s.node.dispatch(), || tracing::enabled!(tracing::Level::DEBUG));
    assert!(!debug_on());
    let mut cfg = Cfg::standard();
    cfg.level = "debug";
    cfg.format = "json";
    let report = s.node.apply(cfg.yaml()).await;
    assert_eq!(report.status, ReloadStatus::Applied);
    assert!(debug_on(), "debug events still filtered after the level change");
    assert_eq!(s.node.logger().settings().format, confroll_node::config::LogFormat::Json);
    cfg.level = "warn";
    s.node.apply(cfg.yaml()).await;
    assert!(!tracing::dispatcher::with_default(s.node.dispatch(), || tracing::enabled!(tracing::Level::INFO)));
}

#[tokio::test]
async fn metrics_can_be_disabled_and_relabelled() {
    let mut cfg = Cfg::standard();
    let s = Served::start(&cfg).await;
    let metrics = || async { reqwest::get(s.url("/metrics")).await.unwrap() };
    let body = metrics().await.text().await.unwrap();
    assert!(body.contains("confroll_config_version{node=\"test-node\",service=\"default\"} 1"), "{body}");

    cfg.labels = vec![("cluster".into(), "eu-1".into()), ("team".into(), "platform".into())];
    assert_eq!(s.node.apply(cfg.yaml()).await.status, ReloadStatus::Applied);
    let body = metrics().await.text().await.unwrap();
    assert!(
        body.contains(
            "confroll_config_version{cluster=\"eu-1\",node=\"test-node\",service=\"default\",team=\"platform\"} 2"
        ),
        "{body}"
    );

    cfg.metrics_enabled = false;
    assert_eq!(s.node.apply(cfg.yaml()).await.status, ReloadStatus::Applied);
    assert_eq!(metrics().await.status(), 404);
    let before = s.node.metrics().http_requests.with_label_values(&["/work", "200"]).get();
    assert_eq!(s.work().await.status(), 200);
    assert_eq!(
        s.node.metrics().http_requests.with_label_values(&["/work", "200"]).get(),
        before,
        "counted while disabled"
    );

    cfg.metrics_enabled = true;
    assert_eq!(s.node.apply(cfg.yaml()).await.status, ReloadStatus::Applied);
    assert_eq!(metrics().await.status(), 200);
}

#[tokio::test]
async fn a_config_only_change_touches_no_component() {
    let s = Served::start(&Cfg::standard()).await;
    let (db, redis) = (s.node.database().unwrap(), s.node.redis().unwrap());
    let mut cfg = Cfg::standard();
    cfg.ttl = "90s";
    let report = s.node.apply(cfg.yaml()).await;
    assert_eq!(report.status, ReloadStatus::Applied);
    assert!(report.components.is_empty(), "{report:?}");
    assert_eq!(report.diff.len(), 1);
    assert_eq!(report.diff[0].path, "cache.ttl");
    assert_eq!(s.node.config().config.cache.ttl.0, Duration::from_secs(90));
    assert!(Arc::ptr_eq(&db, &s.node.database().unwrap()));
    assert!(Arc::ptr_eq(&redis, &s.node.redis().unwrap()));
    // Six phases were timed; rollback never ran.
    let phases: Vec<&str> = report.phases.iter().map(|p| p.phase).collect();
    assert_eq!(phases, ["load", "validate", "diff", "apply", "health"]);
    let mut cfg2 = cfg.clone();
    cfg2.max_conns = 7;
    let report = s.node.apply(cfg2.yaml()).await;
    let phases: Vec<&str> = report.phases.iter().map(|p| p.phase).collect();
    assert_eq!(phases, ["load", "validate", "diff", "apply", "reload", "health"]);
    assert!(report.total_ms >= report.phases.iter().map(|p| p.ms).sum::<f64>() * 0.99);
}

#[tokio::test]
async fn a_critical_health_failure_after_the_swap_rolls_everything_back() {
    // This node's Redis is a server of the test's own, so it can be killed.
    let mut redis = RedisServer::start();
    let mut cfg = Cfg::standard();
    cfg.redis_url = redis.url();
    let s = Served::start(&cfg).await;
    assert_eq!(s.work().await.status(), 200);
    let (redis_before, log_before) = (s.node.redis().unwrap(), s.node.logger().settings());

    redis.kill();
    // Only the logger changes, and it prepares fine; the health phase then
    // finds Redis down, so the logger swap is undone and the config restored.
    cfg.level = "debug";
    let report = s.node.apply(cfg.yaml()).await;
    assert_eq!(report.status, ReloadStatus::RolledBack, "{report:?}");
    assert!(report.error.as_deref().unwrap().contains("redis health failed"), "{report:?}");
    assert_eq!(report.component("logger").unwrap().status, "rolled_back");
    assert_eq!(s.node.config().version, 1);
    assert_eq!(*s.node.logger().settings(), *log_before);
    assert!(Arc::ptr_eq(&redis_before, &s.node.redis().unwrap()));
    let text = s.node.metrics().render().unwrap();
    assert!(
        text.contains(
            "confroll_config_reload_rollbacks_total{node=\"test-node\",reason=\"health\",service=\"default\"} 1"
        ),
        "{text}"
    );

    // A pool resize while Redis is down fails to prepare: rolled back, and
    // the old pool is kept.
    cfg.level = "info";
    cfg.pool_size = 9;
    let report = s.node.apply(cfg.yaml()).await;
    assert_eq!(report.status, ReloadStatus::RolledBack);
    assert_eq!(report.component("redis").unwrap().status, "failed");
    assert!(Arc::ptr_eq(&redis_before, &s.node.redis().unwrap()));

    // Redis comes back on the same port: the kept pool reconnects, no reload needed.
    let _redis2 = common::RedisServer::start_on(redis.port);
    common::eventually(Duration::from_secs(10), "/work to recover", || async {
        (s.work().await.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_noncritical_failure_degrades_without_rollback() {
    let s = Served::start(&Cfg::standard()).await;
    let mut cfg = Cfg::standard();
    cfg.llm = Some((format!("http://127.0.0.1:{}/v1", dead_port()), "m".into()));
    let report = s.node.apply(cfg.yaml()).await;
    assert_eq!(report.status, ReloadStatus::Degraded, "{report:?}");
    assert!(report.error.as_deref().unwrap().contains("llm"), "{report:?}");
    // The config is applied; the node serves it.
    assert_eq!(s.node.config().version, 2);
    assert_eq!(s.work().await.json::<serde_json::Value>().await.unwrap()["version"], 2);
}

#[tokio::test]
async fn concurrent_reloads_never_overlap() {
    let s = Arc::new(Served::start(&Cfg::standard()).await);
    let mut tasks = Vec::new();
    for i in 0..10u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut cfg = Cfg::standard();
            cfg.max_conns = 2 + i;
            s.node.apply(cfg.yaml()).await
        }));
    }
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await.unwrap());
    }
    reports.sort_by_key(|r| r.id);
    // Each reload started from what the previous one left: a strict chain.
    for pair in reports.windows(2) {
        assert_eq!(pair[1].from_version, pair[0].to_version, "{:?}", pair);
    }
    assert!(reports.iter().all(|r| r.status == ReloadStatus::Applied));
    assert_eq!(s.node.config().version, 11);
}

#[tokio::test]
async fn secrets_never_reach_diffs_or_status() {
    let mut cfg = Cfg::standard();
    cfg.db_url = cfg.db_url.replacen("postgres@", "postgres:first-secret@", 1);
    let s = Served::start(&cfg).await;
    cfg.db_url = cfg.db_url.replace("first-secret", "second-secret");
    let report = s.node.apply(cfg.yaml()).await;
    assert_eq!(report.status, ReloadStatus::Applied, "{report:?}");
    // The password change reloaded the pool, but the diff shows no password.
    assert_eq!(report.components[0].component, "database");
    assert_eq!(report.diff[0].path, "database.url");
    let status = reqwest::get(s.url("/api/v2/config/status")).await.unwrap().text().await.unwrap();
    for text in [format!("{report:?}"), serde_json::to_string(&report).unwrap(), status.clone()] {
        assert!(!text.contains("first-secret") && !text.contains("second-secret"), "secret leaked: {text}");
    }
    assert!(status.contains("postgres:***@"), "{status}");
    let v = s.node.validate(cfg.yaml().replace("second-secret", "third-secret").as_bytes()).await;
    assert!(!format!("{v:?}").contains("third-secret"));
}

#[tokio::test]
async fn a_push_abandoned_by_its_caller_still_finishes_its_rollback() {
    let s = Served::start(&Cfg::standard()).await;
    let before_db = s.node.database().unwrap();
    // A "database" that accepts connections and never answers: the new pool
    // hangs in its connect until acquire_timeout (2 s).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            held.push(sock);
        }
    });
    let mut cfg = Cfg::standard();
    cfg.db_url = format!("postgres://app:pw@127.0.0.1:{port}/postgres");
    let push = common::push(cfg.yaml(), 50, 1);
    // The caller gives up after 200 ms (as a pusher's RPC deadline would).
    let gave_up = tokio::time::timeout(Duration::from_millis(200), s.node.push(push)).await;
    assert!(gave_up.is_err(), "the push should still be running");
    // The reload goes on and ends rolled back: old version, old pool.
    let report = common::eventually(Duration::from_secs(15), "the abandoned reload to finish", || async {
        s.node.last_report().filter(|r| r.to_version == 1 || r.status == ReloadStatus::RolledBack).map(|r| (*r).clone())
    })
    .await;
    assert_eq!(report.status, ReloadStatus::RolledBack, "{report:?}");
    assert_eq!(s.node.config().version, 1);
    assert!(Arc::ptr_eq(&before_db, &s.node.database().unwrap()));
    assert_eq!(s.work().await.status(), 200);
}
