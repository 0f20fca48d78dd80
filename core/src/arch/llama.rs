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
        super::pre_norm_layer(b, b.qkv()?, None, b.rope_kv()?, b.gate_up()?)
    }
}
