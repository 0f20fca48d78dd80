//! Qwen2/2.5 and Qwen3 (llama.cpp's `qwen2`, `qwen3`): Llama's layer with RoPE on NEOX pairs (the
//! GGUF keeps Hugging Face's Q/K layout), plus biases on Q, K and V (Qwen2) or an RMSNorm of each
//! query and key head before RoPE (Qwen3).

use super::Family;
use crate::config::{ModelConfig, RopeLayout};
use crate::error::Result;
use crate::layer::{LayerBuilder, LayerOp};

pub struct Qwen2;

impl Family for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }

    fn adjust_gguf_config(&self, c: &mut ModelConfig) {
        c.rope_layout = RopeLayout::Neox;
    }

    fn extra_layer_tensors(&self, c: &ModelConfig) -> Vec<(&'static str, Vec<usize>)> {
        let q = c.n_heads * c.head_dim;
        vec![("attn_q.bias", vec![q]), ("attn_k.bias", vec![c.kv_dim()]), ("attn_v.bias", vec![c.kv_dim()])]
    }

    fn layer_ops(&self, b: &LayerBuilder<'_>) -> Result<Vec<LayerOp>> {
        super::pre_norm_layer(b, b.qkv()?, Some(b.qkv_bias()?), b.rope_kv()?, b.gate_up()?)
    }
}

pub struct Qwen3;

impl Family for Qwen3 {
    fn name(&self) -> &'static str {
        "qwen3"
    }

    fn adjust_gguf_config(&self, c: &mut ModelConfig) {
        c.rope_layout = RopeLayout::Neox;
    }

    fn extra_layer_tensors(&self, c: &ModelConfig) -> Vec<(&'static str, Vec<usize>)> {
        vec![("attn_q_norm.weight", vec![c.head_dim]), ("attn_k_norm.weight", vec![c.head_dim])]
    }

    fn layer_ops(&self, b: &LayerBuilder<'_>) -> Result<Vec<LayerOp>> {
        super::pre_norm_layer(b, b.qkv()?, None, b.norm_rope_kv("attn_q_norm", "attn_k_norm")?, b.gate_up()?)
    }
}
