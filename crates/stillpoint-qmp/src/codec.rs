//! The QMP wire format, without I/O.
//!
//! QMP is one JSON object per line in each direction (QEMU ends its lines with
//! `\r\n` or `\n`). Three kinds of object arrive after the greeting:
//! `{"return": …, "id": …}`, `{"error": {"class", "desc"}, "id": …}` and
//! `{"event", "data", "timestamp": {"seconds", "microseconds"}}`. The client
//! tags every command with a numeric `id` so replies can be matched even when
//! commands are pipelined and events interleave.
//!
//! Everything here is a pure function over one line; the transport
//! ([`crate::Qmp`]) splits the stream into lines and feeds them in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// QEMU's version as announced in the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    /// e.g. 7
    pub major: u32,
    /// e.g. 2
    pub minor: u32,
    /// e.g. 22
    pub micro: u32,
    /// Distribution build string, e.g. `Debian 1:7.2+dfsg-7+deb12u18+b3` (may be empty).
    pub package: String,
}

impl QemuVersion {
    /// True when this QEMU is at least `major.minor`.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

/// The greeting QEMU sends as soon as a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// Optional protocol features offered (`oob`); this client enables none.
    pub capabilities: Vec<String>,
}

/// When QEMU emitted an event: host wall-clock time, as QEMU stamped it.
///
/// Block jobs are timed from these stamps, not from when the event was read:
/// an event can sit unread while the caller talks to the guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// The stamp as a [`SystemTime`]; `None` when QEMU could not read its
    /// clock (it then sends `-1`) or the value is out of range.
    pub fn to_system_time(&self) -> Option<SystemTime> {
        if self.seconds < 0 || !(0..1_000_000).contains(&self.microseconds) {
            return None;
        }
        UNIX_EPOCH.checked_add(
            Duration::from_secs(self.seconds as u64)
                + Duration::from_micros(self.microseconds as u64),
        )
    }

    /// Time from `earlier` to `self`, or `None` if `earlier` is later.
    pub fn duration_since(&self, earlier: &Timestamp) -> Option<Duration> {
        self.to_system_time()?
            .duration_since(earlier.to_system_time()?)
            .ok()
    }
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `JOB_STATUS_CHANGE`.
    pub name: String,
    /// Event payload (`{}` when QEMU sent none).
    pub data: Value,
    /// When QEMU emitted it.
    pub timestamp: Timestamp,
}

/// One message from QEMU after the greeting.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A successful reply.
    Return {
        /// The `id` echoed from the command (absent if the command had none).
        id: Option<Value>,
        /// The returned value.
        value: Value,
    },
    /// A failed command.
    Error {
        /// The `id` echoed from the command; QEMU omits it when it could not
        /// parse the command at all.
        id: Option<Value>,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An asynchronous event.
    Event(Event),
}

/// Builds one command line (with its trailing newline).
pub fn encode_command(id: u64, name: &str, arguments: Option<&Value>) -> String {
    let mut obj = Map::new();
    obj.insert("execute".into(), Value::String(name.into()));
    if let Some(args) = arguments {
        obj.insert("arguments".into(), args.clone());
    }
    obj.insert("id".into(), Value::from(id));
    let mut line = Value::Object(obj).to_string();
    line.push('\n');
    line
}

fn parse_object(line: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Error::malformed(format!(
            "expected a JSON object, got `{}`",
            excerpt(&other.to_string())
        ))),
        Err(e) => Err(Error::malformed(format!("not JSON: `{}`", excerpt(line))).with_source(e)),
    }
}

