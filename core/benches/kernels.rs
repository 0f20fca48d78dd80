//! Times the matmul kernels alone, variant by variant, on the weight shapes of real models, so a
//! short lease on a GPU machine can compare many variants in one call (docs/kernel-notes.md).
//! Each measurement cycles through enough copies of the weights to miss the L2 cache, records
//! many dispatches in one pass and divides the wall time; the first batch is a discarded warm-up.
//!   cargo bench -p tandem-core --bench kernels -- [copy|read|matvec|ablate|q8|q8steps|gemm|small]... [135m|1b|8b]...

use std::time::Instant;

use tandem_core::device_weights::DeviceMatrix;
use tandem_core::kernels::{CoopPipelines, CoopPlan, GEMM_TILE, Kernels, MatvecShape, q8_activations};
use tandem_core::tensor::{HostTensor, TensorBytes};
use tandem_core::{GpuContext, KvDtype, WeightFormat};
use tandem_shaders::{Kernel, Step, TokenInfo};

/// (model, matrix, rows, cols) of the matrices a token passes (Q/K/V and gate/up stacked).
const SHAPES: [(&str, &str, usize, usize); 13] = [
    ("tiny", "gate_up", 512, 128),
    ("135m", "qkv", 960, 576),
    ("135m", "gate_up", 3072, 576),
    ("135m", "down", 576, 1536),
    ("135m", "head", 49152, 576),
    ("1b", "qkv", 3072, 2048),
    ("1b", "gate_up", 16384, 2048),
    ("1b", "down", 2048, 8192),
    ("8b", "qkv", 6144, 4096),
    ("8b", "o", 4096, 4096),
    ("8b", "gate_up", 28672, 4096),
    ("8b", "down", 4096, 14336),
    ("8b", "head", 128256, 4096),
];

/// Bytes of weights the copies of one shape add up to, at least: several times the L2.
const ROTATION_BYTES: usize = 256 << 20;

/// Q4_0 blocks with random quants and one sane scale (speed does not depend on the values, but
/// zeros could run faster than real data).
fn q4_0_bytes(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes = vec![0u8; rows * cols / 32 * 18];
    let d = half::f16::from_f32(0.5 / (cols as f32).sqrt() / 8.0).to_le_bytes();
    for b in bytes.chunks_exact_mut(18) {
        b[..2].copy_from_slice(&d);
        for q in &mut b[2..] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *q = state as u8;
        }
    }
    bytes
}

struct Setup {
    copies: Vec<DeviceMatrix>,
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    step: wgpu::Buffer,
    /// Rows and bytes of the first part (the one timed; the 8B head may need several).
    rows: usize,
    bytes: u64,
}

fn setup(ctx: &GpuContext, rows: usize, cols: usize, tokens: usize) -> Setup {
    let t = HostTensor {
        name: "w".into(),
        format: WeightFormat::Q4_0,
        shape: vec![cols, rows],
        bytes: TensorBytes::owned(q4_0_bytes(rows, cols, 7)),
    };
    let one = t.bytes.as_slice().len();
    let n = ROTATION_BYTES.div_ceil(one).clamp(2, 16);
    let copies: Vec<DeviceMatrix> = (0..n).map(|_| DeviceMatrix::upload(ctx, &t).expect("upload")).collect();
    let part = &copies[0].parts[0];
    let (rows, bytes) = (part.rows, part.quants.size() + part.scales.size());
    let x: Vec<f32> = (0..tokens * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    Setup {
        copies,
        x: ctx.storage_init("x", bytemuck::cast_slice(&x)),
        y: ctx.storage("y", (tokens * rows * 4) as u64),
        step: ctx.uniform_init("step", bytemuck::bytes_of(&Step { n_tokens: tokens as u32, ..Default::default() })),
        rows,
        bytes,
    }
}

/// Seconds per round of `passes` (pipelines and their workgroups, dispatched in order) over the
/// bind groups `bgs` in turn.
fn time_passes(ctx: &GpuContext, bgs: &[wgpu::BindGroup], passes: &[(&wgpu::ComputePipeline, [u32; 3])], reps: usize) -> f64 {
    let mut best = f64::MAX;
    for round in 0..3 {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for i in 0..reps {
                pass.set_bind_group(0, &bgs[i % bgs.len()], &[]);
                for (pipeline, [x, y, z]) in passes {
                    pass.set_pipeline(pipeline);
                    pass.dispatch_workgroups(*x, *y, *z);
                }
            }
        }
        let start = Instant::now();
        ctx.queue.submit([enc.finish()]);
        ctx.device.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        if round > 0 {
            best = best.min(secs);
        }
    }
    best
}

/// Seconds per dispatch of `pipeline` over `s`'s copies in turn, `groups` workgroups each.
fn time(ctx: &GpuContext, kernels: &Kernels, s: &Setup, pipeline: &wgpu::ComputePipeline, groups: [u32; 3], reps: usize) -> f64 {
    time_with(ctx, kernels, s, None, pipeline, groups, reps)
}

