//! The rare-token check of DreamBooth identifiers.
//!
//! DreamBooth binds a subject to an *identifier* in the instance prompt
//! (`"a photo of ohwx dog"`). It works best when the identifier is one CLIP
//! token the model has almost no prior for: a word split into several tokens
//! spreads the subject over pieces that also occur in other words, and a common
//! word drags its meaning along (and loses it: the model forgets what the word
//! meant).
//!
//! [`check_identifier`] applies these rules, precisely:
//!
//! 1. The prompt is lowercased (as CLIP does) and cut into words at every
//!    character that is not an ASCII letter or digit; words with a digit are
//!    dropped (numbers and tags such as `4k`, `3d`, `1girl` are not identifiers).
//! 2. Words in [`COMMON_WORDS`] — articles, prepositions, photo/style words and
//!    the usual class nouns (`dog`, `man`, `style`, …) — are not identifiers.
//!    The other words are the *candidates*.
//! 3. A candidate is *rare-looking* if it is several tokens (a made-up word) or
//!    one token with id ≥ [`COMMON_ID_LIMIT`]. CLIP's BPE vocabulary is ordered
//!    by merge order, which follows frequency in CLIP's training text, so a low
//!    id is a frequent word (`dog` 1929, `smiling` 9200; `ohwx` 47993).
//! 4. Advice is given for: a candidate that is several tokens (`zwx` → `z` +
//!    `wx`); a candidate in [`KNOWN_BAD`] (`sks`, a rifle); and, only when no
//!    candidate is rare-looking, every candidate that is a common single token
//!    (`"a photo of john"`: `john` is token 1742). Rule 4's last part keeps
//!    descriptive words quiet when a proper identifier is present
//!    (`"a photo of ohwx man smiling"` is fine).
//!
//! A prompt without candidates gets no advice (a caption without an
//! identifier is normal for style training). Every piece of advice carries the
//! same five suggestions, from [`rare_suggestions`].

use sd_lora_model::clip::ClipTokenizer;

/// One problem with an identifier, and what to use instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAdvice {
    /// The word as it appears (lowercased) in the prompt.
    pub word: String,
    /// What is wrong, in a sentence.
    pub problem: String,
    /// Rare single-token identifiers to use instead.
    pub suggestions: Vec<String>,
}

/// Single tokens with an id below this are common words (see the module docs).
pub const COMMON_ID_LIMIT: u32 = 20_000;

/// Suggested identifiers have ids at least this high (the last fifth of the
/// vocabulary: the rarest merges).
pub const SUGGESTION_ID_MIN: u32 = 40_000;

/// How many identifiers are suggested.
pub const SUGGESTION_COUNT: usize = 5;

/// Single tokens that are rare but known to be poor identifiers, and why.
pub const KNOWN_BAD: &[(&str, &str)] = &[(
    "sks",
    "\"sks\" is a rifle (the SKS carbine): Stable Diffusion has a prior for it and may draw guns",
)];

/// Words that are never identifiers: function words, words of photo and art
/// prompts, and common class nouns.
#[rustfmt::skip]
pub const COMMON_WORDS: &[&str] = &[
    // Function words.
    "a", "an", "the", "of", "in", "on", "at", "by", "with", "and", "or", "for", "from", "to",
    "as", "is", "are", "my", "his", "her", "their", "our", "its", "this", "that", "these",
    "those", "some", "very", "into", "over", "under", "near", "next", "front", "behind",
    "wearing", "holding", "sitting", "standing",
    // Photo / art prompt words.
    "photo", "photograph", "picture", "image", "portrait", "closeup", "close", "up", "shot",
    "style", "painting", "drawing", "illustration", "art", "artwork", "render", "sketch",
    "artstyle", "rendering", "high", "quality", "detailed", "realistic", "background", "white",
    "black",
    // Class nouns.
    "person", "people", "man", "woman", "men", "women", "boy", "girl", "child", "kid", "baby",
    "face", "guy", "lady", "dog", "cat", "puppy", "kitten", "animal", "pet", "bird", "horse",
    "toy", "car", "house", "building", "object", "thing", "product", "bottle", "cup", "shoe",
    "shoes", "bag", "backpack", "teapot", "vase", "clock", "sneaker", "sneakers", "hat",
    "glasses", "sunglasses", "chair", "table", "robot", "character", "creature", "monster",
    "plushie", "stuffed", "teddy", "bear", "candle", "can", "bowl", "landscape", "scene",
    "place", "room", "city",
];

