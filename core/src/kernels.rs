//! Compute pipelines for every kernel, with explicit bind-group layouts, built once per
//! (kernel, format, constants) and cached.

use std::collections::HashMap;
use std::sync::Mutex;

use tandem_shaders::{Kernel, WeightFormat};

use crate::error::{Error, Result};
use crate::gpu::GpuContext;

#[derive(Clone, Copy)]
enum Slot {
    Uniform,
    Read,
    Write,
}

fn slots(kernel: Kernel) -> &'static [Slot] {
    use Slot::{Read as R, Uniform as U, Write as W};
    match kernel {
        Kernel::Embed => &[U, U, R, R, R, W],
        Kernel::RmsNorm => &[U, R, R, R, W],
        Kernel::Matmul => &[U, U, R, R, R, W, R],
        Kernel::RopeKv => &[U, W, R, R, W, W],
        Kernel::Attention => &[U, R, R, R, R, R, W],
        Kernel::AttentionMerge => &[U, R, R, W],
        Kernel::SiluMul => &[U, W, R],
        Kernel::Sample => &[U, R, R, W],
    }
}

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
            .map(|k| {
                let entries: Vec<wgpu::BindGroupLayoutEntry> = slots(k)
                    .iter()
                    .enumerate()
                    .map(|(i, s)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: match s {
                                Slot::Uniform => wgpu::BufferBindingType::Uniform,
                                Slot::Read => wgpu::BufferBindingType::Storage { read_only: true },
                                Slot::Write => wgpu::BufferBindingType::Storage { read_only: false },
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
            layout: Some(&self.layouts[&kernel].1),
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
            layout: &self.layouts[&kernel].0,
            entries: &entries,
        })
    }

    /// Lanes that cooperate on one matmul row on this adapter.
    pub fn matmul_split(&self) -> u32 {
        if self.ctx.is_cpu { 1 } else { 32 }
    }

    /// The matmul pipeline for `format`.
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
}

/// Tokens one matmul invocation serves (`TILE_T` in matmul.wgsl).
pub const MATMUL_TILE: usize = 8;
