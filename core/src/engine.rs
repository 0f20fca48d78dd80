//! The forward pass of a Llama-family model over the paged KV cache, one scheduler step at a
//! time: a step carries any mix of prefill chunks and decode tokens of many sequences, is
//! recorded into one command buffer with bind groups built at load, and reads back only the
//! sampled token ids (or, when asked, logits).

use std::collections::HashMap;

use tandem_shaders::{
    ATTENTION_CHUNK, ATTENTION_TILE_MIN, ATTENTION_TILE_ROWS, EmbedParams, FROM_SAMPLED, Kernel, SampleParams, Step, TokenInfo,
};

use crate::config::ModelConfig;
use crate::cpu_ref::rope_table;
use crate::device_weights::{DeviceMatrix, upload_vector};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::kernels::{
    CoopPipelines, CoopPlan, GEMM_TILE, Kernels, MATMUL_TILE, MATVEC_TOKENS, MatvecShape, Q8_TOKENS, Q8Finish, Q8Input, q8_ranges,
};
use crate::kv::{BLOCK_TOKENS, BlockPool, FREED_BLOCK, KvDtype, KvLayer, KvSink, PoolUsage, SeqId, SeqState, block_hash, prefix_hashes};
use crate::layer::{Activations, LayerBuilder, LayerOps, takes_attention_tiles};
use crate::model::{HostModel, layer_tensor};
use crate::recorder::{KernelTime, Profiler, Recorder, Work};

/// How to choose the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingParams {
    /// Temperature 0: the most likely token, ties to the lowest id.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Sizes of an engine's buffers.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most tokens one step may carry.
    pub max_batch_tokens: usize,
    /// KV blocks in the cache (0: enough for `max_sequences` full contexts).
    pub kv_blocks: usize,
    /// Positions per sequence (0: the model's context, capped at 8192).
    pub context_length: usize,
    /// Sequences the default block count is sized for.
    pub max_sequences: usize,
    /// Batch-invariant kernels only: a request's tokens then do not depend on what shares its
    /// steps, how its prompt was chunked or where its K/V was computed. Slower.
    pub deterministic: bool,
    /// How the K/V cache stores values.
    pub kv_dtype: KvDtype,
    /// The layers this engine holds (None: all). An engine whose span does not start at 0 takes
    /// its first layer's input as hidden states (`step_span`) instead of embedding tokens, and
    /// one whose span ends before the last layer hands its residual stream back instead of
    /// sampling: a stage of a chain of nodes that together hold the model.
    pub layers: Option<std::ops::Range<usize>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_tokens: 256,
            kv_blocks: 0,
            context_length: 0,
            max_sequences: 1,
            deterministic: false,
            kv_dtype: KvDtype::default(),
            layers: None,
        }
    }
}

/// One sequence's work in a step.
#[derive(Clone, Debug)]
pub struct StepInput {
    pub seq: SeqId,
    /// Tokens appended at the sequence's next positions.
    pub tokens: Vec<u32>,
    /// Sample a token after the last one.
    pub sample: Option<SamplingParams>,
}

/// A matmul over one weight: a bind group and row count per part, and the kernels that may run it.
pub struct MatmulOp {
    exact: wgpu::ComputePipeline,
    fast: Option<Box<FastMatmul>>,
    /// Per part: its bind group, rows and bytes on the GPU.
    parts: Vec<(wgpu::BindGroup, u32, u64)>,
    format: tandem_shaders::WeightFormat,
    cols: u64,
    /// Column of y that the first part's row 0 writes to.
    y_offset: usize,
    /// Whether it adds into y.
    accumulate: bool,
}

/// The kernels of the default (not batch-invariant) mode: a matvec per token count and the GEMM.
struct FastMatmul {
    /// By increasing tokens.
    matvec: Vec<(MatvecShape, wgpu::ComputePipeline)>,
    /// The matvec on 8-bit activations, where the input's producer writes them and the format
    /// has a packed-byte dot: by increasing tokens, and a bind group per part. Taken before
    /// `matvec`.
    matvec_q8: Option<MatvecQ8>,
    /// The GEMM for larger steps.
    gemm: Gemm,
}

/// The GEMM of one matmul: the matrix units' where the adapter has them, the workgroup-tiled one
/// elsewhere.
enum Gemm {
    Tiled(wgpu::ComputePipeline),
    Coop(CoopGemm),
}

/// The matrix units' GEMM of one matmul: the pipelines of every plan its steps can take
/// (`CoopPlan::for_step`), and a bind group per part.
struct CoopGemm {
    plans: Vec<CoopPipelines>,
    groups: Vec<wgpu::BindGroup>,
    parts_bytes: u64,
}

/// Steps longer than this take the plan of an unsplit reduction (`CoopGemm::pipelines`).
const COOP_PLANNED_TOKENS: usize = 4096;

impl CoopGemm {
    fn new(kernels: &Kernels, m: &DeviceMatrix, buffers: &[[&wgpu::Buffer; 6]], accumulate: bool, sample_rows: bool) -> Result<Self> {
        let parts_bytes = kernels.gemm_parts_bytes();
        let mut wanted: Vec<CoopPlan> = CoopPlan::TILE_ROWS.map(|tile_rows| CoopPlan { tile_rows, splits: 1 }).to_vec();
        for p in &m.parts {
            for tokens in 1..=COOP_PLANNED_TOKENS {
                let plan = CoopPlan::for_step(p.rows, m.cols, tokens, parts_bytes);
                if !wanted.contains(&plan) {
                    wanted.push(plan);
                }
            }
        }
        let plans = wanted.into_iter().map(|plan| kernels.gemm_coop(m.format, accumulate, sample_rows, plan)).collect::<Result<_>>()?;
        let groups = buffers.iter().map(|b| kernels.gemm_coop_bind_group(&m.name, *b)).collect();
        Ok(CoopGemm { plans, groups, parts_bytes })
    }

    /// The pipelines for a step of `tokens` through a part of `rows` rows.
    fn pipelines(&self, rows: usize, cols: usize, tokens: usize) -> &CoopPipelines {
        let plan = CoopPlan::for_step(rows, cols, tokens, self.parts_bytes);
        let unsplit = CoopPlan { splits: 1, ..plan };
        self.plans.iter().find(|p| p.plan == plan).or_else(|| self.plans.iter().find(|p| p.plan == unsplit)).unwrap_or(&self.plans[0])
    }
}

/// The 8-bit activations' matvec of one matmul: pipelines by increasing tokens, a bind group per part.
struct MatvecQ8 {
    shapes: Vec<(MatvecShape, wgpu::ComputePipeline)>,
    groups: Vec<wgpu::BindGroup>,
    /// Each part's buffers in `matvec_q8_bind_group`'s order, the activations and their stride.
    buffers: Vec<[wgpu::Buffer; 5]>,
    x_q8: wgpu::Buffer,
    x_stride: usize,
    /// The twin that also does rope_kv's work (`MatmulOp::rotate`).
    rope: Option<RopeTwin>,
    /// The RMSNorm its one-token twin does itself (`MatmulOp::take_norm`): the residual, the
    /// norm's weights, epsilon.
    norm: Option<(wgpu::Buffer, wgpu::Buffer, f32)>,
    /// The gated activation its one-token twin does itself (`MatmulOp::take_glu`).
    glu: Option<GluTarget>,
    /// The kernel one-token steps take once it norms or gates (`takes_fused_matvec`).
    one_token: Option<OneTokenTwin>,
    /// The attention output's twin that merges attention's chunks itself, for one-token steps
    /// with a few chunks (`MatmulOp::take_merge`, `takes_merging_matvec`).
    merge: Option<OneTokenTwin>,
}

/// matvec_q8_rope's pipeline per shape and bind group per part, and what they were built for.
struct RopeTwin {
    pipelines: Vec<wgpu::ComputePipeline>,
    groups: Vec<wgpu::BindGroup>,
    /// The step's tokens, the RoPE table, the K and V cache.
    buffers: [wgpu::Buffer; 4],
    heads: [usize; 3],
    kv_f16: bool,
}

/// What a gate/up matvec needs to gate its output itself (matvec_q8_glu.wgsl).
#[derive(Clone)]
pub(crate) struct GluTarget {
    /// The down projection's 8-bit input.
    pub ffn_q8: wgpu::Buffer,
    pub ffn_dim: usize,
    pub gelu: bool,
}

/// The 8-bit matvec of a one-token step that also norms its input or gates its output: which
/// kernel, its shape, its pipeline and a bind group per part.
struct OneTokenTwin {
    kernel: Kernel,
    shape: MatvecShape,
    pipeline: wgpu::ComputePipeline,
    groups: Vec<wgpu::BindGroup>,
}

/// Whether a step of `tokens` tokens, of which up to `q8_tokens` may take the 8-bit matvec, takes
/// the matvecs that norm their input or gate their output themselves where a matmul has one
/// (`MatmulOp::take_norm`, `take_glu`), and so skips the norms and SiLU·mul dispatches around
/// them (`Grid::NormedRows`, `Grid::GatedTokens`): one-token steps. Both sides ask here.
pub(crate) fn takes_fused_matvec(tokens: usize, q8_tokens: usize) -> bool {
    tokens == 1 && q8_tokens >= 1
}

/// The most attention chunks a token may have where the output projection merges them itself:
/// each of its workgroups reads every chunk's state, so the saved dispatch (a few µs) pays only
/// while those reads are few.
const MERGING_MAX_CHUNKS: u32 = 8;

/// Whether a step of `tokens` tokens with up to `chunks` attention chunks a token takes the
/// output projection that merges the chunks itself where it has one (`MatmulOp::take_merge`), and
/// so skips attention_merge's dispatch (`Grid::MergeUnlessMatvec`): one-token steps of 2 to
/// `MERGING_MAX_CHUNKS` chunks (with one, attention writes its output itself). Both sides ask here.
pub(crate) fn takes_merging_matvec(tokens: usize, q8_tokens: usize, chunks: u32) -> bool {
    takes_fused_matvec(tokens, q8_tokens) && (2..=MERGING_MAX_CHUNKS).contains(&chunks)
}

/// The widest input (the query width) whose output projection merges attention's chunks itself
/// (the kernel takes up to `NORMED_MAX_COLS`): each of its workgroups reads every chunk's state
/// for the whole row, 4 bytes a value a chunk, so the reads grow with the width and the chunks.
/// Wider models (the 1B and 8B shapes) were not measured with it and keep attention_merge.
const MERGING_MAX_COLS: usize = 1024;

/// The widest input a twin that makes its own activations takes (`MAX_X_BLOCKS` in
/// matvec_q8_x_staged.wgsl).
const NORMED_MAX_COLS: usize = 256 * 32;

/// The widest input (the hidden size) whose matvec norms it in the matvec's own one-token shape
/// (two rows a workgroup). Every workgroup of a twin that norms reads the whole input row and
/// quantizes it: nothing where a decode step is latency (SmolLM2's 576), ruinous where it is
/// bytes (the 1B shape's 2,048: 1,081 → 501 tok/s on the H200 with both its norms in such
/// twins). The gated twin's 64 rows a workgroup amortize it at every width (8B: 345 → 380;
/// docs/kernel-notes.md, item 40).
const NARROW_NORMED_MAX_COLS: usize = 1024;

