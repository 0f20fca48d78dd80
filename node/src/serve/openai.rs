//! The OpenAI-compatible endpoints: request and response shapes, validation, and the stream of a
//! generation from scheduler events to text (stop strings included) to JSON or SSE chunks.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tandem_core::scheduler::{self, Event, Request, Start};
use tandem_core::{ChatMessage, SamplingParams};
use tokio::sync::mpsc;

use super::error::ServeError;
use super::mesh::RequestShape;
use super::{App, Loaded};
use tandem_mesh::{FinishReason, InferEndpoint, InferReply};

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

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What both endpoints accept beyond their prompt.
#[derive(Deserialize, Debug)]
pub struct GenerationFields {
    pub model: String,
    pub max_tokens: Option<i64>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; as in vLLM and llama-server.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<StopInput>,
    /// Not in OpenAI's API; as in vLLM.
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    pub logprobs: Option<serde_json::Value>,
    /// Not in OpenAI's API; as in vLLM: keep generating past end-of-sequence (for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    #[serde(flatten)]
    pub fields: GenerationFields,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequestMessage {
    pub role: String,
    pub content: Option<MessageContent>,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub messages: Vec<ChatRequestMessage>,
    #[serde(flatten)]
    pub fields: GenerationFields,
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl From<Endpoint> for InferEndpoint {
    fn from(e: Endpoint) -> Self {
        match e {
            Endpoint::Completions => InferEndpoint::Completions,
            Endpoint::Chat => InferEndpoint::Chat,
        }
    }
}

impl From<InferEndpoint> for Endpoint {
    fn from(e: InferEndpoint) -> Self {
        match e {
            InferEndpoint::Completions => Endpoint::Completions,
            InferEndpoint::Chat => Endpoint::Chat,
        }
    }
}

/// A checked request, ready for the scheduler.
pub struct Generation {
    request: Request,
    stops: Vec<String>,
}

fn check_fields(
    f: &GenerationFields,
    loaded: &Loaded,
    prompt_len: usize,
    endpoint: Endpoint,
) -> Result<(Request, Vec<String>), ServeError> {
    if f.model != loaded.model_id {
        return Err(ServeError::WrongModel { asked: f.model.clone(), served: loaded.model_id.clone() });
    }
    if f.n.is_some_and(|n| n != 1) {
        return Err(ServeError::param("n", "only n = 1 is supported"));
    }
    if f.logprobs.as_ref().is_some_and(|v| !v.is_null() && v != &json!(false)) {
        return Err(ServeError::param("logprobs", "logprobs are not supported"));
    }
    let context = loaded.worker.limits().context_length;
    let room = context.saturating_sub(prompt_len);
    let max_tokens = match f.max_completion_tokens.or(f.max_tokens) {
        Some(n) if n < 1 => return Err(ServeError::param("max_tokens", format!("max_tokens must be at least 1, got {n}"))),
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        // OpenAI's legacy default for completions; chat runs to the end of the context.
        None if endpoint == Endpoint::Completions => 16.min(room.max(1)),
        None => room.max(1),
    };
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ServeError::param("temperature", format!("temperature must be between 0 and 2, got {temperature}")));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ServeError::param("top_p", format!("top_p must be in (0, 1], got {top_p}")));
    }
    let top_k = match f.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => u32::try_from(k).unwrap_or(u32::MAX),
        Some(k) => return Err(ServeError::param("top_k", format!("top_k must be -1 (off) or at least 0, got {k}"))),
    };
    let stops = match &f.stop {
        None => Vec::new(),
        Some(StopInput::One(s)) => vec![s.clone()],
        Some(StopInput::Many(v)) => v.clone(),
    };
    if stops.len() > 4 || stops.iter().any(String::is_empty) {
        return Err(ServeError::param("stop", "stop takes at most 4 non-empty strings"));
    }
    let mut stop_ids = if f.ignore_eos { Vec::new() } else { loaded.tokenizer.stop_ids.clone() };
    stop_ids.extend(f.stop_token_ids.iter().flatten());
    // Without a seed, sampling still needs one; temperature 0 ignores it.
    let seed = f.seed.unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0));
    let sampling = SamplingParams { temperature, top_k, top_p, seed };
    Ok((Request { prompt: Vec::new(), max_tokens, sampling, stop_ids, resumed: Vec::new() }, stops))
}

