//! Semantic checks that need the whole recipe: references, duplicate names, what a platform can
//! run, and the ordering rule around the freeze. Every problem is reported, each at the position
//! of the thing that is wrong.
//!
//! **The freeze rule.** While the guest is frozen its agent refuses `guest-exec`, so nothing may
//! run between freeze and thaw. The executor makes the `volume` group step one indivisible
//! freeze → capture → thaw, so a sequence cannot put a step inside it. What a recipe *can*
//! write that would need a guest command while frozen — and what is rejected — is a step
//! naming both a group and a hook (rejected by the parser: "a hook cannot run inside the
//! capture").
//!
//! Volume group steps separated by other steps are valid (a Kubernetes application may capture
//! its volumes at different times); on a VM all disks are captured at one instant, so the
//! planner captures them all at the first volume group and this is a warning saying so.
//! Workflows are checked whatever their names; none has to be called `backup`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

use crate::diagnostic::{Diagnostic, Pos, Severity, has_errors, sort_diagnostics};
use crate::model::*;
use crate::params::{Parameters, has_placeholder};
use crate::parse::parse_recipe_with;
use crate::plan::SCALE_OPS;
use crate::selector::{DiskInfo, NameMatcher};

/// The platform a recipe will run on; what it can do decides some checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    #[default]
    Qemu,
    Libvirt,
    Kubevirt,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Qemu => "qemu",
            Platform::Libvirt => "libvirt",
            Platform::Kubevirt => "kubevirt",
        }
    }

    /// Whether the platform has Kubernetes objects (workloads to scale, resources to capture).
    pub fn has_kubernetes(self) -> bool {
        self == Platform::Kubevirt
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Platform {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "qemu" => Ok(Platform::Qemu),
            "libvirt" => Ok(Platform::Libvirt),
            "kubevirt" => Ok(Platform::Kubevirt),
            other => Err(format!(
                "unknown platform `{other}`; use qemu, libvirt or kubevirt"
            )),
        }
    }
}

/// What validation knows about where the recipe will run.
#[derive(Clone, Debug, Default)]
pub struct ValidateOptions {
    pub platform: Platform,
    /// The VM's disks, when known: then a volume group that selects none of them is an error.
    pub disks: Option<Vec<DiskInfo>>,
}

/// A recipe that parsed and validated without errors, with the warnings found on the way.
#[derive(Clone, Debug)]
pub struct ValidRecipe {
    pub recipe: Recipe,
    pub warnings: Vec<Diagnostic>,
}

/// Parses and validates a recipe's source: the model when there is no error, and every
/// diagnostic (errors and warnings) sorted by position.
pub fn check_source(source: &str, options: &ValidateOptions) -> (Option<Recipe>, Vec<Diagnostic>) {
    check_source_with(source, options, &Parameters::new())
}

/// [`check_source`] with template parameters filled from `parameters` (see [`crate::params`]).
/// Every Recipe document of a multi-document file is validated; the model returned is the
/// first one's, the one a run uses.
pub fn check_source_with(
    source: &str,
    options: &ValidateOptions,
    parameters: &Parameters,
) -> (Option<Recipe>, Vec<Diagnostic>) {
    let parsed = parse_recipe_with(source, parameters);
    let mut diagnostics = parsed.diagnostics;
    if let Some(recipe) = &parsed.recipe {
        diagnostics.extend(validate(recipe, options));
        diagnostics.extend(crate::lint::lint_diagnostics(recipe));
        for other in &parsed.others {
            diagnostics.extend(validate(other, options));
            diagnostics.push(Diagnostic::warning(
                other.pos,
                format!(
                    "the file has {} Recipe documents: a run uses the first ({}, at {}); this one ({}) is only validated. Put it in a file of its own to run it",
                    parsed.others.len() + 1,
                    describe_recipe(recipe),
                    recipe.pos,
                    describe_recipe(other)
                ),
            ));
        }
    }
    sort_diagnostics(&mut diagnostics);
    diagnostics.dedup();
    let recipe = if has_errors(&diagnostics) {
        None
    } else {
        parsed.recipe
    };
    (recipe, diagnostics)
}

fn describe_recipe(recipe: &Recipe) -> String {
    recipe
        .name
        .as_ref()
        .map(|n| format!("`{n}`"))
        .unwrap_or_else(|| "unnamed".to_owned())
}

