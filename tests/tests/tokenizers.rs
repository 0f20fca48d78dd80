//! Tokenizers against llama.cpp's own tokenizer test cases (`test-tokenizer-0`: the
//! `ggml-vocab-*.gguf` vocabularies of its `models/` folder with their `.inp` texts and `.out`
//! ids, taken from llama-cpp-python 0.3.36's source distribution). The SentencePiece ones (Llama
//! 2, Phi-3) are kept in `tests/fixtures/vocab`; `TANDEM_VOCAB_DIR` adds a folder of more (the
//! BPE ones of Llama 3 and Qwen2, several MB, which `scripts/test` fetches into `target/vocab`).

use std::path::{Path, PathBuf};

use tandem_core::{GgufFile, TextTokenizer};

const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

fn cases(vocab: &Path) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| {
        let p = PathBuf::from(format!("{}.{ext}", vocab.display()));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let inputs: Vec<String> = read("inp").split(SEPARATOR).map(str::to_string).collect();
    let outputs: Vec<Vec<u32>> =
        read("out").lines().map(|l| l.split_whitespace().map(|t| t.parse().expect("token id")).collect()).collect();
    // The input file ends with a separator: one empty piece past the last case.
    inputs.into_iter().zip(outputs).collect()
}

fn vocabularies() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/vocab")];
    if let Some(d) = std::env::var_os("TANDEM_VOCAB_DIR") {
        dirs.push(d.into());
    }
    let mut out = Vec::new();
    for d in dirs {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "gguf") && PathBuf::from(format!("{}.inp", p.display())).exists() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn tokenizations_equal_llama_cpp_test_cases() {
    let vocabs = vocabularies();
    assert!(vocabs.len() >= 2, "{vocabs:?}");
    for vocab in vocabs {
        let file = GgufFile::open(&vocab).unwrap_or_else(|e| panic!("{}: {e}", vocab.display()));
        let tok = TextTokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{}: {e}", vocab.display()));
        let mut checked = 0;
        for (text, want) in cases(&vocab) {
            let got = tok.encode(&text, false).expect("encodes");
            assert_eq!(got, want, "{}: {text:?}", vocab.display());
            checked += 1;
        }
        eprintln!("{}: {checked} cases", vocab.display());
    }
}
