//! Every WGSL kernel of tandem, rendered per weight format.
//!
//! Each kernel lives in its own `.wgsl` file under `wgsl/`; the matmul kernels share their
//! parameters, bindings and result store in `matmul_io.wgsl`, and all but `matvec_q8` (which reads
//! 8-bit activations and each format's packed-byte dot, `q8dot_*.wgsl`) their f32 activations in
//! `matmul_x.wgsl`; the two decode matvecs combine their lane groups' sums in
//! `matvec_groups.wgsl`. A kernel that reads weights is rendered
//! with the dequantization module of the weight's storage format (`dequant_*.wgsl`, which declares
//! the weight binding and defines `BLOCK`, `block_dot` and `dq_elem`; F16 reads its halves through
//! `f16_words.wgsl` or, on SHADER_F16 adapters, `f16_native.wgsl`); a kernel whose lanes
//! cooperate gets a lane-exchange module (`*_lanes_subgroup.wgsl` where the adapter has 32-lane
//! subgroups, `*_lanes_workgroup.wgsl` elsewhere). Everything else that varies (model shape,
//! tiling) is a WGSL `override` constant set when the pipeline is created. The structs the CPU writes into
//! GPU buffers are defined here next to their WGSL twins, and a test checks that both agree.

mod layout;

pub use layout::{EmbedParams, MatmulParams, SampleParams, Step, TokenInfo};

use std::fmt;

/// Set in `TokenInfo::id` for a token whose id is the one sampled into row `id & !FROM_SAMPLED`
/// of the step before (`FROM_SAMPLED` in embed.wgsl).
pub const FROM_SAMPLED: u32 = 0x8000_0000;

/// Key positions per attention chunk (`CHUNK` in attention.wgsl: a workgroup, a lane a
/// position). Fixed for every adapter and engine so attention sums in the same order wherever a
/// sequence's KV was computed.
pub const ATTENTION_CHUNK: u32 = 256;

/// Query rows of one attention_coop.wgsl workgroup (`ROWS`): consecutive tokens of one sequence.
pub const ATTENTION_TILE_ROWS: u32 = 64;

/// The workgroups of attention_coop.wgsl along x for `heads` heads of `head_dim` (64, 128 or
/// 256): one a head, two for 256-wide heads (a workgroup writes 128 output dimensions at most).
pub fn attention_tile_head_groups(heads: u32, head_dim: u32) -> u32 {
    heads * head_dim.div_ceil(128).max(1)
}

/// The fewest tokens of a sequence in a step for which the engine takes attention_coop.wgsl for
/// that step: a tile of fewer rows leaves most of the matrix units' work masked, and a decode
/// token is better served by attention.wgsl's split of its keys.
pub const ATTENTION_TILE_MIN: usize = 16;

/// Directives for the kernels on the matrix units (f16 inputs).
const COOP_ENABLES: &str = "enable f16;\nenable wgpu_cooperative_matrix;\n";