/// `time`, with the activations as 8-bit ones from `x_q8` where given.
fn time_with(
    ctx: &GpuContext,
    kernels: &Kernels,
    s: &Setup,
    x_q8: Option<&wgpu::Buffer>,
    pipeline: &wgpu::ComputePipeline,
    groups: [u32; 3],
    reps: usize,
) -> f64 {
    let bgs: Vec<wgpu::BindGroup> = s
        .copies
        .iter()
        .map(|m| {
            let u = m.part_params(ctx, m.cols, s.rows, 0).remove(0);
            let p = &m.parts[0];
            match x_q8 {
                None => kernels.bind_group(Kernel::Matmul, "bench", &[&s.step, &u, &s.x, &p.quants, &p.scales, &s.y, &s.x]),
                Some(b) => kernels.matvec_q8_bind_group("bench", [&s.step, &u, &p.quants, &p.scales, &s.y], b, m.cols),
            }
        })
        .collect();
    time_passes(ctx, &bgs, &[(pipeline, groups)], reps)
}

fn read_y(ctx: &GpuContext, s: &Setup) -> Vec<f32> {
    let size = s.y.size();
    let rb = ctx.readback("y", size);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&s.y, 0, &rb, 0, size);
    let idx = ctx.queue.submit([enc.finish()]);
    bytemuck::cast_slice(&ctx.read_mapped(&rb, size, idx).expect("readback")).to_vec()
}

fn matvec(ctx: &GpuContext, kernels: &Kernels, shapes: &[(&str, &str, usize, usize)]) {
    println!("matvec, 1 token: GB/s of weights (best of 2 batches); variant rRuUkKwW = ROWS, UNROLL, KSPLIT, WG");
    let variants =
        [(1, 4, 1, 64), (1, 4, 2, 64), (1, 2, 2, 64), (1, 4, 4, 128), (1, 2, 4, 128), (1, 1, 4, 128), (2, 4, 1, 64), (2, 2, 2, 128)]
            .map(|(rows, unroll, ksplit, lanes)| MatvecShape { tokens: 1, rows, unroll, ksplit, lanes });
    println!("(! marks a result that differs from the first variant's)");
    print!("{:<12}", "shape");
    for v in &variants {
        print!(" {:>11}", format!("r{}u{}k{}w{}", v.rows, v.unroll, v.ksplit, v.lanes));
    }
    println!();
    for &(model, name, rows, cols) in shapes {
        let s = setup(ctx, rows, cols, 1);
        let mut baseline: Option<Vec<f32>> = None;
        print!("{:<12}", format!("{model}.{name}"));
        for &shape in &variants {
            let groups = s.rows.div_ceil(shape.rows_per_workgroup());
            if groups > ctx.limits.max_compute_workgroups_per_dimension as usize {
                print!(" {:>11}", "-");
                continue;
            }
            let pipeline = kernels.matvec(WeightFormat::Q4_0, shape, false, false).expect("pipeline");
            let secs = time(ctx, kernels, &s, &pipeline, [groups as u32, 1, 1], 200);
            // Every copy holds the same weights, so y is the result whichever ran last.
            let y = read_y(ctx, &s);
            let want = baseline.get_or_insert_with(|| y.clone());
            let worst = y.iter().zip(want.iter()).map(|(a, b)| (a - b).abs() / b.abs().max(1e-3)).fold(0f32, f32::max);
            let mark = if worst > 1e-3 || y.iter().any(|v| !v.is_finite()) { "!" } else { "" };
            print!(" {:>11}", format!("{:.0}{mark}", s.bytes as f64 / secs / 1e9));
        }
        println!();
    }
}

/// The matvec with parts taken out, to see what bounds it: (name, text replaced, replacement).
const ABLATIONS: [(&str, &[(&str, &str)]); 4] = [
    ("as is", &[]),
    ("no scale", &[("return q4_0_scale(blk) * (dot(lo, xa) + dot(hi, xb));", "return dot(lo, xa) + dot(hi, xb);")]),
    (
        "no x",
        &[
            ("let xa = x4(xo + cols.x);", "let xa = vec4<f32>(f32(xo));"),
            ("let xb = x4(xo + cols.y);", "let xb = vec4<f32>(f32(xo + 1u));"),
        ],
    ),
    (
        "loads only",
        &[
            ("return q4_0_scale(blk) * (dot(lo, xa) + dot(hi, xb));", "return bitcast<f32>(w[blk * 4u + q]) + xa.x;"),
            ("let xa = x4(xo + cols.x);", "let xa = vec4<f32>(f32(xo));"),
            ("let xb = x4(xo + cols.y);", "let xb = vec4<f32>(f32(xo + 1u));"),
        ],
    ),
];

fn matvec_ablations(ctx: &GpuContext, kernels: &Kernels, shapes: &[(&str, &str, usize, usize)]) {
    println!("matvec ablations (rows 1, unroll 4): GB/s of weights");
    let base = Kernel::Matvec.source(Some(WeightFormat::Q4_0), ctx.caps).expect("source");
    print!("{:<12}", "shape");
    for (name, _) in ABLATIONS {
        print!(" {name:>11}");
    }
    println!();
    for &(model, name, rows, cols) in shapes {
        let s = setup(ctx, rows, cols, 1);
        print!("{:<12}", format!("{model}.{name}"));
        for (what, edits) in ABLATIONS {
            let mut source = base.clone();
            for (from, to) in edits {
                assert!(source.contains(from), "{what}: `{from}` not in the matvec");
                source = source.replace(from, to);
            }
            let consts = [("TOKENS", 1.0), ("ROWS", 1.0), ("UNROLL", 4.0), ("SPLIT", 32.0)];
            let pipeline = kernels.pipeline_from_source(Kernel::Matvec, what, &source, &consts).expect("pipeline");
            let secs = time(ctx, kernels, &s, &pipeline, [s.rows.div_ceil(2) as u32, 1, 1], 200);
            print!(" {:>11.0}", s.bytes as f64 / secs / 1e9);
        }
        println!();
    }
}

