//! Compute pipelines for every kernel, with explicit bind-group layouts, built once per
//! (kernel, format, constants) and cached.

use std::collections::HashMap;
use std::sync::Mutex;

use tandem_shaders::{ATTENTION_CHUNK, Binding, Kernel, WeightFormat};

use crate::error::{Error, Result};
use crate::gpu::GpuContext;

/// Pipelines and layouts of one device.
pub struct Kernels {
    ctx: GpuContext,
    layouts: HashMap<Kernel, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    cache: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    gemm_parts: std::sync::OnceLock<wgpu::Buffer>,
}

/// What a cached pipeline was built from: the kernel, the weight format its source reads, and
/// its override constants in order (as bits, so the key hashes).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    kernel: Kernel,
    format: Option<WeightFormat>,
    constants: Vec<(String, u64)>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").field("adapter", &self.ctx.adapter.name).finish()
    }
}

impl Kernels {
    /// Layouts for every kernel; pipelines are built on first use.
    pub fn new(ctx: &GpuContext) -> Self {
        let layouts = Kernel::ALL
            .into_iter()
            .filter(|k| k.layout_owner() == *k)
            .map(|k| {
                let entries: Vec<wgpu::BindGroupLayoutEntry> = k
                    .bindings()
                    .iter()
                    .enumerate()
                    .map(|(i, s)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: match s {
                                Binding::Uniform => wgpu::BufferBindingType::Uniform,
                                Binding::Read => wgpu::BufferBindingType::Storage { read_only: true },
                                Binding::Write => wgpu::BufferBindingType::Storage { read_only: false },
                            },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    })
                    .collect();
                let bgl =
                    ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(k.name()), entries: &entries });
                let pl = ctx.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(k.name()),
                    bind_group_layouts: &[Some(&bgl)],
                    immediate_size: 0,
                });
                (k, (bgl, pl))
            })
            .collect();
        Kernels { ctx: ctx.clone(), layouts, cache: Mutex::default(), gemm_parts: std::sync::OnceLock::new() }
    }

    /// The GPU context the kernels run on.
    pub fn ctx(&self) -> &GpuContext {
        &self.ctx
    }

    /// The pipeline of `kernel` for `format` with the given override constants.
    pub fn pipeline(&self, kernel: Kernel, format: Option<WeightFormat>, constants: &[(&str, f64)]) -> Result<wgpu::ComputePipeline> {
        let key = PipelineKey { kernel, format, constants: constants.iter().map(|&(n, v)| (n.to_string(), v.to_bits())).collect() };
        let label = match format {
            Some(f) => format!("{}.{}", kernel.name(), f.name()),
            None => kernel.name().to_string(),
        };
        let op = || format!("{label} {constants:?}");
        let mut cache = self.cache.lock().map_err(|_| Error::Gpu { op: op(), reason: "pipeline cache poisoned".into() })?;
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let source = kernel.source(format, self.ctx.caps).map_err(|e| Error::Gpu { op: op(), reason: e.to_string() })?;
        let pipeline = self.pipeline_from_source(kernel, &label, &source, constants)?;
        cache.insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// A pipeline from WGSL `source` with `kernel`'s bindings, uncached: for benchmarks of
    /// variants that are not (yet) kernels.
    pub fn pipeline_from_source(
        &self,
        kernel: Kernel,
        label: &str,
        source: &str,
        constants: &[(&str, f64)],
    ) -> Result<wgpu::ComputePipeline> {
        let scope = self.ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor { label: Some(label), source: wgpu::ShaderSource::Wgsl(source.into()) };
        // SAFETY: the one check dropped is naga's loop bounding, a counter and an exit it adds
        // to every loop so that a loop that never ends cannot be undefined behaviour. It also
        // keeps the driver from unrolling loops (register arrays then spill), which cost decode
        // 22-28% and prefill up to 90% on the H200 (docs/kernel-notes.md, item 27). Every loop
        // in our WGSL is a `for` whose bound is an override constant or step data the engine
        // wrote (invariant I11, held by `every_loop_is_a_bounded_for` in tandem-shaders).
        // Bounds checks stay.
        #[allow(unsafe_code)]
        let module = unsafe {
            let mut checks = wgpu::ShaderRuntimeChecks::checked();
            checks.force_loop_bounding = false;
            self.ctx.device.create_shader_module_trusted(desc, checks)
        };
        let pipeline = self.ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: Some(&self.layouts[&kernel.layout_owner()].1),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions { constants, zero_initialize_workgroup_memory: false },
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu { op: format!("building pipeline {label}"), reason: err.to_string() });
        }
        Ok(pipeline)
    }

    /// A bind group for `kernel` with `buffers` bound in order.
    pub fn bind_group(&self, kernel: Kernel, label: &str, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let resources: Vec<wgpu::BindingResource> = buffers.iter().map(|b| b.as_entire_binding()).collect();
        self.bind_group_resources(kernel, label, resources)
    }

    /// A bind group for `kernel` with `resources` (whole buffers or ranges) bound in order.
    pub fn bind_group_resources(&self, kernel: Kernel, label: &str, resources: Vec<wgpu::BindingResource>) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> =
            resources.into_iter().enumerate().map(|(i, resource)| wgpu::BindGroupEntry { binding: i as u32, resource }).collect();
        self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &self.layouts[&kernel.layout_owner()].0,
            entries: &entries,
        })
    }

    /// A bind group for `Kernel::MatvecQ8`: the matmul's buffers in `bind_group`'s order
    /// (step, params, weight quants, weight scales, y) with the f32 activations replaced by the
    /// quants and the scales of `x_q8`, 8-bit activations of inputs `x_stride` floats wide.
    pub fn matvec_q8_bind_group(&self, label: &str, matmul: [&wgpu::Buffer; 5], x_q8: &wgpu::Buffer, x_stride: usize) -> wgpu::BindGroup {
        self.matvec_q8_twin_bind_group(Kernel::MatvecQ8, label, matmul, Q8Input::Stored { x_q8, x_stride }, &[])
    }

    /// A bind group for `Kernel::MatvecQ8Rope`: `matvec_q8_bind_group`'s, then the step's
    /// tokens, the RoPE table and the K and V cache.
    pub fn matvec_q8_rope_bind_group(
        &self,
        label: &str,
        matmul: [&wgpu::Buffer; 5],
        x_q8: &wgpu::Buffer,
        x_stride: usize,
        rope: [&wgpu::Buffer; 4],
    ) -> wgpu::BindGroup {
        self.matvec_q8_twin_bind_group(Kernel::MatvecQ8Rope, label, matmul, Q8Input::Stored { x_q8, x_stride }, &rope)
    }

    /// A bind group for any of the 8-bit matvecs (`kernel`): the matmul's buffers as in
    /// `matvec_q8_bind_group`, the activations from `input` in bindings 2 and 6, then `extra`
    /// (the rotating twins' tokens, RoPE table and K/V cache; the gated ones' 8-bit output).
    pub fn matvec_q8_twin_bind_group(
        &self,
        kernel: Kernel,
        label: &str,
        [step, params, quants, scales, y]: [&wgpu::Buffer; 5],
        input: Q8Input<'_>,
        extra: &[&wgpu::Buffer],
    ) -> wgpu::BindGroup {
        let (x, x2) = match input {
            Q8Input::Stored { x_q8, x_stride } => {
                let range = |r: std::ops::Range<u64>| {
                    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: x_q8,
                        offset: r.start,
                        size: wgpu::BufferSize::new(r.end - r.start),
                    })
                };
                let (x_quants, x_scales) = q8_ranges(x_stride);
                (range(x_quants), range(x_scales))
            }
            Q8Input::Normed { x, g } => (x.as_entire_binding(), g.as_entire_binding()),
            Q8Input::Merged { partials, tokens } => (partials.as_entire_binding(), tokens.as_entire_binding()),
        };
        let mut resources = vec![
            step.as_entire_binding(),
            params.as_entire_binding(),
            x,
            quants.as_entire_binding(),
            scales.as_entire_binding(),
            y.as_entire_binding(),
            x2,
        ];
        resources.extend(extra.iter().map(|b| b.as_entire_binding()));
        self.bind_group_resources(kernel, label, resources)
    }

    /// Lanes that cooperate on one matmul row on this adapter.
    pub fn matmul_split(&self) -> u32 {
        if self.ctx.is_cpu { 1 } else { 32 }
    }

    /// The batch-invariant matmul pipeline for `format`.
    pub fn matmul(&self, format: WeightFormat, accumulate: bool, sample_rows: bool) -> Result<wgpu::ComputePipeline> {
        self.pipeline(
            Kernel::Matmul,
            Some(format),
            &[
                ("SPLIT", f64::from(self.matmul_split())),
                ("ACCUMULATE", f64::from(u8::from(accumulate))),
                ("SAMPLE_ROWS", f64::from(u8::from(sample_rows))),
            ],
        )
    }

    /// The decode matvec of `shape`.
    pub fn matvec(&self, format: WeightFormat, shape: MatvecShape, accumulate: bool, sample_rows: bool) -> Result<wgpu::ComputePipeline> {
        self.pipeline(
            Kernel::Matvec,
            Some(format),
            &[
                ("TOKENS", f64::from(shape.tokens)),
                ("ROWS", f64::from(shape.rows)),
                ("UNROLL", f64::from(shape.unroll)),
                ("KSPLIT", f64::from(shape.ksplit)),
                ("WG", f64::from(shape.lanes)),
                ("ACCUMULATE", f64::from(u8::from(accumulate))),
                ("SAMPLE_ROWS", f64::from(u8::from(sample_rows))),
            ],
        )
    }

    /// The decode matvec on 8-bit activations (formats with `has_packed_dot`), of `shape`
    /// (`rows` is always 1).
    pub fn matvec_q8(
        &self,
        format: WeightFormat,
        shape: MatvecShape,
        accumulate: bool,
        sample_rows: bool,
    ) -> Result<wgpu::ComputePipeline> {
        self.pipeline(
            Kernel::MatvecQ8,
            Some(format),
            &[
                shape.q8_constants().as_slice(),
                &[("ACCUMULATE", f64::from(u8::from(accumulate))), ("SAMPLE_ROWS", f64::from(u8::from(sample_rows)))],
            ]
            .concat(),
        )
    }

    /// `matvec_q8` of a Q/K/V matrix that also rotates Q and K and caches K and V
    /// (matvec_q8_rope.wgsl), for `heads` (query heads, K/V heads, head dim) and a cache of f16
    /// or f32.
    pub fn matvec_q8_rope(
        &self,
        format: WeightFormat,
        shape: MatvecShape,
        heads: [usize; 3],
        kv_f16: bool,
    ) -> Result<wgpu::ComputePipeline> {
        Ok(self.matvec_q8_twin(format, shape, false, None, Q8Finish::Rope { heads, kv_f16 })?.1)
    }

    /// The attention output's 8-bit matvec that merges attention's chunk states itself
    /// (matvec_q8_x_merge.wgsl, attention_merge's arithmetic) for `heads` query heads of
    /// `head_dim`, and stores or adds its sums; one token a workgroup. Its bind group comes from
    /// `matvec_q8_twin_bind_group` with `Q8Input::Merged`.
    pub fn matvec_q8_merge(
        &self,
        format: WeightFormat,
        shape: MatvecShape,
        accumulate: bool,
        heads: usize,
        head_dim: usize,
    ) -> Result<wgpu::ComputePipeline> {
        let mut constants = shape.q8_constants().to_vec();
        constants.extend([
            ("ACCUMULATE", f64::from(u8::from(accumulate))),
            ("N_HEADS", heads as f64),
            ("HEAD_DIM", head_dim as f64),
            ("CHUNK", f64::from(ATTENTION_CHUNK)),
        ]);
        self.pipeline(Kernel::MatvecQ8Merge, Some(format), &constants)
    }

    /// The 8-bit matvec that, with `norm_eps`, norms its input itself (matvec_q8_x_norm.wgsl:
    /// RMSNorm of the residual by the weights bound in place of the activations' scales) and
    /// finishes as `finish` says; one token a workgroup wherever it norms or gates. Returns the
    /// kernel it is, for its bind group (`matvec_q8_twin_bind_group`).
    pub fn matvec_q8_twin(
        &self,
        format: WeightFormat,
        shape: MatvecShape,
        accumulate: bool,
        norm_eps: Option<f32>,
        finish: Q8Finish,
    ) -> Result<(Kernel, wgpu::ComputePipeline)> {
        let mut constants = shape.q8_constants().to_vec();
        if let Some(eps) = norm_eps {
            constants.push(("NORM_EPS", f64::from(eps)));
        }
        let normed = norm_eps.is_some();
        let kernel = match finish {
            Q8Finish::Store => {
                constants.push(("ACCUMULATE", f64::from(u8::from(accumulate))));
                if normed { Kernel::MatvecQ8Norm } else { Kernel::MatvecQ8 }
            }
            Q8Finish::Rope { heads, kv_f16 } => {
                constants.extend(rope_constants(heads, kv_f16));
                if normed { Kernel::MatvecQ8RopeNorm } else { Kernel::MatvecQ8Rope }
            }
            Q8Finish::Glu { ffn_dim, gelu } => {
                constants.extend([("FFN_DIM", ffn_dim as f64), ("GELU", f64::from(u8::from(gelu)))]);
                if normed { Kernel::MatvecQ8NormGlu } else { Kernel::MatvecQ8Glu }
            }
        };
        Ok((kernel, self.pipeline(kernel, Some(format), &constants)?))
    }

    /// The tiled GEMM for steps of many tokens.
    pub fn gemm(&self, format: WeightFormat, accumulate: bool, sample_rows: bool) -> Result<wgpu::ComputePipeline> {
        self.pipeline(
            Kernel::Gemm,
            Some(format),
            &[("ACCUMULATE", f64::from(u8::from(accumulate))), ("SAMPLE_ROWS", f64::from(u8::from(sample_rows)))],
        )
    }

    /// The GEMM on the adapter's matrix units (adapters with `ShaderCaps::coop_matrix`), for
    /// rows of whole blocks, covering a step as `plan` says; tested on such adapters by
    /// scripts/test-gpu. Its bind groups come from `gemm_coop_bind_group`.
    pub fn gemm_coop(&self, format: WeightFormat, accumulate: bool, sample_rows: bool, plan: CoopPlan) -> Result<CoopPipelines> {
        let pass = |sum: bool| {
            self.pipeline(
                Kernel::GemmCoop,
                Some(format),
                &[
                    ("ACCUMULATE", f64::from(u8::from(accumulate))),
                    ("SAMPLE_ROWS", f64::from(u8::from(sample_rows))),
                    ("TILE_R", plan.tile_rows as f64),
                    ("SPLIT_K", f64::from(plan.splits)),
                    ("SUM_PASS", f64::from(u8::from(sum))),
                ],
            )
        };
        Ok(CoopPipelines { plan, gemm: pass(false)?, sum: if plan.splits > 1 { Some(pass(true)?) } else { None } })
    }

    /// A bind group for `Kernel::GemmCoop`: the matmul's buffers in `bind_group`'s order (step,
    /// params, x, weight quants, weight scales, y) and the device's scratch for split sums.
    pub fn gemm_coop_bind_group(&self, label: &str, [step, params, x, quants, scales, y]: [&wgpu::Buffer; 6]) -> wgpu::BindGroup {
        let parts = self.gemm_parts.get_or_init(|| self.ctx.storage("gemm_parts", self.gemm_parts_bytes()));
        self.bind_group(Kernel::GemmCoop, label, &[step, params, x, quants, scales, y, x, parts])
    }

    /// Bytes of the scratch that split GEMM reductions leave their sums in: one buffer for the
    /// device, since its queue runs dispatches in order.
    pub fn gemm_parts_bytes(&self) -> u64 {
        GEMM_PARTS_BYTES.min(self.ctx.limits.max_storage_buffer_binding_size)
    }
}

