//! The receiving side of the peer transport: `POST /raft` (a batch, or a snapshot) and
//! `POST /raft/stream` (an upgraded stream of frames), both forwarding on `raft_msg_tx`, behind
//! the cluster-token and cluster-id check ([`require_cluster_token`]).

use super::*;

/// What the `/raft` handler needs.
#[derive(Clone)]
pub struct PeerState {
    pub raft_msg_tx: mpsc::Sender<Message>,
    /// Members removed from the cluster; their messages get 410 Gone.
    pub removed: Arc<RwLock<HashSet<u64>>>,
    /// `--cluster-token`: requests without it get 412.
    pub cluster_token: HeaderValue,
    /// Requests from another cluster get 412 (see [`crate::cluster_id`]).
    pub cluster_id: ClusterId,
    /// Ends the streams being received.
    pub stop: CancellationToken,
    pub logger: slog::Logger,
}

/// The `POST /raft` route (bodies up to [`MAX_RAFT_BODY`]) and the stream route.
pub fn router(state: PeerState) -> Router {
    let token = state.cluster_token.clone();
    let id = state.cluster_id.clone();
    let logger = state.logger.clone();
    let router = Router::new()
        .route("/raft", post(receive))
        .route(STREAM_PATH, post(receive_stream))
        .with_state(state);
    require_cluster_token(router, token, id, &logger)
}

#[derive(Clone)]
struct TokenCheck {
    token: HeaderValue,
    cluster_id: ClusterId,
    /// A misconfigured peer retries many times a second: log its mismatch now and then.
    warn: Arc<Throttle>,
    logger: slog::Logger,
}

/// Answers 412 to any request on `router`'s routes that does not carry `token` in
/// `X-Raftexample-Cluster`, or that carries another cluster id than `cluster_id` (learning
/// it if unknown), before its body is read, so its messages never reach raft. Routes added
/// to the returned router later are not checked (`/status` and friends).
pub fn require_cluster_token(
    router: Router,
    token: HeaderValue,
    cluster_id: ClusterId,
    logger: &slog::Logger,
) -> Router {
    let check = TokenCheck {
        token,
        cluster_id,
        warn: Arc::new(Throttle::new(Duration::from_secs(10))),
        logger: logger.clone(),
    };
    router.route_layer(axum::middleware::from_fn_with_state(check, check_token))
}

async fn check_token(State(check): State<TokenCheck>, req: Request, next: Next) -> Response {
    // The token names a cluster, it is not a password (TLS authenticates peers), so a plain
    // comparison will do.
    let got = req.headers().get(CLUSTER_HEADER);
    if got == Some(&check.token) {
        return match req.headers().get(cluster_id::HEADER) {
            None => next.run(req).await,
            Some(v) => match cluster_id::parse(v.as_bytes()) {
                Some(theirs) => check_cluster_id(&check, theirs, req, next).await,
                None => (StatusCode::BAD_REQUEST, "malformed cluster id\n").into_response(),
            },
        };
    }
    if check.warn.ready() {
        slog::warn!(check.logger, "rejected peer request with another cluster token";
            "path" => req.uri().path(),
            "token" => got.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            "from" => req.headers().get(FROM_HEADER)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()));
    }
    (
        StatusCode::PRECONDITION_FAILED,
        "cluster token mismatch: this request is for another cluster\n",
    )
        .into_response()
}

async fn check_cluster_id(check: &TokenCheck, theirs: u64, req: Request, next: Next) -> Response {
    match check.cluster_id.admit(theirs) {
        Admit::Same => {}
        Admit::Learned => {
            let id = check.cluster_id.clone();
            let stored = tokio::task::spawn_blocking(move || id.store()).await;
            slog::info!(check.logger, "learnt the cluster id from a peer";
                "cluster_id" => cluster_id::format(theirs),
                "from" => req.headers().get(FROM_HEADER)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()));
            match stored {
                Ok(Ok(())) => {}
                // Kept in memory; the next start learns it again.
                Ok(Err(e)) => slog::warn!(check.logger, "cannot store the cluster id";
                    "error" => %e),
                Err(e) => slog::warn!(check.logger, "cannot store the cluster id";
                    "error" => %e),
            }
        }
        Admit::Foreign { ours } => {
            if check.warn.ready() {
                slog::warn!(check.logger, "rejected peer request from another cluster";
                    "path" => req.uri().path(),
                    "cluster_id" => cluster_id::format(theirs),
                    "ours" => cluster_id::format(ours),
                    "from" => req.headers().get(FROM_HEADER)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()));
            }
            return (
                StatusCode::PRECONDITION_FAILED,
                "cluster id mismatch: this request is from a member of another cluster\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

async fn receive(State(st): State<PeerState>, req: Request) -> Response {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            // The rest of the body is not worth reading.
            [(header::CONNECTION, "close")],
            "raft message batch larger than any snapshot\n",
        )
            .into_response()
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_RAFT_BODY) {
        return too_large();
    }
    let started = Instant::now();
    let body = match read_body(req.into_body(), announced).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::Read) => {
            return (StatusCode::BAD_REQUEST, "cannot read the body\n").into_response()
        }
    };
    if body.len() >= LOG_BODY_ABOVE {
        slog::info!(st.logger, "received raft batch"; "bytes" => body.len(),
            "ms" => started.elapsed().as_millis() as u64);
    }
    receive_batch(st, body).await.into_response()
}

