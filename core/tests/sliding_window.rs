//! A model whose every layer has a sliding window gives the cache blocks before the window back
//! to the pool as a sequence grows, so a sequence far longer than the pool runs, with the tokens
//! of one forward pass over the whole sequence (a single step, in which nothing is given back).
//! On the synthetic `tiny` model with a window, in deterministic mode (exact logits).

use tandem_core::synthetic::synthetic_model;
use tandem_core::{BLOCK_TOKENS, Engine, EngineConfig, GpuContext, SamplingParams, StepInput, WeightFormat};

const WINDOW: usize = 40;

fn engine(kv_blocks: usize) -> Engine {
    let gpu = GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter");
    let mut model = synthetic_model("tiny", WeightFormat::Q4_0, 3).expect("tiny model");
    // Every layer windowed (Mistral v0.1's pattern).
    model.config.sliding_window = Some(WINDOW);
    model.config.swa_period = 0;
    let cfg = EngineConfig { max_batch_tokens: 256, context_length: 512, kv_blocks, deterministic: true, ..Default::default() };
    Engine::new(&gpu, &model, &cfg).expect("engine")
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::MIN), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32
}

#[test]
fn blocks_before_every_layers_window_go_back_and_the_tokens_stay() {
    // The window and the block being written need at most 4 blocks; the pool has 5 and the
    // sequence reaches 200 positions (13 blocks).
    let live = (WINDOW + 1).div_ceil(BLOCK_TOKENS) + 1;
    let mut small = engine(live + 1);
    let greedy = SamplingParams::greedy();
    let prompt: Vec<u32> = (0..30).map(|i| (i * 37 + 5) % 500).collect();
    let seq = small.create_sequence();
    // Prefill in chunks of 10, then decode one step at a time, keeping every logit row.
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for chunk in prompt.chunks(10) {
        rows.extend(small.step_logits(&[StepInput { seq, tokens: chunk.to_vec(), sample: None }]).expect("prefill chunk"));
        assert!(small.kv_usage().used <= live, "{:?} after a prompt chunk", small.kv_usage());
    }
    let mut got = vec![argmax(rows.last().expect("logits"))];
    while got.len() < 90 {
        let token = *got.last().expect("token");
        let row = small.step_logits(&[StepInput { seq, tokens: vec![token], sample: None }]).expect("step").remove(0);
        got.push(argmax(&row));
        rows.push(row);
        assert!(small.kv_usage().used <= live, "{:?} at {} positions", small.kv_usage(), prompt.len() + got.len());
    }
    let first = *got.last().expect("token");
    small
        .decode_run(seq, first, 80, greedy, |id| {
            got.push(id);
            Ok(true)
        })
        .expect("run");
    let len = small.sequence_len(seq).expect("len");
    assert_eq!(len, prompt.len() + got.len() - 1, "the last token is not yet appended");
    assert!(small.kv_usage().used <= live, "{:?} after the run", small.kv_usage());

    // One step over the whole sequence, in a pool that holds it all.
    let mut full = engine(0);
    let whole = full.create_sequence();
    let mut tokens = prompt.clone();
    tokens.extend(&got[..got.len() - 1]);
    let logits = full.forward_logits(whole, &tokens).expect("forward");
    // Every position the steps computed: the same logits (a block given back too early would
    // be read after another position's K/V took it).
    let worst = rows.iter().zip(&logits).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    assert!(worst <= 1e-4, "logits differ by {worst}");
    let want: Vec<u32> = logits[prompt.len() - 1..].iter().map(|r| argmax(r)).collect();
    assert_eq!(got, want);

    // What was given back cannot be exported, and says why; what is kept can.
    let err = small.export_kv(seq, 0, len).expect_err("positions before the window");
    assert!(err.to_string().contains("sliding window"), "{err}");
    let from = len + 1 - WINDOW;
    assert_eq!(small.export_kv(seq, from, len).expect("the window's K/V")[0].tokens, len - from);
    small.free_sequence(seq);
    assert_eq!(small.kv_usage().used, 0);
}

/// The scheduler takes a request that outgrows the pool, since the blocks it holds at once are
/// bounded by the window, and serves it to the end with the tokens of the engine alone.
#[test]
fn the_scheduler_serves_a_windowed_request_longer_than_the_pool() {
    use tandem_core::scheduler::{Event, FinishReason, Request, RequestId, Scheduler, SchedulerConfig};
    let gpu = GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter");
    let mut model = synthetic_model("tiny", WeightFormat::Q4_0, 3).expect("tiny model");
    model.config.sliding_window = Some(WINDOW);
    model.config.swa_period = 0;
    let cfg = EngineConfig { max_batch_tokens: 16, context_length: 512, kv_blocks: 7, deterministic: true, ..Default::default() };
    let small = Engine::new(&gpu, &model, &cfg).expect("engine");
    // (40 + 16) / 16 rounded up, and one: within the pool's 7, where the request's 150 positions
    // are 10 blocks.
    assert_eq!(small.window_blocks(), Some(5));
    let mut s = Scheduler::new(small, SchedulerConfig::default());
    let prompt: Vec<u32> = (0..30).map(|i| (i * 37 + 5) % 500).collect();
    let req =
        Request { prompt: prompt.clone(), max_tokens: 120, sampling: SamplingParams::greedy(), stop_ids: Vec::new(), resumed: Vec::new() };
    let (tx, rx) = std::sync::mpsc::channel();
    s.submit(RequestId(1), req, Box::new(tx)).expect("accepted");
    while s.has_work() {
        s.step().expect("step");
    }
    let mut got = Vec::new();
    let mut reason = None;
    for e in rx.try_iter() {
        match e {
            Event::Token(t) => got.push(t),
            Event::Finished(r, _) => reason = Some(r),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(reason, Some(FinishReason::Length));
    assert_eq!(got.len(), 120);

    let mut full = engine(0);
    let whole = full.create_sequence();
    let mut tokens = prompt.clone();
    tokens.extend(&got[..got.len() - 1]);
    let logits = full.forward_logits(whole, &tokens).expect("forward");
    let want: Vec<u32> = logits[prompt.len() - 1..].iter().map(|r| argmax(r)).collect();
    assert_eq!(got, want);
}