fn matvec_q8(ctx: &GpuContext, kernels: &Kernels, shapes: &[(&str, &str, usize, usize)]) {
    println!(
        "matvec_q8 (8-bit activations), one token: GB/s of weights; uUkKwW = UNROLL, KSPLIT, WG; * = the engine's pick; ! = differs from the f32 matvec by > 2% of its largest"
    );
    let variants: [(u32, u32, u32); 6] = [(1, 1, 64), (2, 1, 64), (4, 1, 64), (2, 2, 128), (1, 4, 128), (2, 4, 128)];
    print!("{:<12} {:>11}", "shape", "f32 matvec");
    for (u, k, w) in &variants {
        print!(" {:>11}", format!("u{u}k{k}w{w}"));
    }
    println!();
    for &(model, name, rows, cols) in shapes {
        let s = setup(ctx, rows, cols, 1);
        print!("{:<12}", format!("{model}.{name}"));
        let shape = MatvecShape::for_matrix(cols, 1);
        let f32_pipeline = kernels.matvec(WeightFormat::Q4_0, shape, false, false).expect("matvec");
        let secs = time(ctx, kernels, &s, &f32_pipeline, [s.rows.div_ceil(shape.rows_per_workgroup()) as u32, 1, 1], 200);
        print!(" {:>11.0}", s.bytes as f64 / secs / 1e9);
        let want = read_y(ctx, &s);
        let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut x: Vec<f32> = (0..cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        x.resize(8 * cols, 0.0);
        let xq = ctx.storage_init("x_q8", &q8_activations(&x, cols));
        let pick = MatvecShape::for_q8_matrix(cols, 1);
        for &(unroll, ksplit, lanes) in &variants {
            let shape = MatvecShape { tokens: 1, rows: 1, unroll, ksplit, lanes };
            let groups = s.rows.div_ceil(shape.rows_per_workgroup());
            if groups > ctx.limits.max_compute_workgroups_per_dimension as usize {
                print!(" {:>11}", "-");
                continue;
            }
            let pipeline = kernels.matvec_q8(WeightFormat::Q4_0, shape, false, false).expect("q8 pipeline");
            let secs = time_with(ctx, kernels, &s, Some(&xq), &pipeline, shape.q8_grid(s.rows, 1), 200);
            let got = read_y(ctx, &s);
            let close = got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 2e-2 * top.max(1e-6));
            let marks = format!("{}{}", if shape == pick { "*" } else { "" }, if close { "" } else { "!" });
            print!(" {:>11}", format!("{:.0}{marks}", s.bytes as f64 / secs / 1e9));
        }
        println!();
    }
}

