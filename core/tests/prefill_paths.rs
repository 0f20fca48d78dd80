//! The default mode's prefill paths give the logits of the batch-invariant deterministic mode
//! within a tolerance, as the engine records them: on adapters with matrix units, attention in
//! tiles of each sequence's tokens (attention_coop.wgsl) and the tensor-core GEMM; elsewhere the
//! tiled GEMM and attention a token at a time. One prompt across attention chunks, and two
//! sequences prefilled in one step (then a decode token each, whose logits read the K/V the
//! step wrote). Also a decode step of more sequences than the 8-bit matvec's largest shape,
//! which takes it in groups, and a decode token past one attention chunk. On the synthetic `tiny` model, whose heads are 64 wide.
//! scripts/test-gpu runs it on the GPU machine too.

use tandem_core::synthetic::synthetic_model;
use tandem_core::{Engine, EngineConfig, GpuContext, StepInput, WeightFormat};

/// The default mode rounds the GEMM's inputs, and attention's queries and probabilities, to f16
/// on adapters with matrix units: relative to the row's largest logit.
const TOLERANCE: f32 = 5e-2;

fn engine(deterministic: bool) -> Engine {
    let gpu = GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter");
    let model = synthetic_model("tiny", WeightFormat::Q4_0, 5).expect("tiny model");
    let cfg = EngineConfig { max_batch_tokens: 512, context_length: 1024, deterministic, ..Default::default() };
    Engine::new(&gpu, &model, &cfg).expect("engine")
}

fn prompt(n: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + salt * 101 + 5) % 500) as u32).collect()
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
        let worst = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= TOLERANCE * scale, "{what}, row {i}: {worst} apart (largest logit {scale})");
    }
}

/// Logits of every position of a 300-token prompt (two attention chunks), prefilled in as few
/// steps as the engine takes.
fn one_prompt(e: &mut Engine) -> Vec<Vec<f32>> {
    let seq = e.create_sequence();
    let logits = e.forward_logits(seq, &prompt(300, 1)).expect("forward");
    e.free_sequence(seq);
    logits
}

/// Two sequences of 200 and 40 tokens in one step, then one more token each.
fn two_in_one_step(e: &mut Engine) -> Vec<Vec<f32>> {
    let (a, b) = (e.create_sequence(), e.create_sequence());
    e.step(&[StepInput { seq: a, tokens: prompt(200, 2), sample: None }, StepInput { seq: b, tokens: prompt(40, 3), sample: None }])
        .expect("step");
    let mut logits = e.forward_logits(a, &[7]).expect("a");
    logits.extend(e.forward_logits(b, &[9]).expect("b"));
    e.free_sequence(a);
    e.free_sequence(b);
    logits
}

/// One token after a 300-token prompt: a one-token step over two attention chunks, whose output
/// projection merges them itself (matvec_q8_merge) where the engine has the 8-bit matvec. Also
/// the kernels that token's step ran.
fn one_past_a_chunk(e: &mut Engine) -> (Vec<Vec<f32>>, Vec<String>) {
    let seq = e.create_sequence();
    e.step(&[StepInput { seq, tokens: prompt(300, 4), sample: None }]).expect("prefill");
    e.set_profiling(true).expect("profiling");
    let logits = e.forward_logits(seq, &[11]).expect("decode");
    let names = e.take_profile().iter().map(|k| k.name.to_string()).collect();
    e.set_profiling(false).expect("profiling off");
    e.free_sequence(seq);
    (logits, names)
}

/// Twelve sequences prefilled in one step, then one decode token each in one step.
fn twelve_decodes(e: &mut Engine) -> Vec<Vec<f32>> {
    let seqs: Vec<_> = (0..12).map(|_| e.create_sequence()).collect();
    let prompts: Vec<StepInput> =
        seqs.iter().enumerate().map(|(i, &seq)| StepInput { seq, tokens: prompt(20 + i, 10 + i), sample: None }).collect();
    e.step(&prompts).expect("prefill");
    let decodes: Vec<StepInput> =
        seqs.iter().enumerate().map(|(i, &seq)| StepInput { seq, tokens: vec![(i * 41 % 500) as u32], sample: None }).collect();
    let logits = e.step_logits(&decodes).expect("decode step");
    seqs.into_iter().for_each(|s| e.free_sequence(s));
    logits
}

#[test]
fn fast_prefill_gives_the_deterministic_modes_logits() {
    let (mut fast, mut exact) = (engine(false), engine(true));
    // Where the adapter has matrix units the tiles path must be what ran (scripts/test-gpu sets
    // TANDEM_REQUIRE_COOP, so the GPU machine cannot pass this without them).
    let tiles = fast.gpu().caps.has_coop_matrix();
    assert!(tiles || std::env::var_os("TANDEM_REQUIRE_COOP").is_none(), "TANDEM_REQUIRE_COOP: no cooperative matrices");
    if tiles {
        fast.set_profiling(true).expect("profiling");
    }
    let got = one_prompt(&mut fast);
    if tiles {
        assert!(fast.take_profile().iter().any(|k| k.name == "attention_coop"), "a 300-token prefill ran attention_coop");
        fast.set_profiling(false).expect("profiling off");
    }
    assert_close(&got, &one_prompt(&mut exact), "one prompt of 300 tokens");
    assert_close(&two_in_one_step(&mut fast), &two_in_one_step(&mut exact), "two sequences in one step");
    let (got, names) = one_past_a_chunk(&mut fast);
    assert!(names.iter().any(|n| n.starts_with("matvec_q8_merge")), "one token past a chunk merged in its projection: {names:?}");
    assert!(!names.iter().any(|n| n == "attention_merge"), "and recorded no merge: {names:?}");
    assert_close(&got, &one_past_a_chunk(&mut exact).0, "one token past a chunk");
    fast.set_profiling(true).expect("profiling");
    let got = twelve_decodes(&mut fast);
    let names: Vec<String> = fast.take_profile().iter().map(|k| k.name.to_string()).collect();
    assert!(names.iter().any(|n| n.starts_with("matvec_q8")), "12 decode tokens took the 8-bit matvec: {names:?}");
    assert_close(&got, &twelve_decodes(&mut exact), "twelve decode tokens in one step");
}
