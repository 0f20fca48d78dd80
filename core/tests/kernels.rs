//! Every GPU kernel against the plain CPU implementation in `cpu_ref`, on odd shapes: row counts
//! that are not multiples of the workgroup, one token and many, float columns that are not
//! multiples of the block. Runs on whatever adapter is present (lavapipe in CI); fails without one.

use rand::{Rng, SeedableRng};
use tandem_core::cpu_ref;
use tandem_core::device_weights::DeviceMatrix;
use tandem_core::kernels::{
    CoopPlan, GEMM_TILE, Kernels, MATMUL_TILE, MATVEC_TOKENS, MatvecShape, Q8_TOKENS, Q8Finish, Q8Input, SILU_MUL_TILE, q8_activations,
    q8_ranges,
};
use tandem_core::tensor::{HostTensor, TensorBytes};
use tandem_core::{GpuContext, KvDtype, WeightFormat};
use tandem_shaders::{Kernel, SampleParams, ShaderCaps, Step, TokenInfo};

/// Matmul results may differ from the f64-accumulated reference by this much (relative to the
/// magnitude of the dot product's terms).
const MATMUL_TOLERANCE: f32 = 2e-5;
/// The cooperative-matrix GEMM rounds weights and activations to f16.
const COOP_MATMUL_TOLERANCE: f32 = 2e-3;
const ELEMENTWISE_TOLERANCE: f32 = 1e-5;
/// Rounding activations to 8 bits moves each by at most half a step (max|x| / 254 of its block);
/// on random activations the dot products move far less than this, relative to their terms.
const Q8_ACTIVATION_TOLERANCE: f32 = 5e-3;

fn gpu() -> GpuContext {
    GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter (install mesa-vulkan-drivers)")
}

/// The adapter once per kernel variant it can run: with its own capabilities and with each
/// subset of them, so the fallbacks are tested on adapters that would never pick them.
fn gpu_variants() -> Vec<GpuContext> {
    let ctx = gpu();
    ShaderCaps::ALL
        .into_iter()
        .filter(|c| (!c.subgroups || ctx.caps.subgroups) && (!c.f16 || ctx.caps.f16) && (!c.coop_matrix || ctx.caps.coop_matrix))
        .map(|caps| {
            let mut c = ctx.clone();
            c.caps = caps;
            c
        })
        .collect()
}

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(7)
}

fn random(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn read_f32(ctx: &GpuContext, buf: &wgpu::Buffer, bytes: u64, enc: wgpu::CommandEncoder) -> Vec<f32> {
    bytemuck::cast_slice(&read_bytes(ctx, buf, bytes, enc)).to_vec()
}

fn read_bytes(ctx: &GpuContext, buf: &wgpu::Buffer, bytes: u64, enc: wgpu::CommandEncoder) -> Vec<u8> {
    let mut enc = enc;
    let rb = ctx.readback("test.read", bytes);
    enc.copy_buffer_to_buffer(buf, 0, &rb, 0, bytes);
    let idx = ctx.queue.submit([enc.finish()]);
    ctx.read_mapped(&rb, bytes, idx).expect("readback")
}

/// A producer's 8-bit activations (`got`, the buffer's bytes) are `values` (tokens of `stride`
/// floats, the first `width` of each token quantized) quantized as `cpu_ref` does: the same
/// scale, each quant within one step (the GPU's division may round a near-tie the other way),
/// and s = d * the sum of the GPU's own quants.
fn assert_q8_matches(got: &[u8], values: &[f32], stride: usize, width: usize, what: &str) {
    let (_, scales) = q8_ranges(stride);
    let want = q8_activations(values, stride);
    for t in 0..values.len() / stride {
        for b in 0..width / 32 {
            let blk = t * stride / 32 + b;
            let q = |bytes: &[u8]| bytes[blk * 32..(blk + 1) * 32].iter().map(|&v| i32::from(v as i8)).collect::<Vec<_>>();
            let f = |bytes: &[u8], i: usize| {
                let at = scales.start as usize + blk * 8 + i * 4;
                f32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
            };
            let (gq, wq) = (q(got), q(&want));
            let (gd, wd) = (f(got, 0), f(&want, 0));
            assert!((gd - wd).abs() <= 1e-6 * wd.abs(), "{what}: token {t} block {b}: scale {gd}, want {wd}");
            assert!(gq.iter().zip(&wq).all(|(g, w)| (g - w).abs() <= 1), "{what}: token {t} block {b}: quants {gq:?}, want {wq:?}");
            let sum = gd * gq.iter().sum::<i32>() as f32;
            assert!((f(got, 1) - sum).abs() <= 1e-5 * sum.abs().max(gd), "{what}: token {t} block {b}: sum {}, want {sum}", f(got, 1));
        }
    }
}

fn dispatch(ctx: &GpuContext, pipeline: &wgpu::ComputePipeline, groups: &[(&wgpu::BindGroup, [u32; 3])]) -> wgpu::CommandEncoder {
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(pipeline);
        for (bg, [x, y, z]) in groups {
            pass.set_bind_group(0, *bg, &[]);
            pass.dispatch_workgroups(*x, *y, *z);
        }
    }
    enc
}

fn step_buf(ctx: &GpuContext, n_tokens: usize, n_sample: usize) -> wgpu::Buffer {
    ctx.uniform_init("step", bytemuck::bytes_of(&Step { n_tokens: n_tokens as u32, n_sample: n_sample as u32, ..Default::default() }))
}

/// `cols` scaled up to whole super-blocks for the K-quants (256 values a block), keeping the
/// count of 32-value blocks odd where it was.
fn widen(format: WeightFormat, cols: usize) -> usize {
    if format.block_elems() > 32 { cols * format.block_elems() / 32 } else { cols }
}

fn host_matrix(format: WeightFormat, values: &[f32], rows: usize, cols: usize) -> HostTensor {
    let bytes: Vec<u8> = values.chunks(cols).flat_map(|r| cpu_ref::quantize_row(format, r)).collect();
    HostTensor { name: format!("w.{format}"), format, shape: vec![cols, rows], bytes: TensorBytes::owned(bytes) }
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, scale: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        assert!((g - w).abs() <= tol * s.max(1.0), "{what}[{i}]: got {g}, want {w} (tolerance {tol} x {s})");
    }
}

fn run_matmul(ctx: &GpuContext, kernels: &Kernels, m: &DeviceMatrix, x: &[f32], tokens: usize) -> Vec<f32> {
    let (rows, cols) = (m.rows, m.cols);
    let step = step_buf(ctx, tokens, 0);
    let xb = ctx.storage_init("x", bytemuck::cast_slice(x));
    let y = ctx.storage("y", (tokens * rows * 4) as u64);
    let params = m.part_params(ctx, cols, rows, 0);
    let groups: Vec<(wgpu::BindGroup, [u32; 3])> = m
        .parts
        .iter()
        .zip(&params)
        .map(|(p, u)| {
            let bg = kernels.bind_group(Kernel::Matmul, "mm", &[&step, u, &xb, &p.quants, &p.scales, &y, &xb]);
            let per_wg = 64 / kernels.matmul_split() as usize;
            (bg, [p.rows.div_ceil(per_wg) as u32, tokens.div_ceil(MATMUL_TILE) as u32, 1])
        })
        .collect();
    let pipeline = kernels.matmul(m.format, false, false).expect("pipeline");
    let refs: Vec<(&wgpu::BindGroup, [u32; 3])> = groups.iter().map(|(b, d)| (b, *d)).collect();
    read_f32(ctx, &y, (tokens * rows * 4) as u64, dispatch(ctx, &pipeline, &refs))
}

fn matmul_reference(format: WeightFormat, t: &HostTensor, x: &[f32], tokens: usize) -> (Vec<f32>, Vec<f32>) {
    let (rows, cols) = (t.rows(), t.cols());
    let w = cpu_ref::dequantize(format, t.bytes.as_slice(), rows, cols);
    let want = cpu_ref::matmul(x, &w, tokens, rows, cols);
    let abs_w: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    (want, cpu_ref::matmul(&abs_x, &abs_w, tokens, rows, cols))
}

#[test]
fn matmul_matches_cpu_for_every_format_and_odd_shapes() {
    for ctx in gpu_variants() {
        let kernels = Kernels::new(&ctx);
        let mut rng = rng();
        for format in WeightFormat::ALL {
            let mut shapes = vec![(70, 64, 1), (130, 96, 3), (33, 160, 9), (65, 64, 17)];
            if format.block_elems() == 1 {
                shapes.extend([(7, 37, 2), (66, 45, 8)]);
            }
            for (rows, cols, tokens) in shapes {
                let cols = widen(format, cols);
                let t = host_matrix(format, &random(&mut rng, rows * cols), rows, cols);
                let x = random(&mut rng, tokens * cols);
                let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
                let got = run_matmul(&ctx, &kernels, &m, &x, tokens);
                let (want, scale) = matmul_reference(format, &t, &x, tokens);
                assert_close(&got, &want, MATMUL_TOLERANCE, &scale, &format!("matmul {format} {rows}x{cols} x{tokens} {:?}", ctx.caps));
            }
        }
    }
}

