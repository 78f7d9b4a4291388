//! The demo's story, step by step (see the parent module for the list):
//! each step starts processes or asks them something, prints what it sees,
//! and fails the demo when the system does not behave as shown. The
//! processes, clients and waits the steps use live in the parent module.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use confroll_proto::v1 as pb;

use super::{BAKE, Demo, LEASE_TTL, NODES, Node, Proc, REPLICAS, Replica, STEP, connect, poll, port, secs, step};

impl Demo {
    pub(super) async fn story(&mut self) -> anyhow::Result<()> {
        self.start_cluster().await?;
        let v1 = self.good_rollout().await?;
        self.bad_rollout(v1).await?;
        self.leader_killed(v1).await?;
        self.unsigned_push_refused().await?;
        self.print_endpoints();
        Ok(())
    }

    async fn start_cluster(&mut self) -> anyhow::Result<()> {
        step(1, "Start 3 coordinators (their own raft group: no etcd) and 5 nodes (profile: lite)");
        println!("   data, logs and raft state live in {} (removed on exit)", self.dir.path().display());
        // The cluster's push key: coordinators sign, nodes trust the public half.
        let key = confroll_common::trust::PushKey::generate();
        let (key_file, pub_file) = (self.dir.path().join("push.key"), self.dir.path().join("push.pub"));
        std::fs::write(&key_file, key.to_pem()).context("write the push key")?;
        std::fs::write(&pub_file, key.public_pem()).context("write the push public key")?;
        // The agents' certificate (self-signed for the loopback address).
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .context("make the agents' certificate")?;
        let (cert_file, cert_key) = (self.dir.path().join("agent.pem"), self.dir.path().join("agent.key"));
        std::fs::write(&cert_file, cert.cert.pem()).context("write the agent certificate")?;
        std::fs::write(&cert_key, cert.signing_key.serialize_pem()).context("write the agent key")?;
        println!("   pushes signed with key {} (push.key / push.pub), node agents serve TLS (agent.pem)", key.id());
        let raft: Vec<u16> = (0..REPLICAS).map(|_| port()).collect::<anyhow::Result<_>>()?;
        let peers: Vec<String> = raft.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect();
        for n in 1..=REPLICAS {
            let (api, http) = (port()?, port()?);
            let data = self.dir.path().join(format!("c{n}"));
            let args: Vec<String> = [
                "--id",
                &format!("c{n}"),
                "--listen",
                &format!("127.0.0.1:{api}"),
                "--http-listen",
                &format!("127.0.0.1:{http}"),
                "--store",
                "raft",
                "--raft-id",
                &n.to_string(),
                "--raft-peers",
                &peers.join(","),
                "--data-dir",
                &data.display().to_string(),
                "--lease-ttl",
                LEASE_TTL,
                "--default-bake",
                BAKE,
                "--default-health-interval",
                "200ms",
                "--registration-ttl",
                "3s",
                "--push-key",
                &key_file.display().to_string(),
                "--agent-ca",
                &cert_file.display().to_string(),
            ]
            .map(str::to_owned)
            .to_vec();
            let log = self.dir.path().join(format!("c{n}.log"));
            let proc = Proc::spawn(&format!("c{n}"), &self.bins.coordinator, &args, log)?;
            println!(
                "   c{n}  api 127.0.0.1:{api}  raft 127.0.0.1:{}  metrics http://127.0.0.1:{http}/metrics  (pid {})",
                raft[n - 1],
                proc.pid()
            );
            self.replicas.push(Replica { n, api, http, args, proc });
        }
        for r in &mut self.replicas {
            r.proc.wait_listening(r.api).await?;
        }
        let started = Instant::now();
        let leader = self.leader(None).await?;
        println!("   leader elected: {} ({:.1} s after the replicas listened)", leader, secs(started.elapsed()));

        let config = self.dir.path().join("node.yaml");
        std::fs::write(&config, "profile: lite\ncache: {ttl: 30s}\n").context("write the nodes' first config")?;
        let urls = self.urls().join(",");
        for k in 1..=NODES {
            let id = format!("n{k}");
            let (http, agent) = (port()?, port()?);
            let args: Vec<String> = vec![
                "--config".into(),
                config.display().to_string(),
                "--id".into(),
                id.clone(),
                "--listen".into(),
                format!("127.0.0.1:{http}"),
                "--agent-listen".into(),
                format!("127.0.0.1:{agent}"),
                "--state-dir".into(),
                self.dir.path().join(format!("{id}.state")).display().to_string(),
                "--coordinator".into(),
                urls.clone(),
                "--no-watch".into(),
                "--trust-keys".into(),
                pub_file.display().to_string(),
                "--agent-tls-cert".into(),
                cert_file.display().to_string(),
                "--agent-tls-key".into(),
                cert_key.display().to_string(),
            ];
            let log = self.dir.path().join(format!("{id}.log"));
            let proc = Proc::spawn(&id, &self.bins.node, &args, log)?;
            println!("   {id}  http://127.0.0.1:{http}  agent https://127.0.0.1:{agent}  (pid {})", proc.pid());
            self.nodes.push(Node { id, http, agent, proc });
        }
        self.agent_ca = cert.cert.pem().into_bytes();
        for n in &mut self.nodes {
            n.proc.wait_listening(n.http).await?;
        }
        let mut client = self.client().await?;
        poll(Duration::from_millis(100), async || {
            let s = client.get_status(pb::GetStatusRequest::default()).await.map(|r| r.into_inner());
            Ok(match s {
                Ok(s) if s.nodes.len() == NODES => Ok(()),
                _ => Err(format!("the {NODES} nodes did not all register within {STEP:?}")),
            })
        })
        .await?;
        println!("   all {NODES} nodes registered with the coordinators");
        Ok(())
    }

