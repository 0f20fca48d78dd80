//! Framing for direct streams (requests, token streams, and later KV layers): each frame is a
//! kind byte, a big-endian u32 length and the payload; a stream direction ends with a trailer frame
//! holding the count, byte total and xxh3 checksum of every data frame before it.
//!
//! Why a trailer: over TCP+yamux a killed sender looks like a clean end of stream, so "EOF" must
//! never mean "done". Why a timeout on every read: a stalled sender would otherwise block a read
//! for good. Why a bound on every frame: the length comes from the peer.

use std::time::Duration;

use futures_util::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use xxhash_rust::xxh3::Xxh3;

const DATA: u8 = 0;
const TRAILER: u8 = 1;
const TRAILER_LEN: usize = 24;

/// Bounds of one stream.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest payload of one frame, either way.
    pub max_frame: usize,
    /// Longest wait for any progress on a read.
    pub read_timeout: Duration,
    /// Longest wait for a write to be taken.
    pub write_timeout: Duration,
}

/// Why a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("no progress for {0:?}")]
    Timeout(Duration),
    #[error("the stream ended after {frames} frames without its trailer (peer gone?)")]
    Truncated { frames: u64 },
    #[error("frame of {len} bytes exceeds the {max}-byte bound")]
    TooLarge { len: usize, max: usize },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("trailer says {want_frames} frames / {want_bytes} bytes / checksum {want_sum:016x}, got {frames} / {bytes} / {sum:016x}")]
    TrailerMismatch { want_frames: u64, want_bytes: u64, want_sum: u64, frames: u64, bytes: u64, sum: u64 },
    #[error("data after the trailer")]
    AfterTrailer,
    #[error("malformed message: {0}")]
    Malformed(String),
}

struct Tally {
    frames: u64,
    bytes: u64,
    hash: Xxh3,
}

impl Tally {
    fn new() -> Self {
        Tally { frames: 0, bytes: 0, hash: Xxh3::new() }
    }

    fn add(&mut self, payload: &[u8]) {
        self.frames += 1;
        self.bytes += payload.len() as u64;
        self.hash.update(payload);
    }
}

/// A stream with frames, trailers, bounds and timeouts.
pub struct FramedStream<S> {
    io: S,
    limits: Limits,
    sent: Tally,
    received: Tally,
    read_done: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FramedStream<S> {
    pub fn new(io: S, limits: Limits) -> Self {
        FramedStream { io, limits, sent: Tally::new(), received: Tally::new(), read_done: false }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        match tokio::time::timeout(self.limits.write_timeout, self.io.write_all(bytes)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(FrameError::Timeout(self.limits.write_timeout)),
        }
    }

    async fn write_frame(&mut self, kind: u8, payload: &[u8]) -> Result<(), FrameError> {
        let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge { len: payload.len(), max: self.limits.max_frame })?;
        let mut frame = Vec::with_capacity(5 + payload.len());
        frame.push(kind);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(payload);
        self.write_all(&frame).await
    }

