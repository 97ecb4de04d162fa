//! The guest agent's wire format, as pure functions and a push decoder (no I/O).
//!
//! Requests are one JSON object per line: `{"execute": NAME, "arguments": {…}}\n`.
//! Replies are one JSON object per line: `{"return": VALUE}\n` or
//! `{"error": {"class": CLASS, "desc": TEXT}}\n`. The reply to `guest-sync-delimited` is the one
//! exception: it is preceded by a single 0xFF byte, which can never occur in the agent's UTF-8
//! JSON, so a reader that has lost track (after a timeout, a malformed reply, a reconnect) can
//! throw away everything up to that byte and be sure the next line is the sync reply.
//! The same byte sent *to* the agent makes it drop any partial request it was parsing.
//!
//! [`ReplyDecoder`] is fed whatever the stream yields, in chunks of any size, and hands out one
//! [`Reply`] per complete line. Its two modes:
//! - *lines*: buffer bytes, cut at `\n`, parse; a line longer than the bound is rejected and
//!   the rest of it is skipped without buffering it;
//! - *awaiting the sentinel* (after [`ReplyDecoder::expect_sentinel`]): drop every byte up to
//!   and including the next 0xFF, then go back to lines.

use serde::Serialize;
use serde_json::Value;

use crate::error::{DisabledReason, Error, ErrorKind, Result};

/// The byte that precedes the reply to `guest-sync-delimited`, and that a client sends first
/// to make the agent drop a partial request.
pub const SENTINEL: u8 = 0xFF;

/// Default bound on one reply line. The largest reply we ask for is `guest-exec-status` with
/// both output streams at the agent's 16 MiB capture limit (`GUEST_EXEC_MAX_OUTPUT`), base64
/// encoded: 2 × 16 MiB × 4/3 ≈ 43 MiB plus a few fields. 64 MiB leaves room without letting
/// a broken peer make us buffer without end.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024 * 1024;

/// One parsed reply line.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"return": VALUE}`: the command succeeded.
    Return(Value),
    /// `{"error": {"class", "desc"}}`: the command failed.
    Error(AgentErrorReply),
}

/// The `error` member of a failed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentErrorReply {
    /// QAPI error class: `GenericError`, `CommandNotFound`, …
    pub class: String,
    /// Human-readable description.
    pub desc: String,
}

impl AgentErrorReply {
    /// Classifies the agent's refusal of a disabled command apart from other errors.
    ///
    /// qemu-ga's dispatcher says `Command NAME has been disabled` followed by `: REASON` when it
    /// has one (QEMU ≥ 2.12; older agents: `The command NAME has been disabled for this
    /// instance`). A frozen guest gives the reason "the agent is in frozen state"; commands
    /// turned off with `--block-rpcs`/`--allow-rpcs` come with no reason, or a policy one.
    pub fn kind(&self) -> ErrorKind {
        let desc = self.desc.as_str();
        let disabled = (desc.starts_with("Command ") || desc.starts_with("The command "))
            && desc.contains(" has been disabled");
        if !disabled {
            return ErrorKind::Agent {
                class: self.class.clone(),
                desc: self.desc.clone(),
            };
        }
        let detail = desc
            .split_once(" has been disabled")
            .map(|(_, rest)| rest.trim_start_matches(':').trim())
            .filter(|rest| !rest.is_empty() && *rest != "for this instance");
        let reason = match detail {
            Some(d) if d.contains("frozen") => DisabledReason::Frozen,
            other => DisabledReason::Policy {
                detail: other.map(str::to_owned),
            },
        };
        ErrorKind::CommandDisabled { reason }
    }
}

#[derive(Serialize)]
struct Request<'a> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a Value>,
}

/// Encodes one command as a request line (with its `\n`).
pub fn encode_command(name: &str, arguments: Option<&Value>) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Request {
        execute: name,
        arguments,
    })
    .expect("a struct of a str and a Value always serialises");
    line.push(b'\n');
    line
}

