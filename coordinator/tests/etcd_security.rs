//! A secured etcd: TLS both ways (etcd's server certificate, and client
//! certificates etcd checks with `--client-cert-auth`), RBAC users, and JWT
//! auth tokens that expire every 2 s. A replica with the right certificate,
//! user and role leads and rolls out, also after its tokens expired and the
//! auth store changed; without a client certificate, with a wrong password,
//! or with a user whose role does not cover `/confroll/`, it stops with an
//! error that says what to fix, and never shows a password; a permission
//! revoked while it runs stops it too.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

use common::*;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, RoleRevokePermissionOptions, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

const PASSWORD: &str = "confroll-Pa55word-7f3a";
const WRONG_PASSWORD: &str = "not-the-Pa55word-91c2";
const ROOT_PASSWORD: &str = "root-Pa55word-5b0e";
const OUTSIDER_PASSWORD: &str = "outsider-Pa55word-2d8c";
/// Every password a test writes: none may appear in any output.
const PASSWORDS: [&str; 4] = [PASSWORD, WRONG_PASSWORD, ROOT_PASSWORD, OUTSIDER_PASSWORD];
/// Lifetime of etcd's JWT tokens: the rollout test outlives it.
const TOKEN_TTL: Duration = Duration::from_secs(2);

/// The files a secured etcd and its clients use, in one temp dir.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// ES256 key pair etcd signs its JWT tokens with.
    jwt_key: PathBuf,
    jwt_pub: PathBuf,
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1/localhost and a client
    /// certificate whose CN is no etcd user, all fresh.
    fn generate() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, "confroll test etcd CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |cn: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) =
            leaf("etcd", vec!["127.0.0.1".into(), "localhost".into()], ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = leaf("confroll-client", vec![], ExtendedKeyUsagePurpose::ClientAuth);
        let jwt = KeyPair::generate().unwrap();
        Pki {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server_cert),
            server_key: write("server.key", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client.key", client_key),
            jwt_key: write("jwt.key", jwt.serialize_pem()),
            jwt_pub: write("jwt.pub", jwt.public_key_pem()),
            dir,
        }
    }

    fn tls(&self) -> TlsOptions {
        let pem = |p: &PathBuf| std::fs::read(p).unwrap();
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(pem(&self.ca)))
            .identity(Identity::from_pem(pem(&self.client_cert), pem(&self.client_key)))
    }

    /// A password file (with the trailing newline an editor leaves).
    fn password_file(&self, name: &str, password: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, format!("{password}\n")).unwrap();
        p
    }
}

/// A secured single-member etcd, its users and its PKI.
struct Secured {
    endpoint: String,
    /// Until a cluster takes it over.
    etcd: Option<Etcd>,
    pki: Pki,
}

impl Secured {
    /// etcd on https with `--client-cert-auth` and 2 s JWT tokens; roles
    /// `confroll` (readwrite on `/confroll/`) and `outsider` (readwrite on
    /// `/other/` only), users `root`, `confroll`, `outsider`; auth enabled.
    async fn start() -> Secured {
        let pki = Pki::generate();
        let token = format!(
            "jwt,pub-key={},priv-key={},sign-method=ES256,ttl={}s",
            pki.jwt_pub.display(),
            pki.jwt_key.display(),
            TOKEN_TTL.as_secs()
        );
        let tls = EtcdTls { ca: pki.ca.clone(), cert: pki.server_cert.clone(), key: pki.server_key.clone() };
        let etcd = Etcd::start_tls(&tls, &["--auth-token", &token]);
        let mut admin =
            Client::connect([&etcd.endpoint], Some(ConnectOptions::new().with_tls(pki.tls()))).await.unwrap();
        admin.role_add("confroll").await.unwrap();
        admin.role_grant_permission("confroll", Permission::read_write("/confroll/").with_prefix()).await.unwrap();
        admin.role_add("outsider").await.unwrap();
        admin.role_grant_permission("outsider", Permission::read_write("/other/").with_prefix()).await.unwrap();
        for (user, password, role) in [
            ("root", ROOT_PASSWORD, "root"),
            ("confroll", PASSWORD, "confroll"),
            ("outsider", OUTSIDER_PASSWORD, "outsider"),
        ] {
            admin.user_add(user, password, None).await.unwrap();
            admin.user_grant_role(user, role).await.unwrap();
        }
        admin.auth_enable().await.unwrap();
        Secured { endpoint: etcd.endpoint.clone(), etcd: Some(etcd), pki }
    }

    /// etcd's `root`, for changes while replicas run.
    async fn root(&self) -> Client {
        let opts = ConnectOptions::new().with_tls(self.pki.tls()).with_user("root", ROOT_PASSWORD);
        Client::connect([&self.endpoint], Some(opts)).await.unwrap()
    }

