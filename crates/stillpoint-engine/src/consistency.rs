//! Consistency levels, indications, and the pure decisions about them.
//!
//! `assess` turns the facts a preflight gathered about a VM into the level it can reach and
//! the reason for every level it cannot. `plan_quiesce` combines that with the requested level
//! and the `--on-quiesce-failure` policy into what the backup will do. Both are pure functions:
//! they are unit-tested here without a VM, and the I/O that gathers the facts lives in
//! `preflight`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
pub use stillpoint_platform::RunState;

/// How consistent a backup is, from weakest to strongest (the order is meaningful).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Disks as after a power cut at one instant.
    Crash,
    /// Every filesystem was flushed and frozen by the guest agent at the capture instant.
    Filesystem,
    /// A recipe also locked and flushed the application at that instant.
    Application,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Crash, Level::Filesystem, Level::Application];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Crash => "crash",
            Level::Filesystem => "filesystem",
            Level::Application => "application",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "crash" => Ok(Level::Crash),
            "filesystem" => Ok(Level::Filesystem),
            "application" => Ok(Level::Application),
            other => Err(format!(
                "unknown consistency level `{other}` (expected crash, filesystem or application)"
            )),
        }
    }
}

/// Why a backup has the level it has, named after KubeVirt's snapshot indications so that
/// users of both read them the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Indication {
    /// The guest agent was used to quiesce the filesystems.
    GuestAgent,
    /// No guest agent could be reached: crash-consistent only.
    NoGuestAgent,
    /// The VM was paused: a paused guest cannot be frozen, crash-consistent only.
    Paused,
    /// The guest agent refused or failed to freeze.
    QuiesceFailed,
    /// The freeze did not complete (or was not held) in time.
    QuiesceTimeout,
    /// Only some of the VM's disks were captured.
    PartialCapture,
    /// An application step of the recipe failed before the capture.
    ApplicationStepFailed,
}

/// The quiesce policy when the requested level cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnQuiesceFailure {
    /// Complete the backup at the level actually reached (exit code 3).
    #[default]
    Degrade,
    /// Abort before the capture (exit code 1); nothing is published.
    Fail,
}

impl FromStr for OnQuiesceFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "degrade" => Ok(Self::Degrade),
            "fail" => Ok(Self::Fail),
            other => Err(format!(
                "unknown policy `{other}` (expected degrade or fail)"
            )),
        }
    }
}

/// What the preflight learned about the guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum AgentFacts {
    /// The VM has no agent channel at all.
    NoChannel,
    /// There is a channel, but nothing answered (agent not running, or busy with another client).
    Unreachable { reason: String },
    /// The agent answered.
    Reachable(Box<ReachableAgent>),
}

