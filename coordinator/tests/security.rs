//! Trust between coordinators and nodes, against real processes: only the
//! coordinator group can push (signed pushes), roles keep a node credential
//! from submitting and a reader from seeing secrets, credentials rotate
//! without a restart, and no secret reaches a read, a log or a metric.
//! Runs on etcd and (`CONFROLL_TEST_STORE=raft`) on the raft store.

mod common;

use std::time::Duration;

use common::*;
use confroll_node::{node::sha256_hex, trust::PushKey};
use confroll_proto::v1::{self as pb, node_agent_client::NodeAgentClient};
use tonic::{Code, transport::Channel};

/// A lite config carrying a database and a Redis password (neither is
/// dialed with `profile: lite`), told apart by its cache TTL.
fn with_secrets(ttl: u32) -> String {
    format!(
        "profile: lite\nlog: {{level: info}}\ncache: {{ttl: {ttl}s}}\n\
         database: {{url: \"postgres://app:TopSecretPw@db.internal:5432/app\"}}\n\
         redis: {{url: \"redis://:R3disPw@cache.internal:6379/0\"}}\n"
    )
}

const SECRETS: [&str; 2] = ["TopSecretPw", "R3disPw"];

fn as_role<T>(m: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn reader<T>(m: T) -> tonic::Request<T> {
    as_role(m, "reader-token")
}

fn op<T>(m: T) -> tonic::Request<T> {
    as_role(m, "op-token-1")
}

/// Waits until a reader sees `version` as the stable version.
async fn wait_stable(client: &pb::coordinator_client::CoordinatorClient<Channel>, version: u64) {
    eventually(Duration::from_secs(20), &format!("v{version} to roll out"), || {
        let mut c = client.clone();
        async move {
            let s = c.get_status(reader(pb::GetStatusRequest::default())).await.ok()?.into_inner();
            (s.stable_version == version).then_some(())
        }
    })
    .await
}

/// The grpcurl call of the report: an unsigned push with a huge token.
fn attackers_push(node: &str) -> pb::ApplyRequest {
    let content = lite(1);
    pb::ApplyRequest {
        version: 77,
        sha256: sha256_hex(content.as_bytes()),
        content: content.into_bytes(),
        fencing_token: 9_223_372_036_854_775_000,
        node_id: node.into(),
        ..Default::default()
    }
}

async fn agent_status(agent: &mut NodeAgentClient<Channel>) -> pb::NodeStatus {
    agent.status(pb::StatusRequest {}).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_coordinator_group_can_push_and_replays_are_refused() {
    let _serial = serial().await;
    let store = Backing::start(1);
    let dir = tempfile::tempdir().unwrap();
    let c1 = Coord::start(&store, "c1", dir.path(), &[]);
    let cfg = dir.path().join("base.yaml");
    std::fs::write(&cfg, lite(30)).unwrap();
    let mut n1 = NodeProc::start("n1", &cfg, dir.path(), &[&c1], &[]);
    let n2 = NodeProc::start("n2", &cfg, dir.path(), &[&c1], &[]);
    let client = c1.client().await;
    // Both registered first: a submit is accepted as soon as one node has
    // published the schema, and a later node is only caught up afterwards.
    wait_registered(&c1, 2).await;
    submit_until_accepted(&client, submit_req(&lite(31), "0s")).await;
    assert_eq!(wait_rollout_done(&c1, Duration::from_secs(20)).await.state, "SUCCEEDED");
    let cluster = cluster_id(&client).await;
    let mut a1 = n1.agent().await;
    let before = agent_status(&mut a1).await;
    let sha = sha256_hex(lite(31).as_bytes());
    assert_eq!(
        (before.version, before.cluster_id.as_str(), before.sha256.as_str()),
        (1, cluster.as_str(), sha.as_str())
    );
    assert_eq!(before.config_cluster_id, cluster, "v1 is numbered by this cluster");

    // 1. The report's grpcurl call: unsigned, huge token. Refused, and
    // neither the config nor the token moved (finding 2 cannot follow).
    let e = a1.apply(attackers_push("n1")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("unsigned request"), "{}", e.message());
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(attackers_push("n1")).await.unwrap();
    let e = match a1.apply_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Ok(s) => s.into_inner().message().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::Unauthenticated, "the push stream refuses it too: {e:?}");
    // Signed with a key the node does not trust.
    let stranger = PushKey::generate();
    let mut forged = pb::ApplyRequest { cluster_id: cluster.clone(), ..attackers_push("n1") };
    stranger.sign_apply(&mut forged);
    let e = a1.apply(forged).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("does not trust"), "{}", e.message());
    // A genuine signature, then the token changed on the way.
    let mut tampered = signed(pb::ApplyRequest { cluster_id: cluster.clone(), ..attackers_push("n1") }, "n1");
    tampered.fencing_token += 1;
    let e = a1.apply(tampered).await.unwrap_err();
    assert!(e.message().contains("bad signature"), "{}", e.message());
    // A genuine push for n1 replayed at n2.
    let for_n1 = signed(pb::ApplyRequest { cluster_id: cluster.clone(), ..attackers_push("n1") }, "n1");
    let e = n2.agent().await.apply(for_n1).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("signed for node `n1`"), "{}", e.message());
    // Validate and Adopt are refused unsigned too.
    let v = pb::ValidateRequest { content: lite(5).into_bytes(), node_id: "n1".into(), ..Default::default() };
    assert_eq!(a1.validate(v).await.unwrap_err().code(), Code::Unauthenticated);
    let adopt = pb::AdoptRequest {
        from_cluster_id: cluster.clone(),
        cluster_id: "evil".into(),
        node_id: "n1".into(),
        ..Default::default()
    };
    assert_eq!(a1.adopt(adopt).await.unwrap_err().code(), Code::Unauthenticated);
    let after = agent_status(&mut a1).await;
    assert_eq!(
        (after.version, after.highest_fencing_token, after.cluster_id.as_str(), after.sha256.as_str()),
        (before.version, before.highest_fencing_token, before.cluster_id.as_str(), before.sha256.as_str()),
        "refused requests changed the node"
    );
    assert!(
        std::fs::read_to_string(&n1.log).unwrap().contains("refused a request not signed by the coordinator group")
    );

    // The next legitimate submit reaches every node.
    let mut c = client.clone();
    let v2 = c.submit_config(submit_req(&lite(32), "0s")).await.unwrap().into_inner();
    assert_eq!(wait_rollout_done(&c1, Duration::from_secs(20)).await.state, "SUCCEEDED");
    n1.wait_version(v2.version).await;
    n2.wait_version(v2.version).await;

    // A replay after a restart: the node persisted the sequence of the last
    // push it took, so an older signed push of the same leader is refused.
    let fencing: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("n1.state/fencing.json")).unwrap()).unwrap();
    let (token, sequence) = (fencing["token"].as_u64().unwrap(), fencing["sequence"].as_u64().unwrap());
    assert!(sequence > 1, "{fencing}");
    n1.kill9();
    let n1 = NodeProc::start("n1", &cfg, dir.path(), &[], &[]);
    let old = lite(31);
    let replay = signed(
        pb::ApplyRequest {
            service: "default".into(),
            version: 1,
            sha256: sha256_hex(old.as_bytes()),
            content: old.into_bytes(),
            fencing_token: token,
            sequence: sequence - 1,
            cluster_id: cluster.clone(),
            ..Default::default()
        },
        "n1",
    );
    let e = n1.agent().await.apply(replay).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(e.message().contains("overtaken"), "{}", e.message());
    assert_eq!(n1.version().await, v2.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_separate_secrets_stay_redacted_and_credentials_rotate_live() {
    let _serial = serial().await;
    let store = Backing::start(2);
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (op_f, node_f, reader_f) =
        (file("operator", "op-token-1\n"), file("node", "node-token\n"), file("reader", "# readers\nreader-token\n"));
    let creds = ["--operator-tokens", &op_f, "--node-tokens", &node_f, "--reader-tokens", &reader_f];
    let c1 = Coord::start(&store, "c1", dir.path(), &creds);
    let c2 = Coord::start(&store, "c2", dir.path(), &creds);
    let cfg = dir.path().join("base.yaml");
    std::fs::write(&cfg, with_secrets(30)).unwrap();
    let node_tok = file("node-token-file", "node-token\n");
    let nodes: Vec<NodeProc> = (1..=2)
        .map(|i| {
            NodeProc::start(&format!("n{i}"), &cfg, dir.path(), &[&c1, &c2], &["--coordinator-token-file", &node_tok])
        })
        .collect();
    let mut client = c2.client().await;

    // No credential: nothing, not even reads.
    let e = client.get_status(pb::GetStatusRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // The reader sees the nodes registered with the node credential.
    eventually(Duration::from_secs(20), "both nodes to register", || {
        let mut c = client.clone();
        async move {
            (c.get_status(reader(pb::GetStatusRequest::default())).await.ok()?.into_inner().nodes.len() == 2)
                .then_some(())
        }
    })
    .await;

    // A node credential registers and heartbeats, and that is all.
    let e = client.submit_config(as_role(submit_req(&with_secrets(31), "0s"), "node-token")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = client.get_status(as_role(pb::GetStatusRequest::default(), "node-token")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let rollback = pb::RollbackRequest { to_version: 1, ..Default::default() };
    assert_eq!(
        client.rollback(as_role(rollback.clone(), "node-token")).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // A reader can neither submit nor dry-run (a dry run's diff would be an
    // oracle for guesses of a secret).
    let e = client.submit_config(reader(submit_req(&with_secrets(31), "0s"))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let dry = pb::SubmitConfigRequest { dry_run: true, ..submit_req(&with_secrets(31), "0s") };
    assert_eq!(client.submit_config(reader(dry)).await.unwrap_err().code(), Code::PermissionDenied);
    // An operator can only register a node with a node credential.
    let reg = pb::RegisterRequest { node_id: "fake".into(), agent_address: "127.0.0.1:1".into(), ..Default::default() };
    assert_eq!(client.register(as_role(reg, "op-token-1")).await.unwrap_err().code(), Code::PermissionDenied);

    // The operator submits twice (through the follower as well).
    let v1 = eventually(Duration::from_secs(20), "the first submit", || {
        let mut c = client.clone();
        async move { c.submit_config(op(submit_req(&with_secrets(31), "0s"))).await.ok().map(|r| r.into_inner()) }
    })
    .await;
    wait_stable(&client, v1.version).await;
    for n in &nodes {
        n.wait_version(v1.version).await;
    }

    // The version records who submitted it: the role and the credential's
    // fingerprint, never the token.
    let versions =
        client.list_versions(reader(pb::ListVersionsRequest::default())).await.unwrap().into_inner().versions;
    let v = &versions[0];
    assert_eq!(v.submitted_by_role, "operator");
    assert_eq!(v.submitted_by_credential, confroll_coordinator::auth::fingerprint("op-token-1"));
    assert!(!v.submitted_by_credential.contains("op-token"));

    // Reads redact secrets; a reader cannot reveal them; an operator can, and it is logged.
    let get = |reveal| pb::GetVersionRequest { version: v1.version, reveal_secrets: reveal, ..Default::default() };
    let red = client.get_version(reader(get(false))).await.unwrap().into_inner();
    assert_eq!(red.redacted_secrets, 2, "{}", red.content);
    assert!(red.content.contains("db.internal:5432") && red.content.contains("***"), "{}", red.content);
    let e = client.get_version(reader(get(true))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let red_op = client.get_version(op(get(false))).await.unwrap().into_inner();
    let shown = client.get_version(op(get(true))).await.unwrap().into_inner();
    assert!(shown.content.contains("TopSecretPw") && shown.content.contains("R3disPw"));
    assert_eq!(shown.content, with_secrets(31));
    let c2_log = c2.log_text();
    assert!(c2_log.contains("secret values revealed"), "the reveal is logged");
    assert!(c2_log.contains(&confroll_coordinator::auth::fingerprint("op-token-1")), "with who asked");
    // A second version changes the database password: its submit answer,
    // the rollout and the diff show the change, never either password.
    let v2_doc = with_secrets(32).replace("TopSecretPw", "NewSecretPw");
    let checked = client.submit_config(op(submit_req(&v2_doc, "0s"))).await.unwrap().into_inner();
    assert!(checked.diff.iter().any(|c| c.path == "database.url"), "{checked:?}");
    wait_stable(&client, checked.version).await;
    let diff = pb::DiffVersionsRequest { from_version: v1.version, to_version: checked.version, ..Default::default() };
    let diff = client.diff_versions(reader(diff)).await.unwrap().into_inner().diff;
    let url = diff.iter().find(|c| c.path == "database.url").expect("the url changed");
    assert!(url.new_value.as_deref().unwrap_or("").contains("***"), "{url:?}");
    let mut status = client.get_status(reader(pb::GetStatusRequest::default())).await.unwrap().into_inner();
    let mut watch = client.watch_rollout(reader(pb::WatchRolloutRequest::default())).await.unwrap().into_inner();
    let event = watch.message().await.unwrap();
    status.nodes.iter_mut().for_each(|n| n.last_seen.clear());
    // Nothing any read returned, logged or exported holds a secret.
    let mut seen = vec![
        red.content,
        red_op.content,
        format!("{checked:?}"),
        format!("{status:?}"),
        format!("{event:?}"),
        format!("{versions:?}"),
        format!("{diff:?}"),
        c1.log_text(),
        c1.metrics().await,
        c2.metrics().await,
    ];
    for n in &nodes {
        seen.push(std::fs::read_to_string(&n.log).unwrap());
        seen.push(format!("{:?}", n.agent().await.status(pb::StatusRequest {}).await.unwrap().into_inner()));
        seen.push(n.status().await.to_string());
        seen.push(
            reqwest::get(format!("http://127.0.0.1:{}/metrics", n.http_port)).await.unwrap().text().await.unwrap(),
        );
    }
    // The only reveal's log line names the version, not the content.
    seen.push(c2_log);
    for text in &seen {
        for s in SECRETS.iter().chain(&["NewSecretPw"]) {
            assert!(!text.contains(s), "`{s}` leaked into:\n{text}");
        }
    }

    // Rotation without a restart: a new operator token is added, the old
    // one removed; the file watch picks both up (SIGHUP does it at once).
    let pid = c2.pid();
    std::fs::write(&op_f, "op-token-2\n").unwrap();
    let hup = std::process::Command::new("kill").args(["-HUP", &c2.pid().to_string()]).status().unwrap();
    assert!(hup.success());
    eventually(Duration::from_secs(10), "the old operator token to be revoked", || {
        let mut c = client.clone();
        async move {
            let e = c.get_status(op(pb::GetStatusRequest::default())).await.err()?;
            (e.code() == Code::Unauthenticated).then_some(())
        }
    })
    .await;
    client.get_status(as_role(pb::GetStatusRequest::default(), "op-token-2")).await.unwrap();
    // c1 has no SIGHUP: its poll of the file picks the change up.
    let mut cl1 = c1.client().await;
    eventually(Duration::from_secs(10), "c1 to take the new operator token", || {
        let mut c = cl1.clone();
        async move { c.get_status(as_role(pb::GetStatusRequest::default(), "op-token-2")).await.ok().map(|_| ()) }
    })
    .await;
    let e = cl1.get_status(op(pb::GetStatusRequest::default())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(c2.pid(), pid, "no restart");
}
