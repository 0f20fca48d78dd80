//! Llama and the models that share its layer (SmolLM2, Llama 2/3.x): pre-norms, SwiGLU, the
//! projections added straight into the residual stream.

use super::Family;
use crate::error::Result;
use crate::layer::{LayerBuilder, LayerOp};

pub struct Llama;

impl Family for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn layer_ops(&self, b: &LayerBuilder<'_>) -> Result<Vec<LayerOp>> {
        let mut ops = vec![b.norm("attn_norm", None)?];
        ops.extend(b.qkv()?);
        ops.push(b.rope_kv()?);
        ops.extend(b.attention()?);
        ops.push(b.attn_output(true)?);
        ops.push(b.norm("ffn_norm", None)?);
        ops.extend(b.gate_up()?);
        ops.push(b.glu(false)?);
        ops.push(b.down(true)?);
        Ok(ops)
    }
}
