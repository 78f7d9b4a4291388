//! The reference service as a real process: triggers (SIGHUP, file watch,
//! NodeAgent pushes), the state dir across restarts, graceful shutdown.

mod common;

use std::time::Duration;

use common::{Cfg, NodeProcess, eventually};
use confroll_proto::v1::{self as pb, node_agent_client::NodeAgentClient};

async fn status(p: &NodeProcess) -> serde_json::Value {
    reqwest::get(p.url("/api/v2/config/status")).await.unwrap().json().await.unwrap()
}

async fn wait_version(p: &NodeProcess, v: u64) -> serde_json::Value {
    eventually(Duration::from_secs(10), &format!("version {v}"), || async {
        let s = status(p).await;
        // The version is live from the apply phase on; wait for the finished report too.
        (s["version"] == v && s["last_reload"]["to_version"] == v).then_some(s)
    })
    .await
}

#[tokio::test]
async fn sighup_reloads_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let mut cfg = Cfg::standard();
    std::fs::write(&path, cfg.yaml()).unwrap();
    let p = NodeProcess::spawn(&path, &dir.path().join("state"), "n1", &["--no-watch"]);
    assert_eq!(status(&p).await["version"], 1);
    cfg.max_conns = 9;
    std::fs::write(&path, cfg.yaml()).unwrap();
    // Deliberate sleep: no reload may happen in this window (nothing to wait for).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&p).await["version"], 1, "reloaded without a trigger (--no-watch)");
    p.signal("HUP");
    let s = wait_version(&p, 2).await;
    assert_eq!(s["last_reload"]["trigger"], "signal");
    assert_eq!(s["last_reload"]["status"], "applied");
    assert_eq!(s["config"]["database"]["max_conns"], 9);
    for phase in ["load", "validate", "diff", "apply", "reload", "health"] {
        assert!(s["last_reload"]["phases"].as_array().unwrap().iter().any(|p| p["phase"] == phase), "{s}");
    }
    assert!(p.terminate().await.success());
}

#[tokio::test]
async fn the_file_watch_reloads_on_change_and_ignores_unchanged_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let mut cfg = Cfg::standard();
    std::fs::write(&path, cfg.yaml()).unwrap();
    let p = NodeProcess::spawn(&path, &dir.path().join("state"), "n1", &[]);
    cfg.ttl = "40s";
    std::fs::write(&path, cfg.yaml()).unwrap();
    let s = wait_version(&p, 2).await;
    assert_eq!(s["last_reload"]["trigger"], "file");
    let reloads = s["last_reload"]["id"].as_u64().unwrap();

    // The same bytes written again (twice, and by rename as editors do): nothing happens.
    std::fs::write(&path, cfg.yaml()).unwrap();
    let tmp = dir.path().join("c.yaml.tmp");
    std::fs::write(&tmp, cfg.yaml()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    // Deliberate sleep: the 100 ms debounce passes and no reload may follow (nothing to wait for).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = status(&p).await;
    assert_eq!(s["version"], 2);
    assert_eq!(s["last_reload"]["id"].as_u64().unwrap(), reloads, "an unchanged write ran a reload");

    // A rename-save with new content is seen.
    cfg.ttl = "41s";
    std::fs::write(&tmp, cfg.yaml()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_version(&p, 3).await;

    // A broken save is refused; the node keeps serving version 3.
    std::fs::write(&path, "log: {level: info\ndatabase: [").unwrap();
    let s = eventually(Duration::from_secs(10), "rejection", || async {
        let s = status(&p).await;
        (s["last_reload"]["status"] == "rejected").then_some(s)
    })
    .await;
    assert_eq!(s["version"], 3);
    assert!(s["last_reload"]["error"].as_str().unwrap().contains("not valid YAML"), "{s}");
    assert_eq!(reqwest::get(p.url("/work")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn pushes_are_fenced_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (path, state) = (dir.path().join("c.yaml"), dir.path().join("state"));
    let mut cfg = Cfg::standard();
    std::fs::write(&path, cfg.yaml()).unwrap();
    let p = NodeProcess::spawn(&path, &state, "n1", &["--no-watch"]);
    let mut agent = NodeAgentClient::connect(p.agent_url()).await.unwrap();

    // Validate changes nothing and names the problem.
    let bad = cfg.yaml().replace("min_conns: 1", "min_conns: 50");
    let v = agent.validate(common::validate_request(&bad, "n1")).await.unwrap().into_inner();
    assert!(!v.valid);
    assert!(v.errors[0].contains("database.min_conns"), "{v:?}");
    cfg.max_conns = 6;
    let v = agent.validate(common::validate_request(&cfg.yaml(), "n1")).await.unwrap();
    let v = v.into_inner();
    assert!(v.valid, "{v:?}");
    assert_eq!(v.affected_components, ["database"]);
    assert_eq!(v.diff[0].path, "database.max_conns");
    assert_eq!(status(&p).await["version"], 1);

    let push = |content: String, version: u64, token: u64| {
        let r = pb::ApplyRequest { service: "default".into(), ..common::apply_request(content, version, token) };
        common::signed(r, "n1")
    };
    let r = agent.apply(push(cfg.yaml(), 42, 1000)).await.unwrap().into_inner();
    assert!(r.applied, "{r:?}");
    assert_eq!(r.version, 42);
    assert_eq!(r.report.unwrap().status, "applied");

    // Restart: back on version 42, and token 1000 is remembered.
    drop(agent);
    assert!(p.terminate().await.success());
    let p = NodeProcess::spawn(&path, &state, "n1", &["--no-watch"]);
    let s = status(&p).await;
    assert_eq!(s["version"], 42, "{s}");
    assert_eq!(s["highest_fencing_token"], 1000);
    assert_eq!(s["config"]["database"]["max_conns"], 6);
    let metrics = reqwest::get(p.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("confroll_config_version{node=\"n1\",service=\"default\"} 42"), "{metrics}");

    let mut agent = NodeAgentClient::connect(p.agent_url()).await.unwrap();
    cfg.max_conns = 7;
    let err = agent.apply(push(cfg.yaml(), 43, 999)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("stale fencing token 999"), "{}", err.message());
    assert_eq!(status(&p).await["version"], 42);

    // A failed push is answered, not an RPC error: applied=false with the reason.
    let mut broken = cfg.clone();
    broken.db_url = format!("postgres://postgres@127.0.0.1:{}/postgres", common::dead_port());
    let r = agent.apply(push(broken.yaml(), 44, 1001)).await.unwrap().into_inner();
    assert!(!r.applied);
    assert_eq!(r.version, 42);
    assert_eq!(r.report.unwrap().status, "rolled_back");

    let st = agent.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.version, st.highest_fencing_token, st.healthy), (42, 1001, true));
    let h = agent.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert!(h.healthy);
    assert!(h.components.iter().any(|c| c.component == "database" && c.critical && c.healthy));
}

#[tokio::test]
async fn the_push_stream_answers_in_order_ends_on_a_refusal_and_does_not_hold_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let lite = |ttl: u32| format!("profile: lite\nlog: {{level: info}}\ncache: {{ttl: {ttl}s}}\n");
    std::fs::write(&path, lite(1)).unwrap();
    let p = NodeProcess::spawn(&path, &dir.path().join("state"), "s1", &["--no-watch"]);
    let push =
        |version: u64, token: u64| common::signed(common::apply_request(lite(version as u32), version, token), "s1");
    let mut agent = NodeAgentClient::connect(p.agent_url()).await.unwrap();

    // One answer per request, in order, on one stream.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = agent.apply_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    for (v, status) in [(2, "applied"), (3, "applied"), (3, "unchanged")] {
        tx.send(push(v, 50)).await.unwrap();
        let a = answers.message().await.unwrap().expect("an answer");
        assert_eq!((a.applied, a.version, a.report.unwrap().status.as_str()), (true, v, status));
    }
    // A stale token ends the stream with the status unary Apply returns.
    tx.send(push(4, 49)).await.unwrap();
    let e = answers.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("stale fencing token 49"), "{}", e.message());
    assert_eq!(status(&p).await["version"], 3);

    // A new stream works, and SIGTERM ends it rather than waiting on it.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = agent.apply_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(push(5, 50)).await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().version, 5);
    let exit = p.terminate().await;
    assert!(exit.success(), "{exit:?}");
    assert!(matches!(answers.message().await, Ok(None) | Err(_)), "the stream ends with the node");
}

