//! The families with no small real file reachable here (Qwen2, Qwen3, Phi-3, a Gemma 3 whose
//! 4-position sliding window the prompts outrun, Phi-3 with LongRoPE, once past its original
//! context and once within it, Qwen2 with YaRN, and Llama 3.x with its `llama3` RoPE scaling),
//! on random-weight models in each family's own layout (`tests/fixtures/families/make.py`,
//! written with the `gguf` and `safetensors` packages), against llama.cpp's logits on the GGUF
//! (llama-cpp-python, CPU); the Hugging Face directory of the same weights must load to the same
//! logits. Mistral, whose sliding window llama.cpp does not apply, and the Llama 3.x directory
//! against transformers' logits. And the weight formats no real file here holds
//! (Q2_K, Q3_K, Q5_K, Q5_1, beside Q4_K and Q6_K), in Llama-shaped models that llama.cpp's own
//! quantizer wrote, against llama.cpp's logits on those files and on their F32 twins (the same
//! values decoded by the `gguf` package).

use std::path::PathBuf;

use serde::Deserialize;
use tandem_core::{Engine, EngineConfig, HostModel, KvDtype, WeightFormat};
use tandem_tests::{ReferencePrompt, gpu};

/// llama.cpp rounds activations to f16 for its products with F16 weights, and Q and the
/// attention weights for those with its f16 K/V cache; we multiply F16 weights by f32
/// activations and keep K/V in f16. Measured 0.032 at worst over these models and prompts (0.007
/// with the same models' weights in F32).
const LOGIT_TOLERANCE: f32 = 0.1;
/// The GGUF and the Hugging Face directory hold the same weights (Gemma's norms as w and 1 + w,
/// whose sum may round): measured 0.0 at worst.
const HF_TOLERANCE: f32 = 1e-3;

#[derive(Deserialize)]
struct Fixtures {
    models: std::collections::BTreeMap<String, Vec<ReferencePrompt>>,
}

fn fixtures() -> (PathBuf, Fixtures) {
    fixtures_in("families.llamacpp.json")
}

fn fixtures_in(file: &str) -> (PathBuf, Fixtures) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/families");
    let text = std::fs::read_to_string(dir.join(file)).expect("reference file");
    (dir.clone(), serde_json::from_str(&text).expect("reference parses"))
}

fn logits(model: &HostModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    logits_in(model, tokens, false)
}

fn logits_in(model: &HostModel, tokens: &[u32], deterministic: bool) -> Vec<Vec<f32>> {
    let cfg = EngineConfig { max_batch_tokens: 32, context_length: 64, kv_dtype: KvDtype::F16, deterministic, ..Default::default() };
    let mut engine = Engine::new(gpu(), model, &cfg).expect("engine");
    let seq = engine.create_sequence();
    // One token a step after the first, so the decode path runs too.
    let mut out = engine.forward_logits(seq, &tokens[..1]).expect("forward");
    for &t in &tokens[1..] {
        out.extend(engine.forward_logits(seq, &[t]).expect("forward"));
    }
    out
}

