//! AUTOMATIC1111 prompt syntax and prompts longer than 77 tokens, so that a
//! prompt copied from A1111 (or from a PNG it wrote) conditions our sampler the
//! same way.
//!
//! Three steps, mirroring A1111's `prompt_parser.parse_prompt_attention` and
//! `sd_hijack_clip.TextConditionalModel`:
//!
//! 1. [`parse_prompt_attention`]: `(text)` ×1.1, `((text))` ×1.21, `[text]`
//!    ÷1.1, `(text:1.5)` an explicit weight, `\(` `\)` `\[` `\]` `\\` literal
//!    characters, unbalanced brackets tolerated (an unclosed bracket weighs the
//!    rest of the prompt, a stray closing one is plain text), and the keyword
//!    `BREAK` forcing a new chunk. Adjacent parts of equal weight are merged.
//! 2. [`tokenize_prompt`]: each part is tokenized on its own (as A1111 does, so
//!    `(cat)s` is `cat` + `s`, not `cats`), and the tokens are laid into chunks
//!    of [`CHUNK_TOKENS`] = 75. When a chunk is full and a comma lies within
//!    the last [`COMMA_BACKTRACK`] = 20 tokens, the tokens after that comma move
//!    to the next chunk (A1111's default `comma_padding_backtrack = 20`), so a
//!    phrase is not cut in two. Each chunk is wrapped in the start and end
//!    tokens and padded to 77 with the model's [`PadStyle`] (SD1: the end token;
//!    SD2: `!`), every token carrying its weight (1 for the special tokens).
//! 3. [`encode_prompt`]: the text encoder runs on each chunk; each token's
//!    hidden state is multiplied by its weight, then the chunk is rescaled so
//!    that its mean equals the unweighted mean (A1111's "Original" emphasis,
//!    `z * (original_mean / new_mean)`), and the chunks are concatenated along
//!    the sequence: `[1, 77·n_chunks, dim]`. The UNet's cross-attention takes
//!    any sequence length, which is how A1111 handles long prompts.
//!
//! [`encode_prompt_pair`] gives the prompt and the negative prompt the same
//! number of chunks (the shorter padded with encodings of the empty prompt,
//! like A1111's `pad_cond`), as classifier-free guidance batches them.
//!
//! Not supported (A1111 features outside this syntax): prompt editing
//! `[from:to:when]`, alternation `[a|b]`, `AND` composition, textual-inversion
//! embeddings and `<lora:…>` tags — they are passed to the tokenizer as text.

use candle_core::{DType, Result, Tensor};

use crate::clip::{ClipTokenizer, MAX_LENGTH, PadStyle};
use crate::conditioning::TextConditioning;
use crate::pipeline::StableDiffusion;

/// Prompt tokens per chunk: 77 minus the start and end tokens.
pub const CHUNK_TOKENS: usize = MAX_LENGTH - 2;

/// How far back (in tokens) from a full chunk's end a comma may lie for the
/// text after it to move to the next chunk (A1111's default).
pub const COMMA_BACKTRACK: usize = 20;

/// `(text)` multiplies the weight by this, `[text]` divides by it.
const ROUND_MULTIPLIER: f64 = 1.1;
const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPart {
    /// Text with its attention weight.
    Text { text: String, weight: f64 },
    /// The `BREAK` keyword: the next text starts a new chunk.
    Break,
}

impl PromptPart {
    fn text(text: impl Into<String>, weight: f64) -> Self {
        Self::Text {
            text: text.into(),
            weight,
        }
    }
}

