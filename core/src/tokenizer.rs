//! Text to token ids and back, through the `tokenizers` crate, plus the model's chat template.

use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecodeStream, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::spm::SpmVocab;

/// Qwen2's pre-tokenizer pattern (`tokenizer.ggml.pre = "qwen2"`): Llama 3's with single digits.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The chat template a GGUF file carries.
fn get_template(file: &GgufFile) -> Option<String> {
    file.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string)
}

/// Llama 3's pre-tokenizer pattern (`tokenizer.ggml.pre = "llama-bpe"`).
const LLAMA3_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One chat message.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// How text becomes ids: a `tokenizers` tokenizer (BPE vocabularies, `tokenizer.json`) or a
/// SentencePiece vocabulary from GGUF, tokenized as llama.cpp does.
#[derive(Clone)]
enum Backend {
    Hf {
        /// Parses special tokens such as `<|im_start|>` in the text.
        special: Box<tokenizers::Tokenizer>,
        /// Treats the same text literally.
        literal: Box<tokenizers::Tokenizer>,
    },
    Spm(std::sync::Arc<SpmVocab>),
}

/// A model's tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct TextTokenizer {
    backend: Backend,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Prompts start with `bos_id` (GGUF's `tokenizer.ggml.add_bos_token`).
    add_bos: bool,
    /// Ids that end a generation (EOS and the chat template's end-of-turn token).
    pub stop_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("vocab", &self.vocab_size()).field("bos", &self.bos_id).field("eos", &self.eos_id).finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl TextTokenizer {
    fn new(tok: tokenizers::Tokenizer, bos_id: Option<u32>, eos_id: Option<u32>, chat_template: Option<String>) -> Self {
        let mut literal = tok.clone();
        literal.set_encode_special_tokens(true);
        let backend = Backend::Hf { special: Box::new(tok), literal: Box::new(literal) };
        Self::with_backend(backend, bos_id, eos_id, chat_template)
    }

    fn with_backend(backend: Backend, bos_id: Option<u32>, eos_id: Option<u32>, chat_template: Option<String>) -> Self {
        let mut tok = TextTokenizer { backend, bos_id, eos_id, add_bos: false, stop_ids: eos_id.into_iter().collect(), chat_template };
        for end in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<end_of_turn>"] {
            if let Some(id) = tok.token_to_id(end)
                && !tok.stop_ids.contains(&id)
            {
                tok.stop_ids.push(id);
            }
        }
        tok
    }

    /// The id of a token's exact text.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        match &self.backend {
            Backend::Hf { special, .. } => special.token_to_id(text),
            Backend::Spm(v) => v.token_to_id(text),
        }
    }

    /// A token's text as the vocabulary stores it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf { special, .. } => special.id_to_token(id),
            Backend::Spm(v) => v.id_to_token(id).map(str::to_string),
        }
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let get_str = |k: &str| file.get(k).and_then(|v| v.as_str());
        let file_name = file.path.display();
        let model = get_str("tokenizer.ggml.model").ok_or_else(|| tok_err(format!("{file_name}: GGUF has no tokenizer.ggml.model")))?;
        if model != "gpt2" && model != "llama" {
            return Err(tok_err(format!(
                "{file_name}: GGUF tokenizer kind `{model}` is not supported (tandem reads `gpt2` byte-level BPE and `llama` \
                 SentencePiece vocabularies); use a Hugging Face directory with tokenizer.json instead"
            )));
        }
        let strings = |k: &str| -> Result<&[String]> {
            file.get(k)
                .and_then(|v| v.as_array())
                .ok_or_else(|| tok_err(format!("{file_name}: GGUF has no {k}")))?
                .strings()
                .ok_or_else(|| tok_err(format!("{file_name}: {k} is not an array of strings")))
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.integers())
                .ok_or_else(|| tok_err(format!("{file_name}: tokenizer.ggml.token_type is not an array of integers")))?,
        };
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(tok_err(format!("{file_name}: tokenizer.ggml.token_type has {} entries for {} tokens", types.len(), tokens.len())));
        }
        let id = |k: &str| -> Result<Option<u32>> {
            let Some(v) = file.get(k) else { return Ok(None) };
            match v.as_u64().and_then(|i| u32::try_from(i).ok()).filter(|&i| (i as usize) < tokens.len()) {
                Some(i) => Ok(Some(i)),
                None => Err(tok_err(format!("{file_name}: {k} is {v:?}, not a token id below {}", tokens.len()))),
            }
        };
        let (bos, eos) = (id("tokenizer.ggml.bos_token_id")?, id("tokenizer.ggml.eos_token_id")?);
        let add_bos = |default: bool| match file.get("tokenizer.ggml.add_bos_token") {
            Some(crate::gguf::MetaValue::Bool(b)) => *b && bos.is_some(),
            _ => default && bos.is_some(),
        };
        if model == "llama" {
            let mut tok = Self::spm_from_gguf(file, tokens, types, bos, eos)?;
            tok.add_bos = add_bos(true);
            return Ok(tok);
        }
        let merges = strings("tokenizer.ggml.merges")?;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(format!("{file_name}: bad merge `{m}`")))
            })
            .collect::<Result<_>>()?;
        let pre = get_str("tokenizer.ggml.pre").unwrap_or("default");
        let (pre_tok, ignore_merges) = match pre {
            "smollm" => (
                Sequence::new(vec![
                    PreTokenizerWrapper::Digits(Digits::new(true)),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
                ]),
                false,
            ),
            "llama-bpe" | "llama3" => (
                Sequence::new(vec![
                    PreTokenizerWrapper::Split(
                        Split::new(SplitPattern::Regex(LLAMA3_PATTERN.into()), SplitDelimiterBehavior::Isolated, false).map_err(tok_err)?,
                    ),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
                ]),
                true,
            ),
            "qwen2" => (
                Sequence::new(vec![
                    PreTokenizerWrapper::Split(
                        Split::new(SplitPattern::Regex(QWEN2_PATTERN.into()), SplitDelimiterBehavior::Isolated, false).map_err(tok_err)?,
                    ),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
                ]),
                false,
            ),
            "default" | "gpt2" | "gpt-2" => (Sequence::new(vec![PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))]), false),
            other => {
                return Err(tok_err(format!(
                    "{file_name}: GGUF pre-tokenizer `{other}` is not supported (known: smollm, llama-bpe, qwen2, gpt2)"
                )));
            }
        };
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(ignore_merges).build().map_err(tok_err)?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(pre_tok));
        tok.with_decoder(Some(ByteLevel::default()));
        // CONTROL (3) and USER_DEFINED (4) tokens are matched whole, before pre-tokenization.
        let specials =
            types.iter().enumerate().filter(|&(_, &ty)| ty == 3 || ty == 4).map(|(i, &ty)| AddedToken::from(tokens[i].clone(), ty == 3));
        tok.add_special_tokens(specials).map_err(tok_err)?;
        let mut tok = Self::new(tok, bos, eos, get_template(file));
        tok.add_bos = add_bos(false);
        Ok(tok)
    }

    /// A SentencePiece vocabulary from GGUF (`tokenizer.ggml.model = llama`), from the tokens,
    /// types and special ids `from_gguf` read and checked, and the file's scores.
    fn spm_from_gguf(file: &GgufFile, tokens: &[String], types: Vec<i64>, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        let file_name = file.path.display();
        let scores: Vec<f32> = match file.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
            Some(crate::gguf::MetaArray::F32(s)) => s.clone(),
            Some(_) => return Err(tok_err(format!("{file_name}: tokenizer.ggml.scores is not an array of f32"))),
            None => vec![0.0; tokens.len()],
        };
        let types = types.into_iter().map(|t| i32::try_from(t).unwrap_or(crate::spm::NORMAL)).collect();
        let space_prefix = !matches!(file.get("tokenizer.ggml.add_space_prefix"), Some(crate::gguf::MetaValue::Bool(false)));
        let vocab = SpmVocab::new(tokens.to_vec(), scores, types, space_prefix).map_err(|e| tok_err(format!("{file_name}: {e}")))?;
        Ok(Self::with_backend(Backend::Spm(std::sync::Arc::new(vocab)), bos, eos, get_template(file)))
    }

    /// Loads `tokenizer.json` (and, beside it, `tokenizer_config.json` for the chat template and
    /// the BOS/EOS tokens).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = crate::files::read_bounded(&path, crate::files::MAX_TOKENIZER_BYTES)?;
        let tok = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let text = crate::files::read_text(&cfg_path, crate::files::MAX_JSON_BYTES)?;
            serde_json::from_str(&text).map_err(|e| tok_err(format!("{}: {e}", cfg_path.display())))?
        } else {
            serde_json::Value::Null
        };
        let token_id = |key: &str| {
            let v = &cfg[key];
            let text = v.as_str().or_else(|| v["content"].as_str())?;
            tok.token_to_id(text)
        };
        let (bos, eos) = (token_id("bos_token"), token_id("eos_token"));
        let template = cfg["chat_template"].as_str().map(str::to_string);
        Ok(Self::new(tok, bos, eos, template))
    }

    /// The underlying `tokenizers` tokenizer (for writing `tokenizer.json`), where there is one.
    pub fn inner(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.backend {
            Backend::Hf { special, .. } => Some(special),
            Backend::Spm(_) => None,
        }
    }

    /// The vocabulary in a stable serialized form, for the model's fingerprint.
    pub fn identity_json(&self) -> Vec<u8> {
        let json = match &self.backend {
            Backend::Hf { special, .. } => serde_json::to_vec(special.as_ref()),
            Backend::Spm(v) => serde_json::to_vec(v.as_ref()),
        };
        json.unwrap_or_else(|e| format!("unserializable: {e}").into_bytes())
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf { special, .. } => special.get_vocab_size(true),
            Backend::Spm(v) => v.len(),
        }
    }

    /// Token ids of `text`; with `parse_special`, special-token text becomes the special token.
    /// No BOS is added (see [`TextTokenizer::encode_prompt`]).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Hf { special, literal } => {
                let tok = if parse_special { special } else { literal };
                Ok(tok.encode(text, false).map_err(tok_err)?.get_ids().to_vec())
            }
            Backend::Spm(v) => Ok(v.encode(text, parse_special)),
        }
    }

    /// A prompt's ids as the model expects them: BOS first where the file asks for it (unless
    /// the text already starts with it), then `encode`.
    pub fn encode_prompt(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let body = self.encode(text, parse_special)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos_id)
            && body.first() != Some(&bos)
        {
            ids.push(bos);
        }
        ids.extend(body);
        Ok(ids)
    }

    /// Text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.backend {
            Backend::Hf { special, .. } => special.decode(ids, false).map_err(tok_err),
            Backend::Spm(v) => Ok(v.decode(ids, true)),
        }
    }

    /// An incremental decoder that yields text only once it forms complete characters.
    pub fn decode_stream(&self, skip_special: bool) -> TokenTextStream<'_> {
        match &self.backend {
            Backend::Hf { special, .. } => TokenTextStream::Hf(Box::new(special.decode_stream(skip_special))),
            Backend::Spm(v) => TokenTextStream::Spm { vocab: v, special: !skip_special, pending: Vec::new() },
        }
    }

    /// The prompt text for a conversation, rendered with the model's chat template. Templates
    /// that ask `strftime_now` for today's date get it in UTC.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.apply_chat_template_at(messages, add_generation_prompt, std::time::SystemTime::now())
    }

    /// `apply_chat_template` with `strftime_now` at `now` instead of the clock's time.
    pub fn apply_chat_template_at(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        now: std::time::SystemTime,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| Error::ChatTemplate("the model has no chat template".into()))?;
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<(), minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        // What transformers offers templates: `datetime.now().strftime(format)`.
        env.add_function("strftime_now", move |format: String| {
            crate::strftime::strftime(&format, now).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
        });
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        let tmpl = env.template_from_str(template).map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let token_text = |id: Option<u32>| id.and_then(|i| self.id_to_token(i)).unwrap_or_default();
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => token_text(self.bos_id),
            eos_token => token_text(self.eos_id),
        })
        .map_err(|e| Error::ChatTemplate(e.to_string()))
    }
}

