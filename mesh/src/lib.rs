//! The tandem mesh: a libp2p swarm (TCP + noise + yamux and QUIC, or TCP behind a pre-shared key)
//! on which nodes find each other (bootstrap addresses, mDNS, Kademlia), advertise what they can do
//! and how loaded they are (gossipsub), take roles, and open direct streams to each other for
//! requests. Knows nothing of GPUs or models beyond what the ads say: payloads are opaque.

mod cluster;
mod control;
mod error;
mod frames;
mod handshakes;
mod hidden;
mod identity;
mod infer;
mod kv;
mod lan;
mod length;
mod messages;
mod network;
mod placement;
mod refusals;
mod roles;
mod secret;
mod weights;

pub use cluster::{
    ChainSnapshot, ClusterSnapshot, ClusterView, Link, MeshEvent, MeshEventKind, NodeSnapshot, NodeState, StageSnapshot, short, unix_ms,
};
pub use control::{CONTROL_LIMITS, CONTROL_PROTOCOL, ControlCommand, ControlError, ControlGate, ControlReply, ControlRequest};
pub use error::{Error, Result};
pub use frames::{FrameError, FramedStream, Limits as FrameLimits};
pub use hidden::{
    HIDDEN_LIMITS, HIDDEN_PROTOCOL, Handoff, HiddenError, HiddenOpen, HiddenOutput, HiddenReply, HiddenShape, HiddenStep, MAX_STEP_TOKENS,
    StageOut, WireSampling, check_wire_dtype, is_hidden_frame, max_frame_tokens,
};
pub use identity::{IdentityLock, claim_identity, load_or_create_identity};
pub use infer::{FinishReason, HEARTBEAT, INFER_LIMITS, INFER_PROTOCOL, InferEndpoint, InferReply, InferRequest, InferResume};
pub use kv::{
    DTYPE_F16, DTYPE_F32, KV_LIMITS, KV_PROTOCOL, KvChunk, KvError, KvOpen, KvProgress, KvReply, KvSampling, KvShape, MAX_CHUNK_TOKENS,
    encode_chunk, fingerprint_number, hidden_share, is_chunk,
};
pub use length::LengthPredictor;
pub use messages::{
    AdapterAd, CapabilityAd, GossipMessage, HiddenLinkBytes, KvLinkRate, LoadReport, MAX_GOSSIP_BYTES, MAX_TRACES, ModelAd,
    PROTOCOL_VERSION, RequestTrace, Speed,
};
pub use network::{Mesh, MeshConfig, MeshHandle, StreamGate, StreamPermit};
pub use placement::{
    Chain, DEFAULT_LINK_BYTES_PER_S, Placement, PlacementMode, PlacementRequest, PrefillNode, Stage, chains, place, prefill_tokens_per_s,
    span_lacked_most,
};
pub use roles::{Role, RoleBalancer, RoleInput, RoleSetting, auto_role};
pub use secret::{MeshSecret, generate_secret};
pub use weights::{
    ChunkFrameError, MAX_CHUNKS_PER_ASK, RateLimit, WEIGHTS_LIMITS, WEIGHTS_PROTOCOL, WEIGHTS_VERSION, WeightsAsk, WeightsReply,
    decode_weights_chunk, encode_weights_chunk,
};

pub use libp2p::Stream;
pub use libp2p::identity::{Keypair, ParseError as PeerIdError};
pub use libp2p::multiaddr::Error as MultiaddrError;
pub use libp2p::{Multiaddr, PeerId, StreamProtocol};
