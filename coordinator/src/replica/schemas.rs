//! The schemas of a service as this replica keeps them in the store: kept
//! when a node registers with one, read back for a submit's checks and for
//! redaction. What a schema is and how it checks: `crate::schemas`.

use std::{collections::BTreeMap, sync::Arc};

use confroll_common::{Format, schema_id, secrets::SecretPaths};

use super::{
    ApiError, Replica,
    records::{decode, encode},
};
use crate::{
    model::{NodeRecord, SchemaRecord, keys, now_rfc3339},
    schemas::{Compiled, Published, ServiceSchemas},
    store::{Cond, Op},
};

/// A schema as a node publishes it when it registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishedSchema {
    /// JSON Schema text.
    pub json_schema: String,
    /// Restart-only dotted paths.
    pub restart_only: Vec<String>,
    /// `yaml`, `json` or `toml` (empty: yaml).
    pub format: String,
}

impl Replica {
    /// Keeps the schema `node` published for `service` and returns its
    /// identity ([`confroll_common::schema_id`]). A schema that does not compile, whose secret marks cannot
    /// all be found, or whose format differs from the service's other
    /// schemas is refused (and so is the registration).
    ///
    /// `node` names the publisher (a node id, or an operator's credential
    /// when published through the API).
    pub async fn publish_schema(
        &self,
        service: &str,
        node: &str,
        published: PublishedSchema,
    ) -> Result<String, ApiError> {
        let service = &crate::model::service_name(service)?;
        let format = if published.format.is_empty() { Format::Yaml.to_string() } else { published.format };
        let sha = schema_id(&published.json_schema, &published.restart_only, &format);
        let rec = SchemaRecord {
            json_schema: published.json_schema,
            restart_only: published.restart_only,
            format,
            published_by: node.to_owned(),
            published_at: now_rfc3339(),
        };
        let compiled = self
            .inner
            .schemas
            .compile(&sha, rec.clone())
            .map_err(|e| ApiError::InvalidArgument(format!("the config schema node {node} publishes: {e}")))?;
        let kept = self.kept_schemas(service).await?;
        if let Some(other) = kept.iter().find(|c| c.format != compiled.format) {
            return Err(ApiError::FailedPrecondition(format!(
                "service `{service}` keeps its config in {} (schema {}); node {node} publishes {}: one service stays in one format",
                other.format,
                other.short(),
                compiled.format
            )));
        }
        if !kept.iter().any(|c| c.sha256 == sha) {
            let key = keys::schema(service, &sha);
            // Absent: the first publisher's record stays (same text, same hash).
            self.inner.store.txn(None, vec![Cond::Absent(key.clone())], vec![Op::Put(key, encode(&rec))]).await?;
            tracing::info!(%service, %node, schema = compiled.short(), format = %compiled.format, "config schema published");
        }
        Ok(sha)
    }

    /// Every schema kept for `service`, oldest first. One that no longer
    /// compiles (written by another confroll version) is skipped, loudly.
    pub(super) async fn kept_schemas(&self, service: &str) -> Result<Vec<Arc<Compiled>>, ApiError> {
        let prefix = keys::schemas(service);
        let mut out = Vec::new();
        for (key, entry) in self.inner.store.list(&prefix).await? {
            let sha = key.strip_prefix(&prefix).unwrap_or(&key).to_owned();
            if let Some(c) = self.inner.schemas.get(&sha) {
                out.push(c);
                continue;
            }
            let rec: SchemaRecord = decode(&key, &entry)?;
            match self.inner.schemas.compile(&sha, rec) {
                Ok(c) => out.push(c),
                Err(e) => {
                    tracing::error!(%service, schema = %sha, error = %e, "a kept config schema does not compile; ignored")
                }
            }
        }
        out.sort_by(|a, b| a.record.published_at.cmp(&b.record.published_at));
        Ok(out)
    }

    /// What a submit to `service` is checked with: the distinct schemas of
    /// its live `nodes`; with none live (or none publishing), the newest
    /// kept schema. Refused when the service never had one. One read of the
    /// kept schemas serves both this and the secret marks.
    pub(super) async fn service_schemas(
        &self,
        service: &str,
        nodes: &[NodeRecord],
    ) -> Result<ServiceSchemas, ApiError> {
        let kept = self.kept_schemas(service).await?;
        let mut by_id: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for n in nodes.iter().filter(|n| !n.schema.is_empty()) {
            by_id.entry(n.schema.as_str()).or_default().push(n.id.clone());
        }
        let mut schemas = Vec::new();
        for (id, mut nodes) in by_id {
            match kept.iter().find(|c| c.sha256 == id) {
                Some(schema) => {
                    nodes.sort();
                    schemas.push(Published { schema: schema.clone(), nodes });
                }
                None => tracing::warn!(%service, schema = %id, ?nodes, "nodes name a config schema that is not kept"),
            }
        }
        if schemas.is_empty() {
            let Some(newest) = kept.last() else {
                return Err(ApiError::FailedPrecondition(format!(
                    "no node of service `{service}` has published its config schema yet: start one (a node publishes its schema when it registers), then submit"
                )));
            };
            schemas.push(Published { schema: newest.clone(), nodes: Vec::new() });
        }
        let secrets = SecretPaths::union(kept.iter().map(|c| &c.secrets));
        Ok(ServiceSchemas { schemas, secrets })
    }

    /// What to hide in `service`'s documents (the marks of every schema
    /// kept for it), and the service's format.
    pub async fn secrets_of(&self, service: &str) -> Result<(SecretPaths, Format), ApiError> {
        let kept = self.kept_schemas(service).await?;
        let Some(first) = kept.first() else {
            return Err(ApiError::FailedPrecondition(format!(
                "no config schema is kept for service `{service}`, so its secret fields are unknown: ask with reveal_secrets (operators only)"
            )));
        };
        Ok((SecretPaths::union(kept.iter().map(|c| &c.secrets)), first.format))
    }
}
