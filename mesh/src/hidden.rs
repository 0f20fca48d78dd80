//! `/tandem/hidden/1`: one model across many nodes, each holding a span of its layers. The
//! driver of a request opens a stream to every stage of its chain and sends one JSON `HiddenOpen`
//! (which model, which layers, how many positions to reserve K/V for); the stage answers
//! `Opened` or `Failed`. Then the two go in lock-step, one binary frame each way per step: the
//! driver sends a `HiddenStep` (the step's token ids and, to every stage but the first, the
//! residual stream the stage before left), the stage answers a `HiddenOutput` (the residual
//! stream after its last layer, or, from the last stage, the sampled tokens) or a JSON `Failed`.
//! Every direction ends with the framing's checked trailer.
//!
//! A binary frame carries a versioned header (magic, version, kind, dtype, step number, first
//! position, token count, width, flags, payload length, checksum) and is checked against what the
//! receiver expects before anything reaches its engine.

use std::time::Duration;

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::frames::Limits;
use crate::kv::{DTYPE_F16, DTYPE_F32, KvSampling};

pub const HIDDEN_PROTOCOL: StreamProtocol = StreamProtocol::new("/tandem/hidden/1");

/// Bounds of a hidden-state stream. A step's frame holds at most a prefill chunk's residual
/// stream; the read timeout also bounds how long one stage may take over a step.
pub const HIDDEN_LIMITS: Limits =
    Limits { max_frame: 24 << 20, read_timeout: Duration::from_secs(20), write_timeout: Duration::from_secs(20) };

/// Most tokens in one step: a prefill chunk's worth. A stage may take fewer (`Opened`), and the
/// frame bound may allow fewer still on a wide model ([`max_frame_tokens`]).
pub const MAX_STEP_TOKENS: u32 = 2048;

const MAGIC: [u8; 4] = *b"THS\x01";
const VERSION: u16 = 1;
/// Magic, version (u16), kind, dtype, then u32s: step number, first position, tokens, width,
/// payload length; flags, three zero bytes, and the payload's xxh3 (u64). Little-endian.
const HEADER_LEN: usize = 40;

/// What a binary frame holds.
const KIND_STEP: u8 = 1;
const KIND_HIDDEN: u8 = 2;
const KIND_TOKENS: u8 = 3;

/// Flag: a step carries sampling settings (the last stage samples from it).
const FLAG_SAMPLE: u8 = 1;
/// Bytes of sampling settings in a step's payload: temperature, top_k, top_p, seed.
const SAMPLING_LEN: usize = 20;

/// Sampling settings for the last stage, the same a prefill node takes for a first token.
pub type WireSampling = KvSampling;

/// Why a hidden-state frame was rejected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HiddenError {
    #[error("hidden-state frame of {0} bytes is shorter than its {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("not a hidden-state frame (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("hidden-state format version {0}, this node reads {VERSION}")]
    Version(u16),
    #[error("hidden-state frame of kind {got}, expected {want}")]
    Kind { want: &'static str, got: u8 },
    #[error("hidden-state dtype {0} (f32 = {DTYPE_F32} and f16 = {DTYPE_F16} are defined)")]
    UnknownDtype(u8),
    #[error("hidden-state dtype {got}, the stream agreed on {want}")]
    Dtype { want: u8, got: u8 },
    #[error("hidden-state flags {0:#04x} (only sampling = {FLAG_SAMPLE:#04x} is defined)")]
    Flags(u8),
    #[error("{got} hidden values per token, expected {want}")]
    Width { want: u32, got: u32 },
    #[error("{tokens} tokens in one step (at most {MAX_STEP_TOKENS})")]
    Tokens { tokens: u32 },
    #[error("positions {start}.. and {tokens} more overflow")]
    Positions { start: u32, tokens: u32 },
    #[error("payload is {got} bytes, {tokens} tokens need {want}")]
    Length { tokens: u32, want: u64, got: u64 },
    #[error("sampled-token entry {index} is neither present nor absent (byte {byte})")]
    Presence { index: usize, byte: u8 },
    #[error("payload checksum {got:016x}, the header says {want:016x}")]
    Checksum { want: u64, got: u64 },
}

