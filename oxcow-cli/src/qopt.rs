//! Command line options parsed as glibc's `getopt_long` parses qemu-img's: options and
//! operands in any order (GNU permutation), `--` ends the options, short options
//! cluster (`-Uf qcow2`, `-fqcow2`), long options take `--name=value` or
//! `--name value` and may be abbreviated to any unambiguous prefix. Errors carry
//! glibc's exact wording; the caller prefixes them with `PROG CMD: ` and prints
//! qemu-img's "Try ... --help" line.

/// One long option: its name, whether it takes an argument, and the id reported for it
/// (for options that also have a short form, the short letter).
#[derive(Debug, Clone, Copy)]
pub struct LongOpt {
    pub name: &'static str,
    pub has_arg: bool,
    pub id: &'static str,
}

pub const fn long(name: &'static str, has_arg: bool, id: &'static str) -> LongOpt {
    LongOpt { name, has_arg, id }
}

/// An option found on the command line: its id (a short letter, or a long option's
/// id) and its argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opt {
    pub id: String,
    pub arg: Option<String>,
}

/// The scanner: call [`Getopt::next_opt`] until it returns `None`, then take the
/// operands from [`Getopt::operands`].
pub struct Getopt<'a> {
    args: &'a [String],
    shorts: &'static str,
    longs: &'static [LongOpt],
    index: usize,
    /// Position inside a cluster of short options (0: not inside one).
    cluster: usize,
    operands: Vec<String>,
    done: bool,
}

impl<'a> Getopt<'a> {
    /// `shorts` is a getopt optstring ("hf:U": a letter followed by ':' takes an
    /// argument).
    pub fn new(args: &'a [String], shorts: &'static str, longs: &'static [LongOpt]) -> Self {
        Getopt {
            args,
            shorts,
            longs,
            index: 0,
            cluster: 0,
            operands: Vec::new(),
            done: false,
        }
    }

    /// The operands (non-option arguments), in order, once scanning has finished.
    pub fn operands(&self) -> &[String] {
        &self.operands
    }

    fn short_spec(&self, c: char) -> Option<bool> {
        if c == ':' {
            return None;
        }
        let mut chars = self.shorts.chars().peekable();
        while let Some(x) = chars.next() {
            let takes = chars.peek() == Some(&':');
            if takes {
                chars.next();
            }
            if x == c {
                return Some(takes);
            }
        }
        None
    }

    /// The next option, an error message (without the program prefix), or `None` when
    /// every argument was seen.
    pub fn next_opt(&mut self) -> Option<Result<Opt, String>> {
        if self.done {
            return None;
        }
        loop {
            if self.cluster > 0 {
                return Some(self.next_short());
            }
            let Some(arg) = self.args.get(self.index) else {
                self.done = true;
                return None;
            };
            if arg == "--" {
                self.operands
                    .extend(self.args[self.index + 1..].iter().cloned());
                self.done = true;
                return None;
            }
            if let Some(body) = arg.strip_prefix("--") {
                self.index += 1;
                return Some(self.long_option(body));
            }
            if arg.len() > 1 && arg.starts_with('-') {
                self.cluster = 1;
                continue;
            }
            self.operands.push(arg.clone());
            self.index += 1;
        }
    }

    fn next_short(&mut self) -> Result<Opt, String> {
        let arg = &self.args[self.index];
        let rest = &arg[self.cluster..];
        let c = rest.chars().next().unwrap_or('?');
        let after = self.cluster + c.len_utf8();
        let at_end = after >= arg.len();
        match self.short_spec(c) {
            None => {
                self.advance_short(at_end, after);
                Err(format!("invalid option -- '{c}'"))
            }
            Some(false) => {
                self.advance_short(at_end, after);
                Ok(Opt {
                    id: c.to_string(),
                    arg: None,
                })
            }
            Some(true) => {
                self.cluster = 0;
                self.index += 1;
                if !at_end {
                    return Ok(Opt {
                        id: c.to_string(),
                        arg: Some(arg[after..].to_string()),
                    });
                }
                match self.args.get(self.index) {
                    Some(v) => {
                        self.index += 1;
                        Ok(Opt {
                            id: c.to_string(),
                            arg: Some(v.clone()),
                        })
                    }
                    None => Err(format!("option requires an argument -- '{c}'")),
                }
            }
        }
    }

