//! The embedded raft store survives: kill -9 of any replica mid-rollout, and
//! a restart of all three replicas with history, stable version and log
//! compaction intact; and every replica reads a write as soon as it is
//! acknowledged. Real coordinator and node processes on loopback.

mod common;

use std::time::Duration;

use common::*;
use confroll_proto::v1::{self as pb, coordinator_client::CoordinatorClient};
use tonic::transport::Channel;

async fn history(client: &CoordinatorClient<Channel>) -> Vec<(u64, String, String)> {
    let v = client.clone().list_versions(pb::ListVersionsRequest::default()).await.unwrap().into_inner().versions;
    v.into_iter().map(|v| (v.version, v.sha256, v.state)).collect()
}

async fn stable(client: &CoordinatorClient<Channel>) -> u64 {
    client.clone().get_status(pb::GetStatusRequest::default()).await.unwrap().into_inner().stable_version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_replicas_restart_with_history_intact_after_log_compaction() {
    let _serial = serial().await;
    // Snapshot every 20 entries, so the restart below reads a snapshot plus a
    // compacted log rather than the whole log.
    let extra = ["--raft-snapshot-every", "20"];
    let mut cl = Cluster::start_with(Backing::raft(3), 3, 2, &lite(30), &extra).await;
    let client = cl.coords[0].client().await;
    for ttl in [41, 42, 43, 44] {
        cl.rolled_out(&lite(ttl)).await;
    }
    let before = history(&client).await;
    assert_eq!(before.len(), 4);
    assert_eq!(stable(&client).await, 4);
    // Heartbeat refreshes keep the log growing: wait for a snapshot everywhere.
    eventually(Duration::from_secs(30), "a snapshot on every replica", || async {
        (1..=3).all(|i| cl.store.data_dir(&format!("c{i}")).unwrap().join("snapshot.bin").exists()).then_some(())
    })
    .await;

    // kill -9 all three, then start them again on the same ports and data dirs.
    let ports: Vec<(u16, u16)> = cl.coords.iter().map(|c| (c.port, c.http_port)).collect();
    for c in &mut cl.coords {
        c.kill9();
    }
    cl.coords = (1..=3)
        .map(|i| {
            let (p, h) = ports[i - 1];
            Coord::start_on(&cl.store, &format!("c{i}"), cl.dir.path(), &extra, p, h)
        })
        .collect();
    leader_of(&cl.coords[0]).await;
    for c in &cl.coords {
        let cc = c.client().await;
        // A replica that was behind when killed (a committed entry needs only
        // a majority) catches up from the leader: wait for the same history,
        // then check it. Anything else within 20 s is lost history.
        let what = format!("replica {} to show the history from before the restart", c.id);
        eventually(Duration::from_secs(20), &what, || async { (history(&cc).await == before).then_some(()) }).await;
        assert_eq!(stable(&cc).await, 4, "replica {}", c.id);
    }
    // And the group keeps working: v5 rolls out to the nodes.
    cl.rolled_out(&lite(45)).await;
    for n in &cl.nodes {
        n.wait_version(5).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_one_replica_killed_mid_rollout_and_the_rollout_still_ends() {
    let _serial = serial().await;
    // Kill a follower, then (in a second rollout) the leader, each during a bake.
    for kill_leader in [false, true] {
        let mut cl = Cluster::start_with(Backing::raft(3), 3, 3, &lite(30), &[]).await;
        let leader = leader_of(&cl.coords[0]).await;
        let victim = cl.coords.iter().position(|c| (c.id == leader) == kill_leader).unwrap();
        let survivor = (victim + 1) % 3;
        let client = cl.coords[survivor].client().await;
        submit_until_accepted(&client, submit_req(&lite(50), "1s")).await;
        wait_applied(&client, 1).await;
        cl.coords[victim].kill9();
        let done = wait_rollout_done(&cl.coords[survivor], Duration::from_secs(60)).await;
        assert_eq!(done.state, "SUCCEEDED", "killed {} (leader: {kill_leader}): {done:?}", cl.coords[victim].id);
        for n in &cl.nodes {
            n.wait_version(1).await;
        }
    }
}

/// A write acknowledged by the leader is read back from every replica at
/// once, as etcd's default (linearizable) reads promise: a follower first
/// learns the leader's commit index and waits until it has applied that far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_reads_a_write_the_moment_it_is_acknowledged() {
    let _serial = serial().await;
    let cl = Cluster::start_with(Backing::raft(3), 3, 1, &lite(30), &[]).await;
    let leader = leader_of(&cl.coords[0]).await;
    let lead = cl.coords.iter().find(|c| c.id == leader).unwrap().client().await;
    let mut clients = Vec::new();
    for c in &cl.coords {
        clients.push((c.id.clone(), c.client().await));
    }
    for round in 1..=8u32 {
        let accepted = submit_until_accepted(&lead, submit_req(&lite(60 + round), "0s")).await;
        assert_eq!(accepted.version, u64::from(round));
        // Every replica at the same instant, right after the acknowledgement.
        let reads = futures::future::join_all(
            clients.iter().map(|(id, c)| async move { (id, history(c).await.first().map(|v| v.0)) }),
        )
        .await;
        for (id, newest) in &reads {
            assert_eq!(
                *newest,
                Some(u64::from(round)),
                "replica {id} missed version {round} after it was acknowledged"
            );
        }
        let done = wait_rollout_done(&cl.coords[0], Duration::from_secs(30)).await;
        assert_eq!(done.state, "SUCCEEDED", "{done:?}");
    }
}

/// A leader SIGKILLed and restarted after its successor rolled out another
/// version: from the moment it serves again, every status it gives with a
/// stable version names the leader that version came from (asked before
/// its reads, it named no leader while it caught up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_reports_no_stable_version_without_its_leader() {
    let _serial = serial().await;
    let mut cl = Cluster::start_with(Backing::raft(3), 3, 1, &lite(30), &[]).await;
    cl.rolled_out(&lite(31)).await;
    let old = leader_of(&cl.coords[0]).await;
    let victim = cl.coords.iter().position(|c| c.id == old).unwrap();
    let survivor = cl.coords[(victim + 1) % 3].client().await;
    let (port, http_port) = (cl.coords[victim].port, cl.coords[victim].http_port);
    cl.coords[victim].kill9();
    submit_until_accepted(&survivor, submit_req(&lite(32), "0s")).await;
    let new = status_until(&survivor, Duration::from_secs(30), "v2 stable under the successor", |s| {
        (s.stable_version == 2 && !s.leader_id.is_empty()).then_some(s.leader_id)
    })
    .await;
    assert_ne!(new, old);

    cl.coords[victim] = Coord::start_on(&cl.store, &old, cl.dir.path(), &[], port, http_port);
    let restarted = cl.coords[victim].client().await;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let (answers, with_stable) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let done = eventually(Duration::from_secs(20), "the restarted replica to name the leader", || {
        let (mut c, answers, with_stable, new) = (restarted.clone(), &answers, &with_stable, &new);
        async move {
            let s = c.get_status(pb::GetStatusRequest::default()).await.ok()?.into_inner();
            answers.fetch_add(1, Relaxed);
            if s.stable_version > 0 {
                with_stable.fetch_add(1, Relaxed);
                assert!(!s.leader_id.is_empty(), "stable v{} reported without a leader", s.stable_version);
            }
            (s.leader_id == *new).then_some(s.stable_version)
        }
    })
    .await;
    let (answers, with_stable) = (answers.into_inner(), with_stable.into_inner());
    assert_eq!(done, 2, "the restarted replica reads the successor's stable version");
    assert!(with_stable >= 1 && answers >= with_stable, "{answers} answers, {with_stable} with a stable version");
}
