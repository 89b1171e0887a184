//! The CLIP text encoder: a tiny random model built in code (forward against a
//! naive reference written here from plain tensor ops, gradients against
//! finite differences in f64, clip skip, pooling, half-precision storage), and
//! parity with transformers on the fixtures of `tools/make_fixtures.py` when they
//! exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[path = "support/device.rs"]
mod device;
use device::test_device;

use candle_core::{D, DType, Tensor, Var};
use sd_lora_model::clip::text_encoder::{causal_mask, eos_positions, with_text_model_prefix};
use sd_lora_model::clip::{ClipTextConfig, ClipTextTransformer, HiddenAct};

/// xorshift64* (candle's CPU `randn` cannot be seeded).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Normals times `scale`, plus `shift`, in f64.
    fn tensor(&mut self, shape: &[usize], scale: f64, shift: f64) -> Tensor {
        let n = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| self.normal() * scale + shift).collect();
        Tensor::from_vec(data, shape, &test_device()).unwrap()
    }
}

fn tiny_config(act: HiddenAct) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 50,
        hidden_size: 8,
        intermediate_size: 16,
        num_hidden_layers: 3,
        num_attention_heads: 2,
        max_position_embeddings: 7,
        hidden_act: act,
        layer_norm_eps: 1e-5,
        projection_dim: 6,
        pad_token_id: 0,
        bos_token_id: 48,
        eos_token_id: 49,
    }
}

/// Random f64 weights under transformers' names (with `text_model.`).
fn random_weights(cfg: &ClipTextConfig, seed: u64, projection: bool) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    let (d, m) = (cfg.hidden_size, cfg.intermediate_size);
    let mut w = HashMap::new();
    let mut put = |name: String, t: Tensor| {
        w.insert(name, t);
    };
    let p = "text_model.";
    put(
        format!("{p}embeddings.token_embedding.weight"),
        rng.tensor(&[cfg.vocab_size, d], 1.0, 0.0),
    );
    put(
        format!("{p}embeddings.position_embedding.weight"),
        rng.tensor(&[cfg.max_position_embeddings, d], 0.5, 0.0),
    );
    let linear =
        |rng: &mut Rng, put: &mut dyn FnMut(String, Tensor), name: String, i: usize, o: usize| {
            put(
                format!("{name}.weight"),
                rng.tensor(&[o, i], 1.0 / (i as f64).sqrt(), 0.0),
            );
            put(format!("{name}.bias"), rng.tensor(&[o], 0.1, 0.0));
        };
    let norm = |rng: &mut Rng, put: &mut dyn FnMut(String, Tensor), name: String| {
        put(format!("{name}.weight"), rng.tensor(&[d], 0.2, 1.0));
        put(format!("{name}.bias"), rng.tensor(&[d], 0.1, 0.0));
    };
    for l in 0..cfg.num_hidden_layers {
        let layer = format!("{p}encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            linear(
                &mut rng,
                &mut put,
                format!("{layer}.self_attn.{proj}"),
                d,
                d,
            );
        }
        linear(&mut rng, &mut put, format!("{layer}.mlp.fc1"), d, m);
        linear(&mut rng, &mut put, format!("{layer}.mlp.fc2"), m, d);
        norm(&mut rng, &mut put, format!("{layer}.layer_norm1"));
        norm(&mut rng, &mut put, format!("{layer}.layer_norm2"));
    }
    norm(&mut rng, &mut put, format!("{p}final_layer_norm"));
    if projection {
        put(
            "text_projection.weight".into(),
            rng.tensor(&[cfg.projection_dim, d], 0.3, 0.0),
        );
    }
    w
}

fn ids_tensor(ids: &[Vec<u32>]) -> Tensor {
    Tensor::new(ids.to_vec(), &test_device()).unwrap()
}

/// Two prompts of 7 tokens with their end token (49) at different positions and
/// different padding after it.
fn tiny_ids() -> Vec<Vec<u32>> {
    vec![
        vec![48, 5, 17, 49, 49, 49, 49],
        vec![48, 30, 2, 11, 40, 49, 0],
    ]
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.to_scalar::<f64>().unwrap().max(1e-12)
}