    fn advance_short(&mut self, at_end: bool, after: usize) {
        if at_end {
            self.cluster = 0;
            self.index += 1;
        } else {
            self.cluster = after;
        }
    }

    fn long_option(&mut self, body: &str) -> Result<Opt, String> {
        let (name, inline) = match body.find('=') {
            Some(i) => (&body[..i], Some(&body[i + 1..])),
            None => (body, None),
        };
        let found = match self.longs.iter().find(|o| o.name == name) {
            Some(o) => *o,
            None => {
                let matches: Vec<&LongOpt> = self
                    .longs
                    .iter()
                    .filter(|o| o.name.starts_with(name))
                    .collect();
                match matches.first() {
                    None => return Err(format!("unrecognized option '--{body}'")),
                    Some(first) => {
                        let same = matches
                            .iter()
                            .all(|o| o.has_arg == first.has_arg && o.id == first.id);
                        if !same {
                            let list: String =
                                matches.iter().map(|o| format!(" '--{}'", o.name)).collect();
                            return Err(format!(
                                "option '--{body}' is ambiguous; possibilities:{list}"
                            ));
                        }
                        **first
                    }
                }
            }
        };
        match (found.has_arg, inline) {
            (false, Some(_)) => Err(format!(
                "option '--{}' doesn't allow an argument",
                found.name
            )),
            (false, None) => Ok(Opt {
                id: found.id.to_string(),
                arg: None,
            }),
            (true, Some(v)) => Ok(Opt {
                id: found.id.to_string(),
                arg: Some(v.to_string()),
            }),
            (true, None) => match self.args.get(self.index) {
                Some(v) => {
                    self.index += 1;
                    Ok(Opt {
                        id: found.id.to_string(),
                        arg: Some(v.clone()),
                    })
                }
                None => Err(format!("option '--{}' requires an argument", found.name)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONGS: &[LongOpt] = &[
        long("help", false, "h"),
        long("format", true, "f"),
        long("force-share", false, "U"),
        long("output", true, "output"),
        long("backing-chain", false, "b"),
    ];

    fn run(args: &[&str]) -> (Vec<Result<Opt, String>>, Vec<String>) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut g = Getopt::new(&args, "hf:Ub", LONGS);
        let mut out = Vec::new();
        while let Some(o) = g.next_opt() {
            let stop = o.is_err();
            out.push(o);
            if stop {
                break;
            }
        }
        (out, g.operands().to_vec())
    }

    fn ok(id: &str, arg: Option<&str>) -> Result<Opt, String> {
        Ok(Opt {
            id: id.into(),
            arg: arg.map(Into::into),
        })
    }

    #[test]
    fn permutes_and_clusters() {
        let (o, rest) = run(&["a", "-Uf", "qcow2", "b", "--out=json", "--", "-x"]);
        assert_eq!(
            o,
            vec![
                ok("U", None),
                ok("f", Some("qcow2")),
                ok("output", Some("json"))
            ]
        );
        assert_eq!(rest, vec!["a", "b", "-x"]);
        let (o, _) = run(&["-fraw", "--form", "qcow2", "--back"]);
        assert_eq!(
            o,
            vec![ok("f", Some("raw")), ok("f", Some("qcow2")), ok("b", None)]
        );
    }

    #[test]
    fn errors_like_glibc() {
        assert_eq!(run(&["-x"]).0, vec![Err("invalid option -- 'x'".into())]);
        assert_eq!(
            run(&["--foo=1"]).0,
            vec![Err("unrecognized option '--foo=1'".into())]
        );
        assert_eq!(
            run(&["-f"]).0,
            vec![Err("option requires an argument -- 'f'".into())]
        );
        assert_eq!(
            run(&["--format"]).0,
            vec![Err("option '--format' requires an argument".into())]
        );
        assert_eq!(
            run(&["--back=1"]).0,
            vec![Err(
                "option '--backing-chain' doesn't allow an argument".into()
            )]
        );
        assert_eq!(
            run(&["--f", "x"]).0,
            vec![Err(
                "option '--f' is ambiguous; possibilities: '--format' '--force-share'".into()
            )]
        );
    }
}