/// What a Q/K/V matvec needs to rotate Q and K and cache K and V itself (matvec_q8_rope.wgsl).
pub(crate) struct RopeTarget<'a> {
    pub tokens: &'a wgpu::Buffer,
    pub table: &'a wgpu::Buffer,
    pub k_cache: &'a wgpu::Buffer,
    pub v_cache: &'a wgpu::Buffer,
    /// Query heads, K/V heads, head dim.
    pub heads: [usize; 3],
    pub kv_f16: bool,
}

/// The final norm, the head and sampling: only an engine whose span ends at the last layer has them.
struct HeadOps {
    norm_gather: wgpu::ComputePipeline,
    norm_out: wgpu::BindGroup,
    head: MatmulOp,
    sample_pipeline: wgpu::ComputePipeline,
    sample: wgpu::BindGroup,
}

struct StepBuffers {
    step: wgpu::Buffer,
    tokens: wgpu::Buffer,
    tables: wgpu::Buffer,
    sample_rows: wgpu::Buffer,
    sample_params: wgpu::Buffer,
    chosen: wgpu::Buffer,
    /// Readbacks of `chosen`, one per step in flight: a step is submitted before the one ahead
    /// of it is read (`decode_run`, `submit_step`).
    chosen_reads: [wgpu::Buffer; 2],
    /// The step's attention tiles (`attention_tiles`).
    attention_tiles: wgpu::Buffer,
    logits: wgpu::Buffer,
}

/// What a step produced.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// The sampled token per input (None where the input did not sample).
    pub tokens: Vec<Option<u32>>,
    /// Logits of every token of the step, `[tokens][vocab]`, when asked for.
    pub logits: Option<Vec<f32>>,
    /// The residual stream after the engine's last layer, `[tokens][hidden]`, where its span
    /// ends before the model's last layer (`step_span`).
    pub hidden: Option<Vec<f32>>,
}

/// A model on one GPU with its KV cache.
pub struct Engine {
    ctx: GpuContext,
    kernels: Kernels,
    pub config: ModelConfig,
    context_length: usize,
    max_tokens: usize,
    max_sample: usize,
    max_table: usize,
    /// Attention chunks one step may have (see `attention_chunks`).
    attention_budget: usize,
    /// Whether steps whose sequences bring enough tokens take attention tiles
    /// (`takes_attention_tiles`).
    takes_tiles: bool,
    /// The layers held, `span.start` being `layers[0]`'s number.
    span: std::ops::Range<usize>,
    /// The embedding, where the span starts at layer 0.
    embed: Option<(wgpu::ComputePipeline, Vec<wgpu::BindGroup>)>,
    layers: Vec<LayerOps>,
    head: Option<HeadOps>,
    /// The residual stream: what a stage's first layer reads and its last leaves.
    x: wgpu::Buffer,
    bufs: StepBuffers,
    pool: BlockPool,
    seqs: HashMap<SeqId, SeqState>,
    /// The smallest sliding window where every layer has one (blocks before it are given back).
    window_all: Option<usize>,
    next_seq: u64,
    last_timing: StepTiming,
    deterministic: bool,
    kv_dtype: KvDtype,
    profiler: Option<Profiler>,
    /// Steps submitted and not yet finished (`submit_step`), and the readback the next one takes.
    in_flight: usize,
    next_read: usize,
    /// Rows the last submitted step sampled: what a `FROM_SAMPLED` input may name.
    last_sampled: usize,
}

/// A step on the GPU whose results have not been read yet (`Engine::submit_step`). Its
/// sequences already count its positions; `Engine::finish_step` reads what it sampled.
#[must_use = "a submitted step is read by Engine::finish_step"]
pub struct PendingStep {
    done: wgpu::SubmissionIndex,
    /// The `chosen_reads` buffer its sampled ids go to, and how many.
    read: usize,
    n_sample: usize,
    logits: Option<(wgpu::Buffer, u64)>,
    /// Where the residual stream after the span's last layer was copied (a stage that does not
    /// end the model), and its bytes.
    hidden: Option<(wgpu::Buffer, u64)>,
    /// Per input: its sequence, the positions it holds once the step is done (where its
    /// sampled token goes), and whether it samples.
    inputs: Vec<(SeqId, usize, bool)>,
    record: std::time::Duration,
    dispatches: usize,
}

/// Where the last step's time went: recording and submitting on the CPU, then waiting for the GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTiming {
    pub record: std::time::Duration,
    pub wait: std::time::Duration,
    /// Compute dispatches the step recorded.
    pub dispatches: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("adapter", &self.ctx.adapter.name).field("sequences", &self.seqs.len()).finish()
    }
}

/// Memory for attention partials beyond what decoding every cached position needs (capped by
/// the binding limit): enough for 512-token prefill chunks a few thousand positions deep even
/// for an 8B model's 32 heads.
const PARTIALS_BYTES: u64 = 256 << 20;

/// The attention tiles of a step whose sequences bring `lens` tokens, in step order: (first
/// token, rows) runs of at most `ATTENTION_TILE_ROWS` consecutive tokens of one sequence. None
/// where a sequence brings fewer than `ATTENTION_TILE_MIN` (decode tokens): such a step attends
/// a token at a time.
pub fn attention_tiles(lens: impl Iterator<Item = usize>) -> Vec<[u32; 2]> {
    let mut tiles = Vec::new();
    let mut first = 0;
    for n in lens {
        if n < ATTENTION_TILE_MIN {
            return Vec::new();
        }
        let rows = ATTENTION_TILE_ROWS as usize;
        tiles.extend((0..n).step_by(rows).map(|t| [(first + t) as u32, rows.min(n - t) as u32]));
        first += n;
    }
    tiles
}

/// Attention chunks of `n` tokens appended at positions `start..start + n`: each token attends
/// over its whole prefix in chunks of `ATTENTION_CHUNK` positions.
pub fn attention_chunks(start: usize, n: usize) -> usize {
    let chunk = ATTENTION_CHUNK as usize;
    // Sum of ceil((p + 1) / chunk) for p in start..start + n, by whole chunks of positions.
    let below = |end: usize| -> usize {
        let (full, rest) = (end / chunk, end % chunk);
        chunk * full * (full + 1) / 2 + rest * (full + 1)
    };
    below(start + n) - below(start)
}