/// What both ends expect of one direction's frames: the residual stream's width (0 where the
/// frames carry none: steps to the first stage, outputs of the last) and the stream's wire dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HiddenShape {
    pub width: u32,
    pub dtype: u8,
}

/// One step for a stage: tokens at positions `start..start + tokens.len()`.
#[derive(Clone, Debug, PartialEq)]
pub struct HiddenStep {
    /// Counts the stream's steps from 0, so a reply is matched to its step.
    pub seq_no: u32,
    /// Position of the first token: the stage checks it against its sequence's length, so a
    /// step lost or repeated cannot shift the cache.
    pub start: u32,
    pub tokens: Vec<u32>,
    /// Set for the last stage when the step's last token is to be sampled.
    pub sample: Option<WireSampling>,
    /// The residual stream entering the stage, `[tokens][width]`; none for the first stage.
    pub hidden: Option<Vec<f32>>,
}

/// What a stage computed for a step.
#[derive(Clone, Debug, PartialEq)]
pub enum StageOut {
    /// The residual stream after the stage's last layer, `[tokens][width]`.
    Hidden(Vec<f32>),
    /// The last stage's samples (usually one; `None` where a token was not sampled).
    Tokens(Vec<Option<u32>>),
}

/// A stage's answer to step `seq_no`.
#[derive(Clone, Debug, PartialEq)]
pub struct HiddenOutput {
    pub seq_no: u32,
    pub out: StageOut,
}

/// Whether a frame's payload is a binary hidden-state frame (else it is a JSON message).
pub fn is_hidden_frame(payload: &[u8]) -> bool {
    payload.len() >= 4 && payload[..4] == MAGIC
}

/// Most tokens of a step whose frames stay within [`HIDDEN_LIMITS`] at this shape: a stage
/// offers no more than this in `Opened`.
pub fn max_frame_tokens(shape: HiddenShape) -> u32 {
    // A step's token id, a reply's sampled token and presence byte, and the hidden values.
    let per_token = 5 + shape.width as usize * value_bytes(shape.dtype);
    let room = HIDDEN_LIMITS.max_frame - HEADER_LEN - SAMPLING_LEN;
    (room / per_token).min(MAX_STEP_TOKENS as usize) as u32
}

/// `dtype` if it is a defined wire dtype: a stage checks `HiddenOpen::wire_dtype` with it.
pub fn check_wire_dtype(dtype: u8) -> Result<u8, HiddenError> {
    if dtype == DTYPE_F32 || dtype == DTYPE_F16 { Ok(dtype) } else { Err(HiddenError::UnknownDtype(dtype)) }
}

fn value_bytes(dtype: u8) -> usize {
    if dtype == DTYPE_F16 { 2 } else { 4 }
}

/// What a stage's output holds: the last stage, whose output has no width, samples.
fn output_kind(shape: HiddenShape) -> u8 {
    if shape.width == 0 { KIND_TOKENS } else { KIND_HIDDEN }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_STEP => "step",
        KIND_HIDDEN => "hidden states",
        _ => "sampled tokens",
    }
}

/// Appends `values` as little-endian values of wire dtype `dtype` (f16 rounds to nearest, ties
/// to even; NaN and infinities travel as such).
fn put_values(out: &mut Vec<u8>, values: &[f32], dtype: u8) {
    if dtype == DTYPE_F16 {
        values.iter().for_each(|&x| out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()));
    } else if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        values.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    }
}