fn prepare(loaded: &Loaded, fields: &GenerationFields, prompt: Vec<u32>, endpoint: Endpoint) -> Result<Generation, ServeError> {
    // Context, vocabulary and cache limits are checked by the worker at submission.
    let (mut request, stops) = check_fields(fields, loaded, prompt.len(), endpoint)?;
    request.prompt = prompt;
    Ok(Generation { request, stops })
}

fn chat_messages(messages: Vec<ChatRequestMessage>) -> Vec<ChatMessage> {
    messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    parts.into_iter().filter(|p| p.kind == "text").filter_map(|p| p.text).collect::<Vec<_>>().join("")
                }
            };
            ChatMessage { role: m.role, content }
        })
        .collect()
}

/// Checks and tokenizes a request body for this node's model: the same path for requests from
/// its own HTTP clients and from other nodes.
pub fn generation(loaded: &Loaded, endpoint: Endpoint, body: serde_json::Value) -> Result<Generation, ServeError> {
    let tok = &loaded.tokenizer;
    match endpoint {
        Endpoint::Completions => {
            let req: CompletionRequest = serde_json::from_value(body).map_err(ServeError::Body)?;
            let prompt = match req.prompt {
                PromptInput::Text(t) => tok.encode_prompt(&t, true),
                PromptInput::Texts(v) if v.len() == 1 => tok.encode_prompt(&v[0], true),
                PromptInput::Texts(v) if v.is_empty() => return Err(ServeError::param("prompt", "prompt must not be empty")),
                PromptInput::Texts(_) => return Err(ServeError::param("prompt", "only one prompt per request is supported")),
                PromptInput::Tokens(ids) => Ok(ids),
            }
            .map_err(|e| ServeError::param("prompt", e.to_string()))?;
            prepare(loaded, &req.fields, prompt, endpoint)
        }
        Endpoint::Chat => {
            let req: ChatRequest = serde_json::from_value(body).map_err(ServeError::Body)?;
            if req.messages.is_empty() {
                return Err(ServeError::param("messages", "messages must not be empty"));
            }
            let text =
                tok.apply_chat_template(&chat_messages(req.messages), true).map_err(|e| ServeError::param("messages", e.to_string()))?;
            let prompt = tok.encode_prompt(&text, true).map_err(|e| ServeError::param("messages", e.to_string()))?;
            prepare(loaded, &req.fields, prompt, endpoint)
        }
    }
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
        let mut candidates = super::mesh::plan(&app, &shape.request, &[]);
        if local {
            candidates.retain(|p| p.is_self && p.prefill.is_none());
        }
        if candidates.is_empty() {
            return Err(nobody_serves(&app, &shape.request.model));
        }
        let model = shape.request.model.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(super::mesh::dispatch(app.clone(), endpoint, body, shape.request, candidates, tx));
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
    let models = super::mesh::mesh_models(app);
    ApiError {
        code: Some("model_not_found"),
        param: Some("model"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model `{model}` does not exist: no node in the mesh serves it (served: {models:?})"),
        )
    }
}

/// Delivers scheduler events to the request's task. Unbounded, yet bounded in practice: a
/// request produces at most `max_tokens` + 1 events.
pub(super) struct ChannelSink(pub(super) mpsc::UnboundedSender<Event>);

impl tandem_core::scheduler::EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Cancels the request in the scheduler when dropped before it finished (client gone).
pub(super) struct CancelGuard {
    pub(super) worker: tandem_core::worker::WorkerHandle,
    pub(super) id: tandem_core::scheduler::RequestId,
    pub(super) finished: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.worker.cancel(self.id);
        }
    }
}