/// Bytes the split GEMM reductions' sums may take (`Kernels::gemm_parts_bytes`): a 512-token step
/// of a 4,096-row matrix split 4 ways.
const GEMM_PARTS_BYTES: u64 = 32 << 20;

/// The workgroups a split reduction may grow a GEMM to: about one wave on the H200's 132
/// multiprocessors (a workgroup of 128-row tiles fills one).
const SPLIT_WORKGROUPS: usize = 132;

/// How the matrix units' GEMM covers one matrix for one step: the tile height (`TILE_R` in
/// gemm_coop.wgsl) and the splits of the reduction (`SPLIT_K`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopPlan {
    pub tile_rows: usize,
    pub splits: u32,
}

impl CoopPlan {
    /// Tile heights the GEMM is built for.
    pub const TILE_ROWS: [usize; 2] = [128, 256];
    /// Split counts the GEMM is built for.
    pub const SPLITS: [u32; 4] = [1, 2, 4, 8];

    /// The plan for a matrix of `rows` x `cols` and a step of `tokens` tokens, on a device whose
    /// split sums may take `parts_bytes`: 256-row tiles where that still makes 96 workgroups or
    /// more; otherwise 128-row tiles, with the reduction split in as many parts as keep the
    /// workgroups within `SPLIT_WORKGROUPS`, each part at least 2 steps of 32 columns. Swept on
    /// the H200 at 128 and 512 tokens (docs/kernel-notes.md, items 23 and 37): splits beyond one
    /// wave of workgroups lost, splits up to it won up to 4x.
    pub fn for_step(rows: usize, cols: usize, tokens: usize, parts_bytes: u64) -> Self {
        let token_tiles = tokens.div_ceil(GEMM_COOP_TOKENS);
        if rows.div_ceil(256) * token_tiles >= 96 {
            return CoopPlan { tile_rows: 256, splits: 1 };
        }
        let tiles = rows.div_ceil(128) * token_tiles;
        let fits = |s: u32| {
            let s = s as usize;
            tiles * s <= SPLIT_WORKGROUPS && cols / 32 / s >= 2 && (s * tokens * rows * 4) as u64 <= parts_bytes
        };
        let splits = Self::SPLITS.into_iter().rev().find(|&s| s == 1 || fits(s)).unwrap_or(1);
        CoopPlan { tile_rows: 128, splits }
    }