/// The most a body's Content-Length reserves before any of it has arrived.
const PREALLOCATE_AT_MOST: u64 = 1 << 30;

/// Bodies this large (a snapshot) are logged with the time they took to arrive.
const LOG_BODY_ABOVE: usize = 16 << 20;

enum BodyError {
    TooLarge,
    Read,
}

/// The body in one buffer, sized up front from its Content-Length: collecting its chunks first
/// and then joining them held a snapshot twice.
async fn read_body(body: axum::body::Body, announced: Option<u64>) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    // The announced length is only a hint for the allocation (capped: a peer announcing 4 GiB
    // and sending nothing should not get 4 GiB reserved); what arrives is checked.
    let hint = announced.unwrap_or(0).min(PREALLOCATE_AT_MOST);
    let mut buf = BytesMut::with_capacity(hint as usize);
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::Read)?;
        if let Ok(chunk) = frame.into_data() {
            if (buf.len() + chunk.len()) as u64 > MAX_RAFT_BODY {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&chunk);
        }
    }
    Ok(buf.freeze())
}

async fn receive_batch(st: PeerState, body: Bytes) -> (StatusCode, &'static str) {
    let msgs = match decode_batch(&body) {
        Ok(m) => m,
        Err(e) => {
            slog::warn!(st.logger, "rejected raft request"; "error" => %e, "bytes" => body.len());
            return (StatusCode::BAD_REQUEST, "undecodable raft message batch\n");
        }
    };
    {
        let removed = st.removed.read().expect("removed-set lock");
        if msgs.iter().any(|m| removed.contains(&m.from)) {
            return (StatusCode::GONE, "member removed from the cluster\n");
        }
    }
    for m in msgs {
        if st.raft_msg_tx.send(m).await.is_err() {
            return (StatusCode::SERVICE_UNAVAILABLE, "node is shutting down\n");
        }
    }
    (StatusCode::NO_CONTENT, "")
}

/// Accepts a message stream (see the module doc): checks who opens it, answers 101 and
/// reads frames on a task of its own until the peer closes it or this node stops.
async fn receive_stream(State(st): State<PeerState>, mut req: Request) -> Response {
    let from = match stream_from(req.headers()) {
        Ok(from) => from,
        Err(why) => return (StatusCode::BAD_REQUEST, why).into_response(),
    };
    if st.removed.read().expect("removed-set lock").contains(&from) {
        return (StatusCode::GONE, "member removed from the cluster\n").into_response();
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded\n",
        )
            .into_response();
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                let io = hyper_util::rt::TokioIo::new(up);
                if let Err(e) = read_stream(io, &st, from).await {
                    slog::warn!(st.logger, "closed a peer stream"; "from" => from, "error" => %e);
                }
            }
            Err(e) => {
                slog::debug!(st.logger, "stream upgrade failed"; "from" => from, "error" => %e)
            }
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, "upgrade"),
            (header::UPGRADE, STREAM_PROTOCOL),
        ],
    )
        .into_response()
}

fn stream_from(headers: &HeaderMap) -> Result<u64, &'static str> {
    let upgrade = headers.get(header::UPGRADE).map(HeaderValue::as_bytes);
    if upgrade != Some(STREAM_PROTOCOL.as_bytes()) {
        return Err("expected Upgrade: raftexample-raft/1\n");
    }
    headers
        .get(FROM_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .ok_or("missing or invalid X-Raftexample-From\n")
}

/// Forwards every frame of one stream to raft. Ends quietly when the peer closes the stream
/// or this node stops; an error is a malformed stream, or a message from a removed member.
async fn read_stream<R: AsyncRead + Unpin>(
    mut io: R,
    st: &PeerState,
    from: u64,
) -> Result<(), Error> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        while let Some(m) = next_frame(&mut buf)? {
            if m.from != from
                && st
                    .removed
                    .read()
                    .expect("removed-set lock")
                    .contains(&m.from)
            {
                return Err(Error::Status {
                    peer: m.from,
                    status: StatusCode::GONE,
                });
            }
            if st.raft_msg_tx.send(m).await.is_err() {
                return Ok(()); // raft stopped
            }
        }
        if st.removed.read().expect("removed-set lock").contains(&from) {
            // Closing makes the sender reopen, and the reopening gets 410.
            return Ok(());
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        let n = tokio::select! {
            n = io.read_buf(&mut buf) => n,
            _ = st.stop.cancelled() => return Ok(()),
        };
        match n {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(_) => return Ok(()), // the peer went away; it reopens when it comes back
        }
    }
}