/// How a weight tensor is stored in a model file. On the GPU each format has a layout
/// (`device_format`): its own blocks of 32, their values in order, in as many bits as the file
/// (Q3_K's ride Q6_K's six-bit layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl WeightFormat {
    /// Every format, for tests and variant enumeration.
    pub const ALL: [WeightFormat; 13] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Bf16,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
        WeightFormat::Q2K,
        WeightFormat::Q3K,
        WeightFormat::Q4K,
        WeightFormat::Q5K,
        WeightFormat::Q6K,
    ];

    /// Lower-case name as used in file names and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q4_1 => "q4_1",
            WeightFormat::Q5_0 => "q5_0",
            WeightFormat::Q5_1 => "q5_1",
            WeightFormat::Q2K => "q2_k",
            WeightFormat::Q3K => "q3_k",
            WeightFormat::Q4K => "q4_k",
            WeightFormat::Q5K => "q5_k",
            WeightFormat::Q6K => "q6_k",
        }
    }

    /// Elements per quantization block in the file (1 for plain float formats).
    pub fn block_elems(self) -> usize {
        match self {
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16 => 1,
            WeightFormat::Q8_0 | WeightFormat::Q4_0 | WeightFormat::Q4_1 | WeightFormat::Q5_0 | WeightFormat::Q5_1 => 32,
            WeightFormat::Q2K | WeightFormat::Q3K | WeightFormat::Q4K | WeightFormat::Q5K | WeightFormat::Q6K => 256,
        }
    }

    /// Bytes per block in the file's layout.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::F16 | WeightFormat::Bf16 => 2,
            WeightFormat::Q8_0 => 34,
            WeightFormat::Q4_0 => 18,
            WeightFormat::Q4_1 => 20,
            WeightFormat::Q5_0 => 22,
            WeightFormat::Q5_1 => 24,
            WeightFormat::Q2K => 84,
            WeightFormat::Q3K => 110,
            WeightFormat::Q4K => 144,
            WeightFormat::Q5K => 176,
            WeightFormat::Q6K => 210,
        }
    }

    /// Bytes a row of `cols` elements takes in the file's layout, if `cols` fits the block size.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        cols.is_multiple_of(self.block_elems()).then(|| cols / self.block_elems() * self.block_bytes())
    }

    /// The layout the GPU keeps these weights in (the kernels are rendered for it), every value the
    /// file's in as many bits: blocks of 32 whose values are in order (the K-quants' super-blocks
    /// of 256 are 8 of them, under the super-block's own scales: block_dm_k.wgsl,
    /// block_d_q6_k.wgsl, block_dm_q2_k.wgsl). Q3_K's values ride Q6_K's six-bit layout.
    pub fn device_format(self) -> WeightFormat {
        match self {
            WeightFormat::Q3K => WeightFormat::Q6K,
            f => f,
        }
    }

    /// How the weight words are read, where that depends on the adapter.
    fn weight_access_source(self, caps: ShaderCaps) -> Option<&'static str> {
        match self.device_format() {
            WeightFormat::F16 if caps.f16 => Some(include_str!("../wgsl/f16_native.wgsl")),
            WeightFormat::F16 => Some(include_str!("../wgsl/f16_words.wgsl")),
            _ => None,
        }
    }

    fn dequant_source(self) -> &'static str {
        match self.device_format() {
            WeightFormat::F32 => include_str!("../wgsl/dequant_f32.wgsl"),
            WeightFormat::F16 => include_str!("../wgsl/dequant_f16.wgsl"),
            WeightFormat::Bf16 => include_str!("../wgsl/dequant_bf16.wgsl"),
            WeightFormat::Q8_0 => include_str!("../wgsl/dequant_q8_0.wgsl"),
            WeightFormat::Q4_0 => include_str!("../wgsl/dequant_q4_0.wgsl"),
            WeightFormat::Q4_1 | WeightFormat::Q4K => include_str!("../wgsl/dequant_q4_1.wgsl"),
            WeightFormat::Q5_0 | WeightFormat::Q5_1 | WeightFormat::Q5K => include_str!("../wgsl/dequant_q5.wgsl"),
            WeightFormat::Q2K => include_str!("../wgsl/dequant_q2_k.wgsl"),
            _ => include_str!("../wgsl/dequant_q6_k.wgsl"),
        }
    }

    /// How a block's scale and minimum are stored, for the layouts that share a body and differ
    /// only there (`block_dm`).
    fn block_dm_source(self) -> Option<&'static str> {
        match self.device_format() {
            WeightFormat::Q4_1 | WeightFormat::Q5_1 => Some(include_str!("../wgsl/block_dm_f16.wgsl")),
            WeightFormat::Q4K | WeightFormat::Q5K => Some(include_str!("../wgsl/block_dm_k.wgsl")),
            WeightFormat::Q6K => Some(include_str!("../wgsl/block_d_q6_k.wgsl")),
            WeightFormat::Q2K => Some(include_str!("../wgsl/block_dm_q2_k.wgsl")),
            WeightFormat::Q5_0 => Some(include_str!("../wgsl/block_dm_q5_0.wgsl")),
            _ => None,
        }
    }

    /// How the values of a layout that both its dequantizer and its packed dot unpack are read.
    fn values_source(self) -> Option<&'static str> {
        match self.device_format() {
            WeightFormat::Q5_0 | WeightFormat::Q5_1 | WeightFormat::Q5K => Some(include_str!("../wgsl/q5_values.wgsl")),
            _ => None,
        }
    }

    /// The module that dots a block of these weights with 8-bit activations on packed bytes
    /// (`q8_weights`, `q8_dot`), for formats whose quants are bytes or nibbles.
    fn packed_dot_source(self) -> Option<&'static str> {
        match self.device_format() {
            WeightFormat::Q8_0 => Some(include_str!("../wgsl/q8dot_q8_0.wgsl")),
            WeightFormat::Q4_0 => Some(include_str!("../wgsl/q8dot_q4_0.wgsl")),
            WeightFormat::Q4_1 | WeightFormat::Q4K => Some(include_str!("../wgsl/q8dot_q4_1.wgsl")),
            WeightFormat::Q5_0 | WeightFormat::Q5_1 | WeightFormat::Q5K => Some(include_str!("../wgsl/q8dot_q5.wgsl")),
            WeightFormat::Q6K => Some(include_str!("../wgsl/q8dot_q6_k.wgsl")),
            WeightFormat::Q2K => Some(include_str!("../wgsl/q8dot_q2_k.wgsl")),
            _ => None,
        }
    }

    /// Whether the decode matvec on 8-bit activations (`Kernel::MatvecQ8`) takes this format.
    pub fn has_packed_dot(self) -> bool {
        self.packed_dot_source().is_some()
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        WeightFormat::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = WeightFormat::ALL.iter().map(|f| f.name()).collect();
            format!("unknown weight format `{s}` ({})", names.join(", "))
        })
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A compute kernel; `source` of a weight-reading kernel needs the weight's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Embed,
    RmsNorm,
    Matmul,
    Matvec,
    MatvecQ8,
    MatvecQ8Rope,
    /// `MatvecQ8` and `MatvecQ8Rope` that norm and quantize their input themselves
    /// (matvec_q8_x_norm.wgsl), in place of the RMSNorm before them.
    MatvecQ8Norm,
    MatvecQ8RopeNorm,
    /// The gate/up `MatvecQ8` of a one-token step doing SiLU·mul's (or GeGLU's) work too
    /// (matvec_q8_glu.wgsl), and its twin that also norms its input.
    MatvecQ8Glu,
    MatvecQ8NormGlu,
    /// The attention output's `MatvecQ8` of a one-token step that merges attention's chunks
    /// itself (matvec_q8_x_merge.wgsl), in place of attention_merge.
    MatvecQ8Merge,
    Gemm,
    GemmCoop,
    AddBias,
    RopeKv,
    /// `RopeKv` after an RMSNorm of each query and key head (Gemma 3's and Qwen3's q/k norms).
    NormRopeKv,
    Attention,
    AttentionCoop,
    AttentionMerge,
    SiluMul,
    Sample,
}

