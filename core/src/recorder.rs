//! Recording a step's dispatches, counted, and when profiling timed one by one on the GPU.
//!
//! Without profiling every dispatch goes into one open compute pass. With profiling each gets a
//! pass of its own whose start and end write GPU timestamps; the step resolves them and the
//! profile sums the time per kernel with the bytes and operations each dispatch was said to do.

use std::collections::HashMap;
use std::time::Duration;

use tandem_shaders::{Kernel, WeightFormat};

use crate::error::{Error, Result};
use crate::gpu::GpuContext;

/// What one dispatch does, for the profile.
#[derive(Clone, Copy, Debug)]
pub struct Work {
    pub kernel: Kernel,
    /// The weight format, for kernels that read weights.
    pub format: Option<WeightFormat>,
    /// Bytes it must read and write at least.
    pub bytes: u64,
    /// Floating-point operations.
    pub flops: u64,
}

impl Work {
    /// A kernel that reads no weights.
    pub fn of(kernel: Kernel, bytes: u64, flops: u64) -> Self {
        Work { kernel, format: None, bytes, flops }
    }
}

/// Per-kernel totals over the profiled steps.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct KernelTime {
    /// The kernel, and its weight format where it has one: `matvec.q4_0`.
    pub name: String,
    pub calls: u64,
    pub gpu_ns: u64,
    pub bytes: u64,
    pub flops: u64,
}

impl KernelTime {
    /// GB/s over the kernel's GPU time.
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.gpu_ns.max(1) as f64
    }

    /// TFLOP/s over the kernel's GPU time.
    pub fn tflop_per_s(&self) -> f64 {
        self.flops as f64 / self.gpu_ns.max(1) as f64 / 1000.0
    }
}

/// Most dispatches one profiled step may time.
const MAX_TIMED: u32 = 2048;

/// Timestamp queries and the totals they add up to.
pub struct Profiler {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    read: wgpu::Buffer,
    pending: Vec<Work>,
    totals: HashMap<(Kernel, Option<WeightFormat>), KernelTime>,
    period_ns: f64,
}

impl Profiler {
    /// Fails on adapters without timestamp queries.
    pub fn new(ctx: &GpuContext) -> Result<Self> {
        if !ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Err(Error::Gpu { op: "profiling".into(), reason: format!("{} has no timestamp queries", ctx.adapter) });
        }
        let queries = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: MAX_TIMED * 2,
        });
        let bytes = u64::from(MAX_TIMED) * 2 * 8;
        let resolved = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile.resolved"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = ctx.readback("profile.read", bytes);
        Ok(Profiler {
            queries,
            resolved,
            read,
            pending: Vec::new(),
            totals: HashMap::new(),
            period_ns: f64::from(ctx.queue.get_timestamp_period()),
        })
    }

    /// Reads the timestamps of the step submitted as `done` into the totals.
    pub fn collect(&mut self, ctx: &GpuContext, done: wgpu::SubmissionIndex) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = self.pending.len() as u64 * 16;
        let stamps: Vec<u64> = bytemuck::cast_slice(&ctx.read_mapped(&self.read, bytes, done)?).to_vec();
        for (work, pair) in self.pending.drain(..).zip(stamps.chunks_exact(2)) {
            let t = self.totals.entry((work.kernel, work.format)).or_insert_with(|| {
                let name = match work.format {
                    Some(f) => format!("{}.{}", work.kernel.name(), f.name()),
                    None => work.kernel.name().to_string(),
                };
                KernelTime { name, ..Default::default() }
            });
            t.calls += 1;
            t.gpu_ns += (pair[1].saturating_sub(pair[0]) as f64 * self.period_ns) as u64;
            t.bytes += work.bytes;
            t.flops += work.flops;
        }
        Ok(())
    }

    /// The totals so far, the slowest kernel first, and clears them.
    pub fn take(&mut self) -> Vec<KernelTime> {
        let mut v: Vec<KernelTime> = std::mem::take(&mut self.totals).into_values().collect();
        v.sort_by_key(|t| std::cmp::Reverse(t.gpu_ns));
        v
    }

    /// GPU time of every kernel in the totals.
    pub fn total(times: &[KernelTime]) -> Duration {
        Duration::from_nanos(times.iter().map(|t| t.gpu_ns).sum())
    }
}

/// One step's command encoder with its open compute pass.
pub struct Recorder<'p> {
    device: wgpu::Device,
    enc: wgpu::CommandEncoder,
    pass: Option<wgpu::ComputePass<'static>>,
    profiler: Option<&'p mut Profiler>,
    dispatches: usize,
}

impl<'p> Recorder<'p> {
    pub fn new(ctx: &GpuContext, mut profiler: Option<&'p mut Profiler>) -> Self {
        // Timings of a step that failed before they were collected are dropped, not resolved
        // as this step's.
        if let Some(p) = profiler.as_deref_mut() {
            p.pending.clear();
        }
        let enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        Recorder { device: ctx.device.clone(), enc, pass: None, profiler, dispatches: 0 }
    }

    /// Records one dispatch of `pipeline` over `groups` workgroups.
    pub fn dispatch(&mut self, work: Work, pipeline: &wgpu::ComputePipeline, bind_group: &wgpu::BindGroup, groups: [u32; 3]) {
        self.dispatches += 1;
        let timed = match self.profiler.as_deref_mut() {
            Some(p) if (p.pending.len() as u32) < MAX_TIMED => {
                let i = p.pending.len() as u32;
                p.pending.push(work);
                Some((i, &p.queries))
            }
            _ => None,
        };
        if let Some((i, queries)) = timed {
            self.pass = None;
            let mut pass = self.enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(work.kernel.name()),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: queries,
                    beginning_of_pass_write_index: Some(2 * i),
                    end_of_pass_write_index: Some(2 * i + 1),
                }),
            });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
            return;
        }
        let pass = self.pass.get_or_insert_with(|| {
            self.enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("step"), timestamp_writes: None }).forget_lifetime()
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }

    /// The encoder, for copies between dispatches (closes the open pass).
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        &mut self.enc
    }

    /// Submits what is recorded so far and starts a new command buffer.
    pub fn submit(&mut self, queue: &wgpu::Queue) -> wgpu::SubmissionIndex {
        self.pass = None;
        let next = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        queue.submit([std::mem::replace(&mut self.enc, next).finish()])
    }

    /// Dispatches recorded so far.
    pub fn dispatches(&self) -> usize {
        self.dispatches
    }

    /// The finished command buffer, with the profile's timestamps resolved into it.
    pub fn finish(mut self) -> wgpu::CommandBuffer {
        self.pass = None;
        if let Some(p) = self.profiler.take()
            && !p.pending.is_empty()
        {
            let n = p.pending.len() as u32 * 2;
            self.enc.resolve_query_set(&p.queries, 0..n, &p.resolved, 0);
            self.enc.copy_buffer_to_buffer(&p.resolved, 0, &p.read, 0, u64::from(n) * 8);
        }
        self.enc.finish()
    }
}