/// Parses the greeting line, `{"QMP": {"version": …, "capabilities": […]}}`.
pub fn parse_greeting(line: &str) -> Result<Greeting> {
    #[derive(Deserialize)]
    struct Inner {
        version: VersionWrapper,
        capabilities: Vec<String>,
    }
    #[derive(Deserialize)]
    struct VersionWrapper {
        qemu: Triple,
        #[serde(default)]
        package: String,
    }
    #[derive(Deserialize)]
    struct Triple {
        major: u32,
        minor: u32,
        micro: u32,
    }
    let mut obj = parse_object(line)?;
    let qmp = obj.remove("QMP").ok_or_else(|| {
        Error::malformed(format!(
            "expected the QMP greeting, got `{}`",
            excerpt(line)
        ))
    })?;
    let inner: Inner = serde_json::from_value(qmp).map_err(|e| {
        Error::malformed(format!("greeting has the wrong shape: `{}`", excerpt(line)))
            .with_source(e)
    })?;
    Ok(Greeting {
        version: QemuVersion {
            major: inner.version.qemu.major,
            minor: inner.version.qemu.minor,
            micro: inner.version.qemu.micro,
            package: inner.version.package,
        },
        capabilities: inner.capabilities,
    })
}

/// Parses one line received after the greeting.
pub fn parse_message(line: &str) -> Result<Message> {
    let mut obj = parse_object(line)?;
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return {
            id: obj.remove("id"),
            value,
        });
    }
    if let Some(err) = obj.remove("error") {
        #[derive(Deserialize)]
        struct ErrorBody {
            class: String,
            desc: String,
        }
        let body: ErrorBody = serde_json::from_value(err).map_err(|e| {
            Error::malformed(format!(
                "error reply lacks a string class and desc: `{}`",
                excerpt(line)
            ))
            .with_source(e)
        })?;
        return Ok(Message::Error {
            id: obj.remove("id"),
            class: body.class,
            desc: body.desc,
        });
    }
    if let Some(name) = obj.remove("event") {
        let Value::String(name) = name else {
            return Err(Error::malformed(format!(
                "event name is not a string: `{}`",
                excerpt(line)
            )));
        };
        let timestamp = obj
            .remove("timestamp")
            .ok_or_else(|| {
                Error::malformed(format!(
                    "event {name} has no timestamp: `{}`",
                    excerpt(line)
                ))
            })
            .and_then(|t| {
                serde_json::from_value::<Timestamp>(t).map_err(|e| {
                    Error::malformed(format!(
                        "event {name} has a bad timestamp: `{}`",
                        excerpt(line)
                    ))
                    .with_source(e)
                })
            })?;
        let data = obj
            .remove("data")
            .unwrap_or_else(|| Value::Object(Map::new()));
        return Ok(Message::Event(Event {
            name,
            data,
            timestamp,
        }));
    }
    Err(Error::malformed(format!(
        "neither return, error nor event: `{}`",
        excerpt(line)
    )))
}