/// Who holds the freeze of a guest found frozen at the preflight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "by")]
pub enum FrozenBy {
    /// A stillpoint freeze lease covers it (`stillpoint freeze`, or a freeze of another
    /// stillpoint process).
    Stillpoint {
        /// The process that froze it.
        holder_pid: u32,
        /// The guardian that thaws it, if one was started.
        guardian_pid: Option<u32>,
        /// How long it has been frozen, by the lease, at the preflight.
        frozen_for_ms: u64,
        /// In how long its guardian thaws it on its own, at the preflight (`None`: never, it
        /// waits for `stillpoint unfreeze`).
        thaws_in_ms: Option<u64>,
    },
    /// No stillpoint lease covers the VM: someone else froze it (another tool, a user of the
    /// agent), or a stillpoint freeze whose lease was removed.
    NotStillpoint,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReachableAgent {
    pub version: String,
    pub freeze_enabled: bool,
    pub freeze_list_enabled: bool,
    pub thaw_enabled: bool,
    pub exec_enabled: bool,
    /// The guest is frozen already (by someone else, or a freeze that was never thawed).
    pub already_frozen: bool,
    /// Who froze it, when the preflight could look at stillpoint's freeze leases (`None`: it
    /// could not, or the guest is not frozen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_by: Option<FrozenBy>,
    pub os: Option<GuestOs>,
    /// Filesystems the agent reports and a freeze covers.
    pub covered_filesystems: Vec<GuestFilesystem>,
    /// Mounted filesystems a freeze cannot cover (network, FUSE…), when they could be listed.
    pub uncovered_filesystems: Option<Vec<GuestFilesystem>>,
    /// SELinux mode in the guest, when it could be read.
    pub selinux: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestOs {
    /// `linux`, `mswindows`, … as the agent reports it.
    pub id: String,
    pub pretty_name: Option<String>,
    pub kernel_release: Option<String>,
}

impl GuestOs {
    pub fn is_windows(&self) -> bool {
        self.id.eq_ignore_ascii_case("mswindows")
            || self.id.to_ascii_lowercase().contains("windows")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestFilesystem {
    pub mountpoint: String,
    pub fs_type: String,
    /// Device or source (e.g. `vda`, `server:/export`).
    pub source: String,
}

/// Everything the consistency decision needs to know about one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preflight {
    pub run_state: RunState,
    pub agent: AgentFacts,
    /// A recipe was given (application level needs one).
    pub recipe: Option<RecipeFacts>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeFacts {
    pub name: String,
    /// The recipe runs commands in the guest (needs guest-exec).
    pub needs_guest_exec: bool,
}

/// The verdict for one level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelVerdict {
    pub level: Level,
    pub achievable: bool,
    /// Why not (empty when achievable).
    pub reasons: Vec<String>,
}

/// What `check` prints and what a backup plans with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    /// The strongest level reachable now.
    pub achievable: Level,
    pub levels: Vec<LevelVerdict>,
    /// The indication a backup taken now would carry for the quiesce.
    pub indication: Indication,
    /// Things a user should know that do not change the level (Windows VSS limits, skipped mounts…).
    pub notes: Vec<String>,
}

impl Assessment {
    pub fn verdict(&self, level: Level) -> &LevelVerdict {
        self.levels
            .iter()
            .find(|verdict| verdict.level == level)
            .expect("assess() lists every level")
    }
}

/// Decides which levels the facts allow and why not the others.
pub fn assess(facts: &Preflight) -> Assessment {
    let mut filesystem_reasons = Vec::new();
    let mut notes = Vec::new();
    let mut indication = Indication::GuestAgent;

    match facts.run_state {
        RunState::Running => {}
        RunState::Paused => {
            filesystem_reasons
                .push("the VM is paused: a paused guest cannot freeze its filesystems".to_string());
            indication = Indication::Paused;
        }
        RunState::NotRunning => {
            filesystem_reasons
                .push("the VM is not running: there is no guest to freeze".to_string());
            indication = Indication::NoGuestAgent;
        }
    }

    match &facts.agent {
        AgentFacts::NoChannel => {
            filesystem_reasons.push(
                "the VM has no guest agent channel: nothing can freeze its filesystems".into(),
            );
            if indication == Indication::GuestAgent {
                indication = Indication::NoGuestAgent;
            }
        }
        AgentFacts::Unreachable { reason } => {
            filesystem_reasons.push(format!("the guest agent does not answer ({reason})"));
            if indication == Indication::GuestAgent {
                indication = Indication::NoGuestAgent;
            }
        }
        AgentFacts::Reachable(agent) => {
            if agent.already_frozen {
                // The agent disables the freeze while frozen: that is the freeze, not a policy.
                filesystem_reasons.push(frozen_guest_reason(agent.frozen_by.as_ref()));
                if indication == Indication::GuestAgent {
                    indication = Indication::QuiesceFailed;
                }
            } else if !agent.freeze_enabled {
                filesystem_reasons.push(
                    "the guest agent has guest-fsfreeze-freeze disabled (e.g. --block-rpcs or an allow-list)"
                        .into(),
                );
                if indication == Indication::GuestAgent {
                    indication = Indication::QuiesceFailed;
                }
            }
            if !agent.thaw_enabled {
                filesystem_reasons.push(
                    "the guest agent has guest-fsfreeze-thaw disabled: a freeze could not be undone".into(),
                );
                if indication == Indication::GuestAgent {
                    indication = Indication::QuiesceFailed;
                }
            }
            if agent.freeze_enabled && agent.covered_filesystems.is_empty() {
                notes.push(
                    "the guest agent reports no freezable filesystem: a freeze would cover nothing"
                        .into(),
                );
            }
            if let Some(uncovered) = &agent.uncovered_filesystems {
                for fs in uncovered {
                    notes.push(format!(
                        "{} ({} from {}) is not frozen by the agent: its data is only crash-consistent",
                        fs.mountpoint, fs.fs_type, fs.source
                    ));
                }
            }
            if let Some(os) = &agent.os
                && os.is_windows()
            {
                notes.push(
                    "Windows guest: the freeze goes through VSS, which holds writes for at most 10 s; \
                     set the VSS provider's VssOption to 5 (COPY) if another backup tool runs in the guest"
                        .into(),
                );
            }
            if agent.selinux.as_deref() == Some("enforcing") {
                notes.push(
                    "SELinux is enforcing in the guest: if freezing an extra disk fails, check the policy \
                     for qemu-ga (audit2allow)"
                        .into(),
                );
            }
        }
    }

    let mut application_reasons = filesystem_reasons.clone();
    match &facts.recipe {
        None => application_reasons.push("no recipe was given (--recipe FILE)".into()),
        Some(recipe) => {
            if recipe.needs_guest_exec {
                let exec_enabled =
                    matches!(&facts.agent, AgentFacts::Reachable(agent) if agent.exec_enabled);
                if !exec_enabled && matches!(facts.agent, AgentFacts::Reachable(_)) {
                    application_reasons.push(format!(
                        "recipe `{}` runs commands in the guest, but guest-exec is disabled in the agent",
                        recipe.name
                    ));
                }
            }
        }
    }

    let filesystem_ok = filesystem_reasons.is_empty();
    let application_ok = application_reasons.is_empty();
    let achievable = if application_ok {
        Level::Application
    } else if filesystem_ok {
        Level::Filesystem
    } else {
        Level::Crash
    };
    Assessment {
        achievable,
        levels: vec![
            LevelVerdict {
                level: Level::Crash,
                achievable: true,
                reasons: vec![],
            },
            LevelVerdict {
                level: Level::Filesystem,
                achievable: filesystem_ok,
                reasons: filesystem_reasons,
            },
            LevelVerdict {
                level: Level::Application,
                achievable: application_ok,
                reasons: application_reasons,
            },
        ],
        indication,
        notes,
    }
}

/// Why a guest found frozen cannot be frozen by a backup: it says the guest is frozen, by whom
/// (a stillpoint freeze lease, or not stillpoint) and for how long, when that is known.
pub fn frozen_guest_reason(frozen_by: Option<&FrozenBy>) -> String {
    let who = match frozen_by {
        None => "by whom is not known here".to_string(),
        Some(FrozenBy::NotStillpoint) => {
            "not by stillpoint: no stillpoint freeze lease covers this VM".to_string()
        }
        Some(FrozenBy::Stillpoint {
            holder_pid,
            guardian_pid,
            frozen_for_ms,
            thaws_in_ms,
        }) => {
            let thaw = match (thaws_in_ms, guardian_pid) {
                (Some(ms), Some(pid)) => {
                    format!("its guardian (pid {pid}) thaws it in {}", seconds(*ms))
                }
                (Some(ms), None) => format!("its deadline passes in {}", seconds(*ms)),
                (None, _) => "it stays frozen until `stillpoint unfreeze`".to_string(),
            };
            format!(
                "by a stillpoint freeze (pid {holder_pid}) {} ago; {thaw}",
                seconds(*frozen_for_ms)
            )
        }
    };
    format!(
        "the guest is frozen already ({who}): a backup cannot take a freeze of its own, and \
         thawing is left to whoever froze it"
    )
}

fn seconds(ms: u64) -> String {
    format!("{} s", (ms + 500) / 1000)
}

/// What a backup will do about quiescing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuiescePlan {
    pub requested: Level,
    /// The level the plan aims for (requested, or lower when degrading).
    pub target: Level,
    /// Freeze the guest around the capture start.
    pub freeze: bool,
    /// Run the recipe's application steps.
    pub run_recipe: bool,
    /// Indications known before anything ran.
    pub indications: Vec<Indication>,
    /// Why the target is below the requested level.
    pub degraded_because: Vec<String>,
}

/// Why a backup must not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRefused {
    pub requested: Level,
    pub reasons: Vec<String>,
}