type HfDecodeStream<'a> = DecodeStream<
    'a,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// Turns a stream of token ids into text pieces (see [`TextTokenizer::decode_stream`]).
pub enum TokenTextStream<'a> {
    Hf(Box<HfDecodeStream<'a>>),
    /// Byte tokens may split a character: bytes wait in `pending` until they form whole ones.
    Spm {
        vocab: &'a SpmVocab,
        special: bool,
        pending: Vec<u8>,
    },
}

impl TokenTextStream<'_> {
    /// The text that `id` completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        match self {
            TokenTextStream::Hf(inner) => inner.step(id).map_err(tok_err),
            TokenTextStream::Spm { vocab, special, pending } => {
                pending.extend(vocab.piece(id, *special));
                let valid = match std::str::from_utf8(pending) {
                    Ok(_) => pending.len(),
                    // Bytes that can never start a character are given up on (as U+FFFD).
                    Err(e) if e.error_len().is_some() => pending.len(),
                    Err(e) => e.valid_up_to(),
                };
                if valid == 0 {
                    return Ok(None);
                }
                let text = String::from_utf8_lossy(&pending[..valid]).into_owned();
                pending.drain(..valid);
                Ok(Some(text))
            }
        }
    }
}

impl TextTokenizer {
    /// A byte-level tokenizer for synthetic models: any text encodes to one id per byte (ids 0 to
    /// 255), and the ids beyond decode to placeholders `<t{id}>`, so servers and benchmarks can run
    /// on random weights.
    pub fn placeholder(vocab: usize) -> Result<Self> {
        let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        bytes.sort_unstable();
        let mut vocab_map: Vocab = bytes.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
        vocab_map.extend((bytes.len() as u32..vocab as u32).map(|i| (format!("<t{i}>"), i)));
        let bpe = BPE::builder().vocab_and_merges(vocab_map, Vec::new()).build().map_err(tok_err)?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
        tok.with_decoder(Some(ByteLevel::default()));
        Ok(Self::new(tok, None, None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placeholder_tokenizer_takes_any_text_a_byte_a_token() {
        let tok = TextTokenizer::placeholder(1000).expect("builds");
        let ids = tok.encode("héllo 42", false).expect("encodes");
        assert_eq!(ids.len(), "héllo 42".len());
        assert!(ids.iter().all(|&i| i < 256));
        assert_eq!(tok.decode(&ids).expect("decodes"), "héllo 42");
        assert_eq!(tok.decode(&[700]).expect("decodes"), "<t700>");
    }
}
