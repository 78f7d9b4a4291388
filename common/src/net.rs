//! Small networking helpers shared by confroll's gRPC servers and clients.

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};

/// The connections `listener` accepts, with `TCP_NODELAY` set. tonic sets it
/// only on sockets it accepts itself; without it, small answers wait ~40 ms
/// for a delayed ACK.
pub fn nodelay_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

/// `url` with `http://` in front when it names no scheme.
pub fn with_scheme(url: &str) -> String {
    if url.contains("://") { url.to_owned() } else { format!("http://{url}") }
}

/// A client endpoint for `url` (with its scheme) that gives up connecting
/// after 2 s. `https://` speaks TLS, trusting `ca` (PEM) when given and the
/// system roots otherwise.
pub fn endpoint(url: &str, ca: Option<&[u8]>) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let ep =
        tonic::transport::Endpoint::from_shared(url.to_owned())?.connect_timeout(std::time::Duration::from_secs(2));
    if !url.starts_with("https://") {
        return Ok(ep);
    }
    let mut tls = tonic::transport::ClientTlsConfig::new();
    if let Some(ca) = ca {
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
    }
    ep.tls_config(tls)
}

/// Adds `authorization: Bearer <token>` when there is a token.
pub fn bearer<T>(r: &mut tonic::Request<T>, token: Option<&str>) {
    if let Some(t) = token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        r.metadata_mut().insert("authorization", v);
    }
}

/// Largest gRPC message confroll's servers accept: room above the 4 MiB
/// config limit for its envelope, so an oversized config gets a clear
/// INVALID_ARGUMENT rather than a transport error.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// `builder` serving what every confroll gRPC port serves next to its own
/// service: `grpc.health.v1` (reporting `S` as serving) and server
/// reflection v1 and v1alpha over `descriptor_sets`. Reflection lists only
/// the services this port serves (`S`, health, reflection), not every
/// service the descriptor sets define: `confroll.v1` holds both the
/// Coordinator and the NodeAgent API, and each port serves one.
pub async fn with_health_and_reflection<S: tonic::server::NamedService>(
    mut builder: tonic::transport::Server,
    descriptor_sets: &[&'static [u8]],
) -> Result<tonic::transport::server::Router, tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    let reflection = || {
        descriptor_sets
            .iter()
            .fold(tonic_reflection::server::Builder::configure(), |b, s| b.register_encoded_file_descriptor_set(s))
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(S::NAME)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let (v1, v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    Ok(builder.add_service(health).add_service(v1).add_service(v1alpha))
}

/// Why a confroll gRPC server (a node's agent, the coordinator API) stopped
/// with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection descriptor set is broken (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}
