//! The crate's one error type.
//!
//! Rules (the same in every stillpoint library crate):
//! - Every public function returns [`Result<T>`](crate::Result), whose error is [`Error`].
//! - An [`Error`] carries a [`#[non_exhaustive]`](ErrorKind) kind that callers match on
//!   (`ErrorKind::CommandDisabled { reason: DisabledReason::Frozen }`, `ErrorKind::Timeout`…),
//!   the context that says where it happened (which agent — socket path or a label such as the
//!   VM name — and which command), and the underlying error as `source()`.
//! - Messages are sentence-style, lower-case, and never repeat their source: whoever prints the
//!   error walks the `source()` chain once (the CLI does this).
//! - Bad bytes from the agent are quoted as a short, escaped excerpt, never in full, and never
//!   cause a panic.

use std::fmt;
use std::time::Duration;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

type BoxedSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the agent refused a command it knows ("Command X has been disabled…").
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisabledReason {
    /// The guest's filesystems are frozen; the agent allows only ping, info, sync,
    /// fsfreeze-status and fsfreeze-thaw until they are thawed.
    Frozen,
    /// The agent was started with a policy that disables the command
    /// (`--block-rpcs` / `--allow-rpcs`, or the same keys in `qemu-ga.conf`).
    /// `detail` is the reason the agent gave, if any.
    Policy {
        /// The text after "has been disabled: ", when the agent gave one.
        detail: Option<String>,
    },
}

/// What went wrong; callers match on this.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading from or writing to the agent's stream failed.
    Io,
    /// The agent's socket could not be opened (missing path, refused, or no answer to connect).
    Connect,
    /// The agent did not reply to a command within its timeout. The client resynchronises
    /// before the next command, so it stays usable.
    Timeout {
        /// How long the client waited.
        after: Duration,
    },
    /// The agent did not answer `guest-sync-delimited` in time: another client holds the
    /// agent's channel (it takes one at a time), the agent is not running, or it is still
    /// busy with an earlier command (a long freeze).
    NotAnswering {
        /// How long the client waited for the sync reply.
        after: Duration,
    },
    /// The agent refused a command it knows (see [`DisabledReason`]).
    CommandDisabled {
        /// Frozen guest or agent policy.
        reason: DisabledReason,
    },
    /// The agent ran the command and reported an error.
    Agent {
        /// QAPI error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// The agent's description.
        desc: String,
    },
    /// The agent sent bytes that are not a valid reply (or not the reply the command promises).
    MalformedReply {
        /// What is wrong with it.
        problem: String,
        /// The start of the offending bytes, escaped.
        excerpt: String,
    },
    /// The agent closed the connection (or the stream ended) before a full reply arrived.
    Closed,
    /// A guest process started by [`Client::run`](crate::Client::run) did not finish in time;
    /// it was sent SIGKILL through `guest-exec kill -KILL <pid>`.
    GuestProcessTimedOut {
        /// Program that was run.
        path: String,
        /// Its PID in the guest.
        pid: i64,
        /// The time limit it exceeded.
        after: Duration,
        /// Whether the guest confirmed the process ended after the kill.
        killed: bool,
    },
}

/// An error from the guest agent client: a kind, where it happened, and its source.
#[derive(Debug, thiserror::Error)]
#[error("{}{}", AgentPrefix(.agent.as_deref()), KindMessage::new(.kind, .command.as_deref()))]
pub struct Error {
    kind: ErrorKind,
    agent: Option<String>,
    command: Option<String>,
    #[source]
    source: Option<BoxedSource>,
}

impl Error {
    /// A new error of `kind` with no context yet.
    pub fn new(kind: ErrorKind) -> Self {
        Self {
            kind,
            agent: None,
            command: None,
            source: None,
        }
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Names the agent (socket path or a caller label such as the VM name) unless already named.
    pub(crate) fn at_agent(mut self, agent: &str) -> Self {
        if self.agent.is_none() {
            self.agent = Some(agent.to_owned());
        }
        self
    }

    /// Names the command unless already named.
    pub(crate) fn in_command(mut self, command: &str) -> Self {
        if self.command.is_none() {
            self.command = Some(command.to_owned());
        }
        self
    }

    pub(crate) fn malformed(problem: impl Into<String>, bytes: &[u8]) -> Self {
        Self::new(ErrorKind::MalformedReply {
            problem: problem.into(),
            excerpt: excerpt(bytes),
        })
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The agent it happened on: its socket path, or the label the caller gave the client.
    pub fn agent(&self) -> Option<&str> {
        self.agent.as_deref()
    }

    /// The agent command it happened in (`guest-fsfreeze-freeze`, …), if any.
    pub fn command(&self) -> Option<&str> {
        self.command.as_deref()
    }

    /// True when the agent refused the command because the guest is frozen.
    pub fn is_frozen_refusal(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::CommandDisabled {
                reason: DisabledReason::Frozen
            }
        )
    }
}

/// "guest agent PATH: " when the agent is known.
struct AgentPrefix<'a>(Option<&'a str>);