/// The 8-bit matvec on decode steps of several tokens (`MatvecShape::for_q8_matrix`): µs a step of
/// 8 and of 32 tokens (groups of `tokens` along the grid's x), for rows per lane group, tokens per
/// weight load and row splits. Every variant sums each (row, token) in the same order, so `!`
/// marks a result that differs from the first variant's.
fn matvec_q8_steps(ctx: &GpuContext, kernels: &Kernels, shapes: &[(&str, &str, usize, usize)]) {
    println!("matvec_q8 on steps of several tokens: µs a step; tTrRuUkKwW = TOKENS, ROWS, UNROLL, KSPLIT, WG; * = the engine's pick");
    let variants = [
        (2, 1, 1, 1, 64),
        (2, 2, 1, 1, 64),
        (2, 4, 1, 1, 64),
        (4, 1, 1, 1, 64),
        (4, 2, 1, 1, 64),
        (4, 4, 1, 1, 64),
        (4, 2, 1, 2, 128),
        (8, 1, 1, 1, 64),
        (8, 2, 1, 1, 64),
    ]
    .map(|(tokens, rows, unroll, ksplit, lanes)| MatvecShape { tokens, rows, unroll, ksplit, lanes });
    for step in [2usize, 4, 8, 32] {
        print!("{:<12}", format!("{step} tokens"));
        for v in &variants {
            // (Variants of more tokens than the step print "-".)
            print!(" {:>13}", format!("t{}r{}u{}k{}w{}", v.tokens, v.rows, v.unroll, v.ksplit, v.lanes));
        }
        println!();
        for &(model, name, rows, cols) in shapes {
            let s = setup(ctx, rows, cols, step);
            print!("{:<12}", format!("{model}.{name}"));
            let mut x: Vec<f32> = (0..step * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
            x.resize(tandem_core::kernels::Q8_TOKENS * cols, 0.0);
            let xq = ctx.storage_init("x_q8", &q8_activations(&x, cols));
            let pick = MatvecShape::for_q8_matrix(cols, step.min(8) as u32);
            let mut baseline: Option<Vec<f32>> = None;
            for &shape in &variants {
                if shape.tokens as usize > step {
                    print!(" {:>13}", "-");
                    continue;
                }
                let groups = shape.q8_grid(s.rows, step);
                let pipeline = kernels.matvec_q8(WeightFormat::Q4_0, shape, false, false).expect("q8 pipeline");
                let secs = time_with(ctx, kernels, &s, Some(&xq), &pipeline, groups, 100);
                let y = read_y(ctx, &s);
                let want = baseline.get_or_insert_with(|| y.clone());
                let worst = y.iter().zip(want.iter()).map(|(a, b)| (a - b).abs() / b.abs().max(1e-3)).fold(0f32, f32::max);
                let marks = format!("{}{}", if shape == pick { "*" } else { "" }, if worst > 1e-3 { "!" } else { "" });
                print!(" {:>13}", format!("{:.1}{marks}", secs * 1e6));
            }
            println!();
        }
    }
}

fn gemm(ctx: &GpuContext, kernels: &Kernels, shapes: &[(&str, &str, usize, usize)]) {
    // GEMM_TOKENS: the step's tokens (512, a prefill chunk; 128, a large decode step).
    let tokens = std::env::var("GEMM_TOKENS").ok().and_then(|t| t.parse().ok()).unwrap_or(512);
    println!("gemm, {tokens} tokens: TFLOP/s");
    for &(model, name, rows, cols) in shapes {
        let s = setup(ctx, rows, cols, tokens);
        print!("{:<12}", format!("{model}.{name}"));
        let flops = 2.0 * (tokens * s.rows * cols) as f64;
        let groups = [s.rows.div_ceil(GEMM_TILE) as u32, tokens.div_ceil(GEMM_TILE) as u32, 1];
        let simt = kernels.gemm(WeightFormat::Q4_0, false, false).expect("gemm");
        // One matrix-unit variant alone (see below) skips the SIMT kernels' timing.
        let only = std::env::var("COOP_VARIANT").ok();
        let reps = if only.is_some() { 1 } else { 20 };
        print!(" simt {:>7.3}", flops / time(ctx, kernels, &s, &simt, groups, reps) / 1e12);
        // The f32 kernel's result: what every matrix-unit variant is checked against.
        let reference = read_y(ctx, &s);
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        if only.is_none() {
            // The SIMT GEMM before its loader was made race-free (lanes wrote components of
            // shared vectors): the figure the race-free loader has not yet matched on the H200.
            let old = format!(
                "{}\n{}\n{}",
                include_str!("../../shaders/wgsl/common.wgsl"),
                include_str!("gemm_6d832b2.wgsl"),
                include_str!("../../shaders/wgsl/dequant_q4_0.wgsl")
            );
            let old = kernels.pipeline_from_source(Kernel::Gemm, "gemm 6d832b2", &old, &[]).expect("old gemm");
            print!(" simt@6d832b2 {:>7.3}", flops / time(ctx, kernels, &s, &old, groups, 20) / 1e12);
        }
        if ctx.caps.coop_matrix {
            // The engine's kernel at both tile heights and with split reductions (it picks one
            // per matrix and step with `CoopPlan::for_step`), then ablations of the 128-row one:
            // what each part of a step costs (wrong results). A variant the driver cannot compile
            // loses the device, so `COOP_VARIANT=name,name` runs those alone.
            let source = Kernel::GemmCoop.source(Some(WeightFormat::Q4_0), ctx.caps).expect("gemm_coop source");
            let plan = |tile_rows, splits| CoopPlan { tile_rows, splits };
            // (name, plan, the parts an ablation removes: global loads, tile stores,
            // multiply-adds, barriers; None: the engine's pipelines).
            let variants = [
                ("coop", plan(128, 1), None),
                ("coop-r256", plan(256, 1), None),
                ("coop-k2", plan(128, 2), None),
                ("coop-k4", plan(128, 4), None),
                ("coop-k8", plan(128, 8), None),
                ("abl-no-global-loads", plan(128, 1), Some((true, false, false, false))),
                ("abl-mma-only", plan(128, 1), Some((true, true, false, false))),
                ("abl-no-mma", plan(128, 1), Some((false, false, true, false))),
                ("abl-mma-no-barriers", plan(128, 1), Some((true, true, false, true))),
            ];
            let pick = CoopPlan::for_step(s.rows, cols, tokens, kernels.gemm_parts_bytes());
            let bgs: Vec<wgpu::BindGroup> = s
                .copies
                .iter()
                .map(|m| {
                    let u = m.part_params(ctx, m.cols, s.rows, 0).remove(0);
                    let p = &m.parts[0];
                    kernels.gemm_coop_bind_group("bench", [&s.step, &u, &s.x, &p.quants, &p.scales, &s.y])
                })
                .collect();
            let wanted = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|o| o == name));
            for (name, plan, ablation) in variants.into_iter().filter(|(name, ..)| wanted(name)) {
                // Splits whose sums outgrow the scratch are never planned (their sums would be
                // clipped).
                if (plan.splits as usize * tokens * s.rows * 4) as u64 > kernels.gemm_parts_bytes() {
                    print!(" {name} -");
                    continue;
                }
                let pipelines = match ablation {
                    None => kernels.gemm_coop(WeightFormat::Q4_0, false, false, plan).expect("gemm_coop"),
                    Some((no_loads, no_stores, no_mma, no_barriers)) => {
                        let ablated = coop_ablate(&source, no_loads, no_stores, no_mma, no_barriers);
                        let gemm = kernels.pipeline_from_source(Kernel::GemmCoop, name, &ablated, &[]).expect("gemm_coop variant");
                        CoopPipelines { plan, gemm, sum: None }
                    }
                };
                let mut passes = vec![(&pipelines.gemm, plan.gemm_groups(s.rows, tokens))];
                passes.extend(pipelines.sum.as_ref().map(|sum| (sum, plan.sum_groups(s.rows, tokens))));
                let tflops = flops / time_passes(ctx, &bgs, &passes, 20) / 1e12;
                let y = read_y(ctx, &s);
                let diff = reference.iter().zip(&y).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                let mark = if plan == pick && ablation.is_none() { "*" } else { "" };
                print!(" {name}{mark} {tflops:>6.1} (diff {diff:.0e})");
            }
        }
        println!();
    }
}

