//! What one transformer layer records into a step: a list of ops (kernel dispatches and
//! matmuls) that a model family builds once at load from the layer's tensors, with the
//! builder's helpers for the ops families share. The engine records every layer's ops in order;
//! it does not know which family built them.

use std::collections::HashMap;

use tandem_shaders::{ATTENTION_CHUNK, ATTENTION_TILE_ROWS, Kernel, ShaderCaps, attention_tile_head_groups};

use crate::config::{ModelConfig, RopeLayout};
use crate::device_weights::{DeviceMatrix, stack_layout, upload_vector};
use crate::engine::{EngineConfig, GluTarget, MatmulOp, RopeTarget, takes_fused_matvec, takes_merging_matvec};
use crate::error::Result;
use crate::gpu::GpuContext;
use crate::kernels::{Kernels, SILU_MUL_TILE};
use crate::kv::{BLOCK_TOKENS, KvDtype};
use crate::model::{HostModel, layer_tensor};
use crate::recorder::{Recorder, Work};

/// Whether the engine takes attention_coop.wgsl for steps whose sequences each bring
/// `ATTENTION_TILE_MIN` tokens or more: fast mode (it is not batch-invariant), the matrix units,
/// an f16 cache, and heads 64, 128 or 256 wide (the kernel's fragments).
pub fn takes_attention_tiles(caps: ShaderCaps, engine: &EngineConfig, config: &ModelConfig) -> bool {
    !engine.deterministic && caps.has_coop_matrix() && engine.kv_dtype == KvDtype::F16 && matches!(config.head_dim, 64 | 128 | 256)
}

/// The workgroups of a dispatch, by the step's token count.
#[derive(Clone, Copy, Debug)]
pub enum Grid {
    /// `[x, tokens, 1]`.
    Tokens(u32),
    /// `[x, tokens, 1]`, only on steps whose gate/up matvec gated its output itself
    /// (`LayerBuilder::gated`, `takes_fused_matvec`).
    GatedTokens(u32),
    /// `[tokens, 1, 1]`: a workgroup per row.
    Rows,
    /// `[tokens, 1, 1]`, only on steps whose matvec after it norms its input itself
    /// (`LayerBuilder::normed`, `takes_fused_matvec`).
    NormedRows,
    /// `[heads, tokens, attention chunks]`, on steps without attention tiles.
    Attention(u32),
    /// `[x, attention tiles, attention chunks]`, on steps with them (attention_coop.wgsl: x is
    /// `attention_tile_head_groups`).
    AttentionTiles(u32),
    /// `[heads, tokens, 1]`, only on steps with more than one attention chunk per token (with
    /// one, attention writes its output itself).
    Merge(u32),
    /// `[heads, tokens, 1]`, only on steps with more than one attention chunk per token whose
    /// output projection does not merge them itself (`LayerBuilder::attended`,
    /// `takes_merging_matvec`).
    MergeUnlessMatvec(u32),
    /// `[x, tokens, 1]`, only on steps whose Q/K/V matmul did not do this work itself
    /// (`MatmulOp::rotate`).
    RopeKv(u32),
}

/// Bytes and operations of a dispatch, per token and per attended position.
#[derive(Clone, Copy, Debug)]
pub struct Cost {
    pub kernel: Kernel,
    pub bytes_per_token: u64,
    pub flops_per_token: u64,
    pub bytes_per_attended: u64,
    pub flops_per_attended: u64,
}

impl Cost {
    fn per_token(kernel: Kernel, bytes: u64, flops: u64) -> Self {
        Cost { kernel, bytes_per_token: bytes, flops_per_token: flops, bytes_per_attended: 0, flops_per_attended: 0 }
    }
}

/// A kernel dispatch with its bindings made at load.
pub struct Dispatch {
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group: wgpu::BindGroup,
    pub cost: Cost,
    pub grid: Grid,
}

/// One op of a layer.
pub enum LayerOp {
    Dispatch(Dispatch),
    Matmul(MatmulOp),
}

