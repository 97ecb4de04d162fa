//! The recipe model: what a `kind: Recipe` document says, with the position of every part that
//! a diagnostic may need to point at. Built by [`crate::parse`], checked by [`crate::validate`],
//! turned into a runnable plan by [`crate::plan`].

use std::time::Duration;

use serde::Serialize;

use crate::command::Command;
use crate::condition::Condition;
use crate::diagnostic::Pos;
use crate::selector::LabelSelector;

/// A value and the position it was written at.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct At<T> {
    pub value: T,
    #[serde(skip)]
    pub pos: Pos,
}

impl<T> At<T> {
    pub fn new(value: T, pos: Pos) -> Self {
        At { value, pos }
    }
}

/// Which API group the document was written for. Both carry the same schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ApiVersion {
    /// `ramendr.openshift.io/v1alpha1`
    Ramen,
    /// `spp-data-protection.isf.ibm.com/v1alpha1` (IBM Storage Fusion)
    Fusion,
}

impl ApiVersion {
    pub const RAMEN: &'static str = "ramendr.openshift.io/v1alpha1";
    pub const FUSION: &'static str = "spp-data-protection.isf.ibm.com/v1alpha1";
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recipe {
    /// Where the Recipe document starts (a multi-document file has several).
    #[serde(skip)]
    pub pos: Pos,
    /// Template parameters (`${NAME}`) left unfilled, each where it was written: a run is
    /// refused while there is one ([`crate::plan::plan_workflow`]).
    pub parameters_unset: Vec<At<String>>,
    pub api_version: ApiVersion,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub app_type: Option<String>,
    pub groups: Vec<Group>,
    /// `spec.volumes`: in Ramen the PVC selector with highest precedence; here a volume group
    /// named `volumes` that a workflow may name.
    pub volumes: Option<Group>,
    pub hooks: Vec<Hook>,
    pub workflows: Vec<Workflow>,
}

impl Recipe {
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups
            .iter()
            .chain(self.volumes.iter())
            .find(|g| g.name.value == name)
    }

    pub fn hook(&self, name: &str) -> Option<&Hook> {
        self.hooks.iter().find(|h| h.name.value == name)
    }