/// One of the fast kernels.
#[derive(Clone, Copy, Debug)]
enum Fast {
    /// The decode matvec.
    Matvec(MatvecShape),
    /// The decode matvec on 8-bit activations (`x` quantized as the producers write it).
    MatvecQ8(MatvecShape),
    /// The workgroup-tiled GEMM.
    Gemm,
    /// The GEMM on matrix units (rows of whole blocks, adapters that have them), covering the
    /// step as planned (its split reductions' sums added by a second pass).
    GemmCoop(CoopPlan),
}

fn run_fast(ctx: &GpuContext, kernels: &Kernels, m: &DeviceMatrix, x: &[f32], tokens: usize, fast: Fast) -> Vec<f32> {
    let (n, cols) = (m.rows, m.cols);
    let step = step_buf(ctx, tokens, 0);
    let xb = ctx.storage_init("x", bytemuck::cast_slice(x));
    // The 8-bit activations hold Q8_TOKENS rows; those past the step's are never read back.
    let x_q8 = matches!(fast, Fast::MatvecQ8(_)).then(|| {
        let mut padded = x.to_vec();
        padded.resize(Q8_TOKENS * cols, 0.5);
        ctx.storage_init("x_q8", &q8_activations(&padded, cols))
    });
    let y = ctx.storage("y", (tokens * n * 4) as u64);
    // Poisoned, so an output the kernel never writes shows.
    ctx.queue.write_buffer(&y, 0, bytemuck::cast_slice(&vec![f32::NAN; tokens * n]));
    let params = m.part_params(ctx, cols, n, 0);
    // Per part: its bind group, the kernel's workgroups, and the sum pass's where there is one.
    let groups: Vec<(wgpu::BindGroup, [u32; 3], [u32; 3])> = m
        .parts
        .iter()
        .zip(&params)
        .map(|(p, u)| {
            let bg = match (&x_q8, fast) {
                (Some(xq), _) => kernels.matvec_q8_bind_group("mm", [&step, u, &p.quants, &p.scales, &y], xq, cols),
                (None, Fast::GemmCoop(_)) => kernels.gemm_coop_bind_group("mm", [&step, u, &xb, &p.quants, &p.scales, &y]),
                (None, _) => kernels.bind_group(Kernel::Matvec, "mm", &[&step, u, &xb, &p.quants, &p.scales, &y, &xb]),
            };
            let (size, sum) = match fast {
                Fast::Gemm => ([p.rows.div_ceil(GEMM_TILE) as u32, tokens.div_ceil(GEMM_TILE) as u32, 1], [0; 3]),
                Fast::GemmCoop(plan) => (plan.gemm_groups(p.rows, tokens), plan.sum_groups(p.rows, tokens)),
                Fast::Matvec(shape) => {
                    ([p.rows.div_ceil(shape.rows_per_workgroup()) as u32, tokens.div_ceil(shape.tokens as usize) as u32, 1], [0; 3])
                }
                Fast::MatvecQ8(shape) => (shape.q8_grid(p.rows, tokens), [0; 3]),
            };
            (bg, size, sum)
        })
        .collect();
    let (pipeline, sum) = match fast {
        Fast::Gemm => (kernels.gemm(m.format, false, false).expect("pipeline"), None),
        Fast::GemmCoop(plan) => {
            let p = kernels.gemm_coop(m.format, false, false, plan).expect("pipeline");
            (p.gemm, p.sum)
        }
        Fast::Matvec(shape) => (kernels.matvec(m.format, shape, false, false).expect("pipeline"), None),
        Fast::MatvecQ8(shape) => (kernels.matvec_q8(m.format, shape, false, false).expect("pipeline"), None),
    };
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        for (bg, [x, y, z], [sx, sy, sz]) in &groups {
            pass.set_bind_group(0, bg, &[]);
            pass.set_pipeline(&pipeline);
            pass.dispatch_workgroups(*x, *y, *z);
            if let Some(sum) = &sum {
                pass.set_pipeline(sum);
                pass.dispatch_workgroups(*sx, *sy, *sz);
            }
        }
    }
    read_f32(ctx, &y, (tokens * n * 4) as u64, enc)
}

#[test]
fn fast_matmuls_match_cpu_for_every_format_and_odd_shapes() {
    for ctx in gpu_variants() {
        let kernels = Kernels::new(&ctx);
        let mut rng = rng();
        for format in WeightFormat::ALL {
            let mut shapes = vec![(70, 64, 1), (130, 96, 3), (33, 160, 9), (65, 64, 17), (131, 96, 70), (259, 64, 131)];
            if format.block_elems() == 1 {
                shapes.extend([(7, 37, 2), (66, 45, 8), (67, 45, 65)]);
            }
            for (n, cols, tokens) in shapes {
                let cols = widen(format, cols);
                let t = host_matrix(format, &random(&mut rng, n * cols), n, cols);
                let x = random(&mut rng, tokens * cols);
                let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
                let (want, scale) = matmul_reference(format, &t, &x, tokens);
                // The matvec and the matrix units' GEMM take rows of whole blocks only.
                let whole = cols.is_multiple_of(32);
                let matvecs = if whole { MATVEC_TOKENS.as_slice() } else { &[] };
                // The engine's shapes for short and long rows, and more rows per lane group.
                let mut variants: Vec<Fast> = matvecs
                    .iter()
                    .flat_map(|&t| {
                        let short = MatvecShape::for_matrix(32, t);
                        let long = MatvecShape::for_matrix(1 << 20, t);
                        [short, long, MatvecShape { rows: 2, ..short }, MatvecShape { rows: 4, ..short }]
                    })
                    .filter(|s| s.tokens * s.rows <= 8)
                    .map(Fast::Matvec)
                    .chain([Fast::Gemm])
                    .collect();
                if whole && ctx.caps.coop_matrix {
                    // Both tile heights, and reductions split in 2 and in 4 (on rows of 2-5 blocks, some splits
                    // get no columns at all).
                    variants.extend(
                        [(128, 1), (256, 1), (128, 2), (128, 4)].map(|(tile_rows, splits)| Fast::GemmCoop(CoopPlan { tile_rows, splits })),
                    );
                }
                for fast in variants {
                    let got = run_fast(&ctx, &kernels, &m, &x, tokens, fast);
                    let what = format!("fast matmul ({fast:?}) {format} {n}x{cols} x{tokens} {:?}", ctx.caps);
                    let tolerance = if matches!(fast, Fast::GemmCoop(_)) { COOP_MATMUL_TOLERANCE } else { MATMUL_TOLERANCE };
                    assert_close(&got, &want, tolerance, &scale, &what);
                }
            }
        }
    }
}

/// The matvec on 8-bit activations against the f64 matmul of the same rounded activations
/// (`cpu_ref::q8_round_trip`), and within the rounding's own error of the f32 activations'.
#[test]
fn matvec_q8_matches_cpu_for_packed_formats_and_odd_shapes() {
    for ctx in gpu_variants().into_iter().filter(|c| !c.caps.f16) {
        let kernels = Kernels::new(&ctx);
        let mut rng = rng();
        for format in WeightFormat::ALL.into_iter().filter(|f| f.has_packed_dot()) {
            // Rows that fill no workgroup evenly, rows shorter than a lane group's 32 blocks and
            // one longer than the KSPLIT threshold.
            for (n, cols) in [(70, 64), (131, 96), (33, 1120), (5, 8192 + 96)] {
                let cols = widen(format, cols);
                let t = host_matrix(format, &random(&mut rng, n * cols), n, cols);
                let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
                // 19: a step past the largest shape, in groups of its tokens (the last one short).
                for tokens in [1, 3, 8, 19] {
                    let x = random(&mut rng, tokens * cols);
                    let (want, scale) = matmul_reference(format, &t, &cpu_ref::q8_round_trip(&x), tokens);
                    let (want_f32, _) = matmul_reference(format, &t, &x, tokens);
                    let largest = MATVEC_TOKENS[MATVEC_TOKENS.len() - 1] as usize;
                    let shapes = MATVEC_TOKENS
                        .iter()
                        .filter(|&&mt| mt as usize >= tokens.min(largest))
                        .flat_map(|&mt| {
                            let short = MatvecShape::for_q8_matrix(32, mt);
                            [
                                short,
                                MatvecShape::for_q8_matrix(8192, mt),
                                MatvecShape::for_q8_matrix(1 << 20, mt),
                                MatvecShape { unroll: 4, ksplit: 4, lanes: 128, ..short },
                                MatvecShape { rows: 2, ..short },
                                MatvecShape { rows: 4, ksplit: 2, lanes: 128, ..short },
                            ]
                        })
                        .filter(|s| s.rows * s.tokens <= MatvecShape::MAX_SUMS);
                    for shape in shapes {
                        let got = run_fast(&ctx, &kernels, &m, &x, tokens, Fast::MatvecQ8(shape));
                        let what = format!("matvec_q8 {shape:?} {format} {n}x{cols} x{tokens} {:?}", ctx.caps);
                        assert_close(&got, &want, MATMUL_TOLERANCE, &scale, &what);
                        assert_close(&got, &want_f32, Q8_ACTIVATION_TOLERANCE, &scale, &what);
                    }
                }
            }
        }
    }
}