fn take_values(bytes: &[u8], dtype: u8) -> Vec<f32> {
    if dtype == DTYPE_F16 {
        bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
    } else {
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}

/// A frame's header fields, as written and as read.
struct Header {
    kind: u8,
    dtype: u8,
    flags: u8,
    seq_no: u32,
    start: u32,
    tokens: u32,
    width: u32,
}

/// Header and payload in one frame; the payload is filled by `fill`.
fn frame(h: Header, payload_len: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(h.kind);
    out.push(h.dtype);
    for x in [h.seq_no, h.start, h.tokens, h.width, payload_len as u32] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.push(h.flags);
    out.resize(HEADER_LEN, 0);
    fill(&mut out);
    let sum = xxhash_rust::xxh3::xxh3_64(&out[HEADER_LEN..]);
    out[32..40].copy_from_slice(&sum.to_le_bytes());
    out
}

/// The checked header and payload of a frame of kind `kind`, for `want`.
fn open_frame(frame: &[u8], kind: u8, want: HiddenShape) -> Result<(Header, &[u8]), HiddenError> {
    if frame.len() < HEADER_LEN {
        return Err(HiddenError::Short(frame.len()));
    }
    let u32_at = |i: usize| u32::from_le_bytes([frame[i], frame[i + 1], frame[i + 2], frame[i + 3]]);
    let magic = [frame[0], frame[1], frame[2], frame[3]];
    if magic != MAGIC {
        return Err(HiddenError::Magic(magic));
    }
    let version = u16::from_le_bytes([frame[4], frame[5]]);
    if version != VERSION {
        return Err(HiddenError::Version(version));
    }
    let h = Header {
        kind: frame[6],
        dtype: frame[7],
        seq_no: u32_at(8),
        start: u32_at(12),
        tokens: u32_at(16),
        width: u32_at(20),
        flags: frame[28],
    };
    if h.kind != kind {
        return Err(HiddenError::Kind { want: kind_name(kind), got: h.kind });
    }
    check_wire_dtype(h.dtype)?;
    if h.dtype != want.dtype {
        return Err(HiddenError::Dtype { want: want.dtype, got: h.dtype });
    }
    let allowed = if h.kind == KIND_STEP { FLAG_SAMPLE } else { 0 };
    if h.flags & !allowed != 0 {
        return Err(HiddenError::Flags(h.flags));
    }
    if h.width != want.width {
        return Err(HiddenError::Width { want: want.width, got: h.width });
    }
    // A step or a stage's states cover at least one token; a last stage may sample none.
    if h.tokens > MAX_STEP_TOKENS || (h.tokens == 0 && h.kind != KIND_TOKENS) {
        return Err(HiddenError::Tokens { tokens: h.tokens });
    }
    if h.start.checked_add(h.tokens).is_none() {
        return Err(HiddenError::Positions { start: h.start, tokens: h.tokens });
    }
    let payload = &frame[HEADER_LEN..];
    let n = u64::from(h.tokens);
    let values = n * u64::from(h.width) * value_bytes(h.dtype) as u64;
    let expect = match h.kind {
        KIND_STEP => n * 4 + if h.flags & FLAG_SAMPLE != 0 { SAMPLING_LEN as u64 } else { 0 } + values,
        KIND_HIDDEN => values,
        _ => n * 5,
    };
    let got = payload.len() as u64;
    if u64::from(u32_at(24)) != expect || got != expect {
        return Err(HiddenError::Length { tokens: h.tokens, want: expect, got });
    }
    let (want_sum, sum) = (u64::from_le_bytes(frame[32..40].try_into().unwrap_or_default()), xxhash_rust::xxh3::xxh3_64(payload));
    if sum != want_sum {
        return Err(HiddenError::Checksum { want: want_sum, got: sum });
    }
    Ok((h, payload))
}

/// Checks that `values` hidden values are `tokens` rows of `width`.
fn check_values(values: usize, tokens: usize, width: u32) -> Result<(), HiddenError> {
    let want = tokens as u64 * u64::from(width);
    if values as u64 != want {
        let got_width = values.checked_div(tokens).unwrap_or(0) as u32;
        return Err(HiddenError::Width { want: width, got: got_width });
    }
    Ok(())
}

fn check_tokens(tokens: usize, allow_none: bool) -> Result<u32, HiddenError> {
    let n = u32::try_from(tokens).unwrap_or(u32::MAX);
    if n > MAX_STEP_TOKENS || (n == 0 && !allow_none) {
        return Err(HiddenError::Tokens { tokens: n });
    }
    Ok(n)
}

impl HiddenStep {
    /// The step's frame for a stage expecting `shape`; an error where the step does not fit it
    /// (hidden states where none are expected, or rows of another width).
    pub fn encode(&self, shape: HiddenShape) -> Result<Vec<u8>, HiddenError> {
        check_wire_dtype(shape.dtype)?;
        let n = check_tokens(self.tokens.len(), false)?;
        let hidden = self.hidden.as_deref().unwrap_or_default();
        check_values(hidden.len(), self.tokens.len(), shape.width)?;
        if self.start.checked_add(n).is_none() {
            return Err(HiddenError::Positions { start: self.start, tokens: n });
        }
        let flags = if self.sample.is_some() { FLAG_SAMPLE } else { 0 };
        let len = self.tokens.len() * 4 + self.sample.map_or(0, |_| SAMPLING_LEN) + hidden.len() * value_bytes(shape.dtype);
        let h =
            Header { kind: KIND_STEP, dtype: shape.dtype, flags, seq_no: self.seq_no, start: self.start, tokens: n, width: shape.width };
        Ok(frame(h, len, |out| {
            if let Some(s) = self.sample {
                out.extend_from_slice(&s.temperature.to_le_bytes());
                out.extend_from_slice(&s.top_k.to_le_bytes());
                out.extend_from_slice(&s.top_p.to_le_bytes());
                out.extend_from_slice(&s.seed.to_le_bytes());
            }
            self.tokens.iter().for_each(|t| out.extend_from_slice(&t.to_le_bytes()));
            put_values(out, hidden, shape.dtype);
        }))
    }

    /// Parses and checks a step frame against `want`; nothing is returned from a frame that does
    /// not match in every field.
    pub fn decode(frame: &[u8], want: HiddenShape) -> Result<HiddenStep, HiddenError> {
        let (h, mut payload) = open_frame(frame, KIND_STEP, want)?;
        let sample = (h.flags & FLAG_SAMPLE != 0).then(|| {
            let (s, rest) = payload.split_at(SAMPLING_LEN);
            payload = rest;
            let word = |i: usize| [s[i], s[i + 1], s[i + 2], s[i + 3]];
            WireSampling {
                temperature: f32::from_le_bytes(word(0)),
                top_k: u32::from_le_bytes(word(4)),
                top_p: f32::from_le_bytes(word(8)),
                seed: u64::from_le_bytes([s[12], s[13], s[14], s[15], s[16], s[17], s[18], s[19]]),
            }
        });
        let (ids, values) = payload.split_at(h.tokens as usize * 4);
        Ok(HiddenStep {
            seq_no: h.seq_no,
            start: h.start,
            tokens: ids.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            sample,
            hidden: (h.width > 0).then(|| take_values(values, h.dtype)),
        })
    }
}

impl HiddenOutput {
    /// The output's frame for a driver expecting `shape` (width 0 from the last stage, whose
    /// output is tokens).
    pub fn encode(&self, shape: HiddenShape) -> Result<Vec<u8>, HiddenError> {
        check_wire_dtype(shape.dtype)?;
        match &self.out {
            StageOut::Hidden(values) => {
                if output_kind(shape) != KIND_HIDDEN {
                    return Err(HiddenError::Kind { want: kind_name(KIND_TOKENS), got: KIND_HIDDEN });
                }
                let tokens = values.len() / shape.width as usize;
                let n = check_tokens(tokens, false)?;
                check_values(values.len(), tokens, shape.width)?;
                let h = Header {
                    kind: KIND_HIDDEN,
                    dtype: shape.dtype,
                    flags: 0,
                    seq_no: self.seq_no,
                    start: 0,
                    tokens: n,
                    width: shape.width,
                };
                Ok(frame(h, values.len() * value_bytes(shape.dtype), |out| put_values(out, values, shape.dtype)))
            }
            StageOut::Tokens(ids) => {
                if output_kind(shape) != KIND_TOKENS {
                    return Err(HiddenError::Kind { want: kind_name(KIND_HIDDEN), got: KIND_TOKENS });
                }
                let n = check_tokens(ids.len(), true)?;
                let h = Header { kind: KIND_TOKENS, dtype: shape.dtype, flags: 0, seq_no: self.seq_no, start: 0, tokens: n, width: 0 };
                Ok(frame(h, ids.len() * 5, |out| {
                    ids.iter().for_each(|t| out.extend_from_slice(&t.unwrap_or(0).to_le_bytes()));
                    out.extend(ids.iter().map(|t| u8::from(t.is_some())));
                }))
            }
        }
    }

    /// Parses and checks an output frame against `want`: hidden states of `want.width`, or,
    /// where that is 0 (from the last stage), sampled tokens.
    pub fn decode(frame: &[u8], want: HiddenShape) -> Result<HiddenOutput, HiddenError> {
        let (h, payload) = open_frame(frame, output_kind(want), want)?;
        let out = if h.kind == KIND_HIDDEN {
            StageOut::Hidden(take_values(payload, h.dtype))
        } else {
            let (ids, present) = payload.split_at(h.tokens as usize * 4);
            let tokens = ids
                .chunks_exact(4)
                .zip(present)
                .enumerate()
                .map(|(index, (b, &p))| match p {
                    0 => Ok(None),
                    1 => Ok(Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                    byte => Err(HiddenError::Presence { index, byte }),
                })
                .collect::<Result<_, _>>()?;
            StageOut::Tokens(tokens)
        };
        Ok(HiddenOutput { seq_no: h.seq_no, out })
    }
}

/// The opening message of a hidden-state stream, driver to stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HiddenOpen {
    pub v: u16,
    pub model: String,
    /// The fingerprint the driver expects, from the stage's ad: every stage of a chain must
    /// compute with the same weights.
    pub fingerprint: String,
    /// The layers `[start, end)` the stage runs: its whole advertised span.
    pub layers: [u32; 2],
    /// The most positions the session will hold (prompt plus most new tokens): the stage
    /// reserves K/V for them up front, so a step never fails for room half-way down the chain.
    pub positions: u32,
    /// How hidden states travel both ways (`DTYPE_F16`, or `DTYPE_F32` in deterministic mode,
    /// where they must arrive bit-exact).
    pub wire_dtype: u8,
    /// Set on a prefill stage of a chain split into prefill and decode: where its span's K/V
    /// goes, step by step, over `/tandem/kv/1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Handoff>,
}

/// The decode stage that takes a prefill stage's K/V: a node holding the same span, and the
/// session it opened there (its id is what lets the prefill stage write into it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Handoff {
    pub peer: String,
    pub session: u64,
}

