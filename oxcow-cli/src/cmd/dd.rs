//! `dd`: being written.
use crate::common::Ctx;

pub fn run(ctx: &Ctx, _args: &[String]) -> u8 {
    ctx.error("dd: not implemented yet");
    1
}
