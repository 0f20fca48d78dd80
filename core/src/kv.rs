//! The paged KV cache's bookkeeping: fixed-size blocks, a free list, per-sequence block tables,
//! and the layer-by-layer export/import types.

use crate::error::{Error, Result};
use tandem_shaders::WeightFormat;

/// Tokens per KV block.
pub const BLOCK_TOKENS: usize = 16;

/// Identifies a sequence within one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// The K and V of one layer for a range of positions of one sequence, `[tokens][kv_heads][head_dim]`
/// in f32: what a prefill node streams and a decode node imports.
#[derive(Clone, Debug, PartialEq)]
pub struct KvLayer {
    pub layer: usize,
    pub start: usize,
    pub tokens: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// How the paged K/V cache stores its values on the GPU. f16 (the default) halves the cache's
/// memory and the bytes attention reads; values round to f16 once, when written. Exported K/V is
/// f32 either way, and converting an f16 cache's values to f32 and back is exact, so K/V moves
/// between two nodes of the same dtype without change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    #[default]
    F16,
    F32,
}

impl KvDtype {
    /// Bytes a value takes in the cache.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }

    /// The cache format the kernels are rendered for (`Kernel::reads_kv`).
    pub fn format(self) -> WeightFormat {
        match self {
            KvDtype::F16 => WeightFormat::F16,
            KvDtype::F32 => WeightFormat::F32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::F32 => "f32",
        }
    }

    /// Values as the cache stores them (f16: to nearest, ties to even, as GPUs round in
    /// practice; WGSL leaves the rounding, and values beyond ±65504, to the implementation).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            KvDtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            KvDtype::F32 => bytemuck::cast_slice(values).to_vec(),
        }
    }

    /// The cache's bytes as f32 values.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            KvDtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            KvDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            other => Err(format!("unknown K/V cache dtype {other:?} (f16 or f32)")),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Receives each layer's K/V as soon as the GPU has written it.
pub trait KvSink {
    /// Called once per layer, in layer order, for every sequence of the step.
    fn layer_ready(&mut self, seq: SeqId, kv: KvLayer) -> Result<()>;
}

impl<F: FnMut(SeqId, KvLayer) -> Result<()>> KvSink for F {
    fn layer_ready(&mut self, seq: SeqId, kv: KvLayer) -> Result<()> {
        self(seq, kv)
    }
}

/// A block-table entry whose block was given back because each of its positions lies before
/// every layer's sliding window (`BlockPool::release_before`): attention never reads it again.
pub const FREED_BLOCK: u32 = u32::MAX;

/// A sequence's cache state.
#[derive(Clone, Debug, Default)]
pub struct SeqState {
    /// Physical blocks, in position order; the first ones may be shared with other sequences,
    /// and the first `freed` are `FREED_BLOCK`.
    pub blocks: Vec<u32>,
    /// Leading blocks given back (their positions are before every layer's window).
    pub freed: usize,
    /// Positions whose K/V is present in every layer.
    pub len: usize,
    /// Positions present per layer (they differ only while an import is in progress).
    pub ready: Vec<usize>,
    /// Token ids of the positions computed by steps (imported KV has none, so it is never
    /// registered in the prefix cache).
    pub tokens: Vec<u32>,
    /// Prefix hashes of the full blocks, in order, as far as `tokens` reaches.
    pub hashes: Vec<u64>,
}

impl SeqState {
    /// The first position whose K/V the cache still holds.
    pub fn live_from(&self) -> usize {
        self.freed * BLOCK_TOKENS
    }

    /// The physical cache row of position `pos` (at or after `live_from`).
    pub fn slot(&self, pos: usize) -> u32 {
        self.blocks[pos / BLOCK_TOKENS] * BLOCK_TOKENS as u32 + (pos % BLOCK_TOKENS) as u32
    }
}

/// The key of a full block in the prefix cache: a hash of every token from the start of the
/// sequence to the end of the block, chained block by block.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytemuck::cast_slice(tokens), parent.unwrap_or(0x7a6e_6465_6d00_0001))
}

/// The prefix hashes of every full block of `tokens`.
pub fn prefix_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut parent = None;
    tokens
        .chunks_exact(BLOCK_TOKENS)
        .map(|b| {
            let h = block_hash(parent, b);
            parent = Some(h);
            h
        })
        .collect()
}

