//! `/tandem/kv/1`: K/V caches between nodes, layer by layer.
//!
//! A decode node opens the stream and sends one JSON `KvOpen`: either `Prefill` (to a prefill
//! node: compute this prompt and send me its K/V from position `skip`, which I hold already) or
//! `Park` (to another decode node: take these tokens' K/V, which follows, and hold it under a
//! ticket until their request arrives). K/V then flows one way only, as binary chunk frames, each
//! one layer's K and V for a range of positions; a prefill node ends with the first sampled token
//! (`First`), a receiving decode node answers `Parked` with its ticket. Every direction ends with
//! the framing's checked trailer.
//!
//! A chunk carries a versioned header (magic, version, session, model fingerprint, layer, token
//! range, dtype, layout, shape, payload length, checksum) and is checked against what the receiver
//! expects before anything is written into its cache.

use std::time::Duration;

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::frames::Limits;

pub const KV_PROTOCOL: StreamProtocol = StreamProtocol::new("/tandem/kv/1");

/// A chunk holds at most this many positions of one layer (a prefill step's chunk, or a slice of
/// a cached prefix), so frames stay well below the bound.
pub const MAX_CHUNK_TOKENS: usize = 512;

/// Bounds of a K/V stream. The read timeout also bounds how long a prefill may go without
/// finishing a layer.
pub const KV_LIMITS: Limits = Limits { max_frame: 24 << 20, read_timeout: Duration::from_secs(20), write_timeout: Duration::from_secs(20) };

const MAGIC: [u8; 4] = *b"TKV\x01";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 64;

/// Element types on the wire: the sender's cache dtype, so values arrive bit-exact and the decode
/// node's tokens equal the prefill node's whatever adapters compute them (placement pairs nodes
/// whose caches share a dtype).
pub const DTYPE_F32: u8 = 1;
pub const DTYPE_F16: u8 = 2;
/// Layout on the wire: `[kv_heads][tokens][head_dim]` for K, then the same for V.
pub const LAYOUT_HEADS_TOKENS_DIM: u8 = 1;

/// Why a chunk or K/V stream was rejected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KvError {
    #[error("K/V chunk of {0} bytes is shorter than its {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("not a K/V chunk (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("K/V format version {0}, this node reads {VERSION}")]
    Version(u16),
    #[error("K/V dtype {0} (f32 = {DTYPE_F32} and f16 = {DTYPE_F16} are defined)")]
    Dtype(u8),
    #[error("K/V layout {0} (only heads x tokens x head_dim = {LAYOUT_HEADS_TOKENS_DIM} is defined)")]
    Layout(u8),
    #[error("K/V for session {got:016x}, expected {want:016x}")]
    Session { want: u64, got: u64 },
    #[error("K/V of model {got:016x}, expected {want:016x}")]
    Fingerprint { want: u64, got: u64 },
    #[error("K/V shape {got_heads}x{got_dim} per position, the model has {want_heads}x{want_dim}")]
    Shape { want_heads: u32, want_dim: u32, got_heads: u32, got_dim: u32 },
    #[error("layer {layer} of a {layers}-layer model")]
    Layer { layer: u32, layers: u32 },
    #[error("layer {layer} is outside the span {span:?} this transfer is for")]
    OutsideSpan { layer: u32, span: [u32; 2] },
    #[error("{tokens} positions in one chunk (at most {MAX_CHUNK_TOKENS}, at least 1)")]
    Tokens { tokens: u32 },
    #[error("payload is {got} bytes, the header says {want}")]
    Length { want: usize, got: usize },
    #[error("payload checksum {got:016x}, the header says {want:016x}")]
    Checksum { want: u64, got: u64 },
    #[error("layer {layer} continues at position {want}, the chunk starts at {got} (out of order or duplicated)")]
    Order { layer: u32, want: usize, got: usize },
    #[error("positions {start}..{end} beyond the {limit} expected")]
    Range { start: usize, end: usize, limit: usize },
    #[error("the stream ended with layer {layer} at position {at} of {want}")]
    Incomplete { layer: usize, at: usize, want: usize },
}