/// Parses A1111's attention syntax (see the module docs) into parts of equal
/// weight, exactly as `parse_prompt_attention` does:
/// `"an (important) word"` → `an ` 1.0, `important` 1.1, ` word` 1.0.
///
/// An empty prompt gives one empty part of weight 1. An explicit weight that
/// does not parse as a number (`(a:1.2.3)`) leaves its `:` as plain text, where
/// A1111 would fail.
pub fn parse_prompt_attention(prompt: &str) -> Vec<PromptPart> {
    let mut res: Vec<PromptPart> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();

    fn multiply_range(res: &mut [PromptPart], start: usize, multiplier: f64) {
        for part in &mut res[start..] {
            if let PromptPart::Text { weight, .. } = part {
                *weight *= multiplier;
            }
        }
    }

    let chars: Vec<char> = prompt.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                // `\(`, `\)`, `\[`, `\]`, `\\` give the character; a lone
                // backslash gives nothing (A1111 appends `text[1:]`, empty).
                match chars.get(i + 1) {
                    Some(&next @ ('(' | ')' | '[' | ']' | '\\')) => {
                        res.push(PromptPart::text(next.to_string(), 1.0));
                        i += 2;
                    }
                    _ => {
                        res.push(PromptPart::text("", 1.0));
                        i += 1;
                    }
                }
            }
            '(' => {
                round.push(res.len());
                i += 1;
            }
            '[' => {
                square.push(res.len());
                i += 1;
            }
            ':' => {
                match explicit_weight(&chars, i) {
                    Some((weight, end)) if !round.is_empty() => {
                        if let Some(start) = round.pop() {
                            multiply_range(&mut res, start, weight);
                        }
                        i = end;
                    }
                    _ => {
                        // A `:` that is not `:N)` inside `(`, or a weight with
                        // no open bracket: plain text (A1111 does the same,
                        // except that its `:N)` match then also eats the `)`).
                        match explicit_weight_span(&chars, i) {
                            Some(end) if round.is_empty() => {
                                let text: String = chars[i..end].iter().collect();
                                push_text(&mut res, &text);
                                i = end;
                            }
                            _ => {
                                push_text(&mut res, ":");
                                i += 1;
                            }
                        }
                    }
                }
            }
            ')' if !round.is_empty() => {
                if let Some(start) = round.pop() {
                    multiply_range(&mut res, start, ROUND_MULTIPLIER);
                }
                i += 1;
            }
            ']' if !square.is_empty() => {
                if let Some(start) = square.pop() {
                    multiply_range(&mut res, start, SQUARE_MULTIPLIER);
                }
                i += 1;
            }
            ')' | ']' => {
                push_text(&mut res, &c.to_string());
                i += 1;
            }
            _ => {
                let start = i;
                while i < chars.len() && !matches!(chars[i], '\\' | '(' | ')' | '[' | ']' | ':') {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                push_text(&mut res, &text);
            }
        }
    }
    // Unclosed brackets weigh everything after them.
    for start in round {
        multiply_range(&mut res, start, ROUND_MULTIPLIER);
    }
    for start in square {
        multiply_range(&mut res, start, SQUARE_MULTIPLIER);
    }
    if res.is_empty() {
        res.push(PromptPart::text("", 1.0));
    }
    merge_equal_weights(res)
}

/// The end (exclusive) of a `:\s*[+-]?[.\d]+\s*\)` match starting at `colon`.
fn explicit_weight_span(chars: &[char], colon: usize) -> Option<usize> {
    let mut j = colon + 1;
    while j < chars.len() && chars[j].is_whitespace() {
        j += 1;
    }
    if j < chars.len() && matches!(chars[j], '+' | '-') {
        j += 1;
    }
    let digits_start = j;
    while j < chars.len() && (chars[j] == '.' || chars[j].is_ascii_digit()) {
        j += 1;
    }
    if j == digits_start {
        return None;
    }
    while j < chars.len() && chars[j].is_whitespace() {
        j += 1;
    }
    (chars.get(j) == Some(&')')).then_some(j + 1)
}

/// The weight of a `:N)` at `colon` and the index after its `)`, when the
/// number parses.
fn explicit_weight(chars: &[char], colon: usize) -> Option<(f64, usize)> {
    let end = explicit_weight_span(chars, colon)?;
    let number: String = chars[colon + 1..end - 1].iter().collect();
    let weight = number.trim().parse::<f64>().ok()?;
    Some((weight, end))
}

