//! Bad input of every kind gets a clear error naming the cause; the running
//! config and components stay exactly as they were; the node keeps serving.

mod common;

use std::sync::Arc;

use common::{Cfg, Served, dead_port, push};
use confroll_node::{Node, Push, PushError, ReloadReport, ReloadStatus};

/// Everything that must not change when a candidate is refused.
struct Snapshot {
    version: u64,
    sha256: String,
    db: Option<Arc<confroll_node::components::Database>>,
    redis: Option<Arc<confroll_node::components::RedisPool>>,
    log: Arc<confroll_node::config::LogConfig>,
}

impl Snapshot {
    fn take(node: &Node) -> Self {
        let live = node.config();
        Self {
            version: live.version,
            sha256: live.sha256.clone(),
            db: node.database(),
            redis: node.redis(),
            log: node.logger().settings(),
        }
    }

    fn assert_unchanged(&self, node: &Node, case: &str) {
        let live = node.config();
        assert_eq!(live.version, self.version, "{case}: version moved");
        assert_eq!(live.sha256, self.sha256, "{case}: config changed");
        assert!(ptr_eq(&self.db, &node.database()), "{case}: database pool was swapped");
        assert!(ptr_eq(&self.redis, &node.redis()), "{case}: redis pool was swapped");
        assert_eq!(*self.log, *node.logger().settings(), "{case}: log settings changed");
    }
}

fn ptr_eq<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

async fn assert_serving(s: &Served, version: u64, case: &str) {
    let r = s.work().await;
    assert_eq!(r.status(), 200, "{case}: node stopped serving");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["version"], version, "{case}");
}

/// Applies `content`, expects `status` and an error containing `needle`,
/// nothing changed and the node still serving; returns the report.
async fn refuse(s: &Served, case: &str, content: Vec<u8>, status: ReloadStatus, needle: &str) -> ReloadReport {
    let before = Snapshot::take(&s.node);
    let report = s.node.apply(content).await;
    assert_eq!(report.status, status, "{case}: {report:?}");
    let err = report.error.clone().unwrap_or_default();
    assert!(err.contains(needle), "{case}: error `{err}` does not name the cause `{needle}`");
    before.assert_unchanged(&s.node, case);
    assert_serving(s, before.version, case).await;
    report
}

#[tokio::test]
async fn static_errors_are_refused_with_the_cause_and_change_nothing() {
    let s = Served::start(&Cfg::standard()).await;
    let good = Cfg::standard();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty file", b"".to_vec(), "config is empty"),
        ("only comments", b"# nothing here\n\n".to_vec(), "config is empty"),
        ("invalid YAML", b"log: {level: info\ndatabase: [".to_vec(), "not valid YAML"),
        (
            "wrong type",
            good.yaml().replace("max_conns: 5", "max_conns: ten").into_bytes(),
            "at `database.max_conns`: invalid type",
        ),
        (
            "unknown key",
            good.yaml().replace("max_conns: 5", "max_connections: 5").into_bytes(),
            "unknown field `max_connections`",
        ),
        (
            "unknown top-level key",
            format!("{}featureflags: {{a: 1}}\n", good.yaml()).into_bytes(),
            "unknown field `featureflags`",
        ),
        (
            "min > max",
            good.yaml().replace("min_conns: 1", "min_conns: 20").into_bytes(),
            "`database.min_conns` must be <= database.max_conns (20 > 5)",
        ),
        (
            "unknown log level",
            good.yaml().replace("level: info", "level: loud").into_bytes(),
            "`log.level` must be one of",
        ),
        (
            "bad duration",
            good.yaml().replace("ttl: 30s", "ttl: 30 parsecs").into_bytes(),
            "invalid duration `30 parsecs`",
        ),
        (
            "restart-only change",
            good.yaml().replace("port: 8080", "port: 9090").into_bytes(),
            "`server.port` is restart-only",
        ),
        (
            "restart-only profile",
            good.yaml().replace("profile: standard", "profile: lite").into_bytes(),
            "`profile` is restart-only",
        ),
        ("non-UTF-8 bytes", [b"log:\n  level: ".as_slice(), &[0xff, 0xfe, 0x80], b"\n"].concat(), "not valid UTF-8"),
        ("invalid JSON", b"{\"log\": {\"level\": \"info\"".to_vec(), "not valid JSON"),
        ("JSON unknown key", b"{\"log\": {\"colour\": true}}".to_vec(), "unknown field `colour`"),
    ];
    for (case, content, needle) in cases {
        refuse(&s, case, content, ReloadStatus::Rejected, needle).await;
    }
    // Every refusal was counted by cause.
    let text = s.node.metrics().render().unwrap();
    assert!(
        text.contains(
            "confroll_config_reload_errors_total{node=\"test-node\",service=\"default\",type=\"validate\"} 12"
        ),
        "{text}"
    );
    assert!(text.contains("type=\"restart_only\""), "{text}");
}

#[tokio::test]
async fn a_yaml_alias_bomb_is_refused() {
    let s = Served::start(&Cfg::standard()).await;
    // Nine levels of nine-fold aliases: 9^9 (387 million) strings if expanded.
    let mut bomb = String::from("x0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for i in 1..=9 {
        let p = i - 1;
        bomb.push_str(&format!("x{i}: &a{i} [*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p}]\n"));
    }
    // Refused before any deserialization: the pre-parse check (limits.rs)
    // counts what the aliases would expand to without expanding them.
    // Typed fields would refuse it too, and the YAML layer's own repetition
    // limit stays behind both (config::tests).
    let doc = format!("{bomb}log:\n  level: info\nmetrics:\n  labels: *a9\n");
    refuse(&s, "alias bomb", doc.into_bytes(), ReloadStatus::Rejected, "aliases expand to more than 100000 nodes")
        .await;
    let inside = format!("metrics:\n  labels:\n    defs: {{ {} }}\n", bomb.lines().collect::<Vec<_>>().join(", "));
    refuse(
        &s,
        "alias bomb inside a field",
        inside.into_bytes(),
        ReloadStatus::Rejected,
        "aliases expand to more than 100000 nodes",
    )
    .await;
    let deep = format!("log: {}{}\n", "[".repeat(10_000), "]".repeat(10_000));
    refuse(&s, "deep nesting", deep.into_bytes(), ReloadStatus::Rejected, "document nests deeper than 64 levels").await;
}

