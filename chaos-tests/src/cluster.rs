//! A confroll cluster of real hosts: coordinator replicas on etcd (three
//! members) or on their embedded raft store, nodes, and PostgreSQL and Redis
//! when a scenario uses them; each process in its own namespace.
//!
//! | host | address | ports |
//! |---|---|---|
//! | hub (clients, proxies) | .1 | |
//! | `c1..` coordinators | .11.. | gRPC 7000, HTTP 7001, raft 7100 |
//! | `e1..e3` etcd members | .21.. | client 2379, peer 2380 |
//! | `n1..` nodes | .31.. | HTTP 8080, agent 9090 |
//! | `pg`, `redis` | .50, .51 | 5432, 6379 |

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    faults,
    history::{Client, History, now_ms},
    netns::{Host, Net},
    process::Proc,
    proxy::FaultProxy,
};

/// The coordinators' store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// A three-member etcd cluster, one member per host.
    Etcd,
    /// The coordinators' embedded raft group.
    Raft,
}

impl Store {
    /// `etcd` or `raft`.
    pub fn as_str(self) -> &'static str {
        match self {
            Store::Etcd => "etcd",
            Store::Raft => "raft",
        }
    }

    /// Parses `etcd` or `raft`.
    pub fn parse(s: &str) -> anyhow::Result<Store> {
        match s {
            "etcd" => Ok(Store::Etcd),
            "raft" => Ok(Store::Raft),
            _ => bail!("unknown store {s:?}: etcd or raft"),
        }
    }
}

/// The kinds of process a cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A coordinator replica.
    Coordinator,
    /// A node.
    Node,
    /// An etcd member.
    Etcd,
    /// PostgreSQL.
    Postgres,
    /// Redis.
    Redis,
}

impl Role {
    /// The port that says it is up.
    pub fn port(self) -> u16 {
        match self {
            Role::Coordinator => ports::COORD,
            Role::Node => ports::NODE_HTTP,
            Role::Etcd => ports::ETCD,
            Role::Postgres => ports::PG,
            Role::Redis => ports::REDIS,
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// Store.
    pub store: Store,
    /// Coordinator replicas.
    pub coordinators: usize,
    /// Nodes.
    pub nodes: usize,
    /// Start PostgreSQL and Redis hosts (the nodes' base config uses them).
    pub databases: bool,
    /// Leader lease TTL.
    pub lease_ttl: Duration,
    /// Default bake between stages.
    pub bake: Duration,
    /// Stages.
    pub stages: String,
    /// Where the coordinator and node binaries are (default: [`bin_dir`]).
    pub bins: Option<PathBuf>,
}

impl Options {
    /// 3 coordinators, 5 nodes, no databases, lease 2 s, bake 300 ms, stages
    /// `1,50%,100%`.
    pub fn new(store: Store) -> Options {
        Options {
            store,
            coordinators: 3,
            nodes: 5,
            databases: false,
            lease_ttl: Duration::from_secs(2),
            bake: Duration::from_millis(300),
            stages: "1,50%,100%".into(),
            bins: None,
        }
    }
}

/// Ports every host uses on its own address.
pub mod ports {
    /// Coordinator gRPC.
    pub const COORD: u16 = 7000;
    /// Coordinator HTTP (metrics, probes).
    pub const COORD_HTTP: u16 = 7001;
    /// Raft peers.
    pub const RAFT: u16 = 7100;
    /// etcd clients.
    pub const ETCD: u16 = 2379;
    /// etcd peers.
    pub const ETCD_PEER: u16 = 2380;
    /// Node HTTP.
    pub const NODE_HTTP: u16 = 8080;
    /// Node agent (pushes).
    pub const AGENT: u16 = 9090;
    /// PostgreSQL.
    pub const PG: u16 = 5432;
    /// Redis.
    pub const REDIS: u16 = 6379;
}

/// The directory holding the coordinator and node binaries:
/// `$CONFROLL_CHAOS_BINS` when set (to run the suite against another build,
/// e.g. the commit before a fix), else this build's (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("CONFROLL_CHAOS_BINS") {
        Some(d) => PathBuf::from(d),
        None => confroll_testkit::bins::bin_dir(),
    }
}

