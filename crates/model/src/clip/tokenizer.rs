//! The CLIP tokenizer: text → token ids, exactly as transformers' `CLIPTokenizer`
//! (the `tokenizers`-backed one, which transformers 5 uses) produces them.
//!
//! The pipeline, which is the one in every CLIP `tokenizer.json`:
//!
//! 1. the special tokens `<|startoftext|>` and `<|endoftext|>` are found in the
//!    raw text (case-sensitive) and kept as single tokens;
//! 2. the rest is normalised: Unicode NFC, every run of whitespace becomes one
//!    space, then each character is lowercased on its own (so a final `Σ`
//!    becomes `σ`, not `ς`, as in `tokenizers`);
//! 3. pre-tokenisation keeps the matches of CLIP's pattern
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    (letter runs, single digits, runs of other symbols; whitespace dropped);
//! 4. each piece is split again by GPT-2's pattern (the byte-level step of
//!    `tokenizers` does this; it only splits a special token that matched after
//!    lowercasing, `<|ENDOFTEXT|>`, into `<|`, `endoftext`, `|>`);
//! 5. each piece is written as byte-level characters, the last one gets the
//!    end-of-word suffix `</w>`, and the BPE merges are applied lowest rank
//!    first;
//! 6. the ids are wrapped in `<|startoftext|>` … `<|endoftext|>`.
//!
//! No "ftfy" text repair and no HTML unescaping is done (transformers' tokenizer
//! does neither; open_clip does both, so it differs on `&amp;`). transformers 4's
//! *slow* `CLIPTokenizer` (without ftfy) differs from this pipeline on rare
//! input: it puts spaces between CJK ideographs, drops control characters and
//! lowercases a final `Σ` to `ς`; the fast one, and transformers 5, do not.
//!
//! Stable Diffusion conditions on exactly 77 tokens: [`ClipTokenizer::encode_padded`]
//! truncates to the start token, 75 tokens and the end token, then pads — SD1
//! pads with the end token, SD2 and SDXL with `!` (id 0), see [`PadStyle`].

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Error, Result, bail};
use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use super::vocab::{BpeVocab, END_OF_TEXT, END_OF_WORD, START_OF_TEXT, bytes_to_unicode};

/// The sequence length Stable Diffusion's text encoders take.
pub const MAX_LENGTH: usize = 77;

/// CLIP's pre-tokenisation pattern (see the module docs).
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2's pattern, which the byte-level step of `tokenizers` applies to each
/// piece again (less its whitespace alternatives: pieces hold no whitespace).
/// It leaves CLIP's pieces whole except a lowercased special token, which it
/// splits into `<|`, the word, `|>`.
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// What fills a prompt up to the model's sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PadStyle {
    /// Pad with `<|endoftext|>` (49407): SD1's tokenizer.
    EndToken,
    /// Pad with `!` (id 0): SD2's and SDXL's tokenizers (OpenCLIP's convention).
    Exclamation,
}

impl PadStyle {
    /// The style whose pad token is `token` (`"<|endoftext|>"` or `"!"`), as
    /// written in a tokenizer folder's `pad_token`.
    pub fn from_pad_token(token: &str) -> Option<Self> {
        match token {
            END_OF_TEXT => Some(Self::EndToken),
            "!" => Some(Self::Exclamation),
            _ => None,
        }
    }
}

/// One merge rule, looked up by the ids of its two halves.
#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    merged: u32,
}

/// A CLIP byte-level BPE tokenizer. Build it once and share it: it is `Sync`.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    /// Token string → id.
    encoder: HashMap<String, u32>,
    /// Id → token string (`None` for ids no token has).
    decoder: Vec<Option<String>>,
    /// `(left id, right id)` → the merge rule.
    merges: HashMap<(u32, u32), Merge>,
    /// Byte-level character → its byte value.
    byte_decoder: HashMap<char, u8>,
    /// Id of `x` and of `x</w>` for each byte-level character `x`, by byte value.
    byte_ids: [(u32, u32); 256],
    pattern: Regex,
    byte_level_pattern: Regex,
    bos_id: u32,
    eos_id: u32,
    /// Id of `!`, CLIP's other pad token.
    exclamation_id: u32,
}