/// gemm_coop.wgsl without its global loads, tile stores, multiply-adds or main-loop barriers, as
/// asked: ablations that time each part of a step. Each edit must find its text, so a change to
/// the kernel cannot silently turn an ablation into the kernel itself.
fn coop_ablate(source: &str, no_loads: bool, no_stores: bool, no_mma: bool, no_barriers: bool) -> String {
    fn cut(s: String, text: &str, with: &str) -> String {
        assert!(s.contains(text), "gemm_coop.wgsl no longer has `{text}`: update the ablation");
        s.replace(text, with)
    }
    let mut s = source.to_string();
    if no_loads {
        s = cut(s, "    load_step(first,", "    // ");
        s = cut(s, "            load_step(s + 1u,", "            // ");
    }
    if no_stores {
        s = cut(s, "            put_w(ld * LD", "            // ");
        s = cut(s, "            put_x(xt * LD", "            // ");
    }
    if no_mma {
        let a = s.find("        for (var kk = 0u; kk < BK; kk += 16u) {").expect("gemm_coop.wgsl's multiply-add loop");
        let b = a + s[a..].find("        workgroupBarrier();\n    }\n").expect("the end of gemm_coop.wgsl's step loop");
        s.replace_range(a..b, "");
    }
    if no_barriers {
        s = cut(s, "        workgroupBarrier();\n", "");
    }
    s
}

/// The plainest read of a large buffer: the bandwidth ceiling kernels can reach through this
/// adapter's API, to judge the matvec's figures against.
const READ_WGSL: &str = "
@group(0) @binding(0) var<storage, read> src: array<VEC>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
override WG: u32 = 256u;
override PER: u32 = 4u;
@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    var acc = VEC(0u);
    let base = wg.x * WG * PER + li;
    for (var u = 0u; u < PER; u++) {
        acc ^= src[base + u * WG];
    }
    if (dot(vec4<u32>(acc), vec4<u32>(1u)) == 0x9e3779b9u) {
        dst[0] = 1u;
    }
}
";

fn read(ctx: &GpuContext) {
    let bytes = (1u64 << 30).min(ctx.max_binding() & !0xfffff);
    let data: Vec<u8> = q4_0_bytes(1, 32, 3).into_iter().cycle().take(64 << 20).collect();
    let src = ctx.storage("src", bytes);
    for off in (0..bytes).step_by(data.len()) {
        ctx.queue.write_buffer(&src, off, &data);
    }
    let dst = ctx.storage("dst", 4);
    for (vec, width) in [("vec4<u32>", 16u64), ("u32", 4)] {
        let source = READ_WGSL.replace("VEC", vec);
        let module = ctx
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor { label: Some("read"), source: wgpu::ShaderSource::Wgsl(source.into()) });
        let mut line = format!("read {} MiB, {width}-byte loads, GB/s by (lanes, loads per lane):", bytes >> 20);
        for (wg, per) in [(256u32, 1u32), (256, 4), (256, 8), (64, 4), (64, 8), (256, 16)] {
            let pipeline = ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("read"),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[("WG", f64::from(wg)), ("PER", f64::from(per))],
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
            let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("read"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry { binding: 0, resource: src.as_entire_binding() },
                    wgpu::BindGroupEntry { binding: 1, resource: dst.as_entire_binding() },
                ],
            });
            let groups = (bytes / width / u64::from(wg * per)) as u32;
            let (x, y) = if groups > 65535 { (65535u32.min(groups), groups.div_ceil(65535)) } else { (groups, 1) };
            let mut best = f64::MAX;
            for round in 0..4 {
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&pipeline);
                    pass.set_bind_group(0, &bg, &[]);
                    for _ in 0..10 {
                        pass.dispatch_workgroups(x, y, 1);
                    }
                }
                let start = Instant::now();
                ctx.queue.submit([enc.finish()]);
                ctx.device.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
                if round > 0 {
                    best = best.min(start.elapsed().as_secs_f64() / 10.0);
                }
            }
            line += &format!(" ({wg}, {per}) {:.0}", bytes as f64 / best / 1e9);
        }
        println!("{line}");
    }
    ctx.check_errors("read").expect("read kernel");
}

