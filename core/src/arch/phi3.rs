//! Phi-3 (llama.cpp's `phi3`): Llama's layer with Q, K and V in one fused matrix (`attn_qkv`,
//! Q's rows first) and gate and up in one (`ffn_up`, the gate's rows first), RoPE on NEOX pairs.
//! The 128k-context models' LongRoPE (`rope_factors_long`/`_short` and an attention factor on
//! cos and sin) is read by the engine's RoPE tables like any per-frequency factors.

use super::Family;
use crate::config::{ModelConfig, RopeLayout};
use crate::error::Result;
use crate::layer::{LayerBuilder, LayerOp};

pub struct Phi3;

impl Family for Phi3 {
    fn name(&self) -> &'static str {
        "phi3"
    }

    fn adjust_gguf_config(&self, c: &mut ModelConfig) {
        c.rope_layout = RopeLayout::Neox;
        // llama.cpp gives Phi-3's window no layer (a pattern of 1).
        c.sliding_window = None;
    }

    fn layer_tensors(&self, c: &ModelConfig) -> Vec<(&'static str, Vec<usize>)> {
        let (d, f, q) = (c.hidden_size, c.ffn_size, c.n_heads * c.head_dim);
        vec![
            ("attn_norm.weight", vec![d]),
            ("attn_qkv.weight", vec![d, c.qkv_dim()]),
            ("attn_output.weight", vec![q, d]),
            ("ffn_norm.weight", vec![d]),
            ("ffn_up.weight", vec![d, 2 * f]),
            ("ffn_down.weight", vec![f, d]),
        ]
    }

    fn layer_ops(&self, b: &LayerBuilder<'_>) -> Result<Vec<LayerOp>> {
        super::pre_norm_layer(b, b.qkv_fused("attn_qkv")?, None, b.rope_kv()?, b.gate_up_fused("ffn_up")?)
    }
}
