//! Gathers a scenario's records once its faults are over: the nodes' apply
//! journals, the coordinators' leadership and rollout events (their JSON
//! logs), and the final reads (every version, the stable one, and each
//! node's own status, polled until it converges or the bound passes).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use confroll_proto::v1 as pb;

use crate::{
    cluster::{Cluster, ports},
    history::now_ms,
    records::{FinalRead, JournalEntry, LeaderEvent, LeaderEventKind, NodeRead, RolloutEvent, VersionRead},
};

/// Every line of node `node`'s journal (the rotated file first).
pub fn journal(state_dir: &Path, node: &str) -> Vec<JournalEntry> {
    let mut out = Vec::new();
    for f in ["applies.jsonl.1", "applies.jsonl"] {
        let text = std::fs::read_to_string(state_dir.join(f)).unwrap_or_default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<JournalEntry>(line) {
                Ok(mut e) => {
                    if e.node.is_empty() {
                        e.node = node.to_owned();
                    }
                    out.push(e);
                }
                Err(err) => tracing::warn!(%node, error = %err, line, "unreadable journal line"),
            }
        }
    }
    out
}

/// The leadership and rollout events in a coordinator's JSON log.
pub fn coordinator_events(replica: &str, log: &str) -> (Vec<LeaderEvent>, Vec<RolloutEvent>) {
    let (mut leaders, mut rollouts) = (Vec::new(), Vec::new());
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let f = &v["fields"];
        let Some(at_ms) = f["at_ms"].as_u64() else { continue };
        let msg = f["message"].as_str().unwrap_or_default();
        let s = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
        let kind = match msg {
            "elected leader" => {
                let token = f["token"].as_u64().unwrap_or_default();
                leaders.push(LeaderEvent { replica: replica.into(), at_ms, kind: LeaderEventKind::Elected { token } });
                continue;
            }
            "lost leadership; stepping down" | "shutting down: resigning leadership" => {
                leaders.push(LeaderEvent { replica: replica.into(), at_ms, kind: LeaderEventKind::SteppedDown });
                continue;
            }
            "version stored; rollout starting" | "manual rollback starting" => "started",
            "resuming rollout of the previous leader" => "resumed",
            "rollout finished" => "finished",
            _ => continue,
        };
        rollouts.push(RolloutEvent {
            replica: replica.into(),
            at_ms,
            service: s("service"),
            rollout_id: s("rollout"),
            version: f["version"].as_u64().unwrap_or_default(),
            kind: kind.into(),
            outcome: s("outcome").to_uppercase(),
        });
    }
    (leaders, rollouts)
}

