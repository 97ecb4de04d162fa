//! A QEMU command line split into its options, so that single options can be rewritten and
//! the rest passed through untouched.
//!
//! QEMU itself decides from its option table whether an option takes an argument; the same
//! table (for QEMU 7.2) is [`FLAGS`]. An option not in it is taken to have an argument —
//! almost all of QEMU's options do.

/// QEMU 7.2's options without an argument. Derived from `qemu-system-x86_64 -help`: every
/// listed option run alone either says "requires an argument" or is one of these; plus the
/// hidden and deprecated flags of `qemu-options.hx` still accepted by 7.2.
const FLAGS: &[&str] = &[
    "S",
    "async-teardown",
    "audio-help",
    "daemonize",
    "enable-kvm",
    "enable-sync-profile",
    "full-screen",
    "h",
    "help",
    "mem-prealloc",
    "no-acpi",
    "no-fd-bootchk",
    "no-hpet",
    "no-quit",
    "no-reboot",
    "no-shutdown",
    "no-user-config",
    "nodefaults",
    "nographic",
    "only-migratable",
    "portrait",
    "preconfig",
    "s",
    "singlestep",
    "snapshot",
    "usb",
    "version",
    "win2k-hack",
    "xen-attach",
    "xen-domid-restrict",
    "alt-grab",
    "ctrl-grab",
    "curses",
    "no-frame",
    "sdl",
    "semihosting",
    "enable-fips",
];

/// One element of the command line after the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    /// `-name value`; `name` without its dashes, `dashes` as written (`-` or `--`).
    Option {
        dashes: &'static str,
        name: String,
        value: Option<String>,
        /// Where it was (1-based argv index of the option), for error messages.
        position: usize,
    },
    /// A bare argument: QEMU takes it as the image of IDE disk 0 (like `-hda`).
    Positional { value: String, position: usize },
}

impl Item {
    pub fn option(name: &str, value: Option<&str>) -> Self {
        Item::Option {
            dashes: "-",
            name: name.to_string(),
            value: value.map(str::to_string),
            position: 0,
        }
    }

    pub fn name(&self) -> Option<&str> {
        match self {
            Item::Option { name, .. } => Some(name),
            Item::Positional { .. } => None,
        }
    }

    pub fn value(&self) -> Option<&str> {
        match self {
            Item::Option { value, .. } => value.as_deref(),
            Item::Positional { value, .. } => Some(value),
        }
    }

    pub fn position(&self) -> usize {
        match self {
            Item::Option { position, .. } | Item::Positional { position, .. } => *position,
        }
    }

    pub fn set_value(&mut self, new: String) {
        match self {
            Item::Option { value, .. } => *value = Some(new),
            Item::Positional { value, .. } => *value = new,
        }
    }
}

/// A command line: the program and its items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommandLine {
    pub program: String,
    pub items: Vec<Item>,
}

impl CommandLine {
    /// Splits `argv` (program first). `None` for an empty argv. An option that needs an
    /// argument but ends the line keeps `value: None` (QEMU would have refused it; it is
    /// passed on unchanged).
    pub fn parse(argv: &[String]) -> Option<Self> {
        let (program, rest) = argv.split_first()?;
        let mut items = Vec::new();
        let mut index = 0;
        while index < rest.len() {
            let arg = &rest[index];
            let position = index + 1;
            index += 1;
            let (dashes, name) = match arg.strip_prefix("--") {
                Some(name) if !name.is_empty() => ("--", name),
                _ => match arg.strip_prefix('-') {
                    Some(name) if !name.is_empty() => ("-", name),
                    _ => {
                        items.push(Item::Positional {
                            value: arg.clone(),
                            position,
                        });
                        continue;
                    }
                },
            };
            let value = if FLAGS.contains(&name) {
                None
            } else {
                let value = rest.get(index).cloned();
                index += 1;
                value
            };
            items.push(Item::Option {
                dashes,
                name: name.to_string(),
                value,
                position,
            });
        }
        Some(Self {
            program: program.clone(),
            items,
        })
    }

    pub fn to_argv(&self) -> Vec<String> {
        let mut argv = vec![self.program.clone()];
        for item in &self.items {
            match item {
                Item::Option {
                    dashes,
                    name,
                    value,
                    ..
                } => {
                    argv.push(format!("{dashes}{name}"));
                    argv.extend(value.clone());
                }
                Item::Positional { value, .. } => argv.push(value.clone()),
            }
        }
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_take_no_argument_and_everything_round_trips() {
        let line = argv(&[
            "qemu-system-x86_64",
            "-nodefaults",
            "-m",
            "256",
            "--no-reboot",
            "-append",
            "-x quiet",
            "disk.img",
            "-S",
        ]);
        let parsed = CommandLine::parse(&line).expect("not empty");
        let names: Vec<_> = parsed.items.iter().map(|i| (i.name(), i.value())).collect();
        assert_eq!(
            names,
            vec![
                (Some("nodefaults"), None),
                (Some("m"), Some("256")),
                (Some("no-reboot"), None),
                // An argument that starts with a dash is still the argument.
                (Some("append"), Some("-x quiet")),
                (None, Some("disk.img")),
                (Some("S"), None),
            ]
        );
        assert_eq!(parsed.items[4].position(), 7);
        assert_eq!(parsed.to_argv(), line);
    }

    #[test]
    fn a_missing_last_argument_is_kept_as_is() {
        let line = argv(&["qemu", "-m"]);
        let parsed = CommandLine::parse(&line).expect("not empty");
        assert_eq!(parsed.items[0].value(), None);
        assert_eq!(parsed.to_argv(), line);
        assert!(CommandLine::parse(&[]).is_none());
    }
}
