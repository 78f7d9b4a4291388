//! Real hosts: one network namespace per host, a bridge between them, and
//! cleanup that happens whatever ends the run.
//!
//! ```text
//!                     hub namespace (crf-<pid>-<n>-hub)
//!          ┌───────────────────────────────────────────────┐
//!          │  br0 10.77.0.1/24   the harness's clients and │
//!          │   │  │  │  │       fault proxies run here    │
//!          └───┼──┼──┼──┼───────────────────────────────────┘
//!        veth  │  │  │  │   (one pair per host)
//!     ┌────────┘  │  │  └──────────┐
//!   c1 10.77.0.11 c2 …  e1 10.77.0.21 …  n1 10.77.0.31 …
//!   (each: its own namespace, lo, eth0, nft tables for faults)
//! ```
//!
//! The bridge lives in a namespace of its own, so the machine's own network
//! never sees a private address and deleting the namespaces deletes every
//! link with them. Names carry the test process's pid: [`sweep`] removes
//! what a killed run left behind (namespaces, their processes, temp dirs)
//! before a new run starts, [`Net`]'s `Drop` removes its own on success and
//! on panic, and a SIGINT/SIGTERM handler removes every live run's before
//! the process exits.

use std::{
    collections::HashMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use anyhow::{Context, bail};
use nix::{sched::CloneFlags, sys::signal::Signal, unistd::Pid};

/// Prefix of every namespace and temp dir the harness makes.
pub const PREFIX: &str = "crf-";
/// The subnet every run uses inside its own namespaces (never outside them).
pub const SUBNET: [u8; 3] = [10, 77, 0];

/// The marker file of a run dir kept as evidence (sweeps leave it).
pub const KEPT: &str = "KEPT";

/// Where runs keep their temp dirs: `<base>/<pid>-<n>`.
pub fn base_dir() -> PathBuf {
    std::env::temp_dir().join("confroll-chaos")
}

/// Whether this process may make namespaces (root, `ip` and `nft` present).
/// `Err` says why not, for the "skipped" line.
pub fn available() -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("not root: network namespaces need CAP_SYS_ADMIN");
    }
    for tool in ["ip", "nft"] {
        let ok = Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        if !ok {
            bail!("`{tool}` is not installed (scripts/lib.sh ensure_packages installs it)");
        }
    }
    let probe = format!("{PREFIX}probe-{}", std::process::id());
    let made = sh(&["ip", "netns", "add", &probe]);
    let _ = sh(&["ip", "netns", "del", &probe]);
    made.map(|_| ()).map_err(|e| anyhow::anyhow!("cannot create a network namespace: {e}"))
}

