//! Fencing scoped to a cluster: a coordinator group rebuilt from an empty
//! store (the way out of a lost quorum), or moved from etcd to raft, is a
//! new cluster. Its nodes refuse it and keep serving until an operator
//! adopts them; then they reach the new cluster's version, and the old
//! cluster can never push to them again. Each test picks its stores itself.

mod common;

use std::time::Duration;

use common::*;
use confroll_node::node::sha256_hex;
use confroll_proto::v1 as pb;
use tonic::Code;

/// A push of `content` signed with the test key as cluster `cluster`'s
/// leader with `token` would send it to node `node`.
fn push_as(cluster: &str, token: u64, node: &str, version: u64, content: &str) -> pb::ApplyRequest {
    signed(
        pb::ApplyRequest {
            service: "default".into(),
            version,
            sha256: sha256_hex(content.as_bytes()),
            content: content.as_bytes().to_vec(),
            fencing_token: token,
            sequence: u64::MAX / 2,
            cluster_id: cluster.into(),
            rollout_id: "replay".into(),
            ..Default::default()
        },
        node,
    )
}

/// The rebuild story: `replicas` coordinators on `first`, the group lost,
/// then as many on `second` on the same ports (the nodes know these
/// addresses). With more than one replica, the quorum is lost first.
async fn rebuild_then_adopt(first: Backing, second: Backing, replicas: usize) {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..replicas).map(|_| (free_port(), free_port())).collect();
    let start = |store: &Backing| -> Vec<Coord> {
        let ids = (1..=replicas).map(|i| format!("c{i}"));
        ids.zip(&ports).map(|(id, (p, h))| Coord::start_on(store, &id, dir.path(), &[], *p, *h)).collect()
    };
    let mut coords = start(&first);
    let cfg = dir.path().join("base.yaml");
    std::fs::write(&cfg, lite(30)).unwrap();
    let all: Vec<&Coord> = coords.iter().collect();
    let nodes: Vec<NodeProc> =
        (1..=2).map(|i| NodeProc::start(&format!("n{i}"), &cfg, dir.path(), &all, &[])).collect();
    let c1 = &coords[0];
    let client = c1.client().await;
    let old = cluster_id(&client).await;
    wait_registered(c1, 2).await;
    submit_until_accepted(&client, submit_req(&lite(31), "0s")).await;
    wait_rollout_done(c1, Duration::from_secs(20)).await;
    let v2 = submit_until_accepted(&client, submit_req(&lite(32), "0s")).await;
    wait_rollout_done(c1, Duration::from_secs(20)).await;
    for n in &nodes {
        n.wait_version(v2.version).await;
    }
    let old_token = nodes[0].fencing_token().await;

    // The quorum is lost for good: writes stop (the nodes keep serving).
    // The way out: a new group from empty data dirs (or another store).
    if replicas > 1 {
        for c in &mut coords[1..] {
            c.kill9();
        }
        let mut c = client.clone();
        let e = tokio::time::timeout(Duration::from_secs(30), c.submit_config(submit_req(&lite(33), "0s")))
            .await
            .expect("a submit without quorum gives up by itself")
            .unwrap_err();
        assert!(matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded), "{e:?}");
    }
    for c in &mut coords {
        c.kill9();
    }
    for i in 1..=replicas {
        if let Some(d) = first.data_dir(&format!("c{i}")) {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
    let coords = start(&second);
    let c1 = &coords[0];
    let client = c1.client().await;
    let new = cluster_id(&client).await;
    assert_ne!(new, old, "a rebuilt store is a new cluster");
    // The nodes register, reporting the old cluster: not members here.
    let status = status_until(&client, Duration::from_secs(20), "the nodes to register", |s| {
        (s.nodes.len() == 2 && s.nodes.iter().all(|n| n.cluster_id == old)).then_some(s)
    })
    .await;
    assert!(status.nodes.iter().all(|n| n.version == v2.version && n.config_cluster_id == old), "{status:?}");

    // The new cluster's first version: its rollout has no member, the
    // nodes keep the config they run (not the new cluster's v1) and serve.
    let first_new = submit_until_accepted(&client, submit_req(&lite(77), "0s")).await;
    assert_eq!(first_new.version, 1, "the new cluster numbers from 1 again");
    let done = wait_rollout_done(c1, Duration::from_secs(20)).await;
    assert_eq!((done.state.as_str(), done.total_nodes), ("SUCCEEDED", 0), "{done:?}");
    // A push of the new cluster reaching a node anyway is refused, and so
    // is one with a token lower than the old cluster's (the report's case).
    let mut agent = nodes[0].agent().await;
    let e = agent.apply(push_as(&new, 2, "n1", 1, &lite(77))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&format!("belongs to coordinator cluster `{old}`")), "{}", e.message());
    for n in &nodes {
        let s = n.status().await;
        assert_eq!((s["version"].as_u64(), s["cluster_id"].as_str()), (Some(v2.version), Some(old.as_str())), "{s}");
        let work = reqwest::get(format!("http://127.0.0.1:{}/work", n.http_port)).await.unwrap();
        assert_eq!(work.status(), 200, "node {} keeps serving", n.id);
    }

    // The adopt step: the nodes move, then reach the new cluster's stable version.
    let mut c = client.clone();
    let r = c
        .adopt_nodes(pb::AdoptNodesRequest { from_cluster_id: old.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut adopted = r.adopted.clone();
    adopted.sort();
    assert_eq!((r.cluster_id.as_str(), adopted), (new.as_str(), vec!["n1".to_owned(), "n2".to_owned()]), "{r:?}");
    let sha = sha256_hex(lite(77).as_bytes());
    for n in &nodes {
        eventually(Duration::from_secs(20), "the node to run the new cluster's v1", || async {
            let s = n.status().await;
            (s["version"] == 1 && s["config_cluster_id"] == new.as_str() && s["sha256"] == sha.as_str()).then_some(())
        })
        .await;
    }
    let status = status_until(&client, Duration::from_secs(20), "the nodes to report the new cluster", |s| {
        s.nodes.iter().all(|n| n.cluster_id == s.cluster_id && n.config_cluster_id == s.cluster_id).then_some(s)
    })
    .await;
    assert_eq!(status.adopted_from, std::slice::from_ref(&old));

    // An old-cluster replica that wakes up cannot push, whatever its token,
    // nor take the nodes back.
    let e = agent.apply(push_as(&old, old_token + 1_000, "n1", 9, &lite(99))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&format!("belongs to coordinator cluster `{new}`")), "{}", e.message());
    let mut back = pb::AdoptRequest {
        service: "default".into(),
        node_id: "n1".into(),
        from_cluster_id: new.clone(),
        cluster_id: old.clone(),
        fencing_token: old_token + 1_000,
        ..Default::default()
    };
    push_key().sign_adopt(&mut back);
    let e = agent.adopt(back).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("never goes back"), "{}", e.message());
    assert_eq!(nodes[0].version().await, 1);

    // Later rollouts of the new cluster reach the adopted nodes as usual.
    let mut c = client.clone();
    let v = c.submit_config(submit_req(&lite(78), "0s")).await.unwrap().into_inner();
    assert_eq!(wait_rollout_done(c1, Duration::from_secs(20)).await.total_nodes, 2);
    for n in &nodes {
        n.wait_version(v.version).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_group_rebuilt_from_empty_data_dirs_adopts_its_nodes() {
    let _serial = serial().await;
    let store = Backing::raft(3);
    // The same group, same ports: only the data is gone.
    let peers = match &store {
        Backing::Raft { peers, .. } => peers.clone(),
        Backing::Etcd(_) => unreachable!(),
    };
    let again = Backing::Raft { peers, dir: tempfile::tempdir().unwrap() };
    rebuild_then_adopt(store, again, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_from_etcd_to_raft_adopts_the_nodes() {
    let _serial = serial().await;
    rebuild_then_adopt(Backing::Etcd(Etcd::start()), Backing::raft(1), 1).await;
}
