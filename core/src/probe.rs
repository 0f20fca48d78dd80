//! The node's start-up micro-benchmark: how fast this adapter runs our own matmul kernel, in
//! compute (many tokens, as in prefill) and in weight bandwidth (one token, as in decode). Nodes
//! advertise the figures so others can place work: prefill chunks where GFLOP/s is high, decode
//! where GB/s is. Measuring our kernel rather than the hardware's peak is the point: the figures
//! predict what this node will actually deliver, and they stay comparable between adapter types
//! (lavapipe, integrated, discrete) whatever their drivers report.

use std::time::Instant;

use tandem_shaders::{Kernel, Step};

use crate::device_weights::{DeviceMatrix, MatrixPart};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::kernels::{Kernels, MATMUL_TILE};
use crate::tensor::{HostTensor, TensorBytes, WeightFormat};

/// What one adapter achieves with tandem's matmul kernel.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceSpeed {
    /// Multiply-adds (2 flops each) per second, in billions, over many token rows: what bounds
    /// prefill.
    pub gflops: f64,
    /// Weight bytes read per second, in billions (10^9), by a one-token matmul over a matrix
    /// larger than the caches: what bounds decode.
    pub gbps: f64,
}

/// The format of both test matrices. The figures depend on it (on an H100, F16 reaches 0.4x
/// Q8_0's GFLOP/s and 0.7x its GB/s, Q4_1 1.1x and 0.7x), so every node measures the same one.
const FORMAT: WeightFormat = WeightFormat::Q8_0;
/// The compute matrix: small enough to stay in cache, so the kernel's arithmetic bounds it.
const COMPUTE_ROWS: usize = 1024;
const COMPUTE_COLS: usize = 1024;
/// The bandwidth matrix is a tile of this many rows of 4096 columns (a hidden size of 1-8B
/// models; 1 MiB), uploaded once and stacked on the GPU.
const TILE_ROWS: usize = 256;
const BANDWIDTH_COLS: usize = 4096;
/// Timed submissions per figure; the fastest counts (noise only ever adds time).
const TIMED_RUNS: usize = 3;
/// Dispatches one submission may repeat.
const MAX_REPEATS: f64 = 1000.0;

/// Sizes and timing of the probe on one class of adapter.
struct ProbePlan {
    /// Token rows of the compute matmul.
    tokens: usize,
    /// Weight bytes of the bandwidth matrix.
    bandwidth_bytes: usize,
    /// Wall time each timed submission aims for, by repeating the dispatch, so that submission
    /// and wake-up latency (tens of microseconds) vanish next to the work.
    target_seconds: f64,
}

/// GPUs: a bandwidth matrix beyond the last-level cache (H100: 50 MB, RTX 4090: 72 MB,
/// RDNA 3: up to 96 MB).
const GPU_PLAN: ProbePlan = ProbePlan { tokens: 128, bandwidth_bytes: 128 << 20, target_seconds: 0.02 };
/// CPU adapters: lavapipe on two cores manages well under 1 GFLOP/s with this kernel, so the
/// work is cut to keep the probe short: 16 tokens do as much work per weight load as 128 (the
/// kernel loads each weight once per 8-token tile), and the matvec is bounded by lavapipe's
/// arithmetic far below memory bandwidth, so a cache-sized matrix measures the same thing.
const CPU_PLAN: ProbePlan = ProbePlan { tokens: 16, bandwidth_bytes: 4 << 20, target_seconds: 0.03 };

/// Measures this adapter's matmul speed: compute over 128 token rows (16 on CPU adapters) of a
/// 1024x1024 Q8_0 matrix, and bandwidth of one token over a 4096-column Q8_0 matrix of 128 MiB
/// (4 MiB on CPU adapters). Each figure: one warm-up submission, one to size the repetitions,
/// then the best of three submissions timed by wall clock from submit to the device's
/// completion. Takes about 0.1 s on an H100 and 0.7 s on lavapipe with two cores.
pub fn measure_speed(ctx: &GpuContext) -> Result<DeviceSpeed> {
    let kernels = Kernels::new(ctx);
    let plan = if ctx.is_cpu { CPU_PLAN } else { GPU_PLAN };

    let compute = upload_matrix(ctx, "probe.compute", COMPUTE_ROWS, COMPUTE_COLS)?;
    let flops = 2.0 * (COMPUTE_ROWS * COMPUTE_COLS * plan.tokens) as f64;
    let compute_seconds = best_seconds(&kernels, &compute, plan.tokens, plan.target_seconds)?;
    // Freed before the large matrix is allocated.
    drop(compute);

    let tile = upload_matrix(ctx, "probe.bandwidth", TILE_ROWS, BANDWIDTH_COLS)?;
    let tile_bytes = TILE_ROWS * FORMAT.row_bytes(BANDWIDTH_COLS).unwrap_or(1);
    let copies = (plan.bandwidth_bytes / tile_bytes).clamp(1, (ctx.max_binding() as usize / tile_bytes).max(1));
    let bandwidth = stack_rows(ctx, &tile, copies)?;
    let bytes = (copies * tile_bytes) as f64;
    let bandwidth_seconds = best_seconds(&kernels, &bandwidth, 1, plan.target_seconds)?;

    let speed = DeviceSpeed { gflops: flops / compute_seconds / 1e9, gbps: bytes / bandwidth_seconds / 1e9 };
    if !(speed.gflops.is_finite() && speed.gflops > 0.0 && speed.gbps.is_finite() && speed.gbps > 0.0) {
        return Err(Error::Gpu { op: "speed probe".into(), reason: format!("implausible result {speed:?}") });
    }
    tracing::info!(adapter = %ctx.adapter, gflops = speed.gflops, gbps = speed.gbps, "measured matmul speed");
    Ok(speed)
}