    async fn good_rollout(&mut self) -> anyhow::Result<u64> {
        step(2, "A good config rolls out stage by stage: 1 node, 25%, 50%, 100%, each baked 1 s");
        let content = "profile: lite\nlog: {level: info}\ncache: {ttl: 45s}\nmetrics: {labels: {env: demo}}\n";
        let r = self.submit(content, "raise the cache ttl to 45s").await?;
        let done = self.follow(&r.rollout_id).await?;
        if done.state != "SUCCEEDED" {
            bail!("the good rollout ended {}: {}", done.state, done.reason);
        }
        self.expect_versions(r.version, "after the good rollout").await?;
        Ok(r.version)
    }

    async fn bad_rollout(&mut self, good: u64) -> anyhow::Result<()> {
        step(3, "A bad config: it requires an LLM endpoint that is down. The canary fails health; all roll back");
        let dead = port()?; // reserved, never listened on
        let content = format!(
            "profile: lite\nlog: {{level: info}}\ncache: {{ttl: 45s}}\nmetrics: {{labels: {{env: demo}}}}\n\
             llm: {{endpoint: 'http://127.0.0.1:{dead}/v1', model: demo-model, required: true}}\n"
        );
        let r = self.submit(&content, "use the new LLM gateway").await?;
        let done = self.follow(&r.rollout_id).await?;
        if done.state != "ROLLED_BACK" {
            bail!("the bad rollout ended {}, expected ROLLED_BACK", done.state);
        }
        let canary = done.canary_order.first().cloned().unwrap_or_default();
        if canary.is_empty() || done.failing_node != canary {
            bail!("the failing node is {:?}, expected the canary {canary:?}", done.failing_node);
        }
        println!("   the canary {canary} failed: {}", done.reason);
        self.expect_versions(good, "after the rollback").await?;
        let mut client = self.client().await?;
        let versions = client.list_versions(pb::ListVersionsRequest::default()).await?.into_inner().versions;
        println!("   history:");
        for v in &versions {
            println!("     v{}  {:<12} {}", v.version, v.state, v.message);
        }
        let bad = versions.iter().find(|v| v.version == r.version).context("the bad version is not in the history")?;
        if bad.state != "ROLLED_BACK" {
            bail!("history shows v{} as {}, expected ROLLED_BACK", bad.version, bad.state);
        }
        let s = client.get_status(pb::GetStatusRequest::default()).await?.into_inner();
        if s.stable_version != good {
            bail!(
                "the stable version is v{}, expected v{good} (it must never move to a bad version)",
                s.stable_version
            );
        }
        println!("   the stable version never moved: v{good}");
        Ok(())
    }