impl LayerOp {
    /// Whether this is `LayerBuilder::rope_kv`'s dispatch, the one a rotating Q/K/V matvec
    /// stands in for (`LayerBuilder::rotating`).
    pub fn is_plain_rope(&self) -> bool {
        matches!(self, LayerOp::Dispatch(Dispatch { grid: Grid::RopeKv(_), .. }))
    }
}

/// A layer's ops and its K/V cache.
pub struct LayerOps {
    pub ops: Vec<LayerOp>,
    pub k_cache: wgpu::Buffer,
    pub v_cache: wgpu::Buffer,
}

impl LayerOps {
    /// Records the layer for a step of `n_tokens` tokens attending over `attended` positions in
    /// all, in `chunks` attention chunks at most per token, and in `tiles` attention tiles (0:
    /// attention a token at a time); steps of up to `q8_tokens` tokens take the 8-bit matvec.
    // The step's figures are distinct quantities; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn record(&self, rec: &mut Recorder<'_>, n_tokens: usize, attended: u64, chunks: u32, tiles: u32, split: u32, q8_tokens: usize) {
        let t = n_tokens as u64;
        let mut rotated = false;
        for op in &self.ops {
            match op {
                LayerOp::Matmul(m) => rotated |= m.record(rec, n_tokens, split, q8_tokens, chunks),
                LayerOp::Dispatch(d) => {
                    let c = d.cost;
                    let work = Work::of(
                        c.kernel,
                        t * c.bytes_per_token + attended * c.bytes_per_attended,
                        t * c.flops_per_token + attended * c.flops_per_attended,
                    );
                    let groups = match d.grid {
                        Grid::Tokens(x) => [x, n_tokens as u32, 1],
                        Grid::GatedTokens(_) if takes_fused_matvec(n_tokens, q8_tokens) => continue,
                        Grid::GatedTokens(x) => [x, n_tokens as u32, 1],
                        Grid::Rows => [n_tokens as u32, 1, 1],
                        Grid::NormedRows if takes_fused_matvec(n_tokens, q8_tokens) => continue,
                        Grid::NormedRows => [n_tokens as u32, 1, 1],
                        Grid::Attention(_) if tiles > 0 => continue,
                        Grid::Attention(heads) => [heads, n_tokens as u32, chunks],
                        Grid::AttentionTiles(_) if tiles == 0 => continue,
                        Grid::AttentionTiles(heads) => [heads, tiles, chunks],
                        Grid::Merge(_) if chunks <= 1 => continue,
                        Grid::Merge(heads) => [heads, n_tokens as u32, 1],
                        Grid::MergeUnlessMatvec(_) if chunks <= 1 || takes_merging_matvec(n_tokens, q8_tokens, chunks) => continue,
                        Grid::MergeUnlessMatvec(heads) => [heads, n_tokens as u32, 1],
                        Grid::RopeKv(_) if rotated => continue,
                        Grid::RopeKv(x) => [x, n_tokens as u32, 1],
                    };
                    rec.dispatch(work, &d.pipeline, &d.bind_group, groups);
                }
            }
        }
    }
}

/// The engine's buffers a layer's ops bind (activations sized for a whole step).
pub struct Activations {
    pub step: wgpu::Buffer,
    pub tokens: wgpu::Buffer,
    pub tables: wgpu::Buffer,
    pub sample_rows: wgpu::Buffer,
    /// The residual stream, `[tokens][hidden]`.
    pub x: wgpu::Buffer,
    /// A normed copy of `x`, the projections' input.
    pub xn: wgpu::Buffer,
    pub xn_q8: Option<wgpu::Buffer>,
    pub qkv: wgpu::Buffer,
    pub attn_out: wgpu::Buffer,
    pub attn_q8: Option<wgpu::Buffer>,
    pub gate_up: wgpu::Buffer,
    pub ffn_q8: Option<wgpu::Buffer>,
    /// A block's output before its post-norm (families with norms after attention and MLP).
    pub y: wgpu::Buffer,
    pub partials: wgpu::Buffer,
    /// The step's attention tiles (first token, rows), where it has them.
    pub attention_tiles: wgpu::Buffer,
    /// Bound where a producer writes no 8-bit activations.
    pub no_q8: wgpu::Buffer,
}

