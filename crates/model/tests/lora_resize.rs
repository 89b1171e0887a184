//! Resizing LoRA modules by SVD: exact at full rank, the best rank-k
//! approximation below it (the dropped singular values are the error), conv
//! shapes kept, and whole files in their own format.

use candle_core::{DType, Device, Tensor};
use sd_lora_model::lora::LoraModule;
use sd_lora_model::lora::format::read_lora;
use sd_lora_model::lora::resize::{RankRule, resize_file, resize_module};

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
}

fn random(shape: &[usize], seed: &mut u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| lcg(seed)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `(alpha/rank)·up·down` as a dense f64 matrix `[out, in·k·k]`.
fn delta(m: &LoraModule) -> Tensor {
    let r = m.rank();
    let out = m.up.dims()[0];
    let up =
        m.up.to_dtype(DType::F64)
            .unwrap()
            .reshape((out, r))
            .unwrap();
    let down = m
        .down
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_from(1)
        .unwrap();
    (up.matmul(&down).unwrap() * f64::from(m.scale())).unwrap()
}

fn fro(t: &Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

/// The largest singular value by power iteration on ΔWᵀΔW, independent of
/// the QR + Jacobi path.
fn sigma_max(w: &Tensor) -> f64 {
    let n = w.dims()[1];
    let mut v = Tensor::ones((n, 1), DType::F64, &Device::Cpu).unwrap();
    let wt = w.t().unwrap();
    let mut s = 0.0;
    for _ in 0..500 {
        let x = wt.matmul(&w.matmul(&v).unwrap()).unwrap();
        let norm = fro(&x);
        v = (x / norm).unwrap();
        s = norm.sqrt();
    }
    s
}

#[test]
fn full_rank_is_exact_and_lower_ranks_drop_exactly_the_tail() {
    let mut seed = 11;
    for (down_shape, up_shape) in [
        (vec![8usize, 40], vec![24usize, 8]),
        (vec![6, 5, 3, 3], vec![7, 6, 1, 1]),
    ] {
        let m = LoraModule {
            down: random(&down_shape, &mut seed),
            up: random(&up_shape, &mut seed),
            alpha: 3.0,
            dora_scale: None,
        };
        let w = delta(&m);
        let r = m.rank();
        let (full, stats) = resize_module(&m, RankRule::Fixed(r), None, DType::F32).unwrap();
        assert_eq!(full.down.dims(), &down_shape[..]);
        assert_eq!(full.up.dims(), &up_shape[..]);
        let err = fro(&(delta(&full) - &w).unwrap()) / fro(&w);
        assert!(err < 1e-6, "full rank: relative error {err}");
        assert!((stats.fro_kept - 1.0).abs() < 1e-12);
        // ‖ΔW‖² = Σσ², and σ₁ agrees with power iteration.
        let s = &stats.singular_values;
        let total: f64 = s.iter().map(|x| x * x).sum();
        assert!((total.sqrt() - fro(&w)).abs() < 1e-9 * fro(&w));
        assert!(
            (s[0] - sigma_max(&w)).abs() < 1e-8 * s[0],
            "{} vs {}",
            s[0],
            sigma_max(&w)
        );

        for k in 1..r {
            let (small, st) = resize_module(&m, RankRule::Fixed(k), None, DType::F32).unwrap();
            assert_eq!(small.rank(), k);
            // alpha/rank is kept, so strength 1 means what it meant.
            assert!((small.scale() - m.scale()).abs() < 1e-6);
            let tail: f64 = s[k..].iter().map(|x| x * x).sum::<f64>().sqrt();
            let e = fro(&(delta(&small) - &w).unwrap());
            assert!(
                (e - tail).abs() < 1e-5 * fro(&w),
                "rank {k}: error {e}, tail {tail}"
            );
            let kept = (s[..k].iter().map(|x| x * x).sum::<f64>() / total).sqrt();
            assert!((st.fro_kept - kept).abs() < 1e-12);
        }
    }
}

#[test]
fn a_rank_deficient_module_resizes_without_nan() {
    // up has two equal columns: up·down has rank r − 1.
    let mut seed = 5;
    let down = random(&[4, 10], &mut seed);
    let col = random(&[9, 1], &mut seed);
    let rest = random(&[9, 2], &mut seed);
    let up = Tensor::cat(&[&col, &col, &rest], 1).unwrap();
    let m = LoraModule {
        down,
        up,
        alpha: 4.0,
        dora_scale: None,
    };
    let (out, st) = resize_module(&m, RankRule::SvFro(0.999), None, DType::F32).unwrap();
    assert!(st.singular_values[3] < 1e-9 * st.singular_values[0]);
    assert!(out.rank() <= 3);
    let v: Vec<f32> = out.up.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    let err = fro(&(delta(&out) - delta(&m)).unwrap()) / fro(&delta(&m));
    assert!(err < 0.05, "{err}");
}

/// A dynamic rule gives modules different ranks but one alpha (the
/// input's), the scale folded into `up`: the update is unchanged and
/// diffusers, which misreads per-module alphas of kohya SD1 files, loads it.
#[test]
fn dynamic_resize_keeps_one_alpha() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lora");
    let tmp = tempfile::tempdir().unwrap();
    let input = root.join("sd1_lora_kohya.safetensors");
    let output = tmp.path().join("dyn.safetensors");
    let report = resize_file(&input, &output, RankRule::SvFro(0.9), None).unwrap();
    let before = read_lora(&input).unwrap();
    let after = read_lora(&output).unwrap();
    let ranks: std::collections::BTreeSet<usize> =
        after.weights.modules.values().map(|m| m.rank()).collect();
    assert!(ranks.len() > 1, "{ranks:?}");
    for (key, m) in &after.weights.modules {
        assert_eq!(m.alpha, 2.0, "{key:?}");
        let stats = &report.modules.iter().find(|(k, _)| k == key).unwrap().1;
        let kept = fro(&delta(m)) / fro(&delta(&before.weights.modules[key]));
        assert!((kept - stats.fro_kept).abs() < 1e-3, "{key:?}");
    }
}

#[test]
fn files_keep_their_format_names_and_precision() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lora");
    let tmp = tempfile::tempdir().unwrap();
    for (name, rule, max) in [
        ("sd1_lora_kohya.safetensors", RankRule::Fixed(2), None),
        ("sd1_lora_peft.safetensors", RankRule::SvRatio(2.0), Some(2)),
    ] {
        let input = root.join(name);
        let output = tmp.path().join(name);
        let report = resize_file(&input, &output, rule, max).unwrap();
        let before = read_lora(&input).unwrap();
        let after = read_lora(&output).unwrap();
        assert_eq!(after.format, before.format, "{name}");
        assert_eq!(after.dtype, before.dtype, "{name}");
        assert_eq!(
            after.weights.modules.keys().collect::<Vec<_>>(),
            before.weights.modules.keys().collect::<Vec<_>>()
        );
        assert_eq!(report.modules.len(), before.weights.modules.len());
        for (key, m) in &after.weights.modules {
            assert!(m.rank() <= 2, "{key:?}");
            // Each module's kept share as reported, checked on the file.
            let old = &before.weights.modules[key];
            let (w0, w1) = (delta(old), delta(m));
            let stats = &report.modules.iter().find(|(k, _)| k == key).unwrap().1;
            let kept = fro(&w1) / fro(&w0);
            assert!(
                (kept - stats.fro_kept).abs() < 1e-3,
                "{key:?}: {kept} vs {}",
                stats.fro_kept
            );
        }
        if name.contains("kohya") {
            assert_eq!(
                after.metadata.get("ss_network_dim").map(String::as_str),
                Some("2")
            );
            assert!(
                after.metadata["ss_training_comment"].contains("from rank 4 with rank 2"),
                "{:?}",
                after.metadata.get("ss_training_comment")
            );
        }
    }
}