/// Appends text of weight 1, split at the `BREAK` keyword (a whole word, with
/// the whitespace around it removed, like A1111's `\s*\bBREAK\b\s*`).
fn push_text(res: &mut Vec<PromptPart>, text: &str) {
    for (n, piece) in split_break(text).into_iter().enumerate() {
        if n > 0 {
            res.push(PromptPart::Break);
        }
        res.push(PromptPart::text(piece, 1.0));
    }
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn split_break(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut i = 0;
    while i < chars.len() {
        let is_break = chars[i..].starts_with(&['B', 'R', 'E', 'A', 'K'])
            && (i == 0 || !is_word(chars[i - 1]))
            && chars.get(i + 5).is_none_or(|&c| !is_word(c));
        if is_break {
            pieces.push(current.trim_end().to_string());
            current = String::new();
            i += 5;
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
        } else {
            current.push(chars[i]);
            i += 1;
        }
    }
    pieces.push(current);
    pieces
}

fn merge_equal_weights(parts: Vec<PromptPart>) -> Vec<PromptPart> {
    let mut merged: Vec<PromptPart> = Vec::with_capacity(parts.len());
    for part in parts {
        if let (
            Some(PromptPart::Text {
                text: last_text,
                weight: last_weight,
            }),
            PromptPart::Text { text, weight },
        ) = (merged.last_mut(), &part)
            && *last_weight == *weight
        {
            last_text.push_str(text);
            continue;
        }
        merged.push(part);
    }
    merged
}

/// One chunk of a tokenized prompt: exactly 77 ids (start token, up to 75
/// prompt tokens, end token, padding) and a weight per id.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptChunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// A prompt split into chunks, see [`tokenize_prompt`].
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    /// At least one chunk.
    pub chunks: Vec<PromptChunk>,
    /// Prompt tokens counted as A1111 shows them (`75` per full chunk plus the
    /// last chunk's tokens).
    pub token_count: usize,
}

/// Parses `prompt` and lays its tokens into chunks of 77 (see the module docs).
pub fn tokenize_prompt(
    tokenizer: &ClipTokenizer,
    pad_style: PadStyle,
    prompt: &str,
) -> TokenizedPrompt {
    let parts = parse_prompt_attention(prompt);
    let comma = tokenizer.token_to_id(",</w>");
    let mut builder = ChunkBuilder {
        bos: tokenizer.bos_id(),
        eos: tokenizer.eos_id(),
        pad: tokenizer.pad_id(pad_style),
        chunks: Vec::new(),
        ids: Vec::new(),
        weights: Vec::new(),
        token_count: 0,
        last_comma: None,
    };
    for part in parts {
        let (text, weight) = match part {
            PromptPart::Break => {
                builder.next_chunk(false);
                continue;
            }
            PromptPart::Text { text, weight } => (text, weight as f32),
        };
        for id in tokenizer.encode_without_special(&text) {
            if Some(id) == comma {
                builder.last_comma = Some(builder.ids.len());
            } else if let Some(last_comma) = builder.last_comma
                && builder.ids.len() == CHUNK_TOKENS
                && builder.ids.len() - last_comma <= COMMA_BACKTRACK
            {
                // Move the words after the comma to the next chunk.
                let moved_ids = builder.ids.split_off(last_comma + 1);
                let moved_weights = builder.weights.split_off(last_comma + 1);
                builder.next_chunk(false);
                builder.ids = moved_ids;
                builder.weights = moved_weights;
            }
            if builder.ids.len() == CHUNK_TOKENS {
                builder.next_chunk(false);
            }
            builder.ids.push(id);
            builder.weights.push(weight);
        }
    }
    if !builder.ids.is_empty() || builder.chunks.is_empty() {
        builder.next_chunk(true);
    }
    TokenizedPrompt {
        chunks: builder.chunks,
        token_count: builder.token_count,
    }
}

struct ChunkBuilder {
    bos: u32,
    eos: u32,
    pad: u32,
    chunks: Vec<PromptChunk>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    token_count: usize,
    last_comma: Option<usize>,
}

impl ChunkBuilder {
    /// Closes the current chunk: start token, tokens, end token, padding.
    fn next_chunk(&mut self, is_last: bool) {
        self.token_count += if is_last {
            self.ids.len()
        } else {
            CHUNK_TOKENS
        };
        let mut ids = Vec::with_capacity(MAX_LENGTH);
        ids.push(self.bos);
        ids.append(&mut self.ids);
        ids.push(self.eos);
        // A1111 fills with the end token, then replaces everything after the
        // first end token by the pad token: the same as padding with it here.
        ids.resize(MAX_LENGTH, self.pad);
        let mut weights = Vec::with_capacity(MAX_LENGTH);
        weights.push(1.0);
        weights.append(&mut self.weights);
        weights.resize(MAX_LENGTH, 1.0);
        self.chunks.push(PromptChunk { ids, weights });
        self.last_comma = None;
    }
}

