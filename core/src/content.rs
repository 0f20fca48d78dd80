//! Content addresses of a model's weights: every tensor's bytes cut in chunks of
//! [`CHUNK_BYTES`], each chunk's sha256, and a tensor's digest over its chunks' digests. The
//! model's identity (`HostModel::identity`) covers every tensor's digest, so a node that trusts
//! an identity can check any chunk a stranger sends it before the chunk reaches its disk.
//!
//! A [`Manifest`] lists a GGUF file's regions: its header (metadata and tensor table), then each
//! tensor's bytes, with their chunk digests. It travels between nodes as JSON; the receiver
//! checks its structure here and its tensor digests against the identity it wants
//! (`HostModel::with_regions`, `HostModel::identity`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Bytes per chunk: the unit of transfer, verification and resumption.
pub const CHUNK_BYTES: u64 = 1 << 20;

/// A sha256.
pub type Digest = [u8; 32];

/// The digest of one chunk's bytes.
pub fn chunk_digest(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// A byte range of a model file and the digests of its chunks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// The tensor's canonical name; empty for the file's header.
    pub name: String,
    /// Where it starts in the file.
    pub offset: u64,
    pub len: u64,
    #[serde(with = "hex_digests")]
    pub chunks: Vec<Digest>,
}

impl Region {
    /// The region of `bytes` (at `offset` in its file), its chunks hashed on every core.
    pub fn of_bytes(name: &str, offset: u64, bytes: &[u8]) -> Region {
        Region { name: name.into(), offset, len: bytes.len() as u64, chunks: chunk_digests(bytes) }
    }

    /// The digest of the whole region: its length and its chunks' digests.
    pub fn digest(&self) -> Digest {
        let mut h = Sha256::new();
        h.update(b"tandem region v1");
        h.update(self.len.to_le_bytes());
        for c in &self.chunks {
            h.update(c);
        }
        h.finalize().into()
    }

    /// Chunks a region of `len` bytes has.
    pub fn chunk_count(len: u64) -> usize {
        len.div_ceil(CHUNK_BYTES) as usize
    }

    /// Chunk `i`'s range, as (offset in the file, length).
    pub fn chunk(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * CHUNK_BYTES;
        (self.offset + start, CHUNK_BYTES.min(self.len.saturating_sub(start)))
    }
}

/// The chunk digests of `bytes`, computed on every core (a large model's are gigabytes).
fn chunk_digests(bytes: &[u8]) -> Vec<Digest> {
    let n = Region::chunk_count(bytes.len() as u64);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n.max(1));
    let mut out = vec![[0u8; 32]; n];
    if threads <= 1 {
        for (i, d) in out.iter_mut().enumerate() {
            *d = chunk_digest(chunk_of(bytes, i));
        }
        return out;
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, part) in out.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (j, d) in part.iter_mut().enumerate() {
                    *d = chunk_digest(chunk_of(bytes, t * per + j));
                }
            });
        }
    });
    out
}

fn chunk_of(bytes: &[u8], i: usize) -> &[u8] {
    let start = i * CHUNK_BYTES as usize;
    &bytes[start..(start + CHUNK_BYTES as usize).min(bytes.len())]
}

/// Why a manifest cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error("manifest version {0}, this node reads {MANIFEST_VERSION}")]
    Version(u32),
    #[error("region `{name}` has {got} chunk digests, its {len} bytes make {want}")]
    Chunks { name: String, len: u64, want: usize, got: usize },
    #[error("region `{name}` [{offset}, +{len}) lies outside the {file_size}-byte file")]
    Outside { name: String, offset: u64, len: u64, file_size: u64 },
    #[error("regions `{0}` and `{1}` overlap")]
    Overlap(String, String),
    #[error("tensor `{0}` is listed twice")]
    Duplicate(String),
    #[error("the header region must start the file and have no name")]
    Header,
    #[error("{0} regions: more than a model file has")]
    TooMany(usize),
}

pub const MANIFEST_VERSION: u32 = 1;

/// Most tensors a manifest may list (GGUF's own bound on entries is far above any model's).
const MAX_REGIONS: usize = 1 << 16;

/// A GGUF file's content addresses: its header, then its tensors in file order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub file_size: u64,
    pub header: Region,
    pub tensors: Vec<Region>,
}

impl Manifest {
    /// Checks what can be checked without the model: counts, bounds, order. A manifest from a
    /// peer passes this before anything is fetched by it.
    pub fn check(&self) -> Result<(), ManifestError> {
        if self.version != MANIFEST_VERSION {
            return Err(ManifestError::Version(self.version));
        }
        if self.tensors.len() > MAX_REGIONS {
            return Err(ManifestError::TooMany(self.tensors.len()));
        }
        if self.header.offset != 0 || !self.header.name.is_empty() {
            return Err(ManifestError::Header);
        }
        let mut names = std::collections::HashSet::new();
        let mut previous: Option<&Region> = None;
        for r in std::iter::once(&self.header).chain(&self.tensors) {
            let want = Region::chunk_count(r.len);
            if r.chunks.len() != want {
                return Err(ManifestError::Chunks { name: r.name.clone(), len: r.len, want, got: r.chunks.len() });
            }
            if r.offset.checked_add(r.len).is_none_or(|end| end > self.file_size) {
                return Err(ManifestError::Outside { name: r.name.clone(), offset: r.offset, len: r.len, file_size: self.file_size });
            }
            if let Some(p) = previous
                && p.offset + p.len > r.offset
            {
                return Err(ManifestError::Overlap(p.name.clone(), r.name.clone()));
            }
            if !r.name.is_empty() && !names.insert(r.name.as_str()) {
                return Err(ManifestError::Duplicate(r.name.clone()));
            }
            previous = Some(r);
        }
        Ok(())
    }