    /// Workgroups of the GEMM's dispatch over `rows` rows and `tokens` tokens.
    pub fn gemm_groups(&self, rows: usize, tokens: usize) -> [u32; 3] {
        [rows.div_ceil(self.tile_rows) as u32, tokens.div_ceil(GEMM_COOP_TOKENS) as u32, self.splits]
    }

    /// Workgroups of the sum pass (a workgroup of the GEMM's lanes per run of rows of a token).
    pub fn sum_groups(&self, rows: usize, tokens: usize) -> [u32; 3] {
        [rows.div_ceil(2 * self.tile_rows) as u32, tokens as u32, 1]
    }
}

/// The pipelines of one `CoopPlan`: the GEMM, and the pass that adds split sums where it splits.
#[derive(Clone, Debug)]
pub struct CoopPipelines {
    pub plan: CoopPlan,
    pub gemm: wgpu::ComputePipeline,
    pub sum: Option<wgpu::ComputePipeline>,
}

/// Tokens one matmul invocation serves (`TILE_T` in matmul.wgsl).
pub const MATMUL_TILE: usize = 8;

/// Token counts the decode matvecs are built for (`TOKENS` in matvec.wgsl and matvec_q8.wgsl).
/// The 8-bit one also takes decode steps of up to `Q8_TOKENS` in groups of the largest; other
/// steps of more tokens take the GEMM.
pub const MATVEC_TOKENS: [u32; 4] = [1, 2, 4, 8];