impl fmt::Display for PlanRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} consistency cannot be reached: {}",
            self.requested,
            self.reasons.join("; ")
        )
    }
}

/// Combines the requested level, the assessment and the policy into a plan.
pub fn plan_quiesce(
    requested: Level,
    assessment: &Assessment,
    policy: OnQuiesceFailure,
) -> Result<QuiescePlan, PlanRefused> {
    let verdict = assessment.verdict(requested);
    let (target, degraded_because) = if verdict.achievable {
        (requested, Vec::new())
    } else {
        if policy == OnQuiesceFailure::Fail {
            return Err(PlanRefused {
                requested,
                reasons: verdict.reasons.clone(),
            });
        }
        (
            assessment.achievable.min(requested),
            verdict.reasons.clone(),
        )
    };
    let freeze = target >= Level::Filesystem;
    let indications = if requested == Level::Crash {
        Vec::new()
    } else {
        vec![assessment.indication]
    };
    Ok(QuiescePlan {
        requested,
        target,
        freeze,
        run_recipe: target == Level::Application,
        indications,
        degraded_because,
    })
}

/// What the policy makes of a step that fell short of the requested level at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shortfall {
    /// `--on-quiesce-failure fail`: stop; nothing is published. The message names the VM,
    /// the level and why.
    Refuse(String),
    /// `degrade`: go on at `to`, saying why.
    Degrade {
        to: Level,
        indication: Indication,
        why: String,
    },
}