    /// Sends one data frame (and flushes, so small frames such as tokens leave at once).
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        if payload.len() > self.limits.max_frame {
            return Err(FrameError::TooLarge { len: payload.len(), max: self.limits.max_frame });
        }
        self.write_frame(DATA, payload).await?;
        self.sent.add(payload);
        self.flush().await
    }

    /// Sends a message as a JSON data frame.
    pub async fn send_msg<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let bytes = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
        self.send(&bytes).await
    }

    async fn flush(&mut self) -> Result<(), FrameError> {
        match tokio::time::timeout(self.limits.write_timeout, self.io.flush()).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(FrameError::Timeout(self.limits.write_timeout)),
        }
    }

    /// Ends this direction: the trailer, then the write half is closed.
    pub async fn finish(&mut self) -> Result<(), FrameError> {
        let mut t = [0u8; TRAILER_LEN];
        t[..8].copy_from_slice(&self.sent.frames.to_le_bytes());
        t[8..16].copy_from_slice(&self.sent.bytes.to_le_bytes());
        t[16..].copy_from_slice(&self.sent.hash.digest().to_le_bytes());
        self.write_frame(TRAILER, &t).await?;
        match tokio::time::timeout(self.limits.write_timeout, self.io.close()).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(FrameError::Timeout(self.limits.write_timeout)),
        }
    }

    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), FrameError> {
        match tokio::time::timeout(self.limits.read_timeout, self.io.read_exact(buf)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated { frames: self.received.frames }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(FrameError::Timeout(self.limits.read_timeout)),
        }
    }

    /// The next data frame, or `None` once the peer's trailer has arrived and matched everything
    /// received. An end of stream without a trailer is an error.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.read_done {
            return Ok(None);
        }
        let mut header = [0u8; 5];
        self.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        match header[0] {
            DATA => {
                if len > self.limits.max_frame {
                    return Err(FrameError::TooLarge { len, max: self.limits.max_frame });
                }
                let mut payload = vec![0u8; len];
                self.read_exact(&mut payload).await?;
                self.received.add(&payload);
                Ok(Some(payload))
            }
            TRAILER => {
                if len != TRAILER_LEN {
                    return Err(FrameError::Malformed(format!("trailer of {len} bytes")));
                }
                let mut t = [0u8; TRAILER_LEN];
                self.read_exact(&mut t).await?;
                let word = |i: usize| u64::from_le_bytes(t[i * 8..i * 8 + 8].try_into().unwrap_or_default());
                let (want_frames, want_bytes, want_sum) = (word(0), word(1), word(2));
                let (frames, bytes, sum) = (self.received.frames, self.received.bytes, self.received.hash.digest());
                if (want_frames, want_bytes, want_sum) != (frames, bytes, sum) {
                    return Err(FrameError::TrailerMismatch { want_frames, want_bytes, want_sum, frames, bytes, sum });
                }
                self.read_done = true;
                // Nothing may follow the trailer.
                let mut probe = [0u8; 1];
                match tokio::time::timeout(self.limits.read_timeout, self.io.read(&mut probe)).await {
                    Ok(Ok(0)) => Ok(None),
                    Ok(Ok(_)) => Err(FrameError::AfterTrailer),
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(FrameError::Timeout(self.limits.read_timeout)),
                }
            }
            other => Err(FrameError::UnknownKind(other)),
        }
    }

    /// The next data frame parsed as JSON, or `None` after the trailer.
    pub async fn recv_msg<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.recv().await? {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| FrameError::Malformed(e.to_string())),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::io::Cursor;

    use super::*;

    const LIMITS: Limits = Limits { max_frame: 1024, read_timeout: Duration::from_millis(200), write_timeout: Duration::from_millis(200) };

    /// The bytes a sender writes for `frames`, with or without its trailer.
    async fn wire(frames: &[&[u8]], trailer: bool) -> Vec<u8> {
        let mut out = FramedStream::new(Cursor::new(Vec::new()), LIMITS);
        for f in frames {
            out.send(f).await.expect("send");
        }
        if trailer {
            out.finish().await.expect("finish");
        }
        out.io.into_inner()
    }

    async fn read_all(bytes: Vec<u8>) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut s = FramedStream::new(Cursor::new(bytes), LIMITS);
        let mut got = Vec::new();
        while let Some(f) = s.recv().await? {
            got.push(f);
        }
        Ok(got)
    }

    #[tokio::test]
    async fn frames_round_trip_and_end_with_a_verified_trailer() {
        let frames: [&[u8]; 3] = [b"hello", b"", &[7u8; 1024]];
        let got = read_all(wire(&frames, true).await).await.expect("reads");
        assert_eq!(got, frames.iter().map(|f| f.to_vec()).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn truncated_corrupted_oversized_and_unknown_frames_are_errors() {
        let good = wire(&[b"one", b"two"], true).await;
        // A sender killed before its trailer: a clean EOF that must not count as success.
        let e = read_all(wire(&[b"one", b"two"], false).await).await.expect_err("no trailer");
        assert!(matches!(e, FrameError::Truncated { frames: 2 }), "{e}");
        let e = read_all(good[..good.len() - 3].to_vec()).await.expect_err("cut trailer");
        assert!(matches!(e, FrameError::Truncated { .. }), "{e}");
        let mut flipped = good.clone();
        flipped[6] ^= 1;
        assert!(matches!(read_all(flipped).await, Err(FrameError::TrailerMismatch { .. })));
        // A frame dropped in transit: the count and checksum disagree.
        let dropped = [&good[..8], &good[16..]].concat();
        assert!(matches!(read_all(dropped).await, Err(FrameError::TrailerMismatch { .. })));
        let mut huge = vec![DATA];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(read_all(huge).await, Err(FrameError::TooLarge { .. })), "no allocation from a peer's length");
        assert!(matches!(read_all(vec![9, 0, 0, 0, 0]).await, Err(FrameError::UnknownKind(9))));
        let mut after = good.clone();
        after.push(0);
        assert!(matches!(read_all(after).await, Err(FrameError::AfterTrailer)));
        let mut s = FramedStream::new(Cursor::new(Vec::new()), LIMITS);
        assert!(matches!(s.send(&[0u8; 1025]).await, Err(FrameError::TooLarge { .. })));
        let mut s = FramedStream::new(Cursor::new(wire(&[b"{\"a\":"], true).await), LIMITS);
        assert!(matches!(s.recv_msg::<serde_json::Value>().await, Err(FrameError::Malformed(_))));
    }

    #[tokio::test]
    async fn a_stalled_sender_times_out() {
        let (client, _server) = tokio::io::duplex(64);
        let mut s = FramedStream::new(tokio_util::compat::TokioAsyncReadCompatExt::compat(client), LIMITS);
        assert!(matches!(s.recv().await, Err(FrameError::Timeout(_))));
    }
}