/// Builds the coordinator and node binaries once per process (a test of this
/// crate does not get other packages' binaries built for it), unless
/// `$CONFROLL_CHAOS_BINS` names prebuilt ones.
pub fn ensure_binaries() -> anyhow::Result<()> {
    if std::env::var_os("CONFROLL_CHAOS_BINS").is_some() {
        return Ok(());
    }
    confroll_testkit::bins::ensure_built()?;
    Ok(())
}

/// A lite node config (no database, no Redis); `ttl` tells versions apart.
pub fn lite(ttl: u32) -> String {
    format!("profile: lite\nlog: {{level: info}}\ncache: {{ttl: {ttl}s}}\n")
}

/// A running cluster. Dropping it kills every process and removes every
/// namespace and (unless kept) its directory.
pub struct Cluster {
    /// The network.
    pub net: Arc<Net>,
    /// What it was started with.
    pub opts: Options,
    /// etcd members (etcd store only).
    pub etcd: Vec<Proc>,
    /// Coordinator replicas `c1..`.
    pub coords: Vec<Proc>,
    /// Nodes `n1..`.
    pub nodes: Vec<Proc>,
    /// PostgreSQL, when asked for.
    pub pg: Option<Proc>,
    /// Redis, when asked for.
    pub redis: Option<Proc>,
    /// The client history.
    pub history: Arc<History>,
    /// Faults and harness events: (when, what).
    events: Mutex<Vec<(u64, String)>>,
    /// Fault proxies on links, by (from, to).
    proxies: Mutex<HashMap<(String, String), FaultProxy>>,
    /// When the last fault healed.
    healed_ms: Mutex<u64>,
    /// The nodes' base config.
    pub base_config: String,
    /// PostgreSQL and Redis URLs, when the cluster has them.
    pub db_urls: Option<(String, String)>,
}