/// Runs `argv`; its stderr on failure.
pub fn sh(argv: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(argv[0]).args(&argv[1..]).stdin(Stdio::null()).output().with_context(|| argv.join(" "))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Feeds `script` to `nft -f -` inside namespace `ns`.
pub fn nft(ns: &str, script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("nft")?;
    child.stdin.take().expect("piped").write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft in {ns} failed: {}\n{script}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Every namespace whose name starts with [`PREFIX`].
pub fn our_namespaces() -> Vec<String> {
    sh(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX) && !n.starts_with(&format!("{PREFIX}probe")))
        .map(str::to_owned)
        .collect()
}

/// SIGKILLs every process in `ns`, waits (briefly) for them to go, and
/// deletes it.
pub fn destroy_namespace(ns: &str) {
    for _ in 0..50 {
        let pids: Vec<i32> = sh(&["ip", "netns", "pids", ns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for p in pids {
            // A stopped process dies of SIGKILL too.
            let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = sh(&["ip", "netns", "del", ns]);
}

/// The pid a run's names carry, if its process is gone.
fn dead_owner(name: &str) -> bool {
    let pid = name.trim_start_matches(PREFIX).split('-').next().and_then(|p| p.parse::<i32>().ok());
    match pid {
        Some(p) => !Path::new(&format!("/proc/{p}")).exists(),
        None => false,
    }
}

/// Removes what runs of dead processes left: their namespaces (and every
/// process in them) and their temp dirs. Returns how many things it removed.
pub fn sweep() -> usize {
    let mut removed = 0;
    for ns in our_namespaces() {
        if dead_owner(&ns) {
            destroy_namespace(&ns);
            removed += 1;
        }
    }
    if let Ok(dirs) = fs::read_dir(base_dir()) {
        for d in dirs.flatten() {
            let name = format!("{PREFIX}{}", d.file_name().to_string_lossy());
            // A failed run's evidence stays until someone removes it.
            if dead_owner(&name) && !d.path().join(KEPT).exists() {
                let _ = fs::remove_dir_all(d.path());
                removed += 1;
            }
        }
    }
    removed
}

/// What a live run must remove if the process is interrupted.
#[derive(Default)]
struct Live {
    runs: HashMap<u64, (Vec<String>, PathBuf)>,
}

fn live() -> &'static Mutex<Live> {
    static LIVE: OnceLock<Mutex<Live>> = OnceLock::new();
    LIVE.get_or_init(|| {
        install_interrupt_cleanup();
        Mutex::new(Live::default())
    })
}

/// On SIGINT or SIGTERM: remove every live run's namespaces and dirs, then
/// exit with 128 + the signal, as the default action would have.
fn install_interrupt_cleanup() {
    std::thread::Builder::new()
        .name("chaos-interrupt".into())
        .spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
                else {
                    return;
                };
                let code = tokio::select! {
                    _ = int.recv() => 130,
                    _ = term.recv() => 143,
                };
                let runs = std::mem::take(&mut live().lock().unwrap_or_else(|e| e.into_inner()).runs);
                for (_, (namespaces, dir)) in runs {
                    for ns in namespaces.iter().rev() {
                        destroy_namespace(ns);
                    }
                    let _ = fs::remove_dir_all(dir);
                }
                std::process::exit(code);
            });
        })
        .expect("interrupt thread");
}

/// A host: a namespace with one address on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name (`c1`, `e2`, `n3`, `pg`).
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
}

/// A run's network: the hub (bridge, clients, proxies) and its hosts.
pub struct Net {
    id: u64,
    prefix: String,
    hub_ns: String,
    hosts: Mutex<Vec<Host>>,
    dir: PathBuf,
    keep_dir: std::sync::atomic::AtomicBool,
    hub: Option<HubRuntime>,
}