    /// Replica flags: the CA, the client certificate unless `cert` is
    /// false, and `user` with a password file holding `password`.
    fn flags(&self, cert: bool, user: &str, password: &str) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        let mut f = vec!["--etcd-ca".to_owned(), path(&self.pki.ca)];
        if cert {
            f.extend(["--etcd-cert".to_owned(), path(&self.pki.client_cert)]);
            f.extend(["--etcd-key".to_owned(), path(&self.pki.client_key)]);
        }
        let file = self.pki.password_file(&format!("{user}-{}.pw", password.len()), password);
        f.extend(["--etcd-user".to_owned(), user.to_owned(), "--etcd-password-file".to_owned(), path(&file)]);
        f
    }

    /// A replica on this etcd, spawned (not waited for): its process, log and API port.
    fn spawn(&self, id: &str, flags: &[String]) -> (ChildGuard, PathBuf, u16) {
        spawn_replica(self.pki.dir.path(), id, &["--etcd-endpoints", &self.endpoint], flags)
    }
}

/// `confroll-coordinator --store etcd` with `store` and `flags`, output to
/// `<id>.log` in `dir`; not waited for (it may exit at once).
fn spawn_replica(dir: &Path, id: &str, store: &[&str], flags: &[String]) -> (ChildGuard, PathBuf, u16) {
    let port = free_port();
    let log = dir.join(format!("{id}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(coordinator_bin())
        .args(["--id", id, "--listen", &format!("127.0.0.1:{port}"), "--store", "etcd", "--lease-ttl", "2s"])
        .args(store)
        .arg("--push-key")
        .arg(&push_keys().0)
        .args(flags)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start confroll-coordinator");
    (ChildGuard(child), log, port)
}

/// Waits until `child` exits (at most `within`).
fn wait_exit(child: &mut ChildGuard, within: Duration, log: &Path) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after {within:?}; log:\n{}", read(log));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// No password of the test appears in `text` (`what`: whose output).
fn assert_no_password(text: &str, what: &str) {
    for p in PASSWORDS {
        assert!(!text.contains(p), "{what} shows a password:\n{text}");
    }
}

/// The replica exited non-zero, and its output says each of `says`.
fn assert_refused(status: ExitStatus, log: &Path, says: &[&str]) -> String {
    let text = read(log);
    assert!(!status.success(), "exited {status}, expected a failure; log:\n{text}");
    for s in says {
        assert!(text.contains(s), "the log does not say `{s}`:\n{text}");
    }
    assert_no_password(&text, "the replica's output");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_certificate_and_user_leads_and_rolls_out_across_token_expiry() {
    let _serial = serial().await;
    let started = Instant::now();
    let mut secured = Secured::start().await;
    let flags = secured.flags(true, "confroll", PASSWORD);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let etcd = secured.etcd.take().unwrap();
    let mut cl = Cluster::start_with(Backing::Etcd(etcd), 2, 1, &lite(30), &flags).await;
    let client = cl.rolled_out(&lite(30)).await;
    let leader = leader_via(&client).await;
    let token = cl.nodes[0].fencing_token().await;
    eprintln!("{leader} leads (token {token}) and rolled out v1 as `confroll` after {:?}", started.elapsed());

    // Change the auth store: every JWT token issued before is refused from
    // now on. Then let the tokens expire as well.
    let mut root = secured.root().await;
    root.user_add("bystander", "bystander-Pa55word", None).await.unwrap();
    tokio::time::sleep(TOKEN_TTL + Duration::from_millis(500)).await;

    // The leader kept its lease (keep-alives are not checked against
    // tokens), and a rollout followed through a watch created now (a
    // 1 s bake, so its end comes through the store's watch) works.
    assert_eq!(leader_via(&client).await, leader, "leadership changed hands");
    let v2 = submit_until_accepted(&client, submit_req(&lite(60), "1s")).await;
    let events = watch_to_end(cl.coords[0].url()).await;
    let last = events.last().and_then(|e| e.rollout.clone()).expect("rollout events");
    assert_eq!((last.id.as_str(), last.state.as_str()), (v2.rollout_id.as_str(), "SUCCEEDED"), "{events:?}");
    assert!(events.len() >= 2, "only the state at the start came, no change through the watch: {events:?}");
    cl.nodes[0].wait_version(2).await;
    assert_eq!(cl.nodes[0].fencing_token().await, token, "the same term pushed v2");

    // The follower campaigned all along on its own (expired) tokens: SIGKILL
    // the leader, and it takes over and rolls out v3.
    let idx = cl.coords.iter().position(|c| c.id == leader).unwrap();
    cl.coords[idx].kill9();
    let survivor = &cl.coords[1 - idx];
    let new = new_leader(survivor, &leader).await;
    let survivor_client = survivor.client().await;
    submit_until_accepted(&survivor_client, submit_req(&lite(90), "0s")).await;
    let done = wait_rollout_done(survivor, Duration::from_secs(30)).await;
    assert_eq!(done.state, "SUCCEEDED", "{done:?}");
    cl.nodes[0].wait_version(3).await;
    assert!(cl.nodes[0].fencing_token().await > token, "the new leader's token is higher");

    let logs: String = cl.coords.iter().map(|c| c.log_text()).collect();
    assert!(logs.contains("re-authenticated with etcd"), "no replica re-authenticated:\n{logs}");
    assert_no_password(&logs, "a replica's log");
    eprintln!("{new} took over from {leader} and rolled out v3; {:?} in all", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_certificate_a_replica_is_refused() {
    let _serial = serial().await;
    let secured = Secured::start().await;
    let (mut child, log, _) = secured.spawn("c1", &secured.flags(false, "confroll", PASSWORD));
    let status = wait_exit(&mut child, Duration::from_secs(20), &log);
    let text = assert_refused(status, &log, &["etcd refused the TLS handshake", "--etcd-cert"]);
    eprintln!("refused:\n{}", tail(&text, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_and_never_shown() {
    let _serial = serial().await;
    let secured = Secured::start().await;
    let (mut child, log, _) = secured.spawn("c1", &secured.flags(true, "confroll", WRONG_PASSWORD));
    let status = wait_exit(&mut child, Duration::from_secs(20), &log);
    let text = assert_refused(status, &log, &["user `confroll`", "wrong password", "--etcd-password-file"]);
    eprintln!("refused:\n{}", tail(&text, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_permission_on_the_prefix_is_refused() {
    let _serial = serial().await;
    let secured = Secured::start().await;
    let (mut child, log, _) = secured.spawn("c1", &secured.flags(true, "outsider", OUTSIDER_PASSWORD));
    let status = wait_exit(&mut child, Duration::from_secs(20), &log);
    let text = assert_refused(status, &log, &["denied user `outsider`", "readwrite", "/confroll/"]);
    eprintln!("refused:\n{}", tail(&text, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permission_revoked_while_running_stops_the_replica() {
    let _serial = serial().await;
    let secured = Secured::start().await;
    let (mut child, log, port) = secured.spawn("c1", &secured.flags(true, "confroll", PASSWORD));
    let url = format!("http://127.0.0.1:{port}");
    let client = eventually(Duration::from_secs(20), "the replica's API", || {
        let url = url.clone();
        async move { confroll_proto::v1::coordinator_client::CoordinatorClient::connect(url).await.ok() }
    })
    .await;
    assert_eq!(leader_via(&client).await, "c1");

    let mut root = secured.root().await;
    let prefix = RoleRevokePermissionOptions::new().with_prefix();
    root.role_revoke_permission("confroll", "/confroll/", Some(prefix)).await.unwrap();
    // Its next store call is refused (a status read makes sure there is one).
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "still running; log:\n{}", read(&log));
        let mut c = client.clone();
        let _ = c.get_status(confroll_proto::v1::GetStatusRequest::default()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let text = assert_refused(status, &log, &["etcd refused this replica", "denied user `confroll`", "/confroll/"]);
    eprintln!("stopped:\n{}", tail(&text, 3));
}

#[test]
fn bad_etcd_flags_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, content: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    };
    let (empty, ca) = (file("empty.pw", "\n"), file("not-a-ca.pem", "hello"));
    let missing = dir.path().join("missing.pw").display().to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--etcd-endpoints", "https://127.0.0.1:1"], vec!["--etcd-endpoints https://127.0.0.1:1", "--etcd-ca"]),
        (vec!["--etcd-ca", &ca], vec!["--etcd-ca", "not-a-ca.pem", "no PEM certificate"]),
        (vec!["--etcd-cert", &ca], vec!["--etcd-key"]),
        (vec!["--etcd-user", "confroll"], vec!["--etcd-password-file"]),
        (
            vec!["--etcd-user", "confroll", "--etcd-password-file", &empty],
            vec!["--etcd-password-file", "empty.pw", "is empty"],
        ),
        (vec!["--etcd-user", "confroll", "--etcd-password-file", &missing], vec!["--etcd-password-file", "missing.pw"]),
    ];
    for (i, (flags, says)) in cases.into_iter().enumerate() {
        let flags: Vec<String> = flags.into_iter().map(String::from).collect();
        let (mut child, log, _) = spawn_replica(dir.path(), &format!("c{i}"), &[], &flags);
        let status = wait_exit(&mut child, Duration::from_secs(20), &log);
        assert_refused(status, &log, &says);
    }
}