/// Whether a workflow's name says it restores (`restore`, `…-restore-resources`): such a
/// workflow is not expected to have a volume group step.
pub fn is_restore_workflow(name: &str) -> bool {
    name.to_ascii_lowercase().contains("restore")
}

/// All semantic problems of a parsed recipe.
pub fn validate(recipe: &Recipe, options: &ValidateOptions) -> Vec<Diagnostic> {
    let mut v = Validator {
        recipe,
        options,
        diagnostics: Vec::new(),
    };
    v.duplicates();
    for group in recipe.groups.iter().chain(recipe.volumes.iter()) {
        v.group(group);
    }
    for hook in &recipe.hooks {
        v.hook(hook);
    }
    for workflow in &recipe.workflows {
        v.workflow(workflow);
    }
    if recipe.workflows.is_empty() {
        v.warning(
            recipe.pos,
            "the recipe has no workflows: there is nothing to run around the capture (a backup with it captures the disks only)",
        );
    }
    // Room for further, advisory checks (the lint module's) to add their warnings here.
    v.diagnostics
}

struct Validator<'a> {
    recipe: &'a Recipe,
    options: &'a ValidateOptions,
    diagnostics: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic::error(pos, message));
    }

    fn warning(&mut self, pos: Pos, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic::warning(pos, message));
    }

    fn platform(&self) -> Platform {
        self.options.platform
    }

    fn duplicates(&mut self) {
        let groups: Vec<&At<String>> = self
            .recipe
            .groups
            .iter()
            .chain(self.recipe.volumes.iter())
            .map(|g| &g.name)
            .collect();
        self.report_duplicates("group", groups);
        let hooks: Vec<&At<String>> = self.recipe.hooks.iter().map(|h| &h.name).collect();
        self.report_duplicates("hook", hooks);
        let workflows: Vec<&At<String>> = self.recipe.workflows.iter().map(|w| &w.name).collect();
        self.report_duplicates("workflow", workflows);
        for hook in &self.recipe.hooks {
            // Ops and checks share one namespace: a step says `hook/NAME` without saying which.
            let items: Vec<&At<String>> = hook
                .ops
                .iter()
                .map(|o| &o.name)
                .chain(hook.chks.iter().map(|c| &c.name))
                .collect();
            self.report_duplicates(&format!("op or check in hook `{}`", hook.name.value), items);
        }
    }

    fn report_duplicates(&mut self, what: &str, names: Vec<&At<String>>) {
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        for name in names {
            if let Some(first) = seen.get(name.value.as_str()) {
                let message = format!(
                    "duplicate {what} name `{}` (first defined at {first})",
                    name.value
                );
                self.error(name.pos, message);
            } else {
                seen.insert(&name.value, name.pos);
            }
        }
    }

    fn group(&mut self, group: &Group) {
        let name = &group.name.value;
        let platform = self.platform();
        if !platform.has_kubernetes() {
            for field in &group.kubernetes_fields {
                self.warning(field.pos, format!("`{}` of group `{name}` selects Kubernetes objects and has no effect on platform {platform}", field.value));
            }
        }
        let mut matchers = Vec::new();
        for entry in &group.name_selector {
            if has_placeholder(&entry.value) {
                // Checked once the parameter is filled; the warning says it is not.
                continue;
            }
            match NameMatcher::new(&entry.value) {
                Ok(m) => matchers.push(m),
                Err(message) => self.error(
                    entry.pos,
                    format!("`nameSelector` of group `{name}`: {message}"),
                ),
            }
        }
        if group.group_type.value != GroupType::Volume {
            return;
        }
        if let Some(disks) = &self.options.disks
            && matchers.len() == group.name_selector.len()
        {
            let selector = crate::plan::disk_selector(group);
            if selector.select(disks).is_empty() {
                let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
                self.error(group.name.pos, format!(
                    "volume group `{name}` selects none of the VM's disks ({}); check its nameSelector and labelSelector",
                    if names.is_empty() { "the VM has no disks".to_owned() } else { names.join(", ") }
                ));
            }
        }
    }

    fn hook(&mut self, hook: &Hook) {
        let name = &hook.name.value;
        let platform = self.platform();
        match hook.hook_type.value {
            HookType::Scale if !platform.has_kubernetes() => {
                self.error(hook.hook_type.pos, format!(
                    "hook `{name}` is a scale hook: it scales Kubernetes Deployments and StatefulSets, and a VM on platform {platform} has no workloads to scale. Stop the application with an exec hook instead"
                ));
            }
            HookType::Scale => {
                for op in &hook.ops {
                    if !SCALE_OPS.contains(&op.name.value.as_str()) {
                        self.error(op.name.pos, format!("scale hook `{name}` has op `{}`; scale ops are `down`, `up` and `sync`", op.name.value));
                    }
                }
            }
            HookType::Job => {
                self.error(hook.hook_type.pos, format!("hook `{name}` is a job hook (Kubernetes Jobs); stillpoint does not run job hooks"));
            }
            HookType::Exec => {
                if hook.ops.is_empty() {
                    self.error(hook.name.pos, format!("exec hook `{name}` has no `ops`"));
                }
                for check in &hook.chks {
                    self.error(check.name.pos, format!("exec hook `{name}` has a check `{}`; checks belong in a hook of type check", check.name.value));
                }
            }
            HookType::Check => {
                if hook.chks.is_empty() {
                    self.error(hook.name.pos, format!("check hook `{name}` has no `chks`"));
                }
                for op in &hook.ops {
                    self.error(
                        op.name.pos,
                        format!(
                            "check hook `{name}` has an op `{}`; ops belong in a hook of type exec",
                            op.name.value
                        ),
                    );
                }
            }
        }
        if !platform.has_kubernetes() {
            let selectors = [
                hook.select_resource
                    .as_ref()
                    .map(|s| ("selectResource", s.pos)),
                hook.name_selector.as_ref().map(|s| ("nameSelector", s.pos)),
                hook.label_selector
                    .as_ref()
                    .map(|s| ("labelSelector", s.pos)),
            ];
            for (field, pos) in selectors.into_iter().flatten() {
                self.warning(pos, format!(
                    "`{field}` of hook `{name}` selects Kubernetes pods; on platform {platform} the hook runs on the VM's {} instead",
                    hook.target.value.as_str()
                ));
            }
        }
        if hook.hook_type.value == HookType::Exec {
            for op in &hook.ops {
                self.op(hook, op);
            }
        }
        if hook.hook_type.value == HookType::Check {
            for check in &hook.chks {
                if check.command.is_none() && !platform.has_kubernetes() {
                    self.error(check.name.pos, format!(
                        "check `{name}/{}` has no `command`: on platform {platform} a check evaluates its condition against the result of a command run on the VM's {} ({{$.exitCode}}, {{$.stdout}}, {{$.stderr}}, {{$.json}})",
                        check.name.value, hook.target.value.as_str()
                    ));
                }
            }
        }
    }

    fn op(&mut self, hook: &Hook, op: &Op) {
        let id = format!("{}/{}", hook.name.value, op.name.value);
        if !op.command_written {
            self.error(op.name.pos, format!("op `{id}` has no `command`"));
        }
        if let Some(inverse) = &op.inverse_op {
            match self.resolve_op(hook, &inverse.value) {
                Err(message) => {
                    self.error(inverse.pos, format!("`inverseOp` of op `{id}`: {message}"))
                }
                Ok((h, o)) if h.name.value == hook.name.value && o.name.value == op.name.value => {
                    self.error(inverse.pos, format!("op `{id}` is its own `inverseOp`"));
                }
                Ok((_, o)) if o.background => {
                    self.error(inverse.pos, format!("`inverseOp` of op `{id}` is a background op; an undo must run to completion"));
                }
                Ok(_) => {}
            }
        }
        if let Some(ends) = &op.ends {
            if op.background {
                self.error(
                    ends.pos,
                    format!(
                        "op `{id}` is a background op and also `ends` another; split it in two ops"
                    ),
                );
            }
            match self.resolve_op(hook, &ends.value) {
                Err(message) => self.error(ends.pos, format!("`ends` of op `{id}`: {message}")),
                Ok((h, o)) if !o.background => {
                    self.error(
                        ends.pos,
                        format!(
                            "op `{id}` ends `{}/{}`, which is not a background op",
                            h.name.value, o.name.value
                        ),
                    );
                }
                Ok(_) => {}
            }
        }
        if op.background
            && hook.target.value == Target::Host
            && self.platform() == Platform::Kubevirt
        {
            // Fine: the launcher pod keeps it. Nothing to report.
        }
    }

    fn resolve_op<'r>(&self, own: &'r Hook, reference: &OpRef) -> Result<(&'r Hook, &'r Op), String>
    where
        Self: 'r,
    {
        let hook_name = reference.hook_or(&own.name.value);
        let hook = if hook_name == own.name.value {
            own
        } else {
            self.recipe
                .hooks
                .iter()
                .find(|h| h.name.value == hook_name)
                .ok_or_else(|| format!("there is no hook `{hook_name}`"))?
        };
        hook.ops
            .iter()
            .find(|o| o.name.value == reference.op)
            .map(|o| (hook, o))
            .ok_or_else(|| format!("hook `{hook_name}` has no op `{}`", reference.op))
    }

    fn workflow(&mut self, workflow: &Workflow) {
        let name = &workflow.name.value;
        let steps = match flatten(self.recipe, workflow) {
            Ok(steps) => steps,
            Err(diagnostics) => {
                self.diagnostics.extend(diagnostics);
                return;
            }
        };
        let platform = self.platform();
        let mut first_volume: Option<(usize, Pos, &str)> = None;
        let mut last_volume_index = 0;
        let mut has_volume = false;
        let mut started: BTreeMap<String, Pos> = BTreeMap::new();
        for (index, step) in steps.iter().enumerate() {
            match &step.kind {
                StepKind::Group(group_name) => {
                    let Some(group) = self.recipe.group(group_name) else {
                        continue;
                    };
                    match group.group_type.value {
                        GroupType::Resource if !platform.has_kubernetes() => {
                            self.error(step.pos, format!(
                                "group `{group_name}` is a resource group: it selects Kubernetes objects, and a VM on platform {platform} has none, so this step would select nothing"
                            ));
                        }
                        GroupType::Resource => {
                            self.warning(step.pos, format!(
                                "group `{group_name}` is a resource group (Kubernetes objects, Velero's part of a backup): stillpoint captures the VM's disks and skips this step, and the plan records it as skipped"
                            ));
                        }
                        GroupType::Volume => {
                            has_volume = true;
                            if let Some((previous, previous_pos, previous_name)) = first_volume
                                && last_volume_index + 1 != index
                            {
                                let between = index - last_volume_index - 1;
                                self.warning(step.pos, format!(
                                    "volume group `{group_name}` is captured apart from volume group `{previous_name}` ({previous_pos}) with {between} step(s) in between. A Kubernetes application may capture its volumes at different times; on a VM every disk is captured at one instant under one freeze, so stillpoint captures `{group_name}`'s disks together with `{previous_name}`'s at {previous_pos}, and the steps in between run after that capture instead of before this one"
                                ));
                                let _ = previous;
                            }
                            if first_volume.is_none() {
                                first_volume = Some((index, step.pos, group_name.as_str()));
                            }
                            last_volume_index = index;
                        }
                    }
                }
                StepKind::Hook { hook, item } => {
                    let Some(hook) = self.recipe.hook(hook) else {
                        continue;
                    };
                    if hook.hook_type.value == HookType::Scale {
                        self.warning(step.pos, format!(
                            "step `{}/{item}` scales Kubernetes workloads; a VM is not a Deployment or StatefulSet, so stillpoint skips this step when it runs the workflow on a VM, and the plan and the report record it as skipped",
                            hook.name.value
                        ));
                        continue;
                    }
                    let Some(op) = hook.op(item) else { continue };
                    let id = format!("{}/{}", hook.name.value, op.name.value);
                    if op.background {
                        if let Some(first) = started.get(&id) {
                            self.error(step.pos, format!("background op `{id}` is started again in workflow `{name}` (first at {first}) while it still runs"));
                        }
                        started.insert(id.clone(), step.pos);
                    }
                    if let Some(ends) = &op.ends
                        && let Ok((h, o)) = self.resolve_op(hook, &ends.value)
                    {
                        let ended = format!("{}/{}", h.name.value, o.name.value);
                        if started.remove(&ended).is_none() && o.background {
                            self.error(step.pos, format!("op `{id}` ends background op `{ended}`, which is not running at this point of workflow `{name}`"));
                        }
                    }
                }
                StepKind::Workflow(_) => {}
            }
        }
        if !has_volume && !is_restore_workflow(name) && !steps.is_empty() {
            self.warning(workflow.name.pos, format!(
                "workflow `{name}` has no volume group step (a resource-only workflow): run as a backup, stillpoint captures every disk of the VM after its last step, under one freeze, and the plan records where"
            ));
        }
    }
}