/// Checks the identifier(s) of an instance prompt or folder caption; an empty
/// result means nothing to warn about. See the module docs for the rules.
pub fn check_identifier(tokenizer: &ClipTokenizer, prompt: &str) -> Vec<TokenAdvice> {
    let words = prompt_words(prompt);
    let candidates: Vec<Candidate> = words
        .iter()
        .filter(|w| !COMMON_WORDS.contains(&w.as_str()))
        .map(|w| Candidate::new(tokenizer, w))
        .collect();
    if candidates.is_empty() {
        return Vec::new();
    }
    let any_rare = candidates.iter().any(Candidate::rare_looking);
    let mut advice = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for c in &candidates {
        if !seen.insert(c.word.clone()) {
            continue;
        }
        let problem = if c.tokens.len() > 1 {
            Some(format!(
                "\"{}\" is {} CLIP tokens ({}), not one: the subject is spread over pieces \
                 that also occur in other words",
                c.word,
                c.tokens.len(),
                c.tokens
                    .iter()
                    .map(|t| format!("\"{}\"", t.trim_end_matches("</w>")))
                    .collect::<Vec<_>>()
                    .join(" + ")
            ))
        } else if let Some((_, why)) = KNOWN_BAD.iter().find(|(w, _)| *w == c.word) {
            Some(format!("{why}; pick another identifier"))
        } else if !any_rare && c.ids.len() == 1 && c.ids[0] < COMMON_ID_LIMIT {
            Some(format!(
                "\"{}\" is a common word (CLIP token {}, among the {COMMON_ID_LIMIT} most frequent): \
                 training overwrites what the model knows about it, and its meaning leaks into the subject",
                c.word, c.ids[0]
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            advice.push(TokenAdvice {
                word: c.word.clone(),
                problem,
                suggestions: Vec::new(),
            });
        }
    }
    if !advice.is_empty() {
        let suggestions = rare_suggestions(tokenizer, &words);
        for a in &mut advice {
            a.suggestions = suggestions.clone();
        }
    }
    advice
}

/// [`SUGGESTION_COUNT`] rare single-token identifiers, deterministic for a
/// vocabulary, none of them in `exclude`. Candidates are whole-word tokens
/// (`xxx</w>`) of 3–5 lowercase ASCII letters with id ≥ [`SUGGESTION_ID_MIN`],
/// not in [`KNOWN_BAD`] or [`SUGGESTION_DENY`], ranked:
/// first the `…wx` family `ohwx` belongs to (weather-station handles in CLIP's
/// training text: rare and with no visual meaning), then tokens without vowels
/// (abbreviations, not words); within each, higher ids (rarer) first.
pub fn rare_suggestions(tokenizer: &ClipTokenizer, exclude: &[String]) -> Vec<String> {
    let mut ranked: Vec<(u8, std::cmp::Reverse<u32>, String)> = Vec::new();
    let n = tokenizer.vocab_size() as u32;
    for id in SUGGESTION_ID_MIN..n {
        let Some(word) = tokenizer
            .id_to_token(id)
            .and_then(|t| t.strip_suffix("</w>"))
        else {
            continue;
        };
        if !(3..=5).contains(&word.len()) || !word.bytes().all(|b| b.is_ascii_lowercase()) {
            continue;
        }
        if KNOWN_BAD.iter().any(|(w, _)| *w == word)
            || SUGGESTION_DENY.contains(&word)
            || exclude.iter().any(|e| e == word)
        {
            continue;
        }
        let class = if word.ends_with("wx") {
            0
        } else if !word.bytes().any(|b| b"aeiouy".contains(&b)) {
            1
        } else {
            continue;
        };
        ranked.push((class, std::cmp::Reverse(id), word.to_string()));
    }
    ranked.sort();
    ranked
        .into_iter()
        .map(|(_, _, w)| w)
        .take(SUGGESTION_COUNT)
        .collect()
}

/// Vowel-free tokens that are words or offensive, never suggested.
#[rustfmt::skip]
pub const SUGGESTION_DENY: &[&str] = &[
    "fck", "fcking", "xxx", "xxxx", "xxxxx", "wtf", "stfu", "pls", "plz", "thx", "nsfw", "bbw", "dmx", "kkk", "kkkk", "psst", "shh", "hmm", "hmmm", "brr", "grr", "zzz",
    "zzzz", "wwwww", "nth", "crwd",
];

/// The lowercased ASCII-alphanumeric words of a prompt, words with digits dropped.
fn prompt_words(prompt: &str) -> Vec<String> {
    prompt
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty() && !w.bytes().any(|b| b.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

/// A word and how CLIP tokenizes it.
struct Candidate {
    word: String,
    ids: Vec<u32>,
    tokens: Vec<String>,
}

impl Candidate {
    fn new(tokenizer: &ClipTokenizer, word: &str) -> Self {
        let ids = tokenizer.encode_without_special(word);
        let tokens = ids
            .iter()
            .map(|&id| tokenizer.id_to_token(id).unwrap_or("?").to_string())
            .collect();
        Self {
            word: word.to_string(),
            ids,
            tokens,
        }
    }

    fn rare_looking(&self) -> bool {
        self.ids.len() > 1 || self.ids.first().is_some_and(|&id| id >= COMMON_ID_LIMIT)
    }
}
