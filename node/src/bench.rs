//! `tandem bench`: prefill and decode speed of one engine, measured with real steps.

use std::time::Instant;

use serde::Serialize;
use tandem_core::{Engine, KernelTime, SamplingParams, StepInput};

/// One benchmark's figures.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub adapter: String,
    pub weight_bytes: u64,
    /// (prompt length, tokens/s).
    pub prefill: Vec<(usize, f64)>,
    /// (context length, tokens/s, ms per step).
    pub decode: Vec<(usize, f64, f64)>,
    /// Of the median prefill of each length: (prompt length, ms recording its last step on the
    /// CPU, ms then waiting for the GPU), so time outside the GPU's shows.
    pub prefill_split_ms: Vec<(usize, f64, f64)>,
    /// Of a decode step at context 128: (ms recording on the CPU, ms waiting for the GPU).
    pub decode_split_ms: (f64, f64),
    /// An empty submission plus a 4-byte readback: the floor under every step.
    pub round_trip_ms: f64,
    /// Compute dispatches of one decode step of one sequence at context 128.
    pub dispatches_per_token: usize,
    /// Batch-invariant kernels only.
    pub deterministic: bool,
    /// How the K/V cache stored values ("f16" or "f32").
    pub kv_dtype: String,
    /// Per-kernel GPU time, when asked for.
    pub profile: Option<Profile>,
}

/// GPU time per kernel of a 512- and a 128-token prefill and of one decode step at contexts 128
/// and 1,024.
#[derive(Debug, Serialize)]
pub struct Profile {
    pub prefill_512: Vec<KernelTime>,
    pub prefill_128: Vec<KernelTime>,
    pub decode_128: Vec<KernelTime>,
    pub decode_1024: Vec<KernelTime>,
}

/// Times every kernel of a 512- and a 128-token prefill and of a decode step at contexts 128 and
/// 1,024 (the median of several steps is not taken: each kernel's time is summed over 16 decode
/// steps and divided).
pub fn profile(engine: &mut Engine) -> tandem_core::Result<Profile> {
    let vocab = engine.config.vocab_size;
    engine.set_profiling(true)?;
    let (_, seq) = prefill_once(engine, &prompt(512, vocab))?;
    engine.free_sequence(seq);
    let prefill_512 = engine.take_profile();
    let (_, seq) = prefill_once(engine, &prompt(128, vocab))?;
    let prefill_128 = engine.take_profile();
    let decode_128 = decode_profile(engine, seq)?;
    let (_, seq) = prefill_once(engine, &prompt(1024, vocab))?;
    engine.take_profile();
    let decode_1024 = decode_profile(engine, seq)?;
    engine.set_profiling(false)?;
    Ok(Profile { prefill_512, prefill_128, decode_128, decode_1024 })
}

/// Per-kernel GPU time of one decode step of `seq` (freed after), averaged over 16.
fn decode_profile(engine: &mut Engine, seq: tandem_core::SeqId) -> tandem_core::Result<Vec<KernelTime>> {
    const STEPS: u64 = 16;
    for _ in 0..STEPS {
        engine.step(&[StepInput { seq, tokens: vec![1], sample: Some(SamplingParams::greedy()) }])?;
    }
    engine.free_sequence(seq);
    let mut kernels = engine.take_profile();
    for k in &mut kernels {
        k.calls /= STEPS;
        k.gpu_ns /= STEPS;
        k.bytes /= STEPS;
        k.flops /= STEPS;
    }
    Ok(kernels)
}

/// Median time of submitting nothing and reading 4 bytes back.
fn round_trip_ms(gpu: &tandem_core::GpuContext) -> tandem_core::Result<f64> {
    let src = gpu.storage("probe", 4);
    let dst = gpu.readback("probe.read", 4);
    let mut times = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&src, 0, &dst, 0, 4);
        let idx = gpu.queue.submit([enc.finish()]);
        gpu.read_mapped(&dst, 4, idx)?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(times))
}

fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prefill time of a prompt (seconds), in as few steps as the engine's budgets allow.
fn prefill_once(engine: &mut Engine, tokens: &[u32]) -> tandem_core::Result<(f64, tandem_core::SeqId)> {
    let seq = engine.create_sequence();
    let start = Instant::now();
    tandem_core::prefill(engine, seq, tokens, SamplingParams::greedy())?;
    Ok((start.elapsed().as_secs_f64(), seq))
}