/// Encodes the resynchronisation: the 0xFF that makes the agent drop any partial request, then
/// `guest-sync-delimited {id}`, in one buffer so that it goes out in one write.
pub fn encode_sync(id: i64) -> Vec<u8> {
    let arguments = serde_json::json!({ "id": id });
    let mut bytes = vec![SENTINEL];
    bytes.extend(encode_command("guest-sync-delimited", Some(&arguments)));
    bytes
}

/// Parses one reply line (without its `\n`; surrounding ASCII whitespace is allowed).
pub fn parse_reply(line: &[u8]) -> Result<Reply> {
    let trimmed = line.trim_ascii();
    let value: Value = serde_json::from_slice(trimmed)
        .map_err(|e| Error::malformed("the reply is not valid JSON", trimmed).with_source(e))?;
    let Value::Object(mut object) = value else {
        return Err(Error::malformed("the reply is not a JSON object", trimmed));
    };
    if let Some(value) = object.remove("return") {
        return Ok(Reply::Return(value));
    }
    if let Some(error) = object.remove("error") {
        let text = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_owned);
        return match (text("class"), text("desc")) {
            (Some(class), Some(desc)) => Ok(Reply::Error(AgentErrorReply { class, desc })),
            _ => Err(Error::malformed(
                "the \"error\" member lacks a string \"class\" or \"desc\"",
                trimmed,
            )),
        };
    }
    Err(Error::malformed(
        "the reply has neither \"return\" nor \"error\"",
        trimmed,
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Cutting lines at `\n`.
    Lines,
    /// Dropping bytes up to and including the next 0xFF.
    AwaitSentinel,
    /// Dropping the rest of an over-long line, up to and including its `\n`.
    SkipLine,
}

/// Push decoder from stream bytes to replies. Pure: it never reads or waits.
#[derive(Debug)]
pub struct ReplyDecoder {
    buffer: Vec<u8>,
    /// `buffer[..scanned]` is known to hold no `\n`, so a long line is scanned only once.
    scanned: usize,
    mode: Mode,
    max_line: usize,
}

impl Default for ReplyDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE)
    }
}