#[tokio::test]
async fn a_ten_mib_file_is_refused_before_it_is_parsed() {
    let s = Served::start(&Cfg::standard()).await;
    let before = Snapshot::take(&s.node);
    let mut big = Cfg::standard().yaml();
    big.push_str("# ");
    big.push_str(&"x".repeat(10 * 1024 * 1024));
    big.push('\n');
    std::fs::write(s.config_path(), &big).unwrap();
    let report = s.node.reload_from_file(confroll_node::Trigger::File).await;
    assert_eq!(report.status, ReloadStatus::Rejected);
    let err = report.error.unwrap();
    assert!(err.contains("the limit is 4194304 bytes"), "{err}");
    assert!(err.contains(&format!("config is {} bytes", big.len())), "{err}");
    before.assert_unchanged(&s.node, "10 MiB file");
    assert_serving(&s, before.version, "10 MiB file").await;
    // The same document pushed in memory is refused too.
    refuse(&s, "10 MiB in memory", big.into_bytes(), ReloadStatus::Rejected, "the limit is 4194304 bytes").await;
}

#[tokio::test]
async fn an_unreachable_database_rolls_back() {
    let s = Served::start(&Cfg::standard()).await;
    let mut bad = Cfg::standard();
    bad.db_url = format!("postgres://app:s3cret-pw@127.0.0.1:{}/postgres", dead_port());
    let report =
        refuse(&s, "unreachable database", bad.yaml().into_bytes(), ReloadStatus::RolledBack, "database").await;
    assert!(!format!("{report:?}").contains("s3cret-pw"), "secret leaked into the report: {report:?}");
    assert_eq!(report.component("database").unwrap().status, "failed");
    let text = s.node.metrics().render().unwrap();
    assert!(
        text.contains(
            "confroll_config_reload_rollbacks_total{node=\"test-node\",reason=\"component\",service=\"default\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_redis_that_is_down_rolls_back() {
    let s = Served::start(&Cfg::standard()).await;
    let mut bad = Cfg::standard();
    bad.redis_url = format!("redis://:pw-redis-1@127.0.0.1:{}/0", dead_port());
    let report = refuse(&s, "redis down", bad.yaml().into_bytes(), ReloadStatus::RolledBack, "redis").await;
    assert!(!format!("{report:?}").contains("pw-redis-1"));
}

#[tokio::test]
async fn a_push_with_a_lower_token_is_refused() {
    let s = Served::start(&Cfg::standard()).await;
    let mut next = Cfg::standard();
    next.ttl = "45s";
    let r = s.node.push(push(next.yaml(), 7, 100)).await.unwrap();
    assert_eq!(r.status, ReloadStatus::Applied);
    assert_eq!(s.node.config().version, 7);
    let before = Snapshot::take(&s.node);
    next.ttl = "50s";
    match s.node.push(push(next.yaml(), 8, 99)).await {
        Err(PushError::StaleToken { token: 99, highest: 100 }) => {}
        other => panic!("expected a stale-token refusal, got {other:?}"),
    }
    before.assert_unchanged(&s.node, "stale token");
    assert_serving(&s, 7, "stale token").await;
    // Equal token (same leader, next version) is accepted.
    assert_eq!(s.node.push(push(next.yaml(), 8, 100)).await.unwrap().status, ReloadStatus::Applied);
    // A checksum that does not match is refused.
    let mut p = push(next.yaml(), 9, 101);
    p.sha256 = "00".repeat(32);
    assert!(matches!(s.node.push(p).await, Err(PushError::ShaMismatch { .. })));
    assert_eq!(s.node.config().version, 8);
}

#[tokio::test]
async fn a_push_overtaken_by_a_later_one_of_the_same_leader_is_refused() {
    let s = Served::start(&Cfg::standard()).await;
    let ordered = |ttl: &'static str, version, token, sequence| {
        let mut c = Cfg::standard();
        c.ttl = ttl;
        Push { sequence, ..push(c.yaml(), version, token) }
    };
    assert_eq!(s.node.push(ordered("41s", 7, 100, 5)).await.unwrap().status, ReloadStatus::Applied);
    // Push 4 of the same leader arrives after push 5 ran: refused, nothing changes.
    let before = Snapshot::take(&s.node);
    match s.node.push(ordered("42s", 6, 100, 4)).await {
        Err(PushError::Superseded { sequence: 4, latest: 5 }) => {}
        other => panic!("expected an overtaken push to be refused, got {other:?}"),
    }
    before.assert_unchanged(&s.node, "overtaken push");
    assert_serving(&s, 7, "overtaken push").await;
    // The same push again (a retry) is taken; so is an unordered one (0).
    assert_eq!(s.node.push(ordered("41s", 7, 100, 5)).await.unwrap().status, ReloadStatus::Unchanged);
    assert_eq!(s.node.push(ordered("43s", 8, 100, 0)).await.unwrap().status, ReloadStatus::Applied);
    // A new leader (higher token) starts its own count.
    assert_eq!(s.node.push(ordered("44s", 9, 101, 1)).await.unwrap().status, ReloadStatus::Applied);
    assert_eq!(s.node.config().version, 9);
}