/// Values of each token one silu_mul.wgsl workgroup takes (64 lanes, 4 values each).
pub const SILU_MUL_TILE: usize = 256;

/// Token rows of 8-bit activations the producers write (`Q8_TOKENS` in common.wgsl): steps of up
/// to this many tokens take the 8-bit matvec, in groups of its largest shape's tokens. Steps in
/// attention tiles do not (attention_coop.wgsl writes no 8-bit copy of its output).
pub const Q8_TOKENS: usize = 32;
const _: () = assert!(Q8_TOKENS.is_multiple_of(MATVEC_TOKENS[MATVEC_TOKENS.len() - 1] as usize));

/// Where 8-bit activations for inputs `stride` floats wide lie in their buffer (layout in
/// common.wgsl): the quants' byte range, then the (d, s) pairs'. `stride` is a multiple of 32,
/// which keeps the second range aligned for a binding offset (256 bytes).
pub fn q8_ranges(stride: usize) -> (std::ops::Range<u64>, std::ops::Range<u64>) {
    let quants = (Q8_TOKENS * stride) as u64;
    (0..quants, quants..quants + quants / 4)
}

/// `x` (tokens of `stride` floats, at most `Q8_TOKENS`) as the GPU's producers write 8-bit
/// activations, for tests and benches that feed the matvec directly.
pub fn q8_activations(x: &[f32], stride: usize) -> Vec<u8> {
    let (quants, scales) = q8_ranges(stride);
    let mut out = vec![0u8; scales.end as usize];
    for (i, block) in x.chunks(32).enumerate() {
        let (q, d, sum) = crate::cpu_ref::quantize_q8_block(block);
        out[i * 32..(i + 1) * 32].copy_from_slice(bytemuck::cast_slice(&q));
        let at = quants.end as usize + i * 8;
        out[at..at + 4].copy_from_slice(&d.to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&sum.to_le_bytes());
    }
    out
}

