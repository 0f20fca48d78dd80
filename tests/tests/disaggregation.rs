//! Disaggregation through the scheduler, in one process: a prefill scheduler exports a request's
//! K/V as it computes it, a decode scheduler parks and imports it and decodes from it; a decoding
//! request detached from one scheduler continues on another from its moved K/V. The tokens equal
//! a single scheduler's, and nothing is recomputed where K/V was imported.

use std::sync::mpsc;

use tandem_core::KvLayer;
use tandem_core::scheduler::{Event, KvExport, Request, RequestId, Scheduler, SchedulerConfig, Start};
use tandem_core::{Engine, EngineConfig, SamplingParams};
use tandem_tests::{assert_varied, gpu, tiny_model, tiny_tokens};

const NEW_TOKENS: usize = 6;

fn scheduler(max_batch_tokens: usize) -> Scheduler {
    let ecfg =
        EngineConfig { max_batch_tokens, context_length: 256, kv_blocks: 0, max_sequences: 4, deterministic: true, ..Default::default() };
    Scheduler::new(Engine::new(gpu(), tiny_model(), &ecfg).expect("engine"), SchedulerConfig::default())
}

fn prompt() -> Vec<u32> {
    tiny_tokens("The keeper of the lighthouse wrote in his log that the storm had lasted three days and that the supply boat")
}

fn request(prompt: Vec<u32>, max_tokens: usize, resumed: Vec<u32>) -> Request {
    Request { prompt, max_tokens, sampling: SamplingParams::greedy(), stop_ids: Vec::new(), resumed }
}

fn run(s: &mut Scheduler) {
    let mut steps = 0;
    while s.has_work() {
        s.step().expect("step");
        steps += 1;
        assert!(steps < 10_000, "progress");
    }
}

fn tokens_of(rx: &mpsc::Receiver<Event>) -> Vec<u32> {
    rx.try_iter().filter_map(|e| if let Event::Token(t) = e { Some(t) } else { None }).collect()
}

struct Collect(mpsc::Sender<KvLayer>);

impl KvExport for Collect {
    fn layer(&mut self, kv: KvLayer) -> bool {
        self.0.send(kv).is_ok()
    }
}

#[test]
fn exported_prefill_imported_and_decoded_elsewhere_gives_the_same_tokens() {
    let prompt = prompt();
    let mut single = scheduler(64);
    let (tx, rx) = mpsc::channel();
    single.submit(RequestId(0), request(prompt.clone(), NEW_TOKENS, vec![]), Box::new(tx)).expect("submit");
    run(&mut single);
    let want = tokens_of(&rx);
    assert_varied(&want);
    assert_eq!(want.len(), NEW_TOKENS);

    // The decode side holds the first block already (an earlier request shared it).
    let mut decode = scheduler(64);
    let (tx, _rx) = mpsc::channel();
    decode.submit(RequestId(0), request(prompt[..20].to_vec(), 1, vec![]), Box::new(tx)).expect("warm");
    run(&mut decode);
    let (ticket, held) = decode.park(prompt.clone()).expect("park");
    assert_eq!(held, 16, "the cached first block is not sent again");

    // Prefill exporting from `held`.
    let mut prefill = scheduler(64);
    let (ktx, krx) = mpsc::channel();
    let (tx, rx) = mpsc::channel();
    let start = Start::Export { sink: Box::new(Collect(ktx)), from: held };
    prefill.submit_with(RequestId(0), request(prompt.clone(), 1, vec![]), Box::new(tx), start).expect("submit");
    run(&mut prefill);
    let first = tokens_of(&rx);
    assert_eq!(first, want[..1]);
    let layers: Vec<KvLayer> = krx.try_iter().collect();
    let n_layers = tiny_model().config.n_layers;
    let sent: usize = layers.iter().filter(|l| l.layer == 0).map(|l| l.tokens).sum();
    assert_eq!(sent, prompt.len() - held, "every position from `held` on, once");
    assert!(layers.iter().all(|l| l.layer < n_layers && l.start >= held));

    // An import out of order is refused and frees the parked sequence: nothing of it stays.
    let (bad_ticket, _) = decode.park(prompt.clone()).expect("park");
    let gap = KvLayer { start: held + 1, ..layers[0].clone() };
    assert!(decode.import(bad_ticket, &gap).is_err());
    assert!(decode.import(bad_ticket, &layers[0]).is_err(), "a failed ticket takes nothing more");
    assert_eq!(decode.parked(), 1, "the failed one is freed");

    for kv in &layers {
        decode.import(ticket, kv).expect("import");
    }
    let (tx, rx) = mpsc::channel();
    let computed_before = decode.stats().prefill_computed_tokens;
    decode
        .submit_with(RequestId(1), request(prompt.clone(), NEW_TOKENS, first.clone()), Box::new(tx), Start::Parked(ticket))
        .expect("submit");
    assert_eq!(decode.parked(), 0);
    run(&mut decode);
    let mut got = first.clone();
    got.extend(tokens_of(&rx));
    assert_eq!(got, want, "split tokens equal the single node's");
    assert_eq!(decode.stats().imported_tokens, (prompt.len() - held) as u64, "every position it lacked was imported");
    assert_eq!(decode.stats().prefill_computed_tokens, computed_before, "decoded from imported K/V, nothing recomputed");
}