/// The 8-bit matvec that norms its input itself (matvec_q8_x_norm.wgsl): against the CPU's
/// RMSNorm, 8-bit rounding and matmul, for each token of a step (a workgroup a token), on rows
/// that fill no workgroup evenly and inputs up to its longest; then its rotating twin against
/// the rotating matvec fed the CPU's normed 8-bit activations.
#[test]
fn matvec_q8_norm_norms_its_input_itself() {
    let eps = 1e-5;
    for ctx in gpu_variants().into_iter().filter(|c| !c.caps.f16) {
        let kernels = Kernels::new(&ctx);
        let mut rng = rng();
        for format in WeightFormat::ALL.into_iter().filter(|f| f.has_packed_dot()) {
            for (n, cols) in [(70, 64), (131, 96), (33, 1120), (9, 8192)] {
                let cols = widen(format, cols);
                if cols > 8192 {
                    continue;
                }
                let t = host_matrix(format, &random(&mut rng, n * cols), n, cols);
                let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
                for tokens in [1, 3] {
                    // A residual stream of uneven scale, so the norm matters.
                    let x: Vec<f32> = random(&mut rng, tokens * cols).iter().enumerate().map(|(i, v)| v * (1.0 + (i % 7) as f32)).collect();
                    let g = random(&mut rng, cols);
                    let normed = cpu_ref::rmsnorm(&x, &g, cols, eps);
                    let (want, scale) = matmul_reference(format, &t, &cpu_ref::q8_round_trip(&normed), tokens);
                    let (step, xb, gb) = (
                        step_buf(&ctx, tokens, 0),
                        ctx.storage_init("x", bytemuck::cast_slice(&x)),
                        ctx.storage_init("g", bytemuck::cast_slice(&g)),
                    );
                    let y = ctx.storage("y", (tokens * n * 4) as u64);
                    ctx.queue.write_buffer(&y, 0, bytemuck::cast_slice(&vec![f32::NAN; tokens * n]));
                    let params = m.part_params(&ctx, cols, n, 0);
                    let shape = MatvecShape::for_q8_matrix(cols, 1);
                    for shape in [shape, MatvecShape { ksplit: 4, lanes: 128, ..shape }] {
                        let (_, pipeline) = kernels.matvec_q8_twin(format, shape, false, Some(eps), Q8Finish::Store).expect("pipeline");
                        let groups: Vec<(wgpu::BindGroup, [u32; 3])> = m
                            .parts
                            .iter()
                            .zip(&params)
                            .map(|(p, u)| {
                                let bg = kernels.bind_group(Kernel::MatvecQ8Norm, "mm", &[&step, u, &xb, &p.quants, &p.scales, &y, &gb]);
                                (bg, shape.q8_grid(p.rows, tokens))
                            })
                            .collect();
                        let refs: Vec<(&wgpu::BindGroup, [u32; 3])> = groups.iter().map(|(b, d)| (b, *d)).collect();
                        let got = read_f32(&ctx, &y, (tokens * n * 4) as u64, dispatch(&ctx, &pipeline, &refs));
                        let what = format!("matvec_q8_norm {shape:?} {format} {n}x{cols} x{tokens} {:?}", ctx.caps);
                        // The GPU's norm may round a near-tie quant the other way: a step of one
                        // activation, far under the 8-bit rounding's own error.
                        assert_close(&got, &want, Q8_ACTIVATION_TOLERANCE / 10.0, &scale, &what);
                    }
                }
            }
        }
        // The rotating twin: Q into y, K and V into the cache, as the rotating matvec leaves them.
        let (nh, nkv, hd, cols) = (4, 2, 64, 128);
        let rows = (nh + 2 * nkv) * hd;
        let table = cpu_ref::rope_table(64, hd, 10000.0, None);
        let table_b = ctx.storage_init("rope", bytemuck::cast_slice(&table.iter().flatten().copied().collect::<Vec<f32>>()));
        let t = host_matrix(WeightFormat::Q4_0, &random(&mut rng, rows * cols), rows, cols);
        let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
        let infos = [TokenInfo { id: 0, pos: 21, slot: 5, table_off: 0, chunk_off: 0 }];
        let x = random(&mut rng, cols);
        let g = random(&mut rng, cols);
        let mut normed = cpu_ref::rmsnorm(&x, &g, cols, eps);
        normed.resize(Q8_TOKENS * cols, 0.5);
        let (step, xb, gb) =
            (step_buf(&ctx, 1, 0), ctx.storage_init("x", bytemuck::cast_slice(&x)), ctx.storage_init("g", bytemuck::cast_slice(&g)));
        let x_q8 = ctx.storage_init("x_q8", &q8_activations(&normed, cols));
        let info_b = ctx.storage_init("tokens", bytemuck::cast_slice(&infos));
        let params = m.part_params(&ctx, cols, rows, 0);
        let (p, u) = (&m.parts[0], &params[0]);
        let shape = MatvecShape { rows: 2, ..MatvecShape::for_q8_matrix(cols, 1) };
        let groups = shape.q8_grid(rows, 1);
        let mut outputs = Vec::new();
        for norms in [false, true] {
            let cache_bytes = (8 * nkv * hd * 2) as u64;
            let (kc, vc, y) = (ctx.storage("k", cache_bytes), ctx.storage("v", cache_bytes), ctx.storage("y", (rows * 4) as u64));
            let rope = [&info_b, &table_b, &kc, &vc];
            let (pipeline, bg) = if norms {
                let bg = kernels.bind_group(
                    Kernel::MatvecQ8RopeNorm,
                    "qkv",
                    &[&step, u, &xb, &p.quants, &p.scales, &y, &gb, &info_b, &table_b, &kc, &vc],
                );
                let finish = Q8Finish::Rope { heads: [nh, nkv, hd], kv_f16: true };
                (kernels.matvec_q8_twin(WeightFormat::Q4_0, shape, false, Some(eps), finish).expect("pipeline").1, bg)
            } else {
                let bg = kernels.matvec_q8_rope_bind_group("qkv", [&step, u, &p.quants, &p.scales, &y], &x_q8, cols, rope);
                (kernels.matvec_q8_rope(WeightFormat::Q4_0, shape, [nh, nkv, hd], true).expect("pipeline"), bg)
            };
            let q = read_f32(&ctx, &y, (nh * hd * 4) as u64, dispatch(&ctx, &pipeline, &[(&bg, groups)]));
            let k = KvDtype::F16.decode(&read_bytes(&ctx, &kc, cache_bytes, ctx.device.create_command_encoder(&Default::default())));
            let v = KvDtype::F16.decode(&read_bytes(&ctx, &vc, cache_bytes, ctx.device.create_command_encoder(&Default::default())));
            outputs.push([q, k, v]);
        }
        let (_, scale) = matmul_reference(WeightFormat::Q4_0, &t, &normed[..cols], 1);
        let big = vec![scale.iter().fold(1f32, |a, &b| a.max(b)); rows * 8];
        for (i, what) in ["Q", "K", "V"].iter().enumerate() {
            let (plain, fused) = (&outputs[0][i], &outputs[1][i]);
            assert_close(
                fused,
                plain,
                Q8_ACTIVATION_TOLERANCE / 10.0 + 1e-3,
                &big[..plain.len()],
                &format!("matvec_q8_rope_norm {what} {:?}", ctx.caps),
            );
        }
    }
}

