//! The CLIP tokenizer against transformers' `CLIPTokenizer`: known ids, the
//! reference fixture (`tests/fixtures/reference/tokenizer_ids.json`, written by
//! `tools/make_fixtures.py`), padding/truncation, and loading from tokenizer
//! folders (`vocab.json` + `merges.txt`, `tokenizer.json`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sd_lora_model::clip::vocab::{BpeVocab, VOCAB_SIZE};
use sd_lora_model::clip::{ClipTokenizer, MAX_LENGTH, PadStyle};

fn embedded() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| ClipTokenizer::embedded().unwrap())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh empty directory under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-lora-clip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn embedded_vocabulary_has_clip_layout() {
    let vocab = BpeVocab::embedded().unwrap();
    assert_eq!(vocab.tokens.len(), VOCAB_SIZE);
    assert_eq!(vocab.merges.len(), 48894);
    let t = embedded();
    assert_eq!(t.vocab_size(), 49408);
    assert_eq!(t.token_to_id("!"), Some(0));
    assert_eq!(t.token_to_id("!</w>"), Some(256));
    assert_eq!(t.token_to_id("<|startoftext|>"), Some(49406));
    assert_eq!(t.token_to_id("<|endoftext|>"), Some(49407));
    assert_eq!(t.id_to_token(320), Some("a</w>"));
    assert_eq!(t.id_to_token(2368), Some("cat</w>"));
    assert_eq!(t.id_to_token(49408), None);
    assert_eq!((t.bos_id(), t.eos_id()), (49406, 49407));
    assert_eq!(t.pad_id(PadStyle::EndToken), 49407);
    assert_eq!(t.pad_id(PadStyle::Exclamation), 0);
}

/// Ids checked against transformers 5's `CLIPTokenizer` on this vocabulary.
#[test]
fn known_ids() {
    let t = embedded();
    let cases: &[(&str, &[u32])] = &[
        (
            "a photo of a cat",
            &[49406, 320, 1125, 539, 320, 2368, 49407],
        ),
        ("", &[49406, 49407]),
        ("   ", &[49406, 49407]),
        ("  Hello,   World!! ", &[49406, 3306, 267, 1002, 748, 49407]),
        (
            "it's don't I'M",
            &[49406, 585, 568, 847, 713, 328, 880, 49407],
        ),
        (
            "1234 3.14",
            &[49406, 272, 273, 274, 275, 274, 269, 272, 275, 49407],
        ),
        ("tab\tnew\nline", &[49406, 14724, 686, 1148, 49407]),
        // Special tokens in the raw text are single tokens; after lowercasing
        // they are ordinary text.
        ("a<|endoftext|>b", &[49406, 320, 49407, 321, 49407]),
        ("x<|startoftext|>", &[49406, 343, 49406, 49407]),
        (
            "A <|ENDOFTEXT|> b",
            &[49406, 320, 27, 347, 40786, 4160, 91, 285, 321, 49407],
        ),
        // NFC: "e" + combining acute is "é".
        ("e\u{301}", &[49406, 4166, 49407]),
        // Per-character lowercasing: a final Σ becomes σ, not ς.
        (
            "ΣΑΣ σας İ",
            &[
                49406, 139, 225, 138, 109, 139, 481, 139, 225, 138, 109, 139, 480, 328, 16384,
                49407,
            ],
        ),
        ("a\u{200b}b", &[49406, 320, 9844, 321, 49407]),
        ("<|endoftext|>!", &[49406, 49407, 256, 49407]),
        ("xyzq", &[49406, 20023, 89, 336, 49407]),
    ];
    for (text, ids) in cases {
        assert_eq!(&t.encode(text), ids, "ids of {text:?}");
    }
}

