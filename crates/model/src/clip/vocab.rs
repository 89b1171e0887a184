//! The CLIP BPE vocabulary: the byte↔unicode table of byte-level BPE, and the
//! 49,408-token vocabulary built from the merges list that ships with the binary.
//!
//! Single-file checkpoints carry no tokenizer, so the vocabulary OpenAI published
//! with CLIP (`bpe_simple_vocab_16e6.txt.gz`, MIT-licensed, see `assets/clip/`) is
//! embedded. The file holds only merges; the vocabulary is derived from them the
//! way OpenAI's `SimpleTokenizer` and transformers' `CLIPTokenizer` do:
//!
//! ```text
//! ids 0..256       the 256 byte-level characters, in `bytes_to_unicode` order ("!" = 0)
//! ids 256..512     the same characters with the end-of-word suffix "</w>"
//! ids 512..49406   one token per merge, the two halves joined (48,894 merges)
//! 49406, 49407     <|startoftext|>, <|endoftext|>
//! ```

use std::collections::HashMap;
use std::io::Read;

use candle_core::{Result, bail};

/// The gzipped merges file, embedded at build time.
static EMBEDDED_MERGES_GZ: &[u8] =
    include_bytes!("../../../../assets/clip/bpe_simple_vocab_16e6.txt.gz");

/// Number of merges CLIP uses from the file (the file holds more): its
/// vocabulary size of 49,408 minus 256 bytes, 256 end-of-word bytes and 2
/// special tokens.
pub const NUM_MERGES: usize = 49152 - 256 - 2;

/// Size of the CLIP vocabulary.
pub const VOCAB_SIZE: usize = 49408;

/// The start-of-text token.
pub const START_OF_TEXT: &str = "<|startoftext|>";
/// The end-of-text token (SD1 also pads with it).
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// The suffix byte-level BPE appends to the last symbol of each word.
pub const END_OF_WORD: &str = "</w>";

/// GPT-2's reversible map from the 256 byte values to printable unicode
/// characters, in the order CLIP numbers them: the printable Latin-1 bytes
/// (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) map to themselves and come first, the other 68
/// bytes map to U+0100.. in byte order and come after.
pub fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(u32::from('¡')..=u32::from('¬'))
        .chain(u32::from('®')..=u32::from('ÿ'))
        .collect();
    let mut chars = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        // Every code point here is below U+0200, so both conversions succeed.
        .map(|(b, c)| (b as u8, char::from_u32(c).unwrap_or('\u{0}')))
        .collect()
}

/// A BPE vocabulary: token strings by id, and the merges in rank order.
#[derive(Debug, Clone)]
pub struct BpeVocab {
    /// Token string of each id.
    pub tokens: Vec<String>,
    /// Merge pairs, lowest rank (applied first) first.
    pub merges: Vec<(String, String)>,
}

impl BpeVocab {
    /// The CLIP vocabulary built from the embedded merges file.
    pub fn embedded() -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(EMBEDDED_MERGES_GZ)
            .read_to_string(&mut text)
            .map_err(|e| candle_core::Error::Msg(format!("embedded CLIP vocabulary: {e}")))?;
        Self::from_merges_file_text(&text)
    }

    /// Builds the CLIP vocabulary from the text of `bpe_simple_vocab_16e6.txt`:
    /// a header line, then one merge ("a b") per line, of which the first
    /// [`NUM_MERGES`] are used.
    pub fn from_merges_file_text(text: &str) -> Result<Self> {
        let mut merges = Vec::with_capacity(NUM_MERGES);
        for (i, line) in text.split('\n').skip(1).take(NUM_MERGES).enumerate() {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => bail!(
                    "CLIP merges file: line {} is {line:?}, expected two symbols",
                    i + 2
                ),
            }
        }
        if merges.len() != NUM_MERGES {
            bail!(
                "CLIP merges file has {} merges, expected at least {NUM_MERGES}",
                merges.len()
            )
        }
        let bytes: Vec<String> = bytes_to_unicode()
            .into_iter()
            .map(|(_, c)| c.to_string())
            .collect();
        let mut tokens = Vec::with_capacity(VOCAB_SIZE);
        tokens.extend(bytes.iter().cloned());
        tokens.extend(bytes.iter().map(|b| format!("{b}{END_OF_WORD}")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(START_OF_TEXT.to_string());
        tokens.push(END_OF_TEXT.to_string());
        Ok(Self { tokens, merges })
    }

    /// The vocabulary as a `token → id` map (the content of a `vocab.json`).
    pub fn token_ids(&self) -> HashMap<String, u32> {
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect()
    }
}
