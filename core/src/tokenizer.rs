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

/// Llama 3's pre-tokenizer pattern (`tokenizer.ggml.pre = "llama-bpe"`).
const LLAMA3_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One chat message.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A model's tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct TextTokenizer {
    /// Parses special tokens such as `<|im_start|>` in the text.
    special: tokenizers::Tokenizer,
    /// Treats the same text literally.
    literal: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
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
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        for end in ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>"] {
            if let Some(id) = tok.token_to_id(end)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        TextTokenizer { special: tok, literal, bos_id, eos_id, stop_ids, chat_template }
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let get_str = |k: &str| file.get(k).and_then(|v| v.as_str());
        let file_name = file.path.display();
        let model = get_str("tokenizer.ggml.model").ok_or_else(|| tok_err(format!("{file_name}: GGUF has no tokenizer.ggml.model")))?;
        if model != "gpt2" {
            return Err(tok_err(format!(
                "{file_name}: GGUF tokenizer kind `{model}` is not supported yet (tandem builds `gpt2` byte-level BPE tokenizers); \
                 use a Hugging Face directory with tokenizer.json instead"
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
        let merges = strings("tokenizer.ggml.merges")?;
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
            "default" | "gpt2" | "gpt-2" => (Sequence::new(vec![PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))]), false),
            other => {
                return Err(tok_err(format!(
                    "{file_name}: GGUF pre-tokenizer `{other}` is not supported (known: smollm, llama-bpe, gpt2)"
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
        Ok(Self::new(tok, bos, eos, get_str("tokenizer.chat_template").map(str::to_string)))
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

    /// The underlying `tokenizers` tokenizer (for writing `tokenizer.json`).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.special
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.special.get_vocab_size(true)
    }

    /// Token ids of `text`; with `parse_special`, special-token text becomes the special token.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special { &self.special } else { &self.literal };
        Ok(tok.encode(text, false).map_err(tok_err)?.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.special.decode(ids, false).map_err(tok_err)
    }

    /// An incremental decoder that yields text only once it forms complete characters.
    pub fn decode_stream(&self, skip_special: bool) -> TokenTextStream<'_> {
        TokenTextStream { inner: self.special.decode_stream(skip_special) }
    }

    /// The prompt text for a conversation, rendered with the model's chat template.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| Error::ChatTemplate("the model has no chat template".into()))?;
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<(), minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        let tmpl = env.template_from_str(template).map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let token_text = |id: Option<u32>| id.and_then(|i| self.special.id_to_token(i)).unwrap_or_default();
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => token_text(self.bos_id),
            eos_token => token_text(self.eos_id),
        })
        .map_err(|e| Error::ChatTemplate(e.to_string()))
    }
}

/// Turns a stream of token ids into text pieces (see [`TextTokenizer::decode_stream`]).
pub struct TokenTextStream<'a> {
    inner: DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl TokenTextStream<'_> {
    /// The text that `id` completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.inner.step(id).map_err(tok_err)
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