/// The output projection that merges attention's chunk states itself (matvec_q8_x_merge.wgsl):
/// against the CPU's merge (attention_merge's arithmetic in f64), 8-bit rounding and matmul, for
/// head shapes from 96 to 1,024 columns, rows that fill no workgroup evenly, and 2 to 8 chunks
/// of very different maxima (so the rescaling matters), the first of them empty (as a chunk
/// wholly before a sliding window leaves it), packed from a chunk offset that is not 0; stored,
/// and added into y (the residual).
#[test]
fn matvec_q8_merge_merges_attention_chunks_itself() {
    for ctx in gpu_variants().into_iter().filter(|c| !c.caps.f16) {
        let kernels = Kernels::new(&ctx);
        let mut rng = rng();
        for format in WeightFormat::ALL.into_iter().filter(|f| f.has_packed_dot() && f.block_elems() == 32) {
            for ((heads, head_dim), n, chunks) in [((3, 32), 70, 2), ((9, 64), 131, 5), ((4, 256), 33, 8)] {
                let cols = heads * head_dim;
                let chunk_off = 2;
                let t = host_matrix(format, &random(&mut rng, n * cols), n, cols);
                let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
                // State of chunk c, head h: (max, sum, weighted values) at ((off + c) * heads + h) * (head_dim + 2).
                let state = head_dim + 2;
                let mut partials = vec![f32::NAN; (chunk_off + chunks) * heads * state];
                for c in 0..chunks {
                    for h in 0..heads {
                        let o = ((chunk_off + c) * heads + h) * state;
                        // attention.wgsl's state of a chunk with nothing to attend to.
                        let empty = c == 0;
                        partials[o] = if empty { -3.0e38 } else { rng.random_range(-8.0..8.0) };
                        partials[o + 1] = if empty { 0.0 } else { rng.random_range(0.5..40.0) };
                        for d in 0..head_dim {
                            partials[o + 2 + d] = if empty { 0.0 } else { rng.random_range(-20.0..20.0) };
                        }
                    }
                }
                let merged: Vec<f32> = (0..cols)
                    .map(|i| {
                        let (h, d) = (i / head_dim, i % head_dim);
                        let at = |c: usize| ((chunk_off + c) * heads + h) * state;
                        let big = (0..chunks).map(|c| f64::from(partials[at(c)])).fold(f64::MIN, f64::max);
                        let weight = |c: usize| (f64::from(partials[at(c)]) - big).exp();
                        let total: f64 = (0..chunks).map(|c| f64::from(partials[at(c) + 1]) * weight(c)).sum();
                        let acc: f64 = (0..chunks).map(|c| f64::from(partials[at(c) + 2 + d]) * weight(c)).sum();
                        (acc / total) as f32
                    })
                    .collect();
                let (want, scale) = matmul_reference(format, &t, &cpu_ref::q8_round_trip(&merged), 1);
                let pos = (chunks * tandem_shaders::ATTENTION_CHUNK as usize - 7) as u32;
                let infos = [TokenInfo { id: 0, pos, slot: 0, table_off: 0, chunk_off: chunk_off as u32 }];
                let (step, pb, tb) = (
                    step_buf(&ctx, 1, 0),
                    ctx.storage_init("partials", bytemuck::cast_slice(&partials)),
                    ctx.storage_init("tokens", bytemuck::cast_slice(&infos)),
                );
                let y = ctx.storage("y", (n * 4) as u64);
                ctx.queue.write_buffer(&y, 0, bytemuck::cast_slice(&vec![f32::NAN; n]));
                let params = m.part_params(&ctx, cols, n, 0);
                let one = MatvecShape::for_q8_matrix(cols, 1);
                let residual = random(&mut rng, n);
                for (shape, accumulate) in [(MatvecShape::MERGE, false), (MatvecShape::MERGE, true), (one, false)] {
                    let y0 = if accumulate { residual.clone() } else { vec![f32::NAN; n] };
                    ctx.queue.write_buffer(&y, 0, bytemuck::cast_slice(&y0));
                    let pipeline = kernels.matvec_q8_merge(format, shape, accumulate, heads, head_dim).expect("pipeline");
                    let groups: Vec<(wgpu::BindGroup, [u32; 3])> = m
                        .parts
                        .iter()
                        .zip(&params)
                        .map(|(p, u)| {
                            let input = Q8Input::Merged { partials: &pb, tokens: &tb };
                            let bg = kernels.matvec_q8_twin_bind_group(
                                Kernel::MatvecQ8Merge,
                                "o",
                                [&step, u, &p.quants, &p.scales, &y],
                                input,
                                &[],
                            );
                            (bg, shape.q8_grid(p.rows, 1))
                        })
                        .collect();
                    let refs: Vec<(&wgpu::BindGroup, [u32; 3])> = groups.iter().map(|(b, d)| (b, *d)).collect();
                    let got = read_f32(&ctx, &y, (n * 4) as u64, dispatch(&ctx, &pipeline, &refs));
                    let what = format!(
                        "matvec_q8_merge {shape:?} {format} {n}x{cols} ({heads} heads of {head_dim}) {chunks} chunks, accumulate {accumulate} {:?}",
                        ctx.caps
                    );
                    let want: Vec<f32> = if accumulate { want.iter().zip(&residual).map(|(w, r)| w + r).collect() } else { want.clone() };
                    // The GPU's exp may round a near-tie quant the other way: a step of one
                    // activation, far under the 8-bit rounding's own error.
                    assert_close(&got, &want, Q8_ACTIVATION_TOLERANCE / 10.0, &scale, &what);
                }
            }
        }
    }
}

