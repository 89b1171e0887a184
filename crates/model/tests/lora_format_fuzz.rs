//! Property test of the LoRA reader: thousands of seeded mutations of valid kohya and PEFT
//! files (byte flips, truncations, header-length edits, plausible JSON header edits) must each
//! give `Ok` or a clear `Err` — never a panic, which would fail this test.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sd_lora_model::lora::format::{Metadata, SaveDtype, read_lora, write_kohya, write_peft};
use sd_lora_model::lora::{LoraComponent, LoraModule, LoraWeights};

/// xorshift64: deterministic, seeded, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// A scratch folder, in memory where the system has one: thousands of small writes to a disk
/// (overlay) file system cost milliseconds each, to tmpfs microseconds.
fn scratch() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("sd-lora-format-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn small_lora(rng: &mut Rng) -> LoraWeights {
    let mut w = LoraWeights::default();
    let attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
    for proj in ["to_q", "to_k"] {
        w.modules.insert(
            (LoraComponent::Unet, format!("{attn}.{proj}")),
            LoraModule {
                down: rng.tensor(&[2, 8]),
                up: rng.tensor(&[8, 2]),
                alpha: 1.0,
                dora_scale: None,
            },
        );
    }
    w.modules.insert(
        (LoraComponent::Unet, "down_blocks.0.resnets.0.conv1".into()),
        LoraModule {
            down: rng.tensor(&[2, 4, 3, 3]),
            up: rng.tensor(&[4, 2, 1, 1]),
            alpha: 2.0,
            dora_scale: None,
        },
    );
    w.modules.insert(
        (
            LoraComponent::TextEncoder,
            "text_model.encoder.layers.0.mlp.fc1".into(),
        ),
        LoraModule {
            down: rng.tensor(&[2, 8]),
            up: rng.tensor(&[16, 2]),
            alpha: 2.0,
            dora_scale: None,
        },
    );
    w
}

fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// A plausible edit of the JSON header: a changed dtype, shape, offset, a removed field, a
/// non-string metadata value, a renamed key…
fn edit_header(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let n = header_len(bytes);
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let obj = h.as_object_mut().unwrap();
    // Only entries that are objects are edited (indexing a non-object would panic here, in
    // the test, not in the reader).
    let keys: Vec<String> = obj
        .iter()
        .filter(|(_, v)| v.is_object())
        .map(|(k, _)| k.clone())
        .collect();
    if keys.is_empty() {
        return bytes.to_vec();
    }
    let key = keys[rng.below(keys.len())].clone();
    let big = || serde_json::json!(u64::MAX);
    match rng.below(12) {
        0 => {
            let dtypes = [
                "F16", "BF16", "F32", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X",
            ];
            obj[&key]["dtype"] = serde_json::json!(dtypes[rng.below(dtypes.len())]);
        }
        1 => {
            let dims = rng.below(5);
            let shape: Vec<u64> = (0..dims).map(|_| rng.below(20) as u64).collect();
            obj[&key]["shape"] = serde_json::json!(shape);
        }
        2 => {
            let a = rng.below(2000) as u64;
            let b = a + rng.below(200) as u64;
            obj[&key]["data_offsets"] = serde_json::json!([a, b]);
        }
        3 => {
            obj[&key]["data_offsets"] = serde_json::json!([big(), big()]);
        }
        4 => {
            let fields = ["dtype", "shape", "data_offsets"];
            if let Some(o) = obj[&key].as_object_mut() {
                o.remove(fields[rng.below(3)]);
            }
        }
        5 => {
            obj.insert(
                "__metadata__".into(),
                serde_json::json!({"ss_network_dim": rng.below(100)}),
            );
        }
        6 => {
            let v = obj.remove(&key).unwrap();
            let renamed = format!("{}{}", key, ["", "x", ".weight", "_lora"][rng.below(4)]);
            obj.insert(renamed.replace("lora_unet", "lora_te"), v);
        }
        7 => {
            obj.remove(&key);
        }
        8 => {
            obj[&key] = serde_json::json!([1, "two", null]);
        }
        9 => {
            obj[&key]["shape"] = serde_json::json!([big(), 2]);
        }
        10 => {
            // Swap the offsets of two tensors.
            let other = keys[rng.below(keys.len())].clone();
            let a = obj[&key]["data_offsets"].clone();
            let b = obj[&other]["data_offsets"].clone();
            obj[&key]["data_offsets"] = b;
            obj[&other]["data_offsets"] = a;
        }
        _ => {
            obj[&key]["shape"] = serde_json::json!([]);
        }
    }
    let json = serde_json::to_vec(&h).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(&bytes[8 + n..]);
    out
}

fn mutate(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match rng.below(5) {
        0 => {
            // Random byte flips anywhere.
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            // Flips inside the header only (JSON mostly breaks, sometimes stays valid).
            let n = header_len(&b);
            for _ in 0..1 + rng.below(3) {
                let i = 8 + rng.below(n);
                b[i] = b" {}[]:,\"0123456789eE-."[rng.below(22)];
            }
        }
        2 => b.truncate(rng.below(b.len())),
        3 => {
            // A different header length.
            let n = header_len(&b) as i64 + rng.below(64) as i64 - 32;
            b[..8].copy_from_slice(&(n.max(0) as u64).to_le_bytes());
        }
        _ => b = edit_header(&b, rng),
    }
    b
}

fn check(path: &Path, bytes: &[u8]) -> bool {
    std::fs::write(path, bytes).unwrap();
    // A panic inside read_lora fails the test; the result itself may be either.
    read_lora(path).is_ok()
}

#[test]
fn mutated_lora_files_never_panic() {
    let dir = scratch();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let lora = small_lora(&mut rng);
    let mut bases = Vec::new();
    for (i, dtype) in [SaveDtype::F16, SaveDtype::F32].into_iter().enumerate() {
        let k = dir.join(format!("k{i}.safetensors"));
        let p = dir.join(format!("p{i}.safetensors"));
        write_kohya(&k, &lora, &Metadata::default(), dtype).unwrap();
        write_peft(&p, &lora, &Metadata::default(), dtype).unwrap();
        for f in [k, p] {
            let bytes = std::fs::read(&f).unwrap();
            assert!(read_lora(&f).is_ok(), "base file must be valid");
            bases.push(bytes);
        }
    }
    let target = dir.join("mutant.safetensors");
    let (mut ok, mut err) = (0, 0);
    let cases = 5000;
    for case in 0..cases {
        let base = &bases[case % bases.len()];
        let mut bytes = mutate(base, &mut rng);
        // Sometimes stack a second mutation.
        let header_ok = bytes.len() >= 8
            && header_len(&bytes)
                .checked_add(8)
                .is_some_and(|end| end <= bytes.len())
            && serde_json::from_slice::<serde_json::Value>(&bytes[8..8 + header_len(&bytes)])
                .is_ok_and(|v| v.is_object());
        if header_ok && rng.below(4) == 0 {
            bytes = mutate(&bytes, &mut rng);
        }
        if check(&target, &bytes) {
            ok += 1;
        } else {
            err += 1;
        }
    }
    eprintln!("{cases} mutants: {ok} read, {err} refused");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err > cases / 2, "most mutants should be refused ({err})");
    assert!(ok > 0, "some mutants (flips in tensor data) stay valid");
}