/// Encodes chunks with the text encoder(s) (clip skip `clip_skip`, 1 = the
/// family's default layer), applies the weights with A1111's mean rescaling per
/// chunk, and concatenates them: context `[1, 77·chunks.len(), width]` in the
/// encoder's dtype. SDXL's pooled embedding is the first chunk's, as in A1111.
pub fn encode_chunks(
    sd: &StableDiffusion,
    chunks: &[PromptChunk],
    clip_skip: usize,
) -> Result<TextConditioning> {
    if chunks.is_empty() {
        candle_core::bail!(
            "encode_chunks: no chunks to encode (tokenize_prompt gives at least one)"
        )
    }
    let n = chunks.len();
    let ids: Vec<Vec<u32>> = chunks.iter().map(|c| c.ids.clone()).collect();
    let encoded = sd.encode_id_rows(&ids, clip_skip)?;
    let z = encoded.context;
    let device = z.device().clone();
    let hidden = z.dim(2)?;
    let weighted = if chunks.iter().all(|c| c.weights.iter().all(|&w| w == 1.0)) {
        // Exactly the plain encoding (the rescale would be ×1 anyway).
        z
    } else {
        let weights: Vec<f32> = chunks
            .iter()
            .flat_map(|c| c.weights.iter().copied())
            .collect();
        let weights =
            Tensor::from_vec(weights, (n, MAX_LENGTH, 1), &device)?.to_dtype(z.dtype())?;
        // The means in f32 so that a half-precision encoder does not lose the
        // small difference between them.
        let original_mean = z.to_dtype(DType::F32)?.mean_keepdim(2)?.mean_keepdim(1)?;
        let zw = z.broadcast_mul(&weights)?;
        let new_mean = zw.to_dtype(DType::F32)?.mean_keepdim(2)?.mean_keepdim(1)?;
        let scale = (original_mean / new_mean)?.to_dtype(zw.dtype())?;
        zw.broadcast_mul(&scale)?
    };
    Ok(TextConditioning {
        context: weighted.reshape((1, n * MAX_LENGTH, hidden))?,
        pooled: encoded.pooled.map(|p| p.narrow(0, 0, 1)).transpose()?,
    })
}

/// The conditioning of `prompt` (A1111 syntax, any length): context
/// `[1, 77·n_chunks, width]`.
pub fn encode_prompt(
    sd: &StableDiffusion,
    prompt: &str,
    clip_skip: usize,
) -> Result<TextConditioning> {
    let tokenized = tokenize_prompt(&sd.tokenizer, sd.pad_style, prompt);
    encode_chunks(sd, &tokenized.chunks, clip_skip)
}