/// Holds back text that may be the start of a stop string, and cuts at the first stop string.
struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// Text that is safe to send now, and whether a stop string was found.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).rev().filter(|&n| s.is_char_boundary(n) && self.pending.ends_with(&s[..n])).take(1))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// One piece of output of a generation.
pub enum Piece {
    /// A generated token's id, before its text (the entry node keeps them to resume elsewhere).
    Token(u32),
    Text(String),
    Done {
        finish: FinishReason,
        usage: Usage,
    },
    Failed(ServeError),
    /// The request left its node (draining) and continues on `peer` from the K/V parked there
    /// under `ticket`, or, without them, anywhere from the tokens so far.
    Moved {
        peer: Option<tandem_mesh::PeerId>,
        ticket: Option<u64>,
    },
}

/// How a generation starts beyond its request.
#[derive(Default)]
pub struct Continue {
    /// It continues a request another node started: the client has these tokens and this much
    /// of their text, and K/V for them may be parked here.
    pub resume: Option<tandem_mesh::InferResume>,
    /// Prefill on this node and stream the K/V here (a split request).
    pub prefill: Option<tandem_mesh::PeerId>,
}

/// Tokens to text: the detokenizer and stop strings, holding back text a client already has.
struct TextOut<'a> {
    text: tandem_core::tokenizer::TokenTextStream<'a>,
    stops: StopMatcher,
    stop_ids: Vec<u32>,
    /// Bytes of text produced so far, and how many of them the client has already.
    produced: usize,
    skip: usize,
}

impl TextOut<'_> {
    /// The text to send for one more token, and whether a stop string ended the generation.
    fn push(&mut self, id: u32) -> Result<(String, bool), ServeError> {
        if self.stop_ids.contains(&id) {
            return Ok((String::new(), false));
        }
        let piece = self.text.push(id).map_err(ServeError::Text)?.unwrap_or_default();
        let (safe, stopped) = self.stops.push(&piece);
        Ok((self.unsent(safe), stopped))
    }

    fn flush(&mut self) -> String {
        let rest = self.stops.flush();
        self.unsent(rest)
    }

    fn unsent(&mut self, text: String) -> String {
        let before = self.produced;
        self.produced += text.len();
        if self.produced <= self.skip {
            return String::new();
        }
        let from = self.skip.saturating_sub(before);
        match text.get(from..) {
            Some(rest) => rest.to_string(),
            None => {
                // Cannot happen when the text is regenerated from the same tokens.
                tracing::warn!(from, "resumed text does not split at a character: sending from the next one");
                text.char_indices().find(|&(i, _)| i >= from).map(|(i, _)| text[i..].to_string()).unwrap_or_default()
            }
        }
    }
}

/// Sends one token's id (when the entry node has not seen it) and text. Some(whether a stop
/// string ended the generation), or None when the generation is over (receiver gone, or the
/// text failed and was reported).
async fn deliver(out: &mpsc::Sender<Piece>, text: &mut TextOut<'_>, id: u32, send_id: bool) -> Option<bool> {
    if send_id && out.send(Piece::Token(id)).await.is_err() {
        return None;
    }
    let (safe, stopped) = match text.push(id) {
        Ok(x) => x,
        Err(e) => {
            let _ = out.send(Piece::Failed(e)).await;
            return None;
        }
    };
    if !safe.is_empty() && out.send(Piece::Text(safe)).await.is_err() {
        return None;
    }
    Some(stopped)
}

