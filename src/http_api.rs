//! HTTP front ends: the client key-value API on `--port` (raftexample's routes, one handler for
//! every path) and the operator routes `/status`, `/health` and `/metrics` on the peer listener.
//!
//! Writes `propose_tx` (through [`KvStore::put`]), `conf_change_tx` and `read_tx`; reads only
//! the kvstore map and the status the raft task publishes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use raft::prelude::{ConfChange, ConfChangeType};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::channels::{ConfChangeError, ConfChangeRequest, NodeStatus, ReadRequest};
use crate::config::{peer_scheme, PeerUrl, MAX_NODE_ID};
use crate::kvstore::{KvStore, PutError};
use crate::peer_client::PeerClient;

/// Why a client request failed; each maps to one status code and one line of text.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed => {
                return (
                    StatusCode::METHOD_NOT_ALLOWED,
                    [(header::ALLOW, "GET, PUT, POST, DELETE")],
                    "method not allowed\n",
                )
                    .into_response()
            }
        };
        (status, format!("{self}\n")).into_response()
    }
}

impl From<PutError> for ApiError {
    fn from(e: PutError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

/// What the client handler needs.
#[derive(Clone)]
pub struct ApiState {
    pub kv: Arc<KvStore>,
    pub conf_change_tx: mpsc::Sender<ConfChangeRequest>,
    pub read_tx: mpsc::Sender<ReadRequest>,
    pub timeout: Duration,
    /// Forwards membership changes to the leader's peer listener, with the transport's
    /// cluster token and TLS settings.
    pub peers: PeerClient,
}

/// `POST /conf-change` on the peer listener: a membership change forwarded by a follower,
/// handled here as if a client had sent it, but never forwarded again.
pub fn forwarded_router(state: ApiState) -> Router {
    Router::new()
        .route("/conf-change", axum::routing::post(forwarded))
        .with_state(Arc::new(state))
}

async fn forwarded(State(st): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    use protobuf::Message as _;
    let cc = ConfChange::parse_from_bytes(&body)
        .map_err(|_| ApiError::BadRequest("undecodable conf change".into()))?;
    change_membership(&st, cc, Instant::now() + st.timeout, false).await
}

/// The client API. The query string is not part of the key (`?consistency=serializable`).
pub fn client_router(state: ApiState, max_body: usize) -> Router {
    Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(max_body))
        // Shared, not cloned per request.
        .with_state(Arc::new(state))
}

async fn handle(
    State(st): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Result<Response, ApiError> {
    let deadline = Instant::now() + st.timeout;
    let key = uri.path().as_bytes();
    match method {
        Method::PUT => {
            st.kv.put(key, &body, deadline).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Method::GET => {
            let serializable = uri
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "consistency=serializable"));
            if !serializable {
                wait_linearizable(&st, deadline).await?;
            }
            match st.kv.lookup(key) {
                Some(v) => Ok(v.into_response()),
                None => Err(ApiError::NotFound("key not found".into())),
            }
        }
        Method::POST if uri.path().ends_with(PROMOTE) => {
            let id = parse_node_id(&uri.path()[..uri.path().len() - PROMOTE.len()])?;
            let mut cc = crate::node::learners::promotion(id);
            cc.id = st.kv.next_id();
            change_membership(&st, cc, deadline, true).await
        }
        Method::POST => {
            let id = parse_node_id(uri.path())?;
            let keep = keep_learner(uri.query())?;
            // A member with the other scheme could never be reached: peers speak HTTPS exactly
            // when peer TLS is configured.
            let scheme = peer_scheme(st.peers.is_tls());
            let url = std::str::from_utf8(&body)
                .ok()
                .and_then(|s| PeerUrl::parse(s.trim()).ok())
                .filter(|u| u.is_https() == st.peers.is_tls())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "body must be the new member's {scheme}://host:port"
                    ))
                })?;
            let mut cc = ConfChange::default();
            cc.set_change_type(ConfChangeType::AddLearnerNode);
            cc.node_id = id;
            cc.context = crate::node::learners::learner_context(&url.url, keep).into();
            cc.id = st.kv.next_id();
            change_membership(&st, cc, deadline, true).await
        }
        Method::DELETE => {
            let id = parse_node_id(uri.path())?;
            let mut cc = ConfChange::default();
            cc.set_change_type(ConfChangeType::RemoveNode);
            cc.node_id = id;
            cc.id = st.kv.next_id();
            change_membership(&st, cc, deadline, true).await
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// `POST /<id>/promote`: makes learner `<id>` a voter.
const PROMOTE: &str = "/promote";

/// `?learner=true` on `POST /<id>`: the new member stays a learner (a read replica) until
/// promoted explicitly; without it the leader promotes it once it has caught up.
fn keep_learner(query: Option<&str>) -> Result<bool, ApiError> {
    let value = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("learner="));
    match value {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(ApiError::BadRequest("learner must be true or false".into())),
    }
}

fn parse_node_id(path: &str) -> Result<u64, ApiError> {
    path.strip_prefix('/')
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|id| (1..=MAX_NODE_ID).contains(id))
        .ok_or_else(|| {
            ApiError::BadRequest(format!("node id must be an integer in 1..={MAX_NODE_ID}"))
        })
}

