//! The manifest smoke test (issue 11, point 2): `deploy/k8s` proven without
//! a Kubernetes cluster.
//!
//! `embedded_overlay_runs_as_declared` renders `deploy/k8s/overlays/embedded`
//! with `kubectl kustomize`, puts real secrets in place of the placeholders
//! (random tokens, a push key pair from `confroll keygen`; everything else
//! as rendered) and runs the coordinator and node StatefulSets' pods (3 + 3)
//! the way a kubelet would (`confroll_chaos::k8s`): each pod in its own
//! network namespace on the harness's bridge, under its pod name, with
//! exactly the container's `command` + `args` (`$(VAR)` expanded from its
//! `env` and the downward API), that environment and nothing else, its
//! Secret/ConfigMap/claim volumes at their mount paths, the build's binary
//! mounted at the path `command` names, cluster DNS for the Services' and
//! pods' names, a virtual IP per ClusterIP Service, and as the
//! `securityContext`'s `runAsUser`/`runAsGroup` with `fsGroup` (`setpriv`),
//! no new privileges, no capabilities and a read-only root file system.
//! Then, through the client Service's DNS name and with the operator token
//! (the `confroll` CLI, run on the hub):
//!
//! 1. every pod's startup, readiness and liveness probes pass within their
//!    own budgets (`failureThreshold × periodSeconds`, plus a margin), probed
//!    from the hub as the kubelet probes from the machine;
//! 2. the replicas agree on a leader and every node registers (through the
//!    Service);
//! 3. a rollout of the ConfigMap's config with a new `cache.ttl` (hot
//!    reloadable) succeeds and every node pod runs the new version;
//! 4. the leader pod is SIGKILLed (its whole process tree) and deleted, the
//!    others elect a leader, and the pod is created again under the same name
//!    with a **new IP** (every hosts file now maps its names there): its
//!    probes pass again, it agrees on the leader and has applied the leader's
//!    log (a ready follower has: so the leader reached it at its new
//!    address, through `--raft-peers` DNS names resolved again);
//! 5. one more rollout succeeds, the restarted replica sees it, and no
//!    kubelet would have restarted any container on the way (no liveness or
//!    startup probe failed for as long as the kubelet tolerates).
//!
//! Nothing leaks onto the machine: every mount lives in a pod's own mount
//! namespace (checked: the test's mount table never shows one, and no mount
//! point the pods use appears on the machine), and the network's `Drop`
//! kills every pod and deletes every namespace, on success and on panic.
//!
//! `etcd_overlay_renders_and_its_coordinator_args_parse` renders
//! `deploy/k8s/overlays/etcd` and has the coordinator binary parse the
//! coordinator pod's expanded command line (an etcd cluster with TLS and
//! authentication is not started here).
//!
//! `nginx_sidecar_example_runs_as_declared` runs `deploy/k8s/examples/
//! nginx-sidecar` next to the embedded overlay: 3 coordinator pods and 2
//! `web` pods (init container, then nginx and confroll-agent in one PID
//! namespace, as user 101); a new nginx.conf rolls out to both, and one
//! whose `/healthz` answers 500 is rolled back (docs/chaos.md).
//!
//! Without root, network namespaces or nft both are reported *ignored* with
//! the reason, never passed. What is not emulated: see `src/k8s.rs`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use confroll_chaos::{
    cluster,
    k8s::{self, Kube, PodPlan, Rendering},
    netns::{self, Net},
};
use confroll_proto::v1::{GetStatusRequest, GetStatusResponse, coordinator_client::CoordinatorClient};

const COORDS: &str = "confroll-coordinator";
const NODES: &str = "confroll-node";
/// Added to every probe budget (debug build, 2 cores, 6 pods).
const MARGIN: Duration = Duration::from_secs(10);
/// Agreeing on a leader, nodes registering, a rollout ending.
const WAIT: Duration = Duration::from_secs(45);

fn main() {
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let unavailable = netns::available().err();
    if let Some(why) = &unavailable {
        eprintln!("manifest smoke test SKIPPED: {why}");
    }
    let trials = vec![
        libtest_mimic::Trial::test("embedded_overlay_runs_as_declared", || run(embedded_overlay_runs_as_declared)),
        libtest_mimic::Trial::test("etcd_overlay_renders_and_its_coordinator_args_parse", || {
            run(etcd_overlay_renders_and_its_coordinator_args_parse)
        }),
        libtest_mimic::Trial::test("nginx_sidecar_example_runs_as_declared", || {
            run(nginx_sidecar_example_runs_as_declared)
        }),
    ];
    let trials = trials.into_iter().map(|t| t.with_ignored_flag(unavailable.is_some())).collect();
    libtest_mimic::run(&args, trials).exit();
}