fn wg(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

impl MatmulOp {
    // The buffers and flags are all distinct roles of one dispatch; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        kernels: &Kernels,
        m: &DeviceMatrix,
        step: &wgpu::Buffer,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        (x_stride, y_stride, y_offset): (usize, usize, usize),
        x_q8: Option<&wgpu::Buffer>,
        accumulate: bool,
        sample_rows: bool,
        deterministic: bool,
    ) -> Result<Self> {
        let ctx = kernels.ctx();
        let params = m.part_params(ctx, x_stride, y_stride, y_offset);
        let parts = m
            .parts
            .iter()
            .zip(&params)
            .map(|(p, u)| {
                let bg = kernels.bind_group(Kernel::Matmul, &m.name, &[step, u, x, &p.quants, &p.scales, y, x]);
                (bg, p.rows as u32, p.quants.size() + p.scales.size())
            })
            .collect();
        let rows_per_wg = 64 / kernels.matmul_split() as usize;
        let groups = m.parts.iter().map(|p| wg(p.rows, rows_per_wg)).max().unwrap_or(0);
        if groups > ctx.limits.max_compute_workgroups_per_dimension {
            return Err(Error::AdapterLimit {
                what: "workgroups per dimension for a weight part",
                needed: groups.into(),
                limit: ctx.limits.max_compute_workgroups_per_dimension.into(),
            });
        }
        let fast = if deterministic {
            None
        } else {
            let max_rows = m.parts.iter().map(|p| p.rows).max().unwrap_or(0);
            // The matvec walks whole blocks; other shapes take the GEMM at every token count.
            let whole_blocks = if m.cols.is_multiple_of(32) { MATVEC_TOKENS.as_slice() } else { &[] };
            let matvec = whole_blocks
                .iter()
                .map(|&t| {
                    let shape = MatvecShape::for_matrix(m.cols, t);
                    let groups = wg(max_rows, shape.rows_per_workgroup());
                    if groups > ctx.limits.max_compute_workgroups_per_dimension {
                        return Err(Error::AdapterLimit {
                            what: "workgroups per dimension for a weight part (matvec)",
                            needed: groups.into(),
                            limit: ctx.limits.max_compute_workgroups_per_dimension.into(),
                        });
                    }
                    Ok((shape, kernels.matvec(m.format, shape, accumulate, sample_rows)?))
                })
                .collect::<Result<Vec<_>>>()?;
            let matvec_q8 = match x_q8 {
                Some(xq) if m.format.has_packed_dot() && m.cols.is_multiple_of(32) => {
                    let buffers: Vec<[wgpu::Buffer; 5]> = m
                        .parts
                        .iter()
                        .zip(&params)
                        .map(|(p, u)| [step.clone(), u.clone(), p.quants.clone(), p.scales.clone(), y.clone()])
                        .collect();
                    let groups = buffers
                        .iter()
                        .map(|[a, b, c, d, e]| kernels.matvec_q8_bind_group(&m.name, [a, b, c, d, e], xq, x_stride))
                        .collect();
                    let shapes = MATVEC_TOKENS
                        .iter()
                        .map(|&t| {
                            let shape = MatvecShape::for_q8_matrix(m.cols, t);
                            Ok((shape, kernels.matvec_q8(m.format, shape, accumulate, sample_rows)?))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Some(MatvecQ8 {
                        shapes,
                        groups,
                        buffers,
                        x_q8: xq.clone(),
                        x_stride,
                        rope: None,
                        norm: None,
                        glu: None,
                        one_token: None,
                        merge: None,
                    })
                }
                _ => None,
            };
            let gemm = if ctx.caps.coop_matrix && m.cols.is_multiple_of(32) {
                let buffers: Vec<[&wgpu::Buffer; 6]> =
                    m.parts.iter().zip(&params).map(|(p, u)| [step, u, x, &p.quants, &p.scales, y]).collect();
                Gemm::Coop(CoopGemm::new(kernels, m, &buffers, accumulate, sample_rows)?)
            } else {
                Gemm::Tiled(kernels.gemm(m.format, accumulate, sample_rows)?)
            };
            Some(Box::new(FastMatmul { matvec, matvec_q8, gemm }))
        };
        Ok(MatmulOp {
            exact: kernels.matmul(m.format, accumulate, sample_rows)?,
            fast,
            parts,
            format: m.format,
            cols: m.cols as u64,
            y_offset,
            accumulate,
        })
    }

    /// Gives a Q/K/V matmul (Q's rows, then K's, then V's, from column 0, pairs of rotated
    /// elements adjacent) the 8-bit matvec twin that also does rope_kv's work, where its shapes
    /// allow (every workgroup an even number of rows, every part an even number of rows). Returns
    /// whether it did; decode steps then record that twin and no rope_kv.
    pub(crate) fn rotate(&mut self, kernels: &Kernels, target: &RopeTarget<'_>) -> Result<bool> {
        let Some(q8) = self.fast.as_mut().and_then(|f| f.matvec_q8.as_mut()) else { return Ok(false) };
        let even_parts = self.parts.iter().all(|(_, rows, _)| rows % 2 == 0);
        let even_workgroups = q8.shapes.iter().all(|(shape, _)| shape.rows_per_workgroup() % 2 == 0);
        if self.y_offset != 0 || !even_parts || !even_workgroups {
            return Ok(false);
        }
        let pipelines = q8
            .shapes
            .iter()
            .map(|(shape, _)| kernels.matvec_q8_rope(self.format, *shape, target.heads, target.kv_f16))
            .collect::<Result<Vec<_>>>()?;
        let rope = [target.tokens, target.table, target.k_cache, target.v_cache];
        let groups = q8
            .buffers
            .iter()
            .map(|[a, b, c, d, e]| kernels.matvec_q8_rope_bind_group("qkv_rope", [a, b, c, d, e], &q8.x_q8, q8.x_stride, rope))
            .collect();
        let buffers = rope.map(|b| b.clone());
        q8.rope = Some(RopeTwin { pipelines, groups, buffers, heads: target.heads, kv_f16: target.kv_f16 });
        Ok(true)
    }

    /// Whether `take_norm` would give this matmul its norming twin.
    pub(crate) fn can_take_norm(&self) -> bool {
        let cols = self.cols as usize;
        let Some(q8) = self.fast.as_ref().and_then(|f| f.matvec_q8.as_ref()) else { return false };
        let widest = if q8.glu.is_some() { NORMED_MAX_COLS } else { NARROW_NORMED_MAX_COLS };
        cols <= widest && cols.is_multiple_of(32) && q8.shapes.first().is_some_and(|(s, _)| s.tokens == 1)
    }

    /// Gives a matmul whose input is the RMSNorm (by `g`, with `eps`) of the residual `x` an
    /// 8-bit matvec twin that norms it itself, for one-token steps (`takes_fused_matvec`),
    /// where its shapes allow (rows of whole blocks, up to `NARROW_NORMED_MAX_COLS` or, for the
    /// gated twin, `NORMED_MAX_COLS`). Call after `rotate` and `take_glu`: the twin rotates or
    /// gates too. Returns whether it did; the norm's dispatch is then skipped on those steps.
    pub(crate) fn take_norm(&mut self, kernels: &Kernels, x: &wgpu::Buffer, g: &wgpu::Buffer, eps: f32) -> Result<bool> {
        if !self.can_take_norm() {
            return Ok(false);
        }
        let Some(q8) = self.fast.as_mut().and_then(|f| f.matvec_q8.as_mut()) else { return Ok(false) };
        q8.norm = Some((x.clone(), g.clone(), eps));
        self.build_one_token(kernels)?;
        Ok(true)
    }

    /// Gives a gate/up matmul (the gates' `ffn_dim` rows, then the ups', into the start of y) an
    /// 8-bit matvec twin that applies the gated activation itself and writes the down
    /// projection's 8-bit input, for one-token steps (`takes_fused_matvec`), where its shape
    /// allows (one part, whole blocks of units). Returns whether it did; SiLU·mul's dispatch is
    /// then skipped on those steps.
    pub(crate) fn take_glu(&mut self, kernels: &Kernels, target: GluTarget) -> Result<bool> {
        let whole = self.parts.len() == 1 && self.parts[0].1 as usize == 2 * target.ffn_dim && target.ffn_dim.is_multiple_of(32);
        let Some(q8) = self.fast.as_mut().and_then(|f| f.matvec_q8.as_mut()) else { return Ok(false) };
        if !whole || self.y_offset != 0 || self.accumulate || q8.rope.is_some() {
            return Ok(false);
        }
        q8.glu = Some(target);
        self.build_one_token(kernels)?;
        Ok(true)
    }

    /// Gives the attention output projection (input: `heads` query heads of `head_dim`) an 8-bit
    /// matvec twin that merges attention's chunk states (`partials`, packed by the step's
    /// `tokens`) itself, for one-token steps of a few chunks (`takes_merging_matvec`), where its
    /// shape allows (whole blocks, up to `MERGING_MAX_COLS`: every workgroup merges the whole
    /// row, for the 16 rows of `MatvecShape::MERGE`). Returns whether it did; attention_merge's
    /// dispatch is then skipped on those steps.
    pub(crate) fn take_merge(
        &mut self,
        kernels: &Kernels,
        partials: &wgpu::Buffer,
        tokens: &wgpu::Buffer,
        [heads, head_dim]: [usize; 2],
    ) -> Result<bool> {
        let (format, accumulate, cols) = (self.format, self.accumulate, self.cols as usize);
        let Some(q8) = self.fast.as_mut().and_then(|f| f.matvec_q8.as_mut()) else { return Ok(false) };
        let shape = MatvecShape::MERGE;
        if cols != heads * head_dim || cols > MERGING_MAX_COLS || !head_dim.is_multiple_of(32) {
            return Ok(false);
        }
        let pipeline = kernels.matvec_q8_merge(format, shape, accumulate, heads, head_dim)?;
        let kernel = Kernel::MatvecQ8Merge;
        let input = Q8Input::Merged { partials, tokens };
        let groups = q8
            .buffers
            .iter()
            .map(|[step, params, quants, scales, y]| {
                kernels.matvec_q8_twin_bind_group(kernel, kernel.name(), [step, params, quants, scales, y], input, &[])
            })
            .collect();
        q8.merge = Some(OneTokenTwin { kernel, shape, pipeline, groups });
        Ok(true)
    }

    /// The one-token twin for what `take_norm` and `take_glu` gave the 8-bit matvec.
    fn build_one_token(&mut self, kernels: &Kernels) -> Result<()> {
        let (format, accumulate) = (self.format, self.accumulate);
        let Some(q8) = self.fast.as_mut().and_then(|f| f.matvec_q8.as_mut()) else { return Ok(()) };
        let finish = match (&q8.glu, &q8.rope) {
            (Some(g), _) => Q8Finish::Glu { ffn_dim: g.ffn_dim, gelu: g.gelu },
            (None, Some(r)) => Q8Finish::Rope { heads: r.heads, kv_f16: r.kv_f16 },
            (None, None) => Q8Finish::Store,
        };
        let shape = if q8.glu.is_some() { MatvecShape::GLU } else { q8.shapes[0].0 };
        let (kernel, pipeline) = kernels.matvec_q8_twin(format, shape, accumulate, q8.norm.as_ref().map(|n| n.2), finish)?;
        let mut extra: Vec<&wgpu::Buffer> = Vec::new();
        if let Some(g) = &q8.glu {
            extra.push(&g.ffn_q8);
        } else if let Some(r) = &q8.rope {
            extra.extend(&r.buffers);
        }
        let groups = q8
            .buffers
            .iter()
            .map(|[step, params, quants, scales, y]| {
                let input = match &q8.norm {
                    Some((x, g, _)) => Q8Input::Normed { x, g },
                    None => Q8Input::Stored { x_q8: &q8.x_q8, x_stride: q8.x_stride },
                };
                kernels.matvec_q8_twin_bind_group(kernel, kernel.name(), [step, params, quants, scales, y], input, &extra)
            })
            .collect();
        q8.one_token = Some(OneTokenTwin { kernel, shape, pipeline, groups });
        Ok(())
    }

    /// Records the matmul for a step of `tokens` tokens with up to `chunks` attention chunks a
    /// token; returns whether it recorded the rotating twin (see `rotate`), which has done
    /// rope_kv's work. Steps of up to `q8_tokens` tokens take the 8-bit matvec where the matrix
    /// has it (its largest shape in groups).
    pub(crate) fn record(&self, rec: &mut Recorder<'_>, tokens: usize, split: u32, q8_tokens: usize, chunks: u32) -> bool {
        let mut rotated = false;
        let t = tokens as u64;
        let work = |kernel, rows: u32, bytes: u64| {
            let rows = u64::from(rows);
            // 8-bit activations: a byte a value and 8 bytes of (d, s) a block of 32.
            let x_bytes = match kernel {
                Kernel::MatvecQ8 | Kernel::MatvecQ8Rope | Kernel::MatvecQ8Glu => self.cols * 5 / 4,
                // Every chunk's state, 4 bytes a value, counted once (each workgroup reads it
                // from the L2 again, so the profile's GB/s understates the reads).
                Kernel::MatvecQ8Merge => self.cols * 4 * u64::from(chunks),
                // The residual and the norm's weights.
                Kernel::MatvecQ8Norm | Kernel::MatvecQ8RopeNorm | Kernel::MatvecQ8NormGlu => self.cols * 8,
                _ => self.cols * 4,
            };
            Work { kernel, format: Some(self.format), bytes: bytes + t * (x_bytes + rows * 4), flops: 2 * t * rows * self.cols }
        };
        for (i, (bg, rows, bytes)) in self.parts.iter().enumerate() {
            // The pass that adds a split reduction's sums, where the GEMM splits it.
            let mut then = None;
            let (name, pipeline, bg, groups) = match &self.fast {
                None => (Kernel::Matmul, &self.exact, bg, [wg(*rows as usize, 64 / split as usize), wg(tokens, MATMUL_TILE), 1]),
                Some(f) => {
                    let fits = |(shape, _): &&(MatvecShape, wgpu::ComputePipeline)| shape.tokens as usize >= tokens;
                    // Up to Q8_TOKENS, the largest shape in groups of its tokens.
                    let q8 = f.matvec_q8.as_ref().filter(|_| tokens <= q8_tokens.min(Q8_TOKENS)).map(|q| {
                        let at = q.shapes.iter().position(|s| fits(&s)).unwrap_or(q.shapes.len() - 1);
                        (q, at)
                    });
                    if let Some((q8, at)) = q8 {
                        let shape = q8.shapes[at].0;
                        let groups = shape.q8_grid(*rows as usize, tokens);
                        rotated = q8.rope.is_some();
                        let merging = q8.merge.as_ref().filter(|_| takes_merging_matvec(tokens, q8_tokens, chunks));
                        let fused = merging.or(q8.one_token.as_ref().filter(|_| takes_fused_matvec(tokens, q8_tokens)));
                        match (fused, &q8.rope) {
                            (Some(f), _) => (f.kernel, &f.pipeline, &f.groups[i], f.shape.q8_grid(*rows as usize, 1)),
                            (None, Some(r)) => (Kernel::MatvecQ8Rope, &r.pipelines[at], &r.groups[i], groups),
                            (None, None) => (Kernel::MatvecQ8, &q8.shapes[at].1, &q8.groups[i], groups),
                        }
                    } else if let Some((shape, pipeline)) = f.matvec.iter().find(fits) {
                        (
                            Kernel::Matvec,
                            pipeline,
                            bg,
                            [wg(*rows as usize, shape.rows_per_workgroup()), wg(tokens, shape.tokens as usize), 1],
                        )
                    } else {
                        match &f.gemm {
                            Gemm::Tiled(pipeline) => {
                                (Kernel::Gemm, pipeline, bg, [wg(*rows as usize, GEMM_TILE), wg(tokens, GEMM_TILE), 1])
                            }
                            Gemm::Coop(coop) => {
                                let p = coop.pipelines(*rows as usize, self.cols as usize, tokens);
                                let bg = &coop.groups[i];
                                if let Some(sum) = &p.sum {
                                    then = Some((sum, bg, p.plan.sum_groups(*rows as usize, tokens), p.plan.splits));
                                }
                                (Kernel::GemmCoop, &p.gemm, bg, p.plan.gemm_groups(*rows as usize, tokens))
                            }
                        }
                    }
                }
            };
            rec.dispatch(work(name, *rows, *bytes), pipeline, bg, groups);
            if let Some((sum, bg, groups, splits)) = then {
                // Each split's sums read once, the totals written once.
                let bytes = (u64::from(splits) + 1) * t * u64::from(*rows) * 4;
                rec.dispatch(Work { kernel: Kernel::GemmCoop, format: Some(self.format), bytes, flops: 0 }, sum, bg, groups);
            }
        }
        rotated
    }
}

impl Engine {
    /// Uploads `model` and builds every pipeline, buffer and bind group.
    pub fn new(ctx: &GpuContext, model: &HostModel, cfg: &EngineConfig) -> Result<Self> {
        let c = model.config.clone();
        let span = cfg.layers.clone().unwrap_or(0..c.n_layers);
        if span.start >= span.end || span.end > c.n_layers {
            return Err(Error::InvalidRequest(format!(
                "layers {}..{} are not a span of the model's {} layers",
                span.start, span.end, c.n_layers
            )));
        }
        let (first, last) = (span.start == 0, span.end == c.n_layers);
        let context_length = if cfg.context_length == 0 { c.context_length.min(8192) } else { cfg.context_length };
        let max_tokens = cfg.max_batch_tokens.max(1);
        let blocks_per_seq = context_length.div_ceil(BLOCK_TOKENS);
        let kv_blocks = if cfg.kv_blocks == 0 { blocks_per_seq * cfg.max_sequences.max(1) } else { cfg.kv_blocks };
        let max_binding = ctx.max_binding();
        let f4 = 4u64;
        let logits_row = c.vocab_size as u64 * f4;
        let max_sample = if last { (max_binding / logits_row).min(max_tokens as u64) as usize } else { 0 };
        if last && max_sample == 0 {
            return Err(Error::AdapterLimit { what: "bytes for one row of logits", needed: logits_row, limit: max_binding });
        }
        let cache_bytes = kv_blocks as u64 * BLOCK_TOKENS as u64 * c.kv_dim() as u64 * cfg.kv_dtype.bytes() as u64;
        if cache_bytes > max_binding {
            return Err(Error::AdapterLimit { what: "bytes of one layer's K cache", needed: cache_bytes, limit: max_binding });
        }
        let kernels = Kernels::new(ctx);
        let (d, q_dim, qkv_dim, f) = (c.hidden_size, c.n_heads * c.head_dim, c.qkv_dim(), c.ffn_size);
        let t = max_tokens as u64;
        let act = |label: &str, width: usize| ctx.storage(label, t * width as u64 * f4);
        let x = act("x", d);
        let xn = act("xn", d);
        let qkv = act("qkv", qkv_dim);
        let attn_out = act("attn_out", q_dim);
        let gate_up = act("gate_up", 2 * f);
        let hs = ctx.storage("hidden_sampled", (max_sample as u64 * d as u64 * f4).max(16));
        // The decode matvecs' inputs again as 8-bit activations, written by the kernels that
        // produce them (the norms, the attention merge, SiLU·mul) in whole blocks of 32: not in
        // deterministic mode, which never runs a matvec, and only for inputs that some matrix
        // reads through a packed-byte dot (an F16 model's producers would quantize for nothing).
        let packed = |read_by: &[&str]| -> Result<bool> {
            Ok(span
                .clone()
                .any(|l| read_by.iter().any(|name| model.tensors.get(&layer_tensor(l, name)).is_some_and(|t| t.format.has_packed_dot()))))
        };
        let q8 = |label: &str, stride: usize, used: bool| (!cfg.deterministic && used).then(|| ctx.storage(label, q8_ranges(stride).1.end));
        let xn_q8 = q8("xn_q8", d, d.is_multiple_of(32) && packed(&["attn_q", "attn_k", "attn_v", "attn_qkv", "ffn_gate", "ffn_up"])?);
        let attn_q8 = q8("attn_out_q8", q_dim, c.head_dim.is_multiple_of(32) && packed(&["attn_output"])?);
        let ffn_q8 = q8("ffn_q8", 2 * f, f.is_multiple_of(32) && packed(&["ffn_down"])?);
        let head_format = match (last, c.tied_embeddings) {
            (false, _) => None,
            (true, true) => Some(model.tensor("token_embd.weight")?.format),
            (true, false) => Some(model.output_head()?.format),
        };
        let hs_q8 = q8("hidden_sampled_q8", d, d.is_multiple_of(32) && head_format.is_some_and(|f| f.has_packed_dot()));
        // Bound where a producer writes no 8-bit activations.
        let no_q8 = ctx.storage("no_q8", 16);
        let hs_q8_out = hs_q8.as_ref().unwrap_or(&no_q8).clone();
        // Attention partials are packed per step, one record per (chunk, head). Enough for every
        // cached position decoding at once plus, within a fixed memory share, prefill chunks
        // deep into the context (the scheduler shortens those to fit).
        let chunk_bytes = (c.n_heads * (c.head_dim + 2)) as u64 * f4;
        let decode_all = (kv_blocks * BLOCK_TOKENS).div_ceil(ATTENTION_CHUNK as usize) + max_tokens;
        let budget_bytes = (decode_all as u64 * chunk_bytes).max(PARTIALS_BYTES.min(max_binding));
        if budget_bytes > max_binding {
            return Err(Error::AdapterLimit {
                what: "bytes of attention partials (lower --kv-memory)",
                needed: budget_bytes,
                limit: max_binding,
            });
        }
        let attention_budget = (budget_bytes / chunk_bytes) as usize;
        let partials = ctx.storage("attention_partials", attention_budget as u64 * chunk_bytes);
        let max_table = max_tokens.min(kv_blocks.max(1)) * blocks_per_seq;
        let bufs = StepBuffers {
            step: ctx.uniform_init("step", bytemuck::bytes_of(&Step::default())),
            tokens: ctx.storage("tokens", t * size_of::<TokenInfo>() as u64),
            tables: ctx.storage("block_tables", max_table as u64 * f4),
            sample_rows: ctx.storage("sample_rows", t * f4),
            sample_params: ctx.storage("sample_params", t * size_of::<SampleParams>() as u64),
            chosen: ctx.storage("chosen", t * f4),
            chosen_reads: [ctx.readback("chosen_read.0", t * f4), ctx.readback("chosen_read.1", t * f4)],
            // A tile a token at most (a step's sequences each bring ATTENTION_TILE_MIN or more).
            attention_tiles: ctx.storage("attention_tiles", t * 8),
            logits: ctx.storage("logits", (max_sample as u64 * logits_row).max(16)),
        };
        let family =
            c.family().ok_or_else(|| Error::Config { path: model.path.clone(), reason: format!("no family runs `{}`", c.architecture) })?;
        // Per-frequency divisors: Llama 3's `rope_freqs`, or LongRoPE's long factors for
        // contexts past the original one and its short ones within it (llama.cpp's choice).
        let original = c.original_context();
        let factors_tensor = if model.tensors.contains_key("rope_freqs.weight") {
            Some("rope_freqs.weight")
        } else if model.tensors.contains_key("rope_factors_long.weight") {
            Some(if context_length > original { "rope_factors_long.weight" } else { "rope_factors_short.weight" })
        } else {
            None
        };
        let freq_factors = factors_tensor
            .map(|name| model.tensor(name).map(|t| crate::cpu_ref::dequantize_row(t.format, t.bytes.as_slice(), t.cols())))
            .transpose()?;
        let attn_factor = c.rope_attn_factor.unwrap_or(1.0) as f32;
        let mut rope_tables = HashMap::new();
        for l in span.clone() {
            let (theta, divisor) = (c.layer_rope_theta(l), c.layer_rope_divisor(l));
            if let std::collections::hash_map::Entry::Vacant(e) = rope_tables.entry(c.layer_rope_key(l)) {
                let half = c.head_dim / 2;
                let (yarn, mscale) = match c.rope_yarn.filter(|_| c.layer_rope_scaled(l)) {
                    Some(y) => y.divisors(theta, c.head_dim, original),
                    None => (vec![1.0; half], 1.0),
                };
                let factors: Vec<f32> =
                    (0..half).map(|i| freq_factors.as_ref().map_or(1.0, |f| f[i]) * (divisor * yarn[i]) as f32).collect();
                let scale = attn_factor * mscale as f32;
                let table: Vec<f32> =
                    rope_table(context_length, c.head_dim, theta, Some(&factors)).into_iter().flatten().map(|v| v * scale).collect();
                e.insert(ctx.storage_init("rope_table", bytemuck::cast_slice(&table)));
            }
        }

        // The embedding is uploaded where the span starts the model, or ends it with a tied head.
        let embed_t =
            if first || (last && c.tied_embeddings) { Some(DeviceMatrix::upload(ctx, model.tensor("token_embd.weight")?)?) } else { None };
        let embed = match (&embed_t, first) {
            (Some(t), true) => {
                let pipeline = kernels.pipeline(
                    Kernel::Embed,
                    Some(model.tensor("token_embd.weight")?.format),
                    &[("SCALE", f64::from(family.embedding_scale(&c)))],
                )?;
                let groups = t
                    .parts
                    .iter()
                    .map(|p| {
                        let params = EmbedParams { row_start: p.row_start as u32, row_count: p.rows as u32, dim: d as u32, _pad: 0 };
                        let u = ctx.uniform_init("embed.params", bytemuck::bytes_of(&params));
                        kernels.bind_group(Kernel::Embed, "embed", &[&bufs.step, &u, &bufs.tokens, &p.quants, &p.scales, &x, &bufs.chosen])
                    })
                    .collect();
                Some((pipeline, groups))
            }
            _ => None,
        };

        let act = Activations {
            step: bufs.step.clone(),
            tokens: bufs.tokens.clone(),
            tables: bufs.tables.clone(),
            sample_rows: bufs.sample_rows.clone(),
            x: x.clone(),
            xn,
            xn_q8,
            qkv,
            attn_out,
            attn_q8,
            gate_up,
            ffn_q8,
            y: act("y", d),
            partials,
            attention_tiles: bufs.attention_tiles.clone(),
            no_q8: no_q8.clone(),
        };
        let mut layers = Vec::with_capacity(span.len());
        for l in span.clone() {
            let _span = tracing::debug_span!("upload_layer", layer = l).entered();
            let cache = |what: &str| ctx.storage(&format!("{what}_cache.{l}"), cache_bytes);
            let (k_cache, v_cache) = (cache("k"), cache("v"));
            let builder = LayerBuilder {
                ctx,
                kernels: &kernels,
                model,
                config: &c,
                engine: cfg,
                act: &act,
                rope_tables: &rope_tables,
                layer: l,
                k_cache: &k_cache,
                v_cache: &v_cache,
            };
            let ops = family.layer_ops(&builder)?;
            layers.push(LayerOps { ops, k_cache, v_cache });
        }
        let head = if last {
            let g_out = upload_vector(ctx, model.tensor("output_norm.weight")?);
            let norm_out = kernels.bind_group(Kernel::RmsNorm, "norm_out", &[&bufs.step, &x, &g_out, &bufs.sample_rows, &hs, &hs_q8_out]);
            let head_t = match embed_t {
                Some(t) if c.tied_embeddings => t,
                _ => DeviceMatrix::upload(ctx, model.output_head()?)?,
            };
            let head = MatmulOp::new(
                &kernels,
                &head_t,
                &bufs.step,
                &hs,
                &bufs.logits,
                (d, c.vocab_size, 0),
                hs_q8.as_ref(),
                false,
                true,
                cfg.deterministic,
            )?;
            let norm_gather = kernels.pipeline(
                Kernel::RmsNorm,
                None,
                &[("DIM", d as f64), ("EPS", f64::from(c.rms_eps)), ("GATHER", 1.0), ("Q8", f64::from(u8::from(hs_q8.is_some())))],
            )?;
            Some(HeadOps {
                norm_gather,
                norm_out,
                head,
                sample_pipeline: kernels.pipeline(Kernel::Sample, None, &[("VOCAB", c.vocab_size as f64)])?,
                sample: kernels.bind_group(Kernel::Sample, "sample", &[&bufs.step, &bufs.logits, &bufs.sample_params, &bufs.chosen]),
            })
        } else {
            None
        };
        ctx.check_errors("engine setup")?;
        let takes_tiles = takes_attention_tiles(ctx.caps, cfg, &c);
        Ok(Engine {
            ctx: ctx.clone(),
            kernels,
            window_all: span.clone().map(|l| c.layer_window(l)).collect::<Option<Vec<_>>>().and_then(|w| w.into_iter().min()),
            config: c,
            context_length,
            max_tokens,
            max_sample,
            max_table,
            attention_budget,
            takes_tiles,
            span,
            embed,
            layers,
            head,
            x,
            bufs,
            pool: BlockPool::new(kv_blocks),
            seqs: HashMap::new(),
            next_seq: 0,
            last_timing: StepTiming::default(),
            deterministic: cfg.deterministic,
            kv_dtype: cfg.kv_dtype,
            profiler: None,
            in_flight: 0,
            next_read: 0,
            last_sampled: 0,
        })
    }

    /// Whether the engine runs only batch-invariant kernels (`EngineConfig::deterministic`).
    pub fn deterministic(&self) -> bool {
        self.deterministic
    }

    /// How this engine's K/V cache stores values.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Times every dispatch of the following steps on the GPU (each in its own compute pass,
    /// so steps run a little slower), or stops.
    pub fn set_profiling(&mut self, on: bool) -> Result<()> {
        self.profiler = if on { Some(Profiler::new(&self.ctx)?) } else { None };
        Ok(())
    }

    /// GPU time per kernel over the steps since profiling started or was last taken.
    pub fn take_profile(&mut self) -> Vec<KernelTime> {
        self.profiler.as_mut().map(Profiler::take).unwrap_or_default()
    }

    /// The GPU this engine runs on.
    pub fn gpu(&self) -> &GpuContext {
        &self.ctx
    }

    /// Positions one sequence may hold.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Most tokens in one step.
    pub fn max_batch_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Attention chunks one step may have in all (`attention_chunks` of each input).
    pub fn attention_budget(&self) -> usize {
        self.attention_budget
    }

    /// The most of `n` tokens appended at `start` that fit in a step with `budget` attention
    /// chunks and `tokens` token slots left.
    pub fn prefill_fit(start: usize, n: usize, budget: usize, tokens: usize) -> usize {
        let (mut lo, mut hi) = (0, n.min(tokens));
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if attention_chunks(start, mid) <= budget { lo = mid } else { hi = mid - 1 }
        }
        lo
    }

    /// CPU recording time and GPU wait time of the last step.
    pub fn last_step_timing(&self) -> StepTiming {
        self.last_timing
    }

    /// A new, empty sequence.
    pub fn create_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, SeqState { ready: vec![0; self.layers.len()], ..Default::default() });
        id
    }

    /// A new sequence holding the cached blocks of the longest cached prefix of `prompt`, and the
    /// number of positions it starts with. At least the last prompt token is left to compute, so
    /// the step that appends it can sample.
    pub fn create_sequence_with_prefix(&mut self, prompt: &[u32]) -> (SeqId, usize) {
        let usable = prompt.len().saturating_sub(1) / BLOCK_TOKENS * BLOCK_TOKENS;
        let mut hashes = prefix_hashes(&prompt[..usable]);
        let blocks = self.pool.share_prefix(&hashes);
        hashes.truncate(blocks.len());
        let len = blocks.len() * BLOCK_TOKENS;
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        let state = SeqState { blocks, len, ready: vec![len; self.layers.len()], tokens: prompt[..len].to_vec(), hashes, freed: 0 };
        self.seqs.insert(id, state);
        (id, len)
    }

    /// Where every layer has a sliding window, the most blocks a sequence holds at once: its
    /// window, the positions of a step beyond it, and one for alignment (None: all of them).
    pub fn window_blocks(&self) -> Option<usize> {
        self.window_all.map(|w| (w + self.max_tokens).div_ceil(BLOCK_TOKENS) + 1)
    }

    /// Blocks in use, cached and in all.
    pub fn kv_usage(&self) -> PoolUsage {
        self.pool.usage()
    }

    /// Frees a sequence's blocks.
    pub fn free_sequence(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.pool.release(s);
        }
    }

    /// Blocks a sequence holds.
    pub fn sequence_blocks(&self, seq: SeqId) -> Result<usize> {
        self.seqs.get(&seq).map(|s| s.blocks.len()).ok_or(Error::UnknownSequence(seq.0))
    }

    /// Positions with K/V in every layer.
    pub fn sequence_len(&self, seq: SeqId) -> Result<usize> {
        self.seqs.get(&seq).map(|s| s.len).ok_or(Error::UnknownSequence(seq.0))
    }

    /// Runs one step and returns the sampled tokens.
    pub fn step(&mut self, inputs: &[StepInput]) -> Result<Vec<Option<u32>>> {
        Ok(self.run_step(inputs, false, None)?.tokens)
    }

    /// Submits one step and returns without waiting for it, so the CPU can prepare the next
    /// while the GPU runs this one; `finish_step` reads its tokens. A token id of
    /// `FROM_SAMPLED | k` is the id the step submitted just before sampled into its row `k`
    /// (rows count the sampling inputs in order), which never leaves the GPU. Two steps at most
    /// are in flight, and they finish in the order they were submitted.
    pub fn submit_step(&mut self, inputs: &[StepInput]) -> Result<PendingStep> {
        self.submit_with(inputs, false, None, true, None)
    }

    /// The tokens a submitted step sampled, per input (None where the input did not sample),
    /// once the GPU is done with it.
    pub fn finish_step(&mut self, pending: PendingStep) -> Result<Vec<Option<u32>>> {
        Ok(self.finish_with(pending)?.tokens)
    }

    /// Runs one step, handing each layer's new K/V to `sink` as soon as the GPU has written it.
    pub fn step_with_sink(&mut self, inputs: &[StepInput], sink: &mut dyn KvSink) -> Result<Vec<Option<u32>>> {
        let all: Vec<SeqId> = inputs.iter().map(|i| i.seq).collect();
        Ok(self.run_step(inputs, false, Some((&all, sink)))?.tokens)
    }

    /// Like `step_with_sink`, but only the sequences in `export` are read back (a prefill node's
    /// step may carry requests that are not leaving it).
    pub fn step_exporting(&mut self, inputs: &[StepInput], export: &[SeqId], sink: &mut dyn KvSink) -> Result<Vec<Option<u32>>> {
        Ok(self.run_step(inputs, false, Some((export, sink)))?.tokens)
    }

    /// Reads the K/V of positions `start..end` of `seq` from the cache, every layer (to send a
    /// cached prefix, or a running sequence to another node).
    pub fn export_kv(&mut self, seq: SeqId, start: usize, end: usize) -> Result<Vec<KvLayer>> {
        let state = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        if start > end || end > state.len {
            return Err(Error::KvImport(format!("cannot export positions {start}..{end} of a sequence holding {}", state.len)));
        }
        if start < end && start < state.live_from() {
            return Err(Error::KvImport(format!(
                "cannot export positions {start}..{end}: those before {} were given back (before every layer's sliding window)",
                state.live_from()
            )));
        }
        let kv_dim = self.config.kv_dim();
        let kv_row = (kv_dim * self.kv_dtype.bytes()) as u64;
        let bytes = (end - start) as u64 * kv_row;
        let mut enc = self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("export_kv") });
        let mut stages = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let k_stage = self.ctx.readback(&format!("k_export_cache.{l}"), bytes);
            let v_stage = self.ctx.readback(&format!("v_export_cache.{l}"), bytes);
            copy_kv_rows(&mut enc, layer, state, start..end, (&k_stage, &v_stage), 0, kv_row);
            stages.push((k_stage, v_stage));
        }
        let done = self.ctx.queue.submit([enc.finish()]);
        let mut out = Vec::with_capacity(stages.len());
        for (l, (k_stage, v_stage)) in stages.into_iter().enumerate() {
            let k = self.kv_dtype.decode(&self.ctx.read_mapped(&k_stage, bytes, done.clone())?);
            let v = self.kv_dtype.decode(&self.ctx.read_mapped(&v_stage, bytes, done.clone())?);
            out.push(KvLayer { layer: self.span.start + l, start, tokens: end - start, k, v });
        }
        self.ctx.check_errors("export_kv")?;
        Ok(out)
    }

    /// Makes `seq` hold blocks for `len` positions, or fails taking none (a decode node reserves a
    /// prompt's blocks before its KV is sent).
    pub fn reserve_sequence(&mut self, seq: SeqId, len: usize) -> Result<()> {
        if len > self.context_length {
            return Err(Error::ContextOverflow { tokens: len, max_new: 0, context: self.context_length });
        }
        let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        self.pool.reserve(state, len)
    }

    /// Names the tokens behind a sequence's imported positions, so its full blocks join the prefix
    /// cache like computed ones. `tokens` must cover exactly the positions held and extend the
    /// tokens already known.
    pub fn adopt_tokens(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        if tokens.len() != state.len || !tokens.starts_with(&state.tokens) {
            return Err(Error::KvImport(format!("{} tokens do not name a sequence of {} positions", tokens.len(), state.len)));
        }
        state.tokens = tokens.to_vec();
        let done = state.len;
        Self::positions_done(&mut self.pool, state, done, self.window_all);
        Ok(())
    }

    /// Positions up to `done` are final (a finished step wrote them): the sequence's full blocks
    /// of known tokens join the prefix cache, and where every layer has a sliding window, the
    /// blocks before the window of the next position (`done`) go back to the pool, since no later
    /// token reaches back past it (a failed or unfinished step's positions never reach here).
    fn positions_done(pool: &mut BlockPool, s: &mut SeqState, done: usize, window: Option<usize>) {
        while (s.hashes.len() + 1) * BLOCK_TOKENS <= s.tokens.len().min(done) {
            let b = s.hashes.len();
            let h = block_hash(s.hashes.last().copied(), &s.tokens[b * BLOCK_TOKENS..(b + 1) * BLOCK_TOKENS]);
            if s.blocks[b] != FREED_BLOCK {
                pool.register(s.blocks[b], h);
            }
            s.hashes.push(h);
        }
        if let Some(w) = window {
            pool.release_before(s, (done + 1).saturating_sub(w));
        }
    }

    /// The tokens a sequence's cached positions were computed from (empty for imported KV).
    pub fn sequence_tokens(&self, seq: SeqId) -> Result<&[u32]> {
        self.seqs.get(&seq).map(|s| s.tokens.as_slice()).ok_or(Error::UnknownSequence(seq.0))
    }

    /// Decodes `seq` from `token` for up to `steps` steps, each step's input the token the step
    /// before sampled, which stays on the GPU: steps are submitted back to back, so the CPU
    /// records step i + 1 while the GPU runs step i and the GPU never waits for it. `on_token`
    /// gets each sampled token in order and ends the run by returning false; the step already
    /// in flight then is undone. Returns how many tokens `on_token` got. Sampling is the same as
    /// `step`'s, so the tokens are too. While profiling, the steps run one at a time.
    pub fn decode_run(
        &mut self,
        seq: SeqId,
        token: u32,
        steps: usize,
        sampling: SamplingParams,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<usize> {
        if self.in_flight > 0 {
            return Err(Error::InvalidRequest("a decode run cannot start while a submitted step is unfinished".into()));
        }
        if self.embed.is_none() || self.head.is_none() {
            return Err(Error::InvalidRequest("a decode run needs every layer, the embedding and the head".into()));
        }
        // The run's steps overwrite the samples a FROM_SAMPLED id would name.
        self.last_sampled = 0;
        if self.profiler.is_some() {
            let mut next = token;
            for i in 0..steps {
                next = self.step(&[StepInput { seq, tokens: vec![next], sample: Some(sampling) }])?[0]
                    .ok_or_else(|| Error::InvalidRequest("decode produced no token".into()))?;
                if !on_token(next)? {
                    return Ok(i + 1);
                }
            }
            return Ok(steps);
        }
        if token as usize >= self.config.vocab_size {
            return Err(Error::TokenOutOfRange { id: token, vocab: self.config.vocab_size });
        }
        let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        if state.ready.iter().any(|&r| r != state.len) {
            return Err(Error::KvImport(format!("sequence {} has an incomplete KV import", seq.0)));
        }
        let start = state.len;
        let end = start.checked_add(steps).filter(|&e| e <= self.context_length);
        let Some(end) = end else {
            return Err(Error::ContextOverflow { tokens: start.saturating_add(steps), max_new: 0, context: self.context_length });
        };
        if attention_chunks(end.saturating_sub(1), 1) > self.attention_budget {
            return Err(Error::InvalidRequest("the run's last step exceeds the attention budget".into()));
        }
        let q = self.ctx.queue.clone();
        let mut in_flight: Option<(wgpu::SubmissionIndex, usize)> = None;
        let mut delivered = 0;
        for i in 0..steps {
            let pos = start + i;
            // Blocks as the run goes, as single steps take them: a run that stops early holds no
            // more. Failing here leaves the sequence as it is (the step in flight is dropped).
            let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
            self.pool.reserve(state, pos + 1)?;
            let state = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
            let id = if i == 0 { token } else { FROM_SAMPLED };
            let infos = [TokenInfo { id, pos: pos as u32, slot: state.slot(pos), table_off: 0, chunk_off: 0 }];
            let params = SampleParams {
                temperature: sampling.temperature,
                top_k: sampling.top_k,
                top_p: sampling.top_p,
                seed: (sampling.seed ^ (sampling.seed >> 32)) as u32,
                counter: pos as u32 + 1,
                ..Default::default()
            };
            q.write_buffer(&self.bufs.step, 0, bytemuck::bytes_of(&Step { n_tokens: 1, n_sample: 1, ..Default::default() }));
            q.write_buffer(&self.bufs.tokens, 0, bytemuck::cast_slice(&infos));
            q.write_buffer(&self.bufs.tables, 0, bytemuck::cast_slice(&state.blocks));
            q.write_buffer(&self.bufs.sample_rows, 0, bytemuck::bytes_of(&0u32));
            q.write_buffer(&self.bufs.sample_params, 0, bytemuck::bytes_of(&params));
            let mut rec = Recorder::new(&self.ctx, None);
            self.record_forward(&mut rec, &infos, 1, 0, false, true, |_, _, _| {});
            let read = &self.bufs.chosen_reads[i % 2];
            rec.encoder().copy_buffer_to_buffer(&self.bufs.chosen, 0, read, 0, 4);
            let done = q.submit([rec.finish()]);
            let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
            state.len = pos + 1;
            state.ready.iter_mut().for_each(|r| *r = pos + 1);
            if i == 0 && state.tokens.len() == pos {
                state.tokens.push(token);
                Self::positions_done(&mut self.pool, state, pos, self.window_all);
            }
            if let Some((prev, slot)) = in_flight.replace((done.clone(), i % 2)) {
                // Step i - 1's token is step i's input, already read by the GPU. Whatever ends
                // the run here undoes step i.
                let sampled = match self.read_run_token(slot, prev) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = self.undo_last_position(seq, pos, done);
                        return Err(e);
                    }
                };
                delivered += 1;
                match on_token(sampled) {
                    Ok(true) => {}
                    Ok(false) => {
                        self.undo_last_position(seq, pos, done)?;
                        return Ok(delivered);
                    }
                    Err(e) => {
                        self.undo_last_position(seq, pos, done)?;
                        return Err(e);
                    }
                }
                let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
                // Steps before i are done; step i writes position `pos`.
                if state.tokens.len() == pos {
                    state.tokens.push(sampled);
                }
                Self::positions_done(&mut self.pool, state, pos, self.window_all);
            }
        }
        if let Some((last, slot)) = in_flight {
            let sampled = self.read_run_token(slot, last)?;
            let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
            let done = state.len;
            Self::positions_done(&mut self.pool, state, done, self.window_all);
            delivered += 1;
            on_token(sampled)?;
        }
        self.ctx.check_errors("decode run")?;
        Ok(delivered)
    }

    /// The token a `decode_run` step sampled, once the step is done.
    fn read_run_token(&self, slot: usize, done: wgpu::SubmissionIndex) -> Result<u32> {
        let bytes = self.ctx.read_mapped(&self.bufs.chosen_reads[slot], 4, done)?;
        Ok(bytemuck::pod_read_unaligned(&bytes[..4]))
    }

    /// Drops position `pos` (the last) of `seq` once the step computing it is done.
    fn undo_last_position(&mut self, seq: SeqId, pos: usize, done: wgpu::SubmissionIndex) -> Result<()> {
        self.ctx
            .device
            .poll(wgpu::PollType::Wait { submission_index: Some(done), timeout: None })
            .map_err(|e| Error::Gpu { op: "decode run".into(), reason: e.to_string() })?;
        let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        state.len = pos;
        state.ready.iter_mut().for_each(|r| *r = pos);
        state.tokens.truncate(pos);
        Self::positions_done(&mut self.pool, state, pos, self.window_all);
        self.ctx.check_errors("decode run")
    }

    /// Runs one step and returns the logits after every token of it, in step order (for tests
    /// and evaluation: a step of many sequences as the scheduler would make it).
    pub fn step_logits(&mut self, inputs: &[StepInput]) -> Result<Vec<Vec<f32>>> {
        let logits = self.run_step(inputs, true, None)?.logits.unwrap_or_default();
        Ok(logits.chunks(self.config.vocab_size).map(<[f32]>::to_vec).collect())
    }

    /// Appends `tokens` to `seq` and returns the logits after every one of them, `[tokens][vocab]`
    /// (for tests and evaluation; serving samples on the GPU instead).
    pub fn forward_logits(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(tokens.len());
        let mut done = 0;
        while done < tokens.len() {
            let start = self.sequence_len(seq)?;
            let n = Self::prefill_fit(start, tokens.len() - done, self.attention_budget, self.max_sample.min(self.max_tokens)).max(1);
            let input = StepInput { seq, tokens: tokens[done..done + n].to_vec(), sample: None };
            let logits = self.run_step(&[input], true, None)?.logits.unwrap_or_default();
            out.extend(logits.chunks(self.config.vocab_size).map(<[f32]>::to_vec));
            done += n;
        }
        Ok(out)
    }

    /// Writes imported K/V for one layer of `seq` at positions `kv.start..kv.start + kv.tokens`.
    /// Layers may arrive in any order; the sequence can be extended once every layer holds the range.
    pub fn import_kv(&mut self, seq: SeqId, kv: &KvLayer) -> Result<()> {
        let kv_dim = self.config.kv_dim();
        let ctx_len = self.context_length;
        let span = self.span.clone();
        let state = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        if !span.contains(&kv.layer) {
            return Err(Error::KvImport(format!("layer {} is not one of the layers {}..{} held here", kv.layer, span.start, span.end)));
        }
        let local = kv.layer - span.start;
        if kv.k.len() != kv.tokens * kv_dim || kv.v.len() != kv.tokens * kv_dim {
            return Err(Error::KvImport(format!("{} tokens need {} values each for K and V", kv.tokens, kv.tokens * kv_dim)));
        }
        if kv.start != state.ready[local] {
            return Err(Error::KvImport(format!("layer {} continues at position {}, got {}", kv.layer, state.ready[local], kv.start)));
        }
        let end = kv.start + kv.tokens;
        if end > ctx_len {
            return Err(Error::ContextOverflow { tokens: end, max_new: 0, context: ctx_len });
        }
        self.pool.reserve(state, end)?;
        let layer = &self.layers[local];
        let row_bytes = (kv_dim * self.kv_dtype.bytes()) as u64;
        let (k, v) = (self.kv_dtype.encode(&kv.k), self.kv_dtype.encode(&kv.v));
        let mut pos = kv.start;
        while pos < end {
            let run = (BLOCK_TOKENS - pos % BLOCK_TOKENS).min(end - pos);
            let offset = u64::from(state.slot(pos)) * row_bytes;
            let src = (pos - kv.start) as u64 * row_bytes..(pos - kv.start + run) as u64 * row_bytes;
            self.ctx.queue.write_buffer(&layer.k_cache, offset, &k[src.start as usize..src.end as usize]);
            self.ctx.queue.write_buffer(&layer.v_cache, offset, &v[src.start as usize..src.end as usize]);
            pos += run;
        }
        state.ready[local] = end;
        state.len = state.ready.iter().copied().min().unwrap_or(0);
        Ok(())
    }

    /// Records a step's forward pass into `rec` once its buffers are written: embed, every
    /// layer, the final norm, the head and, unless `all_logits`, sampling. `after_layer` may add
    /// commands after each layer (the K/V export).
    // The step's figures are distinct quantities; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    fn record_forward(
        &self,
        rec: &mut Recorder<'_>,
        infos: &[TokenInfo],
        n_sample: usize,
        tiles: u32,
        all_logits: bool,
        decode_only: bool,
        mut after_layer: impl FnMut(&mut Recorder<'_>, usize, &LayerOps),
    ) {
        let c = &self.config;
        let n_tokens = infos.len();
        let split = self.kernels.matmul_split();
        // How many tokens may take the 8-bit matvec: its largest shape's, and up to Q8_TOKENS
        // for decode tokens of as many sequences (prompt chunks keep the GEMM's f16 inputs,
        // whose logits are closer to exact); none on steps in attention tiles, whose
        // attention_coop writes no 8-bit copy.
        let largest = MATVEC_TOKENS[MATVEC_TOKENS.len() - 1] as usize;
        let q8_tokens = match (tiles > 0, decode_only) {
            (true, _) => 0,
            (false, true) => Q8_TOKENS,
            (false, false) => largest,
        };
        let last_pos = infos.iter().map(|i| i.pos).max().unwrap_or(0);
        let attention_chunks = (last_pos + 1).div_ceil(ATTENTION_CHUNK);
        // Positions attended over by the step's tokens, for the profile's figures.
        let attended: u64 = infos.iter().map(|i| u64::from(i.pos) + 1).sum();
        let t = n_tokens as u64;
        // A stage after the first finds its input in x already (`submit_with` wrote it).
        if let Some((pipeline, groups)) = &self.embed {
            for bg in groups {
                let work = Work::of(Kernel::Embed, t * c.hidden_size as u64 * 4, 0);
                rec.dispatch(work, pipeline, bg, [wg(c.hidden_size, 64), n_tokens as u32, 1]);
            }
        }
        let d = c.hidden_size as u64;
        for (l, layer) in self.layers.iter().enumerate() {
            layer.record(rec, n_tokens, attended, attention_chunks, tiles, split, q8_tokens);
            after_layer(rec, l, layer);
        }
        let Some(h) = &self.head else { return };
        let s = n_sample as u64;
        rec.dispatch(Work::of(Kernel::RmsNorm, s * d * 8, 3 * s * d), &h.norm_gather, &h.norm_out, [n_sample as u32, 1, 1]);
        // The final norm writes 8-bit rows for up to Q8_TOKENS sampled rows, one a sequence
        // unless every row is a prompt's (`forward_logits`).
        let head_q8 = if all_logits { largest } else { Q8_TOKENS };
        h.head.record(rec, n_sample, split, head_q8, 1);
        if !all_logits && n_sample > 0 {
            let work = Work::of(Kernel::Sample, s * c.vocab_size as u64 * 4, 0);
            rec.dispatch(work, &h.sample_pipeline, &h.sample, [n_sample as u32, 1, 1]);
        }
    }

    fn run_step(&mut self, inputs: &[StepInput], all_logits: bool, sink: Option<(&[SeqId], &mut dyn KvSink)>) -> Result<StepOutput> {
        let pending = self.submit_with(inputs, all_logits, sink, false, None)?;
        self.finish_with(pending)
    }

    /// The layers this engine holds (`EngineConfig::layers`).
    pub fn span(&self) -> std::ops::Range<usize> {
        self.span.clone()
    }

    /// Whether the span ends with the model's last layer, so steps sample.
    pub fn holds_head(&self) -> bool {
        self.head.is_some()
    }

    /// Whether the engine holds every layer (and so runs whole requests).
    pub fn holds_all(&self) -> bool {
        self.embed.is_some() && self.head.is_some()
    }

    /// Runs one step of a stage of a chain: where the span starts after layer 0, `hidden` holds
    /// its first layer's input (the residual stream the stage before left, `[tokens][hidden]` in
    /// step order); where it ends before the last layer, the output carries the residual stream
    /// after its last layer instead of samples, and no input may sample. An engine holding every
    /// layer runs it as `step` does. The token ids name the positions (they key the prefix cache
    /// and the sampler's counter) whichever stage runs them.
    pub fn step_span(&mut self, inputs: &[StepInput], hidden: Option<&[f32]>) -> Result<StepOutput> {
        let pending = self.submit_with(inputs, false, None, false, Some(hidden))?;
        self.finish_with(pending)
    }

    /// Validates, records and submits a step, hands `sink` the exported layers (waiting for
    /// each), and advances its sequences; the sampled ids or logits are read by `finish_with`.
    /// Only `submit_step` takes `FROM_SAMPLED` ids (`from_sampled`); elsewhere they are ids out
    /// of range like any other.
    fn submit_with(
        &mut self,
        inputs: &[StepInput],
        all_logits: bool,
        sink: Option<(&[SeqId], &mut dyn KvSink)>,
        from_sampled: bool,
        stage: Option<Option<&[f32]>>,
    ) -> Result<PendingStep> {
        if self.in_flight >= self.bufs.chosen_reads.len() {
            return Err(Error::InvalidRequest("two steps are in flight: finish one first".into()));
        }
        if self.in_flight > 0 && self.profiler.is_some() {
            return Err(Error::InvalidRequest("while profiling, steps run one at a time".into()));
        }
        let (export_only, mut sink) = match sink {
            Some((only, sink)) => (only, Some(sink)),
            None => (&[][..], None),
        };
        let c = &self.config;
        let n_tokens: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        if n_tokens == 0 {
            return Err(Error::InvalidRequest("a step needs at least one token".into()));
        }
        if n_tokens > self.max_tokens {
            return Err(Error::InvalidRequest(format!("{n_tokens} tokens exceed the step budget of {}", self.max_tokens)));
        }
        let n_sample = if all_logits { n_tokens } else { inputs.iter().filter(|i| i.sample.is_some()).count() };
        let (first, last) = (self.embed.is_some(), self.head.is_some());
        let span = &self.span;
        if !last && n_sample > 0 {
            return Err(Error::InvalidRequest(format!(
                "layers {}..{} end before the model's last ({}): this stage cannot sample",
                span.start, span.end, c.n_layers
            )));
        }
        let hidden = stage.flatten();
        match (first, hidden) {
            (true, Some(_)) => {
                return Err(Error::InvalidRequest("the first stage embeds its tokens: it takes no hidden states".into()));
            }
            (false, None) => {
                return Err(Error::InvalidRequest(format!(
                    "layers {}..{} start after layer 0: the step needs the hidden states before layer {}",
                    span.start, span.end, span.start
                )));
            }
            (false, Some(h)) if h.len() != n_tokens * c.hidden_size => {
                return Err(Error::InvalidRequest(format!("{} hidden values for {n_tokens} tokens of width {}", h.len(), c.hidden_size)));
            }
            _ => {}
        }
        if !last && stage.is_none() {
            return Err(Error::InvalidRequest(format!(
                "layers {}..{} end before the model's last: run them with step_span",
                span.start, span.end
            )));
        }
        if n_sample > self.max_sample {
            return Err(Error::InvalidRequest(format!("{n_sample} logit rows exceed the limit of {}", self.max_sample)));
        }
        // Validate everything and reserve blocks before touching any state.
        let mut seen = std::collections::HashSet::new();
        let mut needed_blocks = 0;
        let mut chunks = 0;
        for input in inputs {
            let s = self.seqs.get(&input.seq).ok_or(Error::UnknownSequence(input.seq.0))?;
            if !seen.insert(input.seq) {
                return Err(Error::InvalidRequest(format!("sequence {} appears twice in one step", input.seq.0)));
            }
            if input.tokens.is_empty() {
                return Err(Error::InvalidRequest(format!("sequence {} has no tokens in this step", input.seq.0)));
            }
            for &id in &input.tokens {
                let row = (id & !FROM_SAMPLED) as usize;
                let sampled = from_sampled && id & FROM_SAMPLED != 0;
                if !sampled && id as usize >= c.vocab_size {
                    return Err(Error::TokenOutOfRange { id, vocab: c.vocab_size });
                }
                if sampled && row >= self.last_sampled {
                    return Err(Error::InvalidRequest(format!(
                        "sequence {} takes sampled row {row} of a step that sampled {}",
                        input.seq.0, self.last_sampled
                    )));
                }
            }
            if s.ready.iter().any(|&r| r != s.len) {
                return Err(Error::KvImport(format!("sequence {} has an incomplete KV import", input.seq.0)));
            }
            let end = s.len + input.tokens.len();
            if end > self.context_length {
                return Err(Error::ContextOverflow { tokens: end, max_new: 0, context: self.context_length });
            }
            needed_blocks += end.div_ceil(BLOCK_TOKENS).saturating_sub(s.blocks.len());
            chunks += attention_chunks(s.len, input.tokens.len());
        }
        if chunks > self.attention_budget {
            return Err(Error::InvalidRequest(format!(
                "{chunks} attention chunks exceed the step budget of {} (split the prefill)",
                self.attention_budget
            )));
        }
        if needed_blocks > self.pool.available() {
            return Err(Error::OutOfKvBlocks { needed: needed_blocks, free: self.pool.available() });
        }

        let mut infos = Vec::with_capacity(n_tokens);
        let mut tables: Vec<u32> = Vec::new();
        let mut rows = Vec::with_capacity(n_sample);
        let mut params = Vec::with_capacity(n_sample);
        let mut exports = Vec::new();
        let mut chunk_off = 0;
        for input in inputs {
            let state = self.seqs.get_mut(&input.seq).ok_or(Error::UnknownSequence(input.seq.0))?;
            let start = state.len;
            let end = start + input.tokens.len();
            self.pool.reserve(state, end)?;
            let table_off = tables.len() as u32;
            tables.extend_from_slice(&state.blocks);
            for (i, &id) in input.tokens.iter().enumerate() {
                let pos = start + i;
                if all_logits {
                    rows.push(infos.len() as u32);
                }
                infos.push(TokenInfo { id, pos: pos as u32, slot: state.slot(pos), table_off, chunk_off });
                chunk_off += (pos as u32 + ATTENTION_CHUNK) / ATTENTION_CHUNK;
            }
            if let (Some(sp), false) = (input.sample, all_logits) {
                rows.push(infos.len() as u32 - 1);
                params.push(SampleParams {
                    temperature: sp.temperature,
                    top_k: sp.top_k,
                    top_p: sp.top_p,
                    seed: (sp.seed ^ (sp.seed >> 32)) as u32,
                    counter: end as u32,
                    ..Default::default()
                });
            }
            if sink.is_some() && export_only.contains(&input.seq) {
                exports.push((input.seq, start, end, state.clone()));
            }
        }
        if tables.len() > self.max_table {
            return Err(Error::InvalidRequest(format!("{} block-table entries exceed {}", tables.len(), self.max_table)));
        }
        let q = &self.ctx.queue;
        q.write_buffer(
            &self.bufs.step,
            0,
            bytemuck::bytes_of(&Step { n_tokens: n_tokens as u32, n_sample: n_sample as u32, ..Default::default() }),
        );
        q.write_buffer(&self.bufs.tokens, 0, bytemuck::cast_slice(&infos));
        q.write_buffer(&self.bufs.tables, 0, bytemuck::cast_slice(&tables));
        if !rows.is_empty() {
            q.write_buffer(&self.bufs.sample_rows, 0, bytemuck::cast_slice(&rows));
        }
        if !params.is_empty() {
            q.write_buffer(&self.bufs.sample_params, 0, bytemuck::cast_slice(&params));
        }
        let tiles = if self.takes_tiles { attention_tiles(inputs.iter().map(|i| i.tokens.len())) } else { Vec::new() };
        if !tiles.is_empty() {
            q.write_buffer(&self.bufs.attention_tiles, 0, bytemuck::cast_slice(&tiles));
        }
        if let Some(h) = hidden {
            q.write_buffer(&self.x, 0, bytemuck::cast_slice(h));
        }

        let record_start = std::time::Instant::now();
        let kv_row = (c.kv_dim() * self.kv_dtype.bytes()) as u64;
        let export_tokens: usize = exports.iter().map(|(_, s, e, _)| e - s).sum();
        let exporting = sink.is_some() && !exports.is_empty();
        let mut staged = Vec::new();
        let mut profiler = self.profiler.take();
        let mut rec = Recorder::new(&self.ctx, profiler.as_mut());
        let decode_only = inputs.iter().all(|i| i.tokens.len() == 1);
        self.record_forward(&mut rec, &infos, n_sample, tiles.len() as u32, all_logits, decode_only, |rec, l, layer| {
            if exporting {
                // Copy this layer's new K/V out and submit, so the host can take layer l while the
                // GPU computes layer l + 1.
                let bytes = export_tokens as u64 * kv_row;
                let k_stage = self.ctx.readback(&format!("k_export.{l}"), bytes);
                let v_stage = self.ctx.readback(&format!("v_export.{l}"), bytes);
                let mut dst = 0;
                for (_, start, end, state) in &exports {
                    dst = copy_kv_rows(rec.encoder(), layer, state, *start..*end, (&k_stage, &v_stage), dst, kv_row);
                }
                let done = rec.submit(q);
                staged.push((k_stage, v_stage, done));
            }
        });
        let result_bytes = if all_logits { (n_sample * c.vocab_size * 4) as u64 } else { (n_sample * 4) as u64 };
        let logits_read = all_logits.then(|| self.ctx.readback("logits_read", result_bytes));
        let hidden_bytes = (n_tokens * c.hidden_size * 4) as u64;
        let hidden_read = (!last).then(|| self.ctx.readback("hidden_read", hidden_bytes));
        if let Some(buf) = &hidden_read {
            rec.encoder().copy_buffer_to_buffer(&self.x, 0, buf, 0, hidden_bytes);
        }
        match &logits_read {
            Some(buf) => rec.encoder().copy_buffer_to_buffer(&self.bufs.logits, 0, buf, 0, result_bytes),
            None if n_sample > 0 => {
                rec.encoder().copy_buffer_to_buffer(&self.bufs.chosen, 0, &self.bufs.chosen_reads[self.next_read], 0, result_bytes)
            }
            None => {}
        }
        let dispatches = rec.dispatches();
        let done = q.submit([rec.finish()]);
        self.profiler = profiler;
        let record = record_start.elapsed();

        if let Some(sink) = sink.as_mut() {
            let kv_dim = c.kv_dim();
            for (l, (k_stage, v_stage, idx)) in staged.into_iter().enumerate() {
                let bytes = export_tokens as u64 * kv_row;
                let k = self.kv_dtype.decode(&self.ctx.read_mapped(&k_stage, bytes, idx.clone())?);
                let v = self.kv_dtype.decode(&self.ctx.read_mapped(&v_stage, bytes, idx)?);
                let mut off = 0;
                for (seq, start, end, _) in &exports {
                    let n = (end - start) * kv_dim;
                    let layer = KvLayer {
                        layer: self.span.start + l,
                        start: *start,
                        tokens: end - start,
                        k: k[off..off + n].to_vec(),
                        v: v[off..off + n].to_vec(),
                    };
                    sink.layer_ready(*seq, layer)?;
                    off += n;
                }
            }
        }

        // The step's positions count from here: a step submitted next extends them. Ids it takes
        // from this one's samples are recorded when those are read (`finish_with`).
        for input in inputs {
            if let Some(s) = self.seqs.get_mut(&input.seq) {
                if s.tokens.len() == s.len && input.tokens.iter().all(|&id| id & FROM_SAMPLED == 0) {
                    s.tokens.extend_from_slice(&input.tokens);
                }
                s.len += input.tokens.len();
                s.ready.iter_mut().for_each(|r| *r = s.len);
            }
        }
        let read = self.next_read;
        self.next_read = (read + 1) % self.bufs.chosen_reads.len();
        self.in_flight += 1;
        self.last_sampled = if all_logits { 0 } else { n_sample };
        let samples =
            inputs.iter().map(|i| (i.seq, self.seqs.get(&i.seq).map_or(0, |s| s.len), i.sample.is_some() && !all_logits)).collect();
        Ok(PendingStep {
            done,
            read,
            n_sample,
            logits: logits_read.map(|b| (b, result_bytes)),
            hidden: hidden_read.map(|b| (b, hidden_bytes)),
            inputs: samples,
            record,
            dispatches,
        })
    }

    /// Waits for a submitted step and reads its sampled ids (or its logits).
    fn finish_with(&mut self, p: PendingStep) -> Result<StepOutput> {
        self.in_flight -= 1;
        let wait_start = std::time::Instant::now();
        let mut out = StepOutput::default();
        if let Some((buf, bytes)) = &p.logits {
            out.logits = Some(bytemuck::pod_collect_to_vec(&self.ctx.read_mapped(buf, *bytes, p.done.clone())?));
            out.tokens = vec![None; p.inputs.len()];
        } else if p.n_sample > 0 {
            let bytes = self.ctx.read_mapped(&self.bufs.chosen_reads[p.read], (p.n_sample * 4) as u64, p.done.clone())?;
            let mut it = bytemuck::pod_collect_to_vec::<u8, u32>(&bytes).into_iter();
            out.tokens = p.inputs.iter().map(|&(_, _, samples)| if samples { it.next() } else { None }).collect();
        } else if let Some((buf, bytes)) = &p.hidden {
            out.hidden = Some(bytemuck::pod_collect_to_vec(&self.ctx.read_mapped(buf, *bytes, p.done.clone())?));
            out.tokens = vec![None; p.inputs.len()];
        } else {
            self.ctx
                .device
                .poll(wgpu::PollType::Wait { submission_index: Some(p.done.clone()), timeout: None })
                .map_err(|e| Error::Gpu { op: "step".into(), reason: e.to_string() })?;
            out.tokens = vec![None; p.inputs.len()];
        }
        if let Some(profiler) = self.profiler.as_mut() {
            profiler.collect(&self.ctx, p.done)?;
        }
        self.last_timing = StepTiming { record: p.record, wait: wait_start.elapsed(), dispatches: p.dispatches };
        self.ctx.check_errors("step")?;
        for (&(seq, end, _), token) in p.inputs.iter().zip(&out.tokens) {
            let Some(s) = self.seqs.get_mut(&seq) else { continue };
            // A sampled id that a later step already took on the GPU is the token of its position.
            if let Some(token) = token
                && s.tokens.len() == end
                && s.len > end
            {
                s.tokens.push(*token);
            }
            Self::positions_done(&mut self.pool, s, end, self.window_all);
        }
        Ok(out)
    }
}

