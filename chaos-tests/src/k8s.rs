//! Kubernetes manifests without Kubernetes: the objects `kubectl kustomize`
//! renders, run the way a kubelet would run them, as real processes on the
//! harness's hosts (`netns.rs`). Used by `tests/manifests.rs`.
//!
//! | Kubernetes | here |
//! |---|---|
//! | rendering | `kubectl kustomize` (`scripts/lib.sh` `ensure_kubectl` finds or installs one), every document parsed into a JSON value |
//! | a pod of several containers (`shareProcessNamespace: true`) | one PID and UTS namespace; its first process runs the init containers in turn (a failure ends the pod), then every container at once, each in a mount namespace of its own ([`pod_argv`]) with its stdout and stderr on a pipe; the prober runs the first container's probes, the Services see every container's ports |
//! | a StatefulSet pod `<sts>-<i>` | a host of the [`Net`]: its own network namespace and address on the bridge; inside it a UTS namespace (host name: the pod name), a mount namespace and a PID namespace in which the container's process is PID 1 (`unshare --kill-child`: killing the pod kills its whole tree) |
//! | `command`, `args`, `env` | exactly the container's `command` + `args`, each `$(VAR)` expanded as the kubelet does (`$$` escapes, unknown references stay); `env` in order, `value` expanded from the variables before it, `valueFrom` from the downward API (`metadata.name`, `metadata.namespace`, `status.podIP`, labels, annotations) or a rendered Secret/ConfigMap key; the process gets that environment plus the image's `PATH`/`HOME` and the kubelet's `HOSTNAME`, and nothing of the test's |
//! | the image | the build's binaries, hard-linked aside and bind-mounted read-only at the path `command` names |
//! | `securityContext` | `setpriv`: `runAsUser`/`runAsGroup` (container over pod), `fsGroup` and `supplementalGroups` as supplementary groups, `allowPrivilegeEscalation: false` as no_new_privs, `capabilities.drop: [ALL]` as empty bounding and inheritable sets; `readOnlyRootFilesystem` as `/` (and every overlay below) remounted read-only in the pod's mount namespace; `runAsNonRoot` checked |
//! | Secret and ConfigMap volumes | materialised from the rendered objects (`data`, `stringData`, `binaryData`; `items`; `defaultMode`/`mode`; group `fsGroup` with group read, as the kubelet's `SetVolumeOwnership` does; the kubelet's `..data` symlink layout, which file watchers see swap), bind-mounted read-only |
//! | `volumeClaimTemplates`, `persistentVolumeClaim` | a directory per claim (`<template>-<pod>`), kept when the pod is deleted and made again; group `fsGroup`, setgid, group-writable |
//! | `emptyDir` | a directory per pod incarnation (a recreated pod gets a new one) |
//! | cluster DNS | a hosts file per pod, as the kubelet's (own line first) plus every name the cluster DNS would answer: `<svc>.<ns>.svc.cluster.local` (a ClusterIP Service: its virtual IP; headless: its endpoints), `<pod>.<svc>.<ns>.svc.cluster.local` for StatefulSet pods under a headless Service (only while ready unless `publishNotReadyAddresses`), and the shorter names the search path would complete. It is kept in a directory bind-mounted into the pod (`/etc/hosts` is a symlink into it), so a change (a pod back with a new IP, readiness) is an atomic rename the pod's resolver sees at its next lookup |
//! | ClusterIP Services | a virtual IP per Service (bridge subnet, `.200` up), nft DNAT in the output path of every pod and of the hub to a random ready endpoint per new connection (as kube-proxy's iptables mode), `targetPort` names resolved per pod; no endpoint: rejected |
//! | kubelet probes | one prober per pod on the hub (the kubelet probes from the machine, outside NetworkPolicy): `httpGet` (200–399 passes, no redirect followed, `User-Agent: kube-probe/…`) or `tcpSocket`, with `timeoutSeconds`; startup first, then readiness and liveness; readiness drives the Service endpoints and DNS (`successThreshold` passes to become ready, `failureThreshold` failures spanning `(failureThreshold-1) × periodSeconds` to leave); a startup probe failing past `initialDelaySeconds + failureThreshold × periodSeconds`, or a liveness probe failing as long as the kubelet tolerates, is recorded as a restart the kubelet would have made |
//!
//! Probes run every 0.5 s instead of every `periodSeconds`: a pass is seen
//! sooner, never one the kubelet would not see, and every time limit is the
//! probe's own.
//!
//! Mount points that do not exist on this machine (`/etc/confroll`,
//! `/var/lib/confroll`, the binary under `/usr/local/bin`) are made on an
//! overlay whose upper layer is in the run's directory, mounted only in the
//! pod's mount namespace: nothing on the machine's disk or in its mount table
//! changes, and everything goes with the pod's last process.
//!
//! Not emulated (the emulator fails loudly on what it does not know, e.g.
//! `exec` probes, other volume types, several containers without
//! `shareProcessNamespace`): scheduling, node
//! affinity and anti-affinity, resource requests and limits (no cgroups),
//! seccomp profiles, NetworkPolicy, PodDisruptionBudgets, the StatefulSet
//! controller itself (ordering, rolling updates: pods are created and
//! deleted by the test), container restarts by the kubelet (a failing
//! liveness probe is reported, not acted on), graceful termination
//! (`terminationGracePeriodSeconds`, SIGTERM: pods are SIGKILLed), image
//! pulls and the image's own filesystem (the machine's root, read-only, is
//! the image), IPv6, and a Secret or ConfigMap changed while its pods run.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    net::Ipv4Addr,
    os::unix::fs::{PermissionsExt, chown, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail, ensure};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    netns::{Host, Net, nft},
    process::Proc,
};

/// The cluster domain the manifests assume.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Last octet of the first Service virtual IP.
const VIP_FIRST: u8 = 200;
/// `PATH` of the images (distroless).
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `HOME` of the images' user (distroless `nonroot`).
const IMAGE_HOME: &str = "/home/nonroot";
/// Where a pod sees its kubelet-managed files (`/etc/hosts` links here).
const KUBELET_DIR: &str = "/etc/.k8s-emulated";
/// How often the emulated kubelet probes.
const TICK: Duration = Duration::from_millis(500);

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("chaos-tests is in the workspace").to_path_buf()
}

/// A kubectl whose kustomize is v4+: `scripts/lib.sh`'s `ensure_kubectl`
/// (the one on PATH, else the venv's, else Debian's or PyPI's, installed).
pub fn kubectl() -> anyhow::Result<PathBuf> {
    let out = Command::new("bash")
        .args(["-c", r#"set -euo pipefail; source scripts/lib.sh; ensure_kubectl >&2; printf '%s\n' "$KUBECTL""#])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .context("bash -c 'source scripts/lib.sh; ensure_kubectl'")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || path.is_empty() {
        bail!(
            "no kubectl with kustomize v4+ (scripts/lib.sh ensure_kubectl): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(path))
}

// ---- the rendering ---------------------------------------------------------

/// Every object of a rendering.
#[derive(Debug, Clone)]
pub struct Rendering {
    /// The objects, in the rendering's order.
    pub objects: Vec<Value>,
}

impl Rendering {
    /// `kubectl kustomize DIR`.
    pub fn kustomize(kubectl: &Path, dir: &Path) -> anyhow::Result<Rendering> {
        let out = Command::new(kubectl)
            .arg("kustomize")
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("{} kustomize {}", kubectl.display(), dir.display()))?;
        if !out.status.success() {
            bail!("kubectl kustomize {} failed: {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Rendering::parse(&String::from_utf8(out.stdout).context("the rendering is not UTF-8")?)
    }

    /// Parses a multi-document YAML stream (empty documents are skipped).
    pub fn parse(yaml: &str) -> anyhow::Result<Rendering> {
        let mut objects = Vec::new();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
            let v = Value::deserialize(doc).with_context(|| format!("document {} of the rendering", i + 1))?;
            if !v.is_null() {
                objects.push(v);
            }
        }
        Ok(Rendering { objects })
    }

    /// Object `kind`/`name`, if rendered.
    pub fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    /// Object `kind`/`name`.
    pub fn get(&self, kind: &str, name: &str) -> anyhow::Result<&Value> {
        self.find(kind, name).with_context(|| format!("no {kind} {name} in the rendering"))
    }

    /// Every object of `kind`.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    /// The namespace of the rendering's StatefulSets (they must share one).
    pub fn namespace(&self) -> anyhow::Result<String> {
        let namespaces: BTreeSet<String> = self.of_kind("StatefulSet").map(namespace_of).collect();
        ensure!(namespaces.len() == 1, "the StatefulSets are in namespaces {namespaces:?}, not one");
        Ok(namespaces.into_iter().next().expect("one"))
    }

    /// The keys and values of a Secret (`data`, `stringData`) or ConfigMap
    /// (`data`, `binaryData`), decoded.
    pub fn data(&self, kind: &str, name: &str) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let o = self.get(kind, name)?;
        let (encoded, plain) = match kind {
            "Secret" => ("data", "stringData"),
            "ConfigMap" => ("binaryData", "data"),
            _ => bail!("{kind} holds no data"),
        };
        let mut out = BTreeMap::new();
        for (k, v) in o[encoded].as_object().into_iter().flatten() {
            let s = v.as_str().with_context(|| format!("{kind} {name}: {encoded}.{k} is not a string"))?;
            out.insert(k.clone(), base64_decode(s).with_context(|| format!("{kind} {name}: {encoded}.{k}"))?);
        }
        for (k, v) in o[plain].as_object().into_iter().flatten() {
            let s = v.as_str().with_context(|| format!("{kind} {name}: {plain}.{k} is not a string"))?;
            out.insert(k.clone(), s.as_bytes().to_vec());
        }
        Ok(out)
    }

    /// Sets key `key` of Secret `name` to `value` (in `data`, base64), as a
    /// private overlay's `secretGenerator` with `behavior: replace` would.
    pub fn set_secret_value(&mut self, name: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let o = self
            .objects
            .iter_mut()
            .find(|o| o["kind"] == "Secret" && o["metadata"]["name"] == name)
            .with_context(|| format!("no Secret {name} in the rendering"))?;
        if let Some(sd) = o.get_mut("stringData").and_then(Value::as_object_mut) {
            sd.remove(key);
        }
        let obj = o.as_object_mut().context("a Secret that is not an object")?;
        let data = obj.entry("data").or_insert_with(|| Value::Object(Default::default()));
        data.as_object_mut()
            .context("Secret data is not a map")?
            .insert(key.to_owned(), Value::String(base64_encode(value)));
        Ok(())
    }
}

fn namespace_of(o: &Value) -> String {
    o["metadata"]["namespace"].as_str().unwrap_or("default").to_owned()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Standard base64 (whitespace and padding ignored).
pub fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for ch in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if ch == b'=' {
            break;
        }
        let v = B64.iter().position(|&x| x == ch).with_context(|| format!("not base64: {:?}", ch as char))?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Expands `$(VAR)` references as the kubelet does in `command`, `args` and
/// `env` values: a defined variable is replaced, an undefined reference is
/// left as written, `$$` is a literal `$`, any other `$` stays.
pub fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let b = input.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let (mut checkpoint, mut cursor) = (0, 0);
    while cursor < b.len() {
        if b[cursor] == b'$' && cursor + 1 < b.len() {
            out.extend_from_slice(&b[checkpoint..cursor]);
            let rest = &b[cursor + 1..];
            let advance = match rest[0] {
                b'$' => {
                    out.push(b'$');
                    1
                }
                b'(' => match rest.iter().position(|&c| c == b')') {
                    Some(end) => {
                        let name = &input[cursor + 2..cursor + 1 + end];
                        match vars.get(name) {
                            Some(v) => out.extend_from_slice(v.as_bytes()),
                            None => out.extend_from_slice(format!("$({name})").as_bytes()),
                        }
                        end + 1
                    }
                    None => {
                        out.extend_from_slice(b"$(");
                        1
                    }
                },
                c => {
                    out.extend_from_slice(&[b'$', c]);
                    1
                }
            };
            cursor += advance;
            checkpoint = cursor + 1;
        }
        cursor += 1;
    }
    out.extend_from_slice(&b[checkpoint.min(b.len())..]);
    String::from_utf8(out).expect("bytes of a str, cut at ASCII")
}

// ---- a pod's plan ------------------------------------------------------------

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `startupProbe`.
    Startup,
    /// `readinessProbe`.
    Readiness,
    /// `livenessProbe`.
    Liveness,
}

impl ProbeKind {
    fn field(self) -> &'static str {
        match self {
            ProbeKind::Startup => "startupProbe",
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Liveness => "livenessProbe",
        }
    }
}

