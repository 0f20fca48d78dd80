//! Why a request (or an operator's command) could not be served, in this node's terms. Only the
//! HTTP edge (`api.rs`) turns one into a status and OpenAI's error shape, for a client or, in
//! `InferReply::Failed`, for the entry node that returns it as its own.

use tandem_mesh::{PROTOCOL_VERSION, PeerId, PeerIdError};

/// What went wrong with a request, from its body to the last node that ran it.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    // The request's fault.
    /// The body is not a request for its endpoint.
    #[error("invalid request: {0}")]
    Body(serde_json::Error),
    /// A parameter out of range, unsupported, or that cannot be read (a prompt that does not
    /// tokenize), named for the client.
    #[error("{message}")]
    Param { param: &'static str, message: String },
    /// The request names a model other than this node's.
    #[error("the model `{asked}` does not exist; this server has `{served}`")]
    WrongModel { asked: String, served: String },
    /// The local worker refused it at submission (a full queue, a prompt too long for the
    /// context, a token outside the vocabulary).
    #[error(transparent)]
    Refused(tandem_core::Error),
    /// The scheduler turned it away after submission, with its reason.
    #[error("{reason}")]
    Rejected { overloaded: bool, reason: String },

    // This node.
    #[error("state lock poisoned")]
    Poisoned,
    #[error("this node is an observer and runs no model")]
    Observer,
    #[error("the model is still loading")]
    Loading,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the model failed to load: {0}")]
    LoadFailed(String),
    /// Draining, or in a role that serves no requests.
    #[error("this node is not taking requests now")]
    NotTaking,
    /// A role that serves, asked of a node without a model.
    #[error("this node runs no model, so it can only be an observer")]
    NoModelForRole,
    #[error("role change failed: {0}")]
    RoleChange(tokio::task::JoinError),
    /// The detokenizer failed on a generated token.
    #[error(transparent)]
    Text(tandem_core::Error),
    /// The GPU worker failed mid-generation, with its message.
    #[error("{0}")]
    Worker(String),

    // A request another node sent here.
    #[error("protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// A model this node does not serve.
    #[error("this node serves `{0}`")]
    NotServed(String),
    /// The model this node serves, with other weights than the entry node expects.
    #[error("expected model fingerprint {expected}, this node has {have}")]
    Fingerprint { expected: String, have: String },
    #[error("bad prefill peer: {0}")]
    PrefillPeer(PeerIdError),
    #[error("too many resumed tokens")]
    TooManyResumed,

    // Other nodes, seen from the entry node.
    /// A node failed the request in OpenAI's terms, as it sent them (the edge keeps only the
    /// statuses, codes and params it knows).
    #[error("{message}")]
    Peer { status: u16, message: String, code: Option<String>, param: Option<String> },
    #[error("node {peer} sent more than {limit} bytes of text")]
    PeerTooMuchText { peer: PeerId, limit: usize },
    /// A reply out of turn, as the node sent it.
    #[error("node {peer} broke the protocol: {reply}")]
    PeerProtocol { peer: PeerId, reply: String },
    #[error("node {0} ended without a result")]
    PeerNoResult(PeerId),
    /// Every node tried refused it or failed: the last reason.
    #[error("no node could take the request: {0}")]
    NoNode(String),
}

impl ServeError {
    pub fn param(param: &'static str, message: impl Into<String>) -> Self {
        ServeError::Param { param, message: message.into() }
    }
}