/// The model fingerprint (16 hex digits, as advertised) as the header's number.
pub fn fingerprint_number(hex: &str) -> Option<u64> {
    u64::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 16)
}

/// One layer's K and V for positions `start..start + tokens`, in memory as `[tokens][heads][dim]`
/// (the cache's row order).
#[derive(Clone, Debug, PartialEq)]
pub struct KvChunk {
    pub session: u64,
    pub fingerprint: u64,
    pub layer: u32,
    pub start: u32,
    pub tokens: u32,
    pub heads: u32,
    pub head_dim: u32,
    /// How the values travel (`DTYPE_F32` or `DTYPE_F16`).
    pub dtype: u8,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Bytes a value of wire dtype `dtype` takes (a defined dtype).
fn value_bytes(dtype: u8) -> usize {
    if dtype == DTYPE_F16 { 2 } else { 4 }
}

/// What a receiver expects of every chunk of one transfer.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub session: u64,
    pub fingerprint: u64,
    pub layers: u32,
    pub heads: u32,
    pub head_dim: u32,
}

/// Whether a frame's payload is a K/V chunk (else it is a JSON message).
pub fn is_chunk(payload: &[u8]) -> bool {
    payload.len() >= 4 && payload[..4] == MAGIC
}

/// Appends `src` (`[tokens][heads][dim]` f32) to `out` as `[heads][tokens][dim]` little-endian
/// values of wire dtype `dtype` (f16 rounds to nearest, ties to even: exact for values an f16
/// cache held).
fn put_heads_first(out: &mut Vec<u8>, src: &[f32], tokens: usize, heads: usize, dim: usize, dtype: u8) {
    for h in 0..heads {
        for t in 0..tokens {
            let row = &src[(t * heads + h) * dim..(t * heads + h + 1) * dim];
            if dtype == DTYPE_F16 {
                row.iter().for_each(|&x| out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()));
            } else if cfg!(target_endian = "little") {
                out.extend_from_slice(bytemuck::cast_slice(row));
            } else {
                row.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
        }
    }
}

