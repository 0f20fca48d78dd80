//! The GPU: adapter choice, the device with the adapter's own limits, and small buffer helpers.

use std::sync::Arc;

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};

/// A description of an adapter, for listing and logs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// Whether the adapter offers f16 in shaders (SHADER_F16).
    pub f16: bool,
    /// Subgroup widths (min, max), when the adapter offers subgroup operations.
    pub subgroups: Option<(u32, u32)>,
    /// Whether it offers the cooperative matrices the prefill GEMM uses (16x16x16, f16 in, f32 sums).
    pub coop_matrix: bool,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{} {} ({}, {}", self.index, self.name, self.backend, self.device_type)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        if self.f16 {
            f.write_str(", f16")?;
        }
        match self.subgroups {
            Some((lo, hi)) if lo == hi => write!(f, ", subgroups of {lo}")?,
            Some((lo, hi)) => write!(f, ", subgroups of {lo}-{hi}")?,
            None => {}
        }
        if self.coop_matrix {
            f.write_str(", cooperative matrices")?;
        }
        f.write_str(")")
    }
}

fn summarize(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    AdapterSummary {
        index,
        name: info.name,
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: [info.driver, info.driver_info].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" "),
        f16: a.features().contains(wgpu::Features::SHADER_F16),
        subgroups: a.features().contains(wgpu::Features::SUBGROUP).then_some((info.subgroup_min_size, info.subgroup_max_size)),
        coop_matrix: has_coop_matrix(a),
    }
}

#[allow(unsafe_code)]
fn experimental_features_for_coop_matrix() -> wgpu::ExperimentalFeatures {
    // SAFETY: wgpu marks cooperative matrices experimental (its implementation may still have
    // bugs); only gemm_coop.wgsl uses them, in the one configuration the adapter lists, and its
    // results are tested against the CPU on such adapters (scripts/test-gpu).
    unsafe { wgpu::ExperimentalFeatures::enabled() }
}

/// Whether the adapter multiplies 16x16x16 matrices of f16 into f32 sums, per subgroup.
fn has_coop_matrix(a: &wgpu::Adapter) -> bool {
    let wanted = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16;
    a.features().contains(wanted)
        && a.cooperative_matrix_properties().iter().any(|p| {
            (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    })
}

fn adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
}

/// Every adapter wgpu can see.
pub fn list_adapters() -> Vec<AdapterSummary> {
    adapters(&instance()).iter().enumerate().map(|(i, a)| summarize(i, a)).collect()
}

/// The device, its queue and what the kernels need to know about the adapter.
#[derive(Clone, Debug)]
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterSummary,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    /// Which kernel variants the adapter can run (subgroups of 32 lanes, f16 storage).
    pub caps: tandem_shaders::ShaderCaps,
    /// CPU drivers (lavapipe) want one row per invocation and no barriers; GPUs want cooperation.
    pub is_cpu: bool,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
}

