//! The schemas nodes publish at registration: a submit is checked against
//! every live one (each violation with its JSON pointer, the refusing
//! schema and its nodes named, nothing stored), one service keeps one
//! format, a broken schema refuses the registration, and the secret marks
//! of the schemas hide secret values in reads and logs.
//!
//! The "nodes" here are registrations only (an agent address nothing
//! listens on): what is tested is the coordinator's side.

mod common;

use common::*;
use confroll_proto::v1 as pb;
use serde_json::json;

const SERVICE: &str = "flags";

/// Schema of the first build: a rate limit up to 1000, a secret token, and
/// nothing else.
fn schema_a() -> serde_json::Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "rate_limit": {"type": "integer", "minimum": 1, "maximum": 1000},
            "token": {"type": "string", "writeOnly": true},
            "features": {"type": "array", "items": {"type": "string"}}
        }
    })
}

/// Schema of the next build: adds `burst`, lowers the limit to 100.
fn schema_b() -> serde_json::Value {
    let mut s = schema_a();
    s["properties"]["rate_limit"]["maximum"] = json!(100);
    s["properties"]["burst"] = json!({"type": "integer"});
    s
}

fn register(node: &str, schema: &serde_json::Value, format: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        service: SERVICE.into(),
        node_id: node.into(),
        agent_address: "127.0.0.1:1".into(),
        healthy: true,
        schema: Some(service_schema(schema, format)),
        ..Default::default()
    }
}

/// `schema`, with the restart-only path `listen`, in `format`.
fn service_schema(schema: &serde_json::Value, format: &str) -> pb::ServiceSchema {
    pb::ServiceSchema { json_schema: schema.to_string(), restart_only: vec!["listen".into()], format: format.into() }
}

fn submit(content: &str, dry_run: bool) -> pb::SubmitConfigRequest {
    pb::SubmitConfigRequest { service: SERVICE.into(), dry_run, ..submit_req(content, "0s") }
}

