//! A model split into layer spans (`EngineConfig::layers`), each on its own engine, with the
//! residual stream handed from one to the next (`Engine::step_span`), gives the tokens of one
//! engine holding every layer: for a prompt, its decode steps, and a batch mixing a prefill with
//! another sequence's decode. And a stage refuses what it cannot do. On the synthetic `tiny`
//! model, in both modes.

use tandem_core::synthetic::synthetic_model;
use tandem_core::{Engine, EngineConfig, GpuContext, HostModel, SamplingParams, SeqId, StepInput, WeightFormat};

fn engine(gpu: &GpuContext, model: &HostModel, deterministic: bool, layers: Option<std::ops::Range<usize>>) -> Engine {
    let cfg = EngineConfig { max_batch_tokens: 64, context_length: 256, deterministic, layers, ..Default::default() };
    Engine::new(gpu, model, &cfg).expect("engine")
}

fn prompt(salt: u32) -> Vec<u32> {
    (0..40).map(|i| (i * 37 + 5 + salt) % 500).collect()
}

/// A chain of stages run one after another, as nodes of a mesh would.
struct Chain(Vec<Engine>);

impl Chain {
    fn create(&mut self) -> Vec<SeqId> {
        self.0.iter_mut().map(|e| e.create_sequence()).collect()
    }

    /// One step over every stage; `inputs` name each sequence by its index in `seqs`.
    fn step(&mut self, seqs: &[Vec<SeqId>], inputs: &[(usize, Vec<u32>, Option<SamplingParams>)]) -> Vec<Option<u32>> {
        let mut hidden: Option<Vec<f32>> = None;
        let n = self.0.len();
        for (stage, e) in self.0.iter_mut().enumerate() {
            let step: Vec<StepInput> = inputs
                .iter()
                .map(|(s, tokens, sample)| StepInput {
                    seq: seqs[*s][stage],
                    tokens: tokens.clone(),
                    sample: if stage + 1 == n { *sample } else { None },
                })
                .collect();
            let out = e.step_span(&step, hidden.as_deref()).expect("stage step");
            if stage + 1 == n {
                assert!(out.hidden.is_none(), "the last stage samples");
                return out.tokens;
            }
            hidden = Some(out.hidden.expect("a stage before the last hands on its hidden states"));
        }
        unreachable!("a chain has stages")
    }
}

fn generate_whole(e: &mut Engine, prompt: &[u32], steps: usize) -> Vec<u32> {
    let seq = e.create_sequence();
    let greedy = SamplingParams::greedy();
    let mut next = tandem_core::prefill(e, seq, prompt, greedy).expect("prefill").expect("token");
    let mut out = vec![next];
    for _ in 1..steps {
        next = e.step(&[StepInput { seq, tokens: vec![next], sample: Some(greedy) }]).expect("step")[0].expect("token");
        out.push(next);
    }
    e.free_sequence(seq);
    out
}

#[test]
fn a_chain_of_spans_gives_the_tokens_of_the_whole_model() {
    let gpu = GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter");
    let model = synthetic_model("tiny", WeightFormat::Q4_0, 3).expect("tiny model");
    let n = model.config.n_layers;
    assert!(n >= 2, "tiny has layers to split");
    let greedy = Some(SamplingParams::greedy());
    for deterministic in [true, false] {
        let mut whole = engine(&gpu, &model, deterministic, None);
        let (a, b) = (prompt(0), prompt(101));
        let want_a = generate_whole(&mut whole, &a, 12);
        let want_b = generate_whole(&mut whole, &b, 12);

        let mut chain = Chain(vec![engine(&gpu, &model, deterministic, Some(0..1)), engine(&gpu, &model, deterministic, Some(1..n))]);
        assert_eq!(chain.0[0].span(), 0..1);
        assert_eq!(chain.0[1].span(), 1..n);
        let seqs = vec![chain.create(), chain.create()];

        // Sequence a alone: its prompt in two chunks, then a few decode steps.
        chain.step(&seqs, &[(0, a[..24].to_vec(), None)]);
        let mut got_a = vec![chain.step(&seqs, &[(0, a[24..].to_vec(), greedy)])[0].expect("token")];
        for _ in 0..4 {
            let next = chain.step(&seqs, &[(0, vec![*got_a.last().expect("a token")], greedy)])[0].expect("token");
            got_a.push(next);
        }
        // Then b's whole prompt in the same steps as a's decoding, in both orders.
        let out = chain.step(&seqs, &[(0, vec![*got_a.last().expect("a token")], greedy), (1, b.clone(), greedy)]);
        got_a.push(out[0].expect("a's token"));
        let mut got_b = vec![out[1].expect("b's token")];
        while got_b.len() < 12 {
            let out = chain
                .step(&seqs, &[(1, vec![*got_b.last().expect("a token")], greedy), (0, vec![*got_a.last().expect("a token")], greedy)]);
            got_b.push(out[0].expect("b's token"));
            if got_a.len() < 12 {
                got_a.push(out[1].expect("a's token"));
            }
        }
        assert_eq!(got_a, want_a, "sequence a, deterministic {deterministic}");
        assert_eq!(got_b, want_b, "sequence b, deterministic {deterministic}");
    }
}

