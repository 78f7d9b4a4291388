//! The reference service's HTTP side. The status routes (`/healthz`,
//! `/readyz`, `/metrics`, `/api/v2/config/status`) serve any service
//! ([`status_routes`]); `/work` and `/api/v2/llm/chat` are the reference
//! service's own.
//!
//! | route | what |
//! |---|---|
//! | `GET /work` | a demo request: one PostgreSQL query and one Redis round trip on the live pools; answers the config version that served it |
//! | `GET /healthz` | liveness: the process serves HTTP |
//! | `GET /readyz` | readiness: every critical component healthy (503 otherwise) |
//! | `GET /metrics` | Prometheus text (404 while `metrics.enabled` is false) |
//! | `GET /api/v2/config/status` | version, sha256, applied_at, last reload report, highest token |
//! | `POST /api/v2/llm/chat` | `{"prompt": …}` through the live LLM client |

use std::{future::Future, time::Instant};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::{node::Node, report::ReloadReport, service::ServiceConfig};

/// Answer of `GET /work`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkReply {
    /// Config version the request was served with.
    pub version: u64,
    /// Node that served it.
    pub node: String,
    /// Value PostgreSQL echoed (the version), when the database is enabled.
    pub db: Option<i64>,
    /// Redis counter after `INCR`, when Redis is enabled.
    pub redis: Option<i64>,
}

/// Answer of `GET /api/v2/config/status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReply {
    /// Node id.
    pub node: String,
    /// Service.
    pub service: String,
    /// Applied version.
    pub version: u64,
    /// SHA-256 of the applied document.
    pub sha256: String,
    /// RFC 3339.
    pub applied_at: String,
    /// What applied it.
    pub source: &'static str,
    /// Highest fencing token accepted.
    pub highest_fencing_token: u64,
    /// Coordinator cluster whose pushes the node accepts.
    pub cluster_id: String,
    /// Cluster that numbered `version` (empty: a local version).
    pub config_cluster_id: String,
    /// The running config, secrets redacted.
    pub config: serde_json::Value,
    /// The last reload.
    pub last_reload: Option<ReloadReport>,
}

/// Builds the reference service's router.
pub fn router(node: Node) -> Router {
    Router::new()
        .route("/work", get(work))
        .route("/api/v2/llm/chat", post(chat))
        .with_state(node.clone())
        .merge(status_routes(node))
}

/// The routes every node serves, whatever its config type: liveness,
/// readiness, metrics and the config status (secrets redacted).
pub fn status_routes<C: ServiceConfig>(node: Node<C>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<C>))
        .route("/metrics", get(metrics::<C>))
        .route("/api/v2/config/status", get(status::<C>))
        .with_state(node)
}

/// Serves HTTP on `listener` until `shutdown` resolves; in-flight requests
/// finish first.
pub async fn run(
    node: Node,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(node)).with_graceful_shutdown(shutdown).await
}

struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

async fn work(State(node): State<Node>) -> Response {
    // One snapshot per request: the version reported is the config that
    // served it, and the pools are the ones live when it started.
    let live = node.config();
    let db = node.database();
    let redis = node.redis();
    let started = Instant::now();
    let result: Result<WorkReply, Failure> = async {
        let db_val = match &db {
            Some(db) => Some(
                sqlx::query_scalar::<_, i64>("SELECT $1::int8")
                    .bind(live.version as i64)
                    .fetch_one(db.pool())
                    .await
                    .map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}")))?,
            ),
            None => None,
        };
        let redis_val = match &redis {
            Some(r) => Some(
                r.query::<i64>(deadpool_redis::redis::cmd("INCR").arg(format!("confroll:work:{}", node.id())))
                    .await
                    .map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?,
            ),
            None => None,
        };
        Ok(WorkReply { version: live.version, node: node.id().into(), db: db_val, redis: redis_val })
    }
    .await;
    let code = match &result {
        Ok(_) => 200,
        Err(f) => f.0.as_u16(),
    };
    node.metrics().record_request("/work", code);
    tracing::debug!(version = live.version, code, took_us = started.elapsed().as_micros() as u64, "work");
    match result {
        Ok(r) => Json(r).into_response(),
        Err(f) => f.into_response(),
    }
}

async fn readyz<C: ServiceConfig>(State(node): State<Node<C>>) -> Response {
    let h = node.health().await;
    let code = if h.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(h)).into_response()
}

async fn metrics<C: ServiceConfig>(State(node): State<Node<C>>) -> Response {
    match node.metrics().render() {
        Some(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        None => Failure(StatusCode::NOT_FOUND, "metrics are disabled (metrics.enabled: false)".into()).into_response(),
    }
}

async fn status<C: ServiceConfig>(State(node): State<Node<C>>) -> Json<StatusReply> {
    let live = node.config();
    Json(StatusReply {
        node: node.id().into(),
        service: node.service().into(),
        version: live.version,
        sha256: live.sha256.clone(),
        applied_at: live.applied_at_rfc3339(),
        source: live.source.as_str(),
        highest_fencing_token: node.highest_token(),
        cluster_id: node.cluster_id(),
        config_cluster_id: live.cluster_id.clone(),
        config: node.codec().redacted_json(&live.config),
        last_reload: node.last_report().as_deref().cloned(),
    })
}

#[derive(Deserialize)]
struct ChatRequest {
    prompt: String,
}

async fn chat(State(node): State<Node>, Json(req): Json<ChatRequest>) -> Response {
    let Some(llm) = node.llm() else {
        return Failure(StatusCode::NOT_FOUND, "no llm section in the config".into()).into_response();
    };
    match llm.chat(&req.prompt).await {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => Failure(StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
