//! Canary rollouts against a real etcd, real coordinators and real nodes.

mod common;

use std::time::Duration;

use common::*;
use confroll_proto::v1 as pb;

fn standard(db: &str, redis: &str, ttl: u32) -> String {
    format!(
        "log: {{level: info}}\ndatabase: {{url: \"{db}\", max_conns: 3, min_conns: 1, acquire_timeout: 1s}}\n\
         redis: {{url: \"{redis}\", pool_size: 2, timeout: 500ms}}\ncache: {{ttl: {ttl}s}}\n"
    )
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: run the tests with `bash scripts/test.sh`"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_rollout_reaches_five_nodes_stage_by_stage() {
    let _serial = serial().await;
    let cl = Cluster::start(2, 5, &lite(30)).await;
    let (c1, c2, nodes) = (&cl.coords[0], &cl.coords[1], &cl.nodes);

    let mut client = c2.client().await;
    let v1 = client.submit_config(submit_req(&lite(30), "0s")).await.unwrap().into_inner();
    assert_eq!(v1.version, 1);
    assert_eq!(wait_rollout_done(c1, Duration::from_secs(30)).await.state, "SUCCEEDED");

    let v2 = client.submit_config(submit_req(&lite(45), "300ms")).await.unwrap().into_inner();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.diff.len(), 1);
    assert_eq!(v2.diff[0].path, "cache.ttl");
    assert!(v2.checks.iter().all(|c| c.ok), "{:?}", v2.checks);
    let events = watch_to_end(c1.url()).await;

    // Stages 1, 25%, 50%, 100% of 5 nodes: 1, 2, 3, 5 nodes, in that order.
    let mut stages: Vec<u32> = events
        .iter()
        .filter_map(|e| e.rollout.as_ref())
        .filter(|r| r.state == "RUNNING")
        .map(|r| r.stage_nodes)
        .collect();
    stages.dedup();
    assert_eq!(stages, vec![1, 2, 3, 5], "events: {events:#?}");
    let last = events.last().unwrap().rollout.clone().unwrap();
    assert_eq!(last.state, "SUCCEEDED");
    // The canary order is the deterministic one.
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    assert_eq!(last.canary_order, confroll_coordinator::engine::canary_order("default", ids));
    for n in nodes {
        assert_eq!(n.version().await, 2, "node {} not on v2", n.id);
    }
    let versions = client.list_versions(pb::ListVersionsRequest::default()).await.unwrap().into_inner().versions;
    let states: Vec<(u64, &str)> = versions.iter().map(|v| (v.version, v.state.as_str())).collect();
    assert_eq!(states, vec![(2, "ROLLED_OUT"), (1, "ROLLED_OUT")]);
    let st = client.get_status(pb::GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((st.stable_version, st.desired_version), (2, 2));
    let (leader, follower) = if st.leader_id == "c1" { (c1, c2) } else { (c2, c1) };
    // Node versions come from heartbeats, read by the next reconcile pass.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut leader_metrics = leader.metrics().await;
    while std::time::Instant::now() < deadline
        && nodes.iter().any(|n| {
            !leader_metrics.contains(&format!("node=\"{}\",replica=\"{}\",service=\"default\"}} 2", n.id, leader.id))
        })
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        leader_metrics = leader.metrics().await;
    }
    assert!(leader_metrics.contains("confroll_rollouts_total{outcome=\"succeeded\",replica="), "{leader_metrics}");
    // What the dashboard and the alerts read, from the leader: one series per
    // rollout state, each node's version, the election it won.
    let value = |text: &str, name: &str, labels: &[&str]| -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| labels.iter().all(|want| l.contains(want)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let svc = "service=\"default\"";
    assert_eq!(value(&leader_metrics, "confroll_rollout_state", &[svc, "state=\"succeeded\""]), Some(1.0));
    for state in ["running", "rolling_back", "rolled_back", "aborted"] {
        let want = format!("state=\"{state}\"");
        assert_eq!(value(&leader_metrics, "confroll_rollout_state", &[svc, &want]), Some(0.0), "{state}");
    }
    for n in nodes {
        let node = format!("node=\"{}\"", n.id);
        assert_eq!(
            value(&leader_metrics, "confroll_node_version", &[svc, &node]),
            Some(2.0),
            "{}: {leader_metrics}",
            n.id
        );
    }
    assert_eq!(value(&leader_metrics, "confroll_stable_version", &[svc]), Some(2.0));
    assert_eq!(value(&leader_metrics, "confroll_rollout_stage", &[svc]), Some(-1.0));
    assert_eq!(value(&leader_metrics, "confroll_coordinator_elections_won_total", &[]), Some(1.0));
    // The follower exports its own series only, never a stale cluster view.
    let follower_metrics = follower.metrics().await;
    assert_eq!(value(&follower_metrics, "confroll_coordinator_is_leader", &[]), Some(0.0));
    for name in ["confroll_stable_version", "confroll_rollout_state", "confroll_node_version", "confroll_nodes"] {
        assert_eq!(value(&follower_metrics, name, &[]), None, "{name} on the follower: {follower_metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_cannot_apply_rolls_the_cluster_back() {
    let _serial = serial().await;
    let (db, redis) = (env("CONFROLL_TEST_DATABASE_URL"), env("CONFROLL_TEST_REDIS_URL"));
    let cl = Cluster::start(1, 5, &standard(&db, &redis, 30)).await;
    let (c1, nodes) = (&cl.coords[0], &cl.nodes);
    let mut client = cl.rolled_out(&standard(&db, &redis, 30)).await;

    // v2 points the database at a dead port: statically valid, so it is
    // accepted and versioned; the canary cannot connect and refuses it.
    let dead = format!("postgres://app:pw@127.0.0.1:{}/postgres", free_port());
    let v2 = client.submit_config(submit_req(&standard(&dead, &redis, 31), "500ms")).await.unwrap().into_inner();
    let done = wait_rollout_done(c1, Duration::from_secs(30)).await;
    assert_eq!(done.state, "ROLLED_BACK", "{done:?}");
    let canary = done.canary_order[0].clone();
    assert_eq!(done.failing_node, canary);
    assert!(done.reason.contains(&format!("apply failed on node {canary}")), "{}", done.reason);
    assert!(!done.reason.contains(":pw@"), "secret in the reason: {}", done.reason);

    let versions = client.list_versions(pb::ListVersionsRequest::default()).await.unwrap().into_inner().versions;
    assert_eq!(versions[0].version, v2.version);
    assert_eq!(versions[0].state, "ROLLED_BACK");
    assert_eq!(versions[0].failing_node, canary);
    let st = client.get_status(pb::GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((st.stable_version, st.desired_version), (1, 1));
    for n in nodes {
        assert_eq!(n.version().await, 1, "node {} left the stable version", n.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_health_check_during_the_bake_rolls_every_touched_node_back() {
    let _serial = serial().await;
    let (db, redis) = (env("CONFROLL_TEST_DATABASE_URL"), env("CONFROLL_TEST_REDIS_URL"));
    let cl = Cluster::start(1, 4, &standard(&db, &redis, 30)).await;
    let (c1, nodes) = (&cl.coords[0], &cl.nodes);
    let mut client = cl.rolled_out(&standard(&db, &redis, 30)).await;

    // v2 moves Redis to a server of the test's own: it applies fine…
    let (mut own, own_url) = redis_server();
    let mut req = submit_req(&standard(&db, &own_url, 31), "20s");
    req.policy.as_mut().unwrap().stages = vec!["1".into(), "50%".into()];
    client.submit_config(req).await.unwrap();
    // … the canary bakes on it; stage 1 is promoted only after 20 s, so the
    // failure below lands during the first bake.
    wait_applied(&client, 1).await;
    // … then that Redis dies: the canary fails its health check.
    own.kill();
    let done = wait_rollout_done(c1, Duration::from_secs(30)).await;
    assert_eq!(done.state, "ROLLED_BACK", "{done:?}");
    assert!(done.reason.contains("failed its health check"), "{}", done.reason);
    assert!(done.reason.contains("redis"), "{}", done.reason);
    let canary = done.canary_order[0].clone();
    // The canary had applied v2: it was pushed v1 again.
    for n in nodes {
        let s = n.status().await;
        assert_eq!(s["version"], 1, "node {} not back on v1: {s}", n.id);
        if n.id == canary {
            assert_eq!(s["last_reload"]["trigger"], "push");
            assert_eq!(s["last_reload"]["from_version"], 2, "canary was not reverted from v2: {s}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_submits_start_exactly_one_rollout_and_abort_reverts_it() {
    let _serial = serial().await;
    let cl = Cluster::start(2, 3, &lite(30)).await;
    let (c1, c2, nodes) = (&cl.coords[0], &cl.coords[1], &cl.nodes);
    let mut client = cl.rolled_out(&lite(30)).await;

    let mut tasks = Vec::new();
    for i in 0..10u32 {
        let url = if i % 2 == 0 { c1.url() } else { c2.url() };
        tasks.push(tokio::spawn(async move {
            let mut c = pb::coordinator_client::CoordinatorClient::connect(url).await.unwrap();
            c.submit_config(submit_req(&lite(100 + i), "30s")).await
        }));
    }
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => ok.push(r.into_inner()),
            Err(s) => refused.push(s),
        }
    }
    assert_eq!(ok.len(), 1, "exactly one submit may win; refusals: {refused:?}");
    let winner = &ok[0];
    assert_eq!(winner.version, 2);
    for s in &refused {
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains(&winner.rollout_id), "refusal does not name the running rollout: {}", s.message());
    }
    let versions = client.list_versions(pb::ListVersionsRequest::default()).await.unwrap().into_inner().versions;
    assert_eq!(versions.len(), 2, "a refused submit stored a version");

    // Abort: the canary returns to v1, the version is recorded ABORTED.
    wait_applied(&client, 1).await;
    let a = client.abort_rollout(pb::AbortRolloutRequest { reason: "test".into(), ..Default::default() }).await;
    assert_eq!(a.unwrap().into_inner().rollout_id, winner.rollout_id);
    let done = wait_rollout_done(c1, Duration::from_secs(20)).await;
    assert_eq!(done.state, "ABORTED");
    for n in nodes {
        assert_eq!(n.version().await, 1);
    }
    let versions = client.list_versions(pb::ListVersionsRequest::default()).await.unwrap().into_inner().versions;
    assert_eq!(versions[0].state, "ABORTED");
}