#[test]
fn a_stage_refuses_what_its_span_cannot_do() {
    let gpu = GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter");
    let model = synthetic_model("tiny", WeightFormat::Q4_0, 3).expect("tiny model");
    let n = model.config.n_layers;
    let greedy = Some(SamplingParams::greedy());
    let width = model.config.hidden_size;

    let mut first = engine(&gpu, &model, true, Some(0..1));
    let seq = first.create_sequence();
    let err = first.step(&[StepInput { seq, tokens: vec![1, 2], sample: None }]).expect_err("a first stage has no head");
    assert!(err.to_string().contains("step_span"), "{err}");
    let err = first.step_span(&[StepInput { seq, tokens: vec![1, 2], sample: greedy }], None).expect_err("no sampling");
    assert!(err.to_string().contains("cannot sample"), "{err}");
    let err = first.step_span(&[StepInput { seq, tokens: vec![1, 2], sample: None }], Some(&vec![0.0; 2 * width])).expect_err("embeds");
    assert!(err.to_string().contains("no hidden states"), "{err}");
    let out = first.step_span(&[StepInput { seq, tokens: vec![1, 2], sample: None }], None).expect("a first stage's step");
    assert_eq!(out.hidden.expect("hidden").len(), 2 * width);
    assert_eq!(first.sequence_len(seq).expect("len"), 2);

    let mut last = engine(&gpu, &model, true, Some(1..n));
    let seq = last.create_sequence();
    let err = last.step_span(&[StepInput { seq, tokens: vec![1, 2], sample: greedy }], None).expect_err("needs hidden");
    assert!(err.to_string().contains("hidden states before layer 1"), "{err}");
    let err = last.step_span(&[StepInput { seq, tokens: vec![1, 2], sample: greedy }], Some(&vec![0.0; width])).expect_err("short");
    assert!(err.to_string().contains("hidden values"), "{err}");
    assert_eq!(last.sequence_len(seq).expect("len"), 0, "a refused step leaves the sequence as it was");
    let err = last.decode_run(seq, 1, 4, SamplingParams::greedy(), |_| Ok(true)).expect_err("a stage cannot run alone");
    assert!(!err.to_string().is_empty());

    for bad in [1..1, 0..n + 1, std::ops::Range { start: 2, end: 1 }] {
        let cfg = EngineConfig { layers: Some(bad.clone()), ..Default::default() };
        let Err(err) = Engine::new(&gpu, &model, &cfg) else { panic!("the span {bad:?} is refused") };
        assert!(err.to_string().contains("layers"), "{bad:?}: {err}");
    }
}