#[test]
fn a_detached_request_continues_from_its_moved_kv() {
    let prompt = prompt();
    let mut single = scheduler(64);
    let (tx, rx) = mpsc::channel();
    single.submit(RequestId(0), request(prompt.clone(), NEW_TOKENS, vec![]), Box::new(tx)).expect("submit");
    run(&mut single);
    let want = tokens_of(&rx);

    let mut a = scheduler(64);
    let (tx, rx) = mpsc::channel();
    a.submit(RequestId(0), request(prompt.clone(), NEW_TOKENS, vec![]), Box::new(tx)).expect("submit");
    for _ in 0..3 {
        a.step().expect("step");
    }
    a.detach_all();
    assert!(!a.has_work());
    let events: Vec<Event> = rx.try_iter().collect();
    let delivered: Vec<u32> = events.iter().filter_map(|e| if let Event::Token(t) = e { Some(*t) } else { None }).collect();
    let Some(Event::Detached { tokens, kv }) = events.last() else { panic!("detached last: {events:?}") };
    assert_eq!(tokens[..prompt.len()], prompt[..]);
    assert_eq!(tokens[prompt.len()..], delivered[..], "the tokens so far are every token delivered");
    assert_eq!(kv.len(), tiny_model().config.n_layers);
    assert!(kv.iter().all(|l| l.start == 0 && l.tokens == tokens.len() - 1));

    let mut b = scheduler(64);
    let (ticket, _) = b.park(tokens[..tokens.len() - 1].to_vec()).expect("park");
    for l in kv {
        b.import(ticket, l).expect("import");
    }
    let (tx, rx) = mpsc::channel();
    b.submit_with(RequestId(0), request(prompt.clone(), NEW_TOKENS, delivered.clone()), Box::new(tx), Start::Parked(ticket))
        .expect("submit");
    run(&mut b);
    let mut got = delivered;
    got.extend(tokens_of(&rx));
    assert_eq!(got, want, "no gap, no repeat, the same tokens");
    assert_eq!(b.stats().imported_tokens, (tokens.len() - 1) as u64);
    assert_eq!(b.stats().prefill_computed_tokens, 0, "continued without prefilling");

    // Without the K/V (a lost node), resuming recomputes and still agrees.
    let mut c = scheduler(64);
    let (tx, rx) = mpsc::channel();
    let resumed = want[..2].to_vec();
    c.submit(RequestId(0), request(prompt.clone(), NEW_TOKENS, resumed.clone()), Box::new(tx)).expect("submit");
    run(&mut c);
    let mut got = resumed;
    got.extend(tokens_of(&rx));
    assert_eq!(got, want, "resumed by recomputing prompt and tokens so far");
}
