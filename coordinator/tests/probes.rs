//! What a Kubernetes StatefulSet relies on: readiness and liveness probes,
//! ids and raft peers taken from pod names and DNS names, flags refused
//! when a deployment gets them wrong, and a leader that hands over on
//! SIGTERM instead of making everyone wait for its lease.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `GET http://127.0.0.1:{port}{path}`: status and body.
async fn probe(port: u16, path: &str) -> (u16, String) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    match client.get(format!("http://127.0.0.1:{port}{path}")).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Waits until `path` on `port` answers `status`; the body.
async fn probe_until(port: u16, path: &str, status: u16, within: Duration) -> String {
    let what = format!("{path} on :{port} to answer {status}");
    eventually(within, &what, || async {
        let (s, body) = probe(port, path).await;
        (s == status).then_some(body)
    })
    .await
}

/// Three raft replicas named like StatefulSet pods (`confroll-0..2`), each
/// started with the same `--raft-id ordinal`, peers given by host name
/// (`localhost`, resolved at each connection) and an explicit
/// `--raft-listen`: they elect a leader and turn ready. A replica that loses
/// its quorum turns unready (503, with the reason) while staying alive; it
/// is ready again once the quorum is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_means_a_known_leader_and_a_reachable_store() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let raft: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers: Vec<String> = raft.iter().enumerate().map(|(i, p)| format!("{}=localhost:{p}", i + 1)).collect();
    let args = |i: usize| -> Vec<String> {
        let data = dir.path().join(format!("raft-{i}")).display().to_string();
        ["--store", "raft", "--raft-id", "ordinal", "--raft-peers", &peers.join(","), "--data-dir", &data]
            .into_iter()
            .map(str::to_owned)
            .chain(["--raft-listen".to_owned(), format!("127.0.0.1:{}", raft[i])])
            .collect()
    };
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let start =
        |i: usize| Coord::start_with(&args(i), &format!("confroll-{i}"), dir.path(), &[], ports[i].0, ports[i].1);
    let mut coords: Vec<Coord> = (0..3).map(start).collect();

    let mut leaders = Vec::new();
    for c in &coords {
        let body = probe_until(c.http_port, "/readyz", 200, Duration::from_secs(30)).await;
        leaders.push(body.trim().strip_prefix("ok: leader ").unwrap_or_else(|| panic!("{body}")).to_owned());
        assert_eq!(probe(c.http_port, "/healthz").await.0, 200);
    }
    assert!(leaders.iter().all(|l| *l == leaders[0]), "they disagree on the leader: {leaders:?}");
    assert!(leaders[0].starts_with("confroll-"), "{leaders:?}");
    // The raft ids came from the ordinals: confroll-0 is raft id 1.
    assert!(coords[0].log_text().contains("raft_id=1"), "{}", coords[0].log_text());
    assert!(coords[2].log_text().contains("raft_id=3"), "{}", coords[2].log_text());

    // Two of three gone: the survivor cannot reach a quorum.
    coords[1].kill9();
    coords[2].kill9();
    let body = probe_until(coords[0].http_port, "/readyz", 503, Duration::from_secs(20)).await;
    assert!(body.starts_with("not ready: "), "{body}");
    // Alive all the same: a store outage must not get it restarted.
    assert_eq!(probe(coords[0].http_port, "/healthz").await.0, 200);

    coords[1] = start(1);
    coords[2] = start(2);
    for c in &coords {
        probe_until(c.http_port, "/readyz", 200, Duration::from_secs(30)).await;
    }
}

/// On SIGTERM (a rolling update, a drained node) the leader resigns before
/// it exits: on etcd its lease is revoked and a survivor leads at once,
/// instead of a lease TTL later as after a SIGKILL. Both handovers are
/// measured here, one after the other, on the same cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigtermed_leader_hands_over_before_its_lease_runs_out_on_etcd() {
    let _serial = serial().await;
    sigterm_against_sigkill(Backing::Etcd(Etcd::start())).await;
}