/// What a probe does.
#[derive(Debug, Clone)]
pub enum ProbeAction {
    /// `httpGet` (plain HTTP) against the pod IP.
    Http {
        /// Path.
        path: String,
        /// Port (a port name resolved).
        port: u16,
        /// `httpHeaders`.
        headers: Vec<(String, String)>,
    },
    /// `tcpSocket`: a connection opens.
    Tcp {
        /// Port.
        port: u16,
    },
}

/// A container probe, defaults filled in.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Which.
    pub kind: ProbeKind,
    /// What.
    pub action: ProbeAction,
    /// `initialDelaySeconds`.
    pub initial_delay: Duration,
    /// `periodSeconds`.
    pub period: Duration,
    /// `timeoutSeconds`.
    pub timeout: Duration,
    /// `successThreshold`.
    pub success_threshold: u32,
    /// `failureThreshold`.
    pub failure_threshold: u32,
}

impl Probe {
    fn parse(kind: ProbeKind, v: &Value, ports: &BTreeMap<String, u16>) -> anyhow::Result<Probe> {
        let secs = |f: &str, default: u64| Duration::from_secs(v[f].as_u64().unwrap_or(default));
        let count = |f: &str, default: u64| v[f].as_u64().unwrap_or(default) as u32;
        let action = if let Some(h) = v.get("httpGet") {
            let scheme = h["scheme"].as_str().unwrap_or("HTTP");
            ensure!(scheme == "HTTP", "{}: httpGet scheme {scheme} is not emulated", kind.field());
            ensure!(h.get("host").is_none(), "{}: httpGet.host is not emulated", kind.field());
            let headers = h["httpHeaders"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    (
                        x["name"].as_str().unwrap_or_default().to_owned(),
                        x["value"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            ProbeAction::Http {
                path: h["path"].as_str().unwrap_or("/").to_owned(),
                port: port_of(&h["port"], ports)?,
                headers,
            }
        } else if let Some(t) = v.get("tcpSocket") {
            ProbeAction::Tcp { port: port_of(&t["port"], ports)? }
        } else {
            bail!("{}: only httpGet and tcpSocket probes are emulated, not {v}", kind.field());
        };
        Ok(Probe {
            kind,
            action,
            initial_delay: secs("initialDelaySeconds", 0),
            period: secs("periodSeconds", 10),
            timeout: secs("timeoutSeconds", 1),
            success_threshold: count("successThreshold", 1),
            failure_threshold: count("failureThreshold", 3),
        })
    }

    /// How long the kubelet lets it fail before acting:
    /// `initialDelaySeconds + failureThreshold × periodSeconds`.
    pub fn budget(&self) -> Duration {
        self.initial_delay + self.period * self.failure_threshold
    }

    /// One line: kind, action, timing.
    pub fn describe(&self) -> String {
        let what = match &self.action {
            ProbeAction::Http { path, port, .. } => format!("GET :{port}{path}"),
            ProbeAction::Tcp { port } => format!("TCP :{port}"),
        };
        format!(
            "{} {what} every {}s, timeout {}s, {} failures ({:?} budget)",
            self.kind.field(),
            self.period.as_secs(),
            self.timeout.as_secs(),
            self.failure_threshold,
            self.budget()
        )
    }
}

/// An IntOrString port: a number, or a container port's name.
fn port_of(v: &Value, ports: &BTreeMap<String, u16>) -> anyhow::Result<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()).with_context(|| format!("bad port {n}")),
        Value::String(s) => match s.parse::<u16>() {
            Ok(n) => Ok(n),
            Err(_) => ports.get(s).copied().with_context(|| format!("no container port named {s}")),
        },
        other => bail!("bad port {other}"),
    }
}

/// Who the container's process runs as.
#[derive(Debug, Clone)]
pub struct Security {
    /// `runAsUser`.
    pub uid: u32,
    /// `runAsGroup`.
    pub gid: u32,
    /// `fsGroup` and `supplementalGroups`.
    pub groups: Vec<u32>,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
    /// `capabilities.drop: [ALL]`.
    pub drop_all_caps: bool,
    /// `readOnlyRootFilesystem: true`.
    pub read_only_root: bool,
    /// `fsGroup`, for volume ownership.
    pub fs_group: Option<u32>,
}

/// A mount of the container.
#[derive(Debug, Clone)]
pub struct Mount {
    /// `mountPath`.
    pub path: String,
    /// The directory (or file) on this machine.
    pub source: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// What it is, for messages (`secret confroll-tokens`).
    pub what: String,
}

/// Everything the kubelet would derive from a pod's spec, resolved.
#[derive(Debug, Clone)]
pub struct PodPlan {
    /// Pod name (`<sts>-<i>`).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// The pod's labels (the template's, plus the StatefulSet controller's).
    pub labels: BTreeMap<String, String>,
    /// `hostname` (a StatefulSet pod's: its name).
    pub hostname: String,
    /// `subdomain` (a StatefulSet's `serviceName`).
    pub subdomain: Option<String>,
    /// The pod IP.
    pub ip: Ipv4Addr,
    /// Container name.
    pub container: String,
    /// `command` + `args`, expanded.
    pub argv: Vec<String>,
    /// The container's `env`, resolved, in order.
    pub env: Vec<(String, String)>,
    /// Volume mounts.
    pub mounts: Vec<Mount>,
    /// Container ports by name.
    pub ports: BTreeMap<String, u16>,
    /// Probes.
    pub probes: Vec<Probe>,
    /// Security context.
    pub security: Security,
    /// What the spec asks for that is not emulated (reported, not failed).
    pub not_emulated: Vec<String>,
}

/// Which container of a pod a plan is for.
#[derive(Clone, Copy)]
enum Pick<'a> {
    /// The one container of a single-container pod.
    Only,
    /// A container by name.
    Container(&'a str),
    /// An init container by name.
    Init(&'a str),
}

/// Where pods' volumes live on this machine.
#[derive(Debug, Clone)]
pub struct Volumes {
    root: PathBuf,
}

impl Volumes {
    /// Volumes under `root`.
    pub fn new(root: PathBuf) -> Volumes {
        Volumes { root }
    }

    /// A claim's directory (made once, kept across pods).
    fn claim(&self, name: &str, fs_group: Option<u32>) -> anyhow::Result<PathBuf> {
        let d = self.root.join("claims").join(name);
        if !d.exists() {
            fs::create_dir_all(&d)?;
            own_writable(&d, fs_group)?;
        }
        Ok(d)
    }

    /// A pod incarnation's own directory.
    pub fn pod_dir(&self, pod: &str, incarnation: u32) -> PathBuf {
        self.root.join("pods").join(format!("{pod}.{incarnation}"))
    }
}

/// A writable volume's root as the kubelet leaves it with `fsGroup`:
/// group fsGroup, group-writable, setgid.
fn own_writable(d: &Path, fs_group: Option<u32>) -> anyhow::Result<()> {
    match fs_group {
        Some(g) => {
            chown(d, None, Some(g))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o2775))?;
        }
        None => fs::set_permissions(d, fs::Permissions::from_mode(0o755))?,
    }
    Ok(())
}

