//! The `oxcow` command: qemu-img's commands and options over the oxcow library.
//! Invoked as `qemu-img` (through a symlink) it behaves as qemu-img, naming itself so
//! in every message.

mod cmd;
mod common;
mod copyopts;
mod human;
mod pool;
mod progress;
mod qjson;
mod qopt;
mod sizearg;
mod snapsel;
mod snaptable;
mod source;

use common::Ctx;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let invoked = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "oxcow".to_string());
    if invoked == "qemu-io" {
        return ExitCode::from(cmd::io::run_as("qemu-io", &args[1.min(args.len())..]));
    }
    let prog = if invoked == "qemu-img" {
        "qemu-img"
    } else {
        "oxcow"
    };
    let ctx = Ctx {
        prog: prog.to_string(),
    };
    let code = cmd::dispatch(&ctx, &args[1.min(args.len())..]);
    ExitCode::from(code)
}