fn copy(ctx: &GpuContext) {
    let bytes = 1u64 << 30;
    let a = ctx.storage("a", bytes);
    let b = ctx.storage("b", bytes);
    let mut best = f64::MAX;
    for _ in 0..4 {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&a, 0, &b, 0, bytes);
        let start = Instant::now();
        ctx.queue.submit([enc.finish()]);
        ctx.device.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!("copy 1 GiB: {:.0} GB/s (read + write)", 2.0 * bytes as f64 / best / 1e9);
}

/// A kernel that writes what the next dispatch reads, one workgroup: the cost of a dependent
/// dispatch on this adapter with nothing to compute, the floor under every small kernel.
const CHAIN_WGSL: &str = "
@group(0) @binding(0) var<storage, read_write> v: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) li: u32) {
    if (li == 0u) {
        v[0] = v[0] + 1u;
    }
}
";

/// Seconds per dispatch of `pipeline` with `bg`, `groups` workgroups, each dispatch after the
/// last (they share a written buffer, so the API orders them).
fn time_chain(ctx: &GpuContext, pipeline: &wgpu::ComputePipeline, bg: &wgpu::BindGroup, groups: [u32; 3], reps: usize) -> f64 {
    let mut best = f64::MAX;
    for round in 0..3 {
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, bg, &[]);
            for _ in 0..reps {
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
            }
        }
        let start = Instant::now();
        ctx.queue.submit([enc.finish()]);
        ctx.device.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
        if round > 0 {
            best = best.min(start.elapsed().as_secs_f64() / reps as f64);
        }
    }
    best
}

/// The decode step's small kernels against the floor of a dependent dispatch: attention (one
/// token at contexts 128 and 1024, the models' head shapes) and its merge where there is one.
fn small(ctx: &GpuContext, kernels: &Kernels) {
    let v = ctx.storage("chain", 4);
    let module = ctx
        .device
        .create_shader_module(wgpu::ShaderModuleDescriptor { label: Some("chain"), source: wgpu::ShaderSource::Wgsl(CHAIN_WGSL.into()) });
    let pipeline = ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("chain"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("chain"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry { binding: 0, resource: v.as_entire_binding() }],
    });
    println!("a dependent dispatch, one workgroup: {:.1} µs", time_chain(ctx, &pipeline, &bg, [1, 1, 1], 1000) * 1e6);
    let bt = tandem_core::BLOCK_TOKENS;
    // (model, heads, kv heads, head dim)
    for (model, nh, nkv, hd) in [("135m", 9usize, 3usize, 64usize), ("1b", 32, 8, 64), ("8b", 32, 8, 128)] {
        for ctx_len in [128usize, 1024] {
            let (q_dim, kv_dim) = (nh * hd, nkv * hd);
            let n_blocks = ctx_len.div_ceil(bt);
            let blocks: Vec<u32> = (0..n_blocks as u32).map(|b| (b * 7 + 3) % n_blocks as u32).collect();
            let pos = ctx_len - 1;
            let info =
                TokenInfo { id: 0, pos: pos as u32, slot: blocks[pos / bt] * bt as u32 + (pos % bt) as u32, table_off: 0, chunk_off: 0 };
            let fill = |n: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect() };
            let qkv = ctx.storage_init("qkv", bytemuck::cast_slice(&fill(q_dim + 2 * kv_dim)));
            // The engine's default cache: f16.
            let kv = KvDtype::F16;
            let kc = ctx.storage_init("k", &kv.encode(&fill(n_blocks * bt * kv_dim)));
            let vc = ctx.storage_init("v", &kv.encode(&fill(n_blocks * bt * kv_dim)));
            let tokens = ctx.storage_init("tokens", bytemuck::bytes_of(&info));
            let tables = ctx.storage_init("tables", bytemuck::cast_slice(&blocks));
            let chunks = ctx_len.div_ceil(tandem_shaders::ATTENTION_CHUNK as usize);
            let partials = ctx.storage("partials", (chunks * nh * (hd + 2) * 4) as u64);
            let step = ctx.uniform_init("step", bytemuck::bytes_of(&Step { n_tokens: 1, n_sample: 1, ..Default::default() }));
            let out = ctx.storage("out", (q_dim * 4) as u64);
            let out_q8 = ctx.storage("out_q8", (tandem_core::kernels::Q8_TOKENS * q_dim * 2) as u64);
            let bg =
                kernels.bind_group(Kernel::Attention, "attention", &[&step, &qkv, &tokens, &tables, &kc, &vc, &partials, &out, &out_q8]);
            let consts = [
                ("N_HEADS", nh as f64),
                ("N_KV_HEADS", nkv as f64),
                ("HEAD_DIM", hd as f64),
                ("BLOCK_TOKENS", bt as f64),
                ("SCALE", 1.0 / (hd as f64).sqrt()),
                ("Q8", 1.0),
            ];
            let pipeline = kernels.pipeline(Kernel::Attention, Some(kv.format()), &consts).expect("attention");
            let secs = time_chain(ctx, &pipeline, &bg, [nh as u32, 1, chunks as u32], 500);
            let bytes = 2 * ctx_len * kv_dim * kv.bytes();
            println!(
                "attention {model} (heads {nh}/{nkv} x {hd}), context {ctx_len}: {:.1} µs ({:.0} GB/s of K/V)",
                secs * 1e6,
                bytes as f64 / secs / 1e9
            );
            // The merge runs only where a token has more than one chunk.
            if chunks > 1 {
                let bg = kernels.bind_group(Kernel::AttentionMerge, "merge", &[&step, &tokens, &partials, &out, &out_q8]);
                let consts =
                    [("N_HEADS", nh as f64), ("HEAD_DIM", hd as f64), ("CHUNK", f64::from(tandem_shaders::ATTENTION_CHUNK)), ("Q8", 1.0)];
                let pipeline = kernels.pipeline(Kernel::AttentionMerge, None, &consts).expect("merge");
                let secs = time_chain(ctx, &pipeline, &bg, [nh as u32, 1, 1], 500);
                println!("attention_merge {model}, {chunks} chunks: {:.1} µs", secs * 1e6);
            }
        }
    }
    ctx.check_errors("small kernels").expect("small kernels");
}

