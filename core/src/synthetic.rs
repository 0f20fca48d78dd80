//! Models with the exact shapes of real ones and seeded random weights, for benchmarks on
//! machines the real files cannot reach. Kernel speed does not depend on the values.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};

use crate::config::{ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::model::{HostModel, layer_tensor};
use crate::tensor::{HostTensor, TensorBytes, WeightFormat};
use crate::tokenizer::TextTokenizer;

/// Names of the shapes [`synthetic_config`] knows.
/// `tiny` is no real model: two small layers, for tests of the machinery around the model
/// (K/V transfer of long prompts, failures) where lavapipe's speed on a real shape would dominate.
pub const SYNTHETIC_MODELS: [&str; 5] = ["smollm2-135m", "smollm2-1.7b", "llama-3.2-1b", "llama-3-8b", "tiny"];

/// The shape of a known model.
pub fn synthetic_config(name: &str) -> Result<ModelConfig> {
    let (vocab, d, layers, heads, kv, ffn, theta, tied) = match name {
        "smollm2-135m" => (49152, 576, 30, 9, 3, 1536, 100000.0, true),
        "smollm2-1.7b" => (49152, 2048, 24, 32, 32, 8192, 130000.0, true),
        "llama-3.2-1b" => (128256, 2048, 16, 32, 8, 8192, 500000.0, true),
        "llama-3-8b" => (128256, 4096, 32, 32, 8, 14336, 500000.0, false),
        // Untied: with a tied head, random weights predict the token just read, and every
        // continuation repeats one token (tests comparing runs would prove little).
        "tiny" => (512, 128, 2, 2, 1, 256, 10000.0, false),
        other => return Err(Error::InvalidRequest(format!("unknown synthetic model `{other}` (known: {})", SYNTHETIC_MODELS.join(", ")))),
    };
    Ok(ModelConfig {
        architecture: "llama".into(),
        vocab_size: vocab,
        hidden_size: d,
        n_layers: layers,
        n_heads: heads,
        n_kv_heads: kv,
        head_dim: d / heads,
        ffn_size: ffn,
        rms_eps: 1e-5,
        rope_theta: theta,
        rope_layout: RopeLayout::Adjacent,
        context_length: 8192,
        tied_embeddings: tied,
        sliding_window: None,
        swa_period: 0,
        rope_theta_local: None,
        rope_linear_factor: None,
        rope_attn_factor: None,
        rope_original_context: None,
        rope_yarn: None,
        query_scale: None,
    })
}

/// Random bytes of a `rows x cols` tensor in `format`, with scales that keep activations sane.
fn random_tensor(rng: &mut rand::rngs::StdRng, format: WeightFormat, rows: usize, cols: usize) -> Vec<u8> {
    let row_bytes = format.row_bytes(cols).unwrap_or(0);
    let mut bytes = vec![0u8; rows * row_bytes];
    let scale = 0.5 / (cols as f32).sqrt();
    match format {
        WeightFormat::Q8_0 | WeightFormat::Q4_0 | WeightFormat::Q4_1 => {
            rng.fill(&mut bytes[..]);
            let (block, d) = match format {
                WeightFormat::Q8_0 => (34, scale / 127.0),
                WeightFormat::Q4_0 => (18, scale / 8.0),
                _ => (20, scale / 8.0),
            };
            let d = half::f16::from_f32(d).to_le_bytes();
            let m = half::f16::from_f32(-scale).to_le_bytes();
            for b in bytes.chunks_exact_mut(block) {
                b[..2].copy_from_slice(&d);
                if format == WeightFormat::Q4_1 {
                    b[2..4].copy_from_slice(&m);
                }
            }
        }
        // Floats and the other quantizations: random values, quantized.
        _ => {
            let mut row = vec![0f32; cols];
            for chunk in bytes.chunks_exact_mut(row_bytes) {
                row.iter_mut().for_each(|v| *v = rng.random_range(-scale..scale));
                chunk.copy_from_slice(&crate::cpu_ref::quantize_row(format, &row));
            }
        }
    }
    bytes
}

/// A model of the named shape with every matrix in `format` and f32 norms, seeded.
pub fn synthetic_model(name: &str, format: WeightFormat, seed: u64) -> Result<HostModel> {
    let config = synthetic_config(name)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let c = &config;
    let mut tensors = HashMap::new();
    let mut add = |name: String, format: WeightFormat, rows: usize, cols: usize, rng: &mut rand::rngs::StdRng| {
        let bytes = if format == WeightFormat::F32 && rows == 1 {
            (0..cols).flat_map(|_| 1f32.to_le_bytes()).collect()
        } else {
            random_tensor(rng, format, rows, cols)
        };
        let shape = if rows == 1 { vec![cols] } else { vec![cols, rows] };
        tensors.insert(name.clone(), HostTensor { name, format, shape, bytes: TensorBytes::owned(bytes) });
    };
    let (d, q, kv, f) = (c.hidden_size, c.n_heads * c.head_dim, c.kv_dim(), c.ffn_size);
    add("token_embd.weight".into(), format, c.vocab_size, d, &mut rng);
    add("output_norm.weight".into(), WeightFormat::F32, 1, d, &mut rng);
    if !c.tied_embeddings {
        add("output.weight".into(), format, c.vocab_size, d, &mut rng);
    }
    for l in 0..c.n_layers {
        add(layer_tensor(l, "attn_norm"), WeightFormat::F32, 1, d, &mut rng);
        add(layer_tensor(l, "ffn_norm"), WeightFormat::F32, 1, d, &mut rng);
        add(layer_tensor(l, "attn_q"), format, q, d, &mut rng);
        add(layer_tensor(l, "attn_k"), format, kv, d, &mut rng);
        add(layer_tensor(l, "attn_v"), format, kv, d, &mut rng);
        add(layer_tensor(l, "attn_output"), format, d, q, &mut rng);
        add(layer_tensor(l, "ffn_gate"), format, f, d, &mut rng);
        add(layer_tensor(l, "ffn_up"), format, f, d, &mut rng);
        add(layer_tensor(l, "ffn_down"), format, d, f, &mut rng);
    }
    let tokenizer = TextTokenizer::placeholder(c.vocab_size)?;
    Ok(HostModel { path: format!("synthetic:{name}:{format}").into(), config, tensors, tokenizer, regions: Default::default() })
}
