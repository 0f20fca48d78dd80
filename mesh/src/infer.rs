//! `/tandem/infer/1`: a request placed on another node. The entry node sends one request frame
//! and its trailer; the serving node answers with `Accepted` (or `Failed`), the text as it is
//! generated, `Heartbeat`s while nothing else is due (so the entry node's read timeout only fires
//! on a dead or stalled peer), one `Done` or `Failed`, and its trailer.
//!
//! The request carries the client's OpenAI request body as it came: the entry node may have no
//! model (an observer) and so no tokenizer, and the serving node validates it exactly as if it
//! had come over its own HTTP API.

use std::time::Duration;

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::frames::Limits;

/// The protocol name of forwarded requests.
pub const INFER_PROTOCOL: StreamProtocol = StreamProtocol::new("/tandem/infer/1");

/// Bounds of an infer stream: requests may hold a long prompt; replies are small.
pub const INFER_LIMITS: Limits =
    Limits { max_frame: 8 << 20, read_timeout: Duration::from_secs(15), write_timeout: Duration::from_secs(15) };

/// How often a serving node speaks while it has nothing else to say.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// Which OpenAI endpoint the body is for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InferEndpoint {
    Completions,
    Chat,
}

/// A request for another node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InferRequest {
    pub v: u16,
    pub endpoint: InferEndpoint,
    pub model: String,
    /// The fingerprint the entry node expects, from the serving node's ad.
    pub fingerprint: String,
    /// The OpenAI request body.
    pub body: serde_json::Value,
    /// Continue a request another node started (it failed, or moved the request here).
    #[serde(default)]
    pub resume: Option<InferResume>,
    /// Prefill on this peer (its peer id) and stream the K/V here: a split request.
    #[serde(default)]
    pub prefill: Option<String>,
}

/// Where a resumed request stands: the client has every token in `tokens` and the first
/// `text_bytes` bytes of their text.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct InferResume {
    pub tokens: Vec<u32>,
    pub text_bytes: u64,
    /// The ticket of the K/V parked on the serving node for these tokens, if it was moved there.
    pub ticket: Option<u64>,
}

/// Why a generation ended, in OpenAI's words (`finish_reason`), on the wire as in its output.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// The request was cancelled.
    Cancelled,
    /// A stop token or stop string; also any reason this version does not know (serde takes
    /// only the last variant for that).
    #[serde(other)]
    Stop,
}

impl FinishReason {
    /// The name OpenAI gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What the serving node streams back.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InferReply {
    /// The request was checked and queued, by a node with this model fingerprint.
    Accepted {
        fingerprint: String,
    },
    /// Generated text, stop strings already applied.
    Text {
        text: String,
    },
    Heartbeat,
    /// Ids of generated tokens (before their text), so the entry node can resume the request
    /// elsewhere if this node fails.
    Tokens {
        ids: Vec<u32>,
    },
    /// The request left this node (it is draining) and continues on `peer`, whose parked K/V
    /// has `ticket`; without them, anywhere from the tokens so far.
    Moved {
        peer: Option<String>,
        ticket: Option<u64>,
    },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: u64,
        completion_tokens: u64,
    },
    /// An error in OpenAI's terms: the entry node returns it as its own.
    Failed {
        status: u16,
        message: String,
        code: Option<String>,
        param: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_messages_round_trip() {
        let req = InferRequest {
            v: crate::PROTOCOL_VERSION,
            endpoint: InferEndpoint::Chat,
            model: "m".into(),
            fingerprint: "f".into(),
            body: serde_json::json!({"model": "m", "messages": []}),
            resume: Some(InferResume { tokens: vec![1, 2], text_bytes: 5, ticket: Some(3) }),
            prefill: Some("peer".into()),
        };
        assert_eq!(serde_json::from_slice::<InferRequest>(&serde_json::to_vec(&req).expect("enc")).expect("dec"), req);
        for r in [
            InferReply::Accepted { fingerprint: "f".into() },
            InferReply::Text { text: "é".into() },
            InferReply::Heartbeat,
            InferReply::Tokens { ids: vec![7] },
            InferReply::Moved { peer: Some("p".into()), ticket: Some(1) },
            InferReply::Done { finish_reason: FinishReason::Length, prompt_tokens: 3, completion_tokens: 4 },
            InferReply::Failed { status: 404, message: "x".into(), code: Some("model_not_found".into()), param: None },
        ] {
            assert_eq!(serde_json::from_slice::<InferReply>(&serde_json::to_vec(&r).expect("enc")).expect("dec"), r);
        }
        assert!(serde_json::from_slice::<InferReply>(br#"{"type":"text"}"#).is_err());
    }

    #[test]
    fn finish_reasons_keep_their_openai_names() {
        for r in [FinishReason::Stop, FinishReason::Length, FinishReason::Cancelled] {
            assert_eq!(serde_json::to_value(r).expect("enc"), serde_json::json!(r.as_str()));
            assert_eq!(serde_json::from_value::<FinishReason>(serde_json::json!(r.as_str())).expect("dec"), r);
        }
        let done: InferReply =
            serde_json::from_str(r#"{"type":"done","finish_reason":"length","prompt_tokens":1,"completion_tokens":2}"#).expect("dec");
        assert_eq!(done, InferReply::Done { finish_reason: FinishReason::Length, prompt_tokens: 1, completion_tokens: 2 });
        // A reason this version does not know ends the request as a stop, as it always did.
        assert_eq!(serde_json::from_value::<FinishReason>(serde_json::json!("content_filter")).expect("dec"), FinishReason::Stop);
    }
}
