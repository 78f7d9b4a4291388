//! The coordinator's HTTP side: `/metrics` (Prometheus) and `/healthz`.

use std::future::Future;

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
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
            "/metrics",
            get(|State(r): State<Replica>| async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], r.metrics().render()).into_response()
            }),
        )
        .with_state(replica);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
