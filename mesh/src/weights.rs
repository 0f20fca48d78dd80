//! `/tandem/weights/1`: a node that lacks a model's tensors fetches them from a peer that has
//! them. The fetcher names the model by its full identity and asks for its manifest (the content
//! addresses of the file's header and tensors, JSON, checked by the fetcher against the identity
//! it trusts), then for runs of chunks, one binary frame per chunk, each checked against the
//! manifest before it is written. Every direction ends with the framing's checked trailer.
//!
//! The peer answers at its own pace: it sends weights under a byte-rate limit, so its serving
//! traffic comes first.

use std::time::Duration;

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::frames::Limits;

pub const WEIGHTS_PROTOCOL: StreamProtocol = StreamProtocol::new("/tandem/weights/1");

/// A frame holds a manifest (a 70B model's is a few MB of JSON) or one chunk.
pub const WEIGHTS_LIMITS: Limits =
    Limits { max_frame: 32 << 20, read_timeout: Duration::from_secs(60), write_timeout: Duration::from_secs(60) };

/// Most chunks one ask may name: a fetcher spreads the rest over other asks and peers.
pub const MAX_CHUNKS_PER_ASK: u32 = 64;

/// The protocol's version in every manifest ask.
pub const WEIGHTS_VERSION: u32 = 1;

/// What a fetcher asks, as a JSON frame.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "ask", rename_all = "snake_case")]
pub enum WeightsAsk {
    /// The manifest of the model whose identity (64 hex digits) this is.
    Manifest { v: u32, identity: String },
    /// Chunks `first..first + count` of region `region` (0: the header, then the tensors in file
    /// order, as the manifest lists them).
    Chunks { region: u32, first: u32, count: u32 },
}

/// What the peer answers an ask with, as a JSON frame; after `Sending`, one binary frame per
/// chunk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum WeightsReply {
    Manifest { manifest: serde_json::Value },
    Sending { count: u32 },
    Failed { message: String },
}

const MAGIC: [u8; 4] = *b"TWC\x01";
/// Magic, region, chunk index, length (u32s, little-endian).
const HEADER_LEN: usize = 16;

/// Why a chunk frame was rejected (before its bytes are checked against the manifest).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChunkFrameError {
    #[error("chunk frame of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("not a chunk frame (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("chunk frame says {want} bytes, carries {got}")]
    Length { want: u32, got: usize },
}

/// A chunk's frame.
pub fn encode_weights_chunk(region: u32, index: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + bytes.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&region.to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// A chunk frame's region, chunk index and bytes.
pub fn decode_weights_chunk(frame: &[u8]) -> Result<(u32, u32, &[u8]), ChunkFrameError> {
    if frame.len() < HEADER_LEN {
        return Err(ChunkFrameError::Short(frame.len()));
    }
    let word = |i: usize| u32::from_le_bytes([frame[i], frame[i + 1], frame[i + 2], frame[i + 3]]);
    let magic = [frame[0], frame[1], frame[2], frame[3]];
    if magic != MAGIC {
        return Err(ChunkFrameError::Magic(magic));
    }
    let (region, index, len) = (word(4), word(8), word(12));
    let bytes = &frame[HEADER_LEN..];
    if bytes.len() != len as usize {
        return Err(ChunkFrameError::Length { want: len, got: bytes.len() });
    }
    Ok((region, index, bytes))
}

/// A byte-rate limit shared by every weights stream of a node: a token bucket with a second's
/// worth of burst.
#[derive(Debug)]
pub struct RateLimit {
    state: std::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit { state: std::sync::Mutex::new((0.0, tokio::time::Instant::now())) }
    }
}

impl RateLimit {
    /// Waits until `bytes` may go at `rate` bytes per second (the rate may change between calls:
    /// a busy node lowers it).
    pub async fn take(&self, bytes: u64, rate: u64) {
        let rate = rate.max(1) as f64;
        let wait = {
            let Ok(mut s) = self.state.lock() else { return };
            let now = tokio::time::Instant::now();
            // Refill since the last take, up to a second's worth; then spend (into debt if need be).
            let (level, last) = *s;
            let level = (level + now.duration_since(last).as_secs_f64() * rate).min(rate) - bytes as f64;
            *s = (level, now);
            if level >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-level / rate) }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_frames_round_trip_and_bad_ones_are_named() {
        let f = encode_weights_chunk(3, 7, b"weights");
        assert_eq!(decode_weights_chunk(&f), Ok((3, 7, &b"weights"[..])));
        assert_eq!(decode_weights_chunk(&f[..10]), Err(ChunkFrameError::Short(10)));
        assert!(matches!(decode_weights_chunk(&f[..f.len() - 1]), Err(ChunkFrameError::Length { want: 7, got: 6 })));
        let mut bad = f.clone();
        bad[0] = b'X';
        assert!(matches!(decode_weights_chunk(&bad), Err(ChunkFrameError::Magic(_))));
    }

    #[test]
    fn asks_and_replies_are_tagged_json() {
        let ask = WeightsAsk::Chunks { region: 1, first: 0, count: 4 };
        let text = serde_json::to_string(&ask).expect("json");
        assert_eq!(text, r#"{"ask":"chunks","region":1,"first":0,"count":4}"#);
        assert_eq!(serde_json::from_str::<WeightsAsk>(&text).expect("parse"), ask);
        assert!(serde_json::from_str::<WeightsAsk>(r#"{"ask":"everything"}"#).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_spaces_bytes_out_at_the_rate() {
        let limit = RateLimit::default();
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            limit.take(1000, 4000).await;
        }
        // 10 000 bytes at 4000 B/s with an empty bucket at the start: about 2.5 s.
        let took = start.elapsed().as_secs_f64();
        assert!((2.0..3.0).contains(&took), "{took}");
    }
}