/// A prototype, not an engine kernel: the matrix units fed straight from f16 copies of the weights
/// and activations (fragments loaded from storage, no workgroup tiles, no loader, no barriers),
/// as if each matrix had been dequantized to f16 once before the step. Subgroup s of a workgroup
/// owns rows 32 (s % SR).. by tokens 64 (s / SR)..; each k step loads 2 A and 4 B fragments for 8
/// multiply-adds. UNROLL k steps a loop iteration.
const DIRECT_WGSL: &str = "
enable f16;
enable wgpu_cooperative_matrix;
@group(0) @binding(0) var<storage, read> w: array<vec4<f16>>;
@group(0) @binding(1) var<storage, read> x: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
override N: u32 = 4096u;
override K: u32 = 4096u;
override SR: u32 = 4u;
override WG: u32 = 256u;
override UNROLL: u32 = 1u;
@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let sg = li / 32u;
    let st = WG / 32u / SR;
    let r0 = wg.x * (SR * 32u) + (sg % SR) * 32u;
    let t0 = wg.y * (st * 64u) + (sg / SR) * 64u;
    let kv = K / 4u;
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c02 = coop_mat16x16<f32, C>();
    var c03 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>();
    var c13 = coop_mat16x16<f32, C>();
    for (var k = 0u; k < K; k += 16u * UNROLL) {
        for (var u = 0u; u < UNROLL; u++) {
            let kk = (k + 16u * u) / 4u;
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&w[r0 * kv + kk], kv);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&w[(r0 + 16u) * kv + kk], kv);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&x[t0 * kv + kk], kv);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&x[(t0 + 16u) * kv + kk], kv);
            let b2 = coopLoad<coop_mat16x16<f16, B>>(&x[(t0 + 32u) * kv + kk], kv);
            let b3 = coopLoad<coop_mat16x16<f16, B>>(&x[(t0 + 48u) * kv + kk], kv);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c02 = coopMultiplyAdd(a0, b2, c02);
            c03 = coopMultiplyAdd(a0, b3, c03);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c12 = coopMultiplyAdd(a1, b2, c12);
            c13 = coopMultiplyAdd(a1, b3, c13);
        }
    }
    let n = N;
    let o00 = t0 * N + r0;
    let o01 = o00 + 16u * N;
    let o02 = o00 + 32u * N;
    let o03 = o00 + 48u * N;
    let o10 = o00 + 16u;
    let o11 = o01 + 16u;
    let o12 = o02 + 16u;
    let o13 = o03 + 16u;
    coopStore(c00, &y[o00], n);
    coopStore(c01, &y[o01], n);
    coopStore(c02, &y[o02], n);
    coopStore(c03, &y[o03], n);
    coopStore(c10, &y[o10], n);
    coopStore(c11, &y[o11], n);
    coopStore(c12, &y[o12], n);
    coopStore(c13, &y[o13], n);
}
";

