//! The paged KV cache's bookkeeping: fixed-size blocks, a free list, per-sequence block tables,
//! and the layer-by-layer export/import types.

use crate::error::{Error, Result};

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

/// A sequence's cache state.
#[derive(Clone, Debug, Default)]
pub struct SeqState {
    /// Physical blocks, in position order.
    pub blocks: Vec<u32>,
    /// Positions whose K/V is present in every layer.
    pub len: usize,
    /// Positions present per layer (they differ only while an import is in progress).
    pub ready: Vec<usize>,
}

impl SeqState {
    /// The physical cache row of position `pos`.
    pub fn slot(&self, pos: usize) -> u32 {
        self.blocks[pos / BLOCK_TOKENS] * BLOCK_TOKENS as u32 + (pos % BLOCK_TOKENS) as u32
    }
}

/// The free list of physical blocks.
#[derive(Debug)]
pub struct BlockPool {
    free: Vec<u32>,
    total: usize,
}

impl BlockPool {
    /// A pool of `total` blocks, all free.
    pub fn new(total: usize) -> Self {
        BlockPool { free: (0..total as u32).rev().collect(), total }
    }

    /// Free blocks.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// All blocks.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Grows `seq` to hold `len` positions, or fails without taking any block.
    pub fn reserve(&mut self, seq: &mut SeqState, len: usize) -> Result<()> {
        let need = len.div_ceil(BLOCK_TOKENS).saturating_sub(seq.blocks.len());
        if need > self.free.len() {
            return Err(Error::OutOfKvBlocks { needed: need, free: self.free.len() });
        }
        for _ in 0..need {
            if let Some(b) = self.free.pop() {
                seq.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Returns a sequence's blocks to the pool.
    pub fn release(&mut self, seq: SeqState) {
        self.free.extend(seq.blocks);
    }
}
