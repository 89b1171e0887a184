//! Reading diffusers' `unet/config.json`: defaults, the `attention_head_dim`
//! naming quirk, per-level values, and errors that name the setting.

use std::path::PathBuf;

use sd_lora_model::unet::{BlockKind, UNetConfig};

#[test]
fn empty_config_is_diffusers_default() {
    let cfg = UNetConfig::from_json_str("{}").unwrap();
    assert_eq!(cfg, UNetConfig::default());
    assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(cfg.layers_per_block, vec![2; 4]);
    assert_eq!(cfg.num_attention_heads, vec![8; 4]);
    assert_eq!(cfg.cross_attention_dim, vec![1280; 4]);
    assert_eq!(cfg.time_embed_dim, 1280);
    assert_eq!(cfg.down_block_types[3], BlockKind::Plain);
    assert_eq!(cfg.up_block_types[0], BlockKind::Plain);
    assert!(cfg.flip_sin_to_cos);
    assert_eq!(cfg.norm_num_groups, 32);
}

#[test]
fn attention_head_dim_holds_head_counts() {
    // SD2: attention_head_dim [5, 10, 20, 20] are head counts (64 wide each).
    let cfg = UNetConfig::from_json_str(
        r#"{"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": true, "num_attention_heads": null, "some_new_field": 3}"#,
    )
    .unwrap();
    assert_eq!(cfg.num_attention_heads, vec![5, 10, 20, 20]);
    assert!(cfg.use_linear_projection);
    // num_attention_heads takes precedence when given.
    let cfg: UNetConfig =
        serde_json::from_str(r#"{"attention_head_dim": 8, "num_attention_heads": [4, 8, 16, 16]}"#)
            .unwrap();
    assert_eq!(cfg.num_attention_heads, vec![4, 8, 16, 16]);
}

#[test]
fn sdxl_settings() {
    let cfg = UNetConfig::from_json_str(
        r#"{"block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
            "cross_attention_dim": 2048, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}"#,
    )
    .unwrap();
    assert_eq!(cfg.transformer_layers_per_block, vec![1, 2, 10]);
    let add = cfg.addition_embed.unwrap();
    assert_eq!(add.addition_time_embed_dim, 256);
    assert_eq!(add.projection_class_embeddings_input_dim, 2816);
}

#[test]
fn fixture_configs_read() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let sd1 = UNetConfig::from_file(root.join("sd1_tiny/unet/config.json")).unwrap();
    assert_eq!(sd1.num_attention_heads, vec![2; 4]);
    assert!(!sd1.use_linear_projection);
    let sd2 = UNetConfig::from_file(root.join("sd2_tiny/unet/config.json")).unwrap();
    assert_eq!(sd2.num_attention_heads, vec![2, 4, 4, 4]);
    assert!(sd2.use_linear_projection && sd2.upcast_attention);
}

#[test]
fn unsupported_settings_are_named() {
    for (json, needle) in [
        (
            r#"{"resnet_time_scale_shift": "scale_shift"}"#,
            "resnet_time_scale_shift",
        ),
        (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
        (r#"{"addition_embed_type": "text"}"#, "addition_embed_type"),
        (
            r#"{"addition_embed_type": "text_time"}"#,
            "addition_time_embed_dim",
        ),
        (
            r#"{"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
            "SimpleCrossAttnDownBlock2D",
        ),
        (r#"{"attention_head_dim": [8, 8]}"#, "attention_head_dim"),
        (
            r#"{"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 7}"#,
            "heads",
        ),
        (r#"{"norm_num_groups": 24}"#, "norm_num_groups"),
        (
            r#"{"only_cross_attention": [false, true, false, false]}"#,
            "only_cross_attention",
        ),
    ] {
        let err = UNetConfig::from_json_str(json).unwrap_err().to_string();
        assert!(err.contains(needle), "{json}: {err}");
    }
    let err = UNetConfig::from_json_str("{not json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not valid JSON"), "{err}");
    let err = UNetConfig::from_file("/nonexistent/unet/config.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/unet/config.json"), "{err}");
}
