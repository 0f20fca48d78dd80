//! CPU twins of the WGSL structs the engine writes into GPU buffers. Field order, sizes and
//! padding must match the WGSL declarations; `tests/validate.rs` checks them with naga.

use bytemuck::{Pod, Zeroable};

/// Per-step header (`Step` in common.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Step {
    pub n_tokens: u32,
    pub n_sample: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// One token of a step (`TokenInfo` in common.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TokenInfo {
    pub id: u32,
    pub pos: u32,
    pub slot: u32,
    pub table_off: u32,
    pub chunk_off: u32,
}

/// Static shape of one matmul weight part (`MatmulParams` in matmul.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MatmulParams {
    pub n: u32,
    pub k: u32,
    pub y_stride: u32,
    pub x_stride: u32,
    pub y_offset: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// Static shape of one embedding-table part (`EmbedParams` in embed.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EmbedParams {
    pub row_start: u32,
    pub row_count: u32,
    pub dim: u32,
    pub _pad: u32,
}

/// Sampling settings of one sampled row (`SampleParams` in sample.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct SampleParams {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u32,
    pub counter: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}