/// The text encoder written out from plain tensor ops, straight from the
/// transformers code, as an independent check of the model's wiring. Returns
/// the hidden states (embedding output and each layer) and the final-LN output.
fn reference_forward(
    w: &HashMap<String, Tensor>,
    cfg: &ClipTextConfig,
    ids: &[Vec<u32>],
) -> (Vec<Tensor>, Tensor) {
    let get = |k: &str| w[&format!("text_model.{k}")].clone();
    let lin = |x: &Tensor, name: &str| {
        x.broadcast_matmul(&get(&format!("{name}.weight")).t().unwrap())
            .unwrap()
            .broadcast_add(&get(&format!("{name}.bias")))
            .unwrap()
    };
    let ln = |x: &Tensor, name: &str| {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        xc.broadcast_div(&(var + cfg.layer_norm_eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&get(&format!("{name}.weight")))
            .unwrap()
            .broadcast_add(&get(&format!("{name}.bias")))
            .unwrap()
    };
    let (b, t) = (ids.len(), ids[0].len());
    let (d, h) = (cfg.hidden_size, cfg.num_attention_heads);
    let hd = d / h;
    let flat: Vec<u32> = ids.concat();
    let tok = get("embeddings.token_embedding.weight")
        .index_select(&Tensor::new(flat, &test_device()).unwrap(), 0)
        .unwrap()
        .reshape((b, t, d))
        .unwrap();
    let pos = get("embeddings.position_embedding.weight")
        .narrow(0, 0, t)
        .unwrap();
    let mut x = tok.broadcast_add(&pos).unwrap();
    let mut mask = vec![0f64; t * t];
    for i in 0..t {
        for j in i + 1..t {
            mask[i * t + j] = f64::MIN;
        }
    }
    let mask = Tensor::from_vec(mask, (t, t), &test_device()).unwrap();
    let mut hidden = vec![x.clone()];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layers.{l}");
        let y = ln(&x, &format!("{p}.layer_norm1"));
        let split = |z: Tensor| z.reshape((b, t, h, hd)).unwrap().transpose(1, 2).unwrap();
        let q =
            (split(lin(&y, &format!("{p}.self_attn.q_proj"))) * (hd as f64).powf(-0.5)).unwrap();
        let k = split(lin(&y, &format!("{p}.self_attn.k_proj")));
        let v = split(lin(&y, &format!("{p}.self_attn.v_proj")));
        let s = q
            .contiguous()
            .unwrap()
            .matmul(&k.t().unwrap().contiguous().unwrap())
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let a = candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, d))
            .unwrap();
        x = (x + lin(&a, &format!("{p}.self_attn.out_proj"))).unwrap();
        let y = lin(
            &ln(&x, &format!("{p}.layer_norm2")),
            &format!("{p}.mlp.fc1"),
        );
        let y = match cfg.hidden_act {
            HiddenAct::QuickGelu => {
                (&y * candle_nn::ops::sigmoid(&(&y * 1.702).unwrap()).unwrap()).unwrap()
            }
            HiddenAct::Gelu => y.gelu_erf().unwrap(),
        };
        x = (x + lin(&y, &format!("{p}.mlp.fc2"))).unwrap();
        hidden.push(x.clone());
    }
    let last = ln(&x, "final_layer_norm");
    (hidden, last)
}

#[test]
fn forward_matches_naive_reference() {
    for (seed, act) in [(1, HiddenAct::QuickGelu), (2, HiddenAct::Gelu)] {
        let cfg = tiny_config(act);
        let w = random_weights(&cfg, seed, true);
        let model =
            ClipTextTransformer::from_tensors(w.clone(), &cfg, DType::F64, &test_device()).unwrap();
        let ids = tiny_ids();
        let out = model.forward(&ids_tensor(&ids)).unwrap();
        let (hidden, last) = reference_forward(&w, &cfg, &ids);
        assert_eq!(out.hidden_states.len(), cfg.num_hidden_layers + 1);
        for (i, (ours, theirs)) in out.hidden_states.iter().zip(&hidden).enumerate() {
            let e = max_rel_diff(ours, theirs);
            assert!(e < 1e-12, "{act:?} hidden state {i}: {e:e}");
        }
        let e = max_rel_diff(&out.last_hidden_state, &last);
        assert!(e < 1e-12, "{act:?} last hidden state: {e:e}");
        // Pooled: the first end token (positions 3 and 5).
        assert_eq!(eos_positions(&ids_tensor(&ids), 49).unwrap(), [3, 5]);
        let want = Tensor::stack(
            &[
                last.get(0).unwrap().get(3).unwrap(),
                last.get(1).unwrap().get(5).unwrap(),
            ],
            0,
        )
        .unwrap();
        assert!(max_rel_diff(&out.pooled, &want) < 1e-12);
        let proj = &w["text_projection.weight"];
        let want = want.matmul(&proj.t().unwrap()).unwrap();
        let embeds = out.text_embeds.as_ref().expect("text_projection was given");
        assert!(max_rel_diff(embeds, &want) < 1e-12);
        assert_eq!(embeds.dims(), [2, cfg.projection_dim]);
    }
}