/// The one rule for every step that cannot reach the requested level once the backup runs:
/// the freeze's coverage of the captured disks, a freeze that fails, the recipe's steps
/// before the capture. `fail` refuses; `degrade` goes on at `to`.
pub fn decide_shortfall(
    vm: &str,
    requested: Level,
    policy: OnQuiesceFailure,
    to: Level,
    indication: Indication,
    why: String,
) -> Shortfall {
    match policy {
        OnQuiesceFailure::Fail => Shortfall::Refuse(format!(
            "VM `{vm}`: {requested} consistency cannot be reached ({why}) and --on-quiesce-failure is fail; nothing was backed up"
        )),
        OnQuiesceFailure::Degrade => Shortfall::Degrade {
            to,
            indication,
            why,
        },
    }
}

/// The indication of a freeze that failed, from the error's typed cause: a guest agent call
/// that timed out anywhere in its chain is `QuiesceTimeout`, anything else `QuiesceFailed`.
pub fn quiesce_failure_indication(error: &(dyn std::error::Error + 'static)) -> Indication {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(agent) = current.downcast_ref::<stillpoint_qga::Error>()
            && matches!(agent.kind(), stillpoint_qga::ErrorKind::Timeout { .. })
        {
            return Indication::QuiesceTimeout;
        }
        cause = current.source();
    }
    Indication::QuiesceFailed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reachable() -> ReachableAgent {
        ReachableAgent {
            version: "7.2.22".into(),
            freeze_enabled: true,
            freeze_list_enabled: true,
            thaw_enabled: true,
            exec_enabled: true,
            already_frozen: false,
            frozen_by: None,
            os: Some(GuestOs {
                id: "linux".into(),
                pretty_name: None,
                kernel_release: None,
            }),
            covered_filesystems: vec![GuestFilesystem {
                mountpoint: "/data".into(),
                fs_type: "ext4".into(),
                source: "vda".into(),
            }],
            uncovered_filesystems: Some(vec![]),
            selinux: None,
        }
    }

    fn facts(run_state: RunState, agent: AgentFacts, recipe: bool) -> Preflight {
        Preflight {
            run_state,
            agent,
            recipe: recipe.then(|| RecipeFacts {
                name: "db".into(),
                needs_guest_exec: true,
            }),
        }
    }

    fn healthy() -> AgentFacts {
        AgentFacts::Reachable(Box::new(reachable()))
    }

    #[test]
    fn healthy_agent_without_recipe_reaches_filesystem() {
        let assessment = assess(&facts(RunState::Running, healthy(), false));
        assert_eq!(assessment.achievable, Level::Filesystem);
        assert_eq!(assessment.indication, Indication::GuestAgent);
        let application = assessment.verdict(Level::Application);
        assert!(!application.achievable);
        assert!(application.reasons[0].contains("no recipe"));
    }

    #[test]
    fn healthy_agent_with_recipe_reaches_application() {
        let assessment = assess(&facts(RunState::Running, healthy(), true));
        assert_eq!(assessment.achievable, Level::Application);
        assert!(assessment.levels.iter().all(|verdict| verdict.achievable));
    }

    #[test]
    fn no_channel_is_crash_with_no_guest_agent() {
        let assessment = assess(&facts(RunState::Running, AgentFacts::NoChannel, true));
        assert_eq!(assessment.achievable, Level::Crash);
        assert_eq!(assessment.indication, Indication::NoGuestAgent);
        assert!(
            assessment.verdict(Level::Filesystem).reasons[0].contains("no guest agent channel")
        );
    }

    #[test]
    fn paused_vm_is_crash_with_paused_indication() {
        let assessment = assess(&facts(RunState::Paused, healthy(), false));
        assert_eq!(assessment.achievable, Level::Crash);
        assert_eq!(assessment.indication, Indication::Paused);
    }

    #[test]
    fn disabled_freeze_is_reported() {
        let mut agent = reachable();
        agent.freeze_enabled = false;
        let assessment = assess(&facts(
            RunState::Running,
            AgentFacts::Reachable(Box::new(agent)),
            false,
        ));
        assert_eq!(assessment.achievable, Level::Crash);
        assert_eq!(assessment.indication, Indication::QuiesceFailed);
        assert!(assessment.verdict(Level::Filesystem).reasons[0].contains("disabled"));
    }

    #[test]
    fn recipe_needing_exec_with_exec_disabled_stops_at_filesystem() {
        let mut agent = reachable();
        agent.exec_enabled = false;
        let assessment = assess(&facts(
            RunState::Running,
            AgentFacts::Reachable(Box::new(agent)),
            true,
        ));
        assert_eq!(assessment.achievable, Level::Filesystem);
        assert!(
            assessment.verdict(Level::Application).reasons[0].contains("guest-exec is disabled")
        );
    }

    #[test]
    fn uncovered_mounts_and_windows_become_notes() {
        let mut agent = reachable();
        agent.os = Some(GuestOs {
            id: "mswindows".into(),
            pretty_name: None,
            kernel_release: None,
        });
        agent.uncovered_filesystems = Some(vec![GuestFilesystem {
            mountpoint: "/mnt/share".into(),
            fs_type: "nfs4".into(),
            source: "nas:/export".into(),
        }]);
        let assessment = assess(&facts(
            RunState::Running,
            AgentFacts::Reachable(Box::new(agent)),
            false,
        ));
        assert_eq!(assessment.achievable, Level::Filesystem);
        assert!(
            assessment
                .notes
                .iter()
                .any(|note| note.contains("/mnt/share"))
        );
        assert!(assessment.notes.iter().any(|note| note.contains("VSS")));
    }

    #[test]
    fn degrade_plans_the_reachable_level() {
        let assessment = assess(&facts(RunState::Paused, healthy(), false));
        let plan = plan_quiesce(Level::Filesystem, &assessment, OnQuiesceFailure::Degrade).unwrap();
        assert_eq!(plan.target, Level::Crash);
        assert!(!plan.freeze);
        assert_eq!(plan.indications, vec![Indication::Paused]);
        assert!(!plan.degraded_because.is_empty());
    }

    #[test]
    fn fail_policy_refuses_before_capture() {
        let assessment = assess(&facts(RunState::Running, AgentFacts::NoChannel, false));
        let refused =
            plan_quiesce(Level::Filesystem, &assessment, OnQuiesceFailure::Fail).unwrap_err();
        assert_eq!(refused.requested, Level::Filesystem);
        assert!(refused.to_string().contains("no guest agent channel"));
    }

    #[test]
    fn application_without_recipe_degrades_to_filesystem_not_crash() {
        let assessment = assess(&facts(RunState::Running, healthy(), false));
        let plan =
            plan_quiesce(Level::Application, &assessment, OnQuiesceFailure::Degrade).unwrap();
        assert_eq!(plan.target, Level::Filesystem);
        assert!(plan.freeze);
        assert!(!plan.run_recipe);
    }

    #[test]
    fn crash_request_never_freezes_and_carries_no_quiesce_indication() {
        let assessment = assess(&facts(RunState::Running, healthy(), true));
        let plan = plan_quiesce(Level::Crash, &assessment, OnQuiesceFailure::Fail).unwrap();
        assert_eq!(plan.target, Level::Crash);
        assert!(!plan.freeze);
        assert!(plan.indications.is_empty());
    }

    #[test]
    fn level_order_and_parsing() {
        assert!(Level::Crash < Level::Filesystem && Level::Filesystem < Level::Application);
        assert_eq!("filesystem".parse::<Level>().unwrap(), Level::Filesystem);
        assert!(
            "fs".parse::<Level>()
                .unwrap_err()
                .contains("unknown consistency level")
        );
    }

    #[test]
    fn a_shortfall_is_refused_under_fail_and_degraded_under_degrade() {
        let refused = decide_shortfall(
            "web",
            Level::Filesystem,
            OnQuiesceFailure::Fail,
            Level::Crash,
            Indication::QuiesceFailed,
            "the freeze failed".into(),
        );
        assert_eq!(
            refused,
            Shortfall::Refuse(
                "VM `web`: filesystem consistency cannot be reached (the freeze failed) and \
                 --on-quiesce-failure is fail; nothing was backed up"
                    .into()
            )
        );
        let degraded = decide_shortfall(
            "web",
            Level::Application,
            OnQuiesceFailure::Degrade,
            Level::Filesystem,
            Indication::ApplicationStepFailed,
            "a check failed".into(),
        );
        assert_eq!(
            degraded,
            Shortfall::Degrade {
                to: Level::Filesystem,
                indication: Indication::ApplicationStepFailed,
                why: "a check failed".into()
            }
        );
    }

    #[test]
    fn a_freeze_failure_is_a_timeout_only_when_an_agent_call_timed_out_in_its_chain() {
        use crate::error::{EngineError, EngineErrorKind};
        let timed_out = stillpoint_qga::Error::new(stillpoint_qga::ErrorKind::Timeout {
            after: std::time::Duration::from_secs(5),
        });
        // Wrapped once more, and worded without "did not complete within": the kind decides.
        let error = EngineError::new(EngineErrorKind::Agent, "the freeze failed").with_source(
            EngineError::new(EngineErrorKind::Agent, "VM `web`: no answer").with_source(timed_out),
        );
        assert_eq!(
            quiesce_failure_indication(&error),
            Indication::QuiesceTimeout
        );
        let refused = EngineError::new(
            EngineErrorKind::Agent,
            "the freeze did not complete within 5 s (text alone is not a timeout)",
        )
        .with_source(stillpoint_qga::Error::new(
            stillpoint_qga::ErrorKind::Closed,
        ));
        assert_eq!(
            quiesce_failure_indication(&refused),
            Indication::QuiesceFailed
        );
    }

    #[test]
    fn a_frozen_guest_is_reported_as_frozen_by_whom_and_since_when_not_as_blocked() {
        let mut agent = reachable();
        agent.already_frozen = true;
        // As qemu-ga reports a frozen guest: the freeze itself disabled.
        agent.freeze_enabled = false;
        agent.frozen_by = Some(FrozenBy::Stillpoint {
            holder_pid: 4242,
            guardian_pid: Some(4243),
            frozen_for_ms: 12_300,
            thaws_in_ms: Some(287_700),
        });
        let facts = Preflight {
            run_state: RunState::Running,
            agent: AgentFacts::Reachable(Box::new(agent.clone())),
            recipe: None,
        };
        let assessment = assess(&facts);
        let reasons = &assessment.verdict(Level::Filesystem).reasons;
        assert_eq!(
            reasons,
            &vec![
                "the guest is frozen already (by a stillpoint freeze (pid 4242) 12 s ago; its \
                 guardian (pid 4243) thaws it in 288 s): a backup cannot take a freeze of its \
                 own, and thawing is left to whoever froze it"
                    .to_string()
            ]
        );
        assert!(
            !reasons.iter().any(|r| r.contains("block-rpcs")),
            "{reasons:?}"
        );
        assert_eq!(assessment.achievable, Level::Crash);
        assert_eq!(assessment.indication, Indication::QuiesceFailed);

        assert!(frozen_guest_reason(Some(&FrozenBy::NotStillpoint)).contains("not by stillpoint"));
        assert!(frozen_guest_reason(None).contains("by whom is not known"));
        let forever = FrozenBy::Stillpoint {
            holder_pid: 1,
            guardian_pid: None,
            frozen_for_ms: 1000,
            thaws_in_ms: None,
        };
        assert!(frozen_guest_reason(Some(&forever)).contains("until `stillpoint unfreeze`"));

        // Not frozen, freeze disabled by policy: that reason stays.
        agent.already_frozen = false;
        agent.frozen_by = None;
        let facts = Preflight {
            run_state: RunState::Running,
            agent: AgentFacts::Reachable(Box::new(agent)),
            recipe: None,
        };
        assert!(assess(&facts).verdict(Level::Filesystem).reasons[0].contains("--block-rpcs"));
    }
}