/// At most 200 characters of peer input for an error message.
fn excerpt(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use serde_json::json;

    // Fixtures are lines captured from qemu-system-x86_64 7.2.22 (-machine none).

    const GREETING: &str = concat!(
        r#"{"QMP": {"#,                                                   // greeting wrapper
        r#""version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "#, // QEMU 7.2.22
        r#""package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "#,             // distribution build
        r#""capabilities": ["oob"]}}"#, // out-of-band offered, not used
    );

    #[test]
    fn greeting_gives_version_and_capabilities() {
        let g = parse_greeting(GREETING).unwrap();
        assert_eq!(
            g.version,
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 22,
                package: "Debian 1:7.2+dfsg-7+deb12u18+b3".into()
            }
        );
        assert!(g.version.at_least(7, 2) && !g.version.at_least(8, 0));
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
    }

    #[test]
    fn greeting_without_package_is_accepted() {
        let g = parse_greeting(
            r#"{"QMP":{"version":{"qemu":{"micro":0,"minor":0,"major":9}},"capabilities":[]}}"#,
        )
        .unwrap();
        assert_eq!(g.version.package, "");
    }

    #[test]
    fn non_greeting_first_line_is_malformed() {
        let e = parse_greeting(r#"{"return": {}}"#).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Malformed);
        assert!(e.to_string().contains("expected the QMP greeting"), "{e}");
    }

    #[test]
    fn command_is_framed_with_id_and_newline() {
        let line = encode_command(
            5,
            "block-export-del",
            Some(&json!({"id": "exp1", "mode": "hard"})),
        );
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"execute": "block-export-del", "arguments": {"id": "exp1", "mode": "hard"}, "id": 5})
        );
        // No `arguments` key at all when there are none (QEMU accepts both).
        let v: Value = serde_json::from_str(&encode_command(1, "qmp_capabilities", None)).unwrap();
        assert_eq!(v, json!({"execute": "qmp_capabilities", "id": 1}));
    }

    #[test]
    fn return_reply_keeps_value_and_id() {
        let line = concat!(
            r#"{"return": {"status": "running", "#,       // RunState
            r#""singlestep": false, "running": true}, "#, // vCPUs running
            r#""id": 11}"#,                               // echoed command id
        );
        assert_eq!(
            parse_message(line).unwrap(),
            Message::Return {
                id: Some(json!(11)),
                value: json!({"status": "running", "singlestep": false, "running": true})
            }
        );
    }

    #[test]
    fn error_reply_keeps_class_desc_and_id() {
        let line = concat!(
            r#"{"id": 9, "#,                          // echoed command id (QEMU may put it first)
            r#""error": {"class": "GenericError", "#, // error class
            r#""desc": "Job 'fleece0' in state 'running' cannot accept command verb 'dismiss'"}}"#, // text
        );
        assert_eq!(
            parse_message(line).unwrap(),
            Message::Error {
                id: Some(json!(9)),
                class: "GenericError".into(),
                desc: "Job 'fleece0' in state 'running' cannot accept command verb 'dismiss'"
                    .into()
            }
        );
    }

    #[test]
    fn event_keeps_name_data_and_timestamp() {
        let line = concat!(
            r#"{"timestamp": {"seconds": 1795693696, "microseconds": 178343}, "#, // host clock at emission
            r#""event": "JOB_STATUS_CHANGE", "#,                                  // event name
            r#""data": {"status": "concluded", "id": "fleece0"}}"#,               // payload
        );
        let Message::Event(ev) = parse_message(line).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(ev.name, "JOB_STATUS_CHANGE");
        assert_eq!(ev.data, json!({"status": "concluded", "id": "fleece0"}));
        assert_eq!(
            ev.timestamp,
            Timestamp {
                seconds: 1795693696,
                microseconds: 178343
            }
        );
        let earlier = Timestamp {
            seconds: 1795693696,
            microseconds: 171682,
        };
        assert_eq!(
            ev.timestamp.duration_since(&earlier),
            Some(Duration::from_micros(178343 - 171682))
        );
    }

    #[test]
    fn event_without_data_gets_empty_object() {
        let line =
            r#"{"timestamp": {"seconds": 1795693696, "microseconds": 179387}, "event": "STOP"}"#;
        let Message::Event(ev) = parse_message(line).unwrap() else {
            panic!("not an event")
        };
        assert_eq!(ev.data, json!({}));
    }

    #[test]
    fn unknown_clock_gives_no_system_time() {
        let t = Timestamp {
            seconds: -1,
            microseconds: -1,
        };
        assert_eq!(t.to_system_time(), None);
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        for bad in [
            "",
            "{",
            "[]",
            "42",
            r#"{"foo": 1}"#,
            r#"{"error": "boom"}"#,
            r#"{"error": {"class": 1, "desc": "x"}}"#,
            r#"{"event": 5, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
            r#"{"event": "STOP"}"#,
            r#"{"event": "STOP", "timestamp": {"seconds": "x"}}"#,
            "\u{fffd}\u{fffd}",
        ] {
            let e = parse_message(bad).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Malformed, "{bad}: {e}");
        }
    }

    #[test]
    fn long_garbage_is_excerpted_in_the_message() {
        let long = "x".repeat(10_000);
        let e = parse_message(&long).unwrap_err();
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
    }
}
