//! CLIP: tokenizer and text encoders (work in progress).