#[test]
fn keys_with_and_without_text_model_prefix() {
    let cfg = tiny_config(HiddenAct::QuickGelu);
    let w = random_weights(&cfg, 3, false);
    let stripped: HashMap<String, Tensor> = w
        .iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("text_model.").unwrap().to_string(),
                v.clone(),
            )
        })
        .collect();
    assert_eq!(with_text_model_prefix(stripped.clone()).len(), w.len());
    let ids = ids_tensor(&tiny_ids());
    let a = ClipTextTransformer::from_tensors(w, &cfg, DType::F64, &test_device()).unwrap();
    let b = ClipTextTransformer::from_tensors(stripped, &cfg, DType::F64, &test_device()).unwrap();
    assert!(a.text_projection.is_none());
    let (ya, yb) = (a.forward(&ids).unwrap(), b.forward(&ids).unwrap());
    assert_eq!(
        max_rel_diff(&ya.last_hidden_state, &yb.last_hidden_state),
        0.0
    );
    assert!(ya.text_embeds.is_none());

    // A missing key is named in the error.
    let mut w = random_weights(&cfg, 3, false);
    w.remove("text_model.encoder.layers.1.mlp.fc2.bias");
    let err = ClipTextTransformer::from_tensors(w, &cfg, DType::F32, &test_device())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text_model.encoder.layers.1.mlp.fc2.bias"),
        "{err}"
    );
}