impl Cluster {
    /// Starts everything and waits until every node is registered and some
    /// replica leads.
    pub async fn start(opts: Options) -> anyhow::Result<Cluster> {
        if opts.bins.is_none() {
            ensure_binaries()?;
        }
        let net = Net::new()?;
        let dir = net.dir().to_path_buf();
        let key = confroll_common::trust::PushKey::generate();
        std::fs::write(dir.join("push.key"), key.to_pem())?;
        std::fs::write(dir.join("push.pub"), key.public_pem())?;
        let bins = opts.bins.clone().unwrap_or_else(bin_dir);

        let mut pg = None;
        let mut redis = None;
        let mut db_urls = None;
        let base_config = if opts.databases {
            let (p, r) = start_databases(&net, &dir).await?;
            let db = format!("postgres://postgres@{}:{}/postgres", p.host.ip, ports::PG);
            let rd = format!("redis://{}:{}/0", r.host.ip, ports::REDIS);
            pg = Some(p);
            redis = Some(r);
            let base = db_config(&db, &rd, 3, 30);
            db_urls = Some((db, rd));
            base
        } else {
            lite(30)
        };

        let mut etcd = Vec::new();
        if opts.store == Store::Etcd {
            let hosts: Vec<Host> = (1..=3).map(|i| net.add_host(&format!("e{i}"), 20 + i)).collect::<Result<_, _>>()?;
            let initial: Vec<String> =
                hosts.iter().map(|h| format!("{}=http://{}:{}", h.name, h.ip, ports::ETCD_PEER)).collect();
            for h in &hosts {
                let data = dir.join(&h.name);
                let argv = vec![
                    "etcd".into(),
                    "--name".into(),
                    h.name.clone(),
                    "--data-dir".into(),
                    data.display().to_string(),
                    "--listen-client-urls".into(),
                    format!("http://{}:{}", h.ip, ports::ETCD),
                    "--advertise-client-urls".into(),
                    format!("http://{}:{}", h.ip, ports::ETCD),
                    "--listen-peer-urls".into(),
                    format!("http://{}:{}", h.ip, ports::ETCD_PEER),
                    "--initial-advertise-peer-urls".into(),
                    format!("http://{}:{}", h.ip, ports::ETCD_PEER),
                    "--initial-cluster".into(),
                    initial.join(","),
                    "--initial-cluster-state".into(),
                    "new".into(),
                    "--heartbeat-interval".into(),
                    "100".into(),
                    "--election-timeout".into(),
                    "1000".into(),
                    "--log-level".into(),
                    "warn".into(),
                ];
                let mut p = Proc::new(&format!("etcd {}", h.name), h, argv, dir.join(format!("{}.log", h.name)));
                p.start()?;
                etcd.push(p);
            }
            for p in &mut etcd {
                wait_listening(&net, p, SocketAddr::new(p.host.ip.into(), ports::ETCD)).await?;
            }
        }

        let coord_hosts: Vec<Host> =
            (1..=opts.coordinators).map(|i| net.add_host(&format!("c{i}"), 10 + i as u8)).collect::<Result<_, _>>()?;
        let etcd_endpoints: Vec<String> =
            etcd.iter().map(|p| format!("http://{}:{}", p.host.ip, ports::ETCD)).collect();
        let raft_peers: Vec<String> =
            coord_hosts.iter().enumerate().map(|(i, h)| format!("{}={}:{}", i + 1, h.ip, ports::RAFT)).collect();
        let mut coords = Vec::new();
        for (i, h) in coord_hosts.iter().enumerate() {
            let mut argv: Vec<String> = vec![
                bins.join("confroll-coordinator").display().to_string(),
                "--id".into(),
                h.name.clone(),
                "--listen".into(),
                format!("{}:{}", h.ip, ports::COORD),
                "--http-listen".into(),
                format!("{}:{}", h.ip, ports::COORD_HTTP),
                "--lease-ttl".into(),
                format!("{}ms", opts.lease_ttl.as_millis()),
                "--default-bake".into(),
                format!("{}ms", opts.bake.as_millis()),
                "--default-health-interval".into(),
                "100ms".into(),
                "--default-stages".into(),
                opts.stages.clone(),
                "--registration-ttl".into(),
                "3s".into(),
                "--push-key".into(),
                dir.join("push.key").display().to_string(),
                "--log-format".into(),
                "json".into(),
            ];
            match opts.store {
                Store::Etcd => {
                    argv.extend(["--store".into(), "etcd".into(), "--etcd-endpoints".into(), etcd_endpoints.join(",")])
                }
                Store::Raft => argv.extend([
                    "--store".into(),
                    "raft".into(),
                    "--raft-id".into(),
                    (i + 1).to_string(),
                    "--raft-peers".into(),
                    raft_peers.join(","),
                    "--data-dir".into(),
                    dir.join(format!("{}-raft", h.name)).display().to_string(),
                ]),
            }
            let mut p = Proc::new(&h.name, h, argv, dir.join(format!("{}.log", h.name)));
            p.start()?;
            coords.push(p);
        }
        for p in &mut coords {
            wait_listening(&net, p, SocketAddr::new(p.host.ip.into(), ports::COORD)).await?;
        }

        let cfg = dir.join("base.yaml");
        std::fs::write(&cfg, &base_config)?;
        let urls: Vec<String> = coords.iter().map(|c| format!("http://{}:{}", c.host.ip, ports::COORD)).collect();
        let mut nodes = Vec::new();
        for i in 1..=opts.nodes {
            let h = net.add_host(&format!("n{i}"), 30 + i as u8)?;
            let argv = vec![
                bins.join("confroll-node").display().to_string(),
                "--config".into(),
                cfg.display().to_string(),
                "--id".into(),
                h.name.clone(),
                "--listen".into(),
                format!("{}:{}", h.ip, ports::NODE_HTTP),
                "--agent-listen".into(),
                format!("{}:{}", h.ip, ports::AGENT),
                "--state-dir".into(),
                dir.join(format!("{}.state", h.name)).display().to_string(),
                "--no-watch".into(),
                "--coordinator".into(),
                urls.join(","),
                "--trust-keys".into(),
                dir.join("push.pub").display().to_string(),
            ];
            let mut p = Proc::new(&h.name, &h, argv, dir.join(format!("{}.log", h.name)));
            p.start()?;
            nodes.push(p);
        }
        for p in &mut nodes {
            wait_listening(&net, p, SocketAddr::new(p.host.ip.into(), ports::NODE_HTTP)).await?;
        }
        let cluster = Cluster {
            net,
            opts,
            etcd,
            coords,
            nodes,
            pg,
            redis,
            history: Arc::default(),
            events: Mutex::default(),
            proxies: Mutex::default(),
            healed_ms: Mutex::new(0),
            base_config,
            db_urls,
        };
        cluster.wait_ready(Duration::from_secs(30)).await?;
        cluster.event("cluster ready");
        Ok(cluster)
    }