    pub fn workflow(&self, name: &str) -> Option<&Workflow> {
        self.workflows.iter().find(|w| w.name.value == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupType {
    /// Disks: a `volume` group step is the capture of the selected disks.
    Volume,
    /// Kubernetes objects (Velero backups in Ramen/Fusion). A VM on qemu or libvirt has none.
    Resource,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Group {
    pub name: At<String>,
    #[serde(skip)]
    pub pos: Pos,
    pub group_type: At<GroupType>,
    /// Disk names (or regular expressions, as in Ramen) the group selects.
    pub name_selector: Vec<At<String>>,
    pub label_selector: Option<At<LabelSelector>>,
    pub essential: Option<bool>,
    /// Fields that only mean something to Kubernetes (namespaces, resource types …), by name.
    pub kubernetes_fields: Vec<At<String>>,
}

impl Group {
    /// Whether the group selects every disk (no selector at all).
    pub fn selects_everything(&self) -> bool {
        self.name_selector.is_empty() && self.label_selector.is_none()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookType {
    Exec,
    Check,
    Scale,
    Job,
}

impl HookType {
    pub fn as_str(self) -> &'static str {
        match self {
            HookType::Exec => "exec",
            HookType::Check => "check",
            HookType::Scale => "scale",
            HookType::Job => "job",
        }
    }
}

/// Where an exec hook's commands run (VM extension).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Inside the guest, through the guest agent's `guest-exec` (refused while frozen).
    Guest,
    /// On the hypervisor host — the virt-launcher pod on KubeVirt, where `virsh` lives.
    Host,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Guest => "guest",
            Target::Host => "host",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    Fail,
    Continue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailOn {
    /// Stop at any step error (the default).
    AnyError,
    /// Stop only when the failed step is essential.
    EssentialError,
    /// Never stop; run every step and report.
    FullError,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hook {
    pub name: At<String>,
    #[serde(skip)]
    pub pos: Pos,
    pub hook_type: At<HookType>,
    pub namespace: Option<String>,
    /// Where exec ops and check commands run; `guest` unless the hook says otherwise.
    pub target: At<Target>,
    /// Container for host-side commands on KubeVirt (Velero's `container`).
    pub container: Option<String>,
    pub select_resource: Option<At<String>>,
    pub name_selector: Option<At<String>>,
    pub label_selector: Option<At<LabelSelector>>,
    pub single_pod_only: bool,
    pub on_error: Option<OnError>,
    pub timeout: Option<Duration>,
    pub essential: Option<bool>,
    pub ops: Vec<Op>,
    pub chks: Vec<Check>,
    /// Velero restore hooks only: how long to wait for the container, and whether to wait for
    /// the pod to be ready, before running the command.
    pub restore_wait: Option<RestoreWait>,
}

impl Hook {
    pub fn op(&self, name: &str) -> Option<&Op> {
        self.ops.iter().find(|op| op.name.value == name)
    }

    pub fn check(&self, name: &str) -> Option<&Check> {
        self.chks.iter().find(|c| c.name.value == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestoreWait {
    pub wait_timeout: Option<Duration>,
    pub wait_for_ready: bool,
}

/// A reference to an op: `hook/op`, `/op` or `op` (the last two mean "in the same hook").
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OpRef {
    pub hook: Option<String>,
    pub op: String,
}

impl OpRef {
    pub fn parse(text: &str) -> Option<OpRef> {
        let text = text.trim();
        match text.split_once('/') {
            None if !text.is_empty() => Some(OpRef {
                hook: None,
                op: text.to_owned(),
            }),
            Some(("", op)) if !op.is_empty() && !op.contains('/') => Some(OpRef {
                hook: None,
                op: op.to_owned(),
            }),
            Some((hook, op)) if !hook.is_empty() && !op.is_empty() && !op.contains('/') => {
                Some(OpRef {
                    hook: Some(hook.to_owned()),
                    op: op.to_owned(),
                })
            }
            _ => None,
        }
    }

    /// The hook this reference points into, given the hook it was written in.
    pub fn hook_or<'a>(&'a self, own_hook: &'a str) -> &'a str {
        self.hook.as_deref().unwrap_or(own_hook)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Op {
    pub name: At<String>,
    #[serde(skip)]
    pub pos: Pos,
    pub container: Option<String>,
    pub command: Option<At<Command>>,
    /// A `command` field was written (even if it could not be parsed): then the parser has
    /// reported it, and "no command" is not reported again.
    #[serde(skip)]
    pub command_written: bool,
    pub on_error: Option<OnError>,
    pub timeout: Option<Duration>,
    pub inverse_op: Option<At<OpRef>>,
    /// VM extension: start the command and keep it running (holding a session, e.g. a
    /// database lock) while later steps run.
    pub background: bool,
    /// VM extension: this op ends the named background op (after this op's own command ran,
    /// the background op is waited for, then killed if it does not exit).
    pub ends: Option<At<OpRef>>,
    /// VM extension: environment variables for the command (`NAME=value`).
    pub env: Vec<(String, String)>,
    /// VM extension: bytes written to the command's standard input.
    pub stdin: Option<String>,
    /// Velero init restore hooks only: the init container's image.
    pub image: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    pub name: At<String>,
    #[serde(skip)]
    pub pos: Pos,
    pub condition: Option<At<Condition>>,
    /// VM extension: the command whose result the condition is evaluated against.
    pub command: Option<At<Command>>,
    pub on_error: Option<OnError>,
    pub timeout: Option<Duration>,
    /// VM extension: time between two evaluations while polling (default 1 s).
    pub interval: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workflow {
    pub name: At<String>,
    #[serde(skip)]
    pub pos: Pos,
    pub fail_on: FailOn,
    pub sequence: Vec<Step>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    /// `group: NAME`
    Group(String),
    /// `hook: HOOK/OP-OR-CHECK`
    Hook { hook: String, item: String },
    /// `workflow: NAME` (Fusion): the steps of another workflow, inlined.
    Workflow(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    pub kind: StepKind,
    #[serde(skip)]
    pub pos: Pos,
}
