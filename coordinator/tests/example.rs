//! The SDK example (`node/examples/flags.rs`: a TOML config of its own with
//! feature flags, a rate limit and a secret key, and a component of its own
//! whose health check reaches a quota store), run as two processes under a
//! coordinator. It hot-reloads from its file; the coordinator checks submits
//! against the schema the nodes published (a wrong type is refused at its
//! JSON pointer, a business rule and a restart-only field by the node's dry
//! run, nothing stored), rolls a version out to both nodes, and rolls back a
//! value that breaks the component's health check. The secret key shows in
//! no read, CLI output or log.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::*;
use confroll_proto::v1 as pb;

const SERVICE: &str = "flags";
const SECRET: &str = "Qk-7c0ffee-quota-key";

fn flags_bin() -> PathBuf {
    confroll_testkit::bins::ensure_example("flags").expect("build the flags example")
}

fn doc(rate: u32, store: SocketAddr, key: &str, beta: bool) -> String {
    format!(
        "rate_limit = {rate}\nquota_store = \"{store}\"\nquota_key = \"{SECRET}-{key}\"\nlisten_port = 8080\n\n[features]\nbeta = {beta}\n"
    )
}

struct Flags {
    agent_port: u16,
    log: PathBuf,
    _proc: ChildGuard,
}