/// Stage sessions on GPU workers (`WorkerHandle::stage_*`), as a node runs them: two requests
/// stepped concurrently through two workers give the whole model's tokens, a step out of order
/// is refused, and a worker holding a span refuses whole requests.
#[test]
fn stage_sessions_on_workers_give_the_whole_models_tokens() {
    use std::sync::mpsc::channel;
    use tandem_core::scheduler::{Event, Request, Scheduler, SchedulerConfig};
    use tandem_core::stage::{StageOut, StageStep};
    use tandem_core::worker::WorkerHandle;

    let gpu = GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter");
    let model = synthetic_model("tiny", WeightFormat::Q4_0, 3).expect("tiny model");
    let n = model.config.n_layers;
    let mut whole = engine(&gpu, &model, true, None);
    let prompts = [prompt(3), prompt(77)];
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| generate_whole(&mut whole, p, 8)).collect();

    let workers: Vec<WorkerHandle> = [0..1, 1..n]
        .into_iter()
        .map(|span| {
            WorkerHandle::spawn(Scheduler::new(engine(&gpu, &model, true, Some(span)), SchedulerConfig::default())).expect("worker")
        })
        .collect();
    let open = |w: &WorkerHandle| {
        let (tx, rx) = channel();
        w.stage_open(128, Box::new(move |r| tx.send(r).expect("answer"))).expect("queued");
        rx.recv().expect("reply").expect("opened")
    };
    let sessions: Vec<[u64; 2]> = prompts.iter().map(|_| [open(&workers[0]), open(&workers[1])]).collect();
    // Both requests' steps are queued at a stage before either is answered: they may batch.
    let step_all = |inputs: Vec<(usize, usize, Vec<u32>)>| -> Vec<u32> {
        let mut hidden: Vec<Option<Vec<f32>>> = vec![None; inputs.len()];
        for (stage, w) in workers.iter().enumerate() {
            let rxs: Vec<_> = inputs
                .iter()
                .zip(&hidden)
                .map(|((r, start, tokens), h)| {
                    let (tx, rx) = channel();
                    let step = StageStep {
                        start: *start,
                        tokens: tokens.clone(),
                        hidden: h.clone(),
                        sample: (stage == 1).then(SamplingParams::greedy),
                    };
                    w.stage_step(sessions[*r][stage], step, Box::new(move |o| tx.send(o).expect("answer"))).expect("queued");
                    rx
                })
                .collect();
            let outs: Vec<StageOut> = rxs.into_iter().map(|rx| rx.recv().expect("reply").expect("step")).collect();
            if stage == 1 {
                return outs.into_iter().map(|o| if let StageOut::Token(Some(t)) = o { t } else { panic!("{o:?}") }).collect();
            }
            hidden = outs.into_iter().map(|o| if let StageOut::Hidden(h) = o { Some(h) } else { panic!("{o:?}") }).collect();
        }
        unreachable!()
    };
    let mut got: Vec<Vec<u32>> =
        step_all(prompts.iter().enumerate().map(|(r, p)| (r, 0, p.clone())).collect()).into_iter().map(|t| vec![t]).collect();
    for i in 1..8 {
        let next = step_all(got.iter().enumerate().map(|(r, g)| (r, prompts[r].len() + i - 1, vec![g[i - 1]])).collect());
        for (g, t) in got.iter_mut().zip(next) {
            g.push(t);
        }
    }
    assert_eq!(got, want);

    let (tx, rx) = channel();
    let step = StageStep { start: 3, tokens: vec![1], hidden: None, sample: None };
    workers[0].stage_step(sessions[0][0], step, Box::new(move |o| tx.send(o).expect("answer"))).expect("queued");
    let err = rx.recv().expect("reply").expect_err("out of order");
    assert!(err.to_string().contains("position 3"), "{err}");

    let (tx, rx) = channel();
    let req = Request { prompt: vec![1, 2, 3], max_tokens: 2, sampling: SamplingParams::greedy(), stop_ids: vec![], resumed: vec![] };
    let _ = workers[0].submit(req, Box::new(tx));
    match rx.recv().expect("event") {
        Event::Refused { reason, .. } => assert!(reason.contains("stages of chains"), "{reason}"),
        other => panic!("{other:?}"),
    }
    for (stage, w) in workers.iter().enumerate() {
        for s in &sessions {
            w.stage_close(s[stage]);
        }
        w.request_stop(false);
        w.join();
    }
}