#[test]
fn every_family_matches_llama_cpp_from_gguf_and_from_hugging_face() {
    let (dir, fixtures) = fixtures();
    assert_eq!(fixtures.models.len(), 8, "qwen2, qwen3, phi3, gemma3, phi3-longrope-long, phi3-longrope-short, qwen2-yarn, llama3");
    let mut worst = 0f32;
    let mut worst_hf = 0f32;
    for (arch, prompts) in &fixtures.models {
        let gguf = HostModel::load(&dir.join(format!("{arch}-tiny.gguf"))).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(arch.starts_with(&gguf.config.architecture), "{arch}: {}", gguf.config.architecture);
        let hf = HostModel::load(&dir.join(format!("{arch}-tiny-hf"))).unwrap_or_else(|e| panic!("{arch} HF: {e}"));
        // LongRoPE's settings: written by the converter into the GGUF (the factor as f32),
        // computed by tandem from config.json.
        let (a, b) = (hf.config.rope_attn_factor.unwrap_or(1.0), gguf.config.rope_attn_factor.unwrap_or(1.0));
        assert!((a - b).abs() < 1e-6, "{arch}: RoPE attention factor {a} (HF) against {b} (GGUF)");
        assert_eq!(hf.config.rope_original_context, gguf.config.rope_original_context, "{arch}: original context");
        assert_eq!(hf.config.rope_yarn, gguf.config.rope_yarn, "{arch}: YaRN");
        assert_eq!(hf.config.architecture, gguf.config.architecture, "{arch}: HF and GGUF configs");
        assert_eq!(hf.config.layer_window(0), gguf.config.layer_window(0), "{arch}: HF and GGUF windows");
        for p in prompts {
            // The greedy continuation too: positions past the prompt are checked by its tokens.
            let mut tokens = p.tokens.clone();
            tokens.extend(&p.greedy_tokens);
            let ours = logits(&gguf, &tokens);
            for (i, (row, want)) in ours.iter().zip(&p.positions).enumerate() {
                for (id, w) in want.top_ids.iter().zip(&want.top_logits) {
                    let d = (row[*id as usize] - w).abs();
                    worst = worst.max(d);
                    assert!(d <= LOGIT_TOLERANCE, "{arch} `{}` position {i} token {id}: {} vs llama.cpp {w}", p.name, row[*id as usize]);
                }
            }
            assert_greedy(&ours, p, LOGIT_TOLERANCE, arch);
            let theirs = logits(&hf, &tokens);
            for (a, b) in ours.iter().zip(&theirs) {
                for (x, y) in a.iter().zip(b) {
                    worst_hf = worst_hf.max((x - y).abs());
                }
            }
            assert!(worst_hf <= HF_TOLERANCE, "{arch} `{}`: HF directory logits differ by {worst_hf}", p.name);
        }
    }
    eprintln!("worst logit difference from llama.cpp: {worst}; between GGUF and HF: {worst_hf}");
}

/// transformers' logits (f32, eager attention, CPU) on the Hugging Face directories of a Mistral
/// whose 4-position window every layer applies and the prompts outrun (transformers masks keys
/// more than 3 positions back, as we do), and of the Llama 3.x whose `rope_scaling` transformers
/// turns into frequencies itself (without it, its logits move by up to 7.8). The Llama 3.x
/// directory also matches llama.cpp on the GGUF above, where its scaling is the converter's
/// `rope_freqs`.
#[test]
fn hugging_face_directories_match_transformers() {
    let (dir, fixtures) = fixtures_in("families.transformers.json");
    assert_eq!(fixtures.models.len(), 2, "mistral, llama3");
    let mut worst = 0f32;
    for (name, prompts) in &fixtures.models {
        let model = HostModel::load(&dir.join(format!("{name}-tiny-hf"))).unwrap_or_else(|e| panic!("{name}: {e}"));
        if name == "mistral" {
            let c = &model.config;
            assert!((0..c.n_layers).all(|l| c.layer_window(l) == Some(4)), "mistral: every layer windowed by 4");
        }
        for p in prompts {
            let mut tokens = p.tokens.clone();
            tokens.extend(&p.greedy_tokens);
            let ours = logits(&model, &tokens);
            let w = worst_against(&ours, p);
            worst = worst.max(w);
            assert!(w <= LOGIT_TOLERANCE, "{name} `{}`: logits {w} from transformers'", p.name);
            assert_greedy(&ours, p, LOGIT_TOLERANCE, name);
        }
    }
    eprintln!("worst logit difference from transformers: {worst}");
}

