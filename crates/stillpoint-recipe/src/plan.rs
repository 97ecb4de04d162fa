//! A workflow resolved into the exact steps the executor runs: every reference followed, every
//! default applied (timeout op/check → hook → 30 s, `onError` → `fail`, `essential` → true),
//! adjacent volume groups merged into one capture. Pure, so tests and `recipe plan` can look
//! at it without running anything.

use std::time::Duration;

use serde::Serialize;

use crate::condition::Condition;
use crate::error::{RecipeError, RecipeErrorKind};
use crate::model::*;
use crate::selector::{DiskInfo, DiskSelector, NameMatcher};
use crate::validate::flatten;

/// The Recipe CR's documented default timeout (Ramen's code uses 300 s; DESIGN.md chose 30 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time between two evaluations of a polling check, unless the check sets `interval`.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Backstop for one capture step (freeze + capture start + thaw); Proxmox allows 125 s.
pub const DEFAULT_CAPTURE_TIMEOUT: Duration = Duration::from_secs(120);

/// The built-in operations of a `scale` hook (`hook: NAME/down` needs no `ops:` list).
pub const SCALE_OPS: &[&str] = &["down", "up", "sync"];

/// Choices the plan needs from outside the recipe.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// Freeze the guest around the capture (levels filesystem and application).
    pub freeze: bool,
    pub default_timeout: Duration,
    pub check_interval: Duration,
    pub capture_timeout: Duration,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            freeze: true,
            default_timeout: DEFAULT_TIMEOUT,
            check_interval: DEFAULT_CHECK_INTERVAL,
            capture_timeout: DEFAULT_CAPTURE_TIMEOUT,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkflowPlan {
    pub workflow: String,
    pub fail_on: FailOn,
    pub steps: Vec<PlannedStep>,
    /// What the plan does differently from the recipe as written, because a VM is not a
    /// Kubernetes application: steps skipped, volume groups captured together, a capture added.
    pub notes: Vec<PlanNote>,
}

/// One thing the plan changed from the workflow as written, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanNote {
    /// The step it is about (`hook/op`, `group:NAME`, or `capture` for an added capture).
    pub step: String,
    pub message: String,
}