/// Records copies of a sequence's cached K and V rows for `positions` (block by block: the
/// cache is paged) into `stages` from byte `dst`; returns where the next rows go.
fn copy_kv_rows(
    enc: &mut wgpu::CommandEncoder,
    layer: &LayerOps,
    state: &SeqState,
    positions: std::ops::Range<usize>,
    stages: (&wgpu::Buffer, &wgpu::Buffer),
    mut dst: u64,
    kv_row: u64,
) -> u64 {
    let mut pos = positions.start;
    while pos < positions.end {
        let run = (BLOCK_TOKENS - pos % BLOCK_TOKENS).min(positions.end - pos);
        let src = u64::from(state.slot(pos)) * kv_row;
        enc.copy_buffer_to_buffer(&layer.k_cache, src, stages.0, dst, run as u64 * kv_row);
        enc.copy_buffer_to_buffer(&layer.v_cache, src, stages.1, dst, run as u64 * kv_row);
        dst += run as u64 * kv_row;
        pos += run;
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks_by_token(start: usize, n: usize) -> usize {
        (start..start + n).map(|p| (p + 1).div_ceil(ATTENTION_CHUNK as usize)).sum()
    }

    #[test]
    fn attention_tiles_cover_each_sequence_in_runs_of_its_own_tokens() {
        assert_eq!(attention_tiles([64, 16].into_iter()), vec![[0, 64], [64, 16]]);
        assert_eq!(attention_tiles([150, 20].into_iter()), vec![[0, 64], [64, 64], [128, 22], [150, 20]]);
        assert!(attention_tiles([300, 1].into_iter()).is_empty(), "a decode token attends alone");
        assert!(attention_tiles(std::iter::empty()).is_empty());
    }

    #[test]
    fn attention_chunks_counts_every_tokens_prefix() {
        for start in [0, 1, 31, 32, 33, 100, 1000] {
            for n in [0, 1, 5, 31, 32, 64, 257] {
                assert_eq!(attention_chunks(start, n), chunks_by_token(start, n), "start {start} n {n}");
            }
        }
    }

    #[test]
    fn prefill_fit_takes_the_most_tokens_within_both_budgets() {
        assert_eq!(Engine::prefill_fit(0, 1000, usize::MAX, 256), 256);
        assert_eq!(Engine::prefill_fit(0, 10, usize::MAX, 256), 10);
        let fit = Engine::prefill_fit(4000, 1000, 2000, 256);
        assert!(fit < 256 && attention_chunks(4000, fit) <= 2000 && attention_chunks(4000, fit + 1) > 2000, "fit {fit}");
        assert_eq!(Engine::prefill_fit(4000, 1000, 0, 256), 0);
    }
}