/// What families build a layer's ops from.
pub struct LayerBuilder<'a> {
    pub ctx: &'a GpuContext,
    pub kernels: &'a Kernels,
    pub model: &'a HostModel,
    pub config: &'a ModelConfig,
    pub engine: &'a EngineConfig,
    pub act: &'a Activations,
    /// RoPE tables by `ModelConfig::layer_rope_key`.
    pub rope_tables: &'a HashMap<(u64, bool), wgpu::Buffer>,
    pub layer: usize,
    pub k_cache: &'a wgpu::Buffer,
    pub v_cache: &'a wgpu::Buffer,
}

impl LayerBuilder<'_> {
    fn q8_out<'b>(&'b self, b: &'b Option<wgpu::Buffer>) -> &'b wgpu::Buffer {
        b.as_ref().unwrap_or(&self.act.no_q8)
    }

    /// A vector tensor of this layer, as f32.
    pub fn vector(&self, what: &str) -> Result<wgpu::Buffer> {
        Ok(upload_vector(self.ctx, self.model.tensor(&layer_tensor(self.layer, what))?))
    }

    /// RMSNorm of `x` by this layer's `what` weights into `xn` (with its 8-bit copy), or, with
    /// `add_from`, of that buffer added into `x` (a post-norm before the residual sum).
    pub fn norm(&self, what: &str, add_from: Option<&wgpu::Buffer>) -> Result<LayerOp> {
        self.norm_by(what, &self.vector(what)?, add_from)
    }

    /// The RMSNorm `what` of `x` into `xn` followed by `consumers`, the ops that read `xn`. Where
    /// every one is a matmul with an 8-bit matvec twin that norms its input itself
    /// (`MatmulOp::take_norm`; Q/K/V in two formats are two), one-token steps take those twins
    /// and skip the norm's dispatch: each recomputes the norm of one row, which costs less than
    /// a dispatch.
    pub fn normed(&self, what: &str, mut consumers: Vec<LayerOp>) -> Result<Vec<LayerOp>> {
        let g = self.vector(what)?;
        let mut norm = self.norm_by(what, &g, None)?;
        let all_can = consumers.iter().all(|op| matches!(op, LayerOp::Matmul(m) if m.can_take_norm()));
        if let (true, Some(_), LayerOp::Dispatch(d)) = (all_can && !consumers.is_empty(), &self.act.xn_q8, &mut norm) {
            for op in &mut consumers {
                if let LayerOp::Matmul(m) = op {
                    m.take_norm(self.kernels, &self.act.x, &g, self.config.rms_eps)?;
                }
            }
            d.grid = Grid::NormedRows;
        }
        let mut ops = vec![norm];
        ops.extend(consumers);
        Ok(ops)
    }

    fn norm_by(&self, what: &str, g: &wgpu::Buffer, add_from: Option<&wgpu::Buffer>) -> Result<LayerOp> {
        let c = self.config;
        let d = c.hidden_size as u64;
        let a = self.act;
        let (input, out, q8) = match add_from {
            None => (&a.x, &a.xn, &a.xn_q8),
            Some(from) => (from, &a.x, &None),
        };
        let pipeline = self.kernels.pipeline(
            Kernel::RmsNorm,
            None,
            &[
                ("DIM", d as f64),
                ("EPS", f64::from(c.rms_eps)),
                ("GATHER", 0.0),
                ("Q8", f64::from(u8::from(q8.is_some()))),
                ("ADD", f64::from(u8::from(add_from.is_some()))),
            ],
        )?;
        let bind_group = self.kernels.bind_group(Kernel::RmsNorm, what, &[&a.step, input, g, &a.sample_rows, out, self.q8_out(q8)]);
        let bytes = if add_from.is_some() { d * 12 } else { d * 8 };
        Ok(LayerOp::Dispatch(Dispatch { pipeline, bind_group, cost: Cost::per_token(Kernel::RmsNorm, bytes, 3 * d), grid: Grid::Rows }))
    }

    fn matrix(&self, what: &str) -> Result<DeviceMatrix> {
        DeviceMatrix::upload(self.ctx, self.model.tensor(&layer_tensor(self.layer, what))?)
    }

    // The buffers and flags are distinct roles of one matmul.
    fn matmul_op(
        &self,
        m: &DeviceMatrix,
        x: &wgpu::Buffer,
        x_q8: &Option<wgpu::Buffer>,
        y: &wgpu::Buffer,
        strides: (usize, usize, usize),
        accumulate: bool,
    ) -> Result<LayerOp> {
        let op =
            MatmulOp::new(self.kernels, m, &self.act.step, x, y, strides, x_q8.as_ref(), accumulate, false, self.engine.deterministic)?;
        Ok(LayerOp::Matmul(op))
    }

    /// Matrices that read `xn` and write side by side into `y` (rows `y_stride` wide): each run
    /// of neighbours that share a device layout (`stack_layout`: Gemma's Q5_0 Q and K take its
    /// Q8_0 V's) becomes one stacked matrix, one dispatch.
    pub fn side_by_side(&self, names: &[&str], y: &wgpu::Buffer, y_stride: usize) -> Result<Vec<LayerOp>> {
        let ts = names.iter().map(|n| self.model.tensor(&layer_tensor(self.layer, n))).collect::<Result<Vec<_>>>()?;
        let x_stride = ts[0].cols();
        let (x, x_q8) = (&self.act.xn, &self.act.xn_q8);
        let mut offset = 0;
        let mut ops = Vec::new();
        for run in ts.chunk_by(|a, b| stack_layout([a.format, b.format]).is_some() && a.cols() == b.cols()) {
            let m = DeviceMatrix::upload_stacked(self.ctx, run)?;
            ops.push(self.matmul_op(&m, x, x_q8, y, (x_stride, y_stride, offset), false)?);
            offset += m.rows;
        }
        Ok(ops)
    }

    /// Q, K and V into `qkv`.
    pub fn qkv(&self) -> Result<Vec<LayerOp>> {
        self.side_by_side(&["attn_q", "attn_k", "attn_v"], &self.act.qkv, self.config.qkv_dim())
    }

    /// Q, K and V into `qkv` from one fused matrix (`what`, Q's rows then K's then V's).
    pub fn qkv_fused(&self, what: &str) -> Result<Vec<LayerOp>> {
        self.side_by_side(&[what], &self.act.qkv, self.config.qkv_dim())
    }

    /// This layer's Q, K and V biases (`attn_q.bias` …) added to `qkv`.
    pub fn qkv_bias(&self) -> Result<LayerOp> {
        let c = self.config;
        let mut bias = Vec::with_capacity(c.qkv_dim());
        for what in ["attn_q", "attn_k", "attn_v"] {
            let t = self.model.tensor(&format!("blk.{}.{what}.bias", self.layer))?;
            bias.extend(crate::cpu_ref::dequantize_row(t.format, t.bytes.as_slice(), t.cols()));
        }
        let b = self.ctx.storage_init("qkv_bias", bytemuck::cast_slice(&bias));
        let width = c.qkv_dim();
        let pipeline = self.kernels.pipeline(Kernel::AddBias, None, &[("WIDTH", width as f64)])?;
        let bind_group = self.kernels.bind_group(Kernel::AddBias, "qkv_bias", &[&self.act.step, &self.act.qkv, &b]);
        Ok(LayerOp::Dispatch(Dispatch {
            pipeline,
            bind_group,
            cost: Cost::per_token(Kernel::AddBias, width as u64 * 12, width as u64),
            grid: Grid::Tokens(width.div_ceil(64) as u32),
        }))
    }

    /// Attention (`attention`) and the output projection after it, added into the residual `x`
    /// or written to `y` for a post-norm. Where the projection has an 8-bit matvec twin that
    /// merges attention's chunks itself (`MatmulOp::take_merge`), one-token steps of a few chunks
    /// take it and skip the merge's dispatch.
    pub fn attended(&self, into_residual: bool) -> Result<Vec<LayerOp>> {
        let c = self.config;
        let mut ops = self.attention()?;
        let mut out = self.attn_output(into_residual)?;
        if let (Some(LayerOp::Dispatch(merge)), LayerOp::Matmul(m), Some(_)) = (ops.last_mut(), &mut out, &self.act.attn_q8)
            && let Grid::Merge(heads) = merge.grid
            && m.take_merge(self.kernels, &self.act.partials, &self.act.tokens, [c.n_heads, c.head_dim])?
        {
            merge.grid = Grid::MergeUnlessMatvec(heads);
        }
        ops.push(out);
        Ok(ops)
    }

    fn attn_output(&self, into_residual: bool) -> Result<LayerOp> {
        let c = self.config;
        let y = if into_residual { &self.act.x } else { &self.act.y };
        self.matmul_op(
            &self.matrix("attn_output")?,
            &self.act.attn_out,
            &self.act.attn_q8,
            y,
            (c.n_heads * c.head_dim, c.hidden_size, 0),
            into_residual,
        )
    }

    /// Gate and up into `gate_up`.
    pub fn gate_up(&self) -> Result<Vec<LayerOp>> {
        self.side_by_side(&["ffn_gate", "ffn_up"], &self.act.gate_up, 2 * self.config.ffn_size)
    }

    /// Gate and up into `gate_up` from one fused matrix (`what`, the gate's rows first).
    pub fn gate_up_fused(&self, what: &str) -> Result<Vec<LayerOp>> {
        self.side_by_side(&[what], &self.act.gate_up, 2 * self.config.ffn_size)
    }

    /// The down projection: added into `x`, or written to `y` for a post-norm.
    pub fn down(&self, into_residual: bool) -> Result<LayerOp> {
        let c = self.config;
        let y = if into_residual { &self.act.x } else { &self.act.y };
        self.matmul_op(&self.matrix("ffn_down")?, &self.act.gate_up, &self.act.ffn_q8, y, (2 * c.ffn_size, c.hidden_size, 0), into_residual)
    }

    fn heads(&self) -> [(&'static str, f64); 3] {
        let c = self.config;
        [("N_HEADS", c.n_heads as f64), ("N_KV_HEADS", c.n_kv_heads as f64), ("HEAD_DIM", c.head_dim as f64)]
    }

    /// This layer's RoPE table (its base and frequency divisor).
    fn rope_table(&self) -> &wgpu::Buffer {
        let c = self.config;
        &self.rope_tables[&c.layer_rope_key(self.layer)]
    }

    /// Q/K/V ops (`qkv`, `qkv_fused`) followed directly by `rope_kv`: where they are one matmul
    /// over a layout whose rotated pairs are adjacent, its decode matvec also rotates and caches
    /// (`MatmulOp::rotate`), and decode steps skip rope_kv's dispatch. Fast mode only.
    pub fn rotating(&self, mut qkv: Vec<LayerOp>) -> Result<Vec<LayerOp>> {
        let c = self.config;
        if let ([LayerOp::Matmul(m)], false, RopeLayout::Adjacent) = (qkv.as_mut_slice(), self.engine.deterministic, c.rope_layout) {
            let a = self.act;
            let target = RopeTarget {
                tokens: &a.tokens,
                table: self.rope_table(),
                k_cache: self.k_cache,
                v_cache: self.v_cache,
                heads: [c.n_heads, c.n_kv_heads, c.head_dim],
                kv_f16: self.engine.kv_dtype == KvDtype::F16,
            };
            m.rotate(self.kernels, &target)?;
        }
        Ok(qkv)
    }

    /// RoPE on Q and K with this layer's base, and the new K and V into the cache.
    pub fn rope_kv(&self) -> Result<LayerOp> {
        let c = self.config;
        let (pipeline, bind_group) = self.rope_pipeline(Kernel::RopeKv, &[], &[])?;
        let pairs = ((c.n_heads + c.n_kv_heads) * c.head_dim / 2) as u64;
        // rope_kv.wgsl: an invocation rotates two pairs or copies two V values.
        let items = (c.n_heads + c.n_kv_heads) * c.head_dim / 4 + c.kv_dim() / 2;
        Ok(LayerOp::Dispatch(Dispatch {
            pipeline,
            bind_group,
            cost: Cost::per_token(Kernel::RopeKv, self.rope_bytes(), 6 * pairs),
            grid: Grid::RopeKv(items.div_ceil(64) as u32),
        }))
    }

    /// `rope_kv` after an RMSNorm of each query head by `q_norm` and each key head by `k_norm`
    /// (one dispatch: norm_rope_kv.wgsl).
    pub fn norm_rope_kv(&self, q_norm: &str, k_norm: &str) -> Result<LayerOp> {
        let c = self.config;
        let (gq, gk) = (self.vector(q_norm)?, self.vector(k_norm)?);
        let (pipeline, bind_group) = self.rope_pipeline(Kernel::NormRopeKv, &[("EPS", f64::from(c.rms_eps))], &[&gq, &gk])?;
        let values = ((c.n_heads + c.n_kv_heads) * c.head_dim) as u64;
        Ok(LayerOp::Dispatch(Dispatch {
            pipeline,
            bind_group,
            // The norm reads each value once more and spends 4 operations on it; RoPE 3 a value.
            cost: Cost::per_token(Kernel::NormRopeKv, self.rope_bytes() + values * 4, 7 * values),
            grid: Grid::Tokens((c.n_heads + 2 * c.n_kv_heads) as u32),
        }))
    }

    /// A RoPE kernel's pipeline and bind group: rope_io.wgsl's constants and bindings, then
    /// `consts` and `buffers` of its own.
    fn rope_pipeline(
        &self,
        kernel: Kernel,
        consts: &[(&str, f64)],
        buffers: &[&wgpu::Buffer],
    ) -> Result<(wgpu::ComputePipeline, wgpu::BindGroup)> {
        let c = self.config;
        let [h, kvh, hd] = self.heads();
        let neox = ("NEOX", f64::from(u8::from(c.rope_layout == RopeLayout::Neox)));
        let pipeline = self.kernels.pipeline(kernel, Some(self.engine.kv_dtype.format()), &[&[h, kvh, hd, neox][..], consts].concat())?;
        let a = self.act;
        let io = [&a.step, &a.qkv, &a.tokens, self.rope_table(), self.k_cache, self.v_cache];
        let bind_group = self.kernels.bind_group(kernel, kernel.name(), &[&io[..], buffers].concat());
        Ok((pipeline, bind_group))
    }

    /// Bytes a RoPE kernel moves a token: Q/K/V read, Q written, K and V cached.
    fn rope_bytes(&self) -> u64 {
        let c = self.config;
        c.qkv_dim() as u64 * 8 + 2 * c.kv_dim() as u64 * self.engine.kv_dtype.bytes() as u64
    }

    /// Attention over the cache (this layer's window, if any) into `attn_out`, a token at a time
    /// and, where the engine takes them (`takes_attention_tiles`), in tiles of a sequence's
    /// tokens on the matrix units; and the merge of its chunks on steps that have more than one
    /// a token.
    fn attention(&self) -> Result<Vec<LayerOp>> {
        let c = self.config;
        let [h, kvh, hd] = self.heads();
        let kv = self.engine.kv_dtype;
        let a = self.act;
        let q8 = &a.attn_q8;
        let window = c.layer_window(self.layer).unwrap_or(0);
        // What both attention kernels take (attention_io.wgsl): constants, and bindings 0-7.
        let io = [h, kvh, hd, ("BLOCK_TOKENS", BLOCK_TOKENS as f64), ("SCALE", c.attention_scale()), ("WINDOW", window as f64)];
        let io_buffers = [&a.step, &a.qkv, &a.tokens, &a.tables, self.k_cache, self.v_cache, &a.partials, &a.attn_out];
        let pipeline = self.kernels.pipeline(
            Kernel::Attention,
            Some(kv.format()),
            &[&io[..], &[("Q8", f64::from(u8::from(q8.is_some())))]].concat(),
        )?;
        let bind_group = self.kernels.bind_group(Kernel::Attention, "attention", &[&io_buffers[..], &[self.q8_out(q8)]].concat());
        let (heads, kv_dim, hdim) = (c.n_heads as u64, c.kv_dim() as u64, c.head_dim as u64);
        let cost = Cost {
            kernel: Kernel::Attention,
            bytes_per_token: heads * hdim * 8,
            flops_per_token: 0,
            bytes_per_attended: kv_dim * 2 * kv.bytes() as u64,
            flops_per_attended: 4 * heads * hdim,
        };
        let attention = Dispatch { pipeline, bind_group, cost, grid: Grid::Attention(c.n_heads as u32) };
        let mut ops = vec![LayerOp::Dispatch(attention)];
        if takes_attention_tiles(self.ctx.caps, self.engine, c) {
            let pipeline = self.kernels.pipeline(Kernel::AttentionCoop, Some(kv.format()), &io)?;
            let bind_group =
                self.kernels.bind_group(Kernel::AttentionCoop, "attention_coop", &[&io_buffers[..], &[&a.attention_tiles]].concat());
            // Each K/V row is read once a tile of ATTENTION_TILE_ROWS tokens.
            let cost = Cost {
                kernel: Kernel::AttentionCoop,
                bytes_per_attended: cost.bytes_per_attended / u64::from(ATTENTION_TILE_ROWS),
                ..cost
            };
            ops.push(LayerOp::Dispatch(Dispatch {
                pipeline,
                bind_group,
                cost,
                grid: Grid::AttentionTiles(attention_tile_head_groups(c.n_heads as u32, c.head_dim as u32)),
            }));
        }
        let pipeline = self.kernels.pipeline(
            Kernel::AttentionMerge,
            None,
            &[h, hd, ("CHUNK", f64::from(ATTENTION_CHUNK)), ("Q8", f64::from(u8::from(q8.is_some())))],
        )?;
        let bind_group = self.kernels.bind_group(
            Kernel::AttentionMerge,
            "attention_merge",
            &[&a.step, &a.tokens, &a.partials, &a.attn_out, self.q8_out(q8)],
        );
        let merge = Dispatch {
            pipeline,
            bind_group,
            cost: Cost::per_token(Kernel::AttentionMerge, heads * hdim * 8, 0),
            grid: Grid::Merge(c.n_heads as u32),
        };
        ops.push(LayerOp::Dispatch(merge));
        Ok(ops)
    }

    /// The gate/up ops `gate_up` and the gated activation after them (`glu`). Where they are one
    /// matmul with an 8-bit matvec twin that gates its output itself (`MatmulOp::take_glu`),
    /// one-token steps take that twin and skip the activation's dispatch. Returns both, for the
    /// caller to place the gate/up ops after their norm (`normed`).
    pub fn gated(&self, mut gate_up: Vec<LayerOp>, gelu: bool) -> Result<(Vec<LayerOp>, LayerOp)> {
        let mut glu = self.glu(gelu)?;
        if let ([LayerOp::Matmul(m)], Some(ffn_q8), LayerOp::Dispatch(d)) = (gate_up.as_mut_slice(), &self.act.ffn_q8, &mut glu) {
            let target = GluTarget { ffn_q8: ffn_q8.clone(), ffn_dim: self.config.ffn_size, gelu };
            if m.take_glu(self.kernels, target)?
                && let Grid::Tokens(x) = d.grid
            {
                d.grid = Grid::GatedTokens(x);
            }
        }
        Ok((gate_up, glu))
    }

    /// The gated activation over `gate_up`: SiLU (SwiGLU) or GELU's tanh form (GeGLU).
    pub fn glu(&self, gelu: bool) -> Result<LayerOp> {
        let f = self.config.ffn_size;
        let q8 = &self.act.ffn_q8;
        let pipeline = self.kernels.pipeline(
            Kernel::SiluMul,
            None,
            &[("FFN_DIM", f as f64), ("Q8", f64::from(u8::from(q8.is_some()))), ("GELU", f64::from(u8::from(gelu)))],
        )?;
        let bind_group = self.kernels.bind_group(Kernel::SiluMul, "glu", &[&self.act.step, &self.act.gate_up, self.q8_out(q8)]);
        Ok(LayerOp::Dispatch(Dispatch {
            pipeline,
            bind_group,
            cost: Cost::per_token(Kernel::SiluMul, f as u64 * 12, 5 * f as u64),
            grid: Grid::Tokens(f.div_ceil(SILU_MUL_TILE) as u32),
        }))
    }
}