#[tokio::test]
async fn a_lite_node_runs_without_database_or_redis_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.json");
    std::fs::write(&path, r#"{"profile": "lite", "log": {"level": "info", "format": "json"}}"#).unwrap();
    let p = NodeProcess::spawn(&path, &dir.path().join("state"), "lite-1", &[]);
    let w: serde_json::Value = reqwest::get(p.url("/work")).await.unwrap().json().await.unwrap();
    assert_eq!(w["version"], 1);
    assert!(w["db"].is_null() && w["redis"].is_null(), "{w}");
    assert_eq!(reqwest::get(p.url("/readyz")).await.unwrap().status(), 200);
    let log = p.log.clone();
    let exit = p.terminate().await;
    assert!(exit.success(), "{exit:?}");
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("\"message\":\"stopped\""), "JSON logs, clean stop expected:\n{text}");
}

/// `grpcurl -plaintext AGENT list` lists what the agent port serves, and
/// not the Coordinator API that shares its proto package.
#[tokio::test]
async fn the_agent_reflection_lists_only_the_services_it_serves() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.json");
    std::fs::write(&path, r#"{"profile": "lite"}"#).unwrap();
    let p = NodeProcess::spawn(&path, &dir.path().join("state"), "refl-1", &[]);
    let channel = tonic::transport::Endpoint::from_shared(p.agent_url()).unwrap().connect().await.unwrap();
    let mut c = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = c.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    let want = [
        "confroll.v1.NodeAgent",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    assert_eq!(names, want);
}

#[test]
fn schema_prints_a_strict_json_schema() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_confroll-node")).arg("schema").output().unwrap();
    assert!(out.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["additionalProperties"], false);
    for section in ["log", "database", "redis", "llm", "metrics", "cache", "server", "profile", "storage"] {
        assert!(schema["properties"].get(section).is_some(), "schema lacks `{section}`");
    }
    assert_eq!(schema["$defs"]["DatabaseConfig"]["additionalProperties"], false);
    assert_eq!(schema["$defs"]["Duration"]["type"], "string");
}

#[test]
fn validate_subcommand_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.yaml");
    std::fs::write(&f, "profile: lite\ncache: {ttl: 5s, size: 3}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_confroll-node")).arg("validate").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `size`"), "{err}");
}
