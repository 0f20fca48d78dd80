//! Disaggregation in one process: a prefill engine exports each layer's K/V through a `KvSink`,
//! a fresh engine imports it layer by layer and decodes; its tokens equal a plain run's. Also the
//! batch-invariance promises: alone, batched with others, or chunked, the tokens are the same.

use tandem_core::{Engine, EngineConfig, Error, KvDtype, KvLayer, SamplingParams, SeqId, StepInput};
use tandem_tests::{assert_varied, gpu, tiny_model, tiny_tokens};

const PROMPT: &str = "Once upon a time, in a small village by the sea,";
const NEW_TOKENS: usize = 8;

fn engine() -> Engine {
    engine_with(KvDtype::default())
}

fn engine_with(kv_dtype: KvDtype) -> Engine {
    let cfg =
        EngineConfig { max_batch_tokens: 128, context_length: 256, max_sequences: 4, deterministic: true, kv_dtype, ..Default::default() };
    Engine::new(gpu(), tiny_model(), &cfg).expect("engine")
}

fn prompt() -> Vec<u32> {
    tiny_tokens(PROMPT)
}

/// Greedy decode of `n` tokens from `first`, on a sequence whose KV holds the prompt.
fn decode(engine: &mut Engine, seq: SeqId, first: u32, n: usize) -> Vec<u32> {
    let mut out = vec![first];
    while out.len() < n {
        let last = *out.last().expect("a token");
        let t = engine.step(&[StepInput { seq, tokens: vec![last], sample: Some(SamplingParams::greedy()) }]).expect("step")[0];
        out.push(t.expect("sampled"));
    }
    out
}

fn plain_run(engine: &mut Engine, prompt: &[u32], chunk: usize) -> Vec<u32> {
    let seq = engine.create_sequence();
    let chunks: Vec<&[u32]> = prompt.chunks(chunk).collect();
    let mut first = None;
    for (i, c) in chunks.iter().enumerate() {
        let sample = (i + 1 == chunks.len()).then(SamplingParams::greedy);
        first = engine.step(&[StepInput { seq, tokens: c.to_vec(), sample }]).expect("prefill")[0];
    }
    let out = decode(engine, seq, first.expect("first token"), NEW_TOKENS);
    engine.free_sequence(seq);
    out
}

#[test]
fn layerwise_export_then_import_decodes_the_same_tokens() {
    for kv_dtype in [KvDtype::F16, KvDtype::F32] {
        export_then_import_decodes_the_same_tokens(kv_dtype);
    }
}

fn export_then_import_decodes_the_same_tokens(kv_dtype: KvDtype) {
    let prompt = prompt();
    let mut prefill = engine_with(kv_dtype);
    let want = plain_run(&mut prefill, &prompt, 64);

    let seq = prefill.create_sequence();
    let mut layers: Vec<KvLayer> = Vec::new();
    let mut sink = |s: SeqId, kv: KvLayer| -> tandem_core::Result<()> {
        assert_eq!(s, seq);
        assert_eq!(kv.layer, layers.len(), "layers arrive in order");
        layers.push(kv);
        Ok(())
    };
    let first = prefill
        .step_with_sink(&[StepInput { seq, tokens: prompt.clone(), sample: Some(SamplingParams::greedy()) }], &mut sink)
        .expect("prefill with export")[0]
        .expect("first token");
    assert_eq!(layers.len(), tiny_model().config.n_layers);
    assert!(layers.iter().all(|l| l.start == 0 && l.tokens == prompt.len()));
    // What leaves the cache is what it held: re-encoding in its dtype changes nothing.
    for l in &layers {
        assert_eq!(kv_dtype.decode(&kv_dtype.encode(&l.k)), l.k, "{kv_dtype} K of layer {}", l.layer);
    }

    let mut decoder = engine_with(kv_dtype);
    let dseq = decoder.create_sequence();
    // An incomplete import cannot be decoded from.
    decoder.import_kv(dseq, &layers[0]).expect("import layer 0");
    let early = decoder.step(&[StepInput { seq: dseq, tokens: vec![first], sample: Some(SamplingParams::greedy()) }]);
    assert!(matches!(early, Err(Error::KvImport(_))), "decoding before every layer arrived must fail: {early:?}");
    for kv in &layers[1..] {
        decoder.import_kv(dseq, kv).expect("import");
    }
    assert_eq!(decoder.sequence_len(dseq).expect("seq"), prompt.len());
    assert_eq!(decode(&mut decoder, dseq, first, NEW_TOKENS), want, "{kv_dtype} cache");

    // The control: the same import with each position's values moved to the next position's
    // place decodes otherwise, so the tokens above depend on the K/V that travelled.
    let kv_dim = tiny_model().config.kv_dim();
    let wrong = decoder.create_sequence();
    for kv in &layers {
        let mut v = kv.v.clone();
        v.rotate_left(kv_dim);
        decoder.import_kv(wrong, &KvLayer { v, ..kv.clone() }).expect("import");
    }
    assert_ne!(decode(&mut decoder, wrong, first, NEW_TOKENS), want, "{kv_dtype} cache: shifted values must show");
}

