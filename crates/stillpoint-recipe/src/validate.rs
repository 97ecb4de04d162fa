//! Semantic checks that need the whole recipe: references, duplicate names, what a platform can
//! run, and the ordering rule around the freeze. Every problem is reported, each at the position
//! of the thing that is wrong.
//!
//! **The freeze rule.** While the guest is frozen its agent refuses `guest-exec`, so nothing may
//! run between freeze and thaw. The executor makes the `volume` group step one indivisible
//! freeze → capture → thaw, so a sequence cannot put a step inside it. What a recipe *can*
//! write that would need a guest command while frozen — and what is rejected here — is:
//! - a step naming both a group and a hook (rejected by the parser: "a hook cannot run inside
//!   the capture");
//! - volume group steps separated by other steps: all disks must be captured at one instant
//!   under one freeze, so the steps between would run frozen. Adjacent volume steps are merged
//!   into one capture.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

use crate::diagnostic::{Diagnostic, Pos, Severity, has_errors, sort_diagnostics};
use crate::model::*;
use crate::parse::parse_recipe;
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
    let parsed = parse_recipe(source);
    let mut diagnostics = parsed.diagnostics;
    if let Some(recipe) = &parsed.recipe {
        diagnostics.extend(validate(recipe, options));
        diagnostics.extend(crate::lint::lint_diagnostics(recipe));
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
    if recipe.workflow("backup").is_none() {
        v.error(
            Pos::new(1, 1),
            "the recipe has no `backup` workflow: nothing says which steps run around the capture of the VM's disks",
        );
    }
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
                    if !["down", "up", "sync"].contains(&op.name.value.as_str()) {
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
        let mut last_volume: Option<(usize, Pos, &str)> = None;
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
                        GroupType::Resource => {}
                        GroupType::Volume => {
                            has_volume = true;
                            if let Some((previous, previous_pos, previous_name)) = last_volume
                                && previous + 1 != index
                            {
                                self.error(step.pos, format!(
                                    "volume group `{group_name}` is captured apart from volume group `{previous_name}` ({previous_pos}) with {} step(s) in between. All disks are captured at one instant under one freeze, and while the guest is frozen its agent refuses guest-exec, so nothing can run between them: put the volume groups next to each other (they become one capture) and move the other steps before or after",
                                    index - previous - 1
                                ));
                            }
                            last_volume = Some((index, step.pos, group_name));
                        }
                    }
                }
                StepKind::Hook { hook, item } => {
                    let Some(hook) = self.recipe.hook(hook) else {
                        continue;
                    };
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
        if name == "backup" && !has_volume {
            self.error(workflow.name.pos, "workflow `backup` has no volume group step, so the VM's disks would not be captured; add `- group: NAME` naming a group of type volume");
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
