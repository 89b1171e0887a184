//! `sd-lora ui`: starts the local web app (crate `sd-lora-ui`).

use anyhow::{Context, Result};
use clap::Args;
use std::net::IpAddr;
use std::path::PathBuf;

/// Arguments of `ui`.
#[derive(Debug, Args)]
pub struct UiArgs {
    /// Port to listen on (0 = any free port).
    #[arg(long, value_name = "N", default_value_t = 7878)]
    pub port: u16,
    /// Address to listen on. Anything but 127.0.0.1 / ::1 makes the app
    /// reachable from other machines and requires a token (--token, or a
    /// random one printed in the URL).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub listen: IpAddr,
    /// Token every request must carry (at least 8 characters); also asked
    /// on 127.0.0.1 when given.
    #[arg(long, value_name = "T")]
    pub token: Option<String>,
    /// A folder the app may read and write in (repeatable; default: the
    /// current folder). Its `output/` folder is always allowed. Paths the
    /// page sends outside these folders are refused.
    #[arg(long = "root", value_name = "DIR")]
    pub roots: Vec<PathBuf>,
    /// Do not open a browser.
    #[arg(long)]
    pub no_browser: bool,
}

/// Runs the app until Ctrl-C.
pub fn run(args: &UiArgs) -> Result<u8> {
    let roots = if args.roots.is_empty() {
        vec![std::env::current_dir().context("cannot read the current folder")?]
    } else {
        args.roots.clone()
    };
    let exe = std::env::current_exe().context("cannot find the sd-lora binary's own path")?;
    sd_lora_ui::serve(sd_lora_ui::UiOptions {
        listen: args.listen,
        port: args.port,
        token: args.token.clone(),
        roots,
        open_browser: !args.no_browser,
        exe,
    })?;
    Ok(0)
}
