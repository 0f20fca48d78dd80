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
        // llama.cpp: the 27B model (62 layers) scales queries by 1 / sqrt(n_embd / n_head), the
        // others by 1 / sqrt(head_dim) (their query_pre_attn_scalar).
        if c.n_layers == 62 {
            c.query_scale = Some(1.0 / (c.hidden_size as f64 / c.n_heads as f64).sqrt());
        }
    }

    fn adjust_hf_config(&self, c: &mut ModelConfig, json: &serde_json::Value) {
        c.sliding_window = json["sliding_window"].as_u64().map(|w| w as usize);
        c.swa_period = json["sliding_window_pattern"].as_u64().map_or(6, |p| p as usize);
        if let Some(types) = json["layer_types"].as_array() {
            // Newer configs list each layer; the period is where the first global layer ends.
            if let Some(first_global) = types.iter().position(|t| t.as_str() == Some("full_attention")) {
                c.swa_period = first_global + 1;
            }
        }
        c.rope_theta_local = Some(json["rope_local_base_freq"].as_f64().unwrap_or(10_000.0));
        if let Some(q) = json["query_pre_attn_scalar"].as_f64().filter(|&q| q > 0.0 && q != c.head_dim as f64) {
            c.query_scale = Some(1.0 / q.sqrt());
        }
    }

    fn hf_module(&self, module: &str) -> Option<&'static str> {
        Some(match module {
            "post_attention_layernorm" => "post_attention_norm",
            "pre_feedforward_layernorm" => "ffn_norm",
            "post_feedforward_layernorm" => "post_ffw_norm",
            _ => return None,
        })
    }

    fn hf_norm_offset(&self) -> f32 {
        1.0
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
        let mut ops = b.normed("attn_norm", b.qkv()?)?;
        ops.push(b.norm_rope_kv("attn_q_norm", "attn_k_norm")?);
        ops.extend(b.attended(false)?);
        ops.push(b.norm("post_attention_norm", Some(&b.act.y))?);
        let (gate_up, glu) = b.gated(b.gate_up()?, true)?;
        ops.extend(b.normed("ffn_norm", gate_up)?);
        ops.push(glu);
        ops.push(b.down(false)?);
        ops.push(b.norm("post_ffw_norm", Some(&b.act.y))?);
        Ok(ops)
    }
}
