//! The HTTP client for requests to other members: the raft transport's streams and snapshot
//! `POST /raft`, and the forwarded `POST /conf-change`. One [`PeerClient`] (one reqwest
//! connection pool) per node, so all carry the same cluster token and, with peer TLS, present
//! the same certificate and trust the same CA.

use std::error::Error as _;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use bytes::Bytes;

use crate::cluster_id::{self, ClusterId};
use crate::config::Config;

/// Header carrying `--cluster-token` on every peer request.
pub const CLUSTER_HEADER: &str = "x-raftexample-cluster";

/// How long a pooled connection may sit idle. Shorter than any sensible `--header-timeout-ms`
/// (after which the server closes an idle connection), so that the client rarely picks a
/// connection the server is closing; raft traffic keeps busy connections alive anyway.
const POOL_IDLE: Duration = Duration::from_secs(1);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{}", chain(.0))]
    Request(#[source] reqwest::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// `error: cause: cause`: the useful part of a client error (refused, certificate unknown, ...)
/// is in its causes.
fn chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// A cheap-to-clone client for every request to the other members.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    token: HeaderValue,
    /// Sent once known (see [`crate::cluster_id`]).
    cluster_id: ClusterId,
    tls: bool,
}

impl PeerClient {
    /// A client sending `token` and `cluster_id` and, with `tls`, speaking only HTTPS with
    /// that config.
    pub fn new(
        token: HeaderValue,
        cluster_id: ClusterId,
        tls: Option<rustls::ClientConfig>,
    ) -> PeerClient {
        let is_tls = tls.is_some();
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE)
            .tcp_nodelay(true)
            .https_only(is_tls)
            // Always a config of our own (with its provider), even for plain HTTP, so reqwest
            // never reaches for a process-wide rustls provider.
            .tls_backend_preconfigured(tls.unwrap_or_else(crate::tls::trust_nothing))
            .build()
            .expect("a client with a preconfigured rustls config always builds");
        PeerClient {
            http,
            token,
            cluster_id,
            tls: is_tls,
        }
    }

    /// The client `cfg` asks for: its cluster token, and its peer TLS files if any.
    pub fn from_config(cfg: &Config, cluster_id: ClusterId) -> crate::Result<PeerClient> {
        let token = HeaderValue::from_str(&cfg.cluster_token).map_err(|_| {
            crate::Error::Config("--cluster-token is not a valid header value".into())
        })?;
        Ok(PeerClient::new(
            token,
            cluster_id,
            crate::tls::peer_client(&cfg.tls_files())?,
        ))
    }

    /// This node's cluster id, which this client sends and the peer listener checks.
    pub fn cluster_id(&self) -> ClusterId {
        self.cluster_id.clone()
    }

    /// The `--cluster-token` this client sends, which this node requires in turn.
    pub fn cluster_token(&self) -> HeaderValue {
        self.token.clone()
    }

    /// Whether peers are reached over HTTPS (and so their URLs must be `https://`).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `POST url` with the cluster token, `headers` and `body`; the status and body of the
    /// answer, all within `timeout`.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&'static str, HeaderValue)],
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), PeerError> {
        let mut req = self
            .http
            .post(url)
            .header(CLUSTER_HEADER, self.token.clone())
            .timeout(timeout)
            .body(body);
        if let Some(id) = self.cluster_id.header() {
            req = req.header(cluster_id::HEADER, id);
        }
        for (name, value) in headers {
            req = req.header(*name, value.clone());
        }
        let res = req.send().await.map_err(|e| classify(e, timeout))?;
        let status = res.status();
        let body = res.bytes().await.map_err(|e| classify(e, timeout))?;
        Ok((status, body))
    }
}

impl PeerClient {
    /// `POST url` with the cluster token and `headers` (which ask for an upgrade), within
    /// `timeout`: the upgraded connection if the peer answered 101, else its status.
    pub async fn upgrade(
        &self,
        url: &str,
        headers: &[(&'static str, HeaderValue)],
        timeout: Duration,
    ) -> Result<Result<reqwest::Upgraded, StatusCode>, PeerError> {
        let mut req = self
            .http
            .post(url)
            .header(CLUSTER_HEADER, self.token.clone());
        if let Some(id) = self.cluster_id.header() {
            req = req.header(cluster_id::HEADER, id);
        }
        for (name, value) in headers {
            req = req.header(*name, value.clone());
        }
        // Not reqwest's own timeout: that would also bound the life of the upgraded stream.
        let open = async {
            let res = req.send().await.map_err(|e| classify(e, timeout))?;
            if res.status() != StatusCode::SWITCHING_PROTOCOLS {
                return Ok(Err(res.status()));
            }
            res.upgrade()
                .await
                .map(Ok)
                .map_err(|e| classify(e, timeout))
        };
        tokio::time::timeout(timeout, open)
            .await
            .unwrap_or(Err(PeerError::Timeout(timeout)))
    }
}

fn classify(e: reqwest::Error, timeout: Duration) -> PeerError {
    if e.is_timeout() {
        PeerError::Timeout(timeout)
    } else {
        PeerError::Request(e)
    }
}