    /// The run's directory.
    pub fn dir(&self) -> &Path {
        self.net.dir()
    }

    /// Records a harness event (a fault, a heal) for the timeline.
    pub fn event(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(event = %what, "chaos");
        self.events.lock().expect("events").push((now_ms(), what));
    }

    /// Faults and harness events so far.
    pub fn events(&self) -> Vec<(u64, String)> {
        self.events.lock().expect("events").clone()
    }

    /// When the last fault healed (0: none did).
    pub fn healed_ms(&self) -> u64 {
        *self.healed_ms.lock().expect("healed")
    }

    /// Coordinator `c<i>`'s gRPC URL.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}:{}", self.coords[i].host.ip, ports::COORD)
    }

    /// A recording client of replica `i`.
    pub fn client(&self, id: u32, i: usize) -> Client {
        // The channel's worker task is spawned on the entered runtime: the
        // hub's, so that its connections start on the bridge.
        let handle = self.net.hub_handle();
        let _hub = handle.enter();
        Client::new(id, &self.coords[i].name, &self.url(i), self.history.clone()).expect("valid URL")
    }

    /// Index of coordinator `name`.
    pub fn coord_index(&self, name: &str) -> usize {
        self.coords.iter().position(|c| c.name == name).unwrap_or_else(|| panic!("no coordinator {name}"))
    }

    /// Index of node `name`.
    pub fn node_index(&self, name: &str) -> usize {
        self.nodes.iter().position(|c| c.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Waits until every live node is registered and a replica leads; the
    /// leader's name.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<String> {
        let want = self.nodes.len();
        self.poll(within, "every node registered and a leader", move |s| {
            (s.nodes.len() >= want && !s.leader_id.is_empty()).then(|| s.leader_id.clone())
        })
        .await
    }

    /// Asks every replica that answers for the status until `f` accepts an
    /// answer (no history record: this is the harness looking).
    pub async fn poll<T: Send + 'static>(
        &self,
        within: Duration,
        what: &str,
        f: impl Fn(&confroll_proto::v1::GetStatusResponse) -> Option<T> + Send + Sync + 'static,
    ) -> anyhow::Result<T> {
        let urls: Vec<String> = (0..self.coords.len()).map(|i| self.url(i)).collect();
        let what = what.to_owned();
        self.net
            .on_hub(async move {
                let deadline = Instant::now() + within;
                loop {
                    for u in &urls {
                        if let Some(s) = status_of(u).await
                            && let Some(v) = f(&s)
                        {
                            return Ok(v);
                        }
                    }
                    if Instant::now() > deadline {
                        bail!("timed out after {within:?} waiting for {what}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
    }

    /// Waits until some replica names a leader other than `old`.
    pub async fn wait_new_leader(&self, old: &str, within: Duration) -> anyhow::Result<()> {
        let old = old.to_owned();
        self.poll(within, "a new leader", move |s| (!s.leader_id.is_empty() && s.leader_id != old).then_some(())).await
    }

    /// The current leader's index, waiting for one.
    pub async fn leader(&self, within: Duration) -> anyhow::Result<usize> {
        let name = self.poll(within, "a leader", |s| (!s.leader_id.is_empty()).then(|| s.leader_id.clone())).await?;
        Ok(self.coord_index(&name))
    }

    // ---- process faults ----

    /// Process `i` of `role` (`i` is 0 for PostgreSQL and Redis).
    fn proc_mut(&mut self, role: Role, i: usize) -> anyhow::Result<&mut Proc> {
        let p = match role {
            Role::Coordinator => self.coords.get_mut(i),
            Role::Node => self.nodes.get_mut(i),
            Role::Etcd => self.etcd.get_mut(i),
            Role::Postgres => self.pg.as_mut(),
            Role::Redis => self.redis.as_mut(),
        };
        p.with_context(|| format!("this cluster has no {role:?} #{i}"))
    }

    /// SIGKILLs process `i` of `role` (a crash: no shutdown of any kind).
    pub fn kill(&mut self, role: Role, i: usize) {
        let Ok(name) = self.proc_mut(role, i).map(|p| p.name.clone()) else { return };
        self.event(format!("kill {name}"));
        if let Ok(p) = self.proc_mut(role, i) {
            p.kill();
        }
    }

    /// SIGTERMs process `i` of `role` (a rolling update, a drained machine:
    /// it may shut down cleanly; a coordinator resigns first), SIGKILLed if
    /// still running after `grace`.
    pub fn terminate(&mut self, role: Role, i: usize, grace: Duration) {
        let Ok(name) = self.proc_mut(role, i).map(|p| p.name.clone()) else { return };
        self.event(format!("terminate {name}"));
        if let Ok(p) = self.proc_mut(role, i) {
            p.stop(grace);
        }
    }

    /// Starts process `i` of `role` again (after a kill: the same command,
    /// data dir and address; a running one is killed first) and waits until
    /// it listens.
    pub async fn restart(&mut self, role: Role, i: usize) -> anyhow::Result<()> {
        let what = format!("restart {}", self.proc_mut(role, i)?.name);
        self.event(what);
        let net = self.net.clone();
        let p = self.proc_mut(role, i)?;
        p.restart()?;
        let addr = SocketAddr::new(p.host.ip.into(), role.port());
        wait_listening(&net, p, addr).await
    }

    /// SIGSTOPs coordinator `i`.
    pub fn pause_coord(&mut self, i: usize) -> anyhow::Result<()> {
        self.event(format!("pause {}", self.coords[i].name));
        self.coords[i].pause()
    }

    /// SIGCONTs coordinator `i`.
    pub fn resume_coord(&mut self, i: usize) -> anyhow::Result<()> {
        self.event(format!("resume {}", self.coords[i].name));
        self.coords[i].resume()
    }

    /// SIGKILLs coordinator `i`.
    pub fn kill_coord(&mut self, i: usize) {
        self.kill(Role::Coordinator, i);
    }

    /// Restarts coordinator `i` (same data dir) and waits until it listens.
    pub async fn restart_coord(&mut self, i: usize) -> anyhow::Result<()> {
        self.restart(Role::Coordinator, i).await
    }

    /// SIGKILLs node `i`.
    pub fn kill_node(&mut self, i: usize) {
        self.kill(Role::Node, i);
    }

    /// Restarts node `i` (same state dir) and waits until it listens.
    pub async fn restart_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.restart(Role::Node, i).await
    }

    /// SIGKILLs etcd member `i`.
    pub fn kill_etcd(&mut self, i: usize) {
        self.kill(Role::Etcd, i);
    }

    /// Restarts etcd member `i` on its data dir.
    pub async fn restart_etcd(&mut self, i: usize) -> anyhow::Result<()> {
        self.restart(Role::Etcd, i).await
    }

    /// The index of the etcd member that leads the etcd cluster.
    pub async fn etcd_leader(&self) -> anyhow::Result<usize> {
        for (i, p) in self.etcd.iter().enumerate() {
            let url = format!("http://{}:{}/v3/maintenance/status", p.host.ip, ports::ETCD);
            let body: serde_json::Value = self
                .net
                .on_hub(async move {
                    let r = reqwest::Client::new().post(url).body("{}").send().await?;
                    anyhow::Ok(r.json().await?)
                })
                .await
                .unwrap_or_default();
            let (member, leader) = (body["header"]["member_id"].as_str(), body["leader"].as_str());
            if member.is_some() && member == leader {
                return Ok(i);
            }
        }
        bail!("no etcd member says it leads")
    }

    /// Stops PostgreSQL (SIGKILL: the server is gone, as in a crash).
    pub fn stop_pg(&mut self) {
        self.kill(Role::Postgres, 0);
    }

    /// Starts PostgreSQL again and waits until it listens.
    pub async fn start_pg(&mut self) -> anyhow::Result<()> {
        self.restart(Role::Postgres, 0).await
    }

    /// Stops Redis (SIGKILL).
    pub fn stop_redis(&mut self) {
        self.kill(Role::Redis, 0);
    }

    /// Starts Redis again and waits until it listens.
    pub async fn start_redis(&mut self) -> anyhow::Result<()> {
        self.restart(Role::Redis, 0).await
    }

    // ---- network faults ----

    fn host_of(&self, name: &str) -> Host {
        self.net.host(name)
    }

    /// Cuts `a` and `b` off each other (both ways).
    pub fn cut(&self, a: &str, b: &str) -> anyhow::Result<()> {
        self.event(format!("cut {a} <-> {b}"));
        faults::cut(&self.host_of(a), &self.host_of(b))
    }

    /// Cuts what `from` sends to `to` only.
    pub fn cut_one_way(&self, from: &str, to: &str) -> anyhow::Result<()> {
        self.event(format!("cut {from} -> {to}"));
        faults::cut_one_way(&self.host_of(from), &self.host_of(to))
    }

    /// Cuts coordinator `coord` off its store: every etcd member, or (raft)
    /// the other replicas. It still reaches the nodes.
    pub fn cut_from_store(&self, coord: &str) -> anyhow::Result<()> {
        let store: Vec<String> = if self.etcd.is_empty() {
            self.coords.iter().filter(|c| c.name != coord).map(|c| c.name.clone()).collect()
        } else {
            self.etcd.iter().map(|e| e.host.name.clone()).collect()
        };
        for h in &store {
            self.cut(coord, h)?;
        }
        Ok(())
    }

    /// Cuts `host` off everything.
    pub fn isolate(&self, host: &str) -> anyhow::Result<()> {
        self.event(format!("isolate {host}"));
        faults::isolate(&self.host_of(host))
    }

    /// Blackholes every link of `host`: what it sends and what is sent to it
    /// vanishes (an isolate, named for the link fault).
    pub fn blackhole(&self, host: &str) -> anyhow::Result<()> {
        self.event(format!("blackhole {host}"));
        faults::isolate(&self.host_of(host))
    }

    /// Drops `percent`% of the packets between `a` and `b`.
    pub fn loss(&self, a: &str, b: &str, percent: u8) -> anyhow::Result<()> {
        self.event(format!("loss {percent}% {a} <-> {b}"));
        faults::loss(&self.host_of(a), &self.host_of(b), percent)
    }

    /// Delays what coordinator `from` sends to node `to`'s agent and the
    /// answers by `delay` each way (a fault proxy on the hub).
    pub async fn delay(&self, from: &str, to: &str, delay: Duration) -> anyhow::Result<()> {
        self.event(format!("delay {}ms {from} -> {to}", delay.as_millis()));
        let target = SocketAddr::new(self.host_of(to).ip.into(), ports::AGENT);
        let key = (from.to_owned(), to.to_owned());
        let existing = self.proxies.lock().expect("proxies").get(&key).map(|p| p.local_addr());
        let addr = match existing {
            Some(a) => a,
            None => {
                let listen = SocketAddr::new(self.net.hub_ip().into(), 0);
                let proxy = self.net.on_hub(async move { FaultProxy::start(listen, target).await }).await?;
                let addr = proxy.local_addr();
                faults::redirect(&self.host_of(from), &self.host_of(to), ports::AGENT, addr)?;
                self.proxies.lock().expect("proxies").insert(key.clone(), proxy);
                addr
            }
        };
        let _ = addr;
        if let Some(p) = self.proxies.lock().expect("proxies").get(&key) {
            p.set_delay(delay);
        }
        Ok(())
    }

    /// Removes every network fault and proxy; records the time.
    pub fn heal(&self) -> anyhow::Result<()> {
        self.event("heal");
        faults::heal(&self.net.hosts())?;
        let proxies = std::mem::take(&mut *self.proxies.lock().expect("proxies"));
        let handle = self.net.hub_handle();
        // Proxies own tasks on the hub runtime: drop them there.
        handle.spawn(async move { drop(proxies) });
        *self.healed_ms.lock().expect("healed") = now_ms();
        Ok(())
    }

    /// Marks "every fault is over" now (after restarts and resumes too).
    pub fn healed(&self) {
        self.event("all faults over");
        *self.healed_ms.lock().expect("healed") = now_ms();
    }
}

/// `GetStatus` of the replica at `url`, on the calling (hub) runtime.
pub async fn status_of(url: &str) -> Option<confroll_proto::v1::GetStatusResponse> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_owned())
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2));
    let ch = ch.connect().await.ok()?;
    let mut c = confroll_proto::v1::coordinator_client::CoordinatorClient::new(ch);
    c.get_status(confroll_proto::v1::GetStatusRequest::default()).await.ok().map(|r| r.into_inner())
}