/// The formats' values, decoded by the `gguf` package into an F32 twin of each file, run through
/// llama.cpp's F32 products (no rounding of the activations): our deterministic mode (f32
/// activations, an f16 K/V cache) must land this close, so every dequantizer reads the bits as the
/// `gguf` package decodes them. Measured 0.007 at worst.
const EXACT_TOLERANCE: f32 = 0.05;
/// Our default mode against llama.cpp on the quantized files themselves: both round activations
/// to 8 bits for their products (llama.cpp to q8_K and q8_1 on the CPU), differently. llama.cpp's
/// own logits there lie up to 0.48 from its F32 twin's; ours measured 0.56 at worst.
const FORMAT_TOLERANCE: f32 = 0.75;

/// The fixture's name, and the format that must be among its tensors for it to test anything.
const FORMAT_FIXTURES: [(&str, WeightFormat); 4] = [
    ("llama-q2_k", WeightFormat::Q2K),
    ("llama-q3_k_m", WeightFormat::Q3K),
    ("llama-q5_k_m", WeightFormat::Q5K),
    ("llama-q5_1", WeightFormat::Q5_1),
];

/// The reference's greedy choices, each the argmax of `ours` (the logits of its prompt and greedy
/// continuation) while the reference's margin is clear of twice `tolerance`.
fn assert_greedy(ours: &[Vec<f32>], reference: &ReferencePrompt, tolerance: f32, what: &str) {
    for (j, (&want, &margin)) in reference.greedy_tokens.iter().zip(&reference.greedy_margins).enumerate() {
        if margin < 2.0 * tolerance {
            break;
        }
        let row = &ours[reference.tokens.len() - 1 + j];
        assert_eq!(tandem_core::cpu_ref::argmax(row), want, "{what} `{}` greedy step {j}", reference.name);
    }
}

/// The largest difference between our logits and a reference's top ones, position by position.
fn worst_against(ours: &[Vec<f32>], want: &ReferencePrompt) -> f32 {
    let mut worst = 0f32;
    for (row, pos) in ours.iter().zip(&want.positions) {
        for (id, w) in pos.top_ids.iter().zip(&pos.top_logits) {
            worst = worst.max((row[*id as usize] - w).abs());
        }
    }
    worst
}

#[test]
fn formats_no_real_file_here_holds_match_llama_cpp_on_its_own_quantized_files() {
    let (dir, fixtures) = fixtures_in("formats.llamacpp.json");
    assert_eq!(fixtures.models.len(), 2 * FORMAT_FIXTURES.len(), "each file and its F32 twin");
    let (mut exact, mut fast) = (0f32, 0f32);
    for (name, format) in FORMAT_FIXTURES {
        let model = HostModel::load(&dir.join(format!("{name}-tiny.gguf"))).unwrap_or_else(|e| panic!("{name}: {e}"));
        let formats: std::collections::BTreeSet<String> = model.tensors.values().map(|t| format!("{:?}", t.format)).collect();
        assert!(formats.contains(&format!("{format:?}")), "{name} holds {format:?}: {formats:?}");
        for (p, twin) in fixtures.models[name].iter().zip(&fixtures.models[&format!("{name}@f32")]) {
            assert_eq!(p.tokens, twin.tokens);
            // The prompt and the exact twin's greedy continuation, so positions past the prompt
            // are checked too.
            let mut tokens = twin.tokens.clone();
            tokens.extend(&twin.greedy_tokens);
            let ours = logits_in(&model, &tokens, true);
            let w = worst_against(&ours, twin);
            exact = exact.max(w);
            assert!(w <= EXACT_TOLERANCE, "{name} `{}`: logits {w} from llama.cpp's on the F32 twin ({formats:?})", p.name);
            assert_greedy(&ours, twin, EXACT_TOLERANCE, name);
            let w = worst_against(&logits_in(&model, &p.tokens, false), p);
            fast = fast.max(w);
            assert!(w <= FORMAT_TOLERANCE, "{name} `{}`: default-mode logits {w} from llama.cpp's on the file", p.name);
        }
    }
    eprintln!("worst logit difference from llama.cpp: {exact} (deterministic, F32 twins), {fast} (default, the quantized files)");
}