/// `DIRECT_WGSL` on each shape at 512 tokens (or GEMM_TOKENS), for a few workgroup shapes, with
/// a handful of outputs checked against the CPU; and what the f16 copies would cost to write.
fn gemm_direct(ctx: &GpuContext, shapes: &[(&str, &str, usize, usize)]) {
    let tokens = std::env::var("GEMM_TOKENS").ok().and_then(|t| t.parse().ok()).unwrap_or(512usize);
    println!("gemm from f16 copies (prototype), {tokens} tokens: TFLOP/s by (SR, WG, UNROLL); max rel. error of 16 outputs");
    let module = {
        let desc = wgpu::ShaderModuleDescriptor { label: Some("direct"), source: wgpu::ShaderSource::Wgsl(DIRECT_WGSL.into()) };
        let mut checks = wgpu::ShaderRuntimeChecks::checked();
        checks.force_loop_bounding = false;
        #[allow(unsafe_code)]
        unsafe {
            ctx.device.create_shader_module_trusted(desc, checks)
        }
    };
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    for &(model, name, rows, cols) in shapes {
        if !rows.is_multiple_of(256) || !cols.is_multiple_of(64) || !tokens.is_multiple_of(128) {
            println!("{model}.{name}: shape not a multiple of the tiles, skipped");
            continue;
        }
        let rows = rows.min(ctx.max_binding() as usize / (cols * 2)) / 256 * 256;
        let wh: Vec<half::f16> = (0..rows * cols).map(|_| half::f16::from_f32(rnd() * 0.1)).collect();
        let xh: Vec<half::f16> = (0..tokens * cols).map(|_| half::f16::from_f32(rnd())).collect();
        let one = rows * cols * 2;
        let n_copies = ROTATION_BYTES.div_ceil(one).clamp(1, 8);
        let ws: Vec<wgpu::Buffer> = (0..n_copies).map(|_| ctx.storage_init("w16", bytemuck::cast_slice(&wh))).collect();
        let xb = ctx.storage_init("x16", bytemuck::cast_slice(&xh));
        let yb = ctx.storage("y", (tokens * rows * 4) as u64);
        let flops = 2.0 * (tokens * rows * cols) as f64;
        print!("{:<12}", format!("{model}.{name}"));
        for (sr, wg, unroll) in [(4u32, 256u32, 1u32), (4, 256, 2), (2, 128, 1), (8, 256, 1), (4, 128, 1), (8, 512, 1)] {
            let st = wg / 32 / sr;
            let (tile_r, tile_t) = ((sr * 32) as usize, (st * 64) as usize);
            if !rows.is_multiple_of(tile_r) || !tokens.is_multiple_of(tile_t) {
                print!(" ({sr},{wg},{unroll}) -");
                continue;
            }
            let pipeline = ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("direct"),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[
                        ("N", rows as f64),
                        ("K", cols as f64),
                        ("SR", f64::from(sr)),
                        ("WG", f64::from(wg)),
                        ("UNROLL", f64::from(unroll)),
                    ],
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
            let bgs: Vec<wgpu::BindGroup> = ws
                .iter()
                .map(|w| {
                    ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("direct"),
                        layout: &pipeline.get_bind_group_layout(0),
                        entries: &[
                            wgpu::BindGroupEntry { binding: 0, resource: w.as_entire_binding() },
                            wgpu::BindGroupEntry { binding: 1, resource: xb.as_entire_binding() },
                            wgpu::BindGroupEntry { binding: 2, resource: yb.as_entire_binding() },
                        ],
                    })
                })
                .collect();
            let groups = [(rows / tile_r) as u32, (tokens / tile_t) as u32, 1];
            let secs = time_passes(ctx, &bgs, &[(&pipeline, groups)], 20);
            let size = yb.size();
            let rb = ctx.readback("y", size);
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&yb, 0, &rb, 0, size);
            let idx = ctx.queue.submit([enc.finish()]);
            let y: Vec<f32> = bytemuck::cast_slice(&ctx.read_mapped(&rb, size, idx).expect("readback")).to_vec();
            let mut worst = 0f32;
            for i in 0..16 {
                let (t, r) = ((i * 7919) % tokens, (i * 104_729) % rows);
                let want: f32 = (0..cols).map(|k| wh[r * cols + k].to_f32() * xh[t * cols + k].to_f32()).sum();
                let scale: f32 = (0..cols).map(|k| (wh[r * cols + k].to_f32() * xh[t * cols + k].to_f32()).abs()).sum();
                worst = worst.max((y[t * rows + r] - want).abs() / scale.max(1e-6));
            }
            print!(" ({sr},{wg},{unroll}) {:>6.1} ({worst:.0e})", flops / secs / 1e12);
        }
        // Writing the f16 copy from Q4_0 reads 0.5625 and writes 2 bytes a weight.
        println!(" | f16 copy at 3 TB/s: {:.2} ms", (rows * cols) as f64 * 2.5625 / 3e12 * 1e3);
        ctx.check_errors("direct gemm").expect("direct gemm");
    }
}

fn main() {
    let ctx = GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter");
    println!("{} ({}), caps {:?}", ctx.adapter.name, ctx.adapter.driver, ctx.caps);
    let kernels = Kernels::new(&ctx);
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let kinds = ["copy", "read", "matvec", "ablate", "q8", "q8steps", "gemm", "direct", "small"];
    let want = |what: &str| !args.iter().any(|a| kinds.contains(&a.as_str())) || args.iter().any(|a| a == what);
    let models: Vec<&String> = args.iter().filter(|a| !kinds.contains(&a.as_str())).collect();
    let shapes: Vec<_> = SHAPES.into_iter().filter(|s| models.is_empty() || models.iter().any(|m| *m == s.0)).collect();
    if want("copy") {
        copy(&ctx);
    }
    if want("read") {
        read(&ctx);
    }
    if want("matvec") {
        matvec(&ctx, &kernels, &shapes);
    }
    if want("ablate") {
        matvec_ablations(&ctx, &kernels, &shapes);
    }
    if want("q8") {
        matvec_q8(&ctx, &kernels, &shapes);
    }
    if want("q8steps") {
        matvec_q8_steps(&ctx, &kernels, &shapes);
    }
    if want("gemm") {
        gemm(&ctx, &kernels, &shapes);
    }
    if want("direct") && ctx.caps.coop_matrix {
        gemm_direct(&ctx, &shapes);
    }
    if want("small") {
        small(&ctx, &kernels);
    }
}
