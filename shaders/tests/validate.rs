//! Every rendered kernel variant parses and validates with naga, and the CPU-side structs match
//! naga's layout of their WGSL declarations.

use naga::valid::{Capabilities, ValidationFlags, Validator};
use tandem_shaders::{Binding, EmbedParams, Kernel, MatmulParams, SampleParams, ShaderCaps, Step, TokenInfo};

/// What naga may assume for a variant: only the extensions the adapter was said to have, so a
/// fallback that slips into subgroups or f16 fails here.
fn capabilities(caps: ShaderCaps) -> Capabilities {
    let mut c = Capabilities::all() - Capabilities::SUBGROUP - Capabilities::SHADER_FLOAT16 - Capabilities::COOPERATIVE_MATRIX;
    if caps.subgroups {
        c |= Capabilities::SUBGROUP;
    }
    if caps.f16 {
        c |= Capabilities::SHADER_FLOAT16;
    }
    if caps.coop_matrix {
        c |= Capabilities::COOPERATIVE_MATRIX;
    }
    c
}

fn parse(kernel: Kernel, caps: ShaderCaps, source: &str, label: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(source).unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string_with_path(source, label)));
    let info = Validator::new(ValidationFlags::all(), capabilities(caps))
        .validate(&module)
        .unwrap_or_else(|e| panic!("{label} ({kernel:?}): {}", e.emit_to_string_with_path(source, label)));
    (module, info)
}

/// A value for every override that has no default, as core would supply (the sizes here only
/// need to be plausible for the writer).
fn placeholder_constants(module: &naga::Module) -> naga::back::PipelineConstants {
    module.overrides.iter().filter(|(_, o)| o.init.is_none()).filter_map(|(_, o)| Some((o.name.clone()?, 64.0))).collect()
}

/// Override values that change a kernel's shape or path, written too: the wide tile of the
/// matrix units' GEMM, attention's two value runs a lane and sliding window, the norm that adds,
/// GeGLU, the embedding scale.
fn shape_constants(kernel: Kernel) -> &'static [(&'static str, f64)] {
    match kernel {
        Kernel::GemmCoop => &[("TILE_R", 256.0), ("SPLIT_K", 2.0), ("SUM_PASS", 1.0)],
        Kernel::Attention => &[("HEAD_DIM", 256.0), ("WINDOW", 512.0)],
        Kernel::AttentionCoop => &[("HEAD_DIM", 128.0), ("WINDOW", 512.0)],
        Kernel::MatvecQ8Rope | Kernel::MatvecQ8RopeNorm => &[("KV_F16", 0.0)],
        Kernel::RmsNorm => &[("ADD", 1.0)],
        Kernel::SiluMul | Kernel::MatvecQ8Glu | Kernel::MatvecQ8NormGlu => &[("GELU", 1.0)],
        Kernel::Embed => &[("SCALE", 25.0)],
        _ => &[],
    }
}

#[test]
fn every_variant_validates() {
    let mut count = 0;
    for (kernel, format, caps) in Kernel::variants() {
        let label = match format {
            Some(f) => format!("{}.{}.{caps:?}.wgsl", kernel.name(), f.name()),
            None => format!("{}.{caps:?}.wgsl", kernel.name()),
        };
        let source = kernel.source(format, caps).expect("variant renders");
        let (module, info) = parse(kernel, caps, &source, &label);
        // What wgpu's Vulkan backend does with it (lavapipe runs no cooperative matrices, so
        // nothing else here would reach the writer for those variants).
        let base = placeholder_constants(&module);
        for extra in std::iter::once(None).chain(shape_constants(kernel).iter().map(Some)) {
            let mut constants = base.clone();
            constants.extend(extra.map(|&(k, v)| (k.to_string(), v)));
            let (module, info) =
                naga::back::pipeline_constants::process_overrides(&module, &info, Some((naga::ShaderStage::Compute, "main")), &constants)
                    .unwrap_or_else(|e| panic!("{label} {extra:?}: overrides: {e}"));
            naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None)
                .unwrap_or_else(|e| panic!("{label} {extra:?}: SPIR-V: {e}"));
        }
        count += 1;
    }
    // 2 plain kernels and the 3 that write 8-bit activations (the norm, SiLU·mul, the merge) with
    // and without subgroups, rope_kv and norm_rope_kv for the 2 K/V cache formats, attention for
    // both with and without subgroups, attention_coop for the f16 cache, embed and gemm in the 12
    // device layouts plus native f16, matmul and matvec likewise, each with and without
    // subgroups, gemm_coop in the 12 layouts (it needs f16, so F16 weights are read natively), and
    // matvec_q8 in the 9 layouts with a packed-byte dot, with and without subgroups, and
    // matvec_q8_rope, and the two that norm their input, and the two gate/up ones with the gated
    // activation, and the output projection's that merges attention's chunks, likewise. Q3_K
    // renders as its device layout's variants.
    assert_eq!(count, 2 + 3 * 2 + 2 * 2 + 2 * 2 + 1 + 13 + 13 + 2 * 13 * 2 + 12 + 7 * 9 * 2);
}

