//! The coordinator's HTTP side, for Prometheus and Kubernetes probes:
//!
//! * `/metrics`: Prometheus text.
//! * `/healthz`: liveness, 200 while the process serves (no store call: a
//!   store outage must not get every replica restarted).
//! * `/readyz`: readiness, 200 when this replica knows a leader and reads
//!   its store (a linearizable read: a quorum answered), else 503 with the
//!   reason. An unready replica still serves its API; a Service just stops
//!   sending clients to it.

use std::future::Future;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

use crate::replica::Replica;

/// Serves until `shutdown`.
pub async fn run(
    replica: Replica,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(r): State<Replica>| async move {
                match r.readiness().await {
                    Ok(leader) => (StatusCode::OK, format!("ok: leader {leader}\n")),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(r): State<Replica>| async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], r.metrics().render()).into_response()
            }),
        )
        .with_state(replica);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