/// Lanes that walk one row in matvec.wgsl.
pub const MATVEC_SPLIT: u32 = 32;

/// How the decode matvec (matvec.wgsl) covers a matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatvecShape {
    /// Tokens per weight load (steps of up to this many tokens).
    pub tokens: u32,
    /// Rows each group of 32 lanes walks at once.
    pub rows: u32,
    /// Runs of 8 blocks each lane loads before computing.
    pub unroll: u32,
    /// Lane groups that split one set of rows' blocks.
    pub ksplit: u32,
    /// Lanes per workgroup.
    pub lanes: u32,
}

impl MatvecShape {
    /// The most lanes a matvec workgroup may have (matmul_lanes_workgroup.wgsl sizes its sums by
    /// it), and the most sums a lane may keep (`rows * tokens`, `MAX_TILE` in matvec_groups.wgsl).
    pub const MAX_LANES: u32 = 256;
    pub const MAX_SUMS: u32 = 16;

    /// The gated gate/up matvec's (matvec_q8_glu.wgsl): 8 lane groups of 4 units' gate and up
    /// rows, 32 units a workgroup (one block of the down projection's 8-bit input).
    pub const GLU: MatvecShape = MatvecShape { tokens: 1, rows: 8, unroll: 1, ksplit: 1, lanes: 256 };