fn run<F, Fut>(f: F) -> Result<(), libtest_mimic::Failed>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(f()).map_err(|e| format!("{e:#}").into())
}

fn overlay(name: &str) -> PathBuf {
    k8s::workspace_root().join("deploy/k8s/overlays").join(name)
}

/// The build's binary for each StatefulSet's `command[0]` (same file name).
fn binaries(r: &Rendering) -> anyhow::Result<HashMap<String, PathBuf>> {
    let mut out = HashMap::new();
    for sts in r.of_kind("StatefulSet") {
        for c in sts["spec"]["template"]["spec"]["containers"].as_array().into_iter().flatten() {
            let program = c["command"][0].as_str().context("a container without a command")?;
            if !program.starts_with('/') {
                continue; // the image's PATH: this machine's (nginx)
            }
            let name = Path::new(program).file_name().context("command[0] without a file name")?;
            let file = cluster::bin_dir().join(name);
            ensure!(file.is_file(), "{program}: no {} in this build", file.display());
            out.insert(program.to_owned(), file);
        }
    }
    Ok(out)
}

async fn embedded_overlay_runs_as_declared() -> anyhow::Result<()> {
    let t0 = Instant::now();
    cluster::ensure_binaries()?;
    eprintln!("binaries built ({:.1}s)", t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    let cli = cluster::bin_dir().join("confroll");
    let kubectl = k8s::kubectl()?;
    let r = Rendering::kustomize(&kubectl, &overlay("embedded"))?;
    eprintln!("rendered deploy/k8s/overlays/embedded: {} objects ({})", r.objects.len(), kubectl.display());

    let net = Net::new()?;
    let run_dir = net.dir().to_path_buf();
    let before = match run_embedded(net.clone(), r, &cli, t0).await {
        Ok(before) => before,
        Err(e) => {
            // The pods' logs (k8s/<pod>.log), volumes and hosts files.
            net.keep_dir();
            return Err(e.context(format!("evidence kept in {}", run_dir.display())));
        }
    };
    drop(net);
    let prefix = format!("{}{}-", netns::PREFIX, std::process::id());
    let left: Vec<String> = netns::our_namespaces().into_iter().filter(|n| n.starts_with(&prefix)).collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    ensure!(!run_dir.exists(), "{} left behind", run_dir.display());
    host_untouched(&run_dir, &before)?;
    eprintln!("everything removed; {:.1}s in all", t0.elapsed().as_secs_f64());
    Ok(())
}

/// The pods of `r` on `net`, the probes, two rollouts and a coordinator
/// pod back with a new IP; which of the pods' mount points existed on the
/// machine before.
async fn run_embedded(
    net: Arc<Net>,
    mut r: Rendering,
    cli: &Path,
    t0: Instant,
) -> anyhow::Result<BTreeMap<String, bool>> {
    let run_dir = net.dir().to_path_buf();

    let (secrets, reader) = real_secrets(&mut r, &run_dir, cli)?;
    let base_config = mounted_file(&r, NODES, "config.yaml")?;

    let bins = binaries(&r)?;
    let kube = Kube::new(net.clone(), r, bins)?;
    for sts in [COORDS, NODES] {
        let n = kube.rendering().get("StatefulSet", sts)?["spec"]["replicas"].as_u64();
        ensure!(n == Some(3), "StatefulSet {sts} has {n:?} replicas; the test runs 3");
    }
    let coords: Vec<String> = (0..3).map(|i| format!("{COORDS}-{i}")).collect();
    let nodes: Vec<String> = (0..3).map(|i| format!("{NODES}-{i}")).collect();

    // Mount points the pods use must never appear on the machine.
    let watched = mount_points(&kube, &coords[0], &nodes[0])?;
    let before: BTreeMap<String, bool> = watched.iter().map(|p| (p.clone(), Path::new(p).exists())).collect();

    // podManagementPolicy: Parallel on both: everything starts at once.
    for i in 0..3 {
        kube.create_pod(COORDS, i, &format!("c{i}"), 11 + i as u8)?;
    }
    for i in 0..3 {
        kube.create_pod(NODES, i, &format!("n{i}"), 31 + i as u8)?;
    }
    for p in [&coords[0], &nodes[0]] {
        describe(&kube.plan(p)?);
    }
    host_untouched(&run_dir, &before)?;

    for p in coords.iter().chain(&nodes) {
        let s = kube.wait_probes(p, MARGIN).await?;
        eprintln!(
            "{p} at {}: startup passed at {:.1}s, readiness at {:.1}s, liveness at {:.1}s ({} probes, {} failed)",
            kube.pod_ip(p)?,
            s.started.unwrap_or_default().as_secs_f64(),
            s.ready_at.unwrap_or_default().as_secs_f64(),
            s.live_at.unwrap_or_default().as_secs_f64(),
            s.probes,
            s.failures
        );
    }
    for p in coords.iter().chain(&nodes) {
        eprintln!("{}", kube.verify_process(p)?);
    }
    eprintln!("{}", check_dns(&kube, &coords, &nodes)?);
    let leader = agreed_leader(&kube, &net, &coords, &reader, WAIT).await?;
    eprintln!("the replicas agree: {leader} leads ({:.1}s in)", t0.elapsed().as_secs_f64());
    wait_nodes_registered(&kube, &net, &coords, &nodes, &reader).await?;
    eprintln!("every node pod registered through Service {COORDS}");

    let url = kube.service_url(COORDS, "grpc")?;
    let with_ttl = |ttl: &str| -> anyhow::Result<String> {
        let mut cfg: serde_json::Value = serde_yaml_ng::from_str(&base_config)?;
        cfg["cache"]["ttl"] = ttl.into();
        Ok(serde_yaml_ng::to_string(&cfg)?)
    };
    let submit = Submit { kube: &kube, net: &net, cli, url: &url, token: secrets.join("operator"), reader: &reader };
    let v1 = submit.rollout(&with_ttl("45s")?, "manifest smoke test: cache.ttl 45s", &coords, &nodes).await?;
    eprintln!("rollout of v{v1} (cache.ttl 45s) through {url}: SUCCEEDED, every node pod on v{v1}");

    // The leader pod SIGKILLed and deleted, then created again with a new IP.
    let ordinal: usize = leader.rsplit('-').next().and_then(|o| o.parse().ok()).context("the leader's ordinal")?;
    let old_ip = kube.pod_ip(&leader)?;
    let killed = Instant::now();
    kube.delete_pod(&leader)?;
    let others: Vec<String> = coords.iter().filter(|c| **c != leader).cloned().collect();
    let next = poll(&net, &kube, &others, &reader, WAIT, "the other replicas to elect a leader", |all| {
        let l = &all[0].leader_id;
        (!l.is_empty() && *l != leader && all.iter().all(|s| s.leader_id == *l)).then(|| l.clone())
    })
    .await?;
    eprintln!("{leader} ({old_ip}) SIGKILLed and deleted; {next} leads {:.1}s later", killed.elapsed().as_secs_f64());
    kube.create_pod(COORDS, ordinal, &format!("c{ordinal}b"), 14)?;
    let new_ip = kube.pod_ip(&leader)?;
    ensure!(new_ip != old_ip, "the pod came back at its old IP");
    let s = kube.wait_probes(&leader, MARGIN).await?;
    kube.verify_process(&leader)?;
    let dns = check_dns(&kube, &coords, &nodes)?;
    let agreed = agreed_leader(&kube, &net, &coords, &reader, WAIT).await?;
    let back = status_of(&kube, &net, &leader, &reader).await.context("the restarted replica does not answer")?;
    ensure!(
        back.stable_version == v1,
        "{leader} answers stable version {} after its restart, not v{v1}",
        back.stable_version
    );
    eprintln!(
        "{leader} back at {new_ip} (was {old_ip}): probes passed (ready at {:.1}s: it has applied up to {agreed}'s \
         commit index), all three agree {agreed} leads; {:.1}s after the kill",
        s.ready_at.unwrap_or_default().as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    eprintln!("after the restart, {dns}");

    let v2 = submit.rollout(&with_ttl("60s")?, "manifest smoke test: cache.ttl 60s", &coords, &nodes).await?;
    let back = status_of(&kube, &net, &leader, &reader).await.context("the restarted replica does not answer")?;
    ensure!(
        back.stable_version == v2,
        "{leader} answers stable v{} after the second rollout, not v{v2}",
        back.stable_version
    );
    // Only the leader could have sent it v2's entries: at its new address.
    eprintln!(
        "rollout of v{v2} (cache.ttl 60s): SUCCEEDED, every node pod on v{v2}, {leader} ({new_ip}) has applied it"
    );

    let violations = kube.violations();
    ensure!(violations.is_empty(), "the kubelets saw:\n{}", violations.join("\n"));
    host_untouched(&run_dir, &before)?;
    Ok(before)
}

async fn etcd_overlay_renders_and_its_coordinator_args_parse() -> anyhow::Result<()> {
    cluster::ensure_binaries()?;
    let kubectl = k8s::kubectl()?;
    let r = Rendering::kustomize(&kubectl, &overlay("etcd"))?;
    let bins = binaries(&r)?;
    let plan = PodPlan::statefulset_pod(&r, COORDS, 0, Ipv4Addr::new(10, 77, 0, 11), None)?;
    ensure!(plan.argv.iter().any(|a| a == "--store=etcd"), "no --store=etcd in {:?}", plan.argv);
    ensure!(!plan.argv.iter().any(|a| a.contains("$(")), "an unexpanded reference in {:?}", plan.argv);
    let bin = &bins[&plan.argv[0]];
    let out = Command::new(bin).args(&plan.argv[1..]).arg("--help").output()?;
    ensure!(
        out.status.success(),
        "{} does not parse the etcd overlay's command line {:?}: {}",
        bin.display(),
        plan.argv,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("etcd overlay: {} objects; {} parses {}", r.objects.len(), bin.display(), plan.argv[1..].join(" "));
    Ok(())
}

/// File `key` of the ConfigMap StatefulSet `sts` mounts.
fn mounted_file(r: &Rendering, sts: &str, key: &str) -> anyhow::Result<String> {
    let map = r.get("StatefulSet", sts)?["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|v| v["configMap"]["name"].as_str())
        .with_context(|| format!("the {sts} StatefulSet mounts no ConfigMap"))?
        .to_owned();
    let bytes = r.data("ConfigMap", &map)?.remove(key).with_context(|| format!("no {key} in ConfigMap {map}"))?;
    Ok(String::from_utf8(bytes)?)
}

/// Real secrets in place of the placeholders of `r` (random tokens, a push
/// key pair from `confroll keygen`), also written under `run_dir/secrets`;
/// that directory, and the reader token.
fn real_secrets(r: &mut Rendering, run_dir: &Path, cli: &Path) -> anyhow::Result<(PathBuf, String)> {
    let secrets = run_dir.join("secrets");
    std::fs::create_dir_all(&secrets)?;
    let keygen = Command::new(cli).arg("keygen").arg("--out").arg(&secrets).output()?;
    ensure!(keygen.status.success(), "confroll keygen: {}", String::from_utf8_lossy(&keygen.stderr));
    for role in ["operator", "node", "reader"] {
        std::fs::write(secrets.join(role), format!("{}\n", hex::encode(rand::random::<[u8; 32]>())))?;
    }
    for (secret, keys) in
        [("confroll-tokens", &["node", "operator", "reader"][..]), ("confroll-push-key", &["push.key", "push.pub"][..])]
    {
        let have: BTreeSet<String> = r.data("Secret", secret)?.into_keys().collect();
        let want: BTreeSet<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        ensure!(have == want, "Secret {secret} holds {have:?}, the test replaces {want:?}");
        for k in keys {
            r.set_secret_value(secret, k, &std::fs::read(secrets.join(k))?)?;
        }
    }
    let secret_names: Vec<String> =
        r.of_kind("Secret").filter_map(|s| s["metadata"]["name"].as_str().map(str::to_owned)).collect();
    for name in &secret_names {
        for (k, v) in r.data("Secret", name)? {
            ensure!(!v.starts_with(b"#"), "Secret {name}/{k} still holds a placeholder");
        }
    }
    let reader = std::fs::read_to_string(secrets.join("reader"))?.trim().to_owned();
    Ok((secrets, reader))
}

/// `deploy/k8s/examples/nginx-sidecar` next to the embedded overlay, run
/// as the kubelet would run it: three coordinator pods and two `web` pods,
/// each of those an init container that seeds the config volume from the
/// ConfigMap, then nginx and confroll-agent in one PID namespace
/// (`shareProcessNamespace`), both as user 101 with a read-only root, the
/// config on an `emptyDir` they share. Through the client Service, with the
/// operator token: both agents register for service `web`; a new
/// `nginx.conf` rolls out (stages 1, 2) and both nginx serve it (their
/// `X-Config-Version` header, from the hub): the agent wrote the emptyDir
/// and SIGHUPed nginx's master across containers; a config whose
/// `/healthz` answers 500 is rolled back and both serve the previous one.
async fn nginx_sidecar_example_runs_as_declared() -> anyhow::Result<()> {
    let t0 = Instant::now();
    cluster::ensure_binaries()?;
    confroll_testkit::bins::ensure_built()?;
    let cli = cluster::bin_dir().join("confroll");
    let kubectl = k8s::kubectl()?;
    let net = Net::new()?;
    let run_dir = net.dir().to_path_buf();
    // Both in one rendering, as `kubectl apply -k` of each would put them
    // in one namespace.
    let both = run_dir.join("kustomize");
    std::fs::create_dir_all(&both)?;
    let root = k8s::workspace_root().join("deploy/k8s");
    std::fs::write(
        both.join("kustomization.yaml"),
        format!(
            "resources:\n  - {}\n  - {}\n",
            rel(&root.join("overlays/embedded"), &both)?,
            rel(&root.join("examples/nginx-sidecar"), &both)?
        ),
    )?;
    let r = Rendering::kustomize(&kubectl, &both)?;
    eprintln!("rendered overlays/embedded + examples/nginx-sidecar: {} objects", r.objects.len());
    match run_sidecar(net.clone(), r, &cli).await {
        Ok(()) => {}
        Err(e) => {
            net.keep_dir();
            return Err(e.context(format!("evidence kept in {}", run_dir.display())));
        }
    }
    drop(net);
    ensure!(!run_dir.exists(), "{} left behind", run_dir.display());
    eprintln!("everything removed; {:.1}s in all", t0.elapsed().as_secs_f64());
    Ok(())
}

/// `to` relative to `from` (kustomize refuses absolute paths).
fn rel(to: &Path, from: &Path) -> anyhow::Result<String> {
    let (to, from) = (std::fs::canonicalize(to)?, std::fs::canonicalize(from)?);
    let common = to.components().zip(from.components()).take_while(|(a, b)| a == b).count();
    let ups = from.components().count() - common;
    let mut p = PathBuf::new();
    for _ in 0..ups {
        p.push("..");
    }
    for c in to.components().skip(common) {
        p.push(c);
    }
    Ok(p.display().to_string())
}

const WEB: &str = "web";

async fn run_sidecar(net: Arc<Net>, mut r: Rendering, cli: &Path) -> anyhow::Result<()> {
    let run_dir = net.dir().to_path_buf();
    let (secrets, reader) = real_secrets(&mut r, &run_dir, cli)?;
    let seed = mounted_file(&r, WEB, "nginx.conf")?;
    let bins = binaries(&r)?;
    let kube = Kube::new(net.clone(), r, bins)?;
    let coords: Vec<String> = (0..3).map(|i| format!("{COORDS}-{i}")).collect();
    let webs: Vec<String> = (0..2).map(|i| format!("{WEB}-{i}")).collect();
    // The web pods' mount points must never appear on the machine.
    let spec = &kube.rendering().get("StatefulSet", WEB)?["spec"]["template"]["spec"];
    let watched: BTreeSet<String> = ["initContainers", "containers"]
        .iter()
        .flat_map(|f| spec[*f].as_array().into_iter().flatten())
        .flat_map(|c| c["volumeMounts"].as_array().into_iter().flatten())
        .filter_map(|m| m["mountPath"].as_str().map(str::to_owned))
        .collect();
    let before: BTreeMap<String, bool> = watched.iter().map(|p| (p.clone(), Path::new(p).exists())).collect();
    for i in 0..3 {
        kube.create_pod(COORDS, i, &format!("c{i}"), 11 + i as u8)?;
    }
    for i in 0..2 {
        kube.create_pod(WEB, i, &format!("w{i}"), 41 + i as u8)?;
    }
    describe(&kube.plan(&webs[0])?);
    for p in coords.iter().chain(&webs) {
        let s = kube.wait_probes(p, MARGIN).await?;
        eprintln!("{p} at {}: ready at {:.1}s", kube.pod_ip(p)?, s.ready_at.unwrap_or_default().as_secs_f64());
    }
    let leader = agreed_leader(&kube, &net, &coords, &reader, WAIT).await?;
    eprintln!("the replicas agree: {leader} leads");
    let want: BTreeSet<String> = webs.iter().cloned().collect();
    poll_service(&net, &kube, &coords, &reader, WEB, WAIT, "both agents to register for service web", |all| {
        all.iter().all(|s| s.nodes.iter().map(|n| n.id.clone()).collect::<BTreeSet<_>>() == want).then_some(())
    })
    .await?;
    eprintln!("both agents registered through Service {COORDS}");
    for w in &webs {
        ensure!(serves(&kube, &net, w).await.as_deref() == Some("seed"), "{w} does not serve the seed config");
    }

    let url = kube.service_url(COORDS, "grpc")?;
    let submit = |content: String, name: &'static str| {
        let (kube, secrets, url, cli) = (&kube, &secrets, &url, cli);
        async move {
            let file = secrets.with_file_name(format!("{name}.conf"));
            std::fs::write(&file, content)?;
            let argv: Vec<String> = [
                cli.display().to_string(),
                "--coordinator".into(),
                url.clone(),
                "--token-file".into(),
                secrets.join("operator").display().to_string(),
                "submit".into(),
                file.display().to_string(),
                "-s".into(),
                WEB.into(),
                "--stages".into(),
                "1,2".into(),
                "--bake".into(),
                "0s".into(),
                "--watch".into(),
            ]
            .into();
            kube.run_on_hub(&argv).await
        }
    };
    let v2 = seed.replace("\"seed\"", "\"v2\"");
    ensure!(v2 != seed, "the seed config has no X-Config-Version \"seed\"");
    let out = submit(v2, "v2").await?;
    ensure!(
        out.status.success(),
        "confroll submit -s web --watch: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for w in &webs {
        ensure!(serves(&kube, &net, w).await.as_deref() == Some("v2"), "{w} does not serve v2 after the rollout");
    }
    eprintln!("rollout of a new nginx.conf: SUCCEEDED; both nginx serve it (X-Config-Version: v2)");
    // The agent container's own probes (the prober runs the first
    // container's), and its version gauge under the node's labels.
    for w in &webs {
        let plan = kube.plan(w)?;
        let base = format!("http://{}:{}", plan.ip, plan.ports.get("status").context("no status port")?);
        let (ready, metrics) = net
            .on_hub(async move {
                let c = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(3)).build().ok()?;
                let ready = c.get(format!("{base}/readyz")).send().await.ok()?.status().as_u16();
                let metrics = c.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
                Some((ready, metrics))
            })
            .await
            .with_context(|| format!("{w}: the agent's status port does not answer"))?;
        ensure!(ready == 200, "{w}: the agent's /readyz answers {ready}");
        let gauge = format!("confroll_config_version{{node=\"{w}\",service=\"{WEB}\"}}");
        ensure!(metrics.lines().any(|l| l.starts_with(&gauge)), "{w}: no {gauge} in the agent's metrics");
    }

    let sick = seed.replace("\"seed\"", "\"v3\"").replace("return 200 \"ok\\n\"", "return 500 \"sick\\n\"");
    ensure!(sick.contains("return 500"), "the seed config has no /healthz answering 200 \"ok\\n\"");
    let out = submit(sick, "v3").await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(!out.status.success() && text.contains("ROLLED_BACK"), "the unhealthy config was not rolled back:\n{text}");
    for w in &webs {
        ensure!(serves(&kube, &net, w).await.as_deref() == Some("v2"), "{w} does not serve v2 after the rollback");
    }
    eprintln!("a config whose /healthz answers 500: ROLLED_BACK; both nginx serve v2 again");
    let violations = kube.violations();
    ensure!(violations.is_empty(), "the kubelets saw:\n{}", violations.join("\n"));
    host_untouched(&run_dir, &before)?;
    Ok(())
}

/// The `X-Config-Version` pod `pod`'s nginx answers with (from the hub).
async fn serves(kube: &Kube, net: &Net, pod: &str) -> Option<String> {
    let plan = kube.plan(pod).ok()?;
    let url = format!("http://{}:{}/", plan.ip, plan.ports.get("http")?);
    net.on_hub(async move {
        let c = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(3)).build().ok()?;
        let r = c.get(url).send().await.ok()?;
        r.headers().get("x-config-version")?.to_str().ok().map(str::to_owned)
    })
    .await
}

/// [`poll`] of the status of `service`.
#[allow(clippy::too_many_arguments)]
async fn poll_service<T>(
    net: &Net,
    kube: &Kube,
    pods: &[String],
    reader: &str,
    service: &str,
    within: Duration,
    what: &str,
    f: impl Fn(&[GetStatusResponse]) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        let mut all = Vec::new();
        for p in pods {
            match service_status_of(kube, net, p, reader, service).await {
                Some(s) => all.push(s),
                None => break,
            }
        }
        if all.len() == pods.len()
            && let Some(v) = f(&all)
        {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}; last answers: {all:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints what a pod runs.
fn describe(p: &PodPlan) {
    let s = &p.security;
    eprintln!("pod {} ({}), container {}:", p.name, p.ip, p.container);
    eprintln!("  argv: {}", p.argv.join(" "));
    eprintln!("  env: {}", p.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "));
    eprintln!(
        "  as uid {} gid {} groups {:?}, no_new_privs {}, drop ALL caps {}, read-only root {}",
        s.uid, s.gid, s.groups, s.no_new_privs, s.drop_all_caps, s.read_only_root
    );
    for m in &p.mounts {
        eprintln!("  mount {} <- {}{}", m.path, m.what, if m.read_only { " (ro)" } else { "" });
    }
    for pr in &p.probes {
        eprintln!("  {}", pr.describe());
    }
    for n in &p.not_emulated {
        eprintln!("  not emulated: {n}");
    }
}

/// Every path a pod mounts something at (volumes, the binary).
fn mount_points(kube: &Kube, coord: &str, node: &str) -> anyhow::Result<Vec<String>> {
    let r = kube.rendering();
    let mut out = vec!["/etc/.k8s-emulated".to_owned()];
    for (sts, pod) in [(COORDS, coord), (NODES, node)] {
        let ordinal = pod.rsplit('-').next().and_then(|o| o.parse().ok()).context("ordinal")?;
        let plan = PodPlan::statefulset_pod(r, sts, ordinal, Ipv4Addr::new(10, 77, 0, 2), None)?;
        out.push(plan.argv[0].clone());
        let set = r.get("StatefulSet", sts)?;
        for m in set["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].as_array().into_iter().flatten() {
            out.extend(m["mountPath"].as_str().map(str::to_owned));
        }
    }
    Ok(out)
}

/// Nothing of the pods shows on the machine: no mount in this process's
/// mount table mentions the run, and every mount point the pods use exists
/// (or not) exactly as before.
fn host_untouched(run_dir: &Path, before: &BTreeMap<String, bool>) -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let run = run_dir.display().to_string();
    let leaks: Vec<&str> = mounts.lines().filter(|l| l.contains(&run)).collect();
    ensure!(leaks.is_empty(), "mounts on the machine:\n{}", leaks.join("\n"));
    for (p, existed) in before {
        ensure!(
            Path::new(p).exists() == *existed,
            "{p} {} on the machine",
            if *existed { "vanished" } else { "appeared" }
        );
    }
    Ok(())
}

/// Inside every pod, the client Service's name resolves to its virtual IP
/// only, and inside every coordinator pod each replica's stable name
/// resolves to that replica's current IP only.
fn check_dns(kube: &Kube, coords: &[String], nodes: &[String]) -> anyhow::Result<String> {
    let svc = format!("{COORDS}.{}.svc.{}", kube.namespace(), k8s::CLUSTER_DOMAIN);
    let vip = kube.service_ip(COORDS).context("the client Service has no virtual IP")?;
    for p in coords.iter().chain(nodes) {
        let got = kube.resolve_in(p, &svc)?;
        ensure!(got == [vip], "in {p}, {svc} resolves to {got:?}, not {vip}");
    }
    let mut peers = Vec::new();
    for c in coords {
        let name = kube.pod_fqdn(c)?.with_context(|| format!("{c} has no stable DNS name"))?;
        let ip = kube.pod_ip(c)?;
        for p in coords {
            let got = kube.resolve_in(p, &name)?;
            ensure!(got == [ip], "in {p}, {name} resolves to {got:?}, not {ip}");
        }
        peers.push(format!("{name} -> {ip}"));
    }
    Ok(format!("DNS in every pod: {svc} -> {vip} (ClusterIP); in every coordinator pod: {}", peers.join(", ")))
}

/// `GetStatus` of coordinator pod `pod`, at its IP (from the hub).
async fn status_of(kube: &Kube, net: &Net, pod: &str, reader: &str) -> Option<GetStatusResponse> {
    service_status_of(kube, net, pod, reader, "").await
}

/// [`status_of`] for `service`.
async fn service_status_of(
    kube: &Kube,
    net: &Net,
    pod: &str,
    reader: &str,
    service: &str,
) -> Option<GetStatusResponse> {
    let plan = kube.plan(pod).ok()?;
    let service = service.to_owned();
    let url = format!("http://{}:{}", plan.ip, plan.ports.get("grpc")?);
    let token = reader.to_owned();
    net.on_hub(async move {
        let ch = tonic::transport::Endpoint::from_shared(url)
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(3))
            .connect()
            .await
            .ok()?;
        let mut req = tonic::Request::new(GetStatusRequest { service });
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().ok()?);
        CoordinatorClient::new(ch).get_status(req).await.ok().map(|r| r.into_inner())
    })
    .await
}

/// Asks every pod of `pods` for its status until all answer and `f`
/// accepts the answers.
async fn poll<T>(
    net: &Net,
    kube: &Kube,
    pods: &[String],
    reader: &str,
    within: Duration,
    what: &str,
    f: impl Fn(&[GetStatusResponse]) -> Option<T>,
) -> anyhow::Result<T> {
    poll_service(net, kube, pods, reader, "", within, what, f).await
}

/// Waits until every coordinator pod names the same leader; its name.
async fn agreed_leader(
    kube: &Kube,
    net: &Net,
    coords: &[String],
    reader: &str,
    within: Duration,
) -> anyhow::Result<String> {
    poll(net, kube, coords, reader, within, "every replica to name the same leader", |all| {
        let l = &all[0].leader_id;
        (!l.is_empty() && coords.contains(l) && all.iter().all(|s| s.leader_id == *l)).then(|| l.clone())
    })
    .await
}

async fn wait_nodes_registered(
    kube: &Kube,
    net: &Net,
    coords: &[String],
    nodes: &[String],
    reader: &str,
) -> anyhow::Result<()> {
    let want: BTreeSet<String> = nodes.iter().cloned().collect();
    poll(net, kube, coords, reader, WAIT, "every node pod to register", |all| {
        all.iter().all(|s| s.nodes.iter().map(|n| n.id.clone()).collect::<BTreeSet<_>>() == want).then_some(())
    })
    .await
}

/// Rollouts through the client Service with the `confroll` CLI.
struct Submit<'a> {
    kube: &'a Kube,
    net: &'a Net,
    cli: &'a Path,
    url: &'a str,
    token: PathBuf,
    reader: &'a str,
}