/// Writes `files` (path in the volume, content, mode) into `dir` the way
/// the kubelet's atomic writer does: a timestamped directory, `..data`
/// pointing at it, and each top-level entry a symlink through `..data`.
fn project(dir: &Path, files: &[(String, Vec<u8>, u32)], fs_group: Option<u32>) -> anyhow::Result<()> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    let ts = format!("..{nanos}");
    let data = dir.join(&ts);
    fs::create_dir_all(&data)?;
    let dir_mode = if fs_group.is_some() { 0o2755 } else { 0o755 };
    let mut tops = BTreeSet::new();
    for (path, bytes, mode) in files {
        ensure!(
            !path.is_empty() && !path.starts_with('/') && !path.split('/').any(|c| c == ".." || c.is_empty()),
            "bad projected path {path:?}"
        );
        let f = data.join(path);
        let parent = f.parent().expect("in the data dir");
        fs::create_dir_all(parent)?;
        fs::write(&f, bytes)?;
        let mode = if fs_group.is_some() { mode | 0o440 } else { *mode };
        fs::set_permissions(&f, fs::Permissions::from_mode(mode))?;
        let mut p = parent;
        while p != dir {
            fs::set_permissions(p, fs::Permissions::from_mode(dir_mode))?;
            if fs_group.is_some() {
                chown(p, None, fs_group)?;
            }
            p = p.parent().expect("under dir");
        }
        if fs_group.is_some() {
            chown(&f, None, fs_group)?;
        }
        tops.insert(path.split('/').next().expect("non-empty").to_owned());
    }
    symlink(&ts, dir.join("..data"))?;
    for t in tops {
        symlink(format!("..data/{t}"), dir.join(&t))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(dir_mode))?;
    if fs_group.is_some() {
        chown(dir, None, fs_group)?;
    }
    Ok(())
}

impl PodPlan {
    /// Pod `<sts>-<ordinal>` of StatefulSet `sts` at `ip`. With `volumes`,
    /// its volumes are materialised for incarnation `incarnation`; without,
    /// mounts are left out (enough to look at the command line).
    pub fn statefulset_pod(
        r: &Rendering,
        sts: &str,
        ordinal: usize,
        ip: Ipv4Addr,
        volumes: Option<(&Volumes, u32)>,
    ) -> anyhow::Result<PodPlan> {
        Self::plan(r, sts, ordinal, ip, volumes, Pick::Only)
    }

    /// Container `name` (an init container with `init`) of pod
    /// `<sts>-<ordinal>`, in a pod of several containers: see
    /// [`PodPlan::statefulset_pod`] and [`pod_argv`].
    pub fn statefulset_container(
        r: &Rendering,
        sts: &str,
        ordinal: usize,
        ip: Ipv4Addr,
        volumes: Option<(&Volumes, u32)>,
        name: &str,
        init: bool,
    ) -> anyhow::Result<PodPlan> {
        Self::plan(r, sts, ordinal, ip, volumes, if init { Pick::Init(name) } else { Pick::Container(name) })
    }

