//! # sd-lora
//!
//! The `sd-lora` command: train Stable Diffusion LoRA adapters that load in
//! AUTOMATIC1111/Forge, ComfyUI and diffusers. A thin front end: each
//! sub-command parses its arguments and calls `sd-lora-data` /
//! `sd-lora-train`.

mod bench_cmd;
mod check_data;
mod config_docs;
mod config_file;
mod convert;
mod extract;
mod generate_cmd;
mod inspect;
mod lora_fit;
mod merge;
mod output_guard;
mod resize;
mod train_cmd;
mod ui_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Train Stable Diffusion LoRA adapters that load everywhere.
#[derive(Debug, Parser)]
#[command(name = "sd-lora", version, about, long_about = None, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a LoRA: from a config file (see docs/config.md), quick flags, or both.
    #[command(
        after_help = "Examples:\n  sd-lora train --config configs/quickstart.toml\n  sd-lora train --config configs/quickstart-sdxl.toml\n  sd-lora train --model v1-5-pruned-emaonly.safetensors --data ./photos --instance-prompt \"a photo of ohwx dog\" --output ./out --name my_dog\n  sd-lora train --config my_dog.toml --dry-run\n  sd-lora train --config my_dog.toml --resume ./out\n\nQuick flags and --set override the config file; see docs/training.md."
    )]
    // Boxed: the train flags make this variant much larger than the others.
    Train(Box<train_cmd::TrainArgs>),
    /// Show what would be trained on (subsets, captions, buckets) and every
    /// problem with the images and captions.
    #[command(
        after_help = "Examples:\n  sd-lora check-data ./photos\n  sd-lora check-data ./train --class-data ./reg --class-prompt \"a photo of a dog\"\n  sd-lora check-data --config my_dog.toml --json\n\nExit status: 0 when there is at least one usable image, 1 when there is none (or, with --strict, on any problem)."
    )]
    CheckData(check_data::CheckDataArgs),
    /// Describe a model (architecture, prediction type, dtype, exact parameter
    /// counts) or a LoRA file (format, base model, modules, ranks, alphas,
    /// training metadata).
    #[command(
        after_help = "Examples:\n  sd-lora inspect ./stable-diffusion-v1-5          # a diffusers folder\n  sd-lora inspect v1-5-pruned-emaonly.safetensors   # a single-file checkpoint\n  sd-lora inspect sd21-768.safetensors --prediction v --json\n  sd-lora inspect my_dog.safetensors --model v1-5-pruned-emaonly.safetensors   # a LoRA, checked against its model"
    )]
    Inspect(inspect::InspectArgs),
    /// Convert a LoRA file between kohya and PEFT/diffusers formats (lossless).
    #[command(
        after_help = "Examples:\n  sd-lora convert my_dog.safetensors my_dog_peft.safetensors --to peft\n  sd-lora convert pytorch_lora_weights.safetensors my_lora.safetensors --to kohya"
    )]
    Convert(convert::ConvertArgs),
    /// Change a LoRA's rank by SVD, to a fixed rank or per module by kohya's
    /// dynamic rules (sv_ratio, sv_fro, sv_cumulative).
    #[command(
        after_help = "Examples:\n  sd-lora resize my_dog.safetensors my_dog_r8.safetensors --rank 8\n  sd-lora resize style.safetensors style_small.safetensors --dynamic sv_fro --param 0.9 --rank 64 --verbose"
    )]
    Resize(resize::ResizeArgs),
    /// Merge LoRAs into a checkpoint (written in its own layout and dtype), or
    /// several LoRAs into one.
    #[command(
        after_help = "Examples:\n  sd-lora merge --model v1-5-pruned-emaonly.safetensors --lora my_dog.safetensors:0.8 --output v15_my_dog.safetensors\n  sd-lora merge --model ./sd15-folder --lora style.safetensors --lora detail.safetensors:0.5 --output ./sd15-merged\n  sd-lora merge --lora dog.safetensors:1 --lora style.safetensors:0.6 --output dog_style.safetensors\n  sd-lora merge --lora dog.safetensors --lora style.safetensors --rank 32 --output dog_style_r32.safetensors"
    )]
    Merge(merge::MergeArgs),
    /// Extract a LoRA from the difference of two checkpoints (a fine-tune and
    /// its base), by SVD.
    #[command(
        after_help = "Examples:\n  sd-lora extract --base v1-5-pruned-emaonly.safetensors --tuned my_finetune.safetensors --rank 32 --output my_finetune_lora.safetensors\n  sd-lora extract --base sd_xl_base_1.0.safetensors --tuned juggernaut.safetensors --rank 64 --conv-rank 16 --output jugg_locon.safetensors --verbose"
    )]
    Extract(extract::ExtractArgs),
    /// Generate images from a prompt with a model and any number of LoRAs
    /// (PNGs with A1111 `parameters` metadata).
    #[command(
        after_help = "Examples:\n  sd-lora generate --model v1-5-pruned-emaonly.safetensors --prompt \"a photo of ohwx dog\" --lora my_dog.safetensors:0.8 --output ./images\n  sd-lora generate --model builtin:tiny --prompt \"ohwx robot\" --width 64 --height 64 --steps 4 --seed 1 --num-images 4 --output ./images\n  sd-lora generate --model sd_xl_base_1.0.safetensors --prompt \"ohwx dog on a beach\" --lora my_dog_xl.safetensors:0.8 --output ./images   # 1024x1024"
    )]
    // Boxed: the generate flags make this variant much larger than the others.
    Generate(Box<generate_cmd::GenerateArgs>),
    /// Time what users run: `--train` the `train` command itself on a model and
    /// an image folder (load, caching, steady step, peak memory), `--vae` one
    /// VAE encode and decode; without either, the LoRA step of a full-size SD1.5
    /// UNet with random weights built in memory (seconds per step, peak memory,
    /// GFLOP/s).
    #[command(
        after_help = "Examples:\n  sd-lora bench --train --model ./sd15 --data ./my_dog --resolution 512\n  sd-lora bench --train --config my_dog.toml --steps 3 --json\n  sd-lora bench --vae --model ./sd15 --resolution 512\n  sd-lora bench --resolution 512 --precision f16 --checkpointing --json\n  sd-lora bench --device cuda --resolution 512 --steps 10\n\nCompare with PyTorch: tools/bench_compare.sh --train / --vae (see docs/performance.md)."
    )]
    Bench(bench_cmd::BenchArgs),
    /// Start the web app: dataset, training with live progress, generation
    /// and LoRA tools in the browser (http://127.0.0.1:7878/).
    #[command(
        after_help = "Examples:\n  sd-lora ui\n  sd-lora ui --port 8000 --no-browser\n  sd-lora ui --root ~/lora-projects --root ~/models\n  sd-lora ui --listen 0.0.0.0 --token my-secret-token   # reachable from the LAN, token required\n\nThe app may only touch files under the --root folders (default: the current folder). See docs/ui.md."
    )]
    Ui(ui_cmd::UiArgs),
    /// Print the configuration reference (docs/config.md) generated from the config definitions.
    #[command(hide = true)]
    ConfigDocs,
}