/// Submits the request and turns its events into text pieces on `out`.
pub async fn drive(loaded: Arc<Loaded>, app: Arc<App>, g: Generation, out: mpsc::Sender<Piece>, cont: Continue) {
    let mut request = g.request;
    let prompt_tokens = request.prompt.len();
    let tok = loaded.tokenizer.clone();
    let mut text = TextOut {
        text: tok.decode_stream(true),
        stops: StopMatcher { stops: g.stops, pending: String::new() },
        stop_ids: request.stop_ids.clone(),
        produced: 0,
        skip: 0,
    };
    let arrival = std::time::Instant::now();
    let mut start = Start::Compute;
    // The K/V a remote prefill parked here, freed if this task ends before the request is in.
    let mut parked = None;
    // Tokens generated before this node took over: replayed silently, or announced (the first
    // token of a split request, which the client has not seen).
    let (mut replay, mut announce) = (Vec::new(), Vec::new());
    // When this node delivered its first new token, in ms from `arrival`.
    let mut first_at = None;
    let mut trace = tandem_mesh::RequestTrace {
        arrived_ms: tandem_mesh::unix_ms(),
        model: loaded.model_id.clone(),
        prompt_tokens: prompt_tokens as u64,
        ..Default::default()
    };
    if let Some(r) = cont.resume {
        app.metrics.kv.resumed_requests.inc();
        text.skip = usize::try_from(r.text_bytes).unwrap_or(usize::MAX);
        replay = r.tokens;
        start = r.ticket.map_or(Start::Compute, Start::Parked);
    } else if let Some(p) = cont.prefill {
        let asked = ms_since(arrival);
        let remote = tokio::select! {
            r = super::kv::prefill_remote(&app, &loaded, p, &request) => r,
            // The client left: dropping the transfer ends it on the prefill node too.
            () = out.closed() => return,
        };
        match remote {
            Ok(r) => {
                trace.prefill_peer = Some(p.to_string());
                trace.prefill = r.prefill.map(|t| t + asked);
                trace.kv = r.kv.map(|s| s.map(|t| t + asked));
                app.metrics.kv.split_requests.inc();
                announce.push(r.first);
                start = Start::Parked(r.ticket.id);
                parked = Some(r.ticket);
            }
            Err(e) => {
                // The prefill node failed or vanished: this node prefills instead.
                app.metrics.kv.split_fallbacks.inc();
                tracing::warn!(peer = %p, error = %e, "remote prefill failed: prefilling here");
                app.mesh.handle.update_view(|v| {
                    v.record(tandem_mesh::MeshEventKind::Rerouted, p, format!("prefill failed, done by the decode node: {e}"))
                });
            }
        }
    }
    let mut generated = 0;
    let done = |finish: FinishReason, generated: usize| Piece::Done {
        finish,
        usage: Usage { prompt_tokens, completion_tokens: generated, total_tokens: prompt_tokens + generated },
    };
    let mut ended = None;
    for (i, &id) in replay.iter().chain(&announce).enumerate() {
        generated += 1;
        let Some(stopped) = deliver(&out, &mut text, id, i >= replay.len()).await else { return };
        if i >= replay.len() {
            first_at.get_or_insert_with(|| ms_since(arrival));
        }
        if stopped || request.stop_ids.contains(&id) {
            ended = Some(FinishReason::Stop);
        } else if generated >= request.max_tokens {
            ended = Some(FinishReason::Length);
        }
        if ended.is_some() {
            break;
        }
    }
    if let Some(finish) = ended {
        // Finished already (the first token was the last): nothing for the scheduler; a
        // remote prefill's parked K/V is freed with `parked`.
        if let (Start::Parked(ticket), None) = (&start, &parked) {
            loaded.worker.discard(*ticket);
        }
        let rest = text.flush();
        if !rest.is_empty() {
            let _ = out.send(Piece::Text(rest)).await;
        }
        let _ = out.send(done(finish, generated)).await;
        return;
    }
    request.resumed = replay.into_iter().chain(announce).collect();
    let resumed = !request.resumed.is_empty();
    let (tx, mut rx) = mpsc::unbounded_channel();
    // From here the scheduler owns the parked K/V (and frees it if it refuses the request).
    if let Some(t) = parked {
        t.keep();
    }
    let id = match loaded.worker.submit_with(request, Box::new(ChannelSink(tx)), start) {
        Ok(id) => id,
        Err(e) if resumed && app.mesh.draining() => {
            // Caught by a drain between its prefill and its start: it continues elsewhere.
            tracing::info!(error = %e, "refused while draining: handing the request back");
            let _ = out.send(Piece::Moved { peer: None, ticket: None }).await;
            return;
        }
        Err(e) => {
            let _ = out.send(Piece::Failed(ServeError::Refused(e))).await;
            return;
        }
    };
    let mut guard = CancelGuard { worker: loaded.worker.clone(), id, finished: false };
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            () = out.closed() => return,
        };
        let Some(event) = event else { break };
        match event {
            Event::Token(id) => {
                generated += 1;
                first_at.get_or_insert_with(|| ms_since(arrival));
                let Some(stopped) = deliver(&out, &mut text, id, true).await else { return };
                if stopped {
                    let _ = out.send(done(FinishReason::Stop, generated)).await;
                    return;
                }
            }
            Event::Finished(reason, mut timings) => {
                guard.finished = true;
                if trace.prefill_peer.is_some() {
                    // A split request's first token came from the prefill node: its TTFT is
                    // measured here, not by the scheduler (which counts it as resumed).
                    timings.ttft = first_at.map(|ms| std::time::Duration::from_secs_f64(ms / 1e3));
                }
                app.metrics.observe(&timings);
                // All in this node's time from `arrival`: the scheduler's own clock starts only
                // when a split request's K/V has arrived.
                let now = ms_since(arrival);
                let first = first_at.unwrap_or(now);
                if trace.prefill_peer.is_none() {
                    trace.queue_ms = (timings.queued.as_secs_f64() * 1e3).min(first);
                    trace.prefill = [trace.queue_ms, first];
                }
                trace.decode = [first, now];
                trace.output_tokens = generated as u64;
                let rest = text.flush();
                if !rest.is_empty() {
                    let _ = out.send(Piece::Text(rest)).await;
                }
                let finish = match reason {
                    scheduler::FinishReason::Length => FinishReason::Length,
                    scheduler::FinishReason::Stop => FinishReason::Stop,
                    scheduler::FinishReason::Cancelled => FinishReason::Cancelled,
                };
                trace.outcome = finish.as_str().into();
                app.metrics.trace(trace);
                let _ = out.send(done(finish, generated)).await;
                return;
            }
            Event::Refused { overloaded: true, .. } if resumed && app.mesh.draining() => {
                guard.finished = true;
                let _ = out.send(Piece::Moved { peer: None, ticket: None }).await;
                return;
            }
            Event::Refused { overloaded, reason } => {
                guard.finished = true;
                let _ = out.send(Piece::Failed(ServeError::Rejected { overloaded, reason })).await;
                return;
            }
            Event::Detached { tokens, kv } => {
                // This node is draining: move the K/V to another decode node and tell the entry
                // node where the request continues.
                guard.finished = true;
                let now = ms_since(arrival);
                trace.decode = [first_at.unwrap_or(now), now];
                trace.output_tokens = generated as u64;
                trace.outcome = "moved".into();
                app.metrics.trace(trace);
                let moved = super::kv::migrate(&app, &loaded, &tokens, kv).await;
                let (peer, ticket) = moved.map_or((None, None), |(p, t)| (Some(p), Some(t)));
                let _ = out.send(Piece::Moved { peer, ticket }).await;
                return;
            }
            Event::Failed(msg) => {
                guard.finished = true;
                let _ = out.send(Piece::Failed(ServeError::Worker(msg))).await;
                return;
            }
        }
    }
}

fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
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
    use super::StopMatcher;

    #[test]
    fn stop_strings_cut_the_text_and_partial_matches_wait() {
        let mut m = StopMatcher { stops: vec!["\n\n".into(), "END".into()], pending: String::new() };
        assert_eq!(m.push("Hello"), ("Hello".into(), false));
        assert_eq!(m.push(" wor\n"), (" wor".into(), false), "a lone newline may start a stop");
        assert_eq!(m.push("ld E"), ("\nld ".into(), false));
        assert_eq!(m.push("ND tail"), (String::new(), true));
        let mut m = StopMatcher { stops: vec!["é!".into()], pending: String::new() };
        assert_eq!(m.push("café"), ("caf".into(), false));
        assert_eq!(m.flush(), "é");
    }
}