/// Counts of the pool's blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub total: usize,
    /// Held by at least one sequence.
    pub used: usize,
    /// Unused but kept for the prefix cache (evicted when needed).
    pub cached: usize,
}

/// Physical KV blocks: free, held by sequences (reference-counted, since sequences with a common
/// prefix share its blocks), or unused but kept under their prefix hash for later requests and
/// evicted least recently used first when the free list runs dry.
#[derive(Debug)]
pub struct BlockPool {
    free: Vec<u32>,
    refs: Vec<u32>,
    hash: Vec<Option<u64>>,
    by_hash: std::collections::HashMap<u64, u32>,
    /// Unused cached blocks by the tick of their last release.
    evictable: std::collections::BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    tick: u64,
}

impl BlockPool {
    /// A pool of `total` blocks, all free.
    pub fn new(total: usize) -> Self {
        BlockPool {
            free: (0..total as u32).rev().collect(),
            refs: vec![0; total],
            hash: vec![None; total],
            by_hash: Default::default(),
            evictable: Default::default(),
            released_at: vec![0; total],
            tick: 0,
        }
    }

    /// Blocks a sequence could take now (free ones and evictable cached ones).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// All blocks.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    pub fn usage(&self) -> PoolUsage {
        PoolUsage { total: self.total(), used: self.total() - self.available(), cached: self.evictable.len() }
    }

    fn take(&mut self) -> Option<u32> {
        if let Some(b) = self.free.pop() {
            self.refs[b as usize] = 1;
            return Some(b);
        }
        let (_, b) = self.evictable.pop_first()?;
        if let Some(h) = self.hash[b as usize].take() {
            self.by_hash.remove(&h);
        }
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Grows `seq` to hold `len` positions, or fails without taking any block.
    pub fn reserve(&mut self, seq: &mut SeqState, len: usize) -> Result<()> {
        let need = len.div_ceil(BLOCK_TOKENS).saturating_sub(seq.blocks.len());
        if need > self.available() {
            return Err(Error::OutOfKvBlocks { needed: need, free: self.available() });
        }
        for _ in 0..need {
            if let Some(b) = self.take() {
                seq.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Drops a sequence's hold on its blocks; registered ones stay cached until evicted.
    pub fn release(&mut self, seq: SeqState) {
        // Later blocks of a sequence are released first, so a prefix outlives its tails.
        for b in seq.blocks.into_iter().rev().filter(|&b| b != FREED_BLOCK) {
            self.drop_hold(b);
        }
    }

    /// Gives back the blocks of `seq` that lie wholly before position `keep_from` (a sliding
    /// window's start that no later token reaches back past) and marks them `FREED_BLOCK`.
    /// Returns how many it gave back.
    pub fn release_before(&mut self, seq: &mut SeqState, keep_from: usize) -> usize {
        let end = (keep_from / BLOCK_TOKENS).min(seq.blocks.len());
        let start = seq.freed.min(end);
        for i in (start..end).rev() {
            let b = std::mem::replace(&mut seq.blocks[i], FREED_BLOCK);
            if b != FREED_BLOCK {
                self.drop_hold(b);
            }
        }
        seq.freed = seq.freed.max(end);
        end - start
    }

    /// One hold on `b` fewer: unheld, it becomes free, or evictable where the prefix cache knows it.
    fn drop_hold(&mut self, b: u32) {
        let i = b as usize;
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] > 0 {
            return;
        }
        if self.hash[i].is_some() {
            self.tick += 1;
            self.released_at[i] = self.tick;
            self.evictable.insert(self.tick, b);
        } else {
            self.free.push(b);
        }
    }

    /// The cached blocks of the longest prefix of `hashes` (prefix hashes of consecutive full
    /// blocks), each now held once more by the caller.
    pub fn share_prefix(&mut self, hashes: &[u64]) -> Vec<u32> {
        let mut out = Vec::new();
        for h in hashes {
            let Some(&b) = self.by_hash.get(h) else { break };
            let i = b as usize;
            if self.refs[i] == 0 {
                self.evictable.remove(&self.released_at[i]);
            }
            self.refs[i] += 1;
            out.push(b);
        }
        out
    }

    /// Makes a full, computed block findable under its prefix hash. A block whose content is
    /// already cached elsewhere (two identical prompts computed at once) stays private.
    pub fn register(&mut self, block: u32, hash: u64) {
        if self.hash[block as usize].is_none() && !self.by_hash.contains_key(&hash) {
            self.hash[block as usize] = Some(hash);
            self.by_hash.insert(hash, block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq_with(pool: &mut BlockPool, len: usize) -> SeqState {
        let mut s = SeqState::default();
        pool.reserve(&mut s, len).expect("blocks");
        s
    }

    #[test]
    fn shared_prefix_blocks_are_counted_and_survive_their_first_user() {
        let mut pool = BlockPool::new(8);
        let tokens: Vec<u32> = (0..40).collect();
        let hashes = prefix_hashes(&tokens);
        assert_eq!(hashes.len(), 2);
        let a = seq_with(&mut pool, 40);
        pool.register(a.blocks[0], hashes[0]);
        pool.register(a.blocks[1], hashes[1]);
        assert_eq!(pool.usage(), PoolUsage { total: 8, used: 3, cached: 0 });
        let shared = pool.share_prefix(&hashes);
        assert_eq!(shared, a.blocks[..2]);
        pool.release(a);
        // The shared blocks are still held; the unregistered third block went back to the free list.
        assert_eq!(pool.usage(), PoolUsage { total: 8, used: 2, cached: 0 });
        pool.release(SeqState { blocks: shared, ..Default::default() });
        assert_eq!(pool.usage(), PoolUsage { total: 8, used: 0, cached: 2 });
        // Still findable, and a different prefix is not.
        assert_eq!(pool.share_prefix(&hashes[..1]).len(), 1);
        assert!(pool.share_prefix(&prefix_hashes(&[9; 16])).is_empty());
    }

    #[test]
    fn blocks_before_a_window_go_back_and_the_table_keeps_its_positions() {
        let mut pool = BlockPool::new(8);
        let tokens: Vec<u32> = (0..48).collect();
        let hashes = prefix_hashes(&tokens);
        let mut a = seq_with(&mut pool, 48);
        pool.register(a.blocks[0], hashes[0]);
        let shared = pool.share_prefix(&hashes[..1]);
        let kept = a.blocks[2];
        // Position 35 is the first still needed: blocks 0 and 1 go, block 2 stays where it was.
        assert_eq!(pool.release_before(&mut a, 35), 2);
        assert_eq!((a.blocks.as_slice(), a.freed, a.live_from()), (&[FREED_BLOCK, FREED_BLOCK, kept][..], 2, 32));
        assert_eq!(a.slot(35), kept * BLOCK_TOKENS as u32 + 3);
        // Block 0 is still held by the sharer; block 1 is free again.
        assert_eq!(pool.usage(), PoolUsage { total: 8, used: 2, cached: 0 });
        assert_eq!(pool.release_before(&mut a, 40), 0, "nothing more before the window");
        // Growing keeps the table's positions; releasing skips the freed entries.
        pool.reserve(&mut a, 64).expect("blocks");
        assert_eq!(a.blocks.len(), 4);
        pool.release(a);
        pool.release(SeqState { blocks: shared, ..Default::default() });
        assert_eq!(pool.usage(), PoolUsage { total: 8, used: 0, cached: 1 });
    }

    #[test]
    fn cached_blocks_are_evicted_least_recently_used_first_and_only_when_needed() {
        let mut pool = BlockPool::new(4);
        let (t1, t2): (Vec<u32>, Vec<u32>) = ((0..16).collect(), (100..116).collect());
        let (h1, h2) = (prefix_hashes(&t1), prefix_hashes(&t2));
        for h in [&h1, &h2] {
            let s = seq_with(&mut pool, 16);
            pool.register(s.blocks[0], h[0]);
            pool.release(s);
        }
        assert_eq!(pool.usage().cached, 2);
        // Two free blocks are used before any cached one.
        let s = seq_with(&mut pool, 32);
        assert_eq!((pool.share_prefix(&h1).len(), pool.share_prefix(&h2).len()), (1, 1));
        pool.release(SeqState { blocks: vec![pool.by_hash[&h1[0]]], ..Default::default() });
        pool.release(SeqState { blocks: vec![pool.by_hash[&h2[0]]], ..Default::default() });
        // Now h1 was released before h2, so it goes first.
        let one = seq_with(&mut pool, 16);
        assert!(pool.share_prefix(&h1).is_empty(), "least recently used evicted");
        assert_eq!(pool.share_prefix(&h2).len(), 1);
        assert!(pool.reserve(&mut SeqState::default(), 16).is_err(), "nothing left");
        drop((s, one));
    }
}
