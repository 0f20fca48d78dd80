//! Chat templates of instruction-tuned models (Qwen2.5, Qwen3, Phi-3.5, Gemma 2/3, Llama 3.2,
//! Mistral Nemo, SmolLM3; `tests/fixtures/templates/`, from llama.cpp's copies) rendered by
//! tandem's renderer as Jinja2 renders them set up as Hugging Face transformers sets it up
//! (`make.py`): the same text for every conversation (Llama 3.2's with the date `strftime_now`
//! gives), and an error where Jinja2 refuses one.

use std::path::PathBuf;

use serde::Deserialize;
use tandem_core::{ChatMessage, HostModel};

#[derive(Deserialize)]
struct Case {
    template: String,
    conversation: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    text: Option<String>,
}

#[derive(Deserialize)]
struct Renderings {
    bos_token: String,
    eos_token: String,
    /// What `strftime_now` reads, in seconds since 1970 (UTC).
    now: u64,
    cases: Vec<Case>,
}

#[test]
fn chat_templates_render_as_transformers_renders_them() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let dir = root.join("templates");
    let r: Renderings = serde_json::from_str(&std::fs::read_to_string(dir.join("renderings.json")).expect("renderings")).expect("parses");
    // A vocabulary whose BOS and EOS are `<s>` and `</s>`, as the renderings were given.
    let mut tokenizer = HostModel::load(&root.join("families/qwen2-tiny.gguf")).expect("model").tokenizer;
    assert_eq!(tokenizer.id_to_token(tokenizer.bos_id.expect("bos")).as_deref(), Some(r.bos_token.as_str()));
    assert_eq!(tokenizer.id_to_token(tokenizer.eos_id.expect("eos")).as_deref(), Some(r.eos_token.as_str()));
    assert!(r.cases.len() >= 40, "{} cases", r.cases.len());
    for case in &r.cases {
        tokenizer.chat_template = Some(std::fs::read_to_string(dir.join(&case.template)).expect("template"));
        let what = format!("{} `{}` (generation prompt: {})", case.template, case.conversation, case.add_generation_prompt);
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.now);
        let got = tokenizer.apply_chat_template_at(&case.messages, case.add_generation_prompt, now);
        match (&case.text, got) {
            (Some(want), Ok(got)) => assert_eq!(&got, want, "{what}"),
            (None, Err(_)) => {}
            (Some(_), Err(e)) => panic!("{what}: refused: {e}"),
            (None, Ok(got)) => panic!("{what}: Jinja2 refuses this conversation; tandem rendered {got:?}"),
        }
    }
}