impl Submit<'_> {
    /// `confroll submit --watch` of `content`; waits until every node pod
    /// runs the new version (its own `/api/v2/config/status`) and every
    /// replica says so. The version.
    async fn rollout(&self, content: &str, message: &str, coords: &[String], nodes: &[String]) -> anyhow::Result<u64> {
        let slug: String = message.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let file = self.token.with_file_name(format!("{slug}.yaml"));
        std::fs::write(&file, content)?;
        let argv: Vec<String> = [
            self.cli.display().to_string(),
            "--coordinator".into(),
            self.url.into(),
            "--token-file".into(),
            self.token.display().to_string(),
            "submit".into(),
            file.display().to_string(),
            "-m".into(),
            message.into(),
            "--bake".into(),
            "1s".into(),
            "--watch".into(),
        ]
        .into();
        let out = self.kube.run_on_hub(&argv).await?;
        ensure!(
            out.status.success(),
            "confroll submit --watch through {} exited {}:\n{}\n{}",
            self.url,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let done =
            poll(self.net, self.kube, coords, self.reader, WAIT, "the rollout to be recorded as SUCCEEDED", |all| {
                let s = &all[0];
                let r = s.rollout.as_ref()?;
                (r.state == "SUCCEEDED"
                    && r.version == s.stable_version
                    && all.iter().all(|x| x.stable_version == s.stable_version))
                .then_some(s.stable_version)
            })
            .await?;
        let deadline = Instant::now() + WAIT;
        loop {
            let mut on = Vec::new();
            for n in nodes {
                let plan = self.kube.plan(n)?;
                let url = format!("http://{}:{}/api/v2/config/status", plan.ip, plan.ports["http"]);
                let got = self
                    .net
                    .on_hub(async move {
                        let r = reqwest::Client::builder().no_proxy().build().ok()?.get(url).send().await.ok()?;
                        r.json::<serde_json::Value>().await.ok()
                    })
                    .await;
                on.push(got.map(|v| (v["version"].as_u64(), v["sha256"].as_str().map(str::to_owned))));
            }
            let shas: BTreeSet<_> = on.iter().flatten().map(|(_, s)| s.clone()).collect();
            if on.iter().all(|v| matches!(v, Some((Some(x), _)) if *x == done)) && shas.len() == 1 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the node pods do not all run v{done}: {on:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let want = nodes.len();
        poll(self.net, self.kube, coords, self.reader, WAIT, "every replica to see every node on the version", |all| {
            all.iter().all(|s| s.nodes.len() == want && s.nodes.iter().all(|n| n.version == done)).then_some(())
        })
        .await?;
        Ok(done)
    }
}
