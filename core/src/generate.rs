//! A single request run to completion on an engine: chunked prefill, then decode steps.

use std::time::{Duration, Instant};

use crate::engine::{Engine, SamplingParams, StepInput};
use crate::error::{Error, Result};

/// Timings and counts of one generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Until the first token was known (prefill including the first sample).
    pub prefill_time: Duration,
    /// Every later step.
    pub decode_time: Duration,
}

impl GenerationStats {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Generates up to `max_new` tokens after `prompt`, calling `on_token` with each; generation ends
/// early at a token in `stop_ids` (which is passed to `on_token` too) or when `on_token` returns
/// false. The sequence is freed at the end.
pub fn generate(
    engine: &mut Engine,
    prompt: &[u32],
    max_new: usize,
    sampling: SamplingParams,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<GenerationStats> {
    if prompt.is_empty() {
        return Err(Error::InvalidRequest("the prompt is empty".into()));
    }
    if prompt.len() + max_new > engine.context_length() {
        return Err(Error::ContextOverflow { tokens: prompt.len(), max_new, context: engine.context_length() });
    }
    let seq = engine.create_sequence();
    let result = run(engine, seq, prompt, max_new, sampling, stop_ids, &mut on_token);
    engine.free_sequence(seq);
    result
}

/// Appends `tokens` to `seq` in as few steps as the engine's token and attention budgets allow,
/// sampling after the last one.
pub fn prefill(engine: &mut Engine, seq: crate::kv::SeqId, tokens: &[u32], sampling: SamplingParams) -> Result<Option<u32>> {
    let mut next = None;
    let mut done = 0;
    while done < tokens.len() {
        let start = engine.sequence_len(seq)?;
        let n = Engine::prefill_fit(start, tokens.len() - done, engine.attention_budget(), engine.max_batch_tokens()).max(1);
        let last = done + n == tokens.len();
        let input = StepInput { seq, tokens: tokens[done..done + n].to_vec(), sample: last.then_some(sampling) };
        next = engine.step(&[input])?[0];
        done += n;
    }
    Ok(next)
}

fn run(
    engine: &mut Engine,
    seq: crate::kv::SeqId,
    prompt: &[u32],
    max_new: usize,
    sampling: SamplingParams,
    stop_ids: &[u32],
    on_token: &mut impl FnMut(u32) -> Result<bool>,
) -> Result<GenerationStats> {
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    if max_new == 0 {
        return Ok(stats);
    }
    let start = Instant::now();
    let next = prefill(engine, seq, prompt, sampling)?;
    stats.prefill_time = start.elapsed();
    let decode_start = Instant::now();
    let token = next.ok_or_else(|| Error::InvalidRequest("prefill produced no token".into()))?;
    stats.generated_tokens += 1;
    if on_token(token)? && !stop_ids.contains(&token) && stats.generated_tokens < max_new {
        // The rest back to back, each step's token staying on the GPU.
        engine.decode_run(seq, token, max_new - stats.generated_tokens, sampling, |id| {
            stats.generated_tokens += 1;
            Ok(on_token(id)? && !stop_ids.contains(&id) && stats.generated_tokens < max_new)
        })?;
    }
    stats.decode_time = decode_start.elapsed();
    Ok(stats)
}