impl GpuContext {
    /// Opens `wanted` (an index or a case-insensitive substring of the name), or else the best
    /// adapter: discrete, then integrated, then anything else, then CPU.
    pub fn new(wanted: Option<&str>) -> Result<Self> {
        let instance = instance();
        let all = adapters(&instance);
        if all.is_empty() {
            return Err(Error::NoAdapter { detail: String::new() });
        }
        let adapter = match wanted {
            Some(w) => {
                let found = match w.parse::<usize>() {
                    Ok(i) => all.get(i),
                    Err(_) => all.iter().find(|a| a.get_info().name.to_lowercase().contains(&w.to_lowercase())),
                };
                found.ok_or_else(|| Error::AdapterNotFound {
                    wanted: w.to_string(),
                    available: all.iter().enumerate().map(|(i, a)| summarize(i, a).to_string()).collect::<Vec<_>>().join("; "),
                })?
            }
            None => all
                .iter()
                .min_by_key(|a| match a.get_info().device_type {
                    wgpu::DeviceType::DiscreteGpu => 0,
                    wgpu::DeviceType::IntegratedGpu => 1,
                    wgpu::DeviceType::VirtualGpu => 2,
                    wgpu::DeviceType::Other => 3,
                    wgpu::DeviceType::Cpu => 4,
                })
                .ok_or_else(|| Error::NoAdapter { detail: String::new() })?,
        };
        let index = all.iter().position(|a| std::ptr::eq(a, adapter)).unwrap_or(0);
        let summary = summarize(index, adapter);
        let limits = adapter.limits();
        let mut features = adapter.features() & (wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY);
        // A driver whose f16 shaders misbehave can be run on the f16-free kernels (as llama.cpp's
        // GGML_VK_DISABLE_F16); it also makes an f16-capable adapter a different adapter type.
        if std::env::var("TANDEM_DISABLE_F16").is_ok_and(|v| !v.is_empty() && v != "0") {
            features.remove(wgpu::Features::SHADER_F16);
        }
        let coop_matrix = summary.coop_matrix && features.contains(wgpu::Features::SHADER_F16);
        let experimental_features = if coop_matrix {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
            experimental_features_for_coop_matrix()
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("tandem"),
            required_features: features,
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            experimental_features,
            ..Default::default()
        }))
        .map_err(|e| Error::Device { adapter: summary.to_string(), reason: e.to_string() })?;
        let errors: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!("wgpu: {e}");
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let info = adapter.get_info();
        let is_cpu = info.device_type == wgpu::DeviceType::Cpu;
        let caps = tandem_shaders::ShaderCaps {
            // Our subgroup kernels assume one subgroup per 32 consecutive lanes; adapters whose
            // width varies (Intel) or differs (AMD wave64, lavapipe) use the workgroup fallback.
            subgroups: features.contains(wgpu::Features::SUBGROUP) && info.subgroup_min_size == 32 && info.subgroup_max_size == 32,
            f16: features.contains(wgpu::Features::SHADER_F16),
            // The coop-matrix GEMM splits its workgroup into 32-lane subgroups.
            coop_matrix: coop_matrix && info.subgroup_min_size == 32 && info.subgroup_max_size == 32,
        };
        tracing::info!(adapter = %summary, subgroups = caps.subgroups, f16 = caps.f16, subgroup_sizes = ?(info.subgroup_min_size, info.subgroup_max_size), "GPU device opened");
        Ok(GpuContext { device, queue, adapter: summary, limits, features, caps, is_cpu, errors })
    }

    /// Fails with the first GPU validation error recorded since the last check.
    pub fn check_errors(&self, op: &str) -> Result<()> {
        let mut errs = self.errors.lock().map_err(|_| Error::Gpu { op: op.into(), reason: "error log poisoned".into() })?;
        if errs.is_empty() {
            return Ok(());
        }
        let reason = errs.join("; ");
        errs.clear();
        Err(Error::Gpu { op: op.into(), reason })
    }

    /// The largest buffer one storage binding may cover.
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// A storage buffer of `size` bytes (at least 4), zeroed.
    pub fn storage(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer holding `data`.
    pub fn storage_init(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let mut padded;
        let contents = if data.len().is_multiple_of(4) && !data.is_empty() {
            data
        } else {
            padded = data.to_vec();
            padded.resize(data.len().max(4).next_multiple_of(4), 0);
            &padded
        };
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// A uniform buffer holding `data`.
    pub fn uniform_init(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: data,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// A buffer the CPU can map to read results.
    pub fn readback(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Waits for `submission` and reads `size` bytes of a mapped-readable buffer.
    pub fn read_mapped(&self, buffer: &wgpu::Buffer, size: u64, submission: wgpu::SubmissionIndex) -> Result<Vec<u8>> {
        let slice = buffer.slice(..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::Wait { submission_index: Some(submission), timeout: None })
            .map_err(|e| Error::Gpu { op: "poll".into(), reason: e.to_string() })?;
        rx.recv()
            .map_err(|e| Error::Gpu { op: "map".into(), reason: e.to_string() })?
            .map_err(|e| Error::Gpu { op: "map".into(), reason: e.to_string() })?;
        let out = {
            let view = slice.get_mapped_range().map_err(|e| Error::Gpu { op: "map".into(), reason: e.to_string() })?;
            view.to_vec()
        };
        buffer.unmap();
        self.check_errors("readback")?;
        Ok(out)
    }
}
