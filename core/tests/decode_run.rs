//! Decoding steps back to back with the sampled ids kept on the GPU (`Engine::decode_run`) gives
//! the tokens of decoding one step at a time, and an early stop leaves the sequence as if the
//! run had ended there. On the synthetic `tiny` model, in both modes.

use tandem_core::synthetic::synthetic_model;
use tandem_core::{Engine, EngineConfig, GpuContext, SamplingParams, StepInput, WeightFormat};

fn engine(deterministic: bool) -> Engine {
    engine_of(deterministic, 256)
}

fn engine_of(deterministic: bool, context_length: usize) -> Engine {
    let gpu = GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter");
    let model = synthetic_model("tiny", WeightFormat::Q4_0, 3).expect("tiny model");
    let cfg = EngineConfig { max_batch_tokens: 64, context_length, deterministic, ..Default::default() };
    Engine::new(&gpu, &model, &cfg).expect("engine")
}

fn prompt() -> Vec<u32> {
    (0..40).map(|i| (i * 37 + 5) % 500).collect()
}

/// `steps` tokens after the prompt, one step at a time.
fn one_at_a_time(e: &mut Engine, sampling: SamplingParams, steps: usize) -> Vec<u32> {
    let seq = e.create_sequence();
    let mut next = tandem_core::prefill(e, seq, &prompt(), sampling).expect("prefill").expect("token");
    let mut out = vec![next];
    for _ in 1..steps {
        next = e.step(&[StepInput { seq, tokens: vec![next], sample: Some(sampling) }]).expect("step")[0].expect("token");
        out.push(next);
    }
    e.free_sequence(seq);
    out
}

#[test]
fn a_run_gives_the_tokens_of_single_steps_and_stops_cleanly() {
    for deterministic in [false, true] {
        let mut e = engine(deterministic);
        for sampling in [SamplingParams::greedy(), SamplingParams { temperature: 0.9, top_k: 40, top_p: 0.95, seed: 11 }] {
            let want = one_at_a_time(&mut e, sampling, 24);

            let seq = e.create_sequence();
            let first = tandem_core::prefill(&mut e, seq, &prompt(), sampling).expect("prefill").expect("token");
            let mut got = vec![first];
            let n = e
                .decode_run(seq, first, 23, sampling, |id| {
                    got.push(id);
                    Ok(true)
                })
                .expect("run");
            assert_eq!(n, 23);
            assert_eq!(got, want, "deterministic {deterministic}, {sampling:?}");
            assert_eq!(e.sequence_len(seq).expect("len"), prompt().len() + 23, "the last token is not yet appended");
            e.free_sequence(seq);

            // Stopped after 5 tokens: the sequence holds the prompt and the 5 tokens fed back,
            // and continuing one step at a time gives the same tokens as before.
            let seq = e.create_sequence();
            let first = tandem_core::prefill(&mut e, seq, &prompt(), sampling).expect("prefill").expect("token");
            let mut got = vec![first];
            e.decode_run(seq, first, 23, sampling, |id| {
                got.push(id);
                Ok(got.len() < 6)
            })
            .expect("run");
            assert_eq!(got, want[..6], "stopped run");
            assert_eq!(e.sequence_len(seq).expect("len"), prompt().len() + 5);
            let held = e.sequence_blocks(seq).expect("blocks");
            assert!(held <= (prompt().len() + 6).div_ceil(tandem_core::BLOCK_TOKENS), "a stopped run holds {held} blocks");
            let next = e.step(&[StepInput { seq, tokens: vec![got[5]], sample: Some(sampling) }]).expect("step")[0].expect("token");
            assert_eq!(next, want[6], "continued after a stop");
            e.free_sequence(seq);
        }
    }
}

/// A decode step's dispatch count, which `tandem bench --json` reports: embed, 5 per layer (Q/K/V
/// with its norm, RoPE and the cache write; attention; O; gate/up with its norm and SiLU; down;
/// rope_kv joins them where the Q/K/V matvec cannot rotate, attention's merge past a few
/// 256-position chunks or where O cannot merge them), then the final norm, the head and
/// sampling. At 40 positions and at 300 (two chunks).
#[test]
fn a_decode_step_records_five_dispatches_a_layer() {
    let mut e = engine_of(false, 512);
    let layers = e.config.n_layers;
    for len in [40, 300] {
        let prompt: Vec<u32> = (0..len).map(|i| (i * 37 + 5) % 500).collect();
        let seq = e.create_sequence();
        let next = tandem_core::prefill(&mut e, seq, &prompt, SamplingParams::greedy()).expect("prefill").expect("token");
        e.step(&[StepInput { seq, tokens: vec![next], sample: Some(SamplingParams::greedy()) }]).expect("step");
        assert_eq!(e.last_step_timing().dispatches, 1 + 5 * layers + 3, "at {len} positions");
        e.free_sequence(seq);
    }
}