    /// Every region, the header first (index 0), then the tensors (index 1..).
    pub fn regions(&self) -> impl Iterator<Item = &Region> {
        std::iter::once(&self.header).chain(&self.tensors)
    }

    /// Region `i` as [`Manifest::regions`] numbers them.
    pub fn region(&self, i: usize) -> Option<&Region> {
        if i == 0 { Some(&self.header) } else { self.tensors.get(i - 1) }
    }

    /// The tensors' regions by name.
    pub fn tensor_regions(&self) -> BTreeMap<String, Region> {
        self.tensors.iter().map(|r| (r.name.clone(), r.clone())).collect()
    }
}

/// The tensors a node holding layers `span` of a model with `n_layers` layers (and these tensor
/// names) reads: its layers' tensors, the embedding where it embeds (the first stage) or its
/// tied head samples (the last), the final norm and head where it is last, and every other
/// non-layer tensor (RoPE factors).
pub fn span_tensors<'a>(
    names: impl IntoIterator<Item = &'a str>,
    n_layers: usize,
    tied_embeddings: bool,
    span: std::ops::Range<usize>,
) -> Vec<String> {
    let (first, last) = (span.start == 0, span.end >= n_layers);
    names
        .into_iter()
        .filter(|name| {
            if let Some(rest) = name.strip_prefix("blk.") {
                return rest.split('.').next().and_then(|l| l.parse::<usize>().ok()).is_some_and(|l| span.contains(&l));
            }
            match *name {
                "token_embd.weight" => first || (last && tied_embeddings),
                "output_norm.weight" | "output.weight" => last,
                _ => true,
            }
        })
        .map(str::to_string)
        .collect()
}

mod hex_digests {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Digest;

    pub fn serialize<S: Serializer>(digests: &[Digest], s: S) -> Result<S::Ok, S::Error> {
        let text: String = digests.iter().map(hex::encode).collect();
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Digest>, D::Error> {
        let text = String::deserialize(d)?;
        if !text.len().is_multiple_of(64) {
            return Err(serde::de::Error::custom("chunk digests are not a whole number of 64 hex digits"));
        }
        let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
        Ok(bytes.chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let header = Region::of_bytes("", 0, &[1u8; 100]);
        let a = Region::of_bytes("blk.0.attn_q.weight", 128, &vec![2u8; (CHUNK_BYTES + 5) as usize]);
        let b = Region::of_bytes("token_embd.weight", 128 + CHUNK_BYTES + 32, &[3u8; 10]);
        Manifest { version: MANIFEST_VERSION, file_size: 128 + CHUNK_BYTES + 64, header, tensors: vec![a, b] }
    }

    #[test]
    fn regions_cut_in_chunks_whose_digests_the_region_digest_covers() {
        let bytes: Vec<u8> = (0..(2 * CHUNK_BYTES + 7)).map(|i| (i * 7 % 251) as u8).collect();
        let r = Region::of_bytes("t", 64, &bytes);
        assert_eq!(r.chunks.len(), 3);
        assert_eq!(r.chunk(2), (64 + 2 * CHUNK_BYTES, 7));
        assert_eq!(r.chunks[1], chunk_digest(&bytes[CHUNK_BYTES as usize..2 * CHUNK_BYTES as usize]));
        let mut changed = bytes.clone();
        changed[CHUNK_BYTES as usize + 3] ^= 1;
        let r2 = Region::of_bytes("t", 64, &changed);
        assert_eq!(r2.chunks[0], r.chunks[0]);
        assert_ne!(r2.chunks[1], r.chunks[1]);
        assert_ne!(r2.digest(), r.digest());
    }

    #[test]
    fn a_manifest_round_trips_as_json_and_bad_ones_are_refused() {
        let m = manifest();
        m.check().expect("good");
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&m).expect("json")).expect("parse");
        assert_eq!(back, m);
        let mut short = m.clone();
        short.tensors[0].chunks.pop();
        assert!(matches!(short.check(), Err(ManifestError::Chunks { .. })));
        let mut outside = m.clone();
        outside.file_size = 200;
        assert!(matches!(outside.check(), Err(ManifestError::Outside { .. })));
        let mut overlap = m.clone();
        overlap.tensors[1].offset = 130;
        assert!(matches!(overlap.check(), Err(ManifestError::Overlap(..))));
        let mut dup = m.clone();
        dup.tensors[1].name = dup.tensors[0].name.clone();
        dup.tensors[1].offset = 128 + CHUNK_BYTES + 32;
        assert!(matches!(dup.check(), Err(ManifestError::Duplicate(_))));
        let mut wrapped = m;
        wrapped.tensors[1].offset = u64::MAX - 2;
        assert!(matches!(wrapped.check(), Err(ManifestError::Outside { .. })));
        assert!(
            serde_json::from_str::<Manifest>(
                r#"{"version":1,"file_size":1,"header":{"name":"","offset":0,"len":1,"chunks":"abc"},"tensors":[]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn a_span_reads_its_layers_and_only_the_ends_it_computes() {
        let names = [
            "token_embd.weight",
            "output_norm.weight",
            "output.weight",
            "rope_freqs.weight",
            "blk.0.attn_q.weight",
            "blk.1.attn_q.weight",
            "blk.10.ffn_up.weight",
        ];
        let middle = span_tensors(names, 11, false, 1..10);
        assert_eq!(middle, ["rope_freqs.weight", "blk.1.attn_q.weight"]);
        let first = span_tensors(names, 11, false, 0..1);
        assert_eq!(first, ["token_embd.weight", "rope_freqs.weight", "blk.0.attn_q.weight"]);
        let last_tied = span_tensors(names, 11, true, 10..11);
        assert_eq!(last_tied, ["token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight", "blk.10.ffn_up.weight"]);
    }
}