/// How long the GPU works before anything is timed.
const WARM_UP: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs the standard measurements: prefill of 128 and 512 tokens, decode at contexts 128 and 1024.
pub fn run(engine: &mut Engine, model: String, weight_bytes: u64, decode_steps: usize) -> tandem_core::Result<BenchReport> {
    let vocab = engine.config.vocab_size;
    let round_trip_ms = round_trip_ms(engine.gpu())?;
    let mut report = BenchReport {
        model,
        adapter: engine.gpu().adapter.to_string(),
        weight_bytes,
        prefill: Vec::new(),
        decode: Vec::new(),
        prefill_split_ms: Vec::new(),
        decode_split_ms: (0.0, 0.0),
        round_trip_ms,
        dispatches_per_token: 0,
        deterministic: engine.deterministic(),
        kv_dtype: engine.kv_dtype().to_string(),
        profile: None,
    };
    // Warm-up: pipelines compile lazily in some drivers, and a GPU that idled while the weights
    // loaded runs its first fraction of a second at low clocks (on the H200 a 128-token prefill
    // measured after a 16-token warm-up took 22 to 84 ms from one run of the bench to the next
    // against 23 ms of GPU time).
    let warm = Instant::now();
    while warm.elapsed() < WARM_UP {
        let (_, seq) = prefill_once(engine, &prompt(512, vocab))?;
        engine.free_sequence(seq);
    }
    for len in [128, 512] {
        let mut runs = Vec::new();
        for _ in 0..5 {
            let (t, seq) = prefill_once(engine, &prompt(len, vocab))?;
            engine.free_sequence(seq);
            let split = engine.last_step_timing();
            runs.push((t, split.record.as_secs_f64() * 1e3, split.wait.as_secs_f64() * 1e3));
        }
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (t, record, wait) = runs[runs.len() / 2];
        report.prefill.push((len, len as f64 / t));
        report.prefill_split_ms.push((len, record, wait));
    }
    for ctx in [128, 1024] {
        let (_, seq) = prefill_once(engine, &prompt(ctx, vocab))?;
        // A few steps one at a time for the CPU/GPU split, then the timed run back to back.
        let (mut record, mut wait) = (0.0, 0.0);
        const SPLIT_STEPS: usize = 8;
        let mut token = 1;
        for _ in 0..SPLIT_STEPS {
            token = engine.step(&[StepInput { seq, tokens: vec![token], sample: Some(SamplingParams::greedy()) }])?[0].unwrap_or(1);
            let t = engine.last_step_timing();
            if ctx == 128 {
                report.dispatches_per_token = t.dispatches;
            }
            record += t.record.as_secs_f64() * 1000.0;
            wait += t.wait.as_secs_f64() * 1000.0;
        }
        if ctx == 128 {
            report.decode_split_ms = (record / SPLIT_STEPS as f64, wait / SPLIT_STEPS as f64);
        }
        let start = Instant::now();
        engine.decode_run(seq, token, decode_steps, SamplingParams::greedy(), |_| Ok(true))?;
        let secs = start.elapsed().as_secs_f64();
        engine.free_sequence(seq);
        report.decode.push((ctx, decode_steps as f64 / secs, secs * 1000.0 / decode_steps as f64));
    }
    Ok(report)
}

/// The report as a table.
pub fn table(r: &BenchReport) -> String {
    let mut s = format!(
        "model: {}\nadapter: {}\nweights: {:.1} MiB\nGPU round trip: {:.3} ms\n",
        r.model,
        r.adapter,
        r.weight_bytes as f64 / (1 << 20) as f64,
        r.round_trip_ms
    );
    for ((len, tps), (_, record, wait)) in r.prefill.iter().zip(&r.prefill_split_ms) {
        s += &format!("prefill  {len:>5} tokens      {tps:>10.1} tokens/s  ({record:.3} ms recording, {wait:.3} ms waiting)\n");
    }
    for (ctx, tps, ms) in &r.decode {
        s += &format!("decode   context {ctx:>5}     {tps:>10.1} tokens/s  {ms:>8.3} ms/step\n");
    }
    s += &format!(
        "decode step at context 128: {:.3} ms recording, {:.3} ms waiting for the GPU\n",
        r.decode_split_ms.0, r.decode_split_ms.1
    );
    s += &format!(
        "dispatches per decode token: {}{}; K/V cache {}\n",
        r.dispatches_per_token,
        if r.deterministic { " (deterministic kernels)" } else { "" },
        r.kv_dtype
    );
    if let Some(p) = &r.profile {
        for (what, kernels) in [
            ("prefill of 512 tokens", &p.prefill_512),
            ("prefill of 128 tokens", &p.prefill_128),
            ("decode step at context 128", &p.decode_128),
            ("decode step at context 1024", &p.decode_1024),
        ] {
            let total = tandem_core::recorder::Profiler::total(kernels).as_secs_f64() * 1e3;
            s += &format!("GPU time of a {what}: {total:.3} ms\n");
            s += &format!("  {:<18} {:>6} {:>10} {:>6} {:>9} {:>9}\n", "kernel", "calls", "ms", "%", "GB/s", "TFLOP/s");
            for k in kernels.iter() {
                let ms = k.gpu_ns as f64 / 1e6;
                s += &format!(
                    "  {:<18} {:>6} {:>10.3} {:>6.1} {:>9.1} {:>9.2}\n",
                    k.name,
                    k.calls,
                    ms,
                    100.0 * ms / total.max(1e-9),
                    k.gb_per_s(),
                    k.tflop_per_s()
                );
            }
        }
    }
    s
}
