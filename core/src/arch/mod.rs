//! Model families: what each architecture reads from a file and which ops its layers record.
//! A family is one file here plus a row in [`FAMILIES`]; the engine keeps the buffers, step
//! packing and readback, and records whatever ops the family built.

mod gemma3;
mod llama;
mod phi3;
mod qwen;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::layer::{LayerBuilder, LayerOp};

/// One architecture.
pub trait Family: Sync {
    /// GGUF's `general.architecture`.
    fn name(&self) -> &'static str;

    /// Settings GGUF leaves implicit for this architecture (llama.cpp's per-architecture
    /// defaults), applied after the generic metadata is read.
    fn adjust_gguf_config(&self, _config: &mut ModelConfig) {}

    /// Settings of a Hugging Face `config.json` beyond the generic ones (read by `from_hf_json`).
    fn adjust_hf_config(&self, _config: &mut ModelConfig, _json: &serde_json::Value) {}

    /// The GGUF name (`attn_q`) of a Hugging Face layer module (`self_attn.q_proj`), where this
    /// family names it differently from Llama.
    fn hf_module(&self, _module: &str) -> Option<&'static str> {
        None
    }

    /// What Hugging Face checkpoints store less than GGUF in every norm weight (Gemma's norms
    /// scale by 1 + w; llama.cpp's converter adds the 1).
    fn hf_norm_offset(&self) -> f32 {
        0.0
    }

    /// A layer's tensors (without the `blk.N.` prefix) with their shapes: by default Llama's
    /// nine (norms before attention and MLP, Q/K/V/O, gate/up/down) plus `extra_layer_tensors`.
    fn layer_tensors(&self, c: &ModelConfig) -> Vec<(&'static str, Vec<usize>)> {
        let (d, f, q, kv) = (c.hidden_size, c.ffn_size, c.n_heads * c.head_dim, c.kv_dim());
        let mut t = vec![
            ("attn_norm.weight", vec![d]),
            ("attn_q.weight", vec![d, q]),
            ("attn_k.weight", vec![d, kv]),
            ("attn_v.weight", vec![d, kv]),
            ("attn_output.weight", vec![q, d]),
            ("ffn_norm.weight", vec![d]),
            ("ffn_gate.weight", vec![d, f]),
            ("ffn_up.weight", vec![d, f]),
            ("ffn_down.weight", vec![f, d]),
        ];
        t.extend(self.extra_layer_tensors(c));
        t
    }

    /// Tensors beyond Llama's nine.
    fn extra_layer_tensors(&self, _config: &ModelConfig) -> Vec<(&'static str, Vec<usize>)> {
        Vec::new()
    }

    /// The factor the token embeddings are scaled by.
    fn embedding_scale(&self, _config: &ModelConfig) -> f32 {
        1.0
    }

    /// The ops of layer `b.layer`, in order.
    fn layer_ops(&self, b: &LayerBuilder<'_>) -> Result<Vec<LayerOp>>;
}

/// Llama's layer, which most families share: pre-norms, the Q/K/V ops `qkv` then `after_qkv`
/// (Qwen2's biases) and `rope` (`rope_kv`, or Qwen3's `norm_rope_kv`), attention, O added into
/// the residual, the gate/up ops `gate_up`, SwiGLU, down added into the residual.
fn pre_norm_layer(
    b: &LayerBuilder<'_>,
    qkv: Vec<LayerOp>,
    after_qkv: Option<LayerOp>,
    rope: LayerOp,
    gate_up: Vec<LayerOp>,
) -> Result<Vec<LayerOp>> {
    let mut ops = Vec::new();
    match after_qkv {
        // The Q/K/V matvec rotates and caches itself only in place of plain RoPE.
        None if rope.is_plain_rope() => ops.extend(b.normed("attn_norm", b.rotating(qkv)?)?),
        None => ops.extend(b.normed("attn_norm", qkv)?),
        Some(after) => {
            ops.extend(b.normed("attn_norm", qkv)?);
            ops.push(after);
        }
    }
    ops.push(rope);
    ops.extend(b.attended(true)?);
    let (gate_up, glu) = b.gated(gate_up, false)?;
    ops.extend(b.normed("ffn_norm", gate_up)?);
    ops.push(glu);
    ops.push(b.down(true)?);
    Ok(ops)
}

/// Every family tandem runs.
pub static FAMILIES: &[&dyn Family] = &[&llama::Llama, &gemma3::Gemma3, &qwen::Qwen2, &qwen::Qwen3, &phi3::Phi3];

/// Llama's Hugging Face layer modules by GGUF name, which most families share.
pub fn llama_hf_module(module: &str) -> Option<&'static str> {
    Some(match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.qkv_proj" => "attn_qkv",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    })
}

/// The family of a GGUF architecture name.
pub fn family(architecture: &str) -> Option<&'static dyn Family> {
    FAMILIES.iter().copied().find(|f| f.name() == architecture)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma3_windows_five_layers_in_six_and_scales_only_the_global_ones() {
        let mut c = crate::synthetic::synthetic_config("smollm2-135m").expect("config");
        c.architecture = "gemma3".into();
        c.sliding_window = Some(512);
        family("gemma3").expect("gemma3").adjust_gguf_config(&mut c);
        c.rope_linear_factor = Some(8.0);
        let windows: Vec<bool> = (0..12).map(|l| c.layer_window(l).is_some()).collect();
        assert_eq!(windows, [true, true, true, true, true, false, true, true, true, true, true, false]);
        assert_eq!((c.layer_rope_theta(0), c.layer_rope_divisor(0)), (10_000.0, 1.0));
        assert_eq!((c.layer_rope_theta(5), c.layer_rope_divisor(5)), (c.rope_theta, 8.0));
        // The 27B model's queries are scaled by its query_pre_attn_scalar, 168, not head_dim.
        let mut big = c.clone();
        big.n_layers = 62;
        (big.hidden_size, big.n_heads, big.head_dim) = (5376, 32, 128);
        family("gemma3").expect("gemma3").adjust_gguf_config(&mut big);
        assert!((big.attention_scale() - 1.0 / 168f64.sqrt()).abs() < 1e-12);
        let mut hf = c.clone();
        family("gemma3").expect("gemma3").adjust_hf_config(&mut hf, &serde_json::json!({"query_pre_attn_scalar": 168}));
        assert!((hf.attention_scale() - 1.0 / 168f64.sqrt()).abs() < 1e-12);
        assert_eq!(c.attention_scale(), 1.0 / (c.head_dim as f64).sqrt(), "smaller models: head_dim");
        // Llama's linear scaling covers every layer.
        let mut l = crate::synthetic::synthetic_config("smollm2-135m").expect("config");
        l.rope_linear_factor = Some(4.0);
        assert!((0..l.n_layers).all(|i| l.layer_rope_divisor(i) == 4.0));
    }
}
