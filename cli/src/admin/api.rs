//! The HTTP side of `magnetar admin`: one request to a broker's `/admin/v1` API, its answer read
//! up to a limit, and its errors turned into messages a user can act on (the API's own
//! `{"error": "..."}` text with the HTTP status, or a hint when no broker answers).

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

/// The largest answer read; admin answers are small lists and records.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// A broker's admin API.
#[derive(Debug)]
pub struct Api {
    http: reqwest::Client,
    /// `http://host:port`, without a trailing slash.
    base: String,
    timeout: Duration,
}

/// The body of a successful answer (empty for `204 No Content`).
#[derive(Debug)]
pub struct Answer {
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as JSON of `T`.
    pub fn json<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!("the broker's answer is not the JSON expected: {}", String::from_utf8_lossy(&self.body))
        })
    }

    /// The body as indented JSON (`None` when there is no body).
    pub fn pretty(&self) -> anyhow::Result<Option<String>> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let v: serde_json::Value = self.json()?;
        Ok(Some(serde_json::to_string_pretty(&v)?))
    }
}

/// Normalizes `--url`: `host:port` gets `http://`, a trailing `/` goes; only plain HTTP is served.
pub fn normalize_url(url: &str) -> anyhow::Result<String> {
    let url = url.trim().trim_end_matches('/');
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", &url));
    if scheme != "http" {
        bail!("admin URL {url:?}: the admin API is plain HTTP; use http://HOST:PORT (the broker's http_addr)");
    }
    if rest.is_empty() || rest.contains('/') {
        bail!("admin URL {url:?} must look like http://HOST:PORT (the broker's http_addr), without a path");
    }
    Ok(url)
}

impl Api {
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let base = normalize_url(url)?;
        let http = reqwest::Client::builder().timeout(timeout).build().context("set up the HTTP client")?;
        Ok(Self { http, base, timeout })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.call(Method::GET, path, &[], None).await
    }

    /// Sends one request to `path` (under the base URL) and returns a successful answer; any
    /// other outcome is an error naming what went wrong.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let mut resp = req.send().await.map_err(|e| self.unreachable(&method, &url, &e))?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(&method, &url, &e))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                bail!("{method} {url}: the answer exceeds {MAX_ANSWER_BYTES} bytes");
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return Ok(Answer { body });
        }
        Err(anyhow!("{} (HTTP {status})", error_message(status, &body)))
    }

    /// The error of a request that got no (complete) answer, with a hint for the usual causes.
    fn unreachable(&self, method: &Method, url: &str, e: &reqwest::Error) -> anyhow::Error {
        if e.is_timeout() {
            return anyhow!(
                "{method} {url}: no answer within {} (raise --timeout if the cluster is busy)",
                humantime::format_duration(self.timeout)
            );
        }
        // The innermost cause says what happened ("Connection refused (os error 111)").
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        if e.is_connect() {
            return anyhow!(
                "{method} {url}: {cause}: is a broker listening on {}? Point --url (or MAGNETAR_ADMIN_URL) at \
                 a broker's http_addr",
                self.base
            );
        }
        anyhow!("{method} {url}: {cause}")
    }
}

/// The message of an error answer: the API's `{"error": "..."}`, else the body's text, else the
/// status's name.
fn error_message(status: StatusCode, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        return e.error;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return status.canonical_reason().unwrap_or("request failed").to_string();
    }
    text.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized_and_other_schemes_refused() {
        assert_eq!(normalize_url("127.0.0.1:8080").expect("host:port"), "http://127.0.0.1:8080");
        assert_eq!(normalize_url("http://b1:8080/").expect("slash"), "http://b1:8080");
        assert!(normalize_url("https://b1:8080").expect_err("https").to_string().contains("plain HTTP"));
        assert!(normalize_url("http://b1:8080/admin").expect_err("path").to_string().contains("without a path"));
    }

    #[test]
    fn error_messages_come_from_the_json_body() {
        let m = error_message(StatusCode::NOT_FOUND, br#"{"error":"namespace a/b does not exist"}"#);
        assert_eq!(m, "namespace a/b does not exist");
        assert_eq!(error_message(StatusCode::BAD_GATEWAY, b""), "Bad Gateway");
        assert_eq!(error_message(StatusCode::BAD_GATEWAY, b" upstream down\n"), "upstream down");
    }
}
