//! Compute pipelines for every kernel, with explicit bind-group layouts, built once per
//! (kernel, format, constants) and cached.

use std::collections::HashMap;
use std::sync::Mutex;

use tandem_shaders::{Binding, Kernel, WeightFormat};

use crate::error::{Error, Result};
use crate::gpu::GpuContext;

/// Pipelines and layouts of one device.
pub struct Kernels {
    ctx: GpuContext,
    layouts: HashMap<Kernel, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    cache: Mutex<HashMap<String, wgpu::ComputePipeline>>,
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
        Kernels { ctx: ctx.clone(), layouts, cache: Mutex::default() }
    }

    /// The GPU context the kernels run on.
    pub fn ctx(&self) -> &GpuContext {
        &self.ctx
    }

    /// The pipeline of `kernel` for `format` with the given override constants.
    pub fn pipeline(&self, kernel: Kernel, format: Option<WeightFormat>, constants: &[(&str, f64)]) -> Result<wgpu::ComputePipeline> {
        let key = format!("{}:{:?}:{constants:?}", kernel.name(), format);
        let mut cache = self.cache.lock().map_err(|_| Error::Gpu { op: key.clone(), reason: "pipeline cache poisoned".into() })?;
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let source = kernel.source(format, self.ctx.caps).map_err(|e| Error::Gpu { op: key.clone(), reason: e.to_string() })?;
        let label = match format {
            Some(f) => format!("{}.{}", kernel.name(), f.name()),
            None => kernel.name().to_string(),
        };
        let scope = self.ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .ctx
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor { label: Some(&label), source: wgpu::ShaderSource::Wgsl(source.into()) });
        let pipeline = self.ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&self.layouts[&kernel.layout_owner()].1),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions { constants, zero_initialize_workgroup_memory: false },
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu { op: format!("building pipeline {label}"), reason: err.to_string() });
        }
        cache.insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// A bind group for `kernel` with `buffers` bound in order.
    pub fn bind_group(&self, kernel: Kernel, label: &str, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> =
            buffers.iter().enumerate().map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() }).collect();
        self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &self.layouts[&kernel.layout_owner()].0,
            entries: &entries,
        })
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

    /// The decode matvec for up to `tokens` tokens, `rows` weight rows per 32 lanes.
    pub fn matvec(
        &self,
        format: WeightFormat,
        tokens: u32,
        rows: u32,
        accumulate: bool,
        sample_rows: bool,
    ) -> Result<wgpu::ComputePipeline> {
        self.pipeline(
            Kernel::Matvec,
            Some(format),
            &[
                ("TOKENS", f64::from(tokens)),
                ("ROWS", f64::from(rows)),
                // Registers bound the unrolling: each token adds its own activation loads.
                ("UNROLL", f64::from((4 / tokens).max(1))),
                ("ACCUMULATE", f64::from(u8::from(accumulate))),
                ("SAMPLE_ROWS", f64::from(u8::from(sample_rows))),
            ],
        )
    }

    /// The tiled GEMM for steps of many tokens.
    pub fn gemm(&self, format: WeightFormat, accumulate: bool, sample_rows: bool) -> Result<wgpu::ComputePipeline> {
        self.pipeline(
            Kernel::Gemm,
            Some(format),
            &[("ACCUMULATE", f64::from(u8::from(accumulate))), ("SAMPLE_ROWS", f64::from(u8::from(sample_rows)))],
        )
    }

    /// The GEMM on the adapter's matrix units (adapters with `ShaderCaps::coop_matrix`). Correct
    /// (scripts/test-gpu) but not yet faster than `gemm` on the H200 (11.9 against 14.2 TFLOP/s
    /// on the 8B shape: its per-element dequantizing loader, not the matrix units, is the
    /// bottleneck), so the engine does not pick it yet.
    pub fn gemm_coop(&self, format: WeightFormat, accumulate: bool, sample_rows: bool) -> Result<wgpu::ComputePipeline> {
        self.pipeline(
            Kernel::GemmCoop,
            Some(format),
            &[("ACCUMULATE", f64::from(u8::from(accumulate))), ("SAMPLE_ROWS", f64::from(u8::from(sample_rows)))],
        )
    }
}

/// Tokens one matmul invocation serves (`TILE_T` in matmul.wgsl).
pub const MATMUL_TILE: usize = 8;

/// Token counts the decode matvec is built for (`TOKENS` in matvec.wgsl); steps of more tokens
/// take the GEMM.
pub const MATVEC_TOKENS: [u32; 4] = [1, 2, 4, 8];

/// Lanes that walk one row in matvec.wgsl, and lanes per workgroup.
pub const MATVEC_SPLIT: usize = 32;
pub const MATVEC_WG: usize = 64;

/// Weight rows and tokens of one GEMM workgroup's tile (`TILE` in gemm.wgsl).
pub const GEMM_TILE: usize = 64;