impl Kernel {
    /// Every kernel.
    pub const ALL: [Kernel; 21] = [
        Kernel::Embed,
        Kernel::RmsNorm,
        Kernel::Matmul,
        Kernel::Matvec,
        Kernel::MatvecQ8,
        Kernel::MatvecQ8Rope,
        Kernel::MatvecQ8Norm,
        Kernel::MatvecQ8RopeNorm,
        Kernel::MatvecQ8Glu,
        Kernel::MatvecQ8NormGlu,
        Kernel::MatvecQ8Merge,
        Kernel::Gemm,
        Kernel::GemmCoop,
        Kernel::AddBias,
        Kernel::RopeKv,
        Kernel::NormRopeKv,
        Kernel::Attention,
        Kernel::AttentionCoop,
        Kernel::AttentionMerge,
        Kernel::SiluMul,
        Kernel::Sample,
    ];

    /// The file stem, also used as the pipeline label.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Embed => "embed",
            Kernel::RmsNorm => "rmsnorm",
            Kernel::Matmul => "matmul",
            Kernel::Matvec => "matvec",
            Kernel::MatvecQ8 => "matvec_q8",
            Kernel::MatvecQ8Rope => "matvec_q8_rope",
            Kernel::MatvecQ8Norm => "matvec_q8_norm",
            Kernel::MatvecQ8RopeNorm => "matvec_q8_rope_norm",
            Kernel::MatvecQ8Glu => "matvec_q8_glu",
            Kernel::MatvecQ8NormGlu => "matvec_q8_norm_glu",
            Kernel::MatvecQ8Merge => "matvec_q8_merge",
            Kernel::Gemm => "gemm",
            Kernel::GemmCoop => "gemm_coop",
            Kernel::AddBias => "add_bias",
            Kernel::RopeKv => "rope_kv",
            Kernel::NormRopeKv => "norm_rope_kv",
            Kernel::Attention => "attention",
            Kernel::AttentionCoop => "attention_coop",
            Kernel::AttentionMerge => "attention_merge",
            Kernel::SiluMul => "silu_mul",
            Kernel::Sample => "sample",
        }
    }

    /// How the kernel uses each binding of group 0, in binding order: what its bind-group
    /// layout declares. `tests/validate.rs` checks these against the WGSL.
    pub fn bindings(self) -> &'static [Binding] {
        use Binding::{Read as R, Uniform as U, Write as W};
        match self {
            Kernel::Embed => &[U, U, R, R, R, W, R],
            // step, x, g, rows, out, out as 8-bit activations.
            Kernel::RmsNorm => &[U, R, R, R, W, W],
            // step, params, x, weight words, scales, y, x again as vec4s (matvec_q8: the
            // 8-bit activations' quants and their scales; matvec_q8_norm: the residual and the
            // norm's weights; matvec_q8_merge: attention's chunk states and the step's tokens).
            Kernel::Matmul | Kernel::Matvec | Kernel::MatvecQ8 | Kernel::MatvecQ8Norm | Kernel::MatvecQ8Merge | Kernel::Gemm => {
                &[U, U, R, R, R, W, R]
            }
            // matmul's, then the split reductions' sums.
            Kernel::GemmCoop => &[U, U, R, R, R, W, R, W],
            // matvec_q8's, then tokens, the RoPE table, and the K and V cache.
            Kernel::MatvecQ8Rope | Kernel::MatvecQ8RopeNorm => &[U, U, R, R, R, W, R, R, R, W, W],
            // matvec_q8's, then the down projection's 8-bit input.
            Kernel::MatvecQ8Glu | Kernel::MatvecQ8NormGlu => &[U, U, R, R, R, W, R, W],
            // step, y (biased in place), the bias.
            Kernel::AddBias => &[U, W, R],
            // step, qkv (Q rotated in place), tokens, the RoPE table, the K and V cache.
            Kernel::RopeKv => &[U, W, R, R, W, W],
            // rope_kv's, then the query-head and key-head norm weights.
            Kernel::NormRopeKv => &[U, W, R, R, W, W, R, R],
            Kernel::Attention => &[U, R, R, R, R, R, W, W, W],
            // step, qkv, tokens, tables, K, V, partials, out, the step's tiles.
            Kernel::AttentionCoop => &[U, R, R, R, R, R, W, W, R],
            Kernel::AttentionMerge => &[U, R, R, W, W],
            Kernel::SiluMul => &[U, W, W],
            Kernel::Sample => &[U, R, R, W],
        }
    }

    /// The kernel whose bind-group layout this one shares: the matmul kernels bind the same
    /// buffers, so one bind group serves whichever the engine picks for a step (the matrix
    /// units' GEMM binds one more, its split sums, and has its own).
    pub fn layout_owner(self) -> Kernel {
        match self {
            Kernel::Matvec | Kernel::MatvecQ8 | Kernel::MatvecQ8Norm | Kernel::MatvecQ8Merge | Kernel::Gemm => Kernel::Matmul,
            Kernel::MatvecQ8RopeNorm => Kernel::MatvecQ8Rope,
            Kernel::MatvecQ8NormGlu => Kernel::MatvecQ8Glu,
            k => k,
        }
    }

    /// Whether the kernel touches the paged K/V cache and so exists once per cache format (F16
    /// or F32, passed as the `format` of `source`).
    pub fn reads_kv(self) -> bool {
        matches!(self, Kernel::RopeKv | Kernel::NormRopeKv | Kernel::Attention | Kernel::AttentionCoop)
    }

    /// Whether the kernel reads a weight tensor and so exists once per weight format.
    pub fn reads_weights(self) -> bool {
        matches!(
            self,
            Kernel::Embed
                | Kernel::Matmul
                | Kernel::Matvec
                | Kernel::MatvecQ8
                | Kernel::MatvecQ8Rope
                | Kernel::MatvecQ8Norm
                | Kernel::MatvecQ8RopeNorm
                | Kernel::MatvecQ8Glu
                | Kernel::MatvecQ8NormGlu
                | Kernel::MatvecQ8Merge
                | Kernel::Gemm
                | Kernel::GemmCoop
        )
    }

    fn body(self) -> &'static str {
        match self {
            Kernel::Embed => include_str!("../wgsl/embed.wgsl"),
            Kernel::RmsNorm => include_str!("../wgsl/rmsnorm.wgsl"),
            Kernel::Matmul => include_str!("../wgsl/matmul.wgsl"),
            Kernel::Matvec => include_str!("../wgsl/matvec.wgsl"),
            Kernel::MatvecQ8
            | Kernel::MatvecQ8Rope
            | Kernel::MatvecQ8Norm
            | Kernel::MatvecQ8RopeNorm
            | Kernel::MatvecQ8Glu
            | Kernel::MatvecQ8NormGlu
            | Kernel::MatvecQ8Merge => include_str!("../wgsl/matvec_q8.wgsl"),
            Kernel::Gemm => include_str!("../wgsl/gemm.wgsl"),
            Kernel::GemmCoop => include_str!("../wgsl/gemm_coop.wgsl"),
            Kernel::AddBias => include_str!("../wgsl/add_bias.wgsl"),
            Kernel::RopeKv => include_str!("../wgsl/rope_kv.wgsl"),
            Kernel::NormRopeKv => include_str!("../wgsl/norm_rope_kv.wgsl"),
            Kernel::Attention => include_str!("../wgsl/attention.wgsl"),
            Kernel::AttentionCoop => include_str!("../wgsl/attention_coop.wgsl"),
            Kernel::AttentionMerge => include_str!("../wgsl/attention_merge.wgsl"),
            Kernel::SiluMul => include_str!("../wgsl/silu_mul.wgsl"),
            Kernel::Sample => include_str!("../wgsl/sample.wgsl"),
        }
    }

    /// The module that exchanges values between a kernel's lanes, where the kernel has one.
    fn lanes_source(self, caps: ShaderCaps) -> Option<&'static str> {
        match (self, caps.subgroups) {
            (k, true) if k.sums_rows_over_lanes() => Some(include_str!("../wgsl/matmul_lanes_subgroup.wgsl")),
            (k, false) if k.sums_rows_over_lanes() => Some(include_str!("../wgsl/matmul_lanes_workgroup.wgsl")),
            (Kernel::Attention, true) => Some(include_str!("../wgsl/attention_lanes_subgroup.wgsl")),
            (Kernel::Attention, false) => Some(include_str!("../wgsl/attention_lanes_workgroup.wgsl")),
            (Kernel::RmsNorm, true) => Some(include_str!("../wgsl/norm_lanes_subgroup.wgsl")),
            (Kernel::RmsNorm, false) => Some(include_str!("../wgsl/norm_lanes_workgroup.wgsl")),
            _ => None,
        }
    }

    /// For the kernels that quantize values to 8-bit activations: `q8_lanes` and its block
    /// reductions for the adapter, and for those that write them out (the norms, SiLU·mul,
    /// attention and its merge) `q8_store_word`.
    fn q8_out_sources(self, caps: ShaderCaps) -> [Option<&'static str>; 3] {
        let stores = matches!(
            self,
            Kernel::RmsNorm | Kernel::SiluMul | Kernel::AttentionMerge | Kernel::Attention | Kernel::MatvecQ8Glu | Kernel::MatvecQ8NormGlu
        );
        if !stores && !self.norms_input() && self != Kernel::MatvecQ8Merge {
            return [None, None, None];
        }
        let block =
            if caps.subgroups { include_str!("../wgsl/q8_block_subgroup.wgsl") } else { include_str!("../wgsl/q8_block_workgroup.wgsl") };
        [Some(include_str!("../wgsl/q8_lanes.wgsl")), Some(block), stores.then_some(include_str!("../wgsl/q8_store.wgsl"))]
    }

    /// The matmul kernels (each binds matmul_io.wgsl's params and sums rows over lanes).
    fn is_matmul(self) -> bool {
        matches!(self, Kernel::Matmul | Kernel::Matvec | Kernel::Gemm | Kernel::GemmCoop) || self.is_matvec_q8()
    }

    /// The matmuls whose lanes share a row (matmul_lanes_*.wgsl).
    fn sums_rows_over_lanes(self) -> bool {
        matches!(self, Kernel::Matmul | Kernel::Matvec) || self.is_matvec_q8()
    }

    /// The matvecs on 8-bit activations.
    fn is_matvec_q8(self) -> bool {
        matches!(
            self,
            Kernel::MatvecQ8
                | Kernel::MatvecQ8Rope
                | Kernel::MatvecQ8Norm
                | Kernel::MatvecQ8RopeNorm
                | Kernel::MatvecQ8Glu
                | Kernel::MatvecQ8NormGlu
                | Kernel::MatvecQ8Merge
        )
    }

    /// The matvecs that norm their own input.
    fn norms_input(self) -> bool {
        matches!(self, Kernel::MatvecQ8Norm | Kernel::MatvecQ8RopeNorm | Kernel::MatvecQ8NormGlu)
    }

    /// The complete WGSL source of one variant for an adapter with `caps`.
    pub fn source(self, format: Option<WeightFormat>, caps: ShaderCaps) -> Result<String, RenderError> {
        if self.reads_kv() {
            let (cache, store) = match format {
                Some(WeightFormat::F32) => (include_str!("../wgsl/kv_f32.wgsl"), include_str!("../wgsl/kv_f32_store.wgsl")),
                Some(WeightFormat::F16) => (include_str!("../wgsl/kv_f16.wgsl"), include_str!("../wgsl/kv_f16_store.wgsl")),
                Some(f) => return Err(RenderError::UnsupportedFormat(self, f)),
                None => return Err(RenderError::MissingFormat(self)),
            };
            let coop = self == Kernel::AttentionCoop;
            if let (true, Some(f @ WeightFormat::F32)) = (coop, format) {
                return Err(RenderError::UnsupportedFormat(self, f));
            }
            if coop && !caps.has_coop_matrix() {
                return Err(RenderError::MissingCapability(self));
            }
            let lanes = self.lanes_source(caps);
            let [q8_out, q8_block, q8_store] = self.q8_out_sources(caps);
            // Only the RoPE kernels write the cache.
            let writes = matches!(self, Kernel::RopeKv | Kernel::NormRopeKv);
            let cache = cache.replace("KV_ACCESS", if writes { "read_write" } else { "read" });
            return Ok(concat([
                coop.then_some(COOP_ENABLES),
                Some(include_str!("../wgsl/common.wgsl")),
                if writes { Some(include_str!("../wgsl/rope_io.wgsl")) } else { Some(include_str!("../wgsl/attention_io.wgsl")) },
                Some(self.body()),
                Some(cache.as_str()),
                writes.then_some(store),
                lanes,
                q8_out,
                q8_block,
                q8_store,
            ]));
        }
        let dequant = match (self.reads_weights(), format) {
            (true, Some(f)) if self.is_matvec_q8() => Some(f.packed_dot_source().ok_or(RenderError::UnsupportedFormat(self, f))?),
            (true, Some(f)) => Some(f.dequant_source()),
            (false, None) => None,
            (true, None) => return Err(RenderError::MissingFormat(self)),
            (false, Some(f)) => return Err(RenderError::UnexpectedFormat(self, f)),
        };
        let coop = self == Kernel::GemmCoop;
        if coop && !caps.has_coop_matrix() {
            return Err(RenderError::MissingCapability(self));
        }
        let lanes = self.lanes_source(caps);
        let mut out = String::new();
        // An `enable` directive must precede every declaration. Naga (30) takes subgroup builtins
        // without one and refuses `enable subgroups`.
        if coop {
            out.push_str(COOP_ENABLES);
        } else if caps.f16 && format.map(WeightFormat::device_format) == Some(WeightFormat::F16) {
            out.push_str("enable f16;\n");
        }
        let access = format.and_then(|f| f.weight_access_source(caps));
        let matvec_q8 = self.is_matvec_q8();
        let matmul = self.is_matmul() && !matvec_q8;
        let io = self.is_matmul().then_some(include_str!("../wgsl/matmul_io.wgsl"));
        // How matvec_q8's sums leave: stored, or rotated and cached (matvec_q8_rope).
        let finish = match self {
            Kernel::MatvecQ8 | Kernel::MatvecQ8Norm | Kernel::MatvecQ8Merge => Some(include_str!("../wgsl/matvec_q8_store.wgsl")),
            Kernel::MatvecQ8Rope | Kernel::MatvecQ8RopeNorm => Some(include_str!("../wgsl/matvec_q8_rope.wgsl")),
            Kernel::MatvecQ8Glu | Kernel::MatvecQ8NormGlu => Some(include_str!("../wgsl/matvec_q8_glu.wgsl")),
            _ => None,
        };
        // The kernels that write a matvec's input also write it as 8-bit activations.
        let [q8_out, q8_block, q8_store] = self.q8_out_sources(caps);
        let f32_x = matmul.then_some(include_str!("../wgsl/matmul_x.wgsl"));
        // matvec_q8's activations: as written, or made here and staged in workgroup memory:
        // normed (with rmsnorm's lane sum) or merged from attention's chunks.
        let (q8_x, staged) = match (matvec_q8, self.norms_input()) {
            _ if self == Kernel::MatvecQ8Merge => (Some(include_str!("../wgsl/matvec_q8_x_merge.wgsl")), true),
            (true, false) => (Some(include_str!("../wgsl/matvec_q8_x.wgsl")), false),
            (true, true) => (Some(include_str!("../wgsl/matvec_q8_x_norm.wgsl")), true),
            _ => (None, false),
        };
        // The chunk merge's arithmetic, one copy for both kernels that merge.
        let merge = matches!(self, Kernel::AttentionMerge | Kernel::MatvecQ8Merge);
        let norm_lanes = match (self.norms_input(), caps.subgroups) {
            (true, true) => Some(include_str!("../wgsl/norm_lanes_subgroup.wgsl")),
            (true, false) => Some(include_str!("../wgsl/norm_lanes_workgroup.wgsl")),
            _ => None,
        };
        let groups = (self == Kernel::Matvec || matvec_q8).then_some(include_str!("../wgsl/matvec_groups.wgsl"));
        out.push_str(&concat([
            Some(include_str!("../wgsl/common.wgsl")),
            io,
            f32_x,
            q8_x,
            staged.then_some(include_str!("../wgsl/matvec_q8_x_staged.wgsl")),
            merge.then_some(include_str!("../wgsl/merge_chunks.wgsl")),
            Some(self.body()),
            access,
            format.and_then(WeightFormat::block_dm_source),
            format.and_then(WeightFormat::values_source),
            dequant,
            lanes,
            groups,
            finish,
            q8_out,
            q8_block,
            q8_store,
            norm_lanes,
        ]));
        Ok(out)
    }

    /// Every (kernel, format, capabilities) variant that can be rendered; a variant appears once
    /// per distinct source.
    pub fn variants() -> impl Iterator<Item = (Kernel, Option<WeightFormat>, ShaderCaps)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for k in Kernel::ALL {
            let formats: Vec<Option<WeightFormat>> = if k.reads_weights() {
                WeightFormat::ALL.into_iter().filter(|f| f.device_format() == *f).map(Some).collect()
            } else if k.reads_kv() {
                vec![Some(WeightFormat::F16), Some(WeightFormat::F32)]
            } else {
                vec![None]
            };
            for f in formats {
                for caps in ShaderCaps::ALL {
                    if let Ok(src) = k.source(f, caps)
                        && seen.insert(src)
                    {
                        out.push((k, f, caps));
                    }
                }
            }
        }
        out.into_iter()
    }
}