impl ReplyDecoder {
    /// A decoder in line mode that rejects lines longer than `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Self {
            buffer: Vec::new(),
            scanned: 0,
            mode: Mode::Lines,
            max_line,
        }
    }

    /// Drops everything buffered and waits for the 0xFF that precedes a sync reply. Call it
    /// right before sending `guest-sync-delimited`.
    pub fn expect_sentinel(&mut self) {
        let pending = std::mem::take(&mut self.buffer);
        self.scanned = 0;
        self.mode = Mode::AwaitSentinel;
        self.feed(&pending);
    }

    /// True while bytes are being dropped until the next 0xFF.
    pub fn awaiting_sentinel(&self) -> bool {
        self.mode == Mode::AwaitSentinel
    }

    /// Bytes buffered and not yet handed out as replies.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Takes bytes from the stream. Bytes that are being skipped are never buffered.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        loop {
            let until = match self.mode {
                Mode::Lines => {
                    self.buffer.extend_from_slice(bytes);
                    return;
                }
                Mode::AwaitSentinel => SENTINEL,
                Mode::SkipLine => b'\n',
            };
            match bytes.iter().position(|b| *b == until) {
                Some(at) => {
                    bytes = &bytes[at + 1..];
                    self.mode = Mode::Lines;
                }
                None => return,
            }
        }
    }

    /// The next complete reply, `Ok(None)` if more bytes are needed, or an error for a line
    /// that is not a valid reply (that line is consumed; decoding can go on after it).
    pub fn next_reply(&mut self) -> Result<Option<Reply>> {
        while self.mode == Mode::Lines {
            let Some(offset) = self.buffer[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buffer.len();
                if self.buffer.len() > self.max_line {
                    let err = self.oversized(&self.buffer);
                    self.buffer.clear();
                    self.scanned = 0;
                    self.mode = Mode::SkipLine;
                    return Err(err);
                }
                return Ok(None);
            };
            let end = self.scanned + offset;
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            self.scanned = 0;
            let line = &line[..end];
            if line.len() > self.max_line {
                return Err(self.oversized(line));
            }
            if line.trim_ascii().is_empty() {
                continue;
            }
            return parse_reply(line).map(Some);
        }
        Ok(None)
    }

    fn oversized(&self, line: &[u8]) -> Error {
        Error::malformed(
            format!(
                "the reply line is longer than the {} byte limit",
                self.max_line
            ),
            line,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode_all(decoder: &mut ReplyDecoder) -> Vec<Result<Reply>> {
        let mut out = Vec::new();
        loop {
            match decoder.next_reply() {
                Ok(None) => return out,
                other => out.push(other.map(|r| r.expect("Some"))),
            }
        }
    }

    fn problem(err: &Error) -> (&str, &str) {
        match err.kind() {
            ErrorKind::MalformedReply { problem, excerpt } => (problem, excerpt),
            other => panic!("expected MalformedReply, got {other:?}"),
        }
    }

    #[test]
    fn encodes_a_command_line() {
        let args = json!({"mountpoints": ["/data"]});
        let bytes = encode_command("guest-fsfreeze-freeze-list", Some(&args));
        assert_eq!(
            bytes,
            b"{\"execute\":\"guest-fsfreeze-freeze-list\",\"arguments\":{\"mountpoints\":[\"/data\"]}}\n"
        );
        assert_eq!(
            encode_command("guest-ping", None),
            b"{\"execute\":\"guest-ping\"}\n"
        );
    }

    #[test]
    fn encodes_sync_with_leading_sentinel() {
        let expected: &[u8] = &[
            0xFF, // sentinel: the agent drops any partial request it was parsing
            b'{', // then the request line
        ];
        let bytes = encode_sync(42);
        assert_eq!(&bytes[..2], expected);
        assert_eq!(
            &bytes[1..],
            b"{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":42}}\n"
        );
    }

    #[test]
    fn parses_return_reply() {
        let line: &[u8] = concat!(
            "{",
            "\"return\": 2", // guest-fsfreeze-freeze: number of filesystems frozen
            "}",
        )
        .as_bytes();
        assert_eq!(parse_reply(line).unwrap(), Reply::Return(json!(2)));
    }

    #[test]
    fn parses_empty_object_return_of_ping() {
        let line: &[u8] = b"{\"return\": {}}"; // guest-ping answers an empty object
        assert_eq!(parse_reply(line).unwrap(), Reply::Return(json!({})));
    }

    #[test]
    fn parses_error_reply_and_classifies_frozen_refusal() {
        let line: &[u8] = concat!(
            "{\"error\": {",
            "\"class\": \"CommandNotFound\", ", // class qemu-ga uses for disabled commands
            "\"desc\": \"Command guest-exec has been disabled: the agent is in frozen state\"", // reason after ": "
            "}}",
        )
        .as_bytes();
        let Reply::Error(err) = parse_reply(line).unwrap() else {
            panic!("expected an error reply");
        };
        assert_eq!(err.class, "CommandNotFound");
        assert_eq!(
            err.kind(),
            ErrorKind::CommandDisabled {
                reason: DisabledReason::Frozen
            }
        );
    }

    #[test]
    fn classifies_policy_refusal_with_and_without_reason() {
        let blocked = AgentErrorReply {
            class: "CommandNotFound".into(),
            desc: "Command guest-fsfreeze-freeze has been disabled".into(), // --block-rpcs, no reason
        };
        assert_eq!(
            blocked.kind(),
            ErrorKind::CommandDisabled {
                reason: DisabledReason::Policy { detail: None }
            }
        );
        let old = AgentErrorReply {
            class: "GenericError".into(),
            desc: "The command guest-exec has been disabled for this instance".into(), // QEMU < 2.12
        };
        assert_eq!(
            old.kind(),
            ErrorKind::CommandDisabled {
                reason: DisabledReason::Policy { detail: None }
            }
        );
        let with_reason = AgentErrorReply {
            class: "CommandNotFound".into(),
            desc: "Command guest-exec has been disabled: it has been blocked".into(),
        };
        assert_eq!(
            with_reason.kind(),
            ErrorKind::CommandDisabled {
                reason: DisabledReason::Policy {
                    detail: Some("it has been blocked".into())
                }
            }
        );
    }

    #[test]
    fn other_agent_errors_keep_class_and_desc() {
        let e = AgentErrorReply {
            class: "GenericError".into(),
            desc: "failed to open /nope: No such file or directory".into(),
        };
        assert_eq!(
            e.kind(),
            ErrorKind::Agent {
                class: "GenericError".into(),
                desc: "failed to open /nope: No such file or directory".into()
            }
        );
    }

    #[test]
    fn rejects_malformed_json_with_excerpt() {
        let err = parse_reply(b"{\"return\": 1").unwrap_err(); // missing closing brace
        let (problem, excerpt) = problem(&err);
        assert_eq!(problem, "the reply is not valid JSON");
        assert_eq!(excerpt, "{\\\"return\\\": 1");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn rejects_non_objects_and_objects_without_return_or_error() {
        let err = parse_reply(b"[1, 2]").unwrap_err(); // an array, not an object
        assert_eq!(problem(&err).0, "the reply is not a JSON object");
        let err = parse_reply(b"{\"event\": \"X\"}").unwrap_err(); // neither member
        assert_eq!(
            problem(&err).0,
            "the reply has neither \"return\" nor \"error\""
        );
        let err = parse_reply(b"{\"error\": {\"class\": 1}}").unwrap_err(); // class not a string
        assert!(problem(&err).0.contains("lacks a string"));
    }

    #[test]
    fn frames_lines_split_across_feeds() {
        let mut d = ReplyDecoder::default();
        d.feed(b"{\"ret");
        assert!(d.next_reply().unwrap().is_none());
        d.feed(b"urn\": 1}\n{\"return\"");
        assert_eq!(d.next_reply().unwrap(), Some(Reply::Return(json!(1))));
        assert!(d.next_reply().unwrap().is_none());
        d.feed(b": 2}\r\n\n"); // CRLF and an empty line are tolerated
        assert_eq!(d.next_reply().unwrap(), Some(Reply::Return(json!(2))));
        assert!(d.next_reply().unwrap().is_none());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn sentinel_mode_discards_everything_up_to_and_including_0xff() {
        let mut d = ReplyDecoder::default();
        d.feed(b"{\"return\": \"stale, already buffered\"}\n");
        d.expect_sentinel(); // buffered bytes are dropped too
        let stream: &[u8] = &[
            b'g', b'a', b'r', b'b', 0x00, b'\n', // garbage, including a NUL and a newline
            b'{', b'"', // a partial stale reply
            0xFF, // sentinel
            b'{', b'"', b'r', b'e', b't', b'u', b'r', b'n', b'"', b':', b'7', b'}',
            b'\n', // {"return":7}: the sync reply
        ];
        d.feed(stream);
        assert!(!d.awaiting_sentinel());
        assert_eq!(
            decode_all(&mut d).pop().unwrap().unwrap(),
            Reply::Return(json!(7))
        );
    }

    #[test]
    fn sentinel_mode_survives_chunk_boundaries() {
        let mut d = ReplyDecoder::default();
        d.expect_sentinel();
        d.feed(b"junk");
        assert!(d.awaiting_sentinel());
        assert_eq!(d.buffered(), 0); // skipped bytes are never buffered
        d.feed(&[0xFF]);
        d.feed(b"{\"return\": 9}");
        assert!(d.next_reply().unwrap().is_none());
        d.feed(b"\n");
        assert_eq!(d.next_reply().unwrap(), Some(Reply::Return(json!(9))));
    }

    #[test]
    fn oversized_line_is_rejected_then_skipped() {
        let mut d = ReplyDecoder::new(16);
        d.feed(b"{\"return\": \"0123456789abcdef");
        let err = d.next_reply().unwrap_err();
        assert!(problem(&err).0.contains("16 byte limit"));
        assert_eq!(d.buffered(), 0);
        d.feed(b"more of the same line\n{\"return\": 3}\n");
        assert_eq!(d.next_reply().unwrap(), Some(Reply::Return(json!(3))));
    }

    #[test]
    fn oversized_complete_line_is_rejected_and_the_next_one_decodes() {
        let mut d = ReplyDecoder::new(16);
        d.feed(b"{\"return\": \"0123456789abcdef\"}\n{\"return\": 4}\n");
        assert!(d.next_reply().is_err());
        assert_eq!(d.next_reply().unwrap(), Some(Reply::Return(json!(4))));
    }

    #[test]
    fn malformed_line_is_consumed_and_decoding_continues() {
        let mut d = ReplyDecoder::default();
        d.feed(b"not json\n{\"return\": 5}\n");
        let all = decode_all(&mut d);
        assert!(all[0].is_err());
        assert_eq!(all[1].as_ref().unwrap(), &Reply::Return(json!(5)));
    }

    /// What a decoder made of a stream: replies, and errors reduced to their problem (an
    /// excerpt of an over-long line depends on how much of it had arrived).
    fn outcome(
        max_line: usize,
        sentinel_first: bool,
        stream: &[u8],
        cuts: &[usize],
    ) -> Vec<Result<Reply, String>> {
        let mut d = ReplyDecoder::new(max_line);
        if sentinel_first {
            d.expect_sentinel();
        }
        let mut out = Vec::new();
        let mut start = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        points.sort_unstable();
        points.push(stream.len());
        for end in points {
            d.feed(&stream[start..end.max(start)]);
            start = end.max(start);
            for item in decode_all(&mut d) {
                out.push(item.map_err(|e| match e.kind() {
                    ErrorKind::MalformedReply { problem, excerpt } => {
                        assert!(excerpt.chars().count() <= 4 * crate::error::EXCERPT_LEN + 1);
                        problem.clone()
                    }
                    other => panic!("codec produced {other:?}"),
                }));
            }
        }
        out
    }

    fn reply_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            ".{0,20}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z-]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Random bytes never panic the decoder, and how the stream is cut into reads does
        /// not change what comes out.
        #[test]
        fn random_bytes_decode_the_same_however_they_are_split(
            stream in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::any::<u8>(),
                    proptest::strategy::Just(b'\n'),
                    proptest::strategy::Just(SENTINEL),
                    proptest::strategy::Just(b'{'),
                ],
                0..400,
            ),
            cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..12),
            max_line in 8usize..64,
            sentinel_first in proptest::prelude::any::<bool>(),
        ) {
            let whole = outcome(max_line, sentinel_first, &stream, &[]);
            let split = outcome(max_line, sentinel_first, &stream, &cuts);
            proptest::prop_assert_eq!(whole, split);
        }

        /// Valid replies behind garbage and a sentinel come out exactly, in order, however
        /// the bytes are split.
        #[test]
        fn replies_after_garbage_and_sentinel_survive_any_split(
            garbage in proptest::collection::vec(0u8..0xFF, 0..64),
            values in proptest::collection::vec(reply_value(), 1..6),
            cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..16),
        ) {
            let mut stream = garbage;
            stream.push(SENTINEL);
            for v in &values {
                stream.extend(serde_json::to_vec(&serde_json::json!({ "return": v })).unwrap());
                stream.push(b'\n');
            }
            let decoded = outcome(DEFAULT_MAX_LINE, true, &stream, &cuts);
            let expected: Vec<Result<Reply, String>> =
                values.into_iter().map(|v| Ok(Reply::Return(v))).collect();
            proptest::prop_assert_eq!(decoded, expected);
        }
    }

    #[test]
    fn sentinel_inside_line_mode_is_a_malformed_reply() {
        let mut d = ReplyDecoder::default();
        d.feed(b"\xff{\"return\": 1}\n"); // a sync reply nobody waited for
        let err = d.next_reply().unwrap_err();
        assert!(problem(&err).1.starts_with("\\xff"));
    }
}