impl Flags {
    fn start(id: &str, config: &Path, dir: &Path, coordinator: &Coord) -> Flags {
        let agent_port = free_port();
        let log = dir.join(format!("{id}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let proc = spawn_listening(
            Command::new(flags_bin())
                .args(["--id", id, "--agent-listen", &format!("127.0.0.1:{agent_port}")])
                .arg("--config")
                .arg(config)
                .arg("--state-dir")
                .arg(dir.join(format!("{id}.state")))
                .arg("--trust-keys")
                .arg(&push_keys().1)
                .args(["--coordinator", &coordinator.url()])
                .stdout(out.try_clone().unwrap())
                .stderr(out),
            lo(agent_port),
            "flags example node",
            Some(&log),
        );
        Flags { agent_port, log, _proc: proc }
    }

    async fn status(&self) -> pb::NodeStatus {
        let url = format!("http://127.0.0.1:{}", self.agent_port);
        let mut agent = pb::node_agent_client::NodeAgentClient::connect(url).await.unwrap();
        agent.status(pb::StatusRequest::default()).await.unwrap().into_inner()
    }

    /// Waits until the node runs `sha256` and reported the reload that
    /// made it live (the report comes after the health phase); its status.
    async fn wait_sha(&self, sha256: &str) -> pb::NodeStatus {
        let what = format!("node on {sha256}");
        eventually(Duration::from_secs(20), &what, || async {
            let s = self.status().await;
            let reported = s.last_reload.as_ref().is_some_and(|r| r.to_version == s.version);
            (s.sha256 == sha256 && reported).then_some(s)
        })
        .await
    }
}

fn submit(content: &str) -> pb::SubmitConfigRequest {
    pb::SubmitConfigRequest { service: SERVICE.into(), ..submit_req(content, "0s") }
}

/// Waits until the rollout of `version` ended; its record.
async fn rollout_of(
    client: &pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    version: u64,
) -> pb::RolloutInfo {
    service_status_until(client, SERVICE, Duration::from_secs(60), "the rollout to end", |s| {
        s.rollout
            .filter(|r| r.version == version && matches!(r.state.as_str(), "SUCCEEDED" | "ROLLED_BACK" | "ABORTED"))
    })
    .await
}

#[tokio::test]
async fn the_example_service_hot_reloads_rolls_out_and_is_rolled_back_on_a_failed_health_check() {
    let _serial = serial().await;
    let (_store, dir, c, mut client) = solo().await;
    // The quota store: a listener the limiter's health check connects to,
    // and an address nobody listens on.
    let quota = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (good, dead) = (quota.local_addr().unwrap(), lo(free_port()));

    let cfgs: Vec<PathBuf> = ["n1", "n2"].iter().map(|n| dir.path().join(format!("{n}.toml"))).collect();
    for f in &cfgs {
        std::fs::write(f, doc(10, good, "boot", false)).unwrap();
    }
    let nodes = [Flags::start("n1", &cfgs[0], dir.path(), &c), Flags::start("n2", &cfgs[1], dir.path(), &c)];
    service_status_until(&client, SERVICE, Duration::from_secs(20), "2 registered nodes", |s| {
        (s.nodes.len() == 2).then_some(())
    })
    .await;

    // 1. Hot reload from the file: the limiter is rebuilt, nothing restarts.
    let edited = doc(50, good, "boot", true);
    std::fs::write(&cfgs[0], &edited).unwrap();
    let s = nodes[0].wait_sha(&confroll_common::sha256_hex(edited.as_bytes())).await;
    let report = s.last_reload.unwrap();
    assert_eq!(report.status, "applied", "{report:?}");
    assert!(report.components.iter().any(|c| c.component == "limiter" && c.status == "reloaded"), "{report:?}");
    assert_eq!(report.trigger, "file", "{report:?}");

    // 2. Refused at submit, nothing stored: a wrong type (the published JSON
    //    Schema, at its pointer), a business rule and a restart-only field
    //    (the node's dry run).
    let wrong_type = doc(10, good, "x", false).replace("rate_limit = 10", "rate_limit = \"fast\"");
    let e = client.submit_config(submit(&wrong_type)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("at `/rate_limit`"), "{}", e.message());
    let e = client.submit_config(submit(&doc(0, good, "x", false))).await.unwrap_err();
    assert!(e.message().contains("rate_limit") && e.message().contains("1..=10000"), "{}", e.message());
    let moved = doc(10, good, "x", false).replace("listen_port = 8080", "listen_port = 9090");
    let e = client.submit_config(submit(&moved)).await.unwrap_err();
    assert!(e.message().contains("listen_port") && e.message().contains("restart"), "{}", e.message());
    assert_eq!(count_versions(&client, SERVICE).await, 0, "refused submits store nothing");

    // 3. A rollout from the coordinator reaches both nodes.
    let v1 = doc(200, good, "one", false);
    let r = submit_until_accepted(&client, submit(&v1)).await;
    assert_eq!(rollout_of(&client, r.version).await.state, "SUCCEEDED");
    for n in &nodes {
        let s = n.wait_sha(&r.sha256).await;
        assert_eq!(s.version, r.version);
    }

    // 4. A quota store nobody listens on passes every static check but breaks
    //    the limiter's health check on the canary: the rollout is rolled back
    //    and every node runs v1 again.
    let broken = doc(300, dead, "two", false);
    let r2 = submit_until_accepted(&client, submit(&broken)).await;
    let info = rollout_of(&client, r2.version).await;
    assert_eq!(info.state, "ROLLED_BACK", "{info:?}");
    for n in &nodes {
        let s = n.wait_sha(&r.sha256).await;
        assert_eq!(s.version, r.version, "back on v1");
    }
    let canary = nodes.iter().find(|n| n.log.ends_with(format!("{}.log", info.failing_node))).unwrap();
    let journal = std::fs::read_to_string(
        canary.log.with_file_name(format!("{}.state", info.failing_node)).join("applies.jsonl"),
    )
    .unwrap();
    assert!(journal.contains("limiter health failed"), "{journal}");

    // 5. The secret key: stored, never shown or logged.
    let got = client
        .get_version(pb::GetVersionRequest { service: SERVICE.into(), version: r.version, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.redacted_secrets >= 1 && !got.content.contains(SECRET), "{}", got.content);
    let diff = client
        .diff_versions(pb::DiffVersionsRequest {
            service: SERVICE.into(),
            from_version: r.version,
            to_version: r2.version,
        })
        .await
        .unwrap()
        .into_inner()
        .diff;
    let shown = format!("{diff:?}{:?}", r2.diff);
    assert!(shown.contains("quota_key") && !shown.contains(SECRET), "{shown}");
    let status = client.get_status(pb::GetStatusRequest { service: SERVICE.into() }).await.unwrap().into_inner();
    assert!(!format!("{status:?}").contains(SECRET));
    for n in &nodes {
        assert!(!format!("{:?}", n.status().await).contains(SECRET), "a node's status shows the key");
        assert!(!std::fs::read_to_string(&n.log).unwrap().contains(SECRET), "a node logged the key");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_confroll"))
        .args(["-c", &c.url(), "--service", SERVICE, "show", &r.version.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains(SECRET));
    assert!(!c.log_text().contains(SECRET), "the coordinator logged the key");
}