/// The same on the embedded raft store: the leader commits its resignation,
/// then asks its most up-to-date follower to run for raft leader at once
/// (openraft 0.9 has no leader transfer; the others would wait out the
/// leader lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigtermed_leader_hands_over_before_its_lease_runs_out_on_raft() {
    let _serial = serial().await;
    sigterm_against_sigkill(Backing::raft(3)).await;
}

async fn sigterm_against_sigkill(store: Backing) {
    let dir = tempfile::tempdir().unwrap();
    let mut coords: Vec<Coord> = (1..=3).map(|i| Coord::start(&store, &format!("c{i}"), dir.path(), &[])).collect();
    let mut handover = Vec::new();
    for stop in ["SIGTERM", "SIGKILL"] {
        let old = leader_of(&coords[0]).await;
        let idx = coords.iter().position(|c| c.id == old).unwrap();
        if handover.is_empty() {
            publish_node_schema(&coords[idx].client().await, "").await;
        }
        // A leader that has led for a while, as in production (on raft, one
        // that took office less than TTL/2 ago waits out the rest before it
        // can hand over: see RaftStore::hand_over).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let survivor = (idx + 1) % 3;
        let mut client = coords[survivor].client().await;
        let t0 = Instant::now();
        if stop == "SIGTERM" {
            coords[idx].sigterm();
        } else {
            coords[idx].kill9();
        }
        let new = status_until(&client, Duration::from_secs(20), "a new leader", |s| {
            (!s.leader_id.is_empty() && s.leader_id != old).then_some(s.leader_id)
        })
        .await;
        let took = t0.elapsed();
        // The new leader takes writes.
        client.submit_config(submit_req(&lite(40 + handover.len() as u32), "0s")).await.unwrap();
        if stop == "SIGTERM" {
            let status = coords[idx].wait_exit(Duration::from_secs(20)).expect("the SIGTERMed leader exits");
            assert!(status.success(), "{stop}: {status:?}");
            let log = coords[idx].log_text();
            assert!(log.contains("resigning"), "{log}");
        }
        eprintln!("{stop}: {old} → {new} in {took:?}");
        handover.push(took);
        let (id, port, http_port) = (coords[idx].id.clone(), coords[idx].port, coords[idx].http_port);
        coords[idx] = Coord::start_on(&store, &id, dir.path(), &[], port, http_port);
    }
    let (term, kill) = (handover[0], handover[1]);
    eprintln!("{}: handover after SIGTERM {term:?}, after SIGKILL {kill:?} (lease TTL 2 s)", Backing::kind_of(&store));
    assert!(term < kill, "a resigning leader must hand over faster than a killed one: {term:?} vs {kill:?}");
}

/// Deployment mistakes get a clear error and a non-zero exit, not a replica
/// that runs half-configured.
#[test]
fn flags_a_statefulset_gets_wrong_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(coordinator_bin()).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let raft = ["--store", "raft", "--raft-peers", "1=127.0.0.1:1,2=127.0.0.1:2", "--data-dir", &data];
    let err = run(&[&["--id", "c1", "--listen", "127.0.0.1:0", "--raft-id", "ordinal"][..], &raft[..]].concat());
    assert!(err.contains("--raft-id") && err.contains("ends in -N"), "{err}");
    let err = run(&[&["--id", "c-7", "--listen", "127.0.0.1:0", "--raft-id", "ordinal"][..], &raft[..]].concat());
    assert!(err.contains("does not name raft id 8"), "{err}");
    let err = run(&[&["--id", "c-0", "--listen", "0.0.0.0:0"][..], &raft[..]].concat());
    assert!(err.contains("--advertise"), "{err}");
    let err = run(&[&["--id", "", "--listen", "127.0.0.1:0"][..], &raft[..]].concat());
    assert!(err.contains("--id must not be empty"), "{err}");
}