#[test]
fn padding_and_truncation() {
    let t = embedded();
    assert_eq!(
        t.encode_padded("a cat", 10, PadStyle::EndToken),
        [
            49406, 320, 2368, 49407, 49407, 49407, 49407, 49407, 49407, 49407
        ]
    );
    assert_eq!(
        t.encode_padded("a cat", 10, PadStyle::Exclamation),
        [49406, 320, 2368, 49407, 0, 0, 0, 0, 0, 0]
    );
    let long = "a cat ".repeat(50);
    for style in [PadStyle::EndToken, PadStyle::Exclamation] {
        let ids = t.encode_padded(&long, MAX_LENGTH, style);
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], 49406);
        assert_eq!(&ids[73..], &[320, 2368, 320, 49407]);
    }
    // Exactly 75 tokens fit without truncation; 76 lose the last one.
    let words = |n: usize| vec!["cat"; n].join(" ");
    let ids = t.encode_padded(&words(75), MAX_LENGTH, PadStyle::EndToken);
    assert_eq!(ids, t.encode(&words(75)));
    let ids = t.encode_padded(&words(76), MAX_LENGTH, PadStyle::EndToken);
    assert_eq!(ids, t.encode(&words(75)));
    assert_eq!(
        t.encode_padded("a cat", 0, PadStyle::EndToken),
        [49406, 49407]
    );
}

#[test]
fn single_tokens_and_decode() {
    let t = embedded();
    assert!(t.is_single_token("sks"));
    assert!(t.is_single_token("dog"));
    assert!(t.is_single_token("ohwx"));
    assert!(!t.is_single_token("zwx"));
    assert!(!t.is_single_token("two words"));
    assert!(!t.is_single_token(""));
    assert_eq!(t.tokenize("zwx dog"), ["z", "wx</w>", "dog</w>"]);
    let text = "a photo of ohwx dog, café 🐱";
    assert_eq!(t.decode(&t.encode(text)), "a photo of ohwx dog , café 🐱");
    assert_eq!(
        t.decode(&t.encode_padded("A Cat", 77, PadStyle::EndToken)),
        "a cat"
    );
}

/// The reference ids of `tools/make_fixtures.py` (transformers' `CLIPTokenizer`).
#[test]
fn matches_reference_fixture() {
    let path = repo_root().join("tests/fixtures/reference/tokenizer_ids.json");
    assert!(
        path.exists(),
        "missing fixture {}: regenerate with tools/make_fixtures.py",
        path.display()
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let t = embedded();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let prompts = json["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 10, "too few prompts in {}", path.display());
    for p in prompts {
        let prompt = p["prompt"].as_str().unwrap();
        assert_eq!(
            t.encode(prompt),
            ids(&p["ids_unpadded"]),
            "unpadded {prompt:?}"
        );
        assert_eq!(
            t.encode_padded(prompt, MAX_LENGTH, PadStyle::EndToken),
            ids(&p["ids_sd1"]),
            "SD1 {prompt:?}"
        );
        assert_eq!(
            t.encode_padded(prompt, MAX_LENGTH, PadStyle::Exclamation),
            ids(&p["ids_sd2"]),
            "SD2 {prompt:?}"
        );
    }
    if let Some(sha) = json["assets_gz_sha256"].as_str() {
        // The fixture was made against the vocabulary we embed.
        assert_eq!(
            sha,
            "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
        );
    }
}

/// The embedded vocabulary written out as a diffusers `tokenizer/` folder.
fn write_vocab_and_merges(dir: &Path) {
    let vocab = BpeVocab::embedded().unwrap();
    let map: HashMap<String, u32> = vocab.token_ids();
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&map).unwrap()).unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for (l, r) in &vocab.merges {
        merges.push_str(&format!("{l} {r}\n"));
    }
    std::fs::write(dir.join("merges.txt"), merges).unwrap();
}

const SAMPLES: &[&str] = &[
    "a photo of ohwx dog",
    "A PHOTO OF A DOG IN NEW YORK, Times Square At Night",
    "café naïve résumé, 一只猫 🐱 ❤️, Привет",
    "it's, don't -- 1girl, 1024x768, 3.14159, 50% <|endoftext|>",
];

