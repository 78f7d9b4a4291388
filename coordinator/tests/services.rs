//! Several services on one coordinator group: each has its own schema,
//! policy, lock and history, and the rollout of one neither waits on nor
//! touches the other.

mod common;

use std::time::Duration;

use common::*;
use confroll_proto::v1 as pb;

async fn rollout_state(
    client: &pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    service: &str,
) -> String {
    let r = pb::GetStatusRequest { service: service.into() };
    client.clone().get_status(r).await.unwrap().into_inner().rollout.map(|r| r.state).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_roll_out_at_the_same_time_without_touching_each_other() {
    let _serial = serial().await;
    let (_store, dir, c, mut client) = solo().await;
    let cfg = dir.path().join("base.yaml");
    std::fs::write(&cfg, lite(30)).unwrap();
    let mut nodes = Vec::new();
    for (service, ids) in [("alpha", ["a1", "a2"]), ("beta", ["b1", "b2"])] {
        for id in ids {
            nodes.push((service, NodeProc::start(id, &cfg, dir.path(), &[&c], &["--service", service])));
        }
    }
    for service in ["alpha", "beta"] {
        let what = format!("2 nodes of {service}");
        service_status_until(&client, service, Duration::from_secs(20), &what, |s| (s.nodes.len() == 2).then_some(()))
            .await;
    }
    // Each service its own policy: alpha bakes long in two stages, beta at once.
    for (service, stages) in [("alpha", vec!["1".to_owned(), "100%".into()]), ("beta", vec!["100%".into()])] {
        let policy = pb::RolloutPolicy { stages, ..Default::default() };
        client
            .set_service_policy(pb::SetServicePolicyRequest { service: service.into(), policy: Some(policy) })
            .await
            .unwrap();
    }
    let submit = |service: &str, ttl: u32, bake: &str| pb::SubmitConfigRequest {
        service: service.into(),
        policy: Some(pb::RolloutPolicy { bake: Some(bake.into()), ..Default::default() }),
        ..submit_req(&lite(ttl), bake)
    };
    let a = client.submit_config(submit("alpha", 40, "3s")).await.unwrap().into_inner();
    assert_eq!(rollout_state(&client, "alpha").await, "RUNNING");
    // alpha's lock does not hold beta back.
    let b = client.submit_config(submit("beta", 50, "0s")).await.unwrap().into_inner();
    assert_eq!((a.version, b.version), (1, 1), "each service numbers its own versions");
    let beta_done = service_status_until(&client, "beta", Duration::from_secs(20), "beta rolled out", |s| {
        s.rollout.filter(|r| r.state == "SUCCEEDED")
    })
    .await;
    assert_eq!(beta_done.version, 1);
    assert_eq!(rollout_state(&client, "alpha").await, "RUNNING", "beta finished while alpha still bakes");
    // A second submit to alpha is refused while its rollout runs; beta takes one.
    let e = client.submit_config(submit("alpha", 41, "0s")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let b2 = client.submit_config(submit("beta", 51, "0s")).await.unwrap().into_inner();
    assert_eq!(b2.version, 2);
    service_status_until(&client, "alpha", Duration::from_secs(30), "alpha rolled out", |s| {
        s.rollout.filter(|r| r.state == "SUCCEEDED")
    })
    .await;
    service_status_until(&client, "beta", Duration::from_secs(20), "beta v2 rolled out", |s| {
        (s.stable_version == 2).then_some(())
    })
    .await;
    // Every node runs its own service's version, and nothing else.
    for (service, node) in &nodes {
        let want = if *service == "alpha" { (1, a.sha256.as_str()) } else { (2, b2.sha256.as_str()) };
        node.wait_version(want.0).await;
        let s = node.status().await;
        assert_eq!(s["sha256"].as_str(), Some(want.1), "{service}: {s}");
    }
    for (service, n) in [("alpha", 1), ("beta", 2)] {
        let r = pb::ListVersionsRequest { service: service.into() };
        assert_eq!(client.list_versions(r).await.unwrap().into_inner().versions.len(), n, "{service}'s history");
    }
}
