//! Continuous batching on the tiny model (the promises hold whatever the weights): a request's
//! greedy tokens are the same alone, among 32 others, with its prompt chunked or not, with or
//! without a prefix-cache hit, and after being preempted; cancelled and finished requests give
//! their blocks back; requests that can never fit are refused clearly.

use std::sync::mpsc;

use tandem_core::scheduler::{Event, FinishReason, Policy, Request, RequestId, RequestTimings, Scheduler, SchedulerConfig};
use tandem_core::{Engine, EngineConfig, SamplingParams};
use tandem_tests::{assert_varied, gpu, tiny_model, tiny_tokens};

const NEW_TOKENS: usize = 4;

fn scheduler(max_batch_tokens: usize, kv_blocks: usize, cfg: SchedulerConfig) -> Scheduler {
    let ecfg =
        EngineConfig { max_batch_tokens, context_length: 256, kv_blocks, max_sequences: 40, deterministic: true, ..Default::default() };
    Scheduler::new(Engine::new(gpu(), tiny_model(), &ecfg).expect("engine"), cfg)
}

fn tokens(text: &str) -> Vec<u32> {
    tiny_tokens(text)
}

/// The prompt under test: longer than two KV blocks, so a repeat can hit the prefix cache.
fn main_prompt() -> Vec<u32> {
    tokens(
        "The history of the lighthouse keepers of the northern coast is long and strange. In the winter of that year, when the \
         storms came early and the supply boat did not arrive, the keeper wrote in his log that",
    )
}

/// Short, distinct prompts, so the company is kept cheap.
fn other_prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n).map(|i| tokens(&format!("{} is", i * 7 + 3))).collect()
}

fn request(prompt: Vec<u32>) -> Request {
    Request { prompt, max_tokens: NEW_TOKENS, sampling: SamplingParams::greedy(), stop_ids: Vec::new(), resumed: Vec::new() }
}

struct Outcome {
    tokens: Vec<u32>,
    reason: FinishReason,
    timings: RequestTimings,
}

/// Submits every prompt at once and runs the scheduler until all are done.
fn run_all(s: &mut Scheduler, prompts: &[Vec<u32>], first_id: u64) -> Vec<Outcome> {
    let receivers: Vec<mpsc::Receiver<Event>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (tx, rx) = mpsc::channel();
            s.submit(RequestId(first_id + i as u64), request(p.clone()), Box::new(tx)).expect("accepted");
            rx
        })
        .collect();
    let mut steps = 0;
    while s.has_work() {
        assert!(s.step().expect("step"), "a step ran while work remained");
        steps += 1;
        assert!(steps < 10_000, "the scheduler makes progress");
    }
    receivers.into_iter().map(collect).collect()
}

fn collect(rx: mpsc::Receiver<Event>) -> Outcome {
    let mut tokens = Vec::new();
    for ev in rx.try_iter() {
        match ev {
            Event::Token(t) => tokens.push(t),
            Event::Finished(reason, timings) => return Outcome { tokens, reason, timings },
            Event::Failed(e) | Event::Refused { reason: e, .. } => panic!("request failed: {e}"),
            Event::Detached { .. } => panic!("request detached"),
        }
    }
    panic!("request did not finish")
}

#[test]
fn greedy_tokens_do_not_depend_on_batch_chunking_prefix_cache_or_preemption() {
    let main = main_prompt();
    assert!(main.len() > 32, "the main prompt spans two full blocks ({} tokens)", main.len());
    let mut s = scheduler(64, 0, SchedulerConfig::default());
    let alone = run_all(&mut s, std::slice::from_ref(&main), 0).remove(0);
    assert_eq!(alone.tokens.len(), NEW_TOKENS);
    assert_varied(&alone.tokens);
    assert_eq!(alone.reason, FinishReason::Length);
    assert_eq!(alone.timings.cached_tokens, 0, "a cold cache has no prefix");

    // Again on the same scheduler: the full blocks of the prompt come from the prefix cache.
    let again = run_all(&mut s, std::slice::from_ref(&main), 1).remove(0);
    assert_eq!(again.timings.cached_tokens, main.len() / 16 * 16, "every full block of the prompt was reused");
    assert_eq!(again.tokens, alone.tokens, "prefix-cache hit");
    assert!(s.stats().prefix_cache_hit_tokens >= 32);

    // Among 32 others, submitted together (and so prefilled in chunks shared with them).
    let mut s = scheduler(64, 0, SchedulerConfig::default());
    let mut prompts = other_prompts(32);
    prompts.insert(13, main.clone());
    let among = run_all(&mut s, &prompts, 0);
    assert_eq!(among[13].tokens, alone.tokens, "among 32 others");
    assert_eq!(s.stats().running, 0);
    assert_eq!(s.engine().kv_usage().used, 0, "finished requests hold no blocks");
    // One of the others, alone, is also unchanged by the company it kept.
    let other_alone = run_all(&mut scheduler(64, 0, SchedulerConfig::default()), &prompts[20..21], 0).remove(0);
    assert_eq!(among[20].tokens, other_alone.tokens, "another request among 32");

    // A 7-token budget chunks the prompt into many pieces; without chunked prefill it goes whole.
    let chunked = run_all(&mut scheduler(7, 0, SchedulerConfig::default()), std::slice::from_ref(&main), 0).remove(0);
    assert_eq!(chunked.tokens, alone.tokens, "prefill in 7-token chunks");
    let whole_cfg = SchedulerConfig { chunked_prefill: false, policy: Policy::ShortestPromptFirst, ..Default::default() };
    let whole = run_all(&mut scheduler(64, 0, whole_cfg), &prompts[12..15], 0);
    assert_eq!(whole[1].tokens, alone.tokens, "no chunked prefill, shortest prompt first");

    // Six requests in a cache of 6 blocks: the 30-token prompts fill two blocks each and need a
    // third while decoding, so newer requests are preempted and recomputed; every output is
    // still the same as alone. Without chunked prefill, waiting prompts that cannot get blocks
    // must not stall the decodes that hold them.
    let p30 = main[..30].to_vec();
    let p30_alone = run_all(&mut scheduler(64, 0, SchedulerConfig::default()), std::slice::from_ref(&p30), 0).remove(0);
    let small_cfg = SchedulerConfig { policy: Policy::DecodeFirst, chunked_prefill: false, ..Default::default() };
    let mut small = scheduler(64, 6, small_cfg);
    let six = [p30.clone(), prompts[0].clone(), p30.clone(), prompts[1].clone(), prompts[2].clone(), p30.clone()];
    let squeezed = run_all(&mut small, &six, 0);
    assert!(small.stats().preemptions > 0, "the small cache forced preemptions");
    for i in [0, 2, 5] {
        assert_eq!(squeezed[i].tokens, p30_alone.tokens, "request {i} after preemption");
    }
    for (i, j) in [(1, 0), (3, 1), (4, 2)] {
        assert_eq!(squeezed[i].tokens, among[j].tokens, "request {i} after preemption");
    }
}