/// The steps of a workflow with `workflow:` steps inlined, after checking that every step
/// names something that exists. Errors are positioned diagnostics.
pub fn flatten<'r>(
    recipe: &'r Recipe,
    workflow: &'r Workflow,
) -> Result<Vec<&'r Step>, Vec<Diagnostic>> {
    let mut steps = Vec::new();
    let mut errors = Vec::new();
    let mut stack = vec![workflow.name.value.as_str()];
    flatten_into(recipe, workflow, &mut stack, &mut steps, &mut errors);
    if errors.is_empty() {
        Ok(steps)
    } else {
        Err(errors)
    }
}

fn flatten_into<'r>(
    recipe: &'r Recipe,
    workflow: &'r Workflow,
    stack: &mut Vec<&'r str>,
    steps: &mut Vec<&'r Step>,
    errors: &mut Vec<Diagnostic>,
) {
    let name = &workflow.name.value;
    for step in &workflow.sequence {
        match &step.kind {
            StepKind::Group(group) => {
                if recipe.group(group).is_none() {
                    errors.push(Diagnostic::error(
                        step.pos,
                        format!(
                            "workflow `{name}` names group `{group}`, which is not defined{}",
                            known(recipe.groups.iter().map(|g| &g.name.value))
                        ),
                    ));
                    continue;
                }
                steps.push(step);
            }
            StepKind::Hook { hook, item } => {
                let Some(h) = recipe.hook(hook) else {
                    errors.push(Diagnostic::error(
                        step.pos,
                        format!(
                            "workflow `{name}` names hook `{hook}`, which is not defined{}",
                            known(recipe.hooks.iter().map(|h| &h.name.value))
                        ),
                    ));
                    continue;
                };
                if h.hook_type.value == HookType::Scale {
                    // `down`, `up` and `sync` are built in: a scale hook needs no `ops:` list.
                    if !SCALE_OPS.contains(&item.as_str()) && h.op(item).is_none() {
                        errors.push(Diagnostic::error(
                            step.pos,
                            format!(
                                "scale hook `{hook}` has no operation `{item}`; scale operations are {}",
                                SCALE_OPS.join(", ")
                            ),
                        ));
                        continue;
                    }
                    steps.push(step);
                    continue;
                }
                if h.op(item).is_none() && h.check(item).is_none() {
                    let kind = if h.hook_type.value == HookType::Check {
                        "check"
                    } else {
                        "op"
                    };
                    let names = h
                        .ops
                        .iter()
                        .map(|o| &o.name.value)
                        .chain(h.chks.iter().map(|c| &c.name.value));
                    errors.push(Diagnostic::error(
                        step.pos,
                        format!("hook `{hook}` has no {kind} `{item}`{}", known(names)),
                    ));
                    continue;
                }
                steps.push(step);
            }
            StepKind::Workflow(inner) => {
                let Some(inner_workflow) = recipe.workflow(inner) else {
                    errors.push(Diagnostic::error(
                        step.pos,
                        format!("workflow `{name}` calls workflow `{inner}`, which is not defined"),
                    ));
                    continue;
                };
                if stack.contains(&inner.as_str()) {
                    errors.push(Diagnostic::error(step.pos, format!("workflow `{name}` calls workflow `{inner}`, which calls it back: {} → {inner}", stack.join(" → "))));
                    continue;
                }
                stack.push(inner);
                flatten_into(recipe, inner_workflow, stack, steps, errors);
                stack.pop();
            }
        }
    }
}

fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" (defined: {})", names.join(", "))
    }
}

/// Diagnostics rendered as `FILE:LINE:COL: severity: message` lines, and the counts.
pub fn render(file: &str, diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diagnostics {
        out.push_str(&d.render(file));
        out.push('\n');
    }
    let errors = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = diagnostics.len() - errors;
    out.push_str(&format!(
        "{file}: {errors} error(s), {warnings} warning(s)\n"
    ));
    out
}
