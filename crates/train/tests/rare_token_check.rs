//! The rare-token check: multi-token identifiers, common words, known-bad
//! identifiers, quiet prompts, and deterministic suggestions.

use sd_lora_model::clip::ClipTokenizer;
use sd_lora_train::rare_token::{
    COMMON_ID_LIMIT, SUGGESTION_COUNT, SUGGESTION_ID_MIN, check_identifier, rare_suggestions,
};

fn tok() -> ClipTokenizer {
    ClipTokenizer::embedded().unwrap()
}

#[test]
fn a_rare_single_token_identifier_is_fine() {
    let t = tok();
    assert!(t.is_single_token("ohwx"));
    assert!(check_identifier(&t, "a photo of ohwx dog").is_empty());
    // Descriptive words are quiet when a proper identifier is present.
    assert!(check_identifier(&t, "a photo of ohwx man smiling, 4k").is_empty());
    // Prompts without an identifier (style captions) get no advice.
    assert!(check_identifier(&t, "a painting in the style of").is_empty());
    assert!(check_identifier(&t, "").is_empty());
}

#[test]
fn a_multi_token_identifier_is_reported_with_its_pieces() {
    let t = tok();
    let advice = check_identifier(&t, "a photo of zwx dog");
    assert_eq!(advice.len(), 1, "{advice:?}");
    assert_eq!(advice[0].word, "zwx");
    assert!(
        advice[0].problem.contains("2 CLIP tokens"),
        "{}",
        advice[0].problem
    );
    assert!(
        advice[0].problem.contains("\"z\" + \"wx\""),
        "{}",
        advice[0].problem
    );
    assert_eq!(advice[0].suggestions.len(), SUGGESTION_COUNT);
    // Case and punctuation do not matter; the word is reported once.
    let advice = check_identifier(&t, "ZWX, zwx dog.");
    assert_eq!(advice.len(), 1);
    assert_eq!(advice[0].word, "zwx");
}

#[test]
fn a_common_word_identifier_is_reported() {
    let t = tok();
    let advice = check_identifier(&t, "a photo of john");
    assert_eq!(advice.len(), 1, "{advice:?}");
    assert_eq!(advice[0].word, "john");
    assert!(
        advice[0].problem.contains("common word"),
        "{}",
        advice[0].problem
    );
    let id = t.token_to_id("john</w>").unwrap();
    assert!(id < COMMON_ID_LIMIT);
    assert!(advice[0].problem.contains(&id.to_string()));
}

#[test]
fn sks_is_a_known_bad_identifier() {
    let t = tok();
    assert!(t.is_single_token("sks"));
    let advice = check_identifier(&t, "a photo of sks dog");
    assert_eq!(advice.len(), 1, "{advice:?}");
    assert!(advice[0].problem.contains("rifle"), "{}", advice[0].problem);
    assert!(!advice[0].suggestions.contains(&"sks".to_string()));
}

#[test]
fn suggestions_are_rare_single_tokens_deterministic_and_not_in_the_prompt() {
    let t = tok();
    let s = rare_suggestions(&t, &[]);
    println!("suggestions: {s:?}");
    assert_eq!(s.len(), SUGGESTION_COUNT);
    assert_eq!(s, rare_suggestions(&t, &[]));
    for w in &s {
        assert!(t.is_single_token(w), "{w} is not one token");
        let id = t.token_to_id(&format!("{w}</w>")).unwrap();
        assert!(id >= SUGGESTION_ID_MIN, "{w} has id {id}");
        assert!((3..=5).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase()));
        assert_ne!(w, "sks");
    }
    // A suggestion already used in the prompt is not suggested again.
    let first = s[0].clone();
    let advice = check_identifier(&t, &format!("{first} zwx dog"));
    assert_eq!(advice.len(), 1, "{advice:?}");
    assert!(!advice[0].suggestions.contains(&first));
    assert_eq!(advice[0].suggestions.len(), SUGGESTION_COUNT);
}