#[test]
fn cancelled_requests_free_their_blocks_and_impossible_ones_are_refused() {
    let mut s = scheduler(64, 20, SchedulerConfig::default());
    let (tx, rx) = mpsc::channel();
    let id = s.submit(RequestId(0), request(main_prompt()), Box::new(tx)).expect("accepted");
    assert!(s.step().expect("step"));
    assert!(s.engine().kv_usage().used > 0, "the running request holds blocks");
    s.cancel(id);
    assert_eq!(s.engine().kv_usage().used, 0, "cancelling frees every block");
    assert!(!s.has_work());
    let last = rx.try_iter().last().expect("events");
    assert!(matches!(last, Event::Finished(FinishReason::Cancelled, _)), "told it was cancelled: {last:?}");

    // A receiver that goes away is noticed at its next token.
    let (tx, rx) = mpsc::channel();
    s.submit(RequestId(1), request(main_prompt()), Box::new(tx)).expect("accepted");
    drop(rx);
    while s.has_work() {
        s.step().expect("step");
    }
    assert_eq!(s.engine().kv_usage().used, 0, "an abandoned request frees its blocks");

    // Longer than the context, or more blocks than the whole cache.
    let (tx, _rx) = mpsc::channel();
    let too_long = Request { max_tokens: 250, ..request(main_prompt()) };
    let err = s.submit(RequestId(2), too_long, Box::new(tx)).expect_err("refused");
    assert!(err.to_string().contains("exceeds the context"), "{err}");
    let (tx, rx) = mpsc::channel();
    let too_big = Request { max_tokens: 100, ..request(vec![1; 30]) };
    let mut small = scheduler(64, 4, SchedulerConfig::default());
    let err = small.submit(RequestId(0), too_big, Box::new(tx)).expect_err("refused");
    assert!(err.to_string().contains("KV blocks"), "{err}");
    assert!(matches!(rx.try_recv(), Ok(Event::Refused { overloaded: false, .. })), "the sink hears why");
}

#[test]
fn a_request_that_stops_while_its_next_step_runs_keeps_its_tokens_and_the_cache_sound() {
    let main = main_prompt();
    let mut s = scheduler(64, 0, SchedulerConfig::default());
    let alone = run_all(&mut s, std::slice::from_ref(&main), 0).remove(0);
    // Decoding alone, each step is submitted before the one ahead of it is read: the request
    // stops on its second token with the step after it already on the GPU.
    let stop = alone.tokens[1];
    let upto = alone.tokens.iter().position(|&t| t == stop).expect("the stop token") + 1;
    let (tx, rx) = mpsc::channel();
    s.submit(RequestId(1), Request { stop_ids: vec![stop], ..request(main.clone()) }, Box::new(tx)).expect("accepted");
    while s.has_work() {
        s.step().expect("step");
    }
    let stopped = collect(rx);
    assert_eq!(stopped.tokens, alone.tokens[..upto], "the tokens up to the stop, and no more");
    assert_eq!(stopped.reason, FinishReason::Stop);
    assert_eq!(s.engine().kv_usage().used, 0, "the extra position went with the request");
    // The prompt with what it generated continues as the first request did, from the blocks the
    // stopped one left in the prefix cache.
    let resumed = [main.clone(), alone.tokens[..upto].to_vec()].concat();
    let cont = run_all(&mut s, &[resumed], 2).remove(0);
    assert!(cont.timings.cached_tokens >= main.len() / 16 * 16, "the prefix cache served it");
    assert_eq!(cont.tokens[..NEW_TOKENS - upto], alone.tokens[upto..], "continued as before");
}
