//! HTTP client for an OpenAI-style chat endpoint. A reload builds a new
//! client; calls in flight keep the `Arc` of the client they started with and
//! finish on it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{LlmConfig, scrub};

/// A configured LLM client.
#[derive(Debug)]
pub struct LlmClient {
    http: reqwest::Client,
    /// Base URL; `/chat/completions` and `/models` are appended.
    endpoint: String,
    model: String,
    max_retries: u32,
    timeout: Duration,
    /// Secrets of the endpoint URL, to scrub from error texts.
    secrets: Vec<String>,
}

/// Why a chat call failed.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// Transport error, timeout or 5xx after every retry: worth retrying later.
    #[error("llm endpoint unavailable after {attempts} attempts: {message}")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// Last error.
        message: String,
    },
    /// 4xx or an answer that is not a chat completion: retrying will not help.
    #[error("llm request refused: {0}")]
    Refused(String),
}

impl LlmError {
    /// Whether trying again later may succeed ([`LlmError::Unavailable`]).
    pub fn is_retryable(&self) -> bool {
        matches!(self, LlmError::Unavailable { .. })
    }
}

/// Why the HTTP client could not be built (no TLS backend, for one). Fatal.
#[derive(Debug, thiserror::Error)]
#[error("llm client: {0}")]
pub struct LlmBuildError(reqwest::Error);

/// Why the endpoint failed its health check (`GET /models`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlmHealthError {
    /// The endpoint answered with a non-2xx status: retryable for 5xx and
    /// 429, fatal (wrong endpoint or credentials) for other statuses.
    #[error("GET /models: HTTP {0}")]
    Status(reqwest::StatusCode),
    /// Transport error or timeout (message scrubbed of the URL's secrets).
    /// Retryable.
    #[error("GET /models: {0}")]
    Unreachable(String),
}

impl LlmHealthError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            LlmHealthError::Status(s) => s.is_server_error() || *s == reqwest::StatusCode::TOO_MANY_REQUESTS,
            LlmHealthError::Unreachable(_) => true,
        }
    }
}

/// The answer of one chat call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatReply {
    /// Model that answered (as reported by the endpoint).
    pub model: String,
    /// First choice's message content.
    pub content: String,
}

impl LlmClient {
    /// Builds a client (no network traffic).
    pub(crate) fn new(cfg: &LlmConfig) -> Result<Self, LlmBuildError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout.0)
            .connect_timeout(cfg.timeout.0.min(Duration::from_secs(5)))
            .build()
            .map_err(LlmBuildError)?;
        Ok(Self {
            http,
            endpoint: cfg.endpoint.expose().trim_end_matches('/').to_owned(),
            model: cfg.model.clone(),
            max_retries: cfg.max_retries,
            timeout: cfg.timeout.0,
            secrets: cfg.endpoint.secret().into_iter().collect(),
        })
    }

    /// Model this client sends.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `POST {endpoint}/chat/completions` with one user message; retries
    /// transport errors and 5xx answers up to `max_retries` times.
    pub async fn chat(&self, prompt: &str) -> Result<ChatReply, LlmError> {
        let body = serde_json::json!({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
        });
        let url = format!("{}/chat/completions", self.endpoint);
        let mut last = String::new();
        for attempt in 0..=self.max_retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            match self.http.post(&url).json(&body).send().await {
                Ok(resp) if resp.status().is_server_error() => last = format!("HTTP {}", resp.status()),
                Ok(resp) if !resp.status().is_success() => {
                    return Err(LlmError::Refused(format!("HTTP {}", resp.status())));
                }
                Ok(resp) => {
                    let v: serde_json::Value = resp.json().await.map_err(|e| LlmError::Refused(self.scrub(&e)))?;
                    let content = v["choices"][0]["message"]["content"]
                        .as_str()
                        .ok_or_else(|| LlmError::Refused("answer has no choices[0].message.content".into()))?;
                    let model = v["model"].as_str().unwrap_or(&self.model);
                    return Ok(ChatReply { model: model.to_owned(), content: content.to_owned() });
                }
                Err(e) => last = self.scrub(&e),
            }
        }
        Err(LlmError::Unavailable { attempts: self.max_retries + 1, message: last })
    }

    /// `GET {endpoint}/models` answers 2xx.
    pub async fn health(&self) -> Result<(), LlmHealthError> {
        match self.http.get(format!("{}/models", self.endpoint)).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(LlmHealthError::Status(r.status())),
            Err(e) => Err(LlmHealthError::Unreachable(self.scrub(&e))),
        }
    }

    fn scrub(&self, e: &dyn std::fmt::Display) -> String {
        scrub(&e.to_string(), &self.secrets)
    }
}
