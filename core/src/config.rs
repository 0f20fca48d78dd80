//! The resolved shape of a Llama-family model, read from GGUF metadata or a Hugging Face
//! `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// Which pairs of a head's dimensions RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeLayout {
    /// (2i, 2i+1): GGUF permutes Q/K rows at conversion so this applies.
    Adjacent,
    /// (i, i + head_dim/2): Hugging Face checkpoints.
    Neox,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_size: usize,
    pub rms_eps: f32,
    pub rope_theta: f64,
    pub rope_layout: RopeLayout,
    pub context_length: usize,
    pub tied_embeddings: bool,
    /// Keys a sliding-window layer attends to, its own position included (llama.cpp's standard
    /// window); None: every layer sees the whole prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// With a window: the last layer of every `swa_period` is global, the others windowed (Gemma
    /// 3: 6); 0 windows every layer (Mistral v0.1).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub swa_period: usize,
    /// RoPE base of the windowed layers where it differs from `rope_theta` (Gemma 3: 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta_local: Option<f64>,
    /// Linear RoPE scaling: positions divided by this factor (`rope.scaling.type = linear`), in
    /// every layer with the model's own base (Gemma 3's local layers keep theirs unscaled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_linear_factor: Option<f64>,
    /// What RoPE's cos and sin are multiplied by (`rope.scaling.attn_factor`; LongRoPE's
    /// sqrt(1 + ln(scale) / ln(original context))); None: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_attn_factor: Option<f64>,
    /// The context the model was trained at before its RoPE was scaled
    /// (`rope.scaling.original_context_length`), where it differs from `context_length`: YaRN's
    /// ramp is measured over it, and LongRoPE's long factors apply to contexts past it, the short
    /// ones within it, as llama.cpp chooses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_original_context: Option<usize>,
    /// YaRN RoPE scaling (`rope.scaling.type = yarn`, HF `rope_scaling` of type `yarn`), in the
    /// layers linear scaling would cover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_yarn: Option<Yarn>,
    /// What attention's queries are scaled by where it is not 1 / sqrt(head_dim) (Gemma 3 27B's
    /// `query_pre_attn_scalar` of 168: 1 / sqrt(168)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_scale: Option<f64>,
}

/// YaRN's settings: positions interpolated by `factor` in the low frequencies and extrapolated
/// in the high ones, with a ramp between the dimensions `beta_fast` and `beta_slow` rotations
/// over the original context mark (llama.cpp's defaults: 32 and 1).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Yarn {
    pub factor: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
}

