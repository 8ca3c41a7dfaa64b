//! Scaffolding shared by the CLI tests (`mod support;` in each test file): finding
//! qemu-img and qemu-io, running a program in a directory and capturing its output,
//! and a scratch directory holding the images and a symlink to the oxcow binary (named
//! `qemu-img` or `qemu-io`, so that its messages carry the same program name as the
//! oracle's). Each test binary uses a subset of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Whether every program in `progs` runs (`--version`); says which are missing.
pub fn have(progs: &[&str]) -> bool {
    let ok = progs.iter().all(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if !ok {
        eprintln!("{} not found: skipping", progs.join(" or "));
    }
    ok
}

/// Whether qemu-img runs.
pub fn have_qemu() -> bool {
    have(&["qemu-img"])
}

/// Whether qemu-img and qemu-io run.
pub fn have_qemu_and_io() -> bool {
    have(&["qemu-img", "qemu-io"])
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// oxcow's output `ours` is qemu's `qemu`: same stdout, stderr and exit code (the
/// messages name `what`).
pub fn assert_same_output(what: &str, ours: &Output, qemu: &Output) {
    assert_eq!(text(&ours.stdout), text(&qemu.stdout), "stdout of {what}");
    assert_eq!(text(&ours.stderr), text(&qemu.stderr), "stderr of {what}");
    assert_eq!(
        ours.status.code(),
        qemu.status.code(),
        "exit code of {what}"
    );
}

/// Runs `prog ARGS` in `dir` with `env` added; with `stdin`, that text is fed through
/// a pipe (which is then closed), otherwise standard input is closed.
pub fn run_in(
    prog: &Path,
    dir: &Path,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
    let mut c = Command::new(prog);
    c.current_dir(dir).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let Some(input) = stdin else {
        return c.output().unwrap();
    };
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut pipe = child.stdin.take().unwrap();
        // A process that stops reading (or dies) closes the pipe: not an error.
        let _ = pipe.write_all(input.as_bytes());
    }
    child.wait_with_output().unwrap()
}

/// Runs `prog ARGS` in `dir`.
pub fn run(prog: &Path, dir: &Path, args: &[&str]) -> Output {
    run_in(prog, dir, &[], args, None)
}

/// Runs `prog ARGS` in `dir`; it must succeed. Returns its stdout.
pub fn ok(dir: &Path, prog: &str, args: &[&str]) -> String {
    let o = run(Path::new(prog), dir, args);
    assert!(o.status.success(), "{prog} {args:?}: {o:?}");
    text(&o.stdout)
}

/// The arguments of `qemu-io [-f FMT] -c CMD... IMG`.
pub fn io_args<'a>(fmt: Option<&'a str>, img: &'a str, cmds: &[&'a str]) -> Vec<&'a str> {
    let mut args = Vec::new();
    if let Some(fmt) = fmt {
        args.extend_from_slice(&["-f", fmt]);
    }
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    args
}

/// A symlink `DIR/bin/NAME` to the oxcow binary.
pub fn oxcow_link(dir: &Path, name: &str) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let ox = bin.join(name);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_oxcow"), &ox).unwrap();
    ox
}

/// How a [`Scratch`] directory runs programs.
pub struct Setup {
    /// The name of the symlink to oxcow.
    pub link: &'static str,
    /// Where the directory is made (the system's temporary directory if `None`).
    pub under: Option<&'static str>,
    /// Environment added to [`Scratch::run`].
    pub run_env: &'static [(&'static str, &'static str)],
    /// Environment added to [`Scratch::sh`].
    pub sh_env: &'static [(&'static str, &'static str)],
    /// Text put before every [`Scratch::sh`] script.
    pub sh_prelude: &'static str,
    /// The subdirectory [`Scratch::sh`] runs in (made at once; "" for the top).
    pub sh_dir: &'static str,
    /// Whether [`Scratch::sh`] runs `sync` after the script.
    pub sh_sync: bool,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            link: "qemu-img",
            under: None,
            run_env: &[],
            sh_env: &[],
            sh_prelude: "",
            sh_dir: "",
            sh_sync: false,
        }
    }
}

/// `LC_ALL=C`, the environment most tests run the tools in.
pub const C_LOCALE: &[(&str, &str)] = &[("LC_ALL", "C")];

/// A scratch directory holding the images and a symlink to oxcow.
pub struct Scratch {
    pub tmp: tempfile::TempDir,
    pub ox: PathBuf,
    setup: Setup,
}

impl Scratch {
    pub fn with(setup: Setup) -> Scratch {
        let tmp = match setup.under {
            Some(base) => tempfile::tempdir_in(base).unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        let ox = oxcow_link(tmp.path(), setup.link);
        if !setup.sh_dir.is_empty() {
            std::fs::create_dir(tmp.path().join(setup.sh_dir)).unwrap();
        }
        Scratch { tmp, ox, setup }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Runs `prog ARGS` in the directory.
    pub fn run(&self, prog: &Path, args: &[&str]) -> Output {
        run_in(prog, self.tmp.path(), self.setup.run_env, args, None)
    }

    /// Runs `prog ARGS` in the subdirectory `cwd`, with [`Setup::run_env`], feeding
    /// `stdin` (or nothing) through a pipe.
    pub fn run_at(&self, prog: &Path, cwd: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let env = self.setup.run_env;
        run_in(prog, &self.path(cwd), env, args, Some(stdin.unwrap_or("")))
    }

    /// Runs a shell script (image building); it must succeed. Returns its output.
    pub fn sh(&self, script: &str) -> Output {
        let s = &self.setup;
        let full = format!("{}{script}", s.sh_prelude);
        let o = run_in(
            Path::new("sh"),
            &self.path(s.sh_dir),
            s.sh_env,
            &["-ec", &full],
            None,
        );
        assert!(
            o.status.success(),
            "script failed:\n{script}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        if s.sh_sync {
            // Both tools must see the same file extents.
            let _ = Command::new("sync").status();
        }
        o
    }

    pub fn oxcow(&self, args: &[&str]) -> Output {
        self.run(&self.ox, args)
    }

    pub fn qemu(&self, args: &[&str]) -> Output {
        self.run(Path::new("qemu-img"), args)
    }

    /// Runs qemu-img (must succeed).
    pub fn qemu_img(&self, args: &[&str]) -> Output {
        let o = self.qemu(args);
        assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
        o
    }

    /// Runs qemu-io on an image (must succeed).
    pub fn qemu_io(&self, img: &str, fmt: &str, cmds: &[&str]) {
        let args = io_args(Some(fmt), img, cmds);
        let o = self.run(Path::new("qemu-io"), &args);
        assert!(o.status.success(), "qemu-io {args:?}: {o:?}");
    }

    /// Runs the same command line through qemu-img and oxcow: same exit code, stdout
    /// and stderr. Returns oxcow's output.
    pub fn same_as_qemu_img(&self, args: &[&str]) -> Output {
        let q = self.qemu(args);
        let x = self.oxcow(args);
        assert_same_output(&format!("{args:?}"), &x, &q);
        x
    }
}