    fn plan(
        r: &Rendering,
        sts: &str,
        ordinal: usize,
        ip: Ipv4Addr,
        volumes: Option<(&Volumes, u32)>,
        pick: Pick<'_>,
    ) -> anyhow::Result<PodPlan> {
        let set = r.get("StatefulSet", sts)?;
        let namespace = namespace_of(set);
        let name = format!("{sts}-{ordinal}");
        let template = &set["spec"]["template"];
        let spec = &template["spec"];
        let mut labels: BTreeMap<String, String> = template["metadata"]["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        labels.insert("statefulset.kubernetes.io/pod-name".into(), name.clone());
        labels.insert("apps.kubernetes.io/pod-index".into(), ordinal.to_string());
        let annotations = &template["metadata"]["annotations"];

        let containers = spec["containers"].as_array().with_context(|| format!("{sts}: no containers"))?;
        let inits = spec["initContainers"].as_array().map(Vec::as_slice).unwrap_or_default();
        let named = |list: &'_ [Value], n: &str| list.iter().find(|c| c["name"] == n).cloned();
        let c = &match pick {
            Pick::Only => {
                ensure!(inits.is_empty(), "{sts}: init containers: use statefulset_container");
                ensure!(containers.len() == 1, "{sts}: {} containers: use statefulset_container", containers.len());
                containers[0].clone()
            }
            Pick::Container(n) => named(containers, n).with_context(|| format!("{sts}: no container {n}"))?,
            Pick::Init(n) => named(inits, n).with_context(|| format!("{sts}: no init container {n}"))?,
        };
        let container = c["name"].as_str().unwrap_or_default().to_owned();
        let mut not_emulated = Vec::new();
        for (f, what) in [
            ("affinity", "scheduling (affinity)"),
            ("nodeSelector", "scheduling (nodeSelector)"),
            ("tolerations", "scheduling (tolerations)"),
            ("terminationGracePeriodSeconds", "graceful termination (pods are SIGKILLed)"),
        ] {
            if spec.get(f).is_some() {
                not_emulated.push(format!("{sts}: {f}: {what}"));
            }
        }
        if c.get("resources").is_some() {
            not_emulated.push(format!("{sts}/{container}: resources (no cgroups)"));
        }
        if !c["securityContext"]["seccompProfile"].is_null() || !spec["securityContext"]["seccompProfile"].is_null() {
            not_emulated.push(format!("{sts}/{container}: seccompProfile"));
        }

        let mut ports = BTreeMap::new();
        for p in c["ports"].as_array().into_iter().flatten() {
            let n = p["containerPort"].as_u64().and_then(|n| u16::try_from(n).ok()).context("containerPort")?;
            ensure!(p["protocol"].as_str().unwrap_or("TCP") == "TCP", "{sts}: only TCP ports are emulated");
            if let Some(pn) = p["name"].as_str() {
                ports.insert(pn.to_owned(), n);
            }
        }

        // env, in order: a value sees the variables defined before it.
        let mut vars: HashMap<String, String> = HashMap::new();
        let mut env = Vec::new();
        ensure!(c.get("envFrom").is_none(), "{sts}: envFrom is not emulated");
        for e in c["env"].as_array().into_iter().flatten() {
            let key = e["name"].as_str().context("env without a name")?.to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                expand(v, &vars)
            } else if let Some(from) = e.get("valueFrom") {
                if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
                    field_ref(path, &name, &namespace, ip, &labels, annotations)?
                } else if let Some((kind, sel)) = [("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")]
                    .into_iter()
                    .find_map(|(k, f)| from.get(f).map(|s| (k, s)))
                {
                    let (obj, key_name) =
                        (sel["name"].as_str().unwrap_or_default(), sel["key"].as_str().unwrap_or_default());
                    let data = r.data(kind, obj)?;
                    let v = data.get(key_name).with_context(|| format!("{kind} {obj} has no key {key_name}"))?;
                    String::from_utf8(v.clone()).with_context(|| format!("{kind} {obj}/{key_name} is not UTF-8"))?
                } else {
                    bail!("{sts}: env {key}: valueFrom {from} is not emulated");
                }
            } else {
                String::new()
            };
            vars.insert(key.clone(), value.clone());
            env.push((key, value));
        }
        let command: Vec<String> = c["command"]
            .as_array()
            .with_context(|| format!("{sts}: no command (the image's ENTRYPOINT is not known here)"))?
            .iter()
            .map(|a| a.as_str().map(|s| expand(s, &vars)).context("a command word that is not a string"))
            .collect::<Result<_, _>>()?;
        let args: Vec<String> = c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().map(|s| expand(s, &vars)).context("an argument that is not a string"))
            .collect::<Result<_, _>>()?;
        let argv: Vec<String> = command.into_iter().chain(args).collect();

        let security = security_of(sts, &spec["securityContext"], &c["securityContext"])?;

        let mut probes = Vec::new();
        for kind in [ProbeKind::Startup, ProbeKind::Readiness, ProbeKind::Liveness] {
            if let Some(p) = c.get(kind.field()) {
                probes.push(Probe::parse(kind, p, &ports).with_context(|| format!("{sts}/{container}"))?);
            }
        }

        let mut mounts = Vec::new();
        if let Some((vols, incarnation)) = volumes {
            let pod_dir = vols.pod_dir(&name, incarnation);
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let vname = m["name"].as_str().context("volumeMount without a name")?;
                let path = m["mountPath"].as_str().context("volumeMount without a mountPath")?.to_owned();
                ensure!(m.get("subPath").is_none() && m.get("subPathExpr").is_none(), "{sts}: subPath is not emulated");
                let pv = PodVolumes { set, spec, pod: &name, pod_dir: &pod_dir, vols, fs_group: security.fs_group };
                let (source, what, always_ro) = volume_source(r, &pv, vname)?;
                mounts.push(Mount {
                    path,
                    source,
                    read_only: always_ro || m["readOnly"].as_bool().unwrap_or(false),
                    what,
                });
            }
        }

        Ok(PodPlan {
            name: name.clone(),
            namespace,
            labels,
            hostname: name,
            subdomain: set["spec"]["serviceName"].as_str().map(str::to_owned),
            ip,
            container,
            argv,
            env,
            mounts,
            ports,
            probes,
            security,
            not_emulated,
        })
    }

    /// The probe of `kind`, if declared.
    pub fn probe(&self, kind: ProbeKind) -> Option<&Probe> {
        self.probes.iter().find(|p| p.kind == kind)
    }

    /// The container process's whole environment: the image's `PATH` and
    /// `HOME`, the kubelet's `HOSTNAME`, then `env` (which overrides them).
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), IMAGE_PATH.into()),
            ("HOME".into(), IMAGE_HOME.into()),
            ("HOSTNAME".into(), self.hostname.clone()),
        ];
        for (k, v) in &self.env {
            env.retain(|(e, _)| e != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }

    /// The argv (after `ip netns exec NS`) that runs the container as the
    /// kubelet would: new UTS, mount and PID namespaces, the pod's files
    /// mounted, then `command` + `args` as the container's user with only
    /// the container's environment. `work` holds the overlays' layers,
    /// `kubelet_dir` the pod's hosts file; `binaries` maps a path in the
    /// image to the file on this machine to mount there.
    pub fn launch_argv(
        &self,
        work: &Path,
        kubelet_dir: &Path,
        binaries: &HashMap<String, PathBuf>,
    ) -> anyhow::Result<Vec<String>> {
        let mut argv = pod_namespaces();
        argv.extend(self.container_argv(work, kubelet_dir, binaries)?);
        Ok(argv)
    }

    /// What runs the container inside its pod's namespaces (after
    /// `unshare … --`): a script that mounts the pod's files (its mount
    /// namespace must be its own), then `command` + `args` as the
    /// container's user with only the container's environment.
    fn container_argv(
        &self,
        work: &Path,
        kubelet_dir: &Path,
        binaries: &HashMap<String, PathBuf>,
    ) -> anyhow::Result<Vec<String>> {
        // (target, source, read-only, is a file)
        let mut binds: Vec<(String, PathBuf, bool, bool)> = Vec::new();
        let program = self.argv.first().context("an empty command")?;
        match binaries.get(program) {
            Some(b) => binds.push((program.clone(), b.clone(), true, true)),
            // The machine's root is the image: its PATH finds the program.
            None => ensure!(
                if program.starts_with('/') {
                    Path::new(program).is_file()
                } else {
                    IMAGE_PATH.split(':').any(|d| Path::new(d).join(program).is_file())
                },
                "{}: no binary for {program} (not on this machine either)",
                self.name
            ),
        }
        binds.push((KUBELET_DIR.into(), kubelet_dir.to_path_buf(), true, false));
        for m in &self.mounts {
            binds.push((m.path.clone(), m.source.clone(), m.read_only, m.source.is_file()));
        }
        // A mount over a directory that holds another mount's source (an
        // emptyDir at /tmp, with the run's volumes under /tmp) comes last,
        // once every source has been bound.
        let sources: Vec<PathBuf> = binds.iter().map(|b| b.1.clone()).collect();
        binds.sort_by_key(|(target, ..)| sources.iter().any(|src| src.starts_with(target)));
        // A writable layer over each directory where a mount point is missing.
        let mut overlays: BTreeSet<String> = BTreeSet::from(["/etc".to_owned()]);
        for (target, ..) in &binds {
            ensure!(target.starts_with('/'), "{}: mount path {target} is not absolute", self.name);
            if Path::new(target).exists() {
                continue;
            }
            let mut a = Path::new(target);
            while !a.exists() {
                a = a.parent().expect("/ exists");
            }
            ensure!(a != Path::new("/"), "{}: {target}: a new directory under / is not emulated", self.name);
            overlays.insert(a.display().to_string());
        }
        let mut script = String::from("set -eu\n");
        script += &format!("hostname {}\ncd /\n", q(&self.hostname));
        for (i, dir) in overlays.iter().enumerate() {
            let (upper, wk) = (work.join(format!("overlay{i}/upper")), work.join(format!("overlay{i}/work")));
            fs::create_dir_all(&upper)?;
            fs::create_dir_all(&wk)?;
            for p in [dir.as_str(), &upper.display().to_string(), &wk.display().to_string()] {
                ensure!(!p.contains([',', ':', '\'']), "{}: path {p} cannot be an overlay option", self.name);
            }
            script += &format!(
                "mount -t overlay overlay -o lowerdir={dir},upperdir={},workdir={} {dir}\n",
                upper.display(),
                wk.display()
            );
        }
        for (target, source, ro, file) in &binds {
            if !Path::new(target).exists() {
                if *file {
                    let parent = Path::new(target).parent().expect("absolute").display().to_string();
                    script += &format!("mkdir -p {}\ntouch {}\n", q(&parent), q(target));
                } else {
                    script += &format!("mkdir -p {}\n", q(target));
                }
            }
            script += &format!("mount --bind {} {}\n", q(&source.display().to_string()), q(target));
            if *ro {
                script += &format!("mount -o remount,bind,ro {}\n", q(target));
            }
        }
        script += &format!("ln -sfn {KUBELET_DIR}/hosts /etc/hosts\nln -sfn {KUBELET_DIR}/hostname /etc/hostname\n");
        if self.security.read_only_root {
            // remount,bind: this mount's flag in this namespace only, never
            // the file system's.
            script += "mount -o remount,bind,ro /\n";
            for dir in &overlays {
                script += &format!("mount -o remount,bind,ro {dir}\n");
            }
        }
        let s = &self.security;
        let groups = if s.groups.is_empty() {
            "--clear-groups".to_owned()
        } else {
            format!("--groups={}", s.groups.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
        };
        script += &format!("exec setpriv --reuid={} --regid={} {groups}", s.uid, s.gid);
        if s.no_new_privs {
            script += " --no-new-privs";
        }
        if s.drop_all_caps {
            script += " --bounding-set=-all --inh-caps=-all";
        }
        script += " -- env -i \"$@\"\n";

        let mut argv: Vec<String> = vec!["sh".into(), "-c".into(), script, self.name.clone()];
        for (k, v) in self.environment() {
            ensure!(!k.is_empty() && !k.contains('='), "{}: env name {k:?}", self.name);
            argv.push(format!("{k}={v}"));
        }
        ensure!(!program.contains('='), "{}: a command with `=` cannot follow env -i", self.name);
        argv.extend(self.argv.iter().cloned());
        Ok(argv)
    }
}

/// The argv (after `ip netns exec NS`) that runs a pod of several
/// containers with `shareProcessNamespace: true`, as the kubelet would: one
/// PID namespace (and UTS namespace) for the pod, whose first process runs
/// the init containers one after the other (any failure ends the pod),
/// then every container at once; each container in its own mount namespace
/// made by its [`PodPlan::launch_argv`] script (its mounts, its read-only
/// root, its user), seeing the pod's processes in `/proc`. `plans`: each
/// container's plan and whether it is an init container, in order; `work`
/// holds each container's overlay layers under its name.
pub fn pod_argv(
    plans: &[(PodPlan, bool)],
    work: &Path,
    kubelet_dir: &Path,
    binaries: &HashMap<String, PathBuf>,
) -> anyhow::Result<Vec<String>> {
    let first = &plans.first().context("a pod without containers")?.0;
    let mut script = String::from("set -u\n");
    let mut runs = Vec::new();
    for (plan, init) in plans {
        // The pod's namespaces, and a mount namespace of its own.
        let line: Vec<String> = ["unshare", "--mount", "--propagation", "private", "--"]
            .into_iter()
            .map(str::to_owned)
            .chain(plan.container_argv(&work.join(&plan.container), kubelet_dir, binaries)?)
            .map(|a| q(&a))
            .collect();
        let line = line.join(" ");
        if *init {
            script += &format!("{line} || exit $?\n");
        } else {
            // Its stdout and stderr are a pipe, as the container runtime's
            // (a program may open /dev/stderr, which it could not reopen
            // on the harness's root-owned log file).
            runs.push(format!("{line} 2>&1 | cat &\n"));
        }
    }
    for r in runs {
        script += &r;
    }
    script += "wait\n";
    let mut argv = pod_namespaces();
    argv.extend(["sh".into(), "-c".into(), script, first.name.clone()]);
    Ok(argv)
}

/// `unshare … --`: a pod's UTS, mount and PID namespaces (its first
/// process is PID 1; killing it kills the pod's whole tree), `/proc` of
/// that PID namespace.
fn pod_namespaces() -> Vec<String> {
    ["unshare", "--uts", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc", "--"]
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Single-quotes `s` for sh.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn field_ref(
    path: &str,
    pod: &str,
    namespace: &str,
    ip: Ipv4Addr,
    labels: &BTreeMap<String, String>,
    annotations: &Value,
) -> anyhow::Result<String> {
    let key = |prefix: &str| path.strip_prefix(prefix).and_then(|r| r.strip_suffix("']")).map(str::to_owned);
    Ok(match path {
        "metadata.name" => pod.to_owned(),
        "metadata.namespace" => namespace.to_owned(),
        "status.podIP" | "status.podIPs" => ip.to_string(),
        _ => {
            if let Some(k) = key("metadata.labels['") {
                labels.get(&k).cloned().unwrap_or_default()
            } else if let Some(k) = key("metadata.annotations['") {
                annotations[k.as_str()].as_str().unwrap_or_default().to_owned()
            } else {
                bail!("fieldRef {path} is not emulated")
            }
        }
    })
}

fn security_of(sts: &str, pod: &Value, c: &Value) -> anyhow::Result<Security> {
    let pick = |f: &str| c.get(f).filter(|v| !v.is_null()).or_else(|| pod.get(f).filter(|v| !v.is_null()));
    let id = |f: &str| -> anyhow::Result<u32> {
        pick(f)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("{sts}: no {f} (the image's USER is not known here)"))
    };
    let uid = id("runAsUser")?;
    let gid = id("runAsGroup")?;
    if pick("runAsNonRoot").and_then(Value::as_bool) == Some(true) {
        ensure!(uid != 0, "{sts}: runAsNonRoot with runAsUser 0: the kubelet refuses to start it");
    }
    ensure!(c["privileged"].as_bool() != Some(true), "{sts}: privileged containers are not emulated");
    ensure!(c["capabilities"]["add"].as_array().is_none_or(Vec::is_empty), "{sts}: capabilities.add is not emulated");
    let fs_group = pod["fsGroup"].as_u64().and_then(|n| u32::try_from(n).ok());
    let mut groups: Vec<u32> = fs_group.into_iter().collect();
    for g in pod["supplementalGroups"].as_array().into_iter().flatten() {
        groups.push(g.as_u64().and_then(|n| u32::try_from(n).ok()).context("supplementalGroups")?);
    }
    let drops: Vec<&str> =
        c["capabilities"]["drop"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    Ok(Security {
        uid,
        gid,
        groups,
        no_new_privs: c["allowPrivilegeEscalation"].as_bool() == Some(false),
        drop_all_caps: drops.contains(&"ALL"),
        read_only_root: c["readOnlyRootFilesystem"].as_bool() == Some(true),
        fs_group,
    })
}

/// The pod a volume is mounted in: what [`volume_source`] needs of it.
struct PodVolumes<'a> {
    /// The StatefulSet (its `volumeClaimTemplates`).
    set: &'a Value,
    /// The pod spec (its `volumes`).
    spec: &'a Value,
    /// The pod's name.
    pod: &'a str,
    /// The pod's directory on this machine.
    pod_dir: &'a Path,
    /// Where claims live.
    vols: &'a Volumes,
    /// The pod's `fsGroup`.
    fs_group: Option<u32>,
}

/// A volume's directory on this machine, what it is, and whether it is
/// always read-only (Secret and ConfigMap volumes are).
fn volume_source(r: &Rendering, p: &PodVolumes<'_>, vname: &str) -> anyhow::Result<(PathBuf, String, bool)> {
    let PodVolumes { set, spec, pod, pod_dir, vols, fs_group } = *p;
    let vol = spec["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == vname);
    let Some(vol) = vol else {
        let template = set["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["metadata"]["name"] == vname)
            .with_context(|| format!("{pod}: no volume or volumeClaimTemplate {vname}"))?;
        let claim = format!("{}-{pod}", template["metadata"]["name"].as_str().unwrap_or(vname));
        return Ok((vols.claim(&claim, fs_group)?, format!("claim {claim}"), false));
    };
    let dir = pod_dir.join("volumes").join(vname);
    let (kind, src) = if let Some(s) = vol.get("secret") {
        ("Secret", s)
    } else if let Some(s) = vol.get("configMap") {
        ("ConfigMap", s)
    } else if vol.get("emptyDir").is_some() {
        fs::create_dir_all(&dir)?;
        own_writable(&dir, fs_group)?;
        return Ok((dir, "emptyDir".into(), false));
    } else if let Some(c) = vol.get("persistentVolumeClaim") {
        let claim = c["claimName"].as_str().context("claimName")?;
        return Ok((vols.claim(claim, fs_group)?, format!("claim {claim}"), c["readOnly"].as_bool() == Some(true)));
    } else {
        bail!("{pod}: volume {vname} ({vol}) is not emulated");
    };
    let obj = src[if kind == "Secret" { "secretName" } else { "name" }].as_str().context("the volume's object name")?;
    let optional = src["optional"].as_bool() == Some(true);
    let data = match r.data(kind, obj) {
        Ok(d) => d,
        Err(_) if optional => BTreeMap::new(),
        Err(e) => return Err(e.context(format!("{pod}: volume {vname}"))),
    };
    let default_mode = src["defaultMode"].as_u64().unwrap_or(0o644) as u32;
    let files: Vec<(String, Vec<u8>, u32)> = match src["items"].as_array() {
        Some(items) => items
            .iter()
            .filter_map(|i| {
                let key = i["key"].as_str().unwrap_or_default();
                let mode = i["mode"].as_u64().map(|m| m as u32).unwrap_or(default_mode);
                match data.get(key) {
                    Some(v) => Some(Ok((i["path"].as_str().unwrap_or(key).to_owned(), v.clone(), mode))),
                    None if optional => None,
                    None => Some(Err(anyhow::anyhow!("{pod}: volume {vname}: {kind} {obj} has no key {key}"))),
                }
            })
            .collect::<Result<_, _>>()?,
        None => data.iter().map(|(k, v)| (k.clone(), v.clone(), default_mode)).collect(),
    };
    fs::create_dir_all(&dir)?;
    // Another container of the pod mounts it too: projected once.
    if !dir.join("..data").exists() {
        project(&dir, &files, fs_group)?;
    }
    Ok((dir, format!("{} {obj}", kind.to_lowercase()), true))
}

// ---- Services, DNS, kube-proxy ---------------------------------------------

#[derive(Debug, Clone)]
struct ServicePort {
    name: String,
    port: u16,
    target: Value,
}

/// A rendered Service.
#[derive(Debug, Clone)]
struct Service {
    name: String,
    /// Its virtual IP; `None`: headless.
    vip: Option<Ipv4Addr>,
    selector: BTreeMap<String, String>,
    ports: Vec<ServicePort>,
    publish_not_ready: bool,
}

impl Service {
    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.selector.is_empty() && self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// What the emulated kubelet has seen of a pod.
#[derive(Debug, Clone, Default)]
pub struct PodStatus {
    /// When the startup probe first passed, from the pod's start.
    pub started: Option<Duration>,
    /// When the readiness probe first passed, from the pod's start.
    pub ready_at: Option<Duration>,
    /// When the liveness probe first passed, from the pod's start.
    pub live_at: Option<Duration>,
    /// Ready now (behind its Services).
    pub ready: bool,
    /// Probes made.
    pub probes: u64,
    /// Failed probes.
    pub failures: u64,
    /// The last probe failure.
    pub last_error: String,
    /// Restarts the kubelet would have made, and other faults.
    pub violations: Vec<String>,
}

struct PodEntry {
    plan: PodPlan,
    host: Host,
    proc: Proc,
    kubelet_dir: PathBuf,
    born: Instant,
    status: Arc<Mutex<PodStatus>>,
    monitor: Option<tokio::task::JoinHandle<()>>,
    hosts: String,
}

#[derive(Default)]
struct State {
    pods: BTreeMap<String, PodEntry>,
    /// The kube-proxy rules last applied, per network namespace.
    applied: HashMap<String, String>,
}

/// What the emulated kubelets share (no [`Net`]: they run on its hub).
struct Shared {
    namespace: String,
    hub_ns: String,
    services: Vec<Service>,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn names(&self, first: &str) -> String {
        let ns = &self.namespace;
        format!("{first}.{ns}.svc.{CLUSTER_DOMAIN} {first}.{ns}.svc {first}.{ns} {first}")
    }

    /// Whether pod `p` is an endpoint of `svc` now.
    fn endpoint(svc: &Service, p: &PodEntry, ready: bool) -> bool {
        svc.selects(&p.plan.labels) && (ready || svc.publish_not_ready)
    }

    /// The cluster DNS as hosts-file lines.
    fn dns(&self, st: &State, ready: &BTreeMap<String, bool>) -> String {
        let mut out = String::from("# cluster DNS (emulated: chaos-tests/src/k8s.rs)\n");
        for svc in &self.services {
            let eps: Vec<&PodEntry> =
                st.pods.values().filter(|p| Shared::endpoint(svc, p, ready[&p.plan.name])).collect();
            if svc.vip.is_none() {
                for p in &eps {
                    if p.plan.subdomain.as_deref() == Some(&svc.name) {
                        out += &format!("{} {}\n", p.plan.ip, self.names(&format!("{}.{}", p.plan.hostname, svc.name)));
                    }
                }
            }
            match svc.vip {
                Some(vip) => out += &format!("{vip} {}\n", self.names(&svc.name)),
                None => {
                    for p in &eps {
                        out += &format!("{} {}\n", p.plan.ip, self.names(&svc.name));
                    }
                }
            }
        }
        out
    }

    /// The kubelet's own lines of a pod's hosts file.
    fn own(&self, p: &PodPlan) -> String {
        let mut s = String::from(
            "# Kubernetes-managed hosts file (emulated).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        );
        match &p.subdomain {
            Some(sub) => {
                s +=
                    &format!("{}\t{}.{sub}.{}.svc.{CLUSTER_DOMAIN}\t{}\n", p.ip, p.hostname, self.namespace, p.hostname)
            }
            None => s += &format!("{}\t{}\n", p.ip, p.hostname),
        }
        s
    }

    /// kube-proxy's rules for every ClusterIP Service.
    fn rules(&self, st: &State, ready: &BTreeMap<String, bool>) -> String {
        let mut r = String::from(
            "add table ip kube_proxy\n\
             add chain ip kube_proxy out { type nat hook output priority -110; policy accept; }\n\
             flush chain ip kube_proxy out\n",
        );
        for svc in &self.services {
            let Some(vip) = svc.vip else { continue };
            for sp in &svc.ports {
                let eps: Vec<(Ipv4Addr, u16)> = st
                    .pods
                    .values()
                    .filter(|p| Shared::endpoint(svc, p, ready[&p.plan.name]))
                    .filter_map(|p| {
                        let port =
                            if sp.target.is_null() { Some(sp.port) } else { port_of(&sp.target, &p.plan.ports).ok() };
                        port.map(|port| (p.plan.ip, port))
                    })
                    .collect();
                if eps.is_empty() {
                    continue;
                }
                let map: Vec<String> =
                    eps.iter().enumerate().map(|(i, (ip, port))| format!("{i} : {ip} . {port}")).collect();
                r += &format!(
                    "add rule ip kube_proxy out ip daddr {vip} tcp dport {} dnat ip to numgen random mod {} map {{ {} }} comment \"{}/{}\"\n",
                    sp.port,
                    eps.len(),
                    map.join(", "),
                    svc.name,
                    sp.name
                );
            }
            r += &format!("add rule ip kube_proxy out ip daddr {vip} reject comment \"{}: no endpoint\"\n", svc.name);
        }
        r
    }

    /// Brings every pod's hosts file and every namespace's kube-proxy rules
    /// up to date with the pods and their readiness.
    fn sync(&self) -> anyhow::Result<()> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let ready: BTreeMap<String, bool> = st.pods.iter().map(|(n, p)| (n.clone(), lock(&p.status).ready)).collect();
        let dns = self.dns(st, &ready);
        let rules = self.rules(st, &ready);
        for p in st.pods.values_mut() {
            let text = format!("{}{dns}", self.own(&p.plan));
            if p.hosts != text {
                write_atomic(&p.kubelet_dir.join("hosts"), &text)?;
                p.hosts = text;
            }
        }
        let namespaces: Vec<String> =
            st.pods.values().map(|p| p.host.ns.clone()).chain([self.hub_ns.clone()]).collect();
        st.applied.retain(|ns, _| namespaces.contains(ns));
        for ns in namespaces {
            if st.applied.get(&ns) != Some(&rules) {
                nft(&ns, &rules)?;
                st.applied.insert(ns, rules.clone());
            }
        }
        Ok(())
    }
}

/// Replaces `path` by a rename: a reader sees the old file or the new one.
fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("new");
    fs::write(&tmp, text)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(&tmp, path)?;
    Ok(())
}

// ---- the emulated kubelet's prober --------------------------------------------

/// One probe, from the hub.
async fn probe_once(client: &reqwest::Client, ip: Ipv4Addr, p: &Probe) -> anyhow::Result<()> {
    match &p.action {
        ProbeAction::Http { path, port, headers } => {
            let mut req = client.get(format!("http://{ip}:{port}{path}")).timeout(p.timeout);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            match req.send().await {
                Ok(r) if (200..400).contains(&r.status().as_u16()) => Ok(()),
                Ok(r) => bail!("HTTP {}", r.status()),
                Err(e) => Err(e.into()),
            }
        }
        ProbeAction::Tcp { port } => {
            match tokio::time::timeout(p.timeout, tokio::net::TcpStream::connect((ip, *port))).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => bail!("timed out"),
            }
        }
    }
}

/// Consecutive failures of a probe.
#[derive(Default)]
struct Streak {
    since: Option<Instant>,
    count: u32,
    reported: bool,
}

impl Streak {
    /// Counts a failure; whether the kubelet would act on the streak now.
    fn fail(&mut self, now: Instant, p: &Probe) -> bool {
        let since = *self.since.get_or_insert(now);
        self.count += 1;
        self.count >= p.failure_threshold && now - since >= p.period * p.failure_threshold.saturating_sub(1)
    }
}

/// The kubelet's probing of one pod, until aborted.
async fn kubelet(
    shared: Arc<Shared>,
    pod: String,
    ip: Ipv4Addr,
    probes: Vec<Probe>,
    status: Arc<Mutex<PodStatus>>,
    born: Instant,
) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("kube-probe/emulated")
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            lock(&status).violations.push(format!("{pod}: no probe client: {e}"));
            return;
        }
    };
    let find = |k: ProbeKind| probes.iter().find(|p| p.kind == k).cloned();
    let (startup, readiness, liveness) =
        (find(ProbeKind::Startup), find(ProbeKind::Readiness), find(ProbeKind::Liveness));
    let mut started: Option<Instant> = None;
    let (mut ready, mut ready_ok) = (false, 0u32);
    let (mut startup_fail, mut ready_fail, mut live_fail) = (Streak::default(), Streak::default(), Streak::default());
    loop {
        let now = Instant::now();
        let mut changed = false;
        match (started, &startup) {
            (None, None) => {
                started = Some(now);
                lock(&status).started = Some(born.elapsed());
                continue;
            }
            (None, Some(p)) => {
                if now - born >= p.initial_delay {
                    let r = probe_once(&client, ip, p).await;
                    let mut s = lock(&status);
                    s.probes += 1;
                    match r {
                        Ok(()) => {
                            started = Some(Instant::now());
                            s.started = Some(born.elapsed());
                        }
                        Err(e) => {
                            s.failures += 1;
                            startup_fail.fail(now, p);
                            if !startup_fail.reported && born.elapsed() > p.budget() {
                                startup_fail.reported = true;
                                s.violations.push(format!(
                                    "{pod}: startupProbe still failing after {:?} ({e}): the kubelet would restart it",
                                    p.budget()
                                ));
                            }
                            s.last_error = format!("startup: {e}");
                        }
                    }
                }
            }
            (Some(t0), _) => {
                let since = now - t0;
                let due = |p: &Option<Probe>| p.as_ref().filter(|p| since >= p.initial_delay).cloned();
                let (rp, lp) = (due(&readiness), due(&liveness));
                let (r, l) = tokio::join!(
                    async {
                        match &rp {
                            Some(p) => Some(probe_once(&client, ip, p).await),
                            None => None,
                        }
                    },
                    async {
                        match &lp {
                            Some(p) => Some(probe_once(&client, ip, p).await),
                            None => None,
                        }
                    }
                );
                let now = Instant::now();
                let mut s = lock(&status);
                match (&readiness, &rp, r) {
                    // No readiness probe: ready once started.
                    (None, _, _) if !ready => {
                        ready = true;
                        changed = true;
                        s.ready_at = Some(born.elapsed());
                    }
                    (Some(_), Some(p), Some(res)) => {
                        s.probes += 1;
                        match res {
                            Ok(()) => {
                                ready_fail = Streak::default();
                                ready_ok += 1;
                                if !ready && ready_ok >= p.success_threshold {
                                    ready = true;
                                    changed = true;
                                    s.ready_at.get_or_insert(born.elapsed());
                                }
                            }
                            Err(e) => {
                                s.failures += 1;
                                s.last_error = format!("readiness: {e}");
                                ready_ok = 0;
                                if ready_fail.fail(now, p) && ready {
                                    ready = false;
                                    changed = true;
                                }
                            }
                        }
                    }
                    _ => {}
                }
                match (&liveness, &lp, l) {
                    (None, _, _) => {
                        s.live_at.get_or_insert(born.elapsed());
                    }
                    (Some(_), Some(p), Some(res)) => {
                        s.probes += 1;
                        match res {
                            Ok(()) => {
                                live_fail = Streak::default();
                                s.live_at.get_or_insert(born.elapsed());
                            }
                            Err(e) => {
                                s.failures += 1;
                                s.last_error = format!("liveness: {e}");
                                if live_fail.fail(now, p) && !live_fail.reported {
                                    live_fail.reported = true;
                                    s.violations.push(format!(
                                        "{pod}: livenessProbe failed {} times over {:?} ({e}): the kubelet would restart it",
                                        live_fail.count,
                                        now - live_fail.since.unwrap_or(now)
                                    ));
                                }
                            }
                        }
                    }
                    _ => {}
                }
                s.ready = ready;
            }
        }
        if changed {
            let sh = shared.clone();
            let synced = tokio::task::spawn_blocking(move || sh.sync()).await;
            if let Err(e) = synced.map_err(anyhow::Error::from).and_then(|r| r) {
                lock(&status).violations.push(format!("{pod}: endpoint sync failed: {e:#}"));
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

// ---- the emulated cluster ---------------------------------------------------------

/// A rendering's pods running on a [`Net`]. Dropping it kills its pods (the
/// net's own drop removes the namespaces).
pub struct Kube {
    net: Arc<Net>,
    rendering: Rendering,
    shared: Arc<Shared>,
    binaries: HashMap<String, PathBuf>,
    volumes: Volumes,
    incarnations: Mutex<HashMap<String, u32>>,
    dir: PathBuf,
    hub_calls: std::sync::atomic::AtomicU32,
}

impl Kube {
    /// The rendering's Services on `net` (a virtual IP for each ClusterIP
    /// one, rules on the hub), no pod yet. `binaries` maps a path in the
    /// images to a file on this machine; each is hard-linked (or copied)
    /// aside first, so that a rebuild during the run changes nothing.
    pub fn new(net: Arc<Net>, rendering: Rendering, binaries: HashMap<String, PathBuf>) -> anyhow::Result<Kube> {
        let namespace = rendering.namespace()?;
        let dir = net.dir().join("k8s");
        fs::create_dir_all(dir.join("bin"))?;
        let mut aside = HashMap::new();
        for (i, (image_path, file)) in binaries.into_iter().enumerate() {
            let name = Path::new(&image_path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let to = dir.join("bin").join(format!("{i}-{name}"));
            if fs::hard_link(&file, &to).is_err() {
                fs::copy(&file, &to).with_context(|| format!("copy {}", file.display()))?;
            }
            aside.insert(image_path, to);
        }
        let [a, b, c] = crate::netns::SUBNET;
        let mut services = Vec::new();
        let mut next_vip = VIP_FIRST;
        for s in rendering.of_kind("Service").filter(|s| namespace_of(s) == namespace) {
            let spec = &s["spec"];
            let kind = spec["type"].as_str().unwrap_or("ClusterIP");
            ensure!(kind != "ExternalName", "Service {}: ExternalName is not emulated", s["metadata"]["name"]);
            let headless = spec["clusterIP"] == "None";
            let vip = (!headless).then(|| {
                next_vip += 1;
                Ipv4Addr::new(a, b, c, next_vip - 1)
            });
            let mut ports = Vec::new();
            for p in spec["ports"].as_array().into_iter().flatten() {
                ensure!(
                    p["protocol"].as_str().unwrap_or("TCP") == "TCP",
                    "Service {}: only TCP",
                    s["metadata"]["name"]
                );
                ports.push(ServicePort {
                    name: p["name"].as_str().unwrap_or_default().to_owned(),
                    port: p["port"].as_u64().and_then(|n| u16::try_from(n).ok()).context("Service port")?,
                    target: p.get("targetPort").cloned().unwrap_or(Value::Null),
                });
            }
            services.push(Service {
                name: s["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
                vip,
                selector: spec["selector"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect(),
                ports,
                publish_not_ready: spec["publishNotReadyAddresses"].as_bool() == Some(true),
            });
        }
        let shared = Arc::new(Shared {
            namespace,
            hub_ns: net.hub_ns().to_owned(),
            services,
            state: Mutex::new(State::default()),
        });
        shared.sync()?;
        Ok(Kube {
            volumes: Volumes::new(dir.join("volumes")),
            net,
            rendering,
            shared,
            binaries: aside,
            incarnations: Mutex::default(),
            dir,
            hub_calls: Default::default(),
        })
    }

    /// The namespace the rendering deploys to.
    pub fn namespace(&self) -> &str {
        &self.shared.namespace
    }

    /// The rendering.
    pub fn rendering(&self) -> &Rendering {
        &self.rendering
    }

    /// `http://<svc>.<ns>.svc.cluster.local:<port>` for Service port `port`.
    pub fn service_url(&self, svc: &str, port: &str) -> anyhow::Result<String> {
        let s = self.shared.services.iter().find(|s| s.name == svc).with_context(|| format!("no Service {svc}"))?;
        let p = s.ports.iter().find(|p| p.name == port).with_context(|| format!("Service {svc} has no port {port}"))?;
        Ok(format!("http://{svc}.{}.svc.{CLUSTER_DOMAIN}:{}", self.shared.namespace, p.port))
    }

    /// The virtual IP of Service `svc`, if it has one.
    pub fn service_ip(&self, svc: &str) -> Option<Ipv4Addr> {
        self.shared.services.iter().find(|s| s.name == svc).and_then(|s| s.vip)
    }

    /// Creates pod `<sts>-<ordinal>` on a new host `host` at `.last` of the
    /// subnet and starts it: its volumes (claims kept from an earlier pod of
    /// the same name), its hosts file, kube-proxy rules, its process, its
    /// prober. Returns the pod's name.
    pub fn create_pod(&self, sts: &str, ordinal: usize, host: &str, last: u8) -> anyhow::Result<String> {
        let pod = format!("{sts}-{ordinal}");
        ensure!(!lock(&self.shared.state).pods.contains_key(&pod), "pod {pod} exists");
        let incarnation = {
            let mut inc = lock(&self.incarnations);
            let n = inc.entry(pod.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let h = self.net.add_host(host, last)?;
        let spec = &self.rendering.get("StatefulSet", sts)?["spec"]["template"]["spec"];
        let names = |f: &str| -> Vec<String> {
            spec[f].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect()
        };
        let (inits, containers) = (names("initContainers"), names("containers"));
        let work = self.volumes.pod_dir(&pod, incarnation);
        let kubelet_dir = work.join("kubelet");
        fs::create_dir_all(&kubelet_dir)?;
        fs::write(kubelet_dir.join("hosts"), "")?;
        let vols = Some((&self.volumes, incarnation));
        let (plan, argv) = if inits.is_empty() && containers.len() == 1 {
            let plan = PodPlan::statefulset_pod(&self.rendering, sts, ordinal, h.ip, vols)?;
            let argv = plan.launch_argv(&work, &kubelet_dir, &self.binaries)?;
            (plan, argv)
        } else {
            ensure!(
                spec["shareProcessNamespace"].as_bool() == Some(true),
                "{sts}: several containers without shareProcessNamespace are not emulated"
            );
            let mut plans = Vec::new();
            for (n, init) in inits.iter().map(|n| (n, true)).chain(containers.iter().map(|n| (n, false))) {
                let p = PodPlan::statefulset_container(&self.rendering, sts, ordinal, h.ip, vols, n, init)?;
                plans.push((p, init));
            }
            let argv = pod_argv(&plans, &work, &kubelet_dir, &self.binaries)?;
            // The pod as the prober and the Services see it: the first
            // container's plan and probes, every container's ports.
            let mut main = plans.iter().find(|(_, init)| !init).map(|(p, _)| p.clone()).context("no container")?;
            for (p, init) in &plans {
                if !init && p.container != main.container {
                    main.ports.extend(p.ports.clone());
                    if !p.probes.is_empty() {
                        main.not_emulated.push(format!("{sts}/{}: probes (the first container's only)", p.container));
                    }
                }
            }
            (main, argv)
        };
        fs::write(kubelet_dir.join("hostname"), format!("{}\n", plan.hostname))?;
        let log = self.dir.join(format!("{pod}.log"));
        let mut f = fs::OpenOptions::new().create(true).append(true).open(&log)?;
        std::io::Write::write_all(
            &mut f,
            format!("=== pod {pod} (incarnation {incarnation}) at {} ===\n", h.ip).as_bytes(),
        )?;
        let status = Arc::new(Mutex::new(PodStatus::default()));
        let probes = plan.probes.clone();
        let ip = h.ip;
        lock(&self.shared.state).pods.insert(
            pod.clone(),
            PodEntry {
                plan,
                host: h.clone(),
                proc: Proc::new(&pod, &h, argv, log),
                kubelet_dir,
                born: Instant::now(),
                status: status.clone(),
                monitor: None,
                hosts: String::new(),
            },
        );
        self.shared.sync()?;
        let mut st = lock(&self.shared.state);
        let e = st.pods.get_mut(&pod).expect("just inserted");
        e.born = Instant::now();
        e.proc.start()?;
        let monitor =
            self.net.hub_handle().spawn(kubelet(self.shared.clone(), pod.clone(), ip, probes, status, e.born));
        e.monitor = Some(monitor);
        Ok(pod)
    }

    /// Deletes pod `pod` as a force delete would: SIGKILL (its PID
    /// namespace's init, so its whole tree), its host and address gone, out
    /// of every Service and every hosts file at once. Its claims stay.
    pub fn delete_pod(&self, pod: &str) -> anyhow::Result<()> {
        let mut e = lock(&self.shared.state).pods.remove(pod).with_context(|| format!("no pod {pod}"))?;
        if let Some(m) = e.monitor.take() {
            m.abort();
        }
        e.proc.kill();
        self.net.remove_host(&e.host.name);
        self.shared.sync()
    }

    /// The plan pod `pod` runs.
    pub fn plan(&self, pod: &str) -> anyhow::Result<PodPlan> {
        lock(&self.shared.state).pods.get(pod).map(|p| p.plan.clone()).with_context(|| format!("no pod {pod}"))
    }

    /// Pod `pod`'s IP.
    pub fn pod_ip(&self, pod: &str) -> anyhow::Result<Ipv4Addr> {
        Ok(self.plan(pod)?.ip)
    }

    /// Every pod's name.
    pub fn pods(&self) -> Vec<String> {
        lock(&self.shared.state).pods.keys().cloned().collect()
    }

    /// What the kubelet has seen of pod `pod`.
    pub fn status(&self, pod: &str) -> anyhow::Result<PodStatus> {
        let st = lock(&self.shared.state);
        let p = st.pods.get(pod).with_context(|| format!("no pod {pod}"))?;
        Ok(lock(&p.status).clone())
    }

    /// Whether pod `pod`'s process runs.
    pub fn running(&self, pod: &str) -> bool {
        lock(&self.shared.state).pods.get_mut(pod).is_some_and(|p| p.proc.running())
    }

    /// The last `n` lines of pod `pod`'s log (all its incarnations).
    pub fn log_tail(&self, pod: &str, n: usize) -> String {
        let text = fs::read_to_string(self.dir.join(format!("{pod}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until pod `pod`'s startup probe, then its readiness and
    /// liveness probes have passed, each within its own budget
    /// ([`Probe::budget`], from the pod's start for the startup probe and
    /// from the startup probe's pass for the others) plus `margin`.
    pub async fn wait_probes(&self, pod: &str, margin: Duration) -> anyhow::Result<PodStatus> {
        let (plan, born) = {
            let st = lock(&self.shared.state);
            let p = st.pods.get(pod).with_context(|| format!("no pod {pod}"))?;
            (p.plan.clone(), p.born)
        };
        let budget = |k| plan.probe(k).map(Probe::budget).unwrap_or_default();
        let (bs, br, bl) = (budget(ProbeKind::Startup), budget(ProbeKind::Readiness), budget(ProbeKind::Liveness));
        let deadline = born + bs + br.max(bl) + margin;
        loop {
            let s = self.status(pod)?;
            if let (Some(started), Some(ready), Some(live)) = (s.started, s.ready_at, s.live_at) {
                ensure!(
                    started <= bs + margin,
                    "{pod}: startup probe passed after {started:?}, budget {bs:?} + {margin:?}"
                );
                ensure!(
                    ready.saturating_sub(started) <= br + margin,
                    "{pod}: readiness passed {:?} after startup, budget {br:?} + {margin:?}",
                    ready - started
                );
                ensure!(
                    live.saturating_sub(started) <= bl + margin,
                    "{pod}: liveness passed {:?} after startup, budget {bl:?} + {margin:?}",
                    live - started
                );
                return Ok(s);
            }
            if !self.running(pod) {
                bail!("{pod} exited; its log ends:\n{}", self.log_tail(pod, 30));
            }
            if Instant::now() > deadline {
                bail!(
                    "{pod}: probes did not pass within their budgets (startup {bs:?}, readiness {br:?}, liveness {bl:?}, \
                     + {margin:?}): {s:?}; its log ends:\n{}",
                    self.log_tail(pod, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The pid (on this machine) of pod `pod`'s container process: PID 1 of
    /// the pod's PID namespace, the child of its `unshare`.
    pub fn container_pid(&self, pod: &str) -> anyhow::Result<u32> {
        let parent = lock(&self.shared.state)
            .pods
            .get(pod)
            .and_then(|p| p.proc.pid())
            .with_context(|| format!("{pod} does not run"))?;
        for e in fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // pid (comm) state ppid …; comm may hold spaces and parentheses.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(parent) {
                return Ok(pid);
            }
        }
        bail!("{pod}: no child of its unshare ({parent})")
    }

    /// Checks pod `pod`'s running container process from outside against
    /// its plan: the exact argv and environment, PID 1 of its own PID
    /// namespace, its user, groups, no_new_privs and capabilities, its host
    /// name, a read-only root and each volume mounted (read-only where
    /// declared) in its own mount table. A one-line summary.
    pub fn verify_process(&self, pod: &str) -> anyhow::Result<String> {
        let plan = self.plan(pod)?;
        let pid = self.container_pid(pod)?;
        let split = |b: Vec<u8>| -> Vec<String> {
            b.split(|c| *c == 0).filter(|w| !w.is_empty()).map(|w| String::from_utf8_lossy(w).into_owned()).collect()
        };
        let argv = split(fs::read(format!("/proc/{pid}/cmdline"))?);
        ensure!(argv == plan.argv, "{pod}: runs {argv:?}, not {:?}", plan.argv);
        let environ = split(fs::read(format!("/proc/{pid}/environ"))?);
        let want: Vec<String> = plan.environment().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        ensure!(environ == want, "{pod}: environment {environ:?}, not {want:?}");
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Vec<String> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let s = &plan.security;
        let ids = |v: Vec<String>| v.iter().filter_map(|x| x.parse::<u32>().ok()).collect::<Vec<_>>();
        ensure!(ids(field("Uid:")) == [s.uid; 4], "{pod}: Uid {:?}, not {}", field("Uid:"), s.uid);
        ensure!(ids(field("Gid:")) == [s.gid; 4], "{pod}: Gid {:?}, not {}", field("Gid:"), s.gid);
        let groups: BTreeSet<u32> = ids(field("Groups:")).into_iter().collect();
        ensure!(groups == s.groups.iter().copied().collect(), "{pod}: groups {groups:?}, not {:?}", s.groups);
        if s.no_new_privs {
            ensure!(field("NoNewPrivs:") == ["1"], "{pod}: NoNewPrivs {:?}", field("NoNewPrivs:"));
        }
        if s.drop_all_caps {
            for f in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
                let v = field(f);
                ensure!(v.len() == 1 && v[0].chars().all(|c| c == '0'), "{pod}: {f} {v:?}");
            }
        }
        let nspid = field("NSpid:");
        ensure!(
            nspid.len() >= 2 && nspid.last().map(String::as_str) == Some("1"),
            "{pod}: NSpid {nspid:?}: not PID 1 of its own namespace"
        );
        let host = crate::netns::sh(&["nsenter", "--target", &pid.to_string(), "--uts", "hostname"])?;
        ensure!(host.trim() == plan.hostname, "{pod}: host name {:?}", host.trim());
        // mountinfo: id parent major:minor root mount-point options …
        let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        let options = |point: &str| -> Option<String> {
            mountinfo.lines().rev().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(4) == Some(&point)).then(|| f.get(5).map(|o| (*o).to_owned())).flatten()
            })
        };
        let ro = |point: &str| options(point).is_some_and(|o| o.split(',').any(|x| x == "ro"));
        if s.read_only_root {
            ensure!(ro("/"), "{pod}: its root is not read-only ({:?})", options("/"));
        }
        for m in &plan.mounts {
            ensure!(options(&m.path).is_some(), "{pod}: nothing mounted at {}", m.path);
            ensure!(
                ro(&m.path) == m.read_only,
                "{pod}: {} read-only: {}, declared {}",
                m.path,
                ro(&m.path),
                m.read_only
            );
        }
        Ok(format!(
            "{pod}: pid {pid} (PID 1 in the pod), host name {}, uid {} gid {} groups {:?}, NoNewPrivs {}, no capabilities, \
             root read-only {}, {} volumes mounted as declared, argv and environment exact ({} variables)",
            plan.hostname,
            s.uid,
            s.gid,
            s.groups,
            field("NoNewPrivs:").join(""),
            ro("/"),
            plan.mounts.len(),
            environ.len()
        ))
    }

    /// What `name` resolves to inside pod `pod` (its mount namespace: its
    /// hosts file; `getent ahostsv4`), each address once.
    pub fn resolve_in(&self, pod: &str, name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
        let pid = self.container_pid(pod)?.to_string();
        let out = Command::new("nsenter")
            .args(["--target", &pid, "--mount", "--net", "getent", "ahostsv4", name])
            .stdin(Stdio::null())
            .output()?;
        let mut ips = Vec::new();
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(ip) = l.split_whitespace().next().and_then(|a| a.parse().ok())
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
        Ok(ips)
    }

    /// The names the cluster DNS gives pod `pod` (`<pod>.<svc>.<ns>.svc.cluster.local`,
    /// under its StatefulSet's headless Service), if any.
    pub fn pod_fqdn(&self, pod: &str) -> anyhow::Result<Option<String>> {
        let plan = self.plan(pod)?;
        Ok(plan.subdomain.map(|sub| format!("{}.{sub}.{}.svc.{CLUSTER_DOMAIN}", plan.hostname, self.shared.namespace)))
    }

    /// Everything the kubelets recorded as wrong, and pods whose process
    /// is gone.
    pub fn violations(&self) -> Vec<String> {
        let mut st = lock(&self.shared.state);
        let mut out = Vec::new();
        for (name, p) in st.pods.iter_mut() {
            out.extend(lock(&p.status).violations.iter().cloned());
            if !p.proc.running() {
                out.push(format!("{name}: its process exited"));
            }
        }
        out
    }

    /// Runs `argv` in the hub's network namespace (an operator's machine
    /// inside the cluster: cluster DNS in its own mount namespace, Services
    /// through kube-proxy's rules there) and waits for it.
    pub async fn run_on_hub(&self, argv: &[String]) -> anyhow::Result<std::process::Output> {
        let n = self.hub_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hosts = self.dir.join(format!("hub-hosts-{n}"));
        let text = {
            let st = lock(&self.shared.state);
            let ready: BTreeMap<String, bool> =
                st.pods.iter().map(|(n, p)| (n.clone(), lock(&p.status).ready)).collect();
            format!("127.0.0.1\tlocalhost\n{}", self.shared.dns(&st, &ready))
        };
        fs::write(&hosts, text)?;
        let script = format!("mount --bind {} /etc/hosts\nexec \"$@\"", q(&hosts.display().to_string()));
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", self.net.hub_ns(), "unshare", "--mount", "--propagation", "private", "--"])
            .args(["sh", "-c", &script, "operator"])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run {argv:?} on the hub"))?;
        Ok(out)
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        let pods = std::mem::take(&mut lock(&self.shared.state).pods);
        for (_, mut p) in pods {
            if let Some(m) = p.monitor.take() {
                m.abort();
            }
            p.proc.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_the_kubelet() {
        let vars: HashMap<String, String> =
            [("A".to_owned(), "x".to_owned()), ("POD_NAME".to_owned(), "c-0".to_owned())].into();
        for (input, want) in [
            ("--id=$(POD_NAME)", "--id=c-0"),
            ("$(A)$(A)", "xx"),
            ("$$(A)", "$(A)"),
            ("$(B)", "$(B)"),
            ("$(A", "$(A"),
            ("a$b", "a$b"),
            ("$", "$"),
            ("end$", "end$"),
            ("é$(A)é", "éxé"),
            ("$$$(A)", "$x"),
        ] {
            assert_eq!(expand(input, &vars), want, "{input}");
        }
    }

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "abcd", "# REPLACE ME\n"] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(base64_decode(&e).unwrap(), s.as_bytes(), "{s:?} -> {e}");
        }
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_decode("YW\n  Jj").unwrap(), b"abc");
        assert!(base64_decode("a!").is_err());
    }

    #[test]
    fn a_statefulset_pod_is_planned_as_the_kubelet_would() {
        let yaml = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web, namespace: ns1}
spec:
  serviceName: web-peer
  template:
    metadata: {labels: {app: web}}
    spec:
      securityContext: {runAsUser: 1000, runAsGroup: 1001, fsGroup: 2000, runAsNonRoot: true}
      containers:
        - name: c
          command: [/bin/web]
          args: ["--name=$(POD_NAME).web-peer.$(NS)", "--ip=$(POD_IP)", "--x=$(LATER)", "--y=$$(POD_NAME)"]
          env:
            - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
            - {name: NS, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
            - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
            - {name: GREETING, value: "hi $(POD_NAME) $(LATER)"}
            - {name: LATER, value: "l"}
          ports: [{name: http, containerPort: 8080}]
          readinessProbe: {httpGet: {path: /readyz, port: http}, periodSeconds: 5, failureThreshold: 2}
          securityContext: {runAsUser: 1500, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
---
"#;
        let r = Rendering::parse(yaml).unwrap();
        let p = PodPlan::statefulset_pod(&r, "web", 2, Ipv4Addr::new(10, 0, 0, 9), None).unwrap();
        assert_eq!(p.name, "web-2");
        assert_eq!(p.argv, ["/bin/web", "--name=web-2.web-peer.ns1", "--ip=10.0.0.9", "--x=l", "--y=$(POD_NAME)"]);
        assert_eq!(p.env[3], ("GREETING".to_owned(), "hi web-2 $(LATER)".to_owned()));
        assert_eq!((p.security.uid, p.security.gid, p.security.groups.clone()), (1500, 1001, vec![2000]));
        assert!(p.security.no_new_privs && p.security.read_only_root && p.security.drop_all_caps);
        let rp = p.probe(ProbeKind::Readiness).unwrap();
        assert!(matches!(&rp.action, ProbeAction::Http { port: 8080, path, .. } if path == "/readyz"));
        assert_eq!(rp.budget(), Duration::from_secs(10));
        assert_eq!(p.subdomain.as_deref(), Some("web-peer"));
        assert_eq!(p.labels["statefulset.kubernetes.io/pod-name"], "web-2");
    }

    #[test]
    fn projected_volumes_have_the_kubelets_layout() {
        let d = tempfile::tempdir().unwrap();
        project(d.path(), &[("a".into(), b"1".to_vec(), 0o400), ("sub/b".into(), b"2".to_vec(), 0o644)], None).unwrap();
        assert_eq!(fs::read(d.path().join("a")).unwrap(), b"1");
        assert_eq!(fs::read(d.path().join("sub/b")).unwrap(), b"2");
        assert!(fs::symlink_metadata(d.path().join("..data")).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_link(d.path().join("a")).unwrap(), Path::new("..data/a"));
        let mode = fs::metadata(d.path().join("a")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o400);
        assert!(project(d.path().join("x").as_path(), &[("../evil".into(), vec![], 0o644)], None).is_err());
    }
}