/// The conditionings of `prompt` and `negative` with the same number of chunks
/// (the shorter one padded with chunks of the empty prompt), ready to be
/// stacked for classifier-free guidance: `(cond, uncond)`, both
/// `[1, 77·n_chunks, hidden]`.
pub fn encode_prompt_pair(
    sd: &StableDiffusion,
    prompt: &str,
    negative: &str,
    clip_skip: usize,
) -> Result<(TextConditioning, TextConditioning)> {
    let mut cond = tokenize_prompt(&sd.tokenizer, sd.pad_style, prompt).chunks;
    let mut uncond = tokenize_prompt(&sd.tokenizer, sd.pad_style, negative).chunks;
    let n = cond.len().max(uncond.len());
    let empty = tokenize_prompt(&sd.tokenizer, sd.pad_style, "").chunks;
    cond.resize(n, empty[0].clone());
    uncond.resize(n, empty[0].clone());
    Ok((
        encode_chunks(sd, &cond, clip_skip)?,
        encode_chunks(sd, &uncond, clip_skip)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(text: &str, weight: f64) -> PromptPart {
        PromptPart::text(text, weight)
    }

    /// Compares parts, weights to 1e-9 (A1111's docstring prints Python's
    /// rounding, e.g. 1.5730000000000004).
    fn assert_parts(prompt: &str, expected: &[PromptPart]) {
        let got = parse_prompt_attention(prompt);
        assert_eq!(got.len(), expected.len(), "{prompt:?}: {got:?}");
        for (g, e) in got.iter().zip(expected) {
            match (g, e) {
                (
                    PromptPart::Text {
                        text: gt,
                        weight: gw,
                    },
                    PromptPart::Text {
                        text: et,
                        weight: ew,
                    },
                ) => {
                    assert_eq!(gt, et, "{prompt:?}: {got:?}");
                    assert!((gw - ew).abs() < 1e-9, "{prompt:?}: {got:?}");
                }
                (PromptPart::Break, PromptPart::Break) => {}
                _ => panic!("{prompt:?}: {got:?} != {expected:?}"),
            }
        }
    }

    #[test]
    fn parses_a1111_docstring_examples() {
        assert_parts("normal text", &[t("normal text", 1.0)]);
        assert_parts(
            "an (important) word",
            &[t("an ", 1.0), t("important", 1.1), t(" word", 1.0)],
        );
        assert_parts("(unbalanced", &[t("unbalanced", 1.1)]);
        assert_parts("\\(literal\\]", &[t("(literal]", 1.0)]);
        assert_parts("(unnecessary)(parens)", &[t("unnecessaryparens", 1.1)]);
        assert_parts(
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            &[
                t("a ", 1.0),
                t("house", 1.5730000000000004),
                t(" ", 1.1),
                t("on", 1.0),
                t(" a ", 1.1),
                t("hill", 0.55),
                t(", sun, ", 1.1),
                t("sky", 1.4641000000000006),
                t(".", 1.1),
            ],
        );
        assert_parts("", &[t("", 1.0)]);
    }

    #[test]
    fn parses_weights_squares_breaks_and_stray_brackets() {
        assert_parts("((a))", &[t("a", 1.21)]);
        assert_parts("[a]", &[t("a", 1.0 / 1.1)]);
        assert_parts("[[a]]", &[t("a", 1.0 / 1.21)]);
        assert_parts("(a:1.5) b", &[t("a", 1.5), t(" b", 1.0)]);
        assert_parts("(a: 0.8 )", &[t("a", 0.8)]);
        assert_parts("a) b]", &[t("a) b]", 1.0)]);
        assert_parts("a:b", &[t("a:b", 1.0)]);
        assert_parts("[unclosed", &[t("unclosed", 1.0 / 1.1)]);
        assert_parts(
            "cat BREAK dog",
            &[t("cat", 1.0), PromptPart::Break, t("dog", 1.0)],
        );
        // Only the whole word.
        assert_parts("BREAKFAST", &[t("BREAKFAST", 1.0)]);
        assert_parts("a \\\\ b", &[t("a \\ b", 1.0)]);
    }

    fn tiny() -> StableDiffusion {
        crate::builtin::tiny_sd1(DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn long_prompt_makes_two_chunks() {
        let sd = tiny();
        // "cat" is one token: 100 tokens, no commas.
        let prompt = ["cat"; 100].join(" ");
        let tp = tokenize_prompt(&sd.tokenizer, sd.pad_style, &prompt);
        assert_eq!(tp.chunks.len(), 2);
        assert_eq!(tp.token_count, 100);
        let cat = sd.tokenizer.token_to_id("cat</w>").unwrap();
        for chunk in &tp.chunks {
            assert_eq!(chunk.ids.len(), 77);
            assert_eq!(chunk.weights.len(), 77);
            assert_eq!(chunk.ids[0], sd.tokenizer.bos_id());
        }
        assert!(tp.chunks[0].ids[1..76].iter().all(|&id| id == cat));
        assert_eq!(tp.chunks[0].ids[76], sd.tokenizer.eos_id());
        assert!(tp.chunks[1].ids[1..26].iter().all(|&id| id == cat));
        assert_eq!(tp.chunks[1].ids[26], sd.tokenizer.eos_id());
        let z = encode_prompt(&sd, &prompt, 1).unwrap().context;
        assert_eq!(z.dims(), &[1, 154, sd.text_encoder_config.hidden_size]);
    }

    #[test]
    fn comma_moves_the_last_phrase_to_the_next_chunk() {
        let sd = tiny();
        // 70 tokens, a comma (71st), then 10 more: the chunk is full at 75 with
        // the comma 4 tokens back, so those 4 words move on: all 10 in chunk 2.
        let prompt = format!("{}, {}", ["cat"; 70].join(" "), ["dog"; 10].join(" "));
        let tp = tokenize_prompt(&sd.tokenizer, sd.pad_style, &prompt);
        assert_eq!(tp.chunks.len(), 2);
        let comma = sd.tokenizer.token_to_id(",</w>").unwrap();
        assert_eq!(tp.chunks[0].ids[71], comma);
        assert_eq!(tp.chunks[0].ids[72], sd.tokenizer.eos_id());
        let dog = sd.tokenizer.token_to_id("dog</w>").unwrap();
        assert!(tp.chunks[1].ids[1..11].iter().all(|&id| id == dog));
        assert_eq!(tp.chunks[1].ids[11], sd.tokenizer.eos_id());
    }

    #[test]
    fn weights_follow_tokens_and_break_starts_a_chunk() {
        let sd = tiny();
        let tp = tokenize_prompt(&sd.tokenizer, sd.pad_style, "a (cat:1.5) BREAK dog");
        assert_eq!(tp.chunks.len(), 2);
        assert_eq!(&tp.chunks[0].weights[..4], &[1.0, 1.0, 1.5, 1.0]);
        assert_eq!(
            tp.chunks[1].ids[1],
            sd.tokenizer.token_to_id("dog</w>").unwrap()
        );
    }

    #[test]
    fn pads_with_the_models_pad_style() {
        let sd = tiny();
        let tok = &sd.tokenizer;
        let sd1 = tokenize_prompt(tok, PadStyle::EndToken, "cat");
        assert_eq!(&sd1.chunks[0].ids[2..], &[tok.eos_id(); 75][..]);
        let sd2 = tokenize_prompt(tok, PadStyle::Exclamation, "cat");
        assert_eq!(sd2.chunks[0].ids[2], tok.eos_id());
        let pad = tok.pad_id(PadStyle::Exclamation);
        assert!(sd2.chunks[0].ids[3..].iter().all(|&id| id == pad));
        assert_eq!(sd2.token_count, 1);
    }

    #[test]
    fn unit_weights_give_the_plain_encoding() {
        let sd = tiny();
        let prompt = "a photo of a cat";
        let z = encode_prompt(&sd, prompt, 1).unwrap().context;
        let ids = sd.tokenizer.encode_padded(prompt, 77, sd.pad_style);
        let ids = Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap();
        let plain = sd.text_encoder.forward_with_clip_skip(&ids, 1).unwrap();
        let diff = (z - plain).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn weighted_chunk_keeps_its_mean() {
        let sd = tiny();
        let plain = encode_prompt(&sd, "a photo of a cat", 1).unwrap().context;
        let z = encode_prompt(&sd, "a photo of a (cat:1.8)", 1)
            .unwrap()
            .context;
        let m0 = plain.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let m1 = z.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((m0 - m1).abs() <= 1e-5 * m0.abs().max(1e-3), "{m0} vs {m1}");
        let diff = (z - plain).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() > 0.0);
    }

    #[test]
    fn cfg_pair_has_equal_chunks() {
        let sd = tiny();
        let long = ["cat"; 100].join(" ");
        let (c, u) = encode_prompt_pair(&sd, &long, "blurry", 1).unwrap();
        let (c, u) = (c.context, u.context);
        assert_eq!(c.dims(), u.dims());
        assert_eq!(c.dim(1).unwrap(), 154);
        let (c, u) = encode_prompt_pair(&sd, "cat", &long, 2).unwrap();
        let (c, u) = (c.context, u.context);
        assert_eq!(c.dims(), &[1, 154, sd.text_encoder_config.hidden_size]);
        assert_eq!(u.dims(), c.dims());
        // The padding chunk is the empty prompt's encoding.
        let empty = encode_prompt(&sd, "", 2).unwrap().context;
        let second = c.narrow(1, 77, 77).unwrap();
        let diff = (second - empty).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}