#[test]
fn pooling_rule_and_causal_mask() {
    // eos_token_id 2 (SD1/SD2 configs): the position of the largest id, first on ties.
    let ids = ids_tensor(&[vec![49406, 320, 49407, 49407], vec![49406, 49407, 0, 0]]);
    assert_eq!(eos_positions(&ids, 2).unwrap(), [2, 1]);
    assert_eq!(eos_positions(&ids, 49407).unwrap(), [2, 1]);
    // No end token at all: position 0, as transformers.
    let ids = ids_tensor(&[vec![5, 6, 7]]);
    assert_eq!(eos_positions(&ids, 49).unwrap(), [0]);
    let mask = causal_mask(3, DType::F32, &test_device())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(mask[0], [0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
    assert_eq!(mask[2], [0.0, 0.0, 0.0]);

    // Changing a later token changes nothing before it.
    let cfg = tiny_config(HiddenAct::Gelu);
    let model = ClipTextTransformer::from_tensors(
        random_weights(&cfg, 4, false),
        &cfg,
        DType::F64,
        &test_device(),
    )
    .unwrap();
    let a = model
        .forward(&ids_tensor(&[vec![48, 5, 17, 9, 49]]))
        .unwrap()
        .last_hidden_state;
    let b = model
        .forward(&ids_tensor(&[vec![48, 5, 17, 33, 49]]))
        .unwrap()
        .last_hidden_state;
    assert_eq!(
        max_rel_diff(&a.narrow(1, 0, 3).unwrap(), &b.narrow(1, 0, 3).unwrap()),
        0.0
    );
    assert!(max_rel_diff(&a.narrow(1, 3, 1).unwrap(), &b.narrow(1, 3, 1).unwrap()) > 1e-3);
    // Too many tokens for the position table.
    let err = model
        .forward(&ids_tensor(&[vec![1; 8]]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("8 tokens") && err.contains("7 positions"),
        "{err}"
    );
}

#[test]
fn clip_skip() {
    let cfg = tiny_config(HiddenAct::QuickGelu);
    let model = ClipTextTransformer::from_tensors(
        random_weights(&cfg, 5, false),
        &cfg,
        DType::F64,
        &test_device(),
    )
    .unwrap();
    let ids = ids_tensor(&tiny_ids());
    let out = model.forward(&ids).unwrap();
    let n = cfg.num_hidden_layers;
    assert_eq!(
        max_rel_diff(
            &model.forward_with_clip_skip(&ids, 1).unwrap(),
            &out.last_hidden_state
        ),
        0.0
    );
    for skip in 2..=n + 1 {
        let want = model
            .final_layer_norm
            .forward(&out.hidden_states[n + 1 - skip])
            .unwrap();
        let got = model.forward_with_clip_skip(&ids, skip).unwrap();
        assert_eq!(max_rel_diff(&got, &want), 0.0, "clip skip {skip}");
    }
    for bad in [0, n + 2] {
        let err = model
            .forward_with_clip_skip(&ids, bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("out of range"), "{err}");
    }
}

/// `Σ f(h)·u` for a fixed random `u` over every output the trainer may use.
fn loss_of(model: &ClipTextTransformer, h: &Tensor, ids: &Tensor, u: &[Tensor; 3]) -> Tensor {
    let out = model.forward_from_embeddings(h, ids).unwrap();
    let terms = [
        (out.last_hidden_state * &u[0]).unwrap().sum_all().unwrap(),
        (out.pooled * &u[1]).unwrap().sum_all().unwrap(),
        (&out.hidden_states[1] * &u[2]).unwrap().sum_all().unwrap(),
    ];
    ((&terms[0] + &terms[1]).unwrap() + &terms[2]).unwrap()
}

/// The gradient with respect to the embedding output (which flows back through
/// every layer's attention, MLP and LayerNorms) matches central finite
/// differences in f64, for both activations.
#[test]
fn gradient_matches_finite_differences() {
    for (seed, act) in [(6, HiddenAct::QuickGelu), (7, HiddenAct::Gelu)] {
        let cfg = tiny_config(act);
        let model = ClipTextTransformer::from_tensors(
            random_weights(&cfg, seed, false),
            &cfg,
            DType::F64,
            &test_device(),
        )
        .unwrap();
        let ids = ids_tensor(&tiny_ids());
        let h0 = model.embed(&ids).unwrap();
        let mut rng = Rng::new(seed + 100);
        let shape = h0.dims().to_vec();
        let u = [
            rng.tensor(&shape, 1.0, 0.0),
            rng.tensor(&[shape[0], shape[2]], 1.0, 0.0),
            rng.tensor(&shape, 1.0, 0.0),
        ];
        let var = Var::from_tensor(&h0).unwrap();
        let grads = loss_of(&model, var.as_tensor(), &ids, &u)
            .backward()
            .unwrap();
        let analytic = grads
            .get(var.as_tensor())
            .expect("gradient reaches the embeddings");
        let analytic = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = h0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        const EPS: f64 = 1e-5;
        let (mut max_diff, mut max_num) = (0f64, 0f64);
        for j in 0..base.len() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let h = Tensor::from_vec(v, shape.as_slice(), &test_device()).unwrap();
                loss_of(&model, &h, &ids, &u).to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(EPS) - eval(-EPS)) / (2.0 * EPS);
            max_diff = max_diff.max((analytic[j] - numeric).abs());
            max_num = max_num.max(numeric.abs());
        }
        let rel = max_diff / max_num;
        println!("{act:?}: gradient relative error {rel:e} (max |grad| {max_num:.3})");
        assert!(rel < 1e-7, "{act:?}: gradient error {rel:e}");
        // Every position before the last end token influences the loss.
        assert!(analytic.iter().filter(|g| g.abs() > 0.0).count() > base.len() / 2);
    }
}

/// f32, f16 and bf16 storage run forward and backward and agree with f64.
#[test]
fn half_precision_storage() {
    let cfg = tiny_config(HiddenAct::QuickGelu);
    let w = random_weights(&cfg, 8, true);
    let ids = ids_tensor(&tiny_ids());
    let exact = ClipTextTransformer::from_tensors(w.clone(), &cfg, DType::F64, &test_device())
        .unwrap()
        .forward(&ids)
        .unwrap();
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 1e-2), (DType::BF16, 5e-2)] {
        let model =
            ClipTextTransformer::from_tensors(w.clone(), &cfg, dtype, &test_device()).unwrap();
        assert_eq!(model.dtype(), dtype);
        let h0 = Var::from_tensor(&model.embed(&ids).unwrap()).unwrap();
        let out = model.forward_from_embeddings(h0.as_tensor(), &ids).unwrap();
        assert_eq!(out.last_hidden_state.dtype(), dtype);
        let e = max_rel_diff(&out.last_hidden_state, &exact.last_hidden_state);
        let ep = max_rel_diff(&out.pooled, &exact.pooled);
        println!("{dtype:?}: last_hidden_state error {e:e}, pooled error {ep:e}");
        assert!(e < tol && ep < tol, "{dtype:?}: {e:e} {ep:e}");
        let loss = out
            .last_hidden_state
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(h0.as_tensor())
            .expect("gradient reaches the embeddings");
        assert_eq!(g.dtype(), dtype);
        let g = g
            .to_dtype(DType::F32)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(g.to_scalar::<f32>().unwrap() > 0.0);
    }
}