impl WorkflowPlan {
    /// Index of the capture step, if the workflow has one.
    pub fn capture_index(&self) -> Option<usize> {
        self.steps
            .iter()
            .position(|s| matches!(s, PlannedStep::Capture(_)))
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PlannedStep {
    Exec(ExecStep),
    Check(CheckStep),
    Capture(CaptureStep),
}

impl PlannedStep {
    pub fn id(&self) -> &str {
        match self {
            PlannedStep::Exec(s) => &s.id,
            PlannedStep::Check(s) => &s.id,
            PlannedStep::Capture(s) => &s.id,
        }
    }

    pub fn essential(&self) -> bool {
        match self {
            PlannedStep::Exec(s) => s.essential,
            PlannedStep::Check(s) => s.essential,
            PlannedStep::Capture(s) => s.essential,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExecStep {
    /// `hook/op`
    pub id: String,
    pub target: Target,
    pub container: Option<String>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdin: Option<String>,
    pub timeout: Duration,
    pub on_error: OnError,
    pub essential: bool,
    /// Started and left running; ended by a later op's `ends` or at the end of the workflow.
    pub background: bool,
    /// The background op (`hook/op`) this op ends once its own command succeeded.
    pub ends: Option<String>,
    /// The compensation run when the workflow stops after this op succeeded.
    pub inverse: Option<Box<ExecStep>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckStep {
    /// `hook/check`
    pub id: String,
    pub target: Target,
    pub container: Option<String>,
    /// The command whose result the condition is evaluated against (VM platforms). `None` on
    /// KubeVirt means "the hook's selected Kubernetes objects".
    pub argv: Option<Vec<String>>,
    pub condition: Condition,
    pub timeout: Duration,
    pub interval: Duration,
    pub on_error: OnError,
    pub essential: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct CaptureStep {
    /// `group:NAME` or `group:A+B` when adjacent volume groups were merged.
    pub id: String,
    pub groups: Vec<String>,
    pub selectors: Vec<DiskSelector>,
    pub freeze: bool,
    pub essential: bool,
    pub timeout: Duration,
}

impl CaptureStep {
    /// The disks this capture covers: those any of its groups selects.
    pub fn select<'a>(&self, disks: &'a [DiskInfo]) -> Vec<&'a DiskInfo> {
        disks
            .iter()
            .filter(|d| self.selectors.iter().any(|s| s.selects(d)))
            .collect()
    }
}

/// The disk selector of a volume group (invalid name patterns are skipped; validation reports
/// them).
pub fn disk_selector(group: &Group) -> DiskSelector {
    DiskSelector {
        names: group
            .name_selector
            .iter()
            .filter_map(|n| NameMatcher::new(&n.value).ok())
            .collect(),
        name_patterns: group
            .name_selector
            .iter()
            .map(|n| n.value.clone())
            .collect(),
        labels: group.label_selector.as_ref().map(|l| l.value.clone()),
    }
}

/// Resolves `workflow` of a recipe (normally validated first) into a plan.
pub fn plan_workflow(
    recipe: &Recipe,
    workflow: &str,
    options: &PlanOptions,
) -> Result<WorkflowPlan, RecipeError> {
    let invalid = |message: String| {
        RecipeError::new(RecipeErrorKind::Invalid)
            .with_message(message)
            .with_workflow(workflow)
    };
    if let Some(message) = crate::params::unset_message(&recipe.parameters_unset) {
        return Err(invalid(message));
    }
    let wf = recipe.workflow(workflow).ok_or_else(|| {
        let names: Vec<&str> = recipe
            .workflows
            .iter()
            .map(|w| w.name.value.as_str())
            .collect();
        invalid(format!(
            "the recipe has no workflow `{workflow}` (it has: {}); choose one with --workflow",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ))
    })?;
    let steps = flatten(recipe, wf).map_err(|d| {
        invalid(
            d.first()
                .map(|d| format!("{}: {}", d.pos, d.message))
                .unwrap_or_default(),
        )
    })?;
    let mut planned: Vec<PlannedStep> = Vec::new();
    let mut notes: Vec<PlanNote> = Vec::new();
    for step in steps {
        match &step.kind {
            StepKind::Group(name) => {
                let group = recipe
                    .group(name)
                    .ok_or_else(|| invalid(format!("no group `{name}`")))?;
                if group.group_type.value == GroupType::Resource {
                    notes.push(PlanNote {
                        step: format!("group:{name}"),
                        message: format!(
                            "skipped: `{name}` is a resource group (Kubernetes objects); stillpoint captures the VM's disks"
                        ),
                    });
                    continue;
                }
                let essential = group.essential.unwrap_or(true);
                let adjacent = matches!(planned.last(), Some(PlannedStep::Capture(_)));
                if let Some(PlannedStep::Capture(previous)) = planned
                    .iter_mut()
                    .find(|s| matches!(s, PlannedStep::Capture(_)))
                {
                    // All disks at one instant: a later volume group joins the first capture,
                    // adjacent (as written) or apart (a VM cannot capture twice).
                    if !adjacent {
                        notes.push(PlanNote {
                            step: format!("group:{name}"),
                            message: format!(
                                "captured together with {} at its place: a VM's disks are captured at one instant, so the steps written between them run after the capture",
                                previous.groups.join("+")
                            ),
                        });
                    }
                    previous.groups.push(name.clone());
                    previous.selectors.push(disk_selector(group));
                    previous.essential |= essential;
                    previous.id = format!("group:{}", previous.groups.join("+"));
                    continue;
                }
                planned.push(PlannedStep::Capture(CaptureStep {
                    id: format!("group:{name}"),
                    groups: vec![name.clone()],
                    selectors: vec![disk_selector(group)],
                    freeze: options.freeze,
                    essential,
                    timeout: options.capture_timeout,
                }));
            }
            StepKind::Hook { hook, item } => {
                let h = recipe
                    .hook(hook)
                    .ok_or_else(|| invalid(format!("no hook `{hook}`")))?;
                if h.hook_type.value == HookType::Scale {
                    notes.push(PlanNote {
                        step: format!("{hook}/{item}"),
                        message: format!(
                            "skipped: `{hook}` is a scale hook (scales Kubernetes Deployments and StatefulSets); a VM is not scaled"
                        ),
                    });
                    continue;
                }
                if let Some(op) = h.op(item) {
                    planned.push(PlannedStep::Exec(
                        exec_step(recipe, h, op, options, 0).map_err(invalid)?,
                    ));
                } else if let Some(check) = h.check(item) {
                    let condition = check.condition.as_ref().ok_or_else(|| {
                        invalid(format!("check `{hook}/{item}` has no valid condition"))
                    })?;
                    planned.push(PlannedStep::Check(CheckStep {
                        id: format!("{hook}/{item}"),
                        target: h.target.value,
                        container: h.container.clone(),
                        argv: check.command.as_ref().map(|c| c.value.argv.clone()),
                        condition: condition.value.clone(),
                        timeout: check
                            .timeout
                            .or(h.timeout)
                            .unwrap_or(options.default_timeout),
                        interval: check.interval.unwrap_or(options.check_interval),
                        on_error: check.on_error.or(h.on_error).unwrap_or(OnError::Fail),
                        essential: h.essential.unwrap_or(true),
                    }));
                } else {
                    return Err(invalid(format!(
                        "hook `{hook}` has no op or check `{item}`"
                    )));
                }
            }
            // `flatten` inlines `workflow:` steps, so none reaches the planner.
            StepKind::Workflow(_) => {}
        }
    }
    if !planned.iter().any(|s| matches!(s, PlannedStep::Capture(_))) {
        // A resource-only workflow: the disks are still what a VM backup captures.
        notes.push(PlanNote {
            step: "capture".to_owned(),
            message: format!(
                "workflow `{workflow}` has no volume group step: every disk of the VM is captured after its last step"
            ),
        });
        planned.push(PlannedStep::Capture(CaptureStep {
            id: "capture:every-disk".to_owned(),
            groups: Vec::new(),
            selectors: vec![DiskSelector::everything()],
            freeze: options.freeze,
            essential: true,
            timeout: options.capture_timeout,
        }));
    }
    Ok(WorkflowPlan {
        workflow: workflow.to_owned(),
        fail_on: wf.fail_on,
        steps: planned,
        notes,
    })
}

fn exec_step(
    recipe: &Recipe,
    hook: &Hook,
    op: &Op,
    options: &PlanOptions,
    depth: usize,
) -> Result<ExecStep, String> {
    let id = format!("{}/{}", hook.name.value, op.name.value);
    let argv = op
        .command
        .as_ref()
        .map(|c| c.value.argv.clone())
        .ok_or_else(|| format!("op `{id}` has no command"))?;
    let resolve = |reference: &OpRef| -> Result<(&Hook, &Op), String> {
        let hook_name = reference.hook_or(&hook.name.value);
        let h = recipe
            .hook(hook_name)
            .ok_or_else(|| format!("no hook `{hook_name}`"))?;
        let o = h
            .op(&reference.op)
            .ok_or_else(|| format!("hook `{hook_name}` has no op `{}`", reference.op))?;
        Ok((h, o))
    };
    let inverse = match &op.inverse_op {
        // An inverse's own inverse is not followed: compensation does not compensate.
        Some(reference) if depth == 0 => {
            let (h, o) = resolve(&reference.value)?;
            Some(Box::new(exec_step(recipe, h, o, options, depth + 1)?))
        }
        _ => None,
    };
    let ends = match &op.ends {
        Some(reference) => {
            let (h, o) = resolve(&reference.value)?;
            Some(format!("{}/{}", h.name.value, o.name.value))
        }
        None => None,
    };
    Ok(ExecStep {
        id,
        target: hook.target.value,
        container: op.container.clone().or_else(|| hook.container.clone()),
        argv,
        env: op.env.clone(),
        stdin: op.stdin.clone(),
        timeout: op
            .timeout
            .or(hook.timeout)
            .unwrap_or(options.default_timeout),
        on_error: op.on_error.or(hook.on_error).unwrap_or(OnError::Fail),
        essential: hook.essential.unwrap_or(true),
        background: op.background,
        ends,
        inverse,
    })
}