/// A `rows x cols` matrix of varied values, on the GPU.
fn upload_matrix(ctx: &GpuContext, name: &str, rows: usize, cols: usize) -> Result<DeviceMatrix> {
    let values: Vec<f32> = (0..cols).map(|i| ((i * 37 % 251) as f32 - 125.0) / 4096.0).collect();
    let row = crate::cpu_ref::quantize_row(FORMAT, &values);
    let t = HostTensor { name: name.into(), format: FORMAT, shape: vec![cols, rows], bytes: TensorBytes::owned(row.repeat(rows)) };
    DeviceMatrix::upload(ctx, &t)
}

/// `tile` stacked `copies` times over its rows, copied on the GPU: sending 128 MiB from the host
/// would take several times as long as the measurement. The tile's quant and scale buffers hold
/// whole rows (their sizes are multiples of 4), so the copies line up.
fn stack_rows(ctx: &GpuContext, tile: &DeviceMatrix, copies: usize) -> Result<DeviceMatrix> {
    let [part] = tile.parts.as_slice() else {
        return Err(Error::Gpu { op: "speed probe".into(), reason: format!("the {} tile was split into parts", tile.name) });
    };
    let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("probe.stack") });
    let mut stack = |src: &wgpu::Buffer, label: String| {
        let dst = ctx.storage(&label, src.size() * copies as u64);
        for i in 0..copies as u64 {
            encoder.copy_buffer_to_buffer(src, 0, &dst, i * src.size(), src.size());
        }
        dst
    };
    let name = format!("{}x{copies}", tile.name);
    let (quants, scales) = (stack(&part.quants, name.clone()), stack(&part.scales, format!("{name}.scales")));
    ctx.queue.submit([encoder.finish()]);
    let rows = tile.rows * copies;
    Ok(DeviceMatrix { name, format: tile.format, rows, cols: tile.cols, parts: vec![MatrixPart { row_start: 0, rows, quants, scales }] })
}

/// The fewest seconds one matmul of `tokens` token rows through `m` took.
fn best_seconds(kernels: &Kernels, m: &DeviceMatrix, tokens: usize, target: f64) -> Result<f64> {
    let ctx = kernels.ctx();
    let step = ctx.uniform_init("probe.step", bytemuck::bytes_of(&Step { n_tokens: tokens as u32, ..Default::default() }));
    let x = ctx.storage_init("probe.x", bytemuck::cast_slice(&vec![1.0f32 / m.cols as f32; tokens * m.cols]));
    let y = ctx.storage("probe.y", (tokens * m.rows * 4) as u64);
    let params = m.part_params(ctx, m.cols, m.rows, 0);
    let rows_per_workgroup = 64 / kernels.matmul_split() as usize;
    let parts: Vec<(wgpu::BindGroup, u32)> = m
        .parts
        .iter()
        .zip(&params)
        .map(|(p, u)| {
            let bind_group = kernels.bind_group(Kernel::Matmul, &m.name, &[&step, u, &x, &p.quants, &p.scales, &y, &x]);
            (bind_group, p.rows.div_ceil(rows_per_workgroup) as u32)
        })
        .collect();
    let pipeline = kernels.matmul(m.format, false, false)?;
    let tiles = tokens.div_ceil(MATMUL_TILE) as u32;

    // Seconds for `repeats` back-to-back dispatches in one submission.
    let run = |repeats: u32| -> Result<f64> {
        let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("probe") });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(&m.name), timestamp_writes: None });
            pass.set_pipeline(&pipeline);
            for _ in 0..repeats {
                for (bind_group, workgroups) in &parts {
                    pass.set_bind_group(0, bind_group, &[]);
                    pass.dispatch_workgroups(*workgroups, tiles, 1);
                }
            }
        }
        let commands = encoder.finish();
        let start = Instant::now();
        let done = ctx.queue.submit([commands]);
        ctx.device
            .poll(wgpu::PollType::Wait { submission_index: Some(done), timeout: None })
            .map_err(|e| Error::Gpu { op: "speed probe".into(), reason: e.to_string() })?;
        Ok(start.elapsed().as_secs_f64())
    };

    // The first submission also pays for the upload and the driver's first use of the pipeline.
    run(1)?;
    let once = run(1)?;
    let repeats = (target / once.max(1e-9)).ceil().clamp(1.0, MAX_REPEATS) as u32;
    let mut best = f64::INFINITY;
    for _ in 0..TIMED_RUNS {
        best = best.min(run(repeats)? / f64::from(repeats));
    }
    ctx.check_errors("speed probe")?;
    Ok(best)
}
