//! OpenAI's request shapes (completions and chat) and their validation into a `Generation` for
//! this node's model: the same checks for requests from its own HTTP clients and from other
//! nodes.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tandem_core::scheduler::Request;
use tandem_core::{ChatMessage, SamplingParams};
use tandem_mesh::InferEndpoint;

use super::Loaded;
use super::error::ServeError;

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
    pub(super) request: Request,
    pub(super) stops: Vec<String>,
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

pub(super) fn chat_messages(messages: Vec<ChatRequestMessage>) -> Vec<ChatMessage> {
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
