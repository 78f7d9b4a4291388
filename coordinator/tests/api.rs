//! The public API as clients see it: reflection (what grpcurl uses), health,
//! auth, validation, dry runs, history, manual rollback, forwarding.

mod common;

use std::time::Duration;

use bytes::{Buf, BufMut};
use common::*;
use confroll_proto::v1 as pb;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Raw protobuf bytes in and out, as a reflection-driven client sends them.
#[derive(Default, Clone)]
struct RawCodec;
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// `m` as a request (the API of these tests runs without credentials).
fn authed<T>(m: T) -> tonic::Request<T> {
    tonic::Request::new(m)
}

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap().connect().await.unwrap()
}

async fn reflect_v1(
    url: &str,
    req: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1::server_reflection_response::MessageResponse {
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_client::ServerReflectionClient};
    let mut c = ServerReflectionClient::new(channel(url).await);
    let out = tokio_stream::iter(vec![ServerReflectionRequest { host: String::new(), message_request: Some(req) }]);
    let mut s = c.server_reflection_info(out).await.unwrap().into_inner();
    s.next().await.unwrap().unwrap().message_response.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_discoverable_and_callable_through_reflection() {
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest as Req, server_reflection_response::MessageResponse as Resp,
    };
    let _serial = serial().await;
    let store = Backing::start(1);
    let dir = tempfile::tempdir().unwrap();
    let c1 = Coord::start(&store, "c1", dir.path(), &[]);
    assert_eq!(leader_of(&c1).await, "c1");
    let mut client = c1.client().await;
    publish_node_schema(&client, "").await;
    client.submit_config(submit_req(&lite(30), "0s")).await.unwrap();
    wait_rollout_done(&c1, Duration::from_secs(20)).await;

    // `grpcurl -plaintext HOST:PORT list`
    let Resp::ListServicesResponse(list) = reflect_v1(&c1.url(), Req::ListServices(String::new())).await else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["confroll.v1.Coordinator", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(names.iter().any(|n| n == want), "{want} not listed: {names:?}");
    }
    // Only what this port serves: the NodeAgent API lives in the same proto
    // package, but nodes serve it, not the coordinator.
    assert!(!names.iter().any(|n| n == "confroll.v1.NodeAgent"), "NodeAgent listed: {names:?}");
    assert_eq!(names.len(), 4, "{names:?}");
    // v1alpha answers too (older grpcurl).
    {
        use tonic_reflection::pb::v1alpha::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut c = ServerReflectionClient::new(channel(&c1.url()).await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut s = c.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
        let r = s.next().await.unwrap().unwrap().message_response.unwrap();
        assert!(
            matches!(r, MessageResponse::ListServicesResponse(l) if l.service.iter().any(|s| s.name == "confroll.v1.Coordinator"))
        );
    }
    // `grpcurl describe confroll.v1.Coordinator`
    let Resp::FileDescriptorResponse(files) =
        reflect_v1(&c1.url(), Req::FileContainingSymbol("confroll.v1.Coordinator".into())).await
    else {
        panic!("no descriptor")
    };
    let fds: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
        .collect();
    let svc =
        fds.iter().flat_map(|f| f.service.iter()).find(|s| s.name() == "Coordinator").expect("service in descriptor");
    let methods: Vec<&str> = svc.method.iter().map(|m| m.name()).collect();
    for m in ["SubmitConfig", "GetStatus", "ListVersions", "GetVersion", "Rollback", "AbortRollout", "WatchRollout"] {
        assert!(methods.contains(&m), "{m} missing: {methods:?}");
    }
    let get_status = svc.method.iter().find(|m| m.name() == "GetStatus").unwrap();
    assert_eq!(get_status.input_type(), ".confroll.v1.GetStatusRequest");
    // `grpcurl -d '{}' HOST:PORT confroll.v1.Coordinator/GetStatus`: a call
    // built from the descriptor alone (empty request message, raw bytes).
    let mut grpc = tonic::client::Grpc::new(channel(&c1.url()).await);
    grpc.ready().await.unwrap();
    let path = format!("/confroll.v1.{}/{}", svc.name(), get_status.name()).parse().unwrap();
    let raw = grpc.unary(tonic::Request::new(Vec::new()), path, RawCodec).await.unwrap().into_inner();
    let status = pb::GetStatusResponse::decode(raw.as_slice()).unwrap();
    assert_eq!((status.service.as_str(), status.stable_version, status.leader_id.as_str()), ("default", 1, "c1"));

    // grpc.health.v1
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(&c1.url()).await);
    let r = h.check(tonic_health::pb::HealthCheckRequest { service: "confroll.v1.Coordinator".into() }).await.unwrap();
    assert_eq!(r.into_inner().status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_are_checked_history_is_kept_and_rollback_works() {
    let _serial = serial().await;
    let store = Backing::start(2);
    let dir = tempfile::tempdir().unwrap();
    // Roles and credentials: tests/security.rs. This API runs open.
    let (c1, c2) = (Coord::start(&store, "c1", dir.path(), &[]), Coord::start(&store, "c2", dir.path(), &[]));
    let cfg = dir.path().join("base.yaml");
    std::fs::write(&cfg, lite(30)).unwrap();
    let nodes: Vec<NodeProc> =
        (1..=2).map(|i| NodeProc::start(&format!("n{i}"), &cfg, dir.path(), &[&c1, &c2], &[])).collect();
    wait_registered(&c1, 2).await;
    let mut client = c2.client().await;

    let mut dry = submit_req(&lite(30), "0s");
    dry.dry_run = true;
    let d = client.submit_config(dry).await.unwrap().into_inner();
    assert!(d.dry_run && d.version == 0);
    assert_eq!(
        d.checks.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["parse", "schema", "node_validation", "diff"]
    );
    assert!(client.list_versions(pb::ListVersionsRequest::default()).await.unwrap().into_inner().versions.is_empty());

    // Bad input: a clear error naming the cause; nothing stored.
    for (content, needle) in [
        (
            "profile: lite\ncache: {ttl: 5s, size: 3}\n".to_owned(),
            "at `/cache`: Additional properties are not allowed ('size' was unexpected)",
        ),
        ("profile: lite\nlog: {level: loud}\n".to_owned(), "`log.level` must be one of"),
        ("".to_owned(), "config is empty"),
        (format!("profile: lite\n# {}\n", "x".repeat(5 << 20)), "the limit is 4194304 bytes"),
    ] {
        let e = client.submit_config(authed(submit_req(&content, "0s"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(needle), "`{}` does not name `{needle}`", e.message());
    }
    let mut bad_policy = submit_req(&lite(30), "0s");
    bad_policy.policy.as_mut().unwrap().stages = vec!["0%".into()];
    let e = client.submit_config(authed(bad_policy)).await.unwrap_err();
    assert!(e.message().contains("invalid stage `0%`"), "{}", e.message());
    // A restart-only change is caught by the dry run on a live node.
    let e = client.submit_config(authed(submit_req("profile: standard\n", "0s"))).await.unwrap_err();
    assert!(e.message().contains("node_validation") || e.message().contains("database"), "{}", e.message());
    assert!(client.list_versions(pb::ListVersionsRequest::default()).await.unwrap().into_inner().versions.is_empty());

    // Per-service defaults: all at once for this service; a submit that sets
    // no stages gets them.
    let sp = authed(pb::SetServicePolicyRequest {
        policy: Some(pb::RolloutPolicy { stages: vec!["100%".into()], ..Default::default() }),
        ..Default::default()
    });
    let eff = client.set_service_policy(sp).await.unwrap().into_inner().effective.unwrap();
    assert_eq!(eff.stages, ["100%"]);
    assert_eq!(eff.bake.as_deref(), Some("200ms"), "unset fields inherit the coordinator's --default-bake");
    let st = client.get_status(pb::GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!(st.default_policy.unwrap().stages, ["100%"]);

    // Two versions through the follower (forwarded to the leader).
    let v1 = client.submit_config(authed(submit_req(&lite(30), "0s"))).await.unwrap().into_inner();
    let done = wait_rollout_done(&c1, Duration::from_secs(20)).await;
    assert_eq!(done.stages, 1, "the service default (one stage) applies: {done:?}");
    let v2 = client.submit_config(authed(submit_req(&lite(40), "0s"))).await.unwrap().into_inner();
    wait_rollout_done(&c1, Duration::from_secs(20)).await;
    assert_eq!((v1.version, v2.version), (1, 2));
    let diff = client
        .diff_versions(pb::DiffVersionsRequest { from_version: 1, to_version: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .diff;
    assert_eq!(diff.len(), 1);
    assert_eq!(
        (diff[0].path.as_str(), diff[0].old_value.as_deref(), diff[0].new_value.as_deref()),
        ("cache.ttl", Some("\"30s\""), Some("\"40s\""))
    );
    let got =
        client.get_version(pb::GetVersionRequest { version: 1, ..Default::default() }).await.unwrap().into_inner();
    // Rendered anew for reading (nothing secret here); as stored when revealed.
    let yaml = |t: &str| confroll_node::config::yaml_to_json(t).unwrap();
    assert_eq!(yaml(&got.content), yaml(&lite(30)));
    let reveal = pb::GetVersionRequest { version: 1, reveal_secrets: true, ..Default::default() };
    assert_eq!(client.get_version(reveal).await.unwrap().into_inner().content, lite(30));
    let e = client.get_version(pb::GetVersionRequest { version: 9, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Manual rollback to v1: every node returns; v2 is recorded ROLLED_BACK.
    let r = client
        .rollback(authed(pb::RollbackRequest { to_version: 1, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, 1);
    assert_eq!(wait_rollout_done(&c1, Duration::from_secs(20)).await.state, "SUCCEEDED");
    for n in &nodes {
        assert_eq!(n.version().await, 1);
    }
    let versions = client.list_versions(pb::ListVersionsRequest::default()).await.unwrap().into_inner().versions;
    assert_eq!(versions[0].version, 2);
    assert_eq!(versions[0].state, "ROLLED_BACK");
    assert!(versions[0].reason.contains("by hand"), "{:?}", versions[0]);
    let st = client.get_status(pb::GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!(st.stable_version, 1);

    // And back to v2: it runs everywhere again, so it is no longer listed as
    // ROLLED_BACK (the chaos suite's no_rolled_back checker found a cluster
    // whose nodes all ran a version still marked so).
    client.rollback(authed(pb::RollbackRequest { to_version: 2, ..Default::default() })).await.unwrap();
    assert_eq!(wait_rollout_done(&c1, Duration::from_secs(20)).await.state, "SUCCEEDED");
    for n in &nodes {
        assert_eq!(n.version().await, 2);
    }
    let versions = client.list_versions(pb::ListVersionsRequest::default()).await.unwrap().into_inner().versions;
    let states: Vec<(u64, &str)> = versions.iter().map(|v| (v.version, v.state.as_str())).collect();
    assert_eq!(states, [(2, "ROLLED_OUT"), (1, "ROLLED_BACK")], "{versions:#?}");
    assert!(versions[0].reason.contains("rolled out again"), "{:?}", versions[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_cannot_reach_the_leader_answers_with_a_leader_hint() {
    let _serial = serial().await;
    let store = Backing::start(2);
    let dir = tempfile::tempdir().unwrap();
    // Both advertise addresses nobody listens on: whichever leads, the other
    // cannot forward to it and must answer with the hint.
    let dead = [format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())];
    let c1 = Coord::start(&store, "c1", dir.path(), &["--advertise", &dead[0]]);
    let c2 = Coord::start(&store, "c2", dir.path(), &["--advertise", &dead[1]]);
    let leader = leader_of(&c1).await;
    let (follower, hint) = if leader == "c1" { (&c2, &dead[0]) } else { (&c1, &dead[1]) };
    let fc = follower.client().await;
    let e = eventually(Duration::from_secs(10), "the follower to know the leader", || {
        let mut c = fc.clone();
        async move {
            let e = c.submit_config(submit_req(&lite(30), "0s")).await.err()?;
            e.metadata().get("x-confroll-leader").is_some().then_some(e)
        }
    })
    .await;
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(e.metadata().get("x-confroll-leader").unwrap().to_str().unwrap(), hint);
    assert_eq!(e.metadata().get("x-confroll-leader-id").unwrap().to_str().unwrap(), leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_can_be_served_over_tls() {
    let _serial = serial().await;
    let store = Backing::start(1);
    let dir = tempfile::tempdir().unwrap();
    // A self-signed certificate for the loopback address.
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_f, key_f) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_f, cert.cert.pem()).unwrap();
    std::fs::write(&key_f, cert.signing_key.serialize_pem()).unwrap();
    let tls = ["--tls-cert", cert_f.to_str().unwrap(), "--tls-key", key_f.to_str().unwrap()];
    let c1 = Coord::start(&store, "c1", dir.path(), &tls);
    let https = format!("https://127.0.0.1:{}", c1.port);

    // A client verifying the certificate gets answers.
    let ep = tonic::transport::Endpoint::from_shared(https.clone())
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem())),
        )
        .unwrap();
    let client = pb::coordinator_client::CoordinatorClient::new(ep.connect().await.unwrap());
    let leader = status_until(&client, Duration::from_secs(20), "a leader over TLS", |s| {
        (!s.leader_id.is_empty()).then_some(s.leader_id)
    })
    .await;
    assert_eq!(leader, "c1");
    // A plaintext client is refused.
    let plain = tonic::transport::Endpoint::from_shared(c1.url()).unwrap().connect().await;
    if let Ok(ch) = plain {
        let r = pb::coordinator_client::CoordinatorClient::new(ch).get_status(pb::GetStatusRequest::default()).await;
        assert!(r.is_err(), "plaintext accepted on a TLS port");
    }
    // A node registers over TLS; the CLI reads status over TLS.
    let cfg = dir.path().join("base.yaml");
    std::fs::write(&cfg, lite(30)).unwrap();
    let node = NodeProc::start_urls(
        "n1",
        &cfg,
        dir.path(),
        std::slice::from_ref(&https),
        &["--coordinator-ca", cert_f.to_str().unwrap()],
    );
    let st = status_until(&client, Duration::from_secs(20), "the node to register over TLS", |s| {
        (s.nodes.len() == 1).then_some(s)
    })
    .await;
    assert_eq!(st.nodes[0].id, node.id);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_confroll"))
        .args(["-c", &https, "--tls-ca", cert_f.to_str().unwrap(), "-o", "json", "status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The proto3 JSON mapping, as grpcurl prints it.
    assert_eq!(v["leaderId"], "c1");
    assert!(v.get("leader_id").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_watches_and_reports() {
    let _serial = serial().await;
    let cl = Cluster::start(1, 3, &lite(30)).await;
    let (c1, nodes, cfg, dir) = (&cl.coords[0], &cl.nodes, &cl.cfg, cl.dir.path());
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_confroll"))
            .args(["-c", &c1.url()])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let v2 = dir.join("v2.yaml");
    std::fs::write(&v2, lite(45)).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let v2_s = v2.to_str().unwrap();

    let (code, out, err) = cli(&["submit", cfg_s, "-m", "first", "--bake", "0s", "--watch"]);
    assert_eq!(code, Some(0), "{out}{err}");
    // Dry run: checks and the diff, nothing stored.
    let (code, out, _) = cli(&["validate", v2_s]);
    assert_eq!(code, Some(0));
    assert!(out.contains("cache.ttl") && out.contains("\"30s\" -> \"45s\"") && out.contains("dry run"), "{out}");
    // A rollout followed live, stage by stage, to SUCCEEDED (exit 0).
    let (code, out, err) = cli(&["submit", v2_s, "-m", "second", "--bake", "100ms", "--watch"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("RUNNING") && out.contains("stage 1/") && out.contains("SUCCEEDED"), "{out}");
    for n in nodes {
        assert_eq!(n.version().await, 2);
    }
    // Scripts get JSON.
    let (code, out, _) = cli(&["-o", "json", "versions"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // uint64 as a string, per the proto3 JSON mapping (grpcurl prints the same).
    assert_eq!(v["versions"][0]["version"], "2");
    assert_eq!(v["versions"][0]["state"], "ROLLED_OUT");
    let (_, out, _) = cli(&["diff", "1", "2"]);
    assert!(out.contains("cache.ttl"), "{out}");
    // A rollback followed live; a failing command exits non-zero with the reason.
    let (code, out, err) = cli(&["rollback", "1", "--watch"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = cli(&["abort"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no rollout is running"), "{err}");
    let (_, out, _) = cli(&["status"]);
    assert!(out.contains("stable v1") && out.contains("n1") && out.contains("default policy"), "{out}");
}
