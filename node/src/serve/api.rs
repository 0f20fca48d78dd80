//! The HTTP edge of the OpenAI-compatible API: `ApiError` (OpenAI's error shape, and the status
//! and code of each `ServeError`, for clients and for entry nodes), and the endpoints: what
//! placement needs is read from the body, the request is placed (`X-Tandem-Placement` may pin it
//! here) and dispatched, and its pieces become one JSON body or SSE chunks (`respond`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tandem_mesh::{FinishReason, InferReply};
use tokio::sync::mpsc;

use super::App;
use super::error::ServeError;
use super::node_mesh::mesh_models;
use super::openai::{ChatRequest, CompletionRequest, Endpoint, PromptInput, chat_messages};
use super::placement::{RequestShape, plan};
use super::request::Piece;
use super::routing::dispatch;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), code: None, param: None }
    }

    fn bad(message: impl Into<String>, param: &'static str) -> Self {
        ApiError { param: Some(param), ..Self::new(StatusCode::BAD_REQUEST, message) }
    }

    fn body(&self) -> serde_json::Value {
        // OpenAI's types: every client error but the rate limit is the request's fault.
        let kind = match self.status.as_u16() {
            429 => "rate_limit_error",
            503 => "service_unavailable",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        json!({ "error": { "message": self.message, "type": kind, "param": self.param, "code": self.code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        // Keeps axum's status: 400 for bad JSON, 413 for a body over the limit, 415 without JSON.
        ApiError::new(e.status(), e.body_text())
    }
}

/// Maps a refusal from the core to a status code.
fn refused(e: tandem_core::Error) -> ApiError {
    use tandem_core::Error as E;
    match e {
        E::Overloaded { .. } => ApiError { code: Some("overloaded"), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()) },
        E::ContextOverflow { .. } => ApiError { code: Some("context_length_exceeded"), ..ApiError::bad(e.to_string(), "max_tokens") },
        E::InvalidRequest(_) | E::TokenOutOfRange { .. } => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A failure another node reported, in OpenAI's terms: its status if it is an error status,
/// and its code and param only where they are among OpenAI's (a small fixed set; anything else
/// a peer says is dropped).
fn peer_failed(status: u16, message: String, code: Option<String>, param: Option<String>) -> ApiError {
    let status =
        StatusCode::from_u16(status).ok().filter(|s| s.is_client_error() || s.is_server_error()).unwrap_or(StatusCode::BAD_GATEWAY);
    let known = |s: Option<String>, set: &[&'static str]| s.and_then(|s| set.iter().copied().find(|k| *k == s));
    ApiError {
        code: known(code, &["overloaded", "context_length_exceeded", "model_not_found", "fingerprint_mismatch"]),
        param: known(param, &["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "n", "logprobs"]),
        ..ApiError::new(status, message)
    }
}

/// Each serve error's status and OpenAI code.
impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        use ServeError as E;
        let message = e.to_string();
        match e {
            E::Body(_) | E::Version(_) | E::PrefillPeer(_) | E::TooManyResumed => ApiError::new(StatusCode::BAD_REQUEST, message),
            E::Param { param, .. } => ApiError::bad(message, param),
            E::WrongModel { .. } => {
                ApiError { code: Some("model_not_found"), param: Some("model"), ..ApiError::new(StatusCode::NOT_FOUND, message) }
            }
            E::Refused(e) => refused(e),
            E::Rejected { overloaded: true, .. } => {
                ApiError { code: Some("overloaded"), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, message) }
            }
            E::Rejected { overloaded: false, .. } => ApiError::new(StatusCode::BAD_REQUEST, message),
            E::Poisoned | E::RoleChange(_) | E::Text(_) | E::Worker(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message),
            E::Observer | E::Loading | E::ShuttingDown | E::LoadFailed(_) | E::NotTaking | E::NoNode(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
            }
            E::NoModelForRole => ApiError::new(StatusCode::CONFLICT, message),
            E::NotServed(_) => ApiError { code: Some("model_not_found"), ..ApiError::new(StatusCode::NOT_FOUND, message) },
            E::Fingerprint { .. } => ApiError { code: Some("fingerprint_mismatch"), ..ApiError::new(StatusCode::CONFLICT, message) },
            E::Peer { status, message, code, param } => peer_failed(status, message, code, param),
            E::PeerTooMuchText { .. } | E::PeerProtocol { .. } | E::PeerNoResult(_) => ApiError::new(StatusCode::BAD_GATEWAY, message),
        }
    }
}

/// A failure for the entry node, which returns it to its client as its own.
pub fn failure_reply(e: ServeError) -> InferReply {
    let e = ApiError::from(e);
    InferReply::Failed { status: e.status.as_u16(), message: e.message, code: e.code.map(Into::into), param: e.param.map(Into::into) }
}

/// How the response is shaped, and what placement needs, read from the body without a model.
struct Shape {
    stream: bool,
    include_usage: bool,
    request: RequestShape,
}

fn shape(endpoint: Endpoint, body: &serde_json::Value) -> Result<Shape, ServeError> {
    let hash = |s: &str| xxhash_rust::xxh3::xxh3_64(s.as_bytes());
    let (fields, chars, opening) = match endpoint {
        Endpoint::Completions => {
            let req: CompletionRequest = serde_json::from_value(body.clone()).map_err(ServeError::Body)?;
            let (chars, opening) = match &req.prompt {
                PromptInput::Text(t) => (t.len(), t.chars().take(512).collect::<String>()),
                PromptInput::Texts(v) => {
                    (v.iter().map(String::len).sum(), v.first().map(|t| t.chars().take(512).collect()).unwrap_or_default())
                }
                PromptInput::Tokens(ids) => (ids.len() * 4, format!("{:?}", &ids[..ids.len().min(128)])),
            };
            (req.fields, chars, opening)
        }
        Endpoint::Chat => {
            let req: ChatRequest = serde_json::from_value(body.clone()).map_err(ServeError::Body)?;
            let messages = chat_messages(req.messages);
            let chars = messages.iter().map(|m| m.content.len() + 8).sum();
            // A conversation is known by its system prompt and first user turn.
            let opening: String =
                messages.iter().take_while(|m| m.role != "assistant").map(|m| format!("{}:{}\n", m.role, m.content)).collect();
            (req.fields, chars, opening)
        }
    };
    Ok(Shape {
        stream: fields.stream,
        include_usage: fields.stream_options.as_ref().is_some_and(|o| o.include_usage),
        request: RequestShape {
            affinity_key: hash(&format!("{}\n{opening}", fields.model)),
            max_tokens: fields
                .max_completion_tokens
                .or(fields.max_tokens)
                .and_then(|n| usize::try_from(n).ok())
                .or((endpoint == Endpoint::Completions).then_some(16)),
            model: fields.model,
            prompt_tokens: chars / 4 + 1,
        },
    })
}

pub async fn completions(
    State(app): State<Arc<App>>,
    headers: axum::http::HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    handle(app, Endpoint::Completions, &headers, body).await
}

pub async fn chat_completions(
    State(app): State<Arc<App>>,
    headers: axum::http::HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    handle(app, Endpoint::Chat, &headers, body).await
}

/// The header that pins a request to the node it was sent to (`X-Tandem-Placement: local`): to
/// try this node's own GPU, as the desktop app's chat does.
pub const PLACEMENT_HEADER: &str = "x-tandem-placement";

/// Places the request on the best node of the mesh (this one or a peer) and answers with its
/// output.
async fn handle(
    app: Arc<App>,
    endpoint: Endpoint,
    headers: &axum::http::HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let local = match headers.get(PLACEMENT_HEADER).map(|v| v.to_str().unwrap_or_default()) {
        None | Some("mesh") => false,
        Some("local") => true,
        Some(other) => {
            return ApiError::new(StatusCode::BAD_REQUEST, format!("{PLACEMENT_HEADER}: `{other}` is neither `local` nor `mesh`"))
                .into_response();
        }
    };
    let result = async {
        let Json(body) = body?;
        let shape = shape(endpoint, &body)?;
        let mut candidates = plan(&app, &shape.request, &[]);
        if local {
            candidates.retain(|p| p.is_self && p.prefill.is_none());
        }
        if candidates.is_empty() {
            return Err(nobody_serves(&app, &shape.request.model));
        }
        let model = shape.request.model.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(dispatch(app.clone(), endpoint, body, shape.request, candidates, tx));
        Ok::<_, ApiError>(respond(endpoint, model, shape.stream, shape.include_usage, rx).await)
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Why no node can take a request for `model`.
fn nobody_serves(app: &App, model: &str) -> ApiError {
    if model == app.model_id {
        // Ours, but not now: loading, failed, draining or shutting down.
        if let Err(e) = app.loaded() {
            return e.into();
        }
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is not taking requests now (role change or shutdown) and no other node serves the model",
        );
    }
    let models = mesh_models(app);
    ApiError {
        code: Some("model_not_found"),
        param: Some("model"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model `{model}` does not exist: no node in the mesh serves it (served: {models:?})"),
        )
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn response_id(endpoint: Endpoint) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    format!("{prefix}-{:x}{n:04x}", now_secs())
}

/// The response from a generation's pieces: one JSON body, or SSE chunks. Submission errors (429,
/// 400) must come back as statuses, so the first piece is awaited before any response is chosen.
async fn respond(endpoint: Endpoint, model: String, stream: bool, include_usage: bool, mut rx: mpsc::Receiver<Piece>) -> Response {
    let id = response_id(endpoint);
    let created = now_secs();
    if !stream {
        let mut text = String::new();
        while let Some(piece) = rx.recv().await {
            match piece {
                Piece::Text(t) => text.push_str(&t),
                // The entry node's dispatch consumes these; they never reach a client.
                Piece::Token(_) | Piece::Moved { .. } => {}
                Piece::Failed(e) => return ApiError::from(e).into_response(),
                Piece::Done { finish, usage } => {
                    let body = match endpoint {
                        Endpoint::Completions => json!({
                            "id": id, "object": "text_completion", "created": created, "model": model,
                            "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }],
                            "usage": usage,
                        }),
                        Endpoint::Chat => json!({
                            "id": id, "object": "chat.completion", "created": created, "model": model,
                            "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null, "finish_reason": finish }],
                            "usage": usage,
                        }),
                    };
                    return Json(body).into_response();
                }
            }
        }
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the generation ended without a result").into_response();
    }
    let first = match rx.recv().await {
        Some(Piece::Failed(e)) => return ApiError::from(e).into_response(),
        other => other,
    };
    let chunk = move |text: Option<&str>, finish: Option<FinishReason>, first: bool| -> serde_json::Value {
        match endpoint {
            Endpoint::Completions => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish }],
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
                })
            }
        }
    };
    let (sse_tx, sse_rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: serde_json::Value| SseEvent::default().data(v.to_string());
        let mut first_chunk = true;
        let mut next = first;
        while let Some(piece) = next {
            let event = match piece {
                Piece::Token(_) | Piece::Moved { .. } => {
                    next = rx.recv().await;
                    continue;
                }
                Piece::Text(t) => {
                    let e = send(chunk(Some(&t), None, first_chunk));
                    first_chunk = false;
                    e
                }
                Piece::Done { finish, usage } => {
                    let mut done = chunk(None, Some(finish), first_chunk);
                    if include_usage {
                        if sse_tx.send(Ok(send(done.take()))).await.is_err() {
                            return;
                        }
                        let mut u = chunk(None, None, false);
                        u["choices"] = json!([]);
                        u["usage"] = json!(usage);
                        done = u;
                    }
                    if sse_tx.send(Ok(send(done))).await.is_err() {
                        return;
                    }
                    let _ = sse_tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
                Piece::Failed(e) => {
                    let _ = sse_tx.send(Ok(send(ApiError::from(e).body()))).await;
                    let _ = sse_tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
            };
            // A send error means the client left: dropping `rx` cancels the request.
            if sse_tx.send(Ok(event)).await.is_err() {
                return;
            }
            next = rx.recv().await;
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(sse_rx)).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_errors_keep_their_statuses_codes_and_messages() {
        use tandem_core::Error as Core;
        let cases = [
            (ServeError::param("top_p", "top_p must be in (0, 1], got 2"), 400, None, Some("top_p")),
            (ServeError::WrongModel { asked: "a".into(), served: "b".into() }, 404, Some("model_not_found"), Some("model")),
            (ServeError::Refused(Core::Overloaded { waiting: 3 }), 429, Some("overloaded"), None),
            (
                ServeError::Refused(Core::ContextOverflow { tokens: 1, max_new: 2, context: 2 }),
                400,
                Some("context_length_exceeded"),
                Some("max_tokens"),
            ),
            (ServeError::Rejected { overloaded: true, reason: "full".into() }, 429, Some("overloaded"), None),
            (ServeError::Worker("lost".into()), 500, None, None),
            (ServeError::Loading, 503, None, None),
            (ServeError::NoModelForRole, 409, None, None),
            (ServeError::Fingerprint { expected: "a".into(), have: "b".into() }, 409, Some("fingerprint_mismatch"), None),
            (ServeError::PeerNoResult(tandem_mesh::PeerId::random()), 502, None, None),
            (ServeError::NoNode("x".into()), 503, None, None),
        ];
        for (e, status, code, param) in cases {
            let message = e.to_string();
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.code, a.param, a.message), (status, code, param, message));
        }
        // What a peer reports keeps an error status and OpenAI's codes and params, nothing else.
        let peer = ServeError::Peer { status: 200, message: "m".into(), code: Some("x".into()), param: Some("model".into()) };
        let a = ApiError::from(peer);
        assert_eq!((a.status.as_u16(), a.code, a.param, a.message.as_str()), (502, None, Some("model"), "m"));
        let reply = failure_reply(ServeError::NotServed("m".into()));
        let want =
            InferReply::Failed { status: 404, message: "this node serves `m`".into(), code: Some("model_not_found".into()), param: None };
        assert_eq!(reply, want);
    }
}