/// What each kernel says it binds (its layout in core) is what its WGSL declares.
#[test]
fn declared_bindings_match_the_wgsl() {
    for (kernel, format, caps) in Kernel::variants() {
        let source = kernel.source(format, caps).expect("variant renders");
        let (module, _) = parse(kernel, caps, &source, kernel.name());
        let mut found: Vec<(u32, Binding)> = module
            .global_variables
            .iter()
            .filter_map(|(_, g)| {
                let b = g.binding.as_ref()?;
                assert_eq!(b.group, 0, "{kernel:?}: every binding is in group 0");
                let kind = match g.space {
                    naga::AddressSpace::Uniform => Binding::Uniform,
                    naga::AddressSpace::Storage { access } if access.contains(naga::StorageAccess::STORE) => Binding::Write,
                    naga::AddressSpace::Storage { .. } => Binding::Read,
                    other => panic!("{kernel:?}: binding {} in {other:?}", b.binding),
                };
                Some((b.binding, kind))
            })
            .collect();
        found.sort_by_key(|(i, _)| *i);
        let declared: Vec<(u32, Binding)> = kernel.bindings().iter().enumerate().map(|(i, b)| (i as u32, *b)).collect();
        assert_eq!(found, declared, "{kernel:?} {format:?} {caps:?}");
    }
}

#[test]
fn impossible_variants_are_refused() {
    assert!(Kernel::Matmul.source(None, ShaderCaps::default()).is_err());
    let no_coop = ShaderCaps { subgroups: true, f16: true, coop_matrix: false };
    assert!(Kernel::GemmCoop.source(Some(tandem_shaders::WeightFormat::Q4_0), no_coop).is_err());
    assert!(Kernel::RmsNorm.source(Some(tandem_shaders::WeightFormat::F16), ShaderCaps::default()).is_err());
}

fn struct_size(module: &naga::Module, name: &str) -> u32 {
    let (_, ty) = module.types.iter().find(|(_, t)| t.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("struct {name} not found"));
    ty.inner.size(module.to_ctx())
}

#[test]
fn cpu_structs_match_wgsl_layout() {
    let checks: [(Kernel, Option<tandem_shaders::WeightFormat>, &str, usize); 5] = [
        (Kernel::RmsNorm, None, "Step", size_of::<Step>()),
        (Kernel::RmsNorm, None, "TokenInfo", size_of::<TokenInfo>()),
        (Kernel::Matmul, Some(tandem_shaders::WeightFormat::Q4_1), "MatmulParams", size_of::<MatmulParams>()),
        (Kernel::Embed, Some(tandem_shaders::WeightFormat::F32), "EmbedParams", size_of::<EmbedParams>()),
        (Kernel::Sample, None, "SampleParams", size_of::<SampleParams>()),
    ];
    for (kernel, format, name, rust_size) in checks {
        let source = kernel.source(format, ShaderCaps::default()).expect("variant renders");
        let (module, _) = parse(kernel, ShaderCaps::default(), &source, kernel.name());
        assert_eq!(struct_size(&module, name) as usize, rust_size, "size of {name}");
    }
}

/// Invariant I11: pipelines are built without naga's loop bounding (core's `Kernels`), so every
/// loop must end by its own bound. Only `for` loops with a comparison for their condition;
/// their bounds are override constants or step data the engine wrote.
#[test]
fn every_loop_is_a_bounded_for() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wgsl");
    let mut fors = 0;
    for entry in std::fs::read_dir(&dir).expect("wgsl dir") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("wgsl file");
        let code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
        let words = code.split(|c: char| !(c.is_alphanumeric() || c == '_'));
        for word in words {
            assert!(word != "loop" && word != "while", "{}: `{word}` (only bounded `for` loops, invariant I11)", path.display());
        }
        for (i, _) in code.match_indices("for (") {
            let header = &code[i..code[i..].find('{').map_or(code.len(), |e| i + e)];
            let condition = header.split(';').nth(1).unwrap_or("");
            assert!(condition.contains('<') || condition.contains('>'), "{}: `{header}` has no bound", path.display());
            fors += 1;
        }
    }
    assert!(fors > 50, "found only {fors} loops: is the wgsl directory where it was?");
}

/// attention.wgsl's chunk (its workgroup, a lane a position) is the `ATTENTION_CHUNK` the engine
/// packs partials and sizes the merge by.
#[test]
fn attention_chunk_is_the_engines() {
    let coop = ShaderCaps { subgroups: true, f16: true, coop_matrix: true };
    for (kernel, caps, name, want) in [
        (Kernel::Attention, ShaderCaps::ALL[0], "CHUNK", tandem_shaders::ATTENTION_CHUNK),
        (Kernel::AttentionCoop, coop, "CHUNK", tandem_shaders::ATTENTION_CHUNK),
        (Kernel::AttentionCoop, coop, "ROWS", tandem_shaders::ATTENTION_TILE_ROWS),
    ] {
        let source = kernel.source(Some(tandem_shaders::WeightFormat::F16), caps).expect("renders");
        let (module, _) = parse(kernel, caps, &source, kernel.name());
        let (_, c) = module.constants.iter().find(|(_, c)| c.name.as_deref() == Some(name)).expect("the constant");
        match module.global_expressions[c.init] {
            naga::Expression::Literal(naga::Literal::U32(v)) => assert_eq!(v, want, "{kernel:?} {name}"),
            ref other => panic!("{kernel:?} {name} is {other:?}, not a u32 literal"),
        }
    }
}