/// ReadIndex (shared with concurrent readers), then wait until the map has applied that index.
pub(crate) async fn wait_linearizable(st: &ApiState, deadline: Instant) -> Result<(), ApiError> {
    let (tx, rx) = oneshot::channel();
    let shutting_down = || ApiError::Unavailable("node is shutting down".into());
    st.read_tx.send(tx).await.map_err(|_| shutting_down())?;
    let index = match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(Ok(index))) => index,
        Ok(Ok(Err(e))) => return Err(ApiError::Unavailable(format!("read failed: {e}"))),
        Ok(Err(_)) => return Err(shutting_down()),
        Err(_) => {
            return Err(ApiError::Unavailable(
                "read failed: no quorum confirmed the leader within the timeout".into(),
            ))
        }
    };
    let mut applied = st.kv.subscribe_applied();
    let caught_up = tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= index))
        .await
        .map(|r| r.is_ok());
    match caught_up {
        Ok(true) => Ok(()),
        Ok(false) => Err(shutting_down()),
        Err(_) => Err(ApiError::Unavailable(
            "read failed: this node did not catch up within the timeout".into(),
        )),
    }
}

async fn change_membership(
    st: &ApiState,
    cc: ConfChange,
    deadline: Instant,
    may_forward: bool,
) -> Result<Response, ApiError> {
    use protobuf::Message as _;
    let body = cc
        .write_to_bytes()
        .expect("encoding a ConfChange cannot fail");
    let (done, rx) = oneshot::channel();
    st.conf_change_tx
        .send(ConfChangeRequest { cc, done })
        .await
        .map_err(|_| ApiError::Unavailable("node is shutting down".into()))?;
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(Ok(()))) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(Ok(Err(e))) => Err(match e {
            ConfChangeError::AlreadyMember(_)
            | ConfChangeError::AlreadyVoter(_)
            | ConfChangeError::Removed(_)
            | ConfChangeError::Unsafe(_)
            | ConfChangeError::Pending => ApiError::Conflict(e.to_string()),
            ConfChangeError::NotMember(_) | ConfChangeError::NotLearner(_) => {
                ApiError::NotFound(e.to_string())
            }
            ConfChangeError::Dropped(_) => ApiError::Unavailable(e.to_string()),
            ConfChangeError::NotLeader { url, .. } if may_forward => {
                return forward(st, &url, body, deadline).await;
            }
            ConfChangeError::NotLeader { .. } => {
                ApiError::Unavailable("not applied: leadership changed while forwarding".into())
            }
        }),
        Ok(Err(_)) => Err(ApiError::Unavailable(
            "outcome unknown: node stopped before applying".into(),
        )),
        Err(_) => Err(ApiError::Unavailable(
            "outcome unknown: not applied within the timeout".into(),
        )),
    }
}

/// Relays a membership change to the leader and its answer back to the client.
async fn forward(
    st: &ApiState,
    leader_url: &str,
    body: Vec<u8>,
    deadline: Instant,
) -> Result<Response, ApiError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let (status, text) = st
        .peers
        .post(&format!("{leader_url}/conf-change"), &[], body, remaining)
        .await
        .map_err(|_| ApiError::Unavailable("outcome unknown: the leader did not answer".into()))?;
    Ok((status, text).into_response())
}

/// `(applied index, hash)` of the application state, for `/status`.
pub type Digest = Arc<dyn Fn() -> (u64, u64) + Send + Sync>;

#[derive(Clone)]
struct StatusState {
    status: Arc<Mutex<NodeStatus>>,
    digest: Option<Digest>,
}

/// `/status`, `/health` and `/metrics`, merged into the peer listener's router.
pub fn status_router(status: Arc<Mutex<NodeStatus>>, digest: Option<Digest>) -> Router {
    Router::new()
        .route("/status", get(status_json))
        .route("/health", get(health))
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .with_state(StatusState { status, digest })
}

async fn status_json(State(s): State<StatusState>) -> Response {
    let mut st = s.status.lock().expect("status lock").clone();
    if let Some(digest) = &s.digest {
        let (applied, hash) = digest();
        st.kv_applied = Some(applied);
        st.kv_hash = Some(format!("{hash:016x}"));
    }
    axum::Json(st).into_response()
}

async fn health(State(s): State<StatusState>) -> (StatusCode, &'static str) {
    let st = s.status.lock().expect("status lock").clone();
    if st.leader == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "no leader\n")
    } else if st.applied < st.commit {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "applying committed entries\n",
        )
    } else {
        (StatusCode::OK, "ok\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learner_query() {
        assert!(!keep_learner(None).unwrap());
        assert!(!keep_learner(Some("x=1&learner=false")).unwrap());
        assert!(keep_learner(Some("x=1&learner=true")).unwrap());
        assert!(keep_learner(Some("learner=yes")).is_err());
    }

    #[test]
    fn node_ids() {
        assert_eq!(parse_node_id("/4").unwrap(), 4);
        assert_eq!(parse_node_id("/65535").unwrap(), 65535);
        for bad in ["/0", "/-1", "/x", "/4/5", "/", "/1.5", "/65536"] {
            assert!(parse_node_id(bad).is_err(), "{bad}");
        }
    }
}