/// The present `parts` of a kernel's source, one after another.
fn concat<'a>(parts: impl IntoIterator<Item = Option<&'a str>>) -> String {
    let mut out = String::new();
    for part in parts.into_iter().flatten() {
        out.push_str(part);
        out.push('\n');
    }
    out
}

/// How a kernel uses one of its buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    Uniform,
    /// A read-only storage buffer.
    Read,
    /// A read-write storage buffer.
    Write,
}

/// What the adapter offers the kernels beyond core WGSL. Each capability has a fallback, so
/// `ShaderCaps::default()` runs everywhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ShaderCaps {
    /// Subgroup operations, with every subgroup exactly 32 lanes wide (NVIDIA; AMD RDNA and
    /// Intel only when their driver fixes the width at 32). Other widths use workgroup memory.
    pub subgroups: bool,
    /// The WGSL `f16` type in storage buffers (wgpu's SHADER_F16).
    pub f16: bool,
    /// Cooperative matrices of 16 x 16 x 16 with f16 inputs and f32 sums (wgpu's
    /// EXPERIMENTAL_COOPERATIVE_MATRIX: tensor cores through VK_KHR_cooperative_matrix).
    pub coop_matrix: bool,
}

impl ShaderCaps {
    /// Whether the matrix units' kernels (gemm_coop, attention_coop) render: they take f16 and
    /// 32-lane subgroups with them.
    pub fn has_coop_matrix(self) -> bool {
        self.coop_matrix && self.f16 && self.subgroups
    }