/// A chain split into prefill and decode, on GPU workers as nodes run it: the prompt runs
/// through prefill stages, each of which hands the K/V of its span, step by step, to the decode
/// stage holding the same span (`stage_export` into `stage_import`); the decode stages then go
/// on from the first token with the whole model's tokens. A session takes no K/V beyond the
/// positions it reserved.
#[test]
fn a_prefill_chain_hands_each_spans_kv_to_the_decode_stage_of_that_span() {
    use std::sync::mpsc::channel;
    use tandem_core::scheduler::{Scheduler, SchedulerConfig};
    use tandem_core::stage::{StageOut, StageStep};
    use tandem_core::worker::WorkerHandle;

    let gpu = GpuContext::new(std::env::var("TANDEM_ADAPTER").ok().as_deref()).expect("a GPU adapter");
    let model = synthetic_model("tiny", WeightFormat::Q4_0, 3).expect("tiny model");
    let n = model.config.n_layers;
    let p = prompt(11);
    let want = generate_whole(&mut engine(&gpu, &model, true, None), &p, 6);

    let spawn = |span: std::ops::Range<usize>| {
        WorkerHandle::spawn(Scheduler::new(engine(&gpu, &model, true, Some(span)), SchedulerConfig::default())).expect("worker")
    };
    let prefill = [spawn(0..1), spawn(1..n)];
    let decode = [spawn(0..1), spawn(1..n)];
    let open = |w: &WorkerHandle, positions: usize| {
        let (tx, rx) = channel();
        w.stage_open(positions, Box::new(move |r| tx.send(r).expect("answer"))).expect("queued");
        rx.recv().expect("reply").expect("opened")
    };
    let p_sessions = [open(&prefill[0], p.len()), open(&prefill[1], p.len())];
    let d_sessions = [open(&decode[0], p.len() + 8), open(&decode[1], p.len() + 8)];
    let run = |workers: &[WorkerHandle; 2], sessions: [u64; 2], start: usize, tokens: &[u32], sample: bool| -> Option<u32> {
        let mut hidden = None;
        for (stage, w) in workers.iter().enumerate() {
            let (tx, rx) = channel();
            let step = StageStep {
                start,
                tokens: tokens.to_vec(),
                hidden: hidden.take(),
                sample: (stage == 1 && sample).then(SamplingParams::greedy),
            };
            w.stage_step(sessions[stage], step, Box::new(move |o| tx.send(o).expect("answer"))).expect("queued");
            match rx.recv().expect("reply").expect("step") {
                StageOut::Hidden(h) => hidden = Some(h),
                StageOut::Token(t) => return t,
            }
        }
        None
    };
    // The prompt in two steps; after each, every prefill stage hands its span's new K/V on.
    let mut first = None;
    for (from, to) in [(0, 24), (24, p.len())] {
        first = run(&prefill, p_sessions, from, &p[from..to], to == p.len());
        for stage in 0..2 {
            let (tx, rx) = channel();
            prefill[stage].stage_export(p_sessions[stage], from, to, Box::new(move |r| tx.send(r).expect("answer"))).expect("queued");
            let layers = rx.recv().expect("reply").expect("exported");
            assert_eq!(layers.len(), if stage == 0 { 1 } else { n - 1 }, "the span's layers");
            for layer in layers {
                decode[stage].stage_import(d_sessions[stage], layer).expect("queued");
            }
        }
    }
    let held = |w: &WorkerHandle, s: u64| {
        let (tx, rx) = channel();
        w.stage_held(s, Box::new(move |r| tx.send(r).expect("answer"))).expect("queued");
        rx.recv().expect("reply").expect("held")
    };
    for stage in 0..2 {
        assert_eq!(held(&decode[stage], d_sessions[stage]), p.len(), "decode stage {stage} holds the prompt");
    }
    let mut got = vec![first.expect("the prefill chain's first token")];
    for i in 1..6 {
        got.push(run(&decode, d_sessions, p.len() + i - 1, &[got[i - 1]], true).expect("token"));
    }
    assert_eq!(got, want, "the decode chain goes on from the handed K/V");

    // Beyond the positions a session reserved, K/V is refused.
    let small = open(&decode[0], 4);
    let (tx, rx) = channel();
    prefill[0].stage_export(p_sessions[0], 0, 8, Box::new(move |r| tx.send(r).expect("answer"))).expect("queued");
    for layer in rx.recv().expect("reply").expect("exported") {
        decode[0].stage_import(small, layer).expect("queued");
    }
    assert_eq!(held(&decode[0], small), 0, "nothing beyond the reservation was taken");
    for w in prefill.iter().chain(&decode) {
        w.request_stop(false);
        w.join();
    }
}
