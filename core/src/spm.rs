//! SentencePiece vocabularies as GGUF carries them (`tokenizer.ggml.model = llama`: Gemma,
//! Llama 2, Mistral, TinyLlama), tokenized the way llama.cpp does it so ids match its own:
//! special and user-defined tokens are split out first (longest first), spaces become `▁`, then
//! adjacent symbols merge greedily by the score of the token they form (ties to the left), and
//! characters no token covers fall back to their bytes' `<0xXX>` tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// GGUF token types.
pub const NORMAL: i32 = 1;
pub const UNKNOWN: i32 = 2;
pub const CONTROL: i32 = 3;
pub const USER_DEFINED: i32 = 4;
pub const BYTE: i32 = 6;

/// A SentencePiece vocabulary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SpmVocab {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    add_space_prefix: bool,
    #[serde(skip)]
    index: HashMap<String, u32>,
    #[serde(skip)]
    byte_ids: Vec<Option<u32>>,
    /// Control and user-defined tokens, longest text first: matched whole before merging.
    #[serde(skip)]
    specials: Vec<u32>,
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    // The highest score first; among equal scores the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl SpmVocab {
    /// A vocabulary from GGUF's token texts, scores and types (types may be empty: all normal).
    pub fn new(tokens: Vec<String>, scores: Vec<f32>, types: Vec<i32>, add_space_prefix: bool) -> Result<Self, String> {
        if scores.len() != tokens.len() {
            return Err(format!("{} scores for {} tokens", scores.len(), tokens.len()));
        }
        let types = if types.is_empty() { vec![NORMAL; tokens.len()] } else { types };
        if types.len() != tokens.len() {
            return Err(format!("{} token types for {} tokens", types.len(), tokens.len()));
        }
        let mut index = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            // The first of duplicate texts wins, as in llama.cpp's map.
            index.entry(t.clone()).or_insert(i as u32);
        }
        let byte_ids =
            (0..=255u8).map(|b| index.get(&format!("<0x{b:02X}>")).or_else(|| index.get(&(b as char).to_string())).copied()).collect();
        let mut specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| matches!(types[i as usize], CONTROL | USER_DEFINED) && !tokens[i as usize].is_empty())
            .collect();
        specials.sort_by(|&a, &b| tokens[b as usize].len().cmp(&tokens[a as usize].len()).then(a.cmp(&b)));
        Ok(SpmVocab { tokens, scores, types, add_space_prefix, index, byte_ids, specials })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The id of a token's exact text.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.index.get(text).copied()
    }

    /// A token's text as stored.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Token ids of `text`; control tokens' text becomes the token only with `parse_special`
    /// (user-defined tokens always do, as in llama.cpp). No BOS is added.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        enum Frag<'a> {
            Raw(&'a str),
            Token(u32),
        }
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Frag::Raw(text)];
        for &id in &self.specials {
            if self.types[id as usize] == CONTROL && !parse_special {
                continue;
            }
            let tok = self.tokens[id as usize].as_str();
            if !text.contains(tok) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Frag::Raw(mut s) => {
                        while let Some(at) = s.find(tok) {
                            if at > 0 {
                                next.push(Frag::Raw(&s[..at]));
                            }
                            next.push(Frag::Token(id));
                            s = &s[at + tok.len()..];
                        }
                        if !s.is_empty() {
                            next.push(Frag::Raw(s));
                        }
                    }
                    t => next.push(t),
                }
            }
            frags = next;
        }
        let mut out = Vec::new();
        let mut prev_special = true;
        for f in frags {
            match f {
                Frag::Raw(s) => {
                    let mut escaped = String::with_capacity(s.len() + 3);
                    if self.add_space_prefix && prev_special {
                        escaped.push('▁');
                    }
                    escaped.extend(s.chars().map(|c| if c == ' ' { '▁' } else { c }));
                    self.merge(&escaped, &mut out);
                    prev_special = false;
                }
                Frag::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
            }
        }
        out
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on escaped text.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol { start, len: c.len_utf8(), prev: i.checked_sub(1), next: Some(i + 1) });
        }
        let Some(last) = symbols.last_mut() else { return };
        last.next = None;
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| -> Option<Bigram> {
            let (left, right) = (left?, right?);
            let len = symbols[left].len + symbols[right].len;
            let id = self.token_to_id(&text[symbols[left].start..symbols[left].start + len])?;
            Some(Bigram { score: self.scores[id as usize], left, right, len })
        };
        for i in 1..symbols.len() {
            queue.extend(bigram(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            // Stale: one side has merged since the bigram was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            queue.extend(bigram(&symbols, l.prev, Some(b.left)));
            queue.extend(bigram(&symbols, Some(b.left), symbols[b.left].next));
        }
        let mut at = Some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.token_to_id(piece) {
                Some(id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.byte_ids[b as usize])),
            }
            at = s.next;
        }
    }

    /// The bytes a token stands for in text: `▁` as a space, byte tokens as their byte, control
    /// tokens as their text only with `special`.
    pub fn piece(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else { return Vec::new() };
        match self.types[id as usize] {
            BYTE => text
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .map_or_else(Vec::new, |b| vec![b]),
            CONTROL if !special => Vec::new(),
            CONTROL => text.as_bytes().to_vec(),
            UNKNOWN => "\u{2585}".as_bytes().to_vec(),
            NORMAL | USER_DEFINED => text.replace('▁', " ").into_bytes(),
            _ => Vec::new(),
        }
    }

    /// The text of `ids` (invalid UTF-8 from split byte tokens becomes U+FFFD).
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| self.piece(id, special)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> SpmVocab {
        let mut tokens: Vec<String> =
            ["<unk>", "<s>", "</s>", "\n", "▁", "a", "b", "c", "ab", "▁a", "▁ab", "abc", "bc"].iter().map(|s| s.to_string()).collect();
        let mut scores = vec![0.0, 0.0, 0.0, 0.0, -1.0, -5.0, -5.0, -5.0, -2.0, -3.0, -1.5, -4.0, -1.0];
        let mut types =
            vec![UNKNOWN, CONTROL, CONTROL, USER_DEFINED, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            types.push(BYTE);
        }
        SpmVocab::new(tokens, scores, types, false).expect("vocab")
    }

    #[test]
    fn merges_follow_scores_and_unknown_characters_fall_back_to_bytes() {
        let v = vocab();
        // "bc" (-1.0) beats "ab" (-2.0), then a + bc forms "abc".
        assert_eq!(v.encode("abc", false), vec![11]);
        // "cab": "ab" merges, and "c" + "ab" is no token.
        assert_eq!(v.encode("cab", false), vec![7, 8]);
        // "▁" + "ab": "ab" first (-2.0 vs "▁a" -3.0), then "▁ab" (-1.5).
        assert_eq!(v.encode(" ab", false), vec![10]);
        // é is not a token: its two UTF-8 bytes.
        let e = v.encode("é", false);
        assert_eq!(e, vec![13 + 0xc3, 13 + 0xa9]);
        assert_eq!(v.decode(&e, false), "é");
    }

    #[test]
    fn user_defined_tokens_always_split_and_control_tokens_only_when_asked() {
        let v = vocab();
        assert_eq!(v.encode("a\nb", false), vec![5, 3, 6]);
        assert_eq!(v.encode("a</s>", true), vec![5, 2]);
        assert_ne!(v.encode("a</s>", false), vec![5, 2]);
        assert_eq!(v.decode(&[9, 2], false), " a");
        assert_eq!(v.decode(&[9, 2], true), " a</s>");
    }
}
