//! QEMU's `key=value,…` option syntax (QemuOpts / keyval), parsed into an ordered list and
//! written back unchanged except where a caller edits it.
//!
//! Hand-written because no crate speaks it, and it is small: parameters are separated by
//! `,`; a literal comma inside a value is written `,,`; the first parameter may lack its key
//! (the option's *implied* key: `socket,…` for a chardev's backend, `virtio-blk-pci,…` for a
//! device's driver); later parameters without `=` are legacy booleans (`server`, `nowait`)
//! and are kept verbatim.

/// One parameter as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Param {
    /// `key=value` (the value unescaped).
    Pair(String, String),
    /// A parameter without `=`: the implied key's value when first, else a legacy flag.
    Bare(String),
}

/// A parsed option argument, in its original order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyVal {
    pub params: Vec<Param>,
}

impl KeyVal {
    /// Parses `text`. Never fails: every string is some list of parameters.
    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut current = String::new();
        let mut chars = text.chars().peekable();
        let mut push = |current: &mut String| {
            let item = std::mem::take(current);
            params.push(item);
        };
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    current.push('\u{0}'); // placeholder for an escaped comma, see below
                } else {
                    push(&mut current);
                }
            } else {
                current.push(c);
            }
        }
        push(&mut current);
        // An escaped comma can only be part of a value (keys never hold commas), so it is
        // restored after the split on `=`; NUL cannot occur in an argv element.
        let params = params
            .into_iter()
            .filter(|item| !item.is_empty())
            .map(|item| match item.split_once('=') {
                Some((key, value)) => {
                    Param::Pair(key.replace('\u{0}', ","), value.replace('\u{0}', ","))
                }
                None => Param::Bare(item.replace('\u{0}', ",")),
            })
            .collect();
        Self { params }
    }

    /// The value of `key`, or of the implied key when `implied` names it and the first
    /// parameter is bare.
    pub fn get(&self, key: &str, implied: Option<&str>) -> Option<&str> {
        for (index, param) in self.params.iter().enumerate() {
            match param {
                Param::Pair(k, v) if k == key => return Some(v),
                Param::Bare(v) if index == 0 && implied == Some(key) => return Some(v),
                _ => {}
            }
        }
        None
    }

    /// Sets `key` to `value` where it is (the implied first parameter included), or appends it.
    pub fn set(&mut self, key: &str, value: &str, implied: Option<&str>) {
        for (index, param) in self.params.iter_mut().enumerate() {
            match param {
                Param::Pair(k, v) if k == key => {
                    *v = value.to_string();
                    return;
                }
                Param::Bare(v) if index == 0 && implied == Some(key) => {
                    *v = value.to_string();
                    return;
                }
                _ => {}
            }
        }
        self.params
            .push(Param::Pair(key.to_string(), value.to_string()));
    }

    /// Removes every `key=…` parameter for which `drop` holds; returns the removed keys.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&str) -> bool) -> Vec<String> {
        let mut removed = Vec::new();
        self.params.retain(|param| match param {
            Param::Pair(k, _) if drop(k) => {
                removed.push(k.clone());
                false
            }
            _ => true,
        });
        removed
    }

    /// The option argument again, commas in values escaped.
    pub fn render(&self) -> String {
        let escape = |value: &str| value.replace(',', ",,");
        self.params
            .iter()
            .map(|param| match param {
                Param::Pair(k, v) => format!("{k}={}", escape(v)),
                Param::Bare(v) => escape(v),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_implied_key_pairs_flags_and_escaped_commas() {
        let kv = KeyVal::parse("socket,path=/run/a,,b.sock,server,nowait,id=qga0");
        assert_eq!(
            kv.params,
            vec![
                Param::Bare("socket".into()),
                Param::Pair("path".into(), "/run/a,b.sock".into()),
                Param::Bare("server".into()),
                Param::Bare("nowait".into()),
                Param::Pair("id".into(), "qga0".into()),
            ]
        );
        assert_eq!(kv.get("backend", Some("backend")), Some("socket"));
        assert_eq!(kv.get("backend", None), None);
        assert_eq!(kv.get("path", None), Some("/run/a,b.sock"));
        // Values may hold `=`.
        let kv = KeyVal::parse("virtserialport,name=a=b");
        assert_eq!(kv.get("name", None), Some("a=b"));
    }

    #[test]
    fn renders_what_it_parsed_and_escapes_edited_values() {
        for text in [
            "file=/a/b.qcow2,format=qcow2,if=virtio,id=drive0",
            "socket,path=/r/q,,x.sock,server=on,wait=off,id=qga0",
            "unix:/x,server,nowait",
            "driver=qcow2,node-name=d0,file.driver=file,file.filename=/a",
        ] {
            assert_eq!(KeyVal::parse(text).render(), text);
        }
        let mut kv = KeyVal::parse("file=/old,if=virtio");
        kv.set("file", "/new,dir/x.raw", None);
        kv.set("format", "raw", None);
        assert_eq!(kv.render(), "file=/new,,dir/x.raw,if=virtio,format=raw");
        let removed = kv.remove_where(|k| k == "if");
        assert_eq!(removed, vec!["if".to_string()]);
        assert_eq!(kv.render(), "file=/new,,dir/x.raw,format=raw");
    }

    #[test]
    fn sets_the_implied_first_parameter() {
        let mut kv = KeyVal::parse("kvm,kernel-irqchip=on");
        kv.set("accel", "tcg", Some("accel"));
        assert_eq!(kv.render(), "tcg,kernel-irqchip=on");
    }
}
