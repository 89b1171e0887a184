//! docs/config.md is generated from the config definitions; this fails when
//! it is stale. Regenerate with:
//!   cargo run -q -- config-docs > docs/config.md

use std::process::Command;

#[test]
fn docs_config_md_is_current() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let o = Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .arg("config-docs")
        .output()
        .unwrap();
    assert!(o.status.success());
    let generated = String::from_utf8(o.stdout).unwrap();
    let on_disk = std::fs::read_to_string(format!("{root}/docs/config.md")).unwrap_or_default();
    assert!(
        generated == on_disk,
        "docs/config.md is stale; regenerate it with `cargo run -q -- config-docs > docs/config.md`"
    );
    for key in [
        "resolution",
        "bucket_no_upscale",
        "caption_extension",
        "prior_loss_weight",
        "keep_tokens",
    ] {
        assert!(
            generated.contains(&format!("`{key}`")),
            "{key} undocumented"
        );
    }
}
