//! Gemma 3 (llama.cpp's `gemma3`): RMSNorm of each query and key head before RoPE (NEOX pairs),
//! norms after attention and after the MLP before each residual sum, GeGLU with GELU's tanh
//! form, embeddings scaled by sqrt(hidden), and five sliding-window layers (RoPE base 10,000) for
//! every global one (the file's base). GGUF stores the norms' weights as 1 + w already.

use super::Family;
use crate::config::{ModelConfig, RopeLayout};
use crate::error::Result;
use crate::layer::{LayerBuilder, LayerOp};

pub struct Gemma3;

impl Family for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
    }

    fn adjust_gguf_config(&self, c: &mut ModelConfig) {
        // llama.cpp: LLAMA_ROPE_TYPE_NEOX, set_swa_pattern(6), rope_freq_base_train_swa = 10000.
        c.rope_layout = RopeLayout::Neox;
        c.swa_period = 6;
        c.rope_theta_local = Some(10_000.0);
    }

    fn extra_layer_tensors(&self, c: &ModelConfig) -> Vec<(&'static str, Vec<usize>)> {
        vec![
            ("attn_q_norm.weight", vec![c.head_dim]),
            ("attn_k_norm.weight", vec![c.head_dim]),
            ("post_attention_norm.weight", vec![c.hidden_size]),
            ("post_ffw_norm.weight", vec![c.hidden_size]),
        ]
    }

    fn embedding_scale(&self, c: &ModelConfig) -> f32 {
        (c.hidden_size as f32).sqrt()
    }

    fn layer_ops(&self, b: &LayerBuilder<'_>) -> Result<Vec<LayerOp>> {
        let mut ops = vec![b.norm("attn_norm", None)?];
        ops.extend(b.qkv()?);
        ops.push(b.head_norm("attn_q_norm", "attn_k_norm")?);
        ops.push(b.rope_kv()?);
        ops.extend(b.attention()?);
        ops.push(b.attn_output(false)?);
        ops.push(b.norm("post_attention_norm", Some(&b.act.y))?);
        ops.push(b.norm("ffn_norm", None)?);
        ops.extend(b.gate_up()?);
        ops.push(b.glu(true)?);
        ops.push(b.down(false)?);
        ops.push(b.norm("post_ffw_norm", Some(&b.act.y))?);
        Ok(ops)
    }
}