/// Reads `[heads][tokens][dim]` little-endian values of wire dtype `dtype` back into
/// `[tokens][heads][dim]` f32.
fn take_tokens_first(bytes: &[u8], tokens: usize, heads: usize, dim: usize, dtype: u8) -> Vec<f32> {
    let mut out = vec![0f32; tokens * heads * dim];
    let size = value_bytes(dtype);
    for h in 0..heads {
        for t in 0..tokens {
            let from = (h * tokens + t) * dim * size;
            let to = (t * heads + h) * dim;
            let src = &bytes[from..from + dim * size];
            if dtype == DTYPE_F16 {
                for (x, b) in out[to..to + dim].iter_mut().zip(src.chunks_exact(2)) {
                    *x = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            } else {
                for (x, b) in out[to..to + dim].iter_mut().zip(src.chunks_exact(4)) {
                    *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
    }
    out
}

impl KvChunk {
    fn values(&self) -> usize {
        (self.tokens * self.heads * self.head_dim) as usize
    }

    /// The chunk's frame: header, then K and V in the wire layout, little-endian `dtype` values.
    pub fn encode(&self) -> Vec<u8> {
        encode_chunk(self.session, self.fingerprint, self.layer, self.start, self.heads, self.head_dim, self.dtype, &self.k, &self.v)
    }

    /// Parses and checks a chunk frame against `want`; nothing is returned from a frame that
    /// does not match in every field.
    pub fn decode(frame: &[u8], want: &KvShape) -> Result<KvChunk, KvError> {
        if frame.len() < HEADER_LEN {
            return Err(KvError::Short(frame.len()));
        }
        let u16_at = |i: usize| u16::from_le_bytes([frame[i], frame[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(frame[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(frame[i..i + 8].try_into().unwrap_or_default());
        let magic: [u8; 4] = frame[..4].try_into().unwrap_or_default();
        if magic != MAGIC {
            return Err(KvError::Magic(magic));
        }
        let version = u16_at(4);
        if version != VERSION {
            return Err(KvError::Version(version));
        }
        let dtype = frame[6];
        if dtype != DTYPE_F32 && dtype != DTYPE_F16 {
            return Err(KvError::Dtype(dtype));
        }
        if frame[7] != LAYOUT_HEADS_TOKENS_DIM {
            return Err(KvError::Layout(frame[7]));
        }
        let (session, fingerprint) = (u64_at(8), u64_at(16));
        if session != want.session {
            return Err(KvError::Session { want: want.session, got: session });
        }
        if fingerprint != want.fingerprint {
            return Err(KvError::Fingerprint { want: want.fingerprint, got: fingerprint });
        }
        let (layer, start, tokens, heads, head_dim, len) = (u32_at(24), u32_at(28), u32_at(32), u32_at(36), u32_at(40), u32_at(44));
        if (heads, head_dim) != (want.heads, want.head_dim) {
            return Err(KvError::Shape { want_heads: want.heads, want_dim: want.head_dim, got_heads: heads, got_dim: head_dim });
        }
        if layer >= want.layers {
            return Err(KvError::Layer { layer, layers: want.layers });
        }
        if tokens == 0 || tokens as usize > MAX_CHUNK_TOKENS {
            return Err(KvError::Tokens { tokens });
        }
        let payload = &frame[HEADER_LEN..];
        let expect = tokens as usize * heads as usize * head_dim as usize * 2 * value_bytes(dtype);
        if len as usize != expect || payload.len() != expect {
            return Err(KvError::Length { want: expect, got: payload.len() });
        }
        let sum = xxhash_rust::xxh3::xxh3_64(payload);
        if sum != u64_at(48) {
            return Err(KvError::Checksum { want: u64_at(48), got: sum });
        }
        let (t, h, d) = (tokens as usize, heads as usize, head_dim as usize);
        let half = payload.len() / 2;
        Ok(KvChunk {
            session,
            fingerprint,
            layer,
            start,
            tokens,
            heads,
            head_dim,
            dtype,
            k: take_tokens_first(&payload[..half], t, h, d, dtype),
            v: take_tokens_first(&payload[half..], t, h, d, dtype),
        })
    }
}

/// A chunk's frame straight from slices of a layer's K and V (`[tokens][heads][head_dim]`), so
/// a sender copies each value once, as values of wire dtype `dtype` (`DTYPE_F32` or `DTYPE_F16`).
#[allow(clippy::too_many_arguments)]
pub fn encode_chunk(
    session: u64,
    fingerprint: u64,
    layer: u32,
    start: u32,
    heads: u32,
    head_dim: u32,
    dtype: u8,
    k: &[f32],
    v: &[f32],
) -> Vec<u8> {
    let (h, d) = (heads as usize, head_dim as usize);
    let tokens = k.len() / (h * d).max(1);
    let payload_len = tokens * h * d * 2 * value_bytes(dtype);
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(dtype);
    out.push(LAYOUT_HEADS_TOKENS_DIM);
    out.extend_from_slice(&session.to_le_bytes());
    out.extend_from_slice(&fingerprint.to_le_bytes());
    for x in [layer, start, tokens as u32, heads, head_dim, payload_len as u32] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.resize(HEADER_LEN, 0);
    put_heads_first(&mut out, k, tokens, h, d, dtype);
    put_heads_first(&mut out, v, tokens, h, d, dtype);
    let sum = xxhash_rust::xxh3::xxh3_64(&out[HEADER_LEN..]);
    out[48..56].copy_from_slice(&sum.to_le_bytes());
    out
}

/// A receiver's account of one transfer: every layer's positions must arrive in order, without
/// gaps or repeats, inside `from..to`, and all of them before the transfer counts as complete.
#[derive(Debug)]
pub struct KvProgress {
    /// The first layer expected: a stage of a chain takes only its span's.
    first: usize,
    next: Vec<usize>,
    to: usize,
    pub bytes: u64,
}

impl KvProgress {
    pub fn new(layers: usize, from: usize, to: usize) -> Self {
        Self::span(0..layers, from, to)
    }

    /// Progress of a transfer of the layers `layers` only.
    pub fn span(layers: std::ops::Range<usize>, from: usize, to: usize) -> Self {
        KvProgress { first: layers.start, next: vec![from; layers.len()], to, bytes: 0 }
    }

    /// Accepts the next chunk or says why not.
    pub fn accept(&mut self, c: &KvChunk) -> Result<(), KvError> {
        let (start, end) = (c.start as usize, c.start as usize + c.tokens as usize);
        let l = (c.layer as usize).wrapping_sub(self.first);
        let Some(&next) = self.next.get(l) else {
            let end = (self.first + self.next.len()) as u32;
            if self.first == 0 {
                return Err(KvError::Layer { layer: c.layer, layers: end });
            }
            return Err(KvError::OutsideSpan { layer: c.layer, span: [self.first as u32, end] });
        };
        if start != next {
            return Err(KvError::Order { layer: c.layer, want: next, got: start });
        }
        if end > self.to {
            return Err(KvError::Range { start, end, limit: self.to });
        }
        self.next[l] = end;
        // K and V as they travelled.
        self.bytes += (c.values() * 2 * value_bytes(c.dtype)) as u64;
        Ok(())
    }

    /// Whether every layer holds every position.
    pub fn check_complete(&self) -> Result<(), KvError> {
        match self.next.iter().enumerate().find(|&(_, &n)| n != self.to) {
            Some((layer, &at)) => Err(KvError::Incomplete { layer: self.first + layer, at, want: self.to }),
            None => Ok(()),
        }
    }

    /// Layers whose every position has arrived.
    pub fn layers_done(&self) -> usize {
        self.next.iter().filter(|&&n| n == self.to).count()
    }
}

/// Sampling settings a prefill node needs for the first token (the same as the decode node's).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct KvSampling {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
}

/// The opening message of a K/V stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvOpen {
    /// To a prefill node: compute `tokens` and send the K/V of positions `skip..`, then the first
    /// token sampled after them.
    Prefill { v: u16, session: u64, model: String, fingerprint: String, tokens: Vec<u32>, skip: usize, sampling: KvSampling },
    /// To a decode node: hold the K/V of `tokens` (which follows, from position 0) for a request
    /// that will continue here.
    Park { v: u16, session: u64, model: String, fingerprint: String, tokens: Vec<u32> },
    /// To a decode stage of a chain split into prefill and decode, from the prefill stage of the
    /// same span: K/V of the layers `layers` for positions `0..positions`, into the stage session
    /// `stage_session` (`/tandem/hidden/1`'s `Handoff`), as the prefill's steps compute it.
    Stage { v: u16, session: u64, model: String, fingerprint: String, stage_session: u64, layers: [u32; 2], positions: u32 },
}

/// Control messages on a K/V stream, besides chunks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvReply {
    /// The prefill node's first token, sent after the last layer's K/V, with its timings (ms
    /// from the request's arrival there): when the first chunk's send began, and per layer when
    /// its last chunk was computed and when it was sent.
    /// `send_busy_ms` is the time spent inside sends: the link's speed is bytes over it.
    First {
        token: u32,
        prefill_ms: f64,
        first_send_ms: f64,
        send_busy_ms: f64,
        layers_ready_ms: Vec<f64>,
        layers_sent_ms: Vec<f64>,
    },
    /// The receiving decode node's ticket for the parked K/V.
    Parked {
        ticket: u64,
    },
    /// The decode stage holds every position a `Stage` transfer promised.
    Held {
        positions: u32,
    },
    /// Sent while a layer takes long to compute, so a slow prefill is not taken for a dead one.
    Heartbeat,
    Failed {
        message: String,
    },
}

/// The share of a transfer hidden behind compute: of the time from the first chunk's send to
/// the last one's, the part before compute finished.
pub fn hidden_share(first_send: f64, last_sent: f64, compute_end: f64) -> f64 {
    let span = last_sent - first_send;
    if span <= 0.0 {
        return 1.0;
    }
    ((compute_end - first_send) / span).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape { session: 7, fingerprint: 0xabcdef0123456789, layers: 4, heads: 3, head_dim: 2 }
    }

    fn chunk(layer: u32, start: u32, tokens: u32) -> KvChunk {
        let n = (tokens * 6) as usize;
        KvChunk {
            session: 7,
            fingerprint: 0xabcdef0123456789,
            layer,
            start,
            tokens,
            heads: 3,
            head_dim: 2,
            dtype: DTYPE_F32,
            k: (0..n).map(|i| i as f32 + 0.25).collect(),
            v: (0..n).map(|i| -(i as f32)).collect(),
        }
    }

    #[test]
    fn chunks_round_trip_bit_exact_in_the_wire_layout() {
        let c = chunk(2, 16, 5);
        let frame = c.encode();
        assert!(is_chunk(&frame) && !is_chunk(b"{\"type\":1}"));
        assert_eq!(KvChunk::decode(&frame, &shape()), Ok(c.clone()));
        // Heads outermost on the wire: the first head's first position, then its second.
        let at = |i: usize| f32::from_le_bytes(frame[HEADER_LEN + 4 * i..HEADER_LEN + 4 * i + 4].try_into().expect("4"));
        assert_eq!([at(0), at(1), at(2)], [c.k[0], c.k[1], c.k[6]]);
        // An f16 cache's values travel as f16: half the bytes, and still exact.
        let f16 = KvChunk { dtype: DTYPE_F16, ..c.clone() };
        let frame16 = f16.encode();
        assert_eq!(frame16.len() - HEADER_LEN, (frame.len() - HEADER_LEN) / 2);
        assert_eq!(KvChunk::decode(&frame16, &shape()), Ok(f16));
    }

    #[test]
    fn every_header_field_is_checked() {
        let good = chunk(1, 0, 4).encode();
        let with = |i: usize, b: u8| {
            let mut f = good.clone();
            f[i] = b;
            f
        };
        let s = shape();
        assert!(matches!(KvChunk::decode(&good[..10], &s), Err(KvError::Short(10))));
        assert!(matches!(KvChunk::decode(&with(0, b'X'), &s), Err(KvError::Magic(_))));
        assert!(matches!(KvChunk::decode(&with(4, 9), &s), Err(KvError::Version(9))));
        assert!(matches!(KvChunk::decode(&with(6, 3), &s), Err(KvError::Dtype(3))));
        // A frame that claims f16 carries half the bytes its header counts for f32.
        assert!(matches!(KvChunk::decode(&with(6, DTYPE_F16), &s), Err(KvError::Length { .. })));
        assert!(matches!(KvChunk::decode(&with(7, 0), &s), Err(KvError::Layout(0))));
        assert!(matches!(KvChunk::decode(&good, &KvShape { session: 8, ..s }), Err(KvError::Session { .. })));
        assert!(matches!(KvChunk::decode(&good, &KvShape { fingerprint: 1, ..s }), Err(KvError::Fingerprint { .. })));
        assert!(matches!(KvChunk::decode(&good, &KvShape { heads: 4, ..s }), Err(KvError::Shape { .. })));
        assert!(matches!(KvChunk::decode(&good, &KvShape { layers: 1, ..s }), Err(KvError::Layer { .. })));
        assert!(matches!(KvChunk::decode(&good[..good.len() - 4], &s), Err(KvError::Length { .. })));
        let last = good.len() - 1;
        assert!(matches!(KvChunk::decode(&with(last, good[last] ^ 1), &s), Err(KvError::Checksum { .. })));
        assert!(matches!(KvChunk::decode(&chunk(0, 0, 600).encode(), &s), Err(KvError::Tokens { tokens: 600 })));
        let mut huge = good.clone();
        huge[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(KvChunk::decode(&huge, &s).is_err(), "a lying token count allocates nothing");
    }

    #[test]
    fn progress_rejects_gaps_repeats_and_overruns_and_knows_when_it_is_complete() {
        let mut p = KvProgress::new(2, 16, 40);
        assert!(matches!(p.accept(&chunk(0, 0, 16)), Err(KvError::Order { want: 16, got: 0, .. })), "before the skip");
        p.accept(&chunk(0, 16, 8)).expect("first");
        assert!(matches!(p.accept(&chunk(0, 16, 8)), Err(KvError::Order { .. })), "duplicate");
        assert!(matches!(p.accept(&chunk(0, 30, 4)), Err(KvError::Order { .. })), "gap");
        assert!(matches!(p.accept(&chunk(1, 16, 30)), Err(KvError::Range { .. })), "overrun");
        assert!(matches!(p.accept(&chunk(5, 16, 1)), Err(KvError::Layer { .. })));
        p.accept(&chunk(0, 24, 16)).expect("rest of layer 0");
        assert_eq!(p.layers_done(), 1);
        assert!(matches!(p.check_complete(), Err(KvError::Incomplete { layer: 1, at: 16, want: 40 })));
        p.accept(&chunk(1, 16, 24)).expect("layer 1");
        assert_eq!(p.check_complete(), Ok(()));
        assert_eq!(p.bytes, 48 * 6 * 8);

        // A stage's transfer: only its span's layers, counted from the span's start.
        let mut p = KvProgress::span(1..2, 0, 8);
        assert!(matches!(p.accept(&chunk(0, 0, 8)), Err(KvError::OutsideSpan { layer: 0, span: [1, 2] })));
        p.accept(&chunk(1, 0, 8)).expect("the span's layer");
        assert_eq!(p.check_complete(), Ok(()));
    }

    #[test]
    fn open_and_reply_messages_round_trip() {
        let sampling = KvSampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 3 };
        for m in [
            KvOpen::Prefill { v: 1, session: 1, model: "m".into(), fingerprint: "f".into(), tokens: vec![1, 2], skip: 0, sampling },
            KvOpen::Park { v: 1, session: 2, model: "m".into(), fingerprint: "f".into(), tokens: vec![3] },
            KvOpen::Stage {
                v: 1,
                session: 3,
                model: "m".into(),
                fingerprint: "f".into(),
                stage_session: u64::MAX,
                layers: [10, 20],
                positions: 40,
            },
        ] {
            assert_eq!(serde_json::from_slice::<KvOpen>(&serde_json::to_vec(&m).expect("enc")).expect("dec"), m);
        }
        let r = KvReply::First {
            token: 5,
            prefill_ms: 1.5,
            first_send_ms: 0.2,
            send_busy_ms: 0.1,
            layers_ready_ms: vec![0.5],
            layers_sent_ms: vec![1.0],
        };
        assert_eq!(serde_json::from_slice::<KvReply>(&serde_json::to_vec(&r).expect("enc")).expect("dec"), r);
        assert_eq!(fingerprint_number("00000000000000ff"), Some(255));
        assert_eq!(fingerprint_number("ff"), None);
    }

    #[test]
    fn hidden_share_is_the_overlapped_part_of_the_transfer() {
        assert_eq!(hidden_share(10.0, 20.0, 15.0), 0.5);
        assert_eq!(hidden_share(10.0, 20.0, 30.0), 1.0);
        assert_eq!(hidden_share(10.0, 20.0, 5.0), 0.0);
    }
}