    /// The output projection's that merges attention's chunks (matvec_q8_x_merge.wgsl): 8 lane
    /// groups of 2 rows, so each workgroup's merge of the whole row serves 16 rows. On the H200
    /// (SmolLM2, context 1,024) about 915 → 980 tok/s against the one-token shape's 2 rows; 64 rows (the
    /// gated twin's shape) left too few workgroups, 911 (docs/kernel-notes.md, item 41).
    pub const MERGE: MatvecShape = MatvecShape { tokens: 1, rows: 2, unroll: 1, ksplit: 1, lanes: 256 };

    /// The shape for steps of up to `tokens` tokens through a matrix `cols` wide, from the sweeps
    /// on the H200 (docs/kernel-notes.md, `cargo bench --bench kernels -- matvec`): one row per
    /// lane group (two lost 5-35% on every shape), and long rows split over 4 lane groups
    /// (+8-45% on the down projections, a loss on shorter rows).
    pub fn for_matrix(cols: usize, tokens: u32) -> Self {
        // Registers bound the unrolling: each token adds its own activation loads.
        let unroll = (4 / tokens).max(1);
        if tokens == 1 && cols >= 8192 {
            MatvecShape { tokens, rows: 1, unroll: 2, ksplit: 4, lanes: 128 }
        } else {
            MatvecShape { tokens, rows: 1, unroll, ksplit: 1, lanes: 64 }
        }
    }