    async fn leader_killed(&mut self, stable: u64) -> anyhow::Result<()> {
        step(4, "Kill the leader with SIGKILL (no resignation): another replica takes over");
        let old = self.leader(None).await?;
        let i = self.replicas.iter().position(|r| r.id() == old).context("the leader is not one of ours")?;
        let pid = self.replicas[i].proc.pid();
        let killed = Instant::now();
        self.replicas[i].proc.kill().await;
        println!("   killed {old} (was pid {pid})");
        let new = self.leader(Some(&old)).await?;
        let content = "profile: lite\nlog: {level: info}\ncache: {ttl: 90s}\nmetrics: {labels: {env: demo}}\n";
        let r = self.submit(content, "cache ttl 90s, under the new leader").await?;
        println!(
            "   {new} took over; it accepted a write {:.1} s after the kill (lease {LEASE_TTL})",
            secs(killed.elapsed())
        );
        if r.version != stable + 2 {
            bail!(
                "the new leader assigned v{}, expected v{} (versions continue across leaders)",
                r.version,
                stable + 2
            );
        }
        let done = self.follow(&r.rollout_id).await?;
        if done.state != "SUCCEEDED" {
            bail!("the rollout under the new leader ended {}: {}", done.state, done.reason);
        }
        self.expect_versions(r.version, "under the new leader").await?;

        let rep = &mut self.replicas[i];
        let log = rep.proc.log.clone();
        rep.proc = Proc::spawn(&old, &self.bins.coordinator, &rep.args, log)?;
        println!(
            "   restarted {old} (pid {}) on its data dir: it rejoins the raft group as a follower",
            rep.proc.pid()
        );
        rep.proc.wait_listening(rep.api).await?;
        let url = rep.url();
        let s = poll(Duration::from_millis(100), async || {
            if let Ok(mut c) = connect(&url).await
                && let Ok(s) = c.get_status(pb::GetStatusRequest::default()).await
                && s.get_ref().stable_version == r.version
            {
                return Ok(Ok(s.into_inner()));
            }
            Ok(Err(format!("{old} did not catch up to v{} within {STEP:?}", r.version)))
        })
        .await?;
        println!("   {old} caught up: it reports stable v{}, leader {}", s.stable_version, s.leader_id);
        Ok(())
    }

    fn print_endpoints(&self) {
        step(6, "Point your tools at it");
        let first = &self.replicas[0];
        let urls = self.urls().join(",");
        println!("   grpcurl (server reflection is on):");
        println!("     grpcurl -plaintext 127.0.0.1:{} list", first.api);
        println!("     grpcurl -plaintext -d '{{}}' 127.0.0.1:{} confroll.v1.Coordinator/GetStatus", first.api);
        println!("   the CLI (any replica; writes are forwarded to the leader):");
        println!("     target/debug/confroll -c {urls} status");
        println!("     target/debug/confroll -c {urls} versions");
        println!("     target/debug/confroll -c {urls} diff 1 3");
        println!("   Prometheus scrape targets:");
        let coords: Vec<String> = self.replicas.iter().map(|r| format!("'127.0.0.1:{}'", r.http)).collect();
        let nodes: Vec<String> = self.nodes.iter().map(|n| format!("'127.0.0.1:{}'", n.http)).collect();
        println!("     - job_name: confroll-coordinators   # confroll_stable_version, confroll_rollout_stage, ...");
        println!("       static_configs: [{{targets: [{}]}}]", coords.join(", "));
        println!("     - job_name: confroll-nodes          # confroll_config_version, reload metrics, ...");
        println!("       static_configs: [{{targets: [{}]}}]", nodes.join(", "));
    }

    /// Replays the attack of a stranger on the network: an unsigned push
    /// with a huge fencing token straight to a node's agent port.
    async fn unsigned_push_refused(&mut self) -> anyhow::Result<()> {
        step(5, "A push from someone without the cluster's key is refused");
        let n = &self.nodes[0];
        let mut agent = self.agent(n).await?;
        let before = agent.status(pb::StatusRequest {}).await?.into_inner();
        let content = b"profile: lite\ncache: {ttl: 1s}\n".to_vec();
        let forged = pb::ApplyRequest {
            version: 77,
            sha256: confroll_common::sha256_hex(&content),
            content,
            fencing_token: 9_223_372_036_854_775_000,
            node_id: n.id.clone(),
            ..Default::default()
        };
        let e = match agent.apply(forged).await {
            Ok(r) => bail!("node {} took an unsigned push: {:?}", n.id, r.into_inner()),
            Err(e) => e,
        };
        let after = agent.status(pb::StatusRequest {}).await?.into_inner();
        if e.code() != tonic::Code::Unauthenticated
            || (after.version, after.highest_fencing_token) != (before.version, before.highest_fencing_token)
        {
            bail!("an unsigned push was not refused cleanly: {e:?}, node before {before:?}, after {after:?}");
        }
        println!("   {}: {:?} \"{}\"", n.id, e.code(), e.message());
        println!(
            "   {} still runs v{} with fencing token {} (cluster {})",
            n.id, after.version, after.highest_fencing_token, after.cluster_id
        );
        Ok(())
    }
}
