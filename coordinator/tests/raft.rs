//! The embedded raft store survives: kill -9 of any replica mid-rollout, and
//! a restart of all three replicas with history, stable version and log
//! compaction intact. Real coordinator and node processes on loopback.

mod common;

use std::time::Duration;

use common::*;
use confroll_proto::v1 as pb;

async fn history(c: &Coord) -> Vec<(u64, String, String)> {
    let mut client = c.client().await;
    let v = client.list_versions(pb::ListVersionsRequest::default()).await.unwrap().into_inner().versions;
    v.into_iter().map(|v| (v.version, v.sha256, v.state)).collect()
}

async fn stable(c: &Coord) -> u64 {
    c.client().await.get_status(pb::GetStatusRequest::default()).await.unwrap().into_inner().stable_version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_replicas_restart_with_history_intact_after_log_compaction() {
    let _serial = serial().await;
    let store = Backing::raft(3);
    let dir = tempfile::tempdir().unwrap();
    // Snapshot every 20 entries, so the restart below reads a snapshot plus a
    // compacted log rather than the whole log.
    let extra = ["--raft-snapshot-every", "20"];
    let mut coords: Vec<Coord> = (1..=3).map(|i| Coord::start(&store, &format!("c{i}"), dir.path(), &extra)).collect();
    let cfg = dir.path().join("base.yaml");
    std::fs::write(&cfg, lite(30)).unwrap();
    let refs: Vec<&Coord> = coords.iter().collect();
    let nodes: Vec<NodeProc> =
        (1..=2).map(|i| NodeProc::start(&format!("n{i}"), &cfg, dir.path(), &refs, &[])).collect();
    wait_registered(&coords[0], 2).await;
    let mut client = coords[0].client().await;
    for ttl in [41, 42, 43, 44] {
        client.submit_config(submit_req(&lite(ttl), "0s")).await.unwrap();
        assert_eq!(wait_rollout_done(&coords[0], Duration::from_secs(30)).await.state, "SUCCEEDED");
    }
    let before = history(&coords[0]).await;
    assert_eq!(before.len(), 4);
    assert_eq!(stable(&coords[0]).await, 4);
    // Heartbeat refreshes keep the log growing: wait for a snapshot everywhere.
    eventually(Duration::from_secs(30), "a snapshot on every replica", || async {
        (1..=3).all(|i| store.data_dir(&format!("c{i}")).unwrap().join("snapshot.bin").exists()).then_some(())
    })
    .await;

    // kill -9 all three, then start them again on the same ports and data dirs.
    let ports: Vec<(u16, u16)> = coords.iter().map(|c| (c.port, c.http_port)).collect();
    for c in &mut coords {
        c.kill9();
    }
    let coords: Vec<Coord> = (1..=3)
        .map(|i| {
            let (p, h) = ports[i - 1];
            Coord::start_on(&store, &format!("c{i}"), dir.path(), &extra, p, h)
        })
        .collect();
    leader_of(&coords[0]).await;
    for c in &coords {
        let h = eventually(Duration::from_secs(20), "the replica to catch up", || async {
            let h = history(c).await;
            (h.len() == before.len()).then_some(h)
        })
        .await;
        assert_eq!(h, before, "replica {} lost history", c.id);
        assert_eq!(stable(c).await, 4, "replica {}", c.id);
    }
    // And the group keeps working: v5 rolls out to the nodes.
    let mut client = coords[0].client().await;
    eventually(Duration::from_secs(20), "a submit to be accepted", || {
        let mut c = client.clone();
        async move { c.submit_config(submit_req(&lite(45), "0s")).await.ok() }
    })
    .await;
    assert_eq!(wait_rollout_done(&coords[0], Duration::from_secs(30)).await.state, "SUCCEEDED");
    for n in &nodes {
        eventually(Duration::from_secs(20), "nodes on v5", || async { (n.version().await == 5).then_some(()) }).await;
    }
    let _ = &mut client;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_one_replica_killed_mid_rollout_and_the_rollout_still_ends() {
    let _serial = serial().await;
    // Kill a follower, then (in a second rollout) the leader, each during a bake.
    for kill_leader in [false, true] {
        let store = Backing::raft(3);
        let dir = tempfile::tempdir().unwrap();
        let coords: Vec<Coord> = (1..=3).map(|i| Coord::start(&store, &format!("c{i}"), dir.path(), &[])).collect();
        let cfg = dir.path().join("base.yaml");
        std::fs::write(&cfg, lite(30)).unwrap();
        let refs: Vec<&Coord> = coords.iter().collect();
        let nodes: Vec<NodeProc> =
            (1..=3).map(|i| NodeProc::start(&format!("n{i}"), &cfg, dir.path(), &refs, &[])).collect();
        wait_registered(&coords[0], 3).await;
        let leader = leader_of(&coords[0]).await;
        let mut coords = coords;
        let victim = coords.iter().position(|c| (c.id == leader) == kill_leader).unwrap();
        let survivor = (victim + 1) % 3;
        let mut client = coords[survivor].client().await;
        // A follower learns who leads with the next heartbeat: retry until then.
        eventually(Duration::from_secs(10), "the submit to be accepted", || {
            let mut c = client.clone();
            async move { c.submit_config(submit_req(&lite(50), "1s")).await.ok() }
        })
        .await;
        wait_applied(&client, 1).await;
        coords[victim].kill9();
        let done = wait_rollout_done(&coords[survivor], Duration::from_secs(60)).await;
        assert_eq!(done.state, "SUCCEEDED", "killed {} (leader: {kill_leader}): {done:?}", coords[victim].id);
        for n in &nodes {
            eventually(Duration::from_secs(20), "every node on v1", || async {
                (n.version().await == 1).then_some(())
            })
            .await;
        }
        let _ = &mut client;
    }
}