impl ClipTokenizer {
    /// The tokenizer of the CLIP vocabulary embedded in the binary (for
    /// single-file checkpoints, which carry no tokenizer). SD1, SD2 and SDXL all
    /// use this vocabulary.
    pub fn embedded() -> Result<Self> {
        let vocab = BpeVocab::embedded()?;
        Self::from_parts(
            vocab.token_ids(),
            &vocab.merges,
            "the embedded CLIP vocabulary",
        )
    }

    /// The tokenizer of a diffusers `tokenizer/` folder: `vocab.json` +
    /// `merges.txt` when both are there, else `tokenizer.json`. The vocabulary and
    /// merges come from the files; the text pipeline is CLIP's (see the module
    /// docs), which is what every CLIP tokenizer folder describes.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let json_path = dir.join("tokenizer.json");
        if vocab_path.is_file() && merges_path.is_file() {
            let vocab: HashMap<String, u32> = serde_json::from_str(&read_text(&vocab_path)?)
                .map_err(|e| {
                    Error::Msg(format!(
                        "{}: not a token → id JSON object: {e}",
                        vocab_path.display()
                    ))
                })?;
            let merges = parse_merges_txt(&read_text(&merges_path)?, &merges_path)?;
            Self::from_parts(vocab, &merges, &dir.display().to_string())
        } else if json_path.is_file() {
            Self::from_tokenizer_json(&json_path)
        } else {
            bail!(
                "{}: no CLIP tokenizer here (expected vocab.json and merges.txt, or \
                 tokenizer.json); for a checkpoint without a tokenizer use the embedded \
                 CLIP vocabulary",
                dir.display()
            )
        }
    }

    /// The tokenizer of a `tokenizer.json` whose model is CLIP's BPE (end-of-word
    /// suffix `</w>`).
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json: serde_json::Value = serde_json::from_str(&read_text(path)?)
            .map_err(|e| Error::Msg(format!("{}: not valid JSON: {e}", path.display())))?;
        let model = &json["model"];
        if model["type"].as_str() != Some("BPE")
            || model["end_of_word_suffix"].as_str() != Some(END_OF_WORD)
        {
            bail!(
                "{}: not a CLIP tokenizer (expected a BPE model with end_of_word_suffix \
                 \"{END_OF_WORD}\", found type {} and suffix {})",
                path.display(),
                model["type"],
                model["end_of_word_suffix"]
            )
        }
        let mut vocab: HashMap<String, u32> = serde_json::from_value(model["vocab"].clone())
            .map_err(|e| {
                Error::Msg(format!(
                    "{}: model.vocab is not a token → id object: {e}",
                    path.display()
                ))
            })?;
        // The special tokens normally are in the vocabulary too, but the
        // added-token list is what `tokenizers` trusts.
        for added in json["added_tokens"].as_array().into_iter().flatten() {
            if let (Some(content), Some(id)) = (added["content"].as_str(), added["id"].as_u64()) {
                vocab.insert(content.to_string(), id as u32);
            }
        }
        let Some(merge_list) = model["merges"].as_array() else {
            bail!("{}: model.merges is missing or not a list", path.display())
        };
        let merges = merge_list
            .iter()
            .enumerate()
            .map(|(i, m)| {
                // Older files write "a b", newer ones ["a", "b"].
                let pair = match m {
                    serde_json::Value::String(s) => split_merge(s),
                    serde_json::Value::Array(a) => match (a.first(), a.get(1), a.len()) {
                        (Some(l), Some(r), 2) => l.as_str().zip(r.as_str()),
                        _ => None,
                    },
                    _ => None,
                };
                pair.map(|(l, r)| (l.to_string(), r.to_string()))
                    .ok_or_else(|| {
                        Error::Msg(format!(
                            "{}: model.merges[{i}] is {m}, expected a pair of symbols",
                            path.display()
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_parts(vocab, &merges, &path.display().to_string())
    }

    /// The pad style a tokenizer folder declares in `special_tokens_map.json` or
    /// `tokenizer_config.json` (`pad_token`), if any: SD1 folders say
    /// `<|endoftext|>`, SD2/SDXL folders `!`.
    pub fn folder_pad_style(dir: impl AsRef<Path>) -> Result<Option<PadStyle>> {
        let dir = dir.as_ref();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let json: serde_json::Value = serde_json::from_str(&read_text(&path)?)
                .map_err(|e| Error::Msg(format!("{}: not valid JSON: {e}", path.display())))?;
            let pad = &json["pad_token"];
            // Either a plain string or an AddedToken object with "content".
            let token = pad.as_str().or_else(|| pad["content"].as_str());
            if let Some(token) = token {
                return Ok(PadStyle::from_pad_token(token));
            }
        }
        Ok(None)
    }

    /// Builds the lookup tables; `source` names the vocabulary in errors.
    fn from_parts(
        encoder: HashMap<String, u32>,
        merges: &[(String, String)],
        source: &str,
    ) -> Result<Self> {
        let id = |token: &str| {
            encoder.get(token).copied().ok_or_else(|| {
                Error::Msg(format!(
                    "{source}: token {token:?} is not in the vocabulary (not a CLIP vocabulary?)"
                ))
            })
        };
        let size = encoder.values().max().map_or(0, |&m| m as usize + 1);
        let mut decoder = vec![None; size];
        for (token, &i) in &encoder {
            decoder[i as usize] = Some(token.clone());
        }
        let mut byte_decoder = HashMap::with_capacity(256);
        let mut byte_ids = [(0, 0); 256];
        for (b, c) in bytes_to_unicode() {
            byte_decoder.insert(c, b);
            byte_ids[b as usize] = (id(&c.to_string())?, id(&format!("{c}{END_OF_WORD}"))?);
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (l, r)) in merges.iter().enumerate() {
            let merged = id(&format!("{l}{r}"))?;
            merge_map.entry((id(l)?, id(r)?)).or_insert(Merge {
                rank: rank as u32,
                merged,
            });
        }
        let regex = |p: &str| {
            Regex::new(p).map_err(|e| Error::Msg(format!("CLIP pre-tokenisation pattern: {e}")))
        };
        let pattern = regex(PATTERN)?;
        let byte_level_pattern = regex(BYTE_LEVEL_PATTERN)?;
        Ok(Self {
            bos_id: id(START_OF_TEXT)?,
            eos_id: id(END_OF_TEXT)?,
            exclamation_id: id("!")?,
            encoder,
            decoder,
            merges: merge_map,
            byte_decoder,
            byte_ids,
            pattern,
            byte_level_pattern,
        })
    }

    /// Number of ids (49,408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.decoder.len()
    }

    /// Id of `<|startoftext|>` (49406).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>` (49407).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the pad token of `style`.
    pub fn pad_id(&self, style: PadStyle) -> u32 {
        match style {
            PadStyle::EndToken => self.eos_id,
            PadStyle::Exclamation => self.exclamation_id,
        }
    }

    /// The id of a token string (`"cat</w>"`, `"<|endoftext|>"`), if it is one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.encoder.get(token).copied()
    }

    /// The token string of an id (`"cat</w>"`), if the id exists.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.decoder.get(id as usize)?.as_deref()
    }

    /// The ids of `text` wrapped in the start and end tokens, without padding or
    /// truncation: `"a photo of a cat"` → `[49406, 320, 1125, 539, 320, 2368, 49407]`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos_id];
        self.encode_into(text, &mut ids);
        ids.push(self.eos_id);
        ids
    }

    /// The ids of `text` without the start and end tokens.
    pub fn encode_without_special(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.encode_into(text, &mut ids);
        ids
    }

    /// Exactly `max_len` ids as a Stable Diffusion text encoder takes them
    /// (`max_len` is [`MAX_LENGTH`] = 77 for all SD models): the start token, at
    /// most `max_len − 2` tokens of `text` (the rest is cut off), the end token,
    /// then pad tokens of `style`. A `max_len` below 2 is taken as 2.
    pub fn encode_padded(&self, text: &str, max_len: usize, style: PadStyle) -> Vec<u32> {
        let max_len = max_len.max(2);
        let mut ids = self.encode_without_special(text);
        ids.truncate(max_len - 2);
        ids.insert(0, self.bos_id);
        ids.push(self.eos_id);
        ids.resize(max_len, self.pad_id(style));
        ids
    }

    /// The token strings of `text` (without start and end tokens), e.g. to show
    /// how a caption is split: `"zwx dog"` → `["z", "wx</w>", "dog</w>"]`.
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        self.encode_without_special(text)
            .into_iter()
            .map(|id| self.id_to_token(id).unwrap_or("").to_string())
            .collect()
    }

    /// Whether `word` is one token of the vocabulary (a good DreamBooth
    /// identifier is one rare token: `"sks"` and `"ohwx"` are one, `"zwx"` is two).
    pub fn is_single_token(&self, word: &str) -> bool {
        self.encode_without_special(word).len() == 1
    }

    /// The text of `ids`: byte-level characters decoded to UTF-8, each end of
    /// word a space; start and end tokens (and so SD1's padding) are dropped,
    /// SD2's `!` padding is text and stays.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if id == self.bos_id || id == self.eos_id {
                continue;
            }
            let Some(token) = self.id_to_token(id) else {
                continue;
            };
            let (body, end_of_word) = match token.strip_suffix(END_OF_WORD) {
                Some(body) => (body, true),
                None => (token, false),
            };
            for c in body.chars() {
                match self.byte_decoder.get(&c) {
                    Some(&b) => bytes.push(b),
                    None => {
                        let mut buf = [0; 4];
                        bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            if end_of_word {
                bytes.push(b' ');
            }
        }
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Appends the ids of `text` (no start/end tokens) to `ids`.
    fn encode_into(&self, text: &str, ids: &mut Vec<u32>) {
        // Special tokens written in the prompt are matched on the raw text, as
        // `tokenizers` does for its added tokens (they are not normalised).
        let mut rest = text;
        loop {
            let next = [(START_OF_TEXT, self.bos_id), (END_OF_TEXT, self.eos_id)]
                .into_iter()
                .filter_map(|(token, id)| rest.find(token).map(|at| (at, token.len(), id)))
                .min_by_key(|&(at, _, _)| at);
            match next {
                Some((at, len, id)) => {
                    self.encode_plain(&rest[..at], ids);
                    ids.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_plain(rest, ids);
                    return;
                }
            }
        }
    }

    /// Normalises, pre-tokenises and BPE-encodes text free of special tokens.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        let normalised = normalise(text);
        for piece in self.pattern.find_iter(&normalised) {
            for piece in self.byte_level_pattern.find_iter(piece.as_str()) {
                self.bpe(piece.as_str().as_bytes(), ids);
            }
        }
    }

    /// Byte-level BPE of one pre-tokenised piece, appending its ids.
    fn bpe(&self, piece: &[u8], ids: &mut Vec<u32>) {
        let Some((&last, init)) = piece.split_last() else {
            return;
        };
        let mut word: Vec<u32> = init
            .iter()
            .map(|&b| self.byte_ids[b as usize].0)
            .chain(std::iter::once(self.byte_ids[last as usize].1))
            .collect();
        // Merge the lowest-ranked adjacent pair, all its occurrences left to
        // right, until no pair has a merge (OpenAI's and transformers' loop; the
        // priority queue of `tokenizers` gives the same result because a merge
        // involving a merged symbol always ranks after the merge that made it).
        loop {
            let best = word
                .windows(2)
                .filter_map(|w| self.merges.get(&(w[0], w[1])).map(|m| (*m, w[0], w[1])))
                .min_by_key(|(m, _, _)| m.rank);
            let Some((Merge { merged, .. }, left, right)) = best else {
                break;
            };
            let mut out = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == left && word[i + 1] == right {
                    out.push(merged);
                    i += 2;
                } else {
                    out.push(word[i]);
                    i += 1;
                }
            }
            word = out;
        }
        ids.extend(word);
    }
}

/// NFC, whitespace runs → one space, per-character lowercase.
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for c in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// `"a b"` → `("a", "b")`.
fn split_merge(line: &str) -> Option<(&str, &str)> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(l), Some(r), None) if !l.is_empty() && !r.is_empty() => Some((l, r)),
        _ => None,
    }
}

/// The merges of a `merges.txt`: an optional `#version` header, then one
/// `left right` pair per line.
fn parse_merges_txt(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    text.lines()
        .enumerate()
        .filter(|(i, line)| (*i != 0 || !line.starts_with("#version")) && !line.is_empty())
        .map(|(i, line)| {
            split_merge(line)
                .map(|(l, r)| (l.to_string(), r.to_string()))
                .ok_or_else(|| {
                    Error::Msg(format!(
                        "{}: line {} is {line:?}, expected two symbols separated by a space",
                        path.display(),
                        i + 1
                    ))
                })
        })
        .collect()
}

/// Reads a UTF-8 file, naming it in the error.
fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Msg(format!("cannot read {}: {e}", path.display())))
}