/// Every version and the stable one, from whichever replica answers.
pub async fn read_versions(cl: &Cluster, within: Duration) -> anyhow::Result<(Vec<VersionRead>, u64)> {
    let urls: Vec<String> = (0..cl.coords.len()).map(|i| cl.url(i)).collect();
    cl.net
        .on_hub(async move {
            let deadline = Instant::now() + within;
            loop {
                for u in &urls {
                    if let Some(r) = read_versions_of(u).await {
                        return Ok(r);
                    }
                }
                if Instant::now() > deadline {
                    anyhow::bail!("no replica answered ListVersions and GetStatus within {within:?}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
}

async fn read_versions_of(url: &str) -> Option<(Vec<VersionRead>, u64)> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_owned()).ok()?.timeout(Duration::from_secs(3));
    let mut c = pb::coordinator_client::CoordinatorClient::new(ch.connect().await.ok()?);
    let status = c.get_status(pb::GetStatusRequest::default()).await.ok()?.into_inner();
    // A follower may answer from a store it has not caught up on: ask the
    // leader's view (the status names it).
    if status.leader_id.is_empty() {
        return None;
    }
    let list = c.list_versions(pb::ListVersionsRequest::default()).await.ok()?.into_inner();
    let mut versions: Vec<VersionRead> = list
        .versions
        .into_iter()
        .map(|v| VersionRead {
            version: v.version,
            sha256: v.sha256,
            state: v.state,
            reason: v.reason,
            rollout_id: v.rollout_id,
        })
        .collect();
    versions.sort_by_key(|v| v.version);
    Some((versions, status.stable_version))
}

/// What node `i` runs, asked over its HTTP status (version, sha256).
pub async fn node_status(cl: &Cluster, i: usize) -> Option<(u64, String)> {
    let url = format!("http://{}:{}/api/v2/config/status", cl.nodes[i].host.ip, ports::NODE_HTTP);
    cl.net
        .on_hub(async move {
            let c = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().ok()?;
            let v: serde_json::Value = c.get(url).send().await.ok()?.json().await.ok()?;
            Some((v["version"].as_u64()?, v["sha256"].as_str()?.to_owned()))
        })
        .await
}

/// Polls every node until it runs `version` with `sha256` or `deadline`
/// passes; what each runs in the end and when it first ran the target.
pub async fn converge(cl: &Cluster, version: u64, sha256: &str, deadline: Instant) -> Vec<NodeRead> {
    let mut reads: Vec<NodeRead> = cl
        .nodes
        .iter()
        .map(|n| NodeRead { node: n.name.clone(), live: true, version: 0, sha256: String::new(), converged_ms: None })
        .collect();
    loop {
        for (i, r) in reads.iter_mut().enumerate() {
            if r.converged_ms.is_some() {
                continue;
            }
            if let Some((v, sha)) = node_status(cl, i).await {
                if v == version && sha == sha256 {
                    r.converged_ms = Some(now_ms());
                }
                (r.version, r.sha256) = (v, sha);
            }
        }
        if reads.iter().all(|r| r.converged_ms.is_some()) || Instant::now() > deadline {
            return reads;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The final read of the `default` service.
pub async fn final_read(cl: &Cluster, bound: Duration) -> anyhow::Result<FinalRead> {
    let (versions, stable) = read_versions(cl, Duration::from_secs(30)).await?;
    let sha = versions.iter().find(|v| v.version == stable).map(|v| v.sha256.clone()).unwrap_or_default();
    let healed = Instant::now() - Duration::from_millis(now_ms().saturating_sub(cl.healed_ms()));
    // Poll a little past the bound, so a late node shows how late it was.
    let nodes = converge(cl, stable, &sha, healed + bound + Duration::from_secs(5)).await;
    Ok(FinalRead { service: "default".into(), versions, stable_version: stable, nodes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_log_lines_become_leader_and_rollout_events() {
        let log = [
            r#"{"timestamp":"t","level":"INFO","fields":{"message":"elected leader","replica":"c2","token":7,"at_ms":100},"target":"x"}"#,
            r#"{"timestamp":"t","level":"INFO","fields":{"message":"version stored; rollout starting","service":"default","version":3,"rollout":"default-ab","nodes":5,"at_ms":110},"target":"x"}"#,
            "not json: a panic message, say",
            r#"{"timestamp":"t","level":"INFO","fields":{"message":"some other line","at_ms":115},"target":"x"}"#,
            r#"{"timestamp":"t","level":"INFO","fields":{"message":"rollout finished","service":"default","rollout":"default-ab","version":3,"outcome":"rolled_back","at_ms":120},"target":"x"}"#,
            r#"{"timestamp":"t","level":"WARN","fields":{"message":"lost leadership; stepping down","replica":"c2","at_ms":130},"target":"x"}"#,
        ]
        .join("\n");
        let (leaders, rollouts) = coordinator_events("c2", &log);
        assert_eq!(
            leaders,
            [
                LeaderEvent { replica: "c2".into(), at_ms: 100, kind: LeaderEventKind::Elected { token: 7 } },
                LeaderEvent { replica: "c2".into(), at_ms: 130, kind: LeaderEventKind::SteppedDown },
            ]
        );
        let kinds: Vec<(&str, u64, &str)> =
            rollouts.iter().map(|r| (r.kind.as_str(), r.at_ms, r.outcome.as_str())).collect();
        assert_eq!(kinds, [("started", 110, ""), ("finished", 120, "ROLLED_BACK")]);
        assert!(rollouts.iter().all(|r| r.rollout_id == "default-ab" && r.version == 3 && r.service == "default"));
    }

    #[test]
    fn a_journal_is_read_rotated_file_first_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let line = |v: u64| {
            format!(r#"{{"at_ms":{v},"trigger":"push","version":{v},"sha256":"ab","outcome":"applied","detail":""}}"#)
        };
        std::fs::write(dir.path().join("applies.jsonl.1"), format!("{}\n", line(1))).unwrap();
        std::fs::write(dir.path().join("applies.jsonl"), format!("{}\n{}\n{{\"at_ms\":", line(2), line(3))).unwrap();
        let j = journal(dir.path(), "n4");
        assert_eq!(j.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(j.iter().all(|e| e.node == "n4"), "the node is filled in from where the journal is");
    }
}