/// A stage's JSON messages on a hidden-state stream, besides output frames.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HiddenReply {
    /// The stage holds the span and reserved the positions.
    Opened {
        /// Most tokens it takes in one step.
        max_step_tokens: u32,
        /// Hidden values per token (the model's hidden size), so the driver checks every
        /// stage's frames against one width.
        hidden_size: u32,
        /// Attention chunks it takes in one step (`tandem_core::engine::attention_chunks`): a
        /// long prompt's chunks must fit it as well as `max_step_tokens`.
        attention_budget: u32,
        /// The session's id on the stage: a prefill stage names it to hand K/V into it.
        session: u64,
    },
    /// From a prefill stage once the driver ended its steps: the decode stage holds the K/V of
    /// every position the steps covered.
    HandedOff {
        positions: u32,
    },
    Failed {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const F32: HiddenShape = HiddenShape { width: 3, dtype: DTYPE_F32 };
    const F16: HiddenShape = HiddenShape { width: 3, dtype: DTYPE_F16 };

    fn sampling() -> WireSampling {
        WireSampling { temperature: 0.7, top_k: 40, top_p: 0.9, seed: u64::MAX - 3 }
    }

    fn step(tokens: u32, hidden: bool, sample: bool) -> HiddenStep {
        let n = tokens as usize;
        HiddenStep {
            seq_no: 9,
            start: 100,
            tokens: (0..tokens).map(|i| i * 1000 + 7).collect(),
            sample: sample.then(sampling),
            hidden: hidden.then(|| (0..n * 3).map(|i| (i as f32 - 4.0) * 0.3371).collect()),
        }
    }

    /// A deterministic generator for byte soup, so a failure reproduces.
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn steps_round_trip_with_and_without_hidden_states_and_sampling() {
        for (hidden, sample) in [(false, false), (false, true), (true, false), (true, true)] {
            let s = step(5, hidden, sample);
            let shape = if hidden { F32 } else { HiddenShape { width: 0, ..F32 } };
            let frame = s.encode(shape).expect("encodes");
            assert!(is_hidden_frame(&frame) && !is_hidden_frame(b"{\"type\":\"failed\"}"));
            assert_eq!(HiddenStep::decode(&frame, shape), Ok(s), "hidden {hidden}, sample {sample}");
        }
    }

    #[test]
    fn f32_travels_bit_exact_and_f16_within_its_precision() {
        let mut s = step(4, true, false);
        let values = s.hidden.as_mut().expect("hidden");
        values[0] = f32::from_bits(0x3f80_0001); // 1 + one ulp: lost in f16, kept in f32
        values[1] = f32::INFINITY;
        values[2] = -0.0;
        let exact = HiddenStep::decode(&s.encode(F32).expect("f32"), F32).expect("decodes");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(exact.hidden.as_deref().expect("hidden")), bits(s.hidden.as_deref().expect("hidden")));

        let frame16 = s.encode(F16).expect("f16");
        assert_eq!(frame16.len() - HEADER_LEN - 4 * 4, (s.encode(F32).expect("f32").len() - HEADER_LEN - 4 * 4) / 2, "half the bytes");
        let near = HiddenStep::decode(&frame16, F16).expect("decodes");
        for (a, b) in s.hidden.as_deref().expect("hidden").iter().zip(near.hidden.as_deref().expect("hidden")) {
            assert!(a == b || (a - b).abs() <= a.abs() * 2f32.powi(-11), "{a} -> {b}");
        }
        assert_eq!(near.hidden.as_deref().expect("hidden")[1], f32::INFINITY);
        // Round to nearest, ties to even: 1 + 2^-11 lies halfway between 1 and its f16 neighbour.
        let tie = HiddenOutput { seq_no: 0, out: StageOut::Hidden(vec![1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), f32::NAN]) };
        let back = HiddenOutput::decode(&tie.encode(F16).expect("f16"), F16).expect("decodes");
        let StageOut::Hidden(v) = back.out else { panic!("hidden states") };
        assert_eq!(v[..2], [1.0, 1.0 + 4.0 * 2f32.powi(-11)]);
        assert!(v[2].is_nan(), "NaN passes through");
    }

    #[test]
    fn outputs_round_trip_hidden_states_and_sampled_tokens() {
        let hidden = HiddenOutput { seq_no: 3, out: StageOut::Hidden((0..6).map(|i| i as f32 * 1.5).collect()) };
        assert_eq!(HiddenOutput::decode(&hidden.encode(F32).expect("enc"), F32), Ok(hidden.clone()));
        let last = HiddenShape { width: 0, ..F32 };
        for ids in [vec![Some(42)], vec![None, Some(0), Some(u32::MAX)], vec![]] {
            let out = HiddenOutput { seq_no: 4, out: StageOut::Tokens(ids) };
            assert_eq!(HiddenOutput::decode(&out.encode(last).expect("enc"), last), Ok(out));
        }
        // What a driver expects of a stage's output is what it takes: tokens from the last stage,
        // hidden states from the others, and nothing else.
        let tokens = HiddenOutput { seq_no: 4, out: StageOut::Tokens(vec![Some(1)]) }.encode(last).expect("enc");
        assert!(matches!(HiddenOutput::decode(&tokens, F32), Err(HiddenError::Kind { got: KIND_TOKENS, .. })));
        assert!(matches!(HiddenOutput::decode(&hidden.encode(F32).expect("enc"), last), Err(HiddenError::Kind { got: KIND_HIDDEN, .. })));
        assert!(matches!(HiddenStep::decode(&tokens, last), Err(HiddenError::Kind { .. })));
        assert!(matches!(hidden.encode(last), Err(HiddenError::Kind { .. })));
        let out = HiddenOutput { seq_no: 4, out: StageOut::Tokens(vec![Some(1)]) };
        assert!(matches!(out.encode(F32), Err(HiddenError::Kind { .. })));
        assert!(matches!(HiddenOutput::decode(&step(1, false, false).encode(last).expect("enc"), last), Err(HiddenError::Kind { .. })));
    }

    #[test]
    fn steps_that_do_not_fit_their_shape_are_not_encoded() {
        assert!(matches!(step(2, true, false).encode(HiddenShape { width: 4, ..F32 }), Err(HiddenError::Width { .. })));
        assert!(matches!(step(2, false, false).encode(F32), Err(HiddenError::Width { .. })), "hidden states missing");
        assert!(matches!(step(0, false, false).encode(HiddenShape { width: 0, ..F32 }), Err(HiddenError::Tokens { tokens: 0 })));
        assert!(matches!(step(2049, false, false).encode(HiddenShape { width: 0, ..F32 }), Err(HiddenError::Tokens { tokens: 2049 })));
        let late = HiddenStep { start: u32::MAX, ..step(2, false, false) };
        assert!(matches!(late.encode(HiddenShape { width: 0, ..F32 }), Err(HiddenError::Positions { .. })));
        let ragged = HiddenOutput { seq_no: 0, out: StageOut::Hidden(vec![0.0; 7]) };
        assert!(matches!(ragged.encode(F32), Err(HiddenError::Width { .. })));
    }

    #[test]
    fn every_header_field_is_checked() {
        let good = step(4, true, true).encode(F32).expect("enc");
        let with = |i: usize, b: u8| {
            let mut f = good.clone();
            f[i] = b;
            f
        };
        let dec = |f: &[u8]| HiddenStep::decode(f, F32);
        assert!(matches!(dec(&good[..10]), Err(HiddenError::Short(10))));
        assert!(matches!(dec(&with(0, b'X')), Err(HiddenError::Magic(_))));
        assert!(matches!(dec(&with(4, 9)), Err(HiddenError::Version(9))));
        assert!(matches!(dec(&with(6, KIND_HIDDEN)), Err(HiddenError::Kind { .. })));
        assert!(matches!(dec(&with(7, DTYPE_F16)), Err(HiddenError::Dtype { want: DTYPE_F32, got: DTYPE_F16 })));
        assert!(matches!(HiddenStep::decode(&good, F16), Err(HiddenError::Dtype { .. })), "deterministic mode takes f32 only");
        assert!(matches!(dec(&with(7, 7)), Err(HiddenError::UnknownDtype(7))));
        assert!(matches!(HiddenStep::decode(&with(7, 7), HiddenShape { dtype: 7, ..F32 }), Err(HiddenError::UnknownDtype(7))));
        assert!(matches!(step(1, true, false).encode(HiddenShape { dtype: 0, ..F32 }), Err(HiddenError::UnknownDtype(0))));
        assert_eq!(check_wire_dtype(DTYPE_F16), Ok(DTYPE_F16));
        assert!(matches!(dec(&with(28, 2)), Err(HiddenError::Flags(2))));
        // Without its flag, the sampling settings are bytes the header does not count.
        assert!(matches!(dec(&with(28, 0)), Err(HiddenError::Length { .. })));
        assert!(matches!(dec(&with(20, 4)), Err(HiddenError::Width { want: 3, got: 4 })));
        assert!(matches!(HiddenStep::decode(&good, HiddenShape { width: 0, ..F32 }), Err(HiddenError::Width { .. })));
        assert!(matches!(dec(&with(16, 5)), Err(HiddenError::Length { .. })), "token count vs payload");
        assert!(matches!(dec(&with(16, 0)), Err(HiddenError::Tokens { tokens: 0 })));
        let mut many = good.clone();
        many[16..20].copy_from_slice(&(MAX_STEP_TOKENS + 1).to_le_bytes());
        assert!(matches!(dec(&many), Err(HiddenError::Tokens { .. })));
        let mut late = good.clone();
        late[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(dec(&late), Err(HiddenError::Positions { .. })));
        assert!(matches!(dec(&with(24, good[24] ^ 1)), Err(HiddenError::Length { .. })));
        assert!(matches!(dec(&good[..good.len() - 4]), Err(HiddenError::Length { .. })));
        let last = good.len() - 1;
        assert!(matches!(dec(&with(last, good[last] ^ 1)), Err(HiddenError::Checksum { .. })));
        assert!(matches!(dec(&with(33, good[33] ^ 1)), Err(HiddenError::Checksum { .. })));

        let tokens = HiddenOutput { seq_no: 1, out: StageOut::Tokens(vec![Some(5), None]) };
        let mut f = tokens.encode(HiddenShape { width: 0, ..F32 }).expect("enc");
        let at = f.len() - 1;
        f[at] = 2;
        let sum = xxhash_rust::xxh3::xxh3_64(&f[HEADER_LEN..]);
        f[32..40].copy_from_slice(&sum.to_le_bytes());
        assert!(matches!(HiddenOutput::decode(&f, HiddenShape { width: 0, ..F32 }), Err(HiddenError::Presence { index: 1, byte: 2 })));
    }

    #[test]
    fn truncated_garbled_and_random_frames_never_panic() {
        let frames = [
            step(3, true, true).encode(F16).expect("enc"),
            step(2, false, false).encode(HiddenShape { width: 0, ..F16 }).expect("enc"),
            HiddenOutput { seq_no: 1, out: StageOut::Tokens(vec![Some(1), None]) }.encode(HiddenShape { width: 0, ..F16 }).expect("enc"),
            HiddenOutput { seq_no: 1, out: StageOut::Hidden(vec![0.5; 6]) }.encode(F16).expect("enc"),
        ];
        let shapes = [F16, HiddenShape { width: 0, ..F16 }, F32];
        let try_all = |f: &[u8]| {
            for &s in &shapes {
                let _ = HiddenStep::decode(f, s);
                let _ = HiddenOutput::decode(f, s);
            }
        };
        let mut rng = SplitMix(7);
        for good in &frames {
            for cut in 0..good.len() {
                assert!(HiddenStep::decode(&good[..cut], F16).is_err() && HiddenOutput::decode(&good[..cut], F16).is_err());
                try_all(&good[..cut]);
            }
            for _ in 0..2000 {
                let mut f = good.clone();
                for _ in 0..1 + rng.next() % 4 {
                    let i = (rng.next() % f.len() as u64) as usize;
                    f[i] = rng.next() as u8;
                }
                try_all(&f);
            }
        }
        for _ in 0..5000 {
            let len = (rng.next() % 200) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Half the soup gets a valid magic and version, so the deeper checks run too.
            if rng.next().is_multiple_of(2) && f.len() >= 6 {
                f[..4].copy_from_slice(&MAGIC);
                f[4..6].copy_from_slice(&VERSION.to_le_bytes());
            }
            try_all(&f);
        }
    }

    #[test]
    fn frames_of_the_most_tokens_a_stage_offers_fit_the_bound() {
        for shape in [
            HiddenShape { width: 8192, dtype: DTYPE_F32 },
            HiddenShape { width: 4096, dtype: DTYPE_F16 },
            HiddenShape { width: 0, dtype: DTYPE_F16 },
        ] {
            let n = max_frame_tokens(shape);
            assert!((1..=MAX_STEP_TOKENS).contains(&n));
            let s = HiddenStep {
                seq_no: 0,
                start: 0,
                tokens: vec![1; n as usize],
                sample: Some(sampling()),
                hidden: (shape.width > 0).then(|| vec![0.0; n as usize * shape.width as usize]),
            };
            assert!(s.encode(shape).expect("enc").len() <= HIDDEN_LIMITS.max_frame, "{shape:?}");
        }
        assert_eq!(max_frame_tokens(HiddenShape { width: 4096, dtype: DTYPE_F16 }), 2048);
        assert!(max_frame_tokens(HiddenShape { width: 8192, dtype: DTYPE_F32 }) < 2048);
    }

    #[test]
    fn open_and_reply_messages_round_trip() {
        let open = HiddenOpen {
            v: crate::PROTOCOL_VERSION,
            model: "m".into(),
            fingerprint: "00000000000000ff".into(),
            layers: [10, 20],
            positions: 4096,
            wire_dtype: DTYPE_F16,
            handoff: None,
        };
        assert_eq!(serde_json::from_slice::<HiddenOpen>(&serde_json::to_vec(&open).expect("enc")).expect("dec"), open);
        let open = HiddenOpen { handoff: Some(Handoff { peer: "12D3".into(), session: u64::MAX }), ..open };
        assert_eq!(serde_json::from_slice::<HiddenOpen>(&serde_json::to_vec(&open).expect("enc")).expect("dec"), open);
        for r in [
            HiddenReply::Opened { max_step_tokens: 512, hidden_size: 576, attention_budget: 1024, session: 7 },
            HiddenReply::HandedOff { positions: 40 },
            HiddenReply::Failed { message: "no".into() },
        ] {
            let bytes = serde_json::to_vec(&r).expect("enc");
            assert!(!is_hidden_frame(&bytes));
            assert_eq!(serde_json::from_slice::<HiddenReply>(&bytes).expect("dec"), r);
        }
    }
}