#[test]
fn from_folder_with_vocab_and_merges() {
    let dir = temp_dir("vocab-merges");
    write_vocab_and_merges(&dir);
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"pad_token": {"content": "!", "lstrip": false}, "eos_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    let t = ClipTokenizer::from_folder(&dir).unwrap();
    assert_eq!(t.vocab_size(), 49408);
    for s in SAMPLES {
        assert_eq!(t.encode(s), embedded().encode(s), "{s:?}");
    }
    assert_eq!(
        ClipTokenizer::folder_pad_style(&dir).unwrap(),
        Some(PadStyle::Exclamation)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn from_folder_with_tokenizer_json() {
    let vocab = BpeVocab::embedded().unwrap();
    let mut model_vocab = vocab.token_ids();
    // tokenizers keeps the special tokens in the added-token list; check they
    // are found there even when the model vocabulary lacks them.
    model_vocab.remove("<|startoftext|>");
    let merges: Vec<[String; 2]> = vocab
        .merges
        .iter()
        .map(|(l, r)| [l.clone(), r.clone()])
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 49406, "content": "<|startoftext|>", "special": true, "normalized": false},
            {"id": 49407, "content": "<|endoftext|>", "special": true, "normalized": false},
        ],
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": model_vocab, "merges": merges,
        },
    });
    let dir = temp_dir("tokenizer-json");
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"pad_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    let t = ClipTokenizer::from_folder(&dir).unwrap();
    for s in SAMPLES {
        assert_eq!(t.encode(s), embedded().encode(s), "{s:?}");
    }
    assert_eq!(
        ClipTokenizer::folder_pad_style(&dir).unwrap(),
        Some(PadStyle::EndToken)
    );

    // Older tokenizer.json files write merges as "a b" strings.
    let mut json = json;
    json["model"]["merges"] = vocab
        .merges
        .iter()
        .map(|(l, r)| format!("{l} {r}"))
        .collect();
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    let t = ClipTokenizer::from_folder(&dir).unwrap();
    for s in SAMPLES {
        assert_eq!(t.encode(s), embedded().encode(s), "{s:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_folders_give_clear_errors() {
    let dir = temp_dir("bad");
    let err = ClipTokenizer::from_folder(&dir).unwrap_err().to_string();
    assert!(
        err.contains("no CLIP tokenizer") && err.contains("vocab.json"),
        "{err}"
    );
    assert_eq!(ClipTokenizer::folder_pad_style(&dir).unwrap(), None);

    std::fs::write(dir.join("vocab.json"), "{not json").unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b\n").unwrap();
    let err = ClipTokenizer::from_folder(&dir).unwrap_err().to_string();
    assert!(
        err.contains("vocab.json") && err.contains("not a token"),
        "{err}"
    );

    std::fs::write(dir.join("vocab.json"), r#"{"a": 0, "b": 1}"#).unwrap();
    let err = ClipTokenizer::from_folder(&dir).unwrap_err().to_string();
    assert!(err.contains("not in the vocabulary"), "{err}");

    write_vocab_and_merges(&dir);
    std::fs::write(
        dir.join("merges.txt"),
        "#version: 0.2\ni n\nthree parts here\n",
    )
    .unwrap();
    let err = ClipTokenizer::from_folder(&dir).unwrap_err().to_string();
    assert!(
        err.contains("merges.txt") && err.contains("line 3"),
        "{err}"
    );

    let json_dir = temp_dir("bad-json");
    std::fs::write(
        json_dir.join("tokenizer.json"),
        r#"{"model": {"type": "WordPiece", "vocab": {}}}"#,
    )
    .unwrap();
    let err = ClipTokenizer::from_folder(&json_dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a CLIP tokenizer"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&json_dir).unwrap();
}