#[test]
fn malformed_imports_are_rejected_without_changing_the_cache() {
    let mut e = engine();
    let seq = e.create_sequence();
    let kv_dim = tiny_model().config.kv_dim();
    let good = KvLayer { layer: 0, start: 0, tokens: 2, k: vec![0.0; 2 * kv_dim], v: vec![0.0; 2 * kv_dim] };
    let bad_layer = KvLayer { layer: 999, ..good.clone() };
    let short = KvLayer { k: vec![0.0; kv_dim], ..good.clone() };
    let gap = KvLayer { start: 5, ..good.clone() };
    for bad in [bad_layer, short, gap] {
        assert!(matches!(e.import_kv(seq, &bad), Err(Error::KvImport(_))), "rejected: layer {} start {}", bad.layer, bad.start);
    }
    assert_eq!(e.sequence_len(seq).expect("seq"), 0);
    assert!(matches!(e.import_kv(SeqId(12345), &good), Err(Error::UnknownSequence(_))));
}

#[test]
fn tokens_do_not_depend_on_batching_or_chunking() {
    let prompt = prompt();
    let other = tiny_tokens("def fibonacci(n):");
    let mut e = engine();
    let alone = plain_run(&mut e, &prompt, 64);
    assert_varied(&alone);
    assert_eq!(plain_run(&mut e, &prompt, 3), alone, "chunked prefill");

    // Batched: the other sequence prefills in the same steps, then both decode together.
    let (a, b) = (e.create_sequence(), e.create_sequence());
    let both = |a_tokens: Vec<u32>, b_tokens: Vec<u32>| {
        vec![
            StepInput { seq: a, tokens: a_tokens, sample: Some(SamplingParams::greedy()) },
            StepInput { seq: b, tokens: b_tokens, sample: Some(SamplingParams::greedy()) },
        ]
    };
    let first = e.step(&both(prompt.clone(), other.clone())).expect("batched prefill");
    let (mut ta, mut tb) = (vec![first[0].expect("a")], vec![first[1].expect("b")]);
    while ta.len() < NEW_TOKENS {
        let next = e.step(&both(vec![*ta.last().expect("a")], vec![*tb.last().expect("b")])).expect("batched decode");
        ta.push(next[0].expect("a"));
        tb.push(next[1].expect("b"));
    }
    assert_eq!(ta, alone, "batched with another sequence");
}

#[test]
fn context_and_vocabulary_limits_are_clear_errors() {
    let mut e = engine();
    let seq = e.create_sequence();
    let too_long = vec![1u32; 257];
    let r = e.step(&[StepInput { seq, tokens: too_long[..64].to_vec(), sample: None }]);
    assert!(r.is_ok());
    let over = tandem_core::generate(&mut e, &too_long, 1, SamplingParams::greedy(), &[], |_| Ok(true));
    assert!(matches!(over, Err(Error::ContextOverflow { .. })), "{over:?}");
    let bad = e.step(&[StepInput { seq, tokens: vec![u32::MAX], sample: None }]);
    assert!(matches!(bad, Err(Error::TokenOutOfRange { .. })), "{bad:?}");
    assert_eq!(e.sequence_len(seq).expect("seq"), 64, "a rejected step changes nothing");
}