impl Yarn {
    /// Each frequency's divisor for a RoPE base `theta` over `head_dim` dimensions from an
    /// `original` context, and the factor on cos and sin, as llama.cpp applies them
    /// (`ggml_rope_yarn_corr_dims`, `rope_yarn`, and llama_context's attention factor, which
    /// nets to 1 + 0.1 ln(factor)).
    pub fn divisors(&self, theta: f64, head_dim: usize, original: usize) -> (Vec<f64>, f64) {
        let n = head_dim as f64;
        let corr = |beta: f64| n * (original as f64 / (beta * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
        let low = corr(self.beta_fast).floor().max(0.0);
        let high = corr(self.beta_slow).ceil().min(n - 1.0);
        let divisors = (0..head_dim / 2)
            .map(|i| {
                let y = (i as f64 - low) / (high - low).max(0.001);
                let mix = 1.0 - y.clamp(0.0, 1.0);
                1.0 / ((1.0 - mix) / self.factor + mix)
            })
            .collect();
        let mscale = if self.factor > 1.0 { 1.0 + 0.1 * self.factor.ln() } else { 1.0 };
        (divisors, mscale)
    }
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl ModelConfig {
    /// Columns of the fused Q, K and V projections' output.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    /// Width of one position's K (or V) in one layer.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Bytes of K and V a cached position takes over all layers, at `value_bytes` a value.
    pub fn kv_bytes_per_token(&self, value_bytes: usize) -> u64 {
        (2 * self.n_layers * self.kv_dim() * value_bytes) as u64
    }

    /// The window of layer `l`, if it is a sliding-window layer.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        let w = self.sliding_window?;
        (self.swa_period == 0 || l % self.swa_period < self.swa_period - 1).then_some(w)
    }

    /// The RoPE base of layer `l`.
    pub fn layer_rope_theta(&self, l: usize) -> f64 {
        match (self.layer_window(l), self.rope_theta_local) {
            (Some(_), Some(local)) => local,
            _ => self.rope_theta,
        }
    }

    /// Whether layer `l` takes the model's RoPE scaling (linear, YaRN): every layer but Gemma 3's
    /// local ones, which keep their own base unscaled.
    pub fn layer_rope_scaled(&self, l: usize) -> bool {
        !(self.layer_window(l).is_some() && self.rope_theta_local.is_some())
    }

    /// What attention scales its queries by.
    pub fn attention_scale(&self) -> f64 {
        self.query_scale.unwrap_or(1.0 / (self.head_dim as f64).sqrt())
    }

    /// What tells layer `l`'s RoPE table from other layers': its base and whether it is scaled.
    pub fn layer_rope_key(&self, l: usize) -> (u64, bool) {
        (self.layer_rope_theta(l).to_bits(), self.layer_rope_scaled(l))
    }

    /// The context before RoPE scaling (`rope_original_context`, else the model's own).
    pub fn original_context(&self) -> usize {
        self.rope_original_context.unwrap_or(self.context_length)
    }

    /// What layer `l` divides its RoPE frequencies by (linear scaling; 1 without).
    pub fn layer_rope_divisor(&self, l: usize) -> f64 {
        if self.layer_rope_scaled(l) { self.rope_linear_factor.unwrap_or(1.0) } else { 1.0 }
    }

    /// The model family that runs this architecture.
    pub fn family(&self) -> Option<&'static dyn crate::arch::Family> {
        crate::arch::family(&self.architecture)
    }

    /// Checks the shape is one the kernels handle.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |reason: String| Err(Error::Config { path: path.into(), reason });
        if self.family().is_none() {
            return err(format!(
                "architecture `{}` is not supported (tandem runs {})",
                self.architecture,
                crate::arch::FAMILIES.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
            ));
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return err(format!("{} attention heads cannot share {} KV heads", self.n_heads, self.n_kv_heads));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(32) || self.head_dim > 256 {
            return err(format!("head dimension {} is not a multiple of 32 up to 256", self.head_dim));
        }
        if self.sliding_window == Some(0) {
            return err("sliding window of 0 positions".into());
        }
        if self.hidden_size == 0 || self.ffn_size == 0 || self.n_layers == 0 || self.vocab_size == 0 {
            return err("a model dimension is zero".into());
        }
        if self.context_length == 0 {
            return err("context length is zero".into());
        }
        // Far above any real model; keeps every product of two dimensions well inside a u64.
        const MAX_DIM: usize = 1 << 24;
        for (field, v) in [
            ("hidden size", self.hidden_size),
            ("feed-forward size", self.ffn_size),
            ("vocabulary size", self.vocab_size),
            ("attention heads", self.n_heads),
            ("layers", self.n_layers),
        ] {
            if v > MAX_DIM {
                return err(format!("{field} {v} is implausible (more than {MAX_DIM})"));
            }
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0 && self.rms_eps < 1.0) {
            return err(format!("RMS norm epsilon {} is not a small positive number", self.rms_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return err(format!("RoPE base {} is not a positive number", self.rope_theta));
        }
        if let Some(f) = self.rope_linear_factor
            && !(f.is_finite() && f > 0.0)
        {
            return err(format!("RoPE scaling factor {f} is not a positive number"));
        }
        if let Some(f) = self.rope_attn_factor
            && !(f.is_finite() && f > 0.0 && f < 16.0)
        {
            return err(format!("RoPE attention factor {f} is not a plausible positive number"));
        }
        if let Some(q) = self.query_scale
            && !(q.is_finite() && q > 0.0 && q <= 1.0)
        {
            return err(format!("query scale {q} is not in (0, 1]"));
        }
        if self.rope_original_context == Some(0) {
            return err("original context of 0 positions".into());
        }
        if let Some(y) = self.rope_yarn
            && !(y.factor.is_finite()
                && y.factor > 0.0
                && y.beta_fast.is_finite()
                && y.beta_slow.is_finite()
                && y.beta_fast > y.beta_slow
                && y.beta_slow > 0.0)
        {
            return err(format!("YaRN settings {y:?} are implausible"));
        }
        Ok(())
    }

    /// Reads the `llama.*` metadata of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = &file.path;
        let missing = |key: &str| Error::Config { path: path.clone(), reason: format!("missing or invalid metadata `{key}`") };
        let arch = file.get("general.architecture").and_then(|v| v.as_str()).ok_or_else(|| missing("general.architecture"))?.to_string();
        let uint = |key: &str| -> Result<usize> {
            let full = format!("{arch}.{key}");
            file.get(&full).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| missing(&full))
        };
        let hidden_size = uint("embedding_length")?;
        let n_heads = uint("attention.head_count")?;
        let n_kv_heads = uint("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = uint("attention.key_length").unwrap_or(hidden_size.checked_div(n_heads).unwrap_or(0));
        let vocab_size = match uint("vocab_size") {
            Ok(v) => v,
            Err(_) => file
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| missing("tokenizer.ggml.tokens"))?,
        };
        let float = |key: &str, default: f64| file.get(&format!("{arch}.{key}")).and_then(|v| v.as_f64()).unwrap_or(default);
        let tied = !file.tensors.iter().any(|t| t.name == "output.weight");
        let mut cfg = ModelConfig {
            vocab_size,
            hidden_size,
            n_layers: uint("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_size: uint("feed_forward_length")?,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5) as f32,
            rope_theta: float("rope.freq_base", 10000.0),
            rope_layout: RopeLayout::Adjacent,
            context_length: uint("context_length")?,
            tied_embeddings: tied,
            sliding_window: uint("attention.sliding_window").ok(),
            swa_period: 0,
            rope_theta_local: None,
            rope_linear_factor: None,
            rope_attn_factor: file.get(&format!("{arch}.rope.scaling.attn_factor")).and_then(|v| v.as_f64()),
            rope_original_context: uint("rope.scaling.original_context_length").ok(),
            rope_yarn: None,
            query_scale: None,
            architecture: arch.clone(),
        };
        match file.get(&format!("{arch}.rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => {}
            Some("linear") => cfg.rope_linear_factor = Some(float("rope.scaling.factor", 1.0)),
            Some("yarn") => {
                if float("rope.scaling.yarn_log_multiplier", 0.0) != 0.0 {
                    return Err(Error::Config {
                        path: path.clone(),
                        reason: "YaRN with a log multiplier (DeepSeek's) is not supported".into(),
                    });
                }
                cfg.rope_yarn = Some(Yarn {
                    factor: float("rope.scaling.factor", 1.0),
                    beta_fast: float("rope.scaling.yarn_beta_fast", 32.0),
                    beta_slow: float("rope.scaling.yarn_beta_slow", 1.0),
                });
            }
            Some(other) => {
                return Err(Error::Config {
                    path: path.clone(),
                    reason: format!("RoPE scaling `{other}` is not supported (linear and yarn are)"),
                });
            }
        }
        if let Some(family) = cfg.family() {
            family.adjust_gguf_config(&mut cfg);
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| Error::Config { path: path.into(), reason: e.to_string() })?;
        let model_type = hf.model_type.clone().unwrap_or_default();
        let architecture = match model_type.as_str() {
            "llama" | "mistral" => "llama".to_string(),
            "gemma3_text" => "gemma3".to_string(),
            "" if hf.architectures.iter().any(|a| a == "LlamaForCausalLM") => "llama".to_string(),
            other => other.to_string(),
        };
        let n_heads = hf.num_attention_heads;
        let cfg = ModelConfig {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            n_layers: hf.num_hidden_layers,
            n_heads,
            n_kv_heads: hf.num_key_value_heads.unwrap_or(n_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size.checked_div(n_heads).unwrap_or(0)),
            ffn_size: hf.intermediate_size,
            rms_eps: hf.rms_norm_eps.unwrap_or(1e-5) as f32,
            rope_theta: hf.rope_theta.unwrap_or(10000.0),
            rope_layout: RopeLayout::Neox,
            context_length: hf.max_position_embeddings.unwrap_or(2048),
            tied_embeddings: hf.tie_word_embeddings.unwrap_or(model_type == "gemma3_text"),
            // Mistral v0.1's window covers every layer; families with a pattern set their own.
            sliding_window: if model_type == "mistral" { hf.sliding_window } else { None },
            swa_period: 0,
            rope_theta_local: None,
            rope_linear_factor: None,
            rope_attn_factor: None,
            rope_original_context: None,
            rope_yarn: None,
            query_scale: None,
        };
        let mut cfg = cfg;
        // `rope_scaling`: what it sets in the configuration; Llama 3's and LongRoPE's
        // per-frequency factors become tensors as the model loads (`model.rs`).
        let scaling = &hf.rope_scaling;
        let factor = scaling["factor"].as_f64().unwrap_or(1.0);
        let original = scaling["original_max_position_embeddings"].as_u64().or(hf.original_max_position_embeddings).map(|v| v as usize);
        match rope_scaling_kind(scaling) {
            "" | "default" | "llama3" => {}
            "linear" => cfg.rope_linear_factor = Some(factor),
            "yarn" => {
                cfg.rope_original_context = original;
                cfg.rope_yarn = Some(Yarn {
                    factor,
                    beta_fast: scaling["beta_fast"].as_f64().unwrap_or(32.0),
                    beta_slow: scaling["beta_slow"].as_f64().unwrap_or(1.0),
                });
            }
            "longrope" | "su" => {
                // llama.cpp's converter: sqrt(1 + ln(scale) / ln(original)) for a context scaled
                // past the original one.
                let original = original.filter(|&o| o > 1).ok_or_else(|| Error::Config {
                    path: path.into(),
                    reason: "LongRoPE without original_max_position_embeddings".into(),
                })?;
                let scale = cfg.context_length as f64 / original as f64;
                cfg.rope_original_context = Some(original);
                cfg.rope_attn_factor = Some(if scale > 1.0 { (1.0 + scale.ln() / (original as f64).ln()).sqrt() } else { 1.0 });
            }
            other => {
                return Err(Error::Config {
                    path: path.into(),
                    reason: format!("rope_scaling of type `{other}` is not supported (linear, llama3, yarn and longrope are)"),
                });
            }
        }
        if let Some(family) = cfg.family() {
            let json: serde_json::Value =
                serde_json::from_str(text).map_err(|e| Error::Config { path: path.into(), reason: e.to_string() })?;
            family.adjust_hf_config(&mut cfg, &json);
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The Hugging Face `config.json` for this model (used by `export-hf`).
    pub fn to_hf_json(&self, bos: Option<u32>, eos: Option<u32>, dtype: &str) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_size,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context_length,
            "tie_word_embeddings": self.tied_embeddings,
            "hidden_act": "silu",
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": dtype,
        })
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<usize>,
    original_max_position_embeddings: Option<u64>,
    #[serde(default)]
    rope_scaling: serde_json::Value,
}

/// The kind of a Hugging Face `rope_scaling` (`rope_type`, or the older `type`); "" without one.
pub(crate) fn rope_scaling_kind(scaling: &serde_json::Value) -> &str {
    scaling["rope_type"].as_str().or_else(|| scaling["type"].as_str()).unwrap_or("")
}