/// Waits until `addr` accepts connections (from the hub), or `p` exits.
pub async fn wait_listening(net: &Net, p: &mut Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if net.on_hub(async move { tokio::net::TcpStream::connect(addr).await.is_ok() }).await {
            return Ok(());
        }
        if !p.running() {
            let log = p.log_text();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "{} exited before it listened on {addr}; its log ends:\n{}",
                p.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if Instant::now() > deadline {
            bail!("{} never listened on {addr}", p.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node config with the database (a pool of `conns`) and Redis.
pub fn db_config(db: &str, redis: &str, conns: u32, ttl: u32) -> String {
    format!(
        "log: {{level: info}}\ndatabase: {{url: \"{db}\", max_conns: {conns}, min_conns: 1, acquire_timeout: 1s}}\n\
         redis: {{url: \"{redis}\", pool_size: 2, timeout: 500ms}}\ncache: {{ttl: {ttl}s}}\n"
    )
}

/// PostgreSQL (as the `postgres` user, trust auth on the bridge) and Redis,
/// each on a host of its own.
async fn start_databases(net: &Net, dir: &Path) -> anyhow::Result<(Proc, Proc)> {
    let bindir = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (scripts/lib.sh ensure_packages)")?
        .flatten()
        .map(|d| d.path().join("bin"))
        .find(|b| b.join("initdb").exists())
        .context("no initdb under /usr/lib/postgresql")?;
    let _ = std::process::Command::new("useradd").args(["--system", "--no-create-home", "postgres"]).output();
    let data = dir.join("pgdata");
    std::fs::create_dir_all(&data)?;
    crate::netns::sh(&["chown", "-R", "postgres", &data.display().to_string()])?;
    // The run dir must be traversable by postgres.
    crate::netns::sh(&["chmod", "755", &dir.display().to_string()])?;
    let init = std::process::Command::new("setpriv")
        .args(["--reuid", "postgres", "--regid", "postgres", "--clear-groups", "--"])
        .arg(bindir.join("initdb"))
        .args(["-D", &data.display().to_string(), "-U", "postgres", "-A", "trust", "--no-sync"])
        .output()?;
    if !init.status.success() {
        bail!("initdb: {}", String::from_utf8_lossy(&init.stderr));
    }
    let pg_host = net.add_host("pg", 50)?;
    let argv = vec![
        bindir.join("postgres").display().to_string(),
        "-D".into(),
        data.display().to_string(),
        "-h".into(),
        pg_host.ip.to_string(),
        "-p".into(),
        ports::PG.to_string(),
        "-k".into(),
        data.display().to_string(),
        "-c".into(),
        "fsync=off".into(),
        "-c".into(),
        format!("hba_file={}", write_hba(&data)?),
    ];
    let mut pg = Proc::new("postgresql", &pg_host, argv, dir.join("pg.log")).as_user("postgres");
    pg.start()?;
    wait_listening(net, &mut pg, SocketAddr::new(pg_host.ip.into(), ports::PG)).await?;
    let redis_host = net.add_host("redis", 51)?;
    let argv = vec![
        "redis-server".into(),
        "--bind".into(),
        redis_host.ip.to_string(),
        "--port".into(),
        ports::REDIS.to_string(),
        "--save".into(),
        String::new(),
        "--appendonly".into(),
        "no".into(),
        "--protected-mode".into(),
        "no".into(),
    ];
    let mut redis = Proc::new("redis", &redis_host, argv, dir.join("redis.log"));
    redis.start()?;
    wait_listening(net, &mut redis, SocketAddr::new(redis_host.ip.into(), ports::REDIS)).await?;
    Ok((pg, redis))
}

/// An hba file that trusts the bridge's subnet (and nothing else).
fn write_hba(data: &Path) -> anyhow::Result<String> {
    let [a, b, c] = crate::netns::SUBNET;
    let path = data.join("chaos_hba.conf");
    std::fs::write(&path, format!("local all all trust\nhost all all {a}.{b}.{c}.0/24 trust\n"))?;
    crate::netns::sh(&["chown", "postgres", &path.display().to_string()])?;
    Ok(path.display().to_string())
}

impl Cluster {
    /// Client `id` of replica `i` submits `content` with `bake` (recorded).
    pub async fn submit(&self, id: u32, i: usize, content: &str, bake: &str) -> crate::records::OpResult {
        let (mut c, content, bake) = (self.client(id, i), content.to_owned(), bake.to_owned());
        self.net.on_hub(async move { c.submit(&content, &bake).await }).await
    }

    /// Client `id` of replica `i` submits `content` with `policy` (recorded).
    pub async fn submit_with(
        &self,
        id: u32,
        i: usize,
        content: &str,
        policy: confroll_proto::v1::RolloutPolicy,
    ) -> crate::records::OpResult {
        let (mut c, content) = (self.client(id, i), content.to_owned());
        self.net.on_hub(async move { c.submit_with(&content, policy).await }).await
    }

    /// Client `id` of replica `i` rolls back to `to` (recorded).
    pub async fn rollback(&self, id: u32, i: usize, to: u64) -> crate::records::OpResult {
        let mut c = self.client(id, i);
        self.net.on_hub(async move { c.rollback(to).await }).await
    }

    /// Client `id` of replica `i` aborts the running rollout (recorded).
    pub async fn abort(&self, id: u32, i: usize) -> crate::records::OpResult {
        let mut c = self.client(id, i);
        self.net.on_hub(async move { c.abort().await }).await
    }

    /// Submits until a replica acknowledges (a new leader may still be taking
    /// office); the version and rollout id.
    pub async fn submit_acked(&self, id: u32, content: &str, bake: &str) -> anyhow::Result<(u64, String)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut i = 0;
        loop {
            match self.submit(id, i % self.coords.len(), content, bake).await {
                crate::records::OpResult::Ok { value: crate::records::OpValue::Submitted { version, rollout_id } } => {
                    return Ok((version, rollout_id));
                }
                other if Instant::now() > deadline => bail!("no replica acknowledged a submit: {other:?}"),
                _ => {
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }

    /// Waits until the running rollout has reached stage `stage` with
    /// `applied` nodes on it; its canary order.
    pub async fn wait_stage(&self, stage: u32, applied: u32, within: Duration) -> anyhow::Result<Vec<String>> {
        self.poll(within, &format!("stage {stage} with {applied} node(s) applied"), move |s| {
            let r = s.rollout.as_ref()?;
            (r.state == "RUNNING" && r.stage >= stage && r.applied_nodes >= applied).then(|| r.canary_order.clone())
        })
        .await
    }

    /// Waits for the running rollout to end; its final state.
    pub async fn wait_done(&self, within: Duration) -> anyhow::Result<confroll_proto::v1::RolloutInfo> {
        self.poll(within, "the rollout to end", |s| {
            s.rollout.clone().filter(|r| matches!(r.state.as_str(), "SUCCEEDED" | "ROLLED_BACK" | "ABORTED"))
        })
        .await
    }
}