#[tokio::test]
async fn submits_are_checked_against_every_live_schema_and_secrets_stay_hidden() {
    let _serial = serial().await;
    let (_store, _dir, c, mut client) = solo().await;

    // No node ever published a schema: nothing to check against.
    let e = client.submit_config(submit("rate_limit: 5\n", false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("has published its config schema"), "{}", e.message());

    // A broken schema refuses the registration.
    let mut broken = register("n0", &schema_a(), "yaml");
    broken.schema.as_mut().unwrap().json_schema = r#"{"type": 12}"#.into();
    let e = client.register(broken).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("schema does not compile"), "{}", e.message());

    client.register(register("n1", &schema_a(), "yaml")).await.unwrap();
    // One service stays in one format.
    let e = client.register(register("n9", &schema_b(), "toml")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("one service stays in one format"), "{}", e.message());

    // Every violation, each at its JSON pointer, with the schema and its node.
    let e = client.submit_config(submit("rate_limit: 5000\nbogus: 1\nfeatures: [a, 7]\n", false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let m = e.message();
    for needle in ["schema check failed", "published by n1", "at `/rate_limit`", "bogus", "at `/features/1`"] {
        assert!(m.contains(needle), "`{needle}` missing from: {m}");
    }
    assert_eq!(count_versions(&client, SERVICE).await, 0, "nothing stored");

    // Mixed schemas during an upgrade: n2 runs the next build.
    client.register(register("n2", &schema_b(), "yaml")).await.unwrap();
    let e = client.submit_config(submit("rate_limit: 500\n", true)).await.unwrap_err();
    let m = e.message();
    assert!(m.contains("published by n2") && !m.contains("published by n1"), "only the new schema refuses: {m}");
    assert!(m.contains("at `/rate_limit`"), "{m}");
    let e = client.submit_config(submit("rate_limit: 50\nburst: 3\n", true)).await.unwrap_err();
    let m = e.message();
    assert!(m.contains("published by n1") && !m.contains("published by n2"), "only the old schema refuses: {m}");
    // Status says which node runs which schema.
    let status = client.get_status(pb::GetStatusRequest { service: SERVICE.into() }).await.unwrap().into_inner();
    let ids: std::collections::BTreeMap<String, String> =
        status.nodes.into_iter().map(|n| (n.id, n.schema_id)).collect();
    let id = |s: serde_json::Value| confroll_common::schema_id(&s.to_string(), &["listen".into()], "yaml");
    assert_eq!(ids["n1"], id(schema_a()));
    assert_eq!(ids["n2"], id(schema_b()));
    let ok = client.submit_config(submit("rate_limit: 50\n", true)).await.unwrap().into_inner();
    let schema_check = ok.checks.iter().find(|c| c.name == "schema").unwrap();
    assert!(schema_check.ok && schema_check.detail.contains(", "), "both schemas checked: {}", schema_check.detail);
    assert_eq!(count_versions(&client, SERVICE).await, 0, "dry runs store nothing");

    // Secrets: stored as written, shown redacted, never logged.
    let secret = "s3cr3t-T0ken-value";
    for content in [format!("rate_limit: 10\ntoken: {secret}-1\n"), format!("rate_limit: 20\ntoken: {secret}-2\n")] {
        client.submit_config(submit(&content, false)).await.unwrap();
        // The fake nodes cannot be reached: the rollout ends (rolled back)
        // before the next submit is accepted.
        let mut tries = 0;
        while client
            .get_status(pb::GetStatusRequest { service: SERVICE.into() })
            .await
            .unwrap()
            .into_inner()
            .rollout
            .is_some_and(|r| matches!(r.state.as_str(), "RUNNING" | "ROLLING_BACK"))
        {
            tries += 1;
            assert!(tries < 400, "the rollout did not end");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let got = client
        .get_version(pb::GetVersionRequest { service: SERVICE.into(), version: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.redacted_secrets, 1);
    assert!(!got.content.contains(secret) && got.content.contains("<redacted>"), "{}", got.content);
    let diff = client
        .diff_versions(pb::DiffVersionsRequest { service: SERVICE.into(), from_version: 1, to_version: 2 })
        .await
        .unwrap()
        .into_inner()
        .diff;
    let text = format!("{diff:?}");
    assert!(text.contains("token") && text.contains("rate_limit") && !text.contains(secret), "{text}");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_confroll"))
            .args(["-c", &c.url(), "--service", SERVICE])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "confroll {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for args in [&["show", "2"][..], &["diff", "1", "2"], &["versions"], &["-o", "json", "show", "1"]] {
        let out = cli(args);
        assert!(!out.contains(secret), "confroll {args:?} shows a secret: {out}");
    }
    assert!(cli(&["show", "2"]).contains("<redacted>"));
    assert!(!c.log_text().contains(secret), "a secret reached the coordinator's log");
}

/// A service whose nodes are not running yet: an operator publishes its
/// schema (here a TOML service's, through the CLI), and submits are checked
/// against it; nodes publishing the same schema later share its identity.
#[tokio::test]
async fn an_operator_publishes_a_schema_before_the_nodes_and_toml_is_checked() {
    let _serial = serial().await;
    let (_store, dir, c, mut client) = solo().await;
    let file = dir.path().join("schema.json");
    std::fs::write(&file, schema_a().to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_confroll"))
        .args(["-c", &c.url(), "--service", "tomlsvc", "publish-schema", file.to_str().unwrap()])
        .args(["--restart-only", "listen", "--format", "toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_owned();
    assert_eq!(id, confroll_common::schema_id(&schema_a().to_string(), &["listen".into()], "toml"));

    let toml = |content: &str, dry_run: bool| pb::SubmitConfigRequest {
        service: "tomlsvc".into(),
        dry_run,
        ..submit_req(content, "0s")
    };
    let e = client.submit_config(toml("rate_limit = 5000\n", true)).await.unwrap_err();
    assert!(e.message().contains("at `/rate_limit`") && e.message().contains("no live node"), "{}", e.message());
    let e = client.submit_config(toml("rate_limit: 5\n", true)).await.unwrap_err();
    assert!(e.message().contains("not valid TOML"), "a YAML document for a TOML service: {}", e.message());
    let ok = client.submit_config(toml("rate_limit = 5\nfeatures = [\"a\"]\n", true)).await.unwrap().into_inner();
    assert_eq!(ok.checks[0].detail, "valid toml");
    // Publishing the same schema again (a node of the new build) is no change.
    let again =
        pb::PublishSchemaRequest { service: "tomlsvc".into(), schema: Some(service_schema(&schema_a(), "toml")) };
    assert_eq!(client.publish_schema(again).await.unwrap().into_inner().schema_id, id);
}