impl Net {
    /// Makes the hub namespace, its bridge, and a temp dir; sweeps what dead
    /// runs left first.
    pub fn new() -> anyhow::Result<Arc<Net>> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        sweep();
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}-{id}-", std::process::id());
        let dir = base_dir().join(format!("{}-{id}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let hub_ns = format!("{prefix}hub");
        live().lock().unwrap_or_else(|e| e.into_inner()).runs.insert(id, (vec![hub_ns.clone()], dir.clone()));
        sh(&["ip", "netns", "add", &hub_ns])?;
        let [a, b, c] = SUBNET;
        let hub_ip = format!("{a}.{b}.{c}.1/24");
        sh(&["ip", "-n", &hub_ns, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &hub_ns, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &hub_ns, "addr", "add", &hub_ip, "dev", "br0"])?;
        sh(&["ip", "-n", &hub_ns, "link", "set", "br0", "up"])?;
        let hub = HubRuntime::start(&hub_ns)?;
        Ok(Arc::new(Net {
            id,
            prefix,
            hub_ns,
            hosts: Mutex::new(Vec::new()),
            dir,
            keep_dir: std::env::var_os("CONFROLL_CHAOS_KEEP").is_some().into(),
            hub: Some(hub),
        }))
    }

    /// The run's temp dir (host dirs, logs, journals).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keeps the temp dir when the run ends (a failed scenario's evidence),
    /// and marks it so that no later sweep removes it.
    pub fn keep_dir(&self) {
        self.keep_dir.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = fs::write(self.dir.join(KEPT), "evidence of a failed run: remove by hand when done\n");
    }

    /// The hub's address on the bridge.
    pub fn hub_ip(&self) -> Ipv4Addr {
        let [a, b, c] = SUBNET;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// Adds host `name` at `.<last>` of the subnet: its namespace, a veth
    /// pair into the bridge, lo up, and empty nft tables for faults.
    pub fn add_host(&self, name: &str, last: u8) -> anyhow::Result<Host> {
        let ns = format!("{}{name}", self.prefix);
        live().lock().unwrap_or_else(|e| e.into_inner()).runs.entry(self.id).or_default().0.push(ns.clone());
        sh(&["ip", "netns", "add", &ns])?;
        let [a, b, c] = SUBNET;
        let ip = Ipv4Addr::new(a, b, c, last);
        let hub_end = format!("v{name}");
        sh(&["ip", "-n", &self.hub_ns, "link", "add", &hub_end, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        sh(&["ip", "-n", &self.hub_ns, "link", "set", &hub_end, "master", "br0", "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        nft(&ns, crate::faults::BASE_TABLES)?;
        let host = Host { name: name.into(), ns, ip };
        self.hosts.lock().expect("hosts").push(host.clone());
        Ok(host)
    }

    /// Removes host `name`, as a machine (or a pod) that is gone: SIGKILLs
    /// every process in its namespace and deletes the namespace, its veth
    /// and its address with it. Its name may be added again (with the same
    /// or another address). Nothing happens if there is no such host.
    pub fn remove_host(&self, name: &str) {
        let gone = {
            let mut hosts = self.hosts.lock().expect("hosts");
            hosts.iter().position(|h| h.name == name).map(|i| hosts.remove(i))
        };
        if let Some(h) = gone {
            destroy_namespace(&h.ns);
            if let Some(run) = live().lock().unwrap_or_else(|e| e.into_inner()).runs.get_mut(&self.id) {
                run.0.retain(|ns| *ns != h.ns);
            }
        }
    }

    /// The hub's namespace (to run a process there: `ip netns exec`).
    pub fn hub_ns(&self) -> &str {
        &self.hub_ns
    }

    /// Every host, in the order they were added.
    pub fn hosts(&self) -> Vec<Host> {
        self.hosts.lock().expect("hosts").clone()
    }

    /// Host `name`.
    pub fn host(&self, name: &str) -> Host {
        self.hosts().into_iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Runs `f` on the hub's runtime (its sockets live in the hub namespace,
    /// on the bridge) and waits for it.
    pub async fn on_hub<F, T>(&self, f: F) -> T
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        match self.hub.as_ref().expect("hub runs until drop").handle.spawn(f).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("hub task cancelled: {e}"),
        }
    }

    /// The hub runtime's handle, to spawn background tasks (clients, proxies).
    pub fn hub_handle(&self) -> tokio::runtime::Handle {
        self.hub.as_ref().expect("hub runs until drop").handle.clone()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Proxies and clients first (they hold sockets in the hub), then
        // every host and its processes, then the hub.
        drop(self.hub.take());
        let hosts = std::mem::take(&mut *self.hosts.lock().unwrap_or_else(|e| e.into_inner()));
        for h in hosts.iter().rev() {
            destroy_namespace(&h.ns);
        }
        destroy_namespace(&self.hub_ns);
        if !self.keep_dir.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = fs::remove_dir_all(&self.dir);
        }
        live().lock().unwrap_or_else(|e| e.into_inner()).runs.remove(&self.id);
    }
}

/// A tokio runtime on a thread that entered the hub namespace: everything it
/// runs connects from, and listens on, the bridge.
struct HubRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HubRuntime {
    fn start(ns: &str) -> anyhow::Result<HubRuntime> {
        let path = format!("/var/run/netns/{ns}");
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(format!("hub-{ns}")).spawn(move || {
            let entered = fs::File::open(&path)
                .map_err(anyhow::Error::from)
                .and_then(|f| nix::sched::setns(f, CloneFlags::CLONE_NEWNET).map_err(anyhow::Error::from));
            let rt = entered.and_then(|()| {
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from)
            });
            match rt {
                Ok(rt) => {
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                    rt.shutdown_timeout(Duration::from_secs(1));
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
        let handle = rx.recv().context("hub thread")??;
        Ok(HubRuntime { handle, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for HubRuntime {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