    /// Every combination, for tests and variant enumeration.
    pub const ALL: [ShaderCaps; 5] = [
        ShaderCaps { subgroups: false, f16: false, coop_matrix: false },
        ShaderCaps { subgroups: true, f16: false, coop_matrix: false },
        ShaderCaps { subgroups: false, f16: true, coop_matrix: false },
        ShaderCaps { subgroups: true, f16: true, coop_matrix: false },
        ShaderCaps { subgroups: true, f16: true, coop_matrix: true },
    ];
}

/// A variant that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    MissingFormat(Kernel),
    UnexpectedFormat(Kernel, WeightFormat),
    /// The kernel needs a capability the adapter lacks (cooperative matrices).
    MissingCapability(Kernel),
    /// The kernel has no variant for this weight format.
    UnsupportedFormat(Kernel, WeightFormat),
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenderError::MissingFormat(k) => write!(f, "kernel `{}` needs a weight format", k.name()),
            RenderError::UnexpectedFormat(k, w) => {
                write!(f, "kernel `{}` reads no weights, yet format {w} was given", k.name())
            }
            RenderError::UnsupportedFormat(k, w) => write!(f, "kernel `{}` has no variant for format {w}", k.name()),
            RenderError::MissingCapability(k) => {
                write!(f, "kernel `{}` needs 32-lane subgroups, f16 and cooperative matrices", k.name())
            }
        }
    }
}

impl std::error::Error for RenderError {}