    /// The shape of the matvec on 8-bit activations (matvec_q8.wgsl, a lane a block) for steps
    /// of up to `tokens` tokens through a matrix `cols` wide, from the H200 sweep
    /// (`cargo bench --bench kernels -- q8`): 2 runs of 32 blocks a trip, and rows of 224 blocks
    /// or more split over 2 lane groups, of 448 or more over 4, so each lane still walks 3-4
    /// blocks (+10-30% on the down projections; a loss on shorter rows). Steps of several tokens
    /// (`-- q8steps`): 2 rows a lane group and groups of 4 tokens for 3-4 tokens (item 37); for
    /// the 8-token shape (which the engine gives steps of 5-8 tokens, and steps of up to
    /// `Q8_TOKENS` in groups), 4 rows and groups of 2, since the grid puts a row set's token
    /// groups side by side (item 42): 8-17% less time on the 1B and 8B matrices at 32 tokens
    /// (item 45).
    pub fn for_q8_matrix(cols: usize, tokens: u32) -> Self {
        let blocks = cols / 32;
        match (blocks, tokens) {
            (448.., 1) => MatvecShape { tokens, rows: 1, unroll: 1, ksplit: 4, lanes: 128 },
            (224.., 1) => MatvecShape { tokens, rows: 1, unroll: 2, ksplit: 2, lanes: 128 },
            (_, 1) => MatvecShape { tokens, rows: 1, unroll: 2, ksplit: 1, lanes: 64 },
            (_, 2) => MatvecShape { tokens, rows: 2, unroll: 1, ksplit: 1, lanes: 64 },
            (_, 8..) => MatvecShape { tokens: 2, rows: 4, unroll: 1, ksplit: 1, lanes: 64 },
            _ => MatvecShape { tokens: 4, rows: 2, unroll: 1, ksplit: 1, lanes: 64 },
        }
    }

    /// The override constants of matvec_q8.wgsl (and its RoPE twin) for this shape.
    fn q8_constants(&self) -> [(&'static str, f64); 5] {
        [
            ("TOKENS", f64::from(self.tokens)),
            ("ROWS", f64::from(self.rows)),
            ("UNROLL", f64::from(self.unroll)),
            ("KSPLIT", f64::from(self.ksplit)),
            ("WG", f64::from(self.lanes)),
        ]
    }

    /// The workgroups of matvec_q8.wgsl (and its twins) in this shape for a step of `tokens`
    /// tokens through `rows` rows: groups of tokens along x, sets of rows along y.
    pub fn q8_grid(&self, rows: usize, tokens: usize) -> [u32; 3] {
        [tokens.div_ceil(self.tokens as usize) as u32, rows.div_ceil(self.rows_per_workgroup()) as u32, 1]
    }

    /// Weight rows one workgroup covers.
    pub fn rows_per_workgroup(&self) -> usize {
        (self.lanes / MATVEC_SPLIT / self.ksplit * self.rows) as usize
    }
}

/// Where an 8-bit matvec's activations come from.
#[derive(Clone, Copy)]
pub enum Q8Input<'a> {
    /// 8-bit activations as their producer wrote them, for inputs `x_stride` floats wide.
    Stored { x_q8: &'a wgpu::Buffer, x_stride: usize },
    /// The residual `x`, normed here by the weights `g`.
    Normed { x: &'a wgpu::Buffer, g: &'a wgpu::Buffer },
    /// Attention's chunk states, merged here for the step's `tokens`.
    Merged { partials: &'a wgpu::Buffer, tokens: &'a wgpu::Buffer },
}

/// What an 8-bit matvec does with its sums.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Q8Finish {
    /// Stores (or adds) them into y.
    Store,
    /// Rotates Q into y and K into the cache, and caches V (matvec_q8_rope.wgsl), for heads
    /// (query heads, K/V heads, head dim) and a cache of f16 or f32.
    Rope { heads: [usize; 3], kv_f16: bool },
    /// Gates the gate half by the up half (SiLU, or GELU's tanh form) into y's gate half and the
    /// down projection's 8-bit input (matvec_q8_glu.wgsl), FFN width `ffn_dim`.
    Glu { ffn_dim: usize, gelu: bool },
}

/// The override constants of matvec_q8_rope.wgsl for `heads` (query heads, K/V heads, head dim)
/// and a cache of f16 or f32.
fn rope_constants(heads: [usize; 3], kv_f16: bool) -> [(&'static str, f64); 4] {
    [("N_HEADS", heads[0] as f64), ("N_KV_HEADS", heads[1] as f64), ("HEAD_DIM", heads[2] as f64), ("KV_F16", f64::from(u8::from(kv_f16)))]
}

/// Weight rows and tokens of one GEMM workgroup's tile (`TILE` in gemm.wgsl).
pub const GEMM_TILE: usize = 64;

/// Tokens of one cooperative-matrix GEMM workgroup's tile (`TILE_T` in gemm_coop.wgsl).
pub const GEMM_COOP_TOKENS: usize = 128;