/// matvec_q8_rope: the Q/K/V matvec of a decode step that also rotates Q (into y) and K and
/// writes K and V to each token's cache slot, against the CPU's matmul then RoPE.
#[test]
fn matvec_q8_rope_rotates_q_and_caches_k_and_v() {
    for ctx in gpu_variants().into_iter().filter(|c| !c.caps.f16) {
        let kernels = Kernels::new(&ctx);
        let mut rng = rng();
        let (nh, nkv, hd, cols) = (4, 2, 64, 128);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let rows = q_dim + 2 * kv_dim;
        let table = cpu_ref::rope_table(64, hd, 10000.0, None);
        let table_b = ctx.storage_init("rope", bytemuck::cast_slice(&table.iter().flatten().copied().collect::<Vec<f32>>()));
        for (format, dtype) in [(WeightFormat::Q4_0, KvDtype::F16), (WeightFormat::Q8_0, KvDtype::F32)] {
            let t = host_matrix(format, &random(&mut rng, rows * cols), rows, cols);
            let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
            // 6: two groups of the shape's 4 tokens, the second short.
            for tokens in [1, 3, 6] {
                let infos: Vec<TokenInfo> = [(5u32, 3u32), (40, 20), (17, 9), (8, 1), (30, 12), (2, 30)][..tokens]
                    .iter()
                    .map(|&(pos, slot)| TokenInfo { id: 0, pos, slot, table_off: 0, chunk_off: 0 })
                    .collect();
                let x = random(&mut rng, tokens * cols);
                let mut padded = x.clone();
                padded.resize(Q8_TOKENS * cols, 0.5);
                let x_q8 = ctx.storage_init("x_q8", &q8_activations(&padded, cols));
                let step = step_buf(&ctx, tokens, 0);
                let info_b = ctx.storage_init("tokens", bytemuck::cast_slice(&infos));
                let cache_bytes = (32 * kv_dim * dtype.bytes()) as u64;
                let (kc, vc) = (ctx.storage("k", cache_bytes), ctx.storage("v", cache_bytes));
                let y = ctx.storage("y", (tokens * rows * 4) as u64);
                let params = m.part_params(&ctx, cols, rows, 0);
                let (p, u) = (&m.parts[0], &params[0]);
                let bg = kernels.matvec_q8_rope_bind_group(
                    "qkv",
                    [&step, u, &p.quants, &p.scales, &y],
                    &x_q8,
                    cols,
                    [&info_b, &table_b, &kc, &vc],
                );
                let short = MatvecShape::for_q8_matrix(cols, 4);
                for shape in [
                    short,
                    MatvecShape { ksplit: 2, lanes: 128, ..short },
                    MatvecShape { rows: 2, ..short },
                    MatvecShape { rows: 4, ..short },
                ] {
                    let pipeline = kernels.matvec_q8_rope(format, shape, [nh, nkv, hd], dtype == KvDtype::F16).expect("pipeline");
                    let groups = shape.q8_grid(rows, tokens);
                    let got_y = read_f32(&ctx, &y, (tokens * rows * 4) as u64, dispatch(&ctx, &pipeline, &[(&bg, groups)]));
                    let got_k = dtype.decode(&read_bytes(&ctx, &kc, cache_bytes, ctx.device.create_command_encoder(&Default::default())));
                    let got_v = dtype.decode(&read_bytes(&ctx, &vc, cache_bytes, ctx.device.create_command_encoder(&Default::default())));
                    let (want, scale) = matmul_reference(format, &t, &cpu_ref::q8_round_trip(&x), tokens);
                    let big = scale.iter().fold(1f32, |a, &b| a.max(b));
                    let stored = |v: &[f32]| dtype.decode(&dtype.encode(v));
                    let rounding = if dtype == KvDtype::F16 { 1e-3 } else { 0.0 };
                    for (tok, info) in infos.iter().enumerate() {
                        let what = format!("matvec_q8_rope {format} {dtype} {shape:?} token {tok} {:?}", ctx.caps);
                        let mut row = want[tok * rows..(tok + 1) * rows].to_vec();
                        for head in row[..q_dim + kv_dim].chunks_mut(hd) {
                            cpu_ref::rope(head, info.pos as usize, &table, false);
                        }
                        let ones = vec![big; rows];
                        assert_close(&got_y[tok * rows..][..q_dim], &row[..q_dim], MATMUL_TOLERANCE, &ones, &format!("{what}: Q"));
                        let slot = info.slot as usize * kv_dim;
                        let tol = MATMUL_TOLERANCE + rounding;
                        assert_close(&got_k[slot..][..kv_dim], &stored(&row[q_dim..q_dim + kv_dim]), tol, &ones, &format!("{what}: K"));
                        assert_close(&got_v[slot..][..kv_dim], &stored(&row[q_dim + kv_dim..]), tol, &ones, &format!("{what}: V"));
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_is_identical_for_a_token_alone_and_in_a_batch() {
    for ctx in gpu_variants() {
        let kernels = Kernels::new(&ctx);
        let mut rng = rng();
        let (rows, cols) = (96, 128);
        for format in [WeightFormat::Q4_1, WeightFormat::F16] {
            let t = host_matrix(format, &random(&mut rng, rows * cols), rows, cols);
            let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
            let x = random(&mut rng, 13 * cols);
            let batch = run_matmul(&ctx, &kernels, &m, &x, 13);
            for tok in [0, 5, 12] {
                let alone = run_matmul(&ctx, &kernels, &m, &x[tok * cols..(tok + 1) * cols], 1);
                let what = format!("{format} token {tok}: bitwise equal alone and batched ({:?})", ctx.caps);
                assert_eq!(alone, batch[tok * rows..(tok + 1) * rows], "{what}");
            }
        }
    }
}

#[test]
fn tensors_larger_than_a_binding_are_split_and_still_correct() {
    let mut ctx = gpu();
    // Pretend the adapter binds at most 4 KiB so a small matrix needs several parts.
    ctx.limits.max_storage_buffer_binding_size = 4096;
    let kernels = Kernels::new(&ctx);
    let mut rng = rng();
    for format in [WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::F16] {
        let (rows, cols, tokens) = (301, 128, 3);
        let t = host_matrix(format, &random(&mut rng, rows * cols), rows, cols);
        let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
        assert!(m.parts.len() > 1, "{format}: split into {} parts", m.parts.len());
        let x = random(&mut rng, tokens * cols);
        let got = run_matmul(&ctx, &kernels, &m, &x, tokens);
        let (want, scale) = matmul_reference(format, &t, &x, tokens);
        assert_close(&got, &want, MATMUL_TOLERANCE, &scale, &format!("split matmul {format}"));
    }
}

#[test]
fn embed_gathers_dequantized_rows_of_given_and_sampled_ids() {
    for ctx in gpu_variants() {
        let kernels = Kernels::new(&ctx);
        let mut rng = rng();
        for format in WeightFormat::ALL {
            let (rows, cols) = (50, widen(format, 96));
            let t = host_matrix(format, &random(&mut rng, rows * cols), rows, cols);
            let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
            let ids = [3u32, 49, 0, 17, 17, 42];
            // The last token's id is the one the step before sampled into row 1.
            let sampled = ctx.storage_init("sampled", bytemuck::cast_slice(&[7u32, 42]));
            let infos: Vec<TokenInfo> = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| TokenInfo { id: if i == 5 { tandem_shaders::FROM_SAMPLED | 1 } else { id }, ..Default::default() })
                .collect();
            let step = step_buf(&ctx, ids.len(), 0);
            let tokens = ctx.storage_init("tokens", bytemuck::cast_slice(&infos));
            let out = ctx.storage("x", (ids.len() * cols * 4) as u64);
            let p = &m.parts[0];
            let params = tandem_shaders::EmbedParams { row_start: 0, row_count: rows as u32, dim: cols as u32, _pad: 0 };
            let u = ctx.uniform_init("embed", bytemuck::bytes_of(&params));
            let bg = kernels.bind_group(Kernel::Embed, "embed", &[&step, &u, &tokens, &p.quants, &p.scales, &out, &sampled]);
            let pipeline = kernels.pipeline(Kernel::Embed, Some(format), &[]).expect("pipeline");
            let got = read_f32(
                &ctx,
                &out,
                (ids.len() * cols * 4) as u64,
                dispatch(&ctx, &pipeline, &[(&bg, [cols.div_ceil(64) as u32, ids.len() as u32, 1])]),
            );
            let w = cpu_ref::dequantize(format, t.bytes.as_slice(), rows, cols);
            let want: Vec<f32> = ids.iter().flat_map(|&id| w[id as usize * cols..(id as usize + 1) * cols].to_vec()).collect();
            assert_eq!(got, want, "embed {format} {:?}", ctx.caps);
        }
    }
}

#[test]
fn rmsnorm_matches_cpu_plain_and_gathering() {
    let ctx = gpu();
    let kernels = Kernels::new(&ctx);
    let mut rng = rng();
    // A width of whole blocks also writes 8-bit activations, on steps of up to Q8_TOKENS rows.
    for (dim, tokens, q8) in [(200, 5, false), (224, 5, true), (96, 9, true), (96, 33, true), (1056, 5, true), (8256, 5, true)] {
        let x = random(&mut rng, dim * tokens);
        let g = random(&mut rng, dim);
        let want = cpu_ref::rmsnorm(&x, &g, dim, 1e-5);
        let rows = [4u32, 1];
        for gather in [false, true] {
            let n_out = if gather { rows.len() } else { tokens };
            let step = step_buf(&ctx, tokens, rows.len());
            let (xb, gb) = (ctx.storage_init("x", bytemuck::cast_slice(&x)), ctx.storage_init("g", bytemuck::cast_slice(&g)));
            let rb = ctx.storage_init("rows", bytemuck::cast_slice(&rows));
            let out = ctx.storage("out", (n_out * dim * 4) as u64);
            let q8_bytes = q8_ranges(dim).1.end;
            let out_q8 = ctx.storage_init("out_q8", &vec![0u8; q8_bytes as usize]);
            let bg = kernels.bind_group(Kernel::RmsNorm, "norm", &[&step, &xb, &gb, &rb, &out, &out_q8]);
            let consts = [("DIM", dim as f64), ("EPS", 1e-5), ("GATHER", f64::from(u8::from(gather))), ("Q8", f64::from(u8::from(q8)))];
            let pipeline = kernels.pipeline(Kernel::RmsNorm, None, &consts).expect("pipeline");
            let got = read_f32(&ctx, &out, (n_out * dim * 4) as u64, dispatch(&ctx, &pipeline, &[(&bg, [n_out as u32, 1, 1])]));
            let want: Vec<f32> = if gather {
                rows.iter().flat_map(|&r| want[r as usize * dim..(r as usize + 1) * dim].to_vec()).collect()
            } else {
                want.clone()
            };
            let what = format!("rmsnorm {dim} x{tokens} gather={gather}");
            assert_close(&got, &want, ELEMENTWISE_TOLERANCE, &vec![1.0; want.len()], &what);
            let got_q8 = read_bytes(&ctx, &out_q8, q8_bytes, ctx.device.create_command_encoder(&Default::default()));
            if q8 && n_out <= Q8_TOKENS {
                assert_q8_matches(&got_q8, &got, dim, dim, &what);
            } else {
                assert!(got_q8.iter().all(|&b| b == 0), "{what}: no 8-bit activations for a step of {n_out} rows");
            }
        }
    }
}

#[test]
fn silu_mul_matches_cpu() {
    let ctx = gpu();
    let kernels = Kernels::new(&ctx);
    let mut rng = rng();
    for (ffn, tokens, q8) in [(100, 3, false), (96, 3, true), (544, 2, true), (301, 9, false)] {
        let (g, u) = (random(&mut rng, ffn * tokens), random(&mut rng, ffn * tokens));
        let step = step_buf(&ctx, tokens, 0);
        // [gate | up] per token, as the stacked gate/up matmul writes them.
        let gate_up: Vec<f32> = g.chunks(ffn).zip(u.chunks(ffn)).flat_map(|(g, u)| g.iter().chain(u).copied()).collect();
        let gub = ctx.storage_init("gate_up", bytemuck::cast_slice(&gate_up));
        let q8_bytes = q8_ranges(2 * ffn).1.end;
        let out_q8 = ctx.storage("out_q8", q8_bytes);
        let bg = kernels.bind_group(Kernel::SiluMul, "silu", &[&step, &gub, &out_q8]);
        let pipeline =
            kernels.pipeline(Kernel::SiluMul, None, &[("FFN_DIM", ffn as f64), ("Q8", f64::from(u8::from(q8)))]).expect("pipeline");
        let bytes = (2 * ffn * tokens * 4) as u64;
        let out = read_f32(&ctx, &gub, bytes, dispatch(&ctx, &pipeline, &[(&bg, [ffn.div_ceil(SILU_MUL_TILE) as u32, tokens as u32, 1])]));
        let got: Vec<f32> = out.chunks(2 * ffn).flat_map(|row| row[..ffn].to_vec()).collect();
        assert_close(&got, &cpu_ref::silu_mul(&g, &u), ELEMENTWISE_TOLERANCE, &vec![1.0; g.len()], "silu_mul");
        if q8 {
            // Quantized with the down projection's input stride, [silu·mul | up] per token.
            let got_q8 = read_bytes(&ctx, &out_q8, q8_bytes, ctx.device.create_command_encoder(&Default::default()));
            assert_q8_matches(&got_q8, &out, 2 * ffn, ffn, "silu_mul q8");
        }
    }
}

/// The gate/up matvec that gates its output itself (matvec_q8_glu.wgsl), from stored 8-bit
/// activations and from the residual it norms: the gate half of y against the CPU's SiLU (or
/// GELU's tanh form) of the f64 matmul of the same rounded activations, and the down
/// projection's 8-bit input against that output quantized.
#[test]
fn matvec_q8_glu_gates_its_output_itself() {
    let eps = 1e-5;
    for ctx in gpu_variants().into_iter().filter(|c| !c.caps.f16) {
        let kernels = Kernels::new(&ctx);
        let mut rng = rng();
        for (format, ffn, cols, gelu) in
            // The last as wide as the 8B shape's hidden size: its norm takes 4 passes of 256 lanes.
            [
                (WeightFormat::Q4_0, 96, 64, false),
                (WeightFormat::Q8_0, 32, 96, true),
                (WeightFormat::Q4_1, 544, 576, false),
                (WeightFormat::Q4_0, 64, 4096, false),
            ]
        {
            let rows = 2 * ffn;
            let t = host_matrix(format, &random(&mut rng, rows * cols), rows, cols);
            let m = DeviceMatrix::upload(&ctx, &t).expect("upload");
            let x = random(&mut rng, cols);
            let g = random(&mut rng, cols);
            let step = step_buf(&ctx, 1, 0);
            let (xb, gb) = (ctx.storage_init("x", bytemuck::cast_slice(&x)), ctx.storage_init("g", bytemuck::cast_slice(&g)));
            let params = m.part_params(&ctx, cols, rows, 0);
            let (p, u) = (&m.parts[0], &params[0]);
            for norms in [false, true] {
                let input_values = if norms { cpu_ref::rmsnorm(&x, &g, cols, eps) } else { x.clone() };
                let mut padded = input_values.clone();
                padded.resize(Q8_TOKENS * cols, 0.5);
                let x_q8 = ctx.storage_init("x_q8", &q8_activations(&padded, cols));
                let (want, scale) = matmul_reference(format, &t, &cpu_ref::q8_round_trip(&input_values), 1);
                let act: Vec<f32> = (0..ffn)
                    .map(|i| {
                        let (gate, up) = (f64::from(want[i]), f64::from(want[ffn + i]));
                        let a = if gelu {
                            0.5 * gate * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (gate + 0.044715 * gate.powi(3))).tanh())
                        } else {
                            gate / (1.0 + (-gate).exp())
                        };
                        (a * up) as f32
                    })
                    .collect();
                // How far the sums' own rounding (MATMUL_TOLERANCE of their terms) moves g * u.
                let act_scale: Vec<f32> =
                    (0..ffn).map(|i| scale[i] * (1.0 + want[ffn + i].abs()) + scale[ffn + i] * (1.0 + want[i].abs())).collect();
                let y = ctx.storage("y", (rows * 4) as u64);
                ctx.queue.write_buffer(&y, 0, bytemuck::cast_slice(&vec![f32::NAN; rows]));
                let ffn_q8 = ctx.storage("ffn_q8", q8_ranges(rows).1.end);
                let input = if norms { Q8Input::Normed { x: &xb, g: &gb } } else { Q8Input::Stored { x_q8: &x_q8, x_stride: cols } };
                let finish = Q8Finish::Glu { ffn_dim: ffn, gelu };
                let (kernel, pipeline) =
                    kernels.matvec_q8_twin(format, MatvecShape::GLU, false, norms.then_some(eps), finish).expect("pipeline");
                let bg = kernels.matvec_q8_twin_bind_group(kernel, "glu", [&step, u, &p.quants, &p.scales, &y], input, &[&ffn_q8]);
                let groups = MatvecShape::GLU.q8_grid(rows, 1);
                let out = read_f32(&ctx, &y, (rows * 4) as u64, dispatch(&ctx, &pipeline, &[(&bg, groups)]));
                let what = format!("{kernel:?} {format} ffn {ffn} x {cols} gelu={gelu} {:?}", ctx.caps);
                assert_close(&out[..ffn], &act, MATMUL_TOLERANCE, &act_scale, &what);
                let got_q8 = read_bytes(&ctx, &ffn_q8, q8_ranges(rows).1.end, ctx.device.create_command_encoder(&Default::default()));
                let mut row = out[..ffn].to_vec();
                row.resize(rows, 0.0);
                assert_q8_matches(&got_q8, &row, rows, ffn, &format!("{what}: 8-bit output"));
            }
        }
    }
}

/// Sets up a paged cache for one sequence with `len` positions scattered over shuffled blocks.
struct PagedFixture {
    blocks: Vec<u32>,
    infos: Vec<TokenInfo>,
}

fn paged(len: usize, new_tokens: usize, n_blocks: usize) -> PagedFixture {
    let bt = tandem_core::BLOCK_TOKENS;
    let blocks: Vec<u32> = (0..len.div_ceil(bt) as u32).map(|b| (b * 7 + 3) % n_blocks as u32).collect();
    let start = len - new_tokens;
    let infos = (start..len)
        .map(|pos| TokenInfo {
            id: 0,
            pos: pos as u32,
            slot: blocks[pos / bt] * bt as u32 + (pos % bt) as u32,
            table_off: 0,
            chunk_off: tandem_core::engine::attention_chunks(start, pos - start) as u32,
        })
        .collect();
    PagedFixture { blocks, infos }
}

#[test]
fn rope_kv_rotates_and_writes_the_paged_cache() {
    let ctx = gpu();
    let kernels = Kernels::new(&ctx);
    let mut rng = rng();
    let n_blocks = 8;
    // rope_kv, and norm_rope_kv (each query and key head RMSNormed first) on heads narrower and
    // wider than its workgroup's 64 lanes.
    for (normed, (nh, nkv, hd)) in [(false, (6, 2, 64)), (true, (6, 2, 64)), (true, (4, 2, 128)), (true, (4, 1, 256))] {
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let stride = q_dim + 2 * kv_dim;
        for dtype in [KvDtype::F16, KvDtype::F32] {
            for neox in [false, true] {
                let fx = paged(40, 5, n_blocks);
                let tokens = fx.infos.len();
                let qkv = random(&mut rng, tokens * stride);
                let (gq, gk) = (random(&mut rng, hd), random(&mut rng, hd));
                let table = cpu_ref::rope_table(64, hd, 10000.0, None);
                let flat: Vec<f32> = table.iter().flatten().copied().collect();
                let step = step_buf(&ctx, tokens, 0);
                let qkv_b = ctx.storage_init("qkv", bytemuck::cast_slice(&qkv));
                let info_b = ctx.storage_init("tokens", bytemuck::cast_slice(&fx.infos));
                let rope_b = ctx.storage_init("rope", bytemuck::cast_slice(&flat));
                let (gq_b, gk_b) = (ctx.storage_init("gq", bytemuck::cast_slice(&gq)), ctx.storage_init("gk", bytemuck::cast_slice(&gk)));
                let cache_bytes = (n_blocks * 16 * kv_dim * dtype.bytes()) as u64;
                let (kc, vc) = (ctx.storage("k", cache_bytes), ctx.storage("v", cache_bytes));
                let mut consts =
                    vec![("N_HEADS", nh as f64), ("N_KV_HEADS", nkv as f64), ("HEAD_DIM", hd as f64), ("NEOX", f64::from(u8::from(neox)))];
                let (kernel, groups) = if normed {
                    consts.push(("EPS", 1e-6));
                    (Kernel::NormRopeKv, [(nh + 2 * nkv) as u32, tokens as u32, 1])
                } else {
                    (Kernel::RopeKv, [((nh + nkv) * hd / 4 + kv_dim / 2).div_ceil(64) as u32, tokens as u32, 1])
                };
                let mut buffers = vec![&step, &qkv_b, &info_b, &rope_b, &kc, &vc];
                if normed {
                    buffers.extend([&gq_b, &gk_b]);
                }
                let bg = kernels.bind_group(kernel, "rope", &buffers);
                let pipeline = kernels.pipeline(kernel, Some(dtype.format()), &consts).expect("pipeline");
                let enc = dispatch(&ctx, &pipeline, &[(&bg, groups)]);
                let got_qkv = read_f32(&ctx, &qkv_b, (tokens * stride * 4) as u64, enc);
                let got_k = dtype.decode(&read_bytes(&ctx, &kc, cache_bytes, ctx.device.create_command_encoder(&Default::default())));
                let got_v = dtype.decode(&read_bytes(&ctx, &vc, cache_bytes, ctx.device.create_command_encoder(&Default::default())));
                // What the cache holds: the values rounded to its dtype once.
                let stored = |v: &[f32]| dtype.decode(&dtype.encode(v));
                for (t, info) in fx.infos.iter().enumerate() {
                    let row = &qkv[t * stride..(t + 1) * stride];
                    let slot = info.slot as usize;
                    let what = format!("{} {dtype} neox={neox} head_dim {hd} token {t}", kernel.name());
                    for h in 0..nh + nkv {
                        let mut head = row[h * hd..(h + 1) * hd].to_vec();
                        if normed {
                            head = cpu_ref::rmsnorm(&head, if h < nh { &gq } else { &gk }, hd, 1e-6);
                        }
                        cpu_ref::rope(&mut head, info.pos as usize, &table, neox);
                        if h < nh {
                            let got = got_qkv[t * stride + h * hd..][..hd].to_vec();
                            assert_close(&got, &head, ELEMENTWISE_TOLERANCE, &vec![1.0; hd], &format!("{what} head {h}"));
                        } else {
                            let got = got_k[slot * kv_dim + (h - nh) * hd..][..hd].to_vec();
                            // The GPU rounds its f32 rotation to f16, the reference its own: they
                            // may land an f16 step apart (2^-10 for values below 2).
                            let tolerance = if dtype == KvDtype::F16 { 1e-3 } else { ELEMENTWISE_TOLERANCE };
                            assert_close(&got, &stored(&head), tolerance, &vec![1.0; hd], &format!("{what} head {h}"));
                        }
                    }
                    assert_eq!(
                        &got_v[slot * kv_dim..(slot + 1) * kv_dim],
                        &stored(&row[q_dim + kv_dim..])[..],
                        "{what}: V written to its slot"
                    );
                }
            }
        }
    }
}

#[test]
fn attention_over_paged_blocks_matches_cpu() {
    for ctx in gpu_variants() {
        let kernels = Kernels::new(&ctx);
        let mut rng = rng();
        let (nh, nkv, hd) = (4, 2, 64);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let stride = q_dim + 2 * kv_dim;
        let n_blocks = 40;
        // One token alone (decode), a chunk of 7 whose first position is mid-block, and contexts that
        // span several attention chunks.
        for ((len, new), dtype) in
            [(1, 1), (37, 1), (45, 7), (300, 1), (290, 5), (600, 3)].into_iter().flat_map(|c| [(c, KvDtype::F16), (c, KvDtype::F32)])
        {
            let fx = paged(len, new, n_blocks);
            let k_all = random(&mut rng, len * kv_dim);
            let v_all = random(&mut rng, len * kv_dim);
            let q = random(&mut rng, new * q_dim);
            let mut kc = vec![0f32; n_blocks * 16 * kv_dim];
            let mut vc = kc.clone();
            for pos in 0..len {
                let slot = fx.blocks[pos / 16] as usize * 16 + pos % 16;
                kc[slot * kv_dim..(slot + 1) * kv_dim].copy_from_slice(&k_all[pos * kv_dim..(pos + 1) * kv_dim]);
                vc[slot * kv_dim..(slot + 1) * kv_dim].copy_from_slice(&v_all[pos * kv_dim..(pos + 1) * kv_dim]);
            }
            let mut qkv = vec![0f32; new * stride];
            for t in 0..new {
                qkv[t * stride..t * stride + q_dim].copy_from_slice(&q[t * q_dim..(t + 1) * q_dim]);
            }
            let step = step_buf(&ctx, new, 0);
            let b = |l: &str, v: &[f32]| ctx.storage_init(l, bytemuck::cast_slice(v));
            let qkv_b = b("qkv", &qkv);
            let (kc_b, vc_b) = (ctx.storage_init("k", &dtype.encode(&kc)), ctx.storage_init("v", &dtype.encode(&vc)));
            let info_b = ctx.storage_init("tokens", bytemuck::cast_slice(&fx.infos));
            let table_b = ctx.storage_init("tables", bytemuck::cast_slice(&fx.blocks));
            let out = ctx.storage("out", (new * q_dim * 4) as u64);
            let q8_bytes = q8_ranges(q_dim).1.end;
            let out_q8 = ctx.storage("out_q8", q8_bytes);
            let chunk = tandem_shaders::ATTENTION_CHUNK;
            let n_chunks = tandem_core::engine::attention_chunks(len - new, new);
            let partials = ctx.storage("partials", (n_chunks * nh * (hd + 2) * 4) as u64);
            let bg =
                kernels.bind_group(Kernel::Attention, "attn", &[&step, &qkv_b, &info_b, &table_b, &kc_b, &vc_b, &partials, &out, &out_q8]);
            let merge_bg = kernels.bind_group(Kernel::AttentionMerge, "merge", &[&step, &info_b, &partials, &out, &out_q8]);
            let consts = [
                ("N_HEADS", nh as f64),
                ("N_KV_HEADS", nkv as f64),
                ("HEAD_DIM", hd as f64),
                ("BLOCK_TOKENS", 16.0),
                ("SCALE", 1.0 / (hd as f64).sqrt()),
                ("Q8", 1.0),
            ];
            let pipeline = kernels.pipeline(Kernel::Attention, Some(dtype.format()), &consts).expect("pipeline");
            let merge_consts = [("N_HEADS", nh as f64), ("HEAD_DIM", hd as f64), ("CHUNK", f64::from(chunk)), ("Q8", 1.0)];
            let merge = kernels.pipeline(Kernel::AttentionMerge, None, &merge_consts).expect("pipeline");
            let chunks = (len as u32).div_ceil(chunk);
            let mut enc = dispatch(&ctx, &pipeline, &[(&bg, [nh as u32, new as u32, chunks])]);
            // With one chunk a token, attention writes the output itself (as the engine records it).
            if chunks > 1 {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&merge);
                pass.set_bind_group(0, &merge_bg, &[]);
                pass.dispatch_workgroups(nh as u32, new as u32, 1);
            }
            let got = read_f32(&ctx, &out, (new * q_dim * 4) as u64, enc);
            // Against the K/V the cache holds (rounded to its dtype).
            let stored = |v: &[f32]| dtype.decode(&dtype.encode(v));
            let want = cpu_ref::attention(&q, &stored(&k_all), &stored(&v_all), len - new, nh, nkv, hd);
            let what = format!("attention {dtype} len {len} new {new} {:?}", ctx.caps);
            assert_close(&got, &want, 1e-5, &vec![1.0; want.len()], &what);
            let got_q8 = read_bytes(&ctx, &out_q8, q8_bytes, ctx.device.create_command_encoder(&Default::default()));
            assert_q8_matches(&got_q8, &got, q_dim, q_dim, &what);
        }
    }
}

/// attention_coop.wgsl rounds queries and probabilities to f16.
const COOP_ATTENTION_TOLERANCE: f32 = 4e-3;

/// The matrix units' attention (attention_coop.wgsl, adapters with cooperative matrices: the GPU
/// machine through scripts/test-gpu; elsewhere this test checks nothing) against the CPU, as the
/// engine records it: tiles of each sequence's new tokens from `attention_tiles`, the merge
/// where a token has several chunks. One tile and one chunk (written directly), tiles across a
/// chunk boundary, a deep prefix with two sequences and the smallest tile, sliding windows,
/// 64-, 128- and 256-wide heads.
#[test]
fn attention_tiles_match_cpu() {
    let ctx = gpu();
    if !ctx.caps.has_coop_matrix() {
        assert!(std::env::var_os("TANDEM_REQUIRE_COOP").is_none(), "TANDEM_REQUIRE_COOP: {} has no cooperative matrices", ctx.adapter);
        eprintln!("attention_tiles_match_cpu: no cooperative matrices on {}; nothing checked", ctx.adapter);
        return;
    }
    let kernels = Kernels::new(&ctx);
    let mut rng = rng();
    let bt = tandem_core::BLOCK_TOKENS;
    let n_blocks = 120;
    let chunk = tandem_shaders::ATTENTION_CHUNK as usize;
    // (heads, K/V heads, head dim, window, each sequence's (cached, new) positions).
    type Case = (usize, usize, usize, usize, &'static [(usize, usize)]);
    let cases: [Case; 7] = [
        (4, 2, 64, 0, &[(0, 40)]),
        (2, 1, 256, 0, &[(0, 300)]),
        (4, 1, 256, 20, &[(100, 70), (0, 16)]),
        (4, 2, 64, 0, &[(0, 300)]),
        (4, 1, 128, 0, &[(500, 150), (3, 16)]),
        (3, 3, 128, 100, &[(200, 90)]),
        (2, 2, 64, 64, &[(0, 300)]),
    ];
    for (nh, nkv, hd, window, seqs) in cases {
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let mut kc = vec![0f32; n_blocks * bt * kv_dim];
        let mut vc = kc.clone();
        let (mut tables, mut infos, mut qkv, mut want) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut next_block = 0u32;
        let mut chunk_off = 0u32;
        for &(cached, new) in seqs {
            let len = cached + new;
            let table_off = tables.len() as u32;
            let blocks: Vec<u32> = (0..len.div_ceil(bt) as u32).map(|b| ((next_block + b) * 7 + 3) % n_blocks as u32).collect();
            next_block += blocks.len() as u32;
            let k_all = random(&mut rng, len * kv_dim);
            let v_all = random(&mut rng, len * kv_dim);
            for pos in 0..len {
                let slot = blocks[pos / bt] as usize * bt + pos % bt;
                kc[slot * kv_dim..][..kv_dim].copy_from_slice(&k_all[pos * kv_dim..][..kv_dim]);
                vc[slot * kv_dim..][..kv_dim].copy_from_slice(&v_all[pos * kv_dim..][..kv_dim]);
            }
            let q = random(&mut rng, new * q_dim);
            for (t, pos) in (cached..len).enumerate() {
                infos.push(TokenInfo { id: 0, pos: pos as u32, slot: 0, table_off, chunk_off });
                chunk_off += (pos / chunk + 1) as u32;
                qkv.extend_from_slice(&q[t * q_dim..][..q_dim]);
                qkv.extend(std::iter::repeat_n(0.0, 2 * kv_dim));
            }
            let stored = |v: &[f32]| KvDtype::F16.decode(&KvDtype::F16.encode(v));
            want.extend(cpu_ref::attention_windowed(&q, &stored(&k_all), &stored(&v_all), cached, nh, nkv, hd, window));
            tables.extend(blocks);
        }
        let n = infos.len();
        let tiles = tandem_core::engine::attention_tiles(seqs.iter().map(|s| s.1));
        assert!(!tiles.is_empty());
        let chunks = infos.iter().map(|i| (i.pos as usize + 1).div_ceil(chunk)).max().unwrap_or(1) as u32;
        let step = step_buf(&ctx, n, 0);
        let qkv_b = ctx.storage_init("qkv", bytemuck::cast_slice(&qkv));
        let (kc_b, vc_b) = (ctx.storage_init("k", &KvDtype::F16.encode(&kc)), ctx.storage_init("v", &KvDtype::F16.encode(&vc)));
        let info_b = ctx.storage_init("tokens", bytemuck::cast_slice(&infos));
        let table_b = ctx.storage_init("tables", bytemuck::cast_slice(&tables));
        let tiles_b = ctx.storage_init("tiles", bytemuck::cast_slice(&tiles));
        let out = ctx.storage("out", (n * q_dim * 4) as u64);
        let no_q8 = ctx.storage("no_q8", 16);
        let partials = ctx.storage("partials", (chunk_off as usize * nh * (hd + 2) * 4) as u64);
        let bg =
            kernels.bind_group(Kernel::AttentionCoop, "attn", &[&step, &qkv_b, &info_b, &table_b, &kc_b, &vc_b, &partials, &out, &tiles_b]);
        let consts = [
            ("N_HEADS", nh as f64),
            ("N_KV_HEADS", nkv as f64),
            ("HEAD_DIM", hd as f64),
            ("BLOCK_TOKENS", bt as f64),
            ("SCALE", 1.0 / (hd as f64).sqrt()),
            ("WINDOW", window as f64),
        ];
        let pipeline = kernels.pipeline(Kernel::AttentionCoop, Some(WeightFormat::F16), &consts).expect("pipeline");
        let x = tandem_shaders::attention_tile_head_groups(nh as u32, hd as u32);
        let mut enc = dispatch(&ctx, &pipeline, &[(&bg, [x, tiles.len() as u32, chunks])]);
        if chunks > 1 {
            let merge_bg = kernels.bind_group(Kernel::AttentionMerge, "merge", &[&step, &info_b, &partials, &out, &no_q8]);
            let merge_consts = [("N_HEADS", nh as f64), ("HEAD_DIM", hd as f64), ("CHUNK", chunk as f64), ("Q8", 0.0)];
            let merge = kernels.pipeline(Kernel::AttentionMerge, None, &merge_consts).expect("pipeline");
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&merge);
            pass.set_bind_group(0, &merge_bg, &[]);
            pass.dispatch_workgroups(nh as u32, n as u32, 1);
        }
        let got = read_f32(&ctx, &out, (n * q_dim * 4) as u64, enc);
        let what = format!("attention tiles: {nh}/{nkv} heads of {hd}, window {window}, sequences {seqs:?}");
        assert_close(&got, &want, COOP_ATTENTION_TOLERANCE, &vec![1.0; want.len()], &what);
    }
}

fn run_sample(ctx: &GpuContext, kernels: &Kernels, logits: &[f32], vocab: usize, params: &[SampleParams]) -> Vec<u32> {
    let rows = params.len();
    let step = step_buf(ctx, rows, rows);
    let lb = ctx.storage_init("logits", bytemuck::cast_slice(logits));
    let pb = ctx.storage_init("params", bytemuck::cast_slice(params));
    let out = ctx.storage("chosen", (rows * 4) as u64);
    let bg = kernels.bind_group(Kernel::Sample, "sample", &[&step, &lb, &pb, &out]);
    let pipeline = kernels.pipeline(Kernel::Sample, None, &[("VOCAB", vocab as f64)]).expect("pipeline");
    read_f32(ctx, &out, (rows * 4) as u64, dispatch(ctx, &pipeline, &[(&bg, [rows as u32, 1, 1])])).into_iter().map(f32::to_bits).collect()
}

#[test]
fn sampling_greedy_top_k_top_p_and_seeds() {
    let ctx = gpu();
    let kernels = Kernels::new(&ctx);
    let mut rng = rng();
    let vocab = 1000;
    let mut logits = random(&mut rng, vocab * 3);
    // Row 1 has a tie for the maximum: the lower id wins.
    logits[vocab + 400] = 5.0;
    logits[vocab + 700] = 5.0;
    let greedy = SampleParams { temperature: 0.0, top_p: 1.0, ..Default::default() };
    let got = run_sample(&ctx, &kernels, &logits, vocab, &[greedy; 3]);
    let want: Vec<u32> = logits.chunks(vocab).map(cpu_ref::argmax).collect();
    assert_eq!(got, want);
    assert_eq!(got[1], 400);

    // A vocabulary of many ids a lane: the maximum anywhere, and ties between ids of one lane,
    // of different lanes, and near the end.
    let wide = 5003;
    for (a, b) in [(17, 4000), (300, 300 + 256), (1024 + 5, 2048 + 5), (4095, 4100), (4990, 5002)] {
        let mut row = random(&mut rng, wide);
        row[a] = 7.0;
        row[b] = 7.0;
        let got = run_sample(&ctx, &kernels, &row, wide, &[greedy]);
        assert_eq!(got, vec![a as u32], "tie between ids {a} and {b}");
        row[a] = 0.0;
        assert_eq!(run_sample(&ctx, &kernels, &row, wide, &[greedy]), vec![b as u32], "maximum at id {b}");
    }

    // top_k = 1 and a tiny top_p both reduce to the argmax whatever the seed.
    let row0 = &logits[..vocab];
    for seed in 0..4 {
        let k1 = SampleParams { temperature: 1.0, top_k: 1, top_p: 1.0, seed, ..Default::default() };
        let p0 = SampleParams { temperature: 1.0, top_k: 0, top_p: 1e-6, seed, ..Default::default() };
        assert_eq!(run_sample(&ctx, &kernels, &row0.repeat(2), vocab, &[k1, p0]), vec![want[0], want[0]]);
    }

    // With top_k = 5 every draw is among the 5 largest, and seeds reproduce.
    let mut order: Vec<u32> = (0..vocab as u32).collect();
    order.sort_by(|&a, &b| row0[b as usize].total_cmp(&row0[a as usize]));
    let top5 = &order[..5];
    let params: Vec<SampleParams> =
        (0..64).map(|i| SampleParams { temperature: 1.5, top_k: 5, top_p: 1.0, seed: 9, counter: i, ..Default::default() }).collect();
    let draws = run_sample(&ctx, &kernels, &row0.repeat(64), vocab, &params);
    assert!(draws.iter().all(|d| top5.contains(d)), "draws {draws:?} outside the top 5 {top5:?}");
    let distinct: std::collections::HashSet<_> = draws.iter().collect();
    assert!(distinct.len() > 1, "different counters give different draws");
    assert_eq!(run_sample(&ctx, &kernels, &row0.repeat(64), vocab, &params), draws, "same seeds, same draws");
}