#[test]
fn config_from_transformers_json() {
    // SD1.5's text_encoder/config.json.
    let sd15 = r#"{
      "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
      "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
      "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
      "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
      "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
      "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
      "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408
    }"#;
    assert_eq!(
        ClipTextConfig::from_json_str(sd15).unwrap(),
        ClipTextConfig::sd1()
    );
    // SD2.1's.
    let sd21 = r#"{
      "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
      "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024,
      "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
      "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
      "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
      "projection_dim": 512, "torch_dtype": "float32", "vocab_size": 49408
    }"#;
    assert_eq!(
        ClipTextConfig::from_json_str(sd21).unwrap(),
        ClipTextConfig::sd2()
    );
    // A full CLIPConfig and null ids.
    let full =
        r#"{"text_config": {"hidden_size": 64, "num_attention_heads": 4, "pad_token_id": null}}"#;
    let cfg = ClipTextConfig::from_json_str(full).unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.pad_token_id, cfg.eos_token_id),
        (64, 0, 49407)
    );
    assert!(ClipTextConfig::from_json_str(r#"{"hidden_act": "relu"}"#).is_err());
    let bad = ClipTextConfig {
        hidden_size: 10,
        num_attention_heads: 3,
        ..ClipTextConfig::default()
    };
    let err = ClipTextConfig::from_file("/nonexistent/text_encoder/config.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/nonexistent/text_encoder/config.json"),
        "{err}"
    );
    let err = ClipTextTransformer::from_safetensors(
        "/nonexistent/model.safetensors",
        &ClipTextConfig::sd1(),
        DType::F32,
        &test_device(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nonexistent/model.safetensors"), "{err}");
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("num_attention_heads 3")
    );
}

// ---------------------------------------------------------------------------
// Parity with transformers (tests/fixtures, from tools/make_fixtures.py)
// ---------------------------------------------------------------------------

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Runs the fixture's text encoder on the reference input ids and compares
/// every output with transformers' (`CLIPTextModel(..., output_hidden_states=True)`).
fn check_parity(name: &str) {
    let folder = fixtures().join(name).join("text_encoder");
    let reference = fixtures()
        .join("reference")
        .join(format!("{name}.safetensors"));
    assert!(
        folder.join("config.json").exists() && reference.exists(),
        "missing fixture {} or {}: regenerate with tools/make_fixtures.py",
        folder.display(),
        reference.display()
    );
    let cfg = ClipTextConfig::from_file(folder.join("config.json")).unwrap();
    let model = ClipTextTransformer::from_safetensors(
        folder.join("model.safetensors"),
        &cfg,
        DType::F32,
        &test_device(),
    )
    .unwrap();
    let r = candle_core::safetensors::load(&reference, &test_device()).unwrap();
    let ids = &r["text_encoder.input_ids"];
    let out = model.forward(ids).unwrap();
    let compare = |what: &str, ours: &Tensor, key: &str| {
        let theirs = &r[key];
        assert_eq!(ours.dims(), theirs.dims(), "{name} {what}");
        let e = max_rel_diff(ours, theirs);
        println!("{name} {what}: max relative error {e:.2e}");
        assert!(e < 1e-4, "{name} {what}: relative error {e:e}");
    };
    compare(
        "last_hidden_state",
        &out.last_hidden_state,
        "text_encoder.last_hidden_state",
    );
    compare("pooled", &out.pooled, "text_encoder.pooler_output");
    assert_eq!(out.hidden_states.len(), cfg.num_hidden_layers + 1);
    for (i, h) in out.hidden_states.iter().enumerate() {
        compare(
            &format!("hidden_states.{i}"),
            h,
            &format!("text_encoder.hidden_states.{i}"),
        );
    }
    if let Some(pos) = r.get("text_encoder.eos_positions") {
        let want: Vec<usize> = pos
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&p| p as usize)
            .collect();
        assert_eq!(eos_positions(ids, cfg.eos_token_id).unwrap(), want);
    }
}

#[test]
fn parity_sd1_tiny() {
    check_parity("sd1_tiny");
}

#[test]
fn parity_sd2_tiny() {
    check_parity("sd2_tiny");
}
