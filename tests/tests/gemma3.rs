//! Gemma 3 270M Q4_K_M, a real file nobody here wrote (Q4_K, Q6_K, Q5_0 and Q8_0 tensors, a
//! SentencePiece vocabulary, sliding-window layers), against llama.cpp's tokenization, logits and
//! greedy text (`gemma3-270m-q4_k_m.llamacpp.json`).

use tandem_core::{Engine, EngineConfig, SamplingParams, StepInput};
use tandem_tests::{gemma3_model, gpu, reference_file};

const REFERENCE: &str = "gemma3-270m-q4_k_m.llamacpp.json";
/// Our default mode's logits may differ from llama.cpp's CPU logits by this much. Both quantize
/// activations to 8 bits inside quantized dot products, but differently (llama.cpp per 256 for
/// K-quants, we per 32), and llama.cpp's GELU is a table of f16 inputs.
const LOGIT_TOLERANCE: f32 = 0.75;

#[test]
fn tokenization_matches_llama_cpp() {
    let model = gemma3_model();
    for p in reference_file(REFERENCE) {
        let ours = model.tokenizer.encode_prompt(&p.text, p.special).expect("encodes");
        assert_eq!(ours, p.tokens, "prompt `{}`", p.name);
        // Decoding gives the text back (BOS is a control token, so it has no text).
        assert_eq!(model.tokenizer.decode(&ours[1..]).expect("decodes"), p.text, "prompt `{}`", p.name);
    }
}

#[test]
fn logits_and_greedy_text_match_llama_cpp() {
    let model = gemma3_model();
    let cfg = EngineConfig { max_batch_tokens: 64, context_length: 128, ..Default::default() };
    let mut engine = Engine::new(gpu(), model, &cfg).expect("engine");
    let mut worst = 0f32;
    for p in reference_file(REFERENCE) {
        let seq = engine.create_sequence();
        let logits = engine.forward_logits(seq, &p.tokens).expect("forward");
        for (i, (ours, want)) in logits.iter().zip(&p.positions).enumerate() {
            for (id, want_logit) in want.top_ids.iter().zip(&want.top_logits).take(5) {
                let got = ours[*id as usize];
                worst = worst.max((got - want_logit).abs());
                assert!((got - want_logit).abs() <= LOGIT_TOLERANCE, "`{}` position {i} token {id}: {got} vs llama.cpp {want_logit}", p.name);
            }
            let margin = want.top_logits[0] - want.top_logits[1];
            if margin > 2.0 * LOGIT_TOLERANCE {
                assert_eq!(tandem_core::cpu_ref::argmax(ours), want.top_ids[0], "`{}` position {i}: top-1 (margin {margin})", p.name);
            }
        }
        engine.free_sequence(seq);

        let usable = p.usable_steps.unwrap_or(0).min(p.greedy_tokens.len());
        let seq = engine.create_sequence();
        let n = p.tokens.len();
        let first = engine
            .step(&[StepInput { seq, tokens: p.tokens.clone(), sample: Some(SamplingParams::greedy()) }])
            .expect("prefill")[0]
            .expect("sampled");
        let mut got = vec![first];
        engine
            .decode_run(seq, first, usable.saturating_sub(1), SamplingParams::greedy(), |t| {
                got.push(t);
                Ok(true)
            })
            .expect("decode");
        got.truncate(usable);
        assert_eq!(got, p.greedy_tokens[..usable], "`{}`: greedy tokens after {n} prompt tokens", p.name);
        engine.free_sequence(seq);
    }
    eprintln!("worst logit difference from llama.cpp: {worst}");
}
