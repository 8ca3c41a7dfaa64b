//! Command dispatch: `oxcow COMMAND ARGS...` as `qemu-img COMMAND ARGS...`.

use crate::common::Ctx;

mod amend;
mod bench;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod convert_bitmaps;
mod create;
mod dd;
mod info;
pub mod io;
mod map;
mod measure;
mod rebase;
mod resize;
mod snapshot;

pub fn dispatch(ctx: &Ctx, args: &[String]) -> u8 {
    let Some(cmd) = args.first() else {
        return ctx.usage_error("Not enough arguments");
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "info" => info::run(ctx, rest),
        "amend" => amend::run(ctx, rest),
        "io" => io::run(ctx, rest),
        "bench" => bench::run(ctx, rest),
        "bitmap" => bitmap::run(ctx, rest),
        "map" => map::run(ctx, rest),
        "check" => check::run(ctx, rest),
        "measure" => measure::run(ctx, rest),
        "compare" => compare::run(ctx, rest),
        "convert" => convert::run(ctx, rest),
        "dd" => dd::run(ctx, rest),
        "create" => create::run(ctx, rest),
        "resize" => resize::run(ctx, rest),
        "rebase" => rebase::run(ctx, rest),
        "commit" => commit::run(ctx, rest),
        "snapshot" => snapshot::run(ctx, rest),
        "-V" | "--version" => {
            println!("{} version {} (oxcow)", ctx.prog, env!("CARGO_PKG_VERSION"));
            0
        }
        "-h" | "--help" => {
            println!(
                "{} version {} (oxcow)\nusage: {} [standard options] command [command options]",
                ctx.prog,
                env!("CARGO_PKG_VERSION"),
                ctx.prog
            );
            println!("Command syntax: info, map, bitmap, check, compare, convert, dd, create, resize, rebase, commit, snapshot (as qemu-img)");
            0
        }
        other => ctx.usage_error(format!("Command not found: {other}")),
    }
}