/// Writes `text` to standard output. A closed pipe (`sd-lora ... | head`)
/// is not an error worth a panic: the reader has what it wanted.
pub(crate) fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// glibc's malloc returns large freed blocks to the OS at once (`mmap` above
/// a threshold, heap trimming below), so a training step that allocates and
/// frees gigabytes of tensors faults every page of them in again, zeroed: a
/// fifth of a CPU step. Keeping freed memory for reuse made an SD1.5 step at
/// 256 px 13 % faster for 2 % more peak memory (docs/performance.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; it is called before
    // any other thread exists. Each call's failure just keeps the default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// Treats subnormal floats as zero on this thread and every thread it starts
/// (a new thread inherits the floating-point control register), so it runs
/// before rayon's workers exist. A training backward through real weights
/// produces subnormal gradients, and each costs a microcode assist: a step
/// that met many ran 5× slower. Values below 1.2e-38 carry nothing a
/// LoRA learns from; PyTorch's `set_flush_denormal(True)` does the same.
fn flush_denormals_to_zero() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads MXCSR, sets FTZ (bit 15) and DAZ (bit 6), writes it back;
    // both only change how results below the normal range are rounded.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: sets FPCR.FZ (bit 24), flush-to-zero for single and double precision.
    unsafe {
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack, preserves_flags));
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack, preserves_flags));
    }
}

/// Fixes the worker-thread count once, in `RAYON_NUM_THREADS`, when the user
/// has not: rayon's own default (the available parallelism), so that candle
/// and our ops use the same count. Without the variable, candle asks for the
/// count at every CPU matmul and recomputes it each time by reading and
/// parsing `/proc/cpuinfo` (`num_cpus::get_physical`) — 5 % of an SD1.5 step
/// at 256 px in `perf`. Runs before any other thread exists.
fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: no other thread exists yet (this is the first thing `main`
    // does after the allocator settings), so nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
}

fn main() -> ExitCode {
    fix_thread_count();
    tune_allocator();
    flush_denormals_to_zero();
    let cli = Cli::parse();
    let result = (|| match &cli.command {
        Command::Train(a) => train_cmd::run(a),
        Command::CheckData(a) => check_data::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Resize(a) => resize::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Extract(a) => extract::run(a),
        Command::Generate(a) => generate_cmd::run(a),
        Command::Bench(a) => bench_cmd::run(a),
        Command::Ui(a) => ui_cmd::run(a),
        Command::ConfigDocs => {
            emit(&config_docs::render())?;
            Ok(0)
        }
    })();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes joined by ": ", without a cause whose text the
/// message before it already ends with (several libraries print their source
/// in their own message, so `{:#}` would say "No space left on device" twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod error_chain_tests {
    use anyhow::Context;

    /// A cause that repeats the end of the message before it is said once.
    #[test]
    fn repeated_causes_are_said_once() {
        let io = std::io::Error::other("No space left on device (os error 28)");
        let inner = anyhow::Error::msg(format!("io error: {io}"))
            .context("cannot write /x/lora.safetensors");
        let e = Err::<(), _>(io).context(format!(
            "io error: {}",
            "No space left on device (os error 28)"
        ));
        let e = e.context("cannot write /x/lora.safetensors").unwrap_err();
        assert_eq!(
            super::error_chain(&e),
            "cannot write /x/lora.safetensors: io error: No space left on device (os error 28)"
        );
        assert_eq!(
            super::error_chain(&inner),
            "cannot write /x/lora.safetensors: io error: No space left on device (os error 28)"
        );
    }
}
