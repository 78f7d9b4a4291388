//! Leadership: failover mid-rollout, a paused ex-leader fenced out by the
//! nodes, reconciliation of nodes that join or come back.

mod common;

use std::time::{Duration, Instant};

use common::*;
use confroll_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_finishes_a_rollout_after_the_leader_is_sigkilled() {
    let _serial = serial().await;
    let mut cl = Cluster::start(3, 4, &lite(30)).await;
    let mut client = cl.rolled_out(&lite(30)).await;
    let (coords, nodes) = (&mut cl.coords, &cl.nodes);

    let v2 = client.submit_config(submit_req(&lite(60), "1500ms")).await.unwrap().into_inner();
    // Let the canary apply, then SIGKILL the leader in the middle of the bake.
    wait_applied(&client, 1).await;
    let old = leader_of(&coords[0]).await;
    let idx = coords.iter().position(|c| c.id == old).unwrap();
    coords[idx].kill9();
    let killed_at = Instant::now();
    let survivor = &coords[(idx + 1) % 3];
    let new = new_leader(survivor, &old).await;
    let failover = killed_at.elapsed();
    let done = wait_rollout_done(survivor, Duration::from_secs(60)).await;
    assert_eq!(done.state, "SUCCEEDED", "{done:?}");
    assert_eq!(done.id, v2.rollout_id, "the new leader finished the same rollout");
    for n in nodes {
        assert_eq!(n.version().await, 2, "node {} did not converge", n.id);
    }
    let survivor_log = coords.iter().find(|c| c.id == new).unwrap().log_text();
    assert!(survivor_log.contains("resuming rollout of the previous leader"), "{survivor_log}");
    // Lease TTL is 2 s: failover within TTL + 1 s (+ slack for a loaded CI machine).
    assert!(failover < Duration::from_secs(6), "failover took {failover:?}");
    eprintln!("leader {old} SIGKILLed; {new} leads after {failover:?}; rollout {} finished", done.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_ex_leader_is_fenced_out_by_the_nodes() {
    let _serial = serial().await;
    // Three replicas: on raft, the two others still form a majority.
    let cl = Cluster::start(3, 3, &lite(30)).await;
    cl.rolled_out(&lite(30)).await;
    let (coords, nodes) = (&cl.coords, &cl.nodes);
    let old_token = nodes[0].fencing_token().await;
    assert!(old_token > 0);

    // Pause the leader (a GC pause, a frozen VM): it cannot know it was paused.
    let old = leader_of(&coords[0]).await;
    let paused = coords.iter().find(|c| c.id == old).unwrap();
    let others: Vec<&Coord> = coords.iter().filter(|c| c.id != old).collect();
    let sig = |s: &str| std::process::Command::new("kill").args([s, &paused.pid().to_string()]).status().unwrap();
    assert!(sig("-STOP").success());
    let new = new_leader(others[0], &old).await;
    let other = *others.iter().find(|c| c.id == new).expect("one of the others leads");
    // The new leader's first reconciliation pass fences every node with its token.
    let new_token = eventually(Duration::from_secs(20), "nodes to learn the new token", || async {
        let tokens = fencing_tokens(nodes).await;
        (tokens.iter().all(|t| *t > old_token)).then(|| tokens[0])
    })
    .await;
    // The new leader rolls out v2 while the old one is frozen.
    let mut c2 = other.client().await;
    c2.submit_config(submit_req(&lite(45), "0s")).await.unwrap();
    assert_eq!(wait_rollout_done(other, Duration::from_secs(30)).await.state, "SUCCEEDED");

    // The old leader wakes up. Whatever it still tries carries its old
    // token: a push with that token is refused by every node.
    assert!(sig("-CONT").success());
    let cluster = cluster_id(&c2).await;
    for n in nodes {
        let content = lite(99);
        // Signed with the cluster's key, as the old leader would: only the
        // token tells it apart.
        let stale = pb::ApplyRequest {
            service: "default".into(),
            version: 1,
            sha256: confroll_node::node::sha256_hex(content.as_bytes()),
            content: content.into_bytes(),
            fencing_token: old_token,
            rollout_id: "stale".into(),
            sequence: 0,
            cluster_id: cluster.clone(),
            node_id: String::new(),
            signature: None,
            issued_at_ms: 0,
            expires_at_ms: 0,
        };
        let err = n.agent().await.apply(signed(stale, &n.id)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(&format!("stale fencing token {old_token}")), "{}", err.message());
        assert_eq!(n.version().await, 2, "node {} was changed by a stale push", n.id);
    }
    // The pause cost no node its registration: heartbeats that a follower
    // forwarded to the frozen leader were retried with its successor.
    for n in nodes {
        let log = std::fs::read_to_string(&n.log).unwrap();
        assert!(!log.contains("registration expired"), "node {} lost its registration during the pause:\n{log}", n.id);
    }
    // It notices it lost its lease and steps down; it never pushed anything.
    eventually(Duration::from_secs(10), "the old leader to step down", || async {
        let log = paused.log_text();
        (log.contains("stepping down") || log.contains("lost leadership")).then_some(())
    })
    .await;
    // Leadership settles on one replica that every replica names. On raft
    // (no pre-vote) the woken replica may force an election and win it once
    // caught up; then it leads under a new term, whose token, higher than
    // every earlier one, its first reconciliation gives every node.
    let (pc, oc) = (paused.client().await, other.client().await);
    let settled = eventually(Duration::from_secs(20), "the replicas to agree on a leader", || async {
        let l = leader_via(&pc).await;
        (leader_via(&oc).await == l).then_some(l)
    })
    .await;
    if settled != new {
        eventually(Duration::from_secs(20), "nodes to learn the newest token", || async {
            fencing_tokens(nodes).await.iter().all(|t| *t > new_token).then_some(())
        })
        .await;
    }
    eprintln!(
        "paused {old}: token {old_token} refused by all nodes; {new} led with token {new_token}; {settled} leads now"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_and_returning_nodes_are_brought_to_the_stable_version() {
    let _serial = serial().await;
    let store = Backing::start(1);
    let dir = tempfile::tempdir().unwrap();
    let c1 = Coord::start(&store, "c1", dir.path(), &[]);
    let cfg = dir.path().join("base.yaml");
    std::fs::write(&cfg, lite(30)).unwrap();
    let mut n1 = NodeProc::start("n1", &cfg, dir.path(), &[&c1], &[]);
    wait_registered(&c1, 1).await;
    let mut client = c1.client().await;
    client.submit_config(submit_req(&lite(77), "0s")).await.unwrap();
    wait_rollout_done(&c1, Duration::from_secs(30)).await;
    assert_eq!(n1.version().await, 1);

    // A node that joins later, with a local config of its own, converges.
    let n2 = NodeProc::start("n2", &cfg, dir.path(), &[&c1], &[]);
    eventually(Duration::from_secs(20), "n2 on the stable version", || async {
        let s = n2.status().await;
        (s["version"] == 1 && s["config"]["cache"]["ttl"] == "1m 17s").then_some(())
    })
    .await;

    // Both nodes were pushed to (n2 by reconciliation): two push streams.
    let streams = || async {
        let m = c1.metrics().await;
        m.lines().find_map(|l| l.strip_prefix("confroll_push_streams{").and_then(|r| r.split(' ').nth(1))?.parse().ok())
    };
    eventually(Duration::from_secs(10), "push streams to both nodes", || async {
        (streams().await == Some(2u64)).then_some(())
    })
    .await;

    // n1 dies; v2 rolls out without it; n1 comes back on its state dir and is brought to v2.
    n1.kill9();
    status_until(&client, Duration::from_secs(20), "n1's registration to expire", |s| {
        (s.nodes.len() == 1).then_some(())
    })
    .await;
    // The leader closes the push stream it held to n1 (one left, n2's).
    eventually(Duration::from_secs(10), "the push stream to n1 to be closed", || async {
        (streams().await == Some(1u64)).then_some(())
    })
    .await;
    client.submit_config(submit_req(&lite(88), "0s")).await.unwrap();
    assert_eq!(wait_rollout_done(&c1, Duration::from_secs(30)).await.state, "SUCCEEDED");
    let n1 = NodeProc::start("n1", &cfg, dir.path(), &[&c1], &[]);
    assert_eq!(n1.version().await, 1, "a restarted node boots on its last applied config");
    n1.wait_version(2).await;
    // The live version shows as soon as it is swapped in; the reload's
    // report only once the config is persisted. A kill -9 in between would
    // (rightly) bring the node back on v1, unacknowledged.
    eventually(Duration::from_secs(10), "n1's reload to v2 to be persisted", || async {
        (n1.status().await["last_reload"]["to_version"] == 2).then_some(())
    })
    .await;

    // With no coordinator at all, a restarted node still serves its last config.
    drop(c1);
    let mut n1 = n1;
    n1.kill9();
    let n1 = NodeProc::start("n1", &cfg, dir.path(), &[], &[]);
    assert_eq!(n1.version().await, 2);
    drop(n2);
}