impl fmt::Display for AgentPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(agent) => write!(f, "guest agent {agent}: "),
            None => Ok(()),
        }
    }
}

/// The kind's sentence, naming the command where it helps.
struct KindMessage<'a> {
    kind: &'a ErrorKind,
    command: Option<&'a str>,
}

impl<'a> KindMessage<'a> {
    fn new(kind: &'a ErrorKind, command: Option<&'a str>) -> Self {
        Self { kind, command }
    }
}

impl fmt::Display for KindMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let command = self.command.unwrap_or("the command");
        match self.kind {
            ErrorKind::Io => write!(f, "I/O failed during {command}"),
            ErrorKind::Connect => write!(f, "could not connect to the agent socket"),
            ErrorKind::Timeout { after } => {
                write!(f, "{command} got no reply within {after:?}")
            }
            ErrorKind::NotAnswering { after } => write!(
                f,
                "the agent did not answer guest-sync-delimited within {after:?}: \
                 it is busy (another client holds its channel, or an earlier command is still \
                 running) or not running"
            ),
            ErrorKind::CommandDisabled { reason } => match reason {
                DisabledReason::Frozen => write!(
                    f,
                    "{command} is disabled while the guest's filesystems are frozen"
                ),
                DisabledReason::Policy { detail: Some(d) } => write!(
                    f,
                    "{command} is disabled by the agent's configuration ({d})"
                ),
                DisabledReason::Policy { detail: None } => write!(
                    f,
                    "{command} is disabled by the agent's configuration \
                     (--block-rpcs / --allow-rpcs)"
                ),
            },
            ErrorKind::Agent { class, desc } => {
                write!(f, "{command} failed in the guest: {desc} ({class})")
            }
            ErrorKind::MalformedReply { problem, excerpt } => {
                write!(f, "malformed reply to {command}: {problem}: `{excerpt}`")
            }
            ErrorKind::Closed => write!(
                f,
                "the agent closed the connection before replying to {command}"
            ),
            ErrorKind::GuestProcessTimedOut {
                path,
                pid,
                after,
                killed,
            } => {
                write!(
                    f,
                    "guest process {pid} ({path}) did not finish within {after:?}"
                )?;
                if *killed {
                    write!(f, " and was killed")
                } else {
                    write!(f, "; killing it was not confirmed")
                }
            }
        }
    }
}

/// Longest excerpt of bad bytes quoted in an error.
pub const EXCERPT_LEN: usize = 96;

/// The first [`EXCERPT_LEN`] bytes, escaped (`\xff`, `\n`) so that any byte is printable;
/// `…` marks a cut.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    let cut = bytes.len() > EXCERPT_LEN;
    let mut text = bytes[..bytes.len().min(EXCERPT_LEN)]
        .escape_ascii()
        .to_string();
    if cut {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_escapes_and_cuts() {
        assert_eq!(excerpt(b"\xff{\"a\"\n"), "\\xff{\\\"a\\\"\\n");
        let long = vec![b'x'; EXCERPT_LEN + 10];
        let e = excerpt(&long);
        assert!(e.ends_with('…'));
        assert_eq!(e.chars().filter(|c| *c == 'x').count(), EXCERPT_LEN);
    }

    #[test]
    fn message_names_agent_and_command_and_not_the_source() {
        let io = std::io::Error::other("broken pipe");
        let err = Error::new(ErrorKind::Io)
            .with_source(io)
            .in_command("guest-ping")
            .at_agent("/run/vm1-qga.sock");
        let msg = err.to_string();
        assert_eq!(
            msg,
            "guest agent /run/vm1-qga.sock: I/O failed during guest-ping"
        );
        assert!(!msg.contains("broken pipe"));
        assert_eq!(
            std::error::Error::source(&err).map(|s| s.to_string()),
            Some("broken pipe".to_owned())
        );
    }

    #[test]
    fn first_context_wins() {
        let err = Error::new(ErrorKind::Closed)
            .in_command("guest-info")
            .in_command("guest-ping")
            .at_agent("a")
            .at_agent("b");
        assert_eq!(err.command(), Some("guest-info"));
        assert_eq!(err.agent(), Some("a"));
    }
}
