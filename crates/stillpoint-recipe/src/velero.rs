//! Velero hook annotations on a pod, read into the recipe model, and the annotations stillpoint
//! recommends for a virt-launcher pod at each consistency level.
//!
//! Reading follows Velero's rules (`internal/hook/item_hook_handler.go`): `container` defaults
//! to the pod's first container (`None` here), backup hooks default to `on-error: Fail` and a
//! 30 s timeout, restore exec hooks to `on-error: Continue`; `command` is a JSON array, or any
//! other string taken as a single argument (Velero does not split it — unlike the Recipe CR).
//! The unprefixed `hook.backup.velero.io/*` keys are the legacy form of the pre hook. Hooks run
//! on the pod, which for a VM is the host side (`target: host`).
//!
//! The model built is a recipe with one volume group selecting every disk and the workflows
//! `backup` (pre hook → capture → post hook) and `restore` (restore → init hook → post hook).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::command::Command;
use crate::diagnostic::Pos;
use crate::duration::parse_go_duration;
use crate::error::{RecipeError, RecipeErrorKind};
use crate::model::*;
use crate::plan::{PlannedStep, WorkflowPlan};

pub const PRE_BACKUP: &str = "pre.hook.backup.velero.io/";
pub const LEGACY_PRE_BACKUP: &str = "hook.backup.velero.io/";
pub const POST_BACKUP: &str = "post.hook.backup.velero.io/";
pub const POST_RESTORE: &str = "post.hook.restore.velero.io/";
pub const INIT_RESTORE: &str = "init.hook.restore.velero.io/";

/// Velero's default exec hook timeout.
pub const VELERO_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// KubeVirt's pre-hook timeout for virt-freezer (v1.8, PR #16653): Windows VSS can take 60 s.
pub const FREEZE_HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// The launcher pod's container that has the VM's sockets.
pub const LAUNCHER_CONTAINER: &str = "compute";

const BACKUP_FIELDS: &[&str] = &["container", "command", "on-error", "timeout"];
const POST_RESTORE_FIELDS: &[&str] = &[
    "container",
    "command",
    "on-error",
    "exec-timeout",
    "wait-timeout",
    "wait-for-ready",
];
const INIT_RESTORE_FIELDS: &[&str] = &["container-image", "container-name", "command", "timeout"];

/// Reads the Velero hook annotations of a pod into a recipe. Every malformed annotation is
/// reported, each error naming its key.
pub fn parse_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<Recipe, Vec<RecipeError>> {
    let mut errors = Vec::new();
    for key in annotations.keys() {
        let fields = [
            (PRE_BACKUP, BACKUP_FIELDS),
            (POST_BACKUP, BACKUP_FIELDS),
            (POST_RESTORE, POST_RESTORE_FIELDS),
            (INIT_RESTORE, INIT_RESTORE_FIELDS),
            (LEGACY_PRE_BACKUP, BACKUP_FIELDS),
        ];
        // `pre.hook.backup…` also ends with `hook.backup…`: match the longest prefix first.
        if let Some((prefix, known)) = fields.iter().find(|(prefix, _)| key.starts_with(prefix))
            && !known.contains(&&key[prefix.len()..])
        {
            errors.push(annotation_error(
                key,
                format!(
                    "unknown hook annotation; {} takes {}",
                    prefix,
                    known.join(", ")
                ),
            ));
        }
    }
    let read = |prefix: &str, field: &str| -> Option<(String, &String)> {
        let key = format!("{prefix}{field}");
        annotations.get(&key).map(|value| (key, value))
    };
    let mut hooks = Vec::new();
    let mut backup = Vec::new();
    let mut restore = vec![Step {
        kind: StepKind::Group("disks".into()),
        pos: Pos::UNKNOWN,
    }];
    // Pre hook: the prefixed form wins over the legacy one, as in Velero.
    let pre_prefix = if BACKUP_FIELDS.iter().any(|f| read(PRE_BACKUP, f).is_some()) {
        PRE_BACKUP
    } else {
        LEGACY_PRE_BACKUP
    };
    let specs = [
        (
            pre_prefix,
            "velero-pre-backup",
            "pre",
            OnError::Fail,
            "timeout",
        ),
        (
            POST_BACKUP,
            "velero-post-backup",
            "post",
            OnError::Fail,
            "timeout",
        ),
        (
            POST_RESTORE,
            "velero-post-restore",
            "post",
            OnError::Continue,
            "exec-timeout",
        ),
    ];
    for (prefix, hook_name, op_name, default_on_error, timeout_field) in specs {
        let present = annotations.keys().any(|k| {
            k.starts_with(prefix)
                && (prefix != LEGACY_PRE_BACKUP
                    || !k.starts_with(PRE_BACKUP) && !k.starts_with(POST_BACKUP))
        });
        if !present {
            continue;
        }
        // Each field is checked even when an earlier one is bad, so every problem is reported.
        let before = errors.len();
        let command = match read(prefix, "command") {
            None => {
                errors.push(annotation_error(
                    &format!("{prefix}command"),
                    "missing: the other annotations of this hook are set, but nothing says what to run",
                ));
                None
            }
            Some((key, text)) => velero_command(text)
                .map_err(|message| errors.push(annotation_error(&key, message)))
                .ok(),
        };
        let on_error = match read(prefix, "on-error") {
            None => default_on_error,
            Some((_, v)) if v == "Fail" => OnError::Fail,
            Some((_, v)) if v == "Continue" => OnError::Continue,
            Some((key, v)) => {
                errors.push(annotation_error(
                    &key,
                    format!("\"{v}\" is neither Fail nor Continue"),
                ));
                default_on_error
            }
        };
        let timeout = match read(prefix, timeout_field) {
            None => VELERO_DEFAULT_TIMEOUT,
            Some((key, v)) => duration(&key, v).unwrap_or_else(|e| {
                errors.push(e);
                VELERO_DEFAULT_TIMEOUT
            }),
        };
        let restore_wait = (prefix == POST_RESTORE).then(|| {
            let wait_timeout = read(prefix, "wait-timeout")
                .and_then(|(key, v)| duration(&key, v).map_err(|e| errors.push(e)).ok());
            let wait_for_ready = match read(prefix, "wait-for-ready") {
                None => false,
                Some((_, v)) if v == "true" => true,
                Some((_, v)) if v == "false" => false,
                Some((key, v)) => {
                    errors.push(annotation_error(
                        &key,
                        format!("\"{v}\" is neither true nor false"),
                    ));
                    false
                }
            };
            RestoreWait {
                wait_timeout,
                wait_for_ready,
            }
        });
        let Some(command) = command else { continue };
        if errors.len() > before {
            continue;
        }
        let container = read(prefix, "container").map(|(_, v)| v.clone());
        hooks.push(velero_hook(
            hook_name,
            op_name,
            command,
            container,
            on_error,
            timeout,
            None,
            restore_wait,
        ));
        let step = Step {
            kind: StepKind::Hook {
                hook: hook_name.into(),
                item: op_name.into(),
            },
            pos: Pos::UNKNOWN,
        };
        match hook_name {
            "velero-pre-backup" => backup.insert(0, step),
            "velero-post-backup" => backup.push(step),
            _ => restore.push(step),
        }
    }
    if annotations.keys().any(|k| k.starts_with(INIT_RESTORE)) {
        match read(INIT_RESTORE, "command").map(|(key, v)| (key, velero_command(v))) {
            None => errors.push(annotation_error(
                &format!("{INIT_RESTORE}command"),
                "missing: the init container hook has nothing to run",
            )),
            Some((key, Err(message))) => errors.push(annotation_error(&key, message)),
            Some((_, Ok(command))) => {
                let timeout = match read(INIT_RESTORE, "timeout") {
                    None => Ok(VELERO_DEFAULT_TIMEOUT),
                    Some((key, v)) => duration(&key, v),
                };
                match timeout {
                    Err(e) => errors.push(e),
                    Ok(timeout) => {
                        let container =
                            read(INIT_RESTORE, "container-name").map(|(_, v)| v.clone());
                        let image = read(INIT_RESTORE, "container-image").map(|(_, v)| v.clone());
                        hooks.push(velero_hook(
                            "velero-init-restore",
                            "init",
                            command,
                            container,
                            OnError::Fail,
                            timeout,
                            image,
                            None,
                        ));
                        // The init container runs before the pod's containers, so before the post hook.
                        restore.insert(
                            1,
                            Step {
                                kind: StepKind::Hook {
                                    hook: "velero-init-restore".into(),
                                    item: "init".into(),
                                },
                                pos: Pos::UNKNOWN,
                            },
                        );
                    }
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let capture_at = usize::from(backup.first().is_some_and(
        |s| matches!(&s.kind, StepKind::Hook { hook, .. } if hook == "velero-pre-backup"),
    ));
    backup.insert(
        capture_at,
        Step {
            kind: StepKind::Group("disks".into()),
            pos: Pos::UNKNOWN,
        },
    );
    let workflow = |name: &str, sequence: Vec<Step>| Workflow {
        name: At::new(name.to_owned(), Pos::UNKNOWN),
        pos: Pos::UNKNOWN,
        fail_on: FailOn::AnyError,
        sequence,
    };
    Ok(Recipe {
        pos: Pos::UNKNOWN,
        parameters_unset: Vec::new(),
        api_version: ApiVersion::Ramen,
        name: Some("velero-annotations".into()),
        namespace: None,
        app_type: None,
        groups: vec![Group {
            name: At::new("disks".into(), Pos::UNKNOWN),
            pos: Pos::UNKNOWN,
            group_type: At::new(GroupType::Volume, Pos::UNKNOWN),
            name_selector: Vec::new(),
            label_selector: None,
            essential: None,
            kubernetes_fields: Vec::new(),
        }],
        volumes: None,
        hooks,
        workflows: vec![workflow("backup", backup), workflow("restore", restore)],
    })
}

#[allow(clippy::too_many_arguments)] // one call site per hook kind; a struct would only rename them
fn velero_hook(
    hook: &str,
    op: &str,
    command: Command,
    container: Option<String>,
    on_error: OnError,
    timeout: Duration,
    image: Option<String>,
    restore_wait: Option<RestoreWait>,
) -> Hook {
    Hook {
        name: At::new(hook.into(), Pos::UNKNOWN),
        pos: Pos::UNKNOWN,
        hook_type: At::new(HookType::Exec, Pos::UNKNOWN),
        namespace: None,
        target: At::new(Target::Host, Pos::UNKNOWN),
        container,
        select_resource: None,
        name_selector: None,
        label_selector: None,
        single_pod_only: false,
        on_error: Some(on_error),
        timeout: Some(timeout),
        essential: None,
        ops: vec![Op {
            name: At::new(op.into(), Pos::UNKNOWN),
            pos: Pos::UNKNOWN,
            container: None,
            command: Some(At::new(command, Pos::UNKNOWN)),
            command_written: true,
            on_error: None,
            timeout: None,
            inverse_op: None,
            background: false,
            ends: None,
            env: Vec::new(),
            stdin: None,
            image,
        }],
        chks: Vec::new(),
        restore_wait,
    }
}

fn annotation_error(key: &str, message: impl Into<String>) -> RecipeError {
    RecipeError::new(RecipeErrorKind::Annotation)
        .with_annotation(key)
        .with_message(message)
}

fn duration(key: &str, value: &str) -> Result<Duration, RecipeError> {
    parse_go_duration(value).ok_or_else(|| {
        annotation_error(
            key,
            format!("\"{value}\" is not a duration such as 30s or 1m30s"),
        )
    })
}

/// Velero's rule: a JSON array when it starts with `[`, else the whole string is one argument.
fn velero_command(text: &str) -> Result<Command, String> {
    if text.trim_start().starts_with('[') {
        Command::from_string(text).map_err(|e| e.to_string())
    } else if text.trim().is_empty() {
        Err("the command is empty".into())
    } else {
        Command::from_list(vec![text.to_owned()]).map_err(|e| e.to_string())
    }
}

/// The consistency level the annotations are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Crash,
    Filesystem,
    Application,
}

/// The recipe an application-level annotation set runs, and the plan used to size timeouts.
pub struct RecipeRef<'a> {
    /// The path of the recipe *inside the launcher pod's compute container*.
    pub path: &'a str,
    pub plan: &'a WorkflowPlan,
    /// Arguments every `recipe run` hook command ends with: the workflow when it is not
    /// `backup`, the template parameters (`--set NAME=VALUE`) the recipe was filled with.
    pub run_args: &'a [String],
}

/// Annotations for a virt-launcher pod, and notes for the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SuggestedAnnotations {
    pub annotations: BTreeMap<String, String>,
    pub notes: Vec<String>,
}

/// The Velero hook annotations to put on a virt-launcher pod so a Velero backup reaches
/// `level`: none for crash, `stillpoint freeze`/`unfreeze` for filesystem (virt-freezer's
/// command line and timeouts), the recipe's two halves around the capture for application.
pub fn suggest_annotations(
    vm: &str,
    namespace: &str,
    level: Level,
    recipe: Option<RecipeRef<'_>>,
) -> Result<SuggestedAnnotations, RecipeError> {
    let mut annotations = BTreeMap::new();
    let mut notes = Vec::new();
    let json = |argv: &[&str]| serde_json::to_string(argv).unwrap_or_default();
    let mut put = |prefix: &str, argv: Vec<&str>, timeout: Duration| {
        annotations.insert(format!("{prefix}container"), LAUNCHER_CONTAINER.to_owned());
        annotations.insert(format!("{prefix}command"), json(&argv));
        annotations.insert(format!("{prefix}on-error"), "Fail".to_owned());
        annotations.insert(
            format!("{prefix}timeout"),
            format!("{}s", timeout.as_secs()),
        );
    };
    match level {
        Level::Crash => {
            notes.push("crash consistency needs no hooks: the capture alone is what a power cut would leave. Set kubevirt.io/skip-backup-hooks: \"true\" on the VM so KubeVirt's default freeze hooks are not added either.".into());
        }
        Level::Filesystem => {
            put(
                PRE_BACKUP,
                vec![
                    "stillpoint",
                    "freeze",
                    "--name",
                    vm,
                    "--namespace",
                    namespace,
                ],
                FREEZE_HOOK_TIMEOUT,
            );
            put(
                POST_BACKUP,
                vec![
                    "stillpoint",
                    "unfreeze",
                    "--name",
                    vm,
                    "--namespace",
                    namespace,
                ],
                VELERO_DEFAULT_TIMEOUT,
            );
            notes.push("the `stillpoint` binary must be on the PATH of the launcher pod's compute container.".into());
            notes.push("these replace KubeVirt's virt-freezer hooks (same flags): set kubevirt.io/skip-backup-hooks: \"true\" on the VM so virt-controller does not overwrite them.".into());
            notes.push("`stillpoint freeze` thaws by itself after --unfreezeTimeoutSeconds (300 s) if the post hook never runs.".into());
        }
        Level::Application => {
            let recipe = recipe.ok_or_else(|| {
                RecipeError::new(RecipeErrorKind::Invalid)
                    .with_message("application consistency needs a recipe (--recipe FILE)")
            })?;
            let capture = recipe.plan.capture_index().ok_or_else(|| {
                RecipeError::new(RecipeErrorKind::Invalid)
                    .with_path(recipe.path)
                    .with_workflow(&recipe.plan.workflow)
                    .with_message("the workflow has no volume group step, so there is no capture to put between the pre and post hooks")
            })?;
            let step_time = |steps: &[PlannedStep]| -> Duration {
                steps
                    .iter()
                    .map(|s| match s {
                        PlannedStep::Exec(e) if e.background => Duration::from_secs(10),
                        PlannedStep::Exec(e) => e.timeout,
                        PlannedStep::Check(c) => c.timeout,
                        PlannedStep::Capture(_) => Duration::ZERO,
                    })
                    .sum()
            };
            let pre = step_time(&recipe.plan.steps[..capture]) + FREEZE_HOOK_TIMEOUT;
            let post = step_time(&recipe.plan.steps[capture + 1..]) + VELERO_DEFAULT_TIMEOUT;
            let run = |phase: &'static str| -> Vec<&str> {
                let mut argv = vec![
                    "stillpoint",
                    "recipe",
                    "run",
                    recipe.path,
                    "--phase",
                    phase,
                    "--name",
                    vm,
                    "--namespace",
                    namespace,
                ];
                argv.extend(recipe.run_args.iter().map(String::as_str));
                argv
            };
            put(PRE_BACKUP, run("pre"), pre);
            put(POST_BACKUP, run("post"), post);
            notes.push(format!("the pre hook runs the {capture} step(s) before the capture and freezes; Velero takes the snapshot; the post hook thaws and runs the rest (timeouts: sum of the steps' timeouts plus {}s to freeze, {}s to thaw).", FREEZE_HOOK_TIMEOUT.as_secs(), VELERO_DEFAULT_TIMEOUT.as_secs()));
            notes.push("the `stillpoint` binary must be on the PATH of the launcher pod's compute container.".into());
            notes.push(format!("{} must exist inside the launcher pod's compute container (mount it from a ConfigMap).", recipe.path));
            notes.push("set kubevirt.io/skip-backup-hooks: \"true\" on the VM so KubeVirt's default freeze hooks do not replace these.".into());
        }
    }
    Ok(SuggestedAnnotations { annotations, notes })
}

/// Reads `metadata.annotations` of a Pod manifest, keeping each key's position so annotation
/// errors can be reported at `file:line:column`.
pub fn pod_annotations(source: &str) -> Result<Vec<(String, String, Pos)>, crate::Diagnostic> {
    use crate::yaml::{Value, parse_document};
    let root = parse_document(source)?;
    let find = |node: &'_ crate::yaml::Node, key: &str| -> Option<crate::yaml::Node> {
        match &node.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    };
    let Some(metadata) = find(&root, "metadata") else {
        return Err(crate::Diagnostic::error(
            root.pos,
            "the Pod has no `metadata`",
        ));
    };
    let Some(annotations) = find(&metadata, "annotations") else {
        return Ok(Vec::new());
    };
    let Value::Map(entries) = &annotations.value else {
        return Err(crate::Diagnostic::error(
            annotations.pos,
            "`metadata.annotations` must be a mapping",
        ));
    };
    let mut out = Vec::new();
    for (key, value) in entries {
        match (key.as_str(), &value.value) {
            (Some(k), Value::String(v)) => out.push((k.to_owned(), v.clone(), key.pos)),
            (Some(k), other) => {
                return Err(crate::Diagnostic::error(
                    value.pos,
                    format!(
                        "annotation {k} must be a string (quote it), found {}",
                        other.kind()
                    ),
                ));
            }
            (None, _) => {
                return Err(crate::Diagnostic::error(
                    key.pos,
                    "annotation keys must be strings",
                ));
            }
        }
    }
    Ok(out)
}

/// Validates the Velero hook annotations of a Pod manifest: the model, or positioned errors.
pub fn check_pod_source(source: &str) -> (Option<Recipe>, Vec<crate::Diagnostic>) {
    let annotations = match pod_annotations(source) {
        Ok(a) => a,
        Err(d) => return (None, vec![d]),
    };
    let map: BTreeMap<String, String> = annotations
        .iter()
        .map(|(k, v, _)| (k.clone(), v.clone()))
        .collect();
    match parse_annotations(&map) {
        Ok(recipe) => (Some(recipe), Vec::new()),
        Err(errors) => {
            let mut diagnostics: Vec<crate::Diagnostic> = errors
                .iter()
                .map(|error| {
                    let key = error.annotation().unwrap_or_default();
                    let pos = annotations
                        .iter()
                        .find(|(k, _, _)| k == key)
                        .map_or(Pos::new(1, 1), |(_, _, p)| *p);
                    crate::Diagnostic::error(pos, error.to_string())
                })
                .collect();
            crate::diagnostic::sort_diagnostics(&mut diagnostics);
            (None, diagnostics)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlanOptions, plan_workflow};
    use crate::validate::{ValidateOptions, validate};

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kubevirt_launcher_annotations_read_with_velero_defaults() {
        let recipe = parse_annotations(&map(&[
            ("pre.hook.backup.velero.io/container", "compute"),
            (
                "pre.hook.backup.velero.io/command",
                r#"["/usr/bin/virt-freezer","--freeze","--name","vm1","--namespace","ns"]"#,
            ),
            ("pre.hook.backup.velero.io/timeout", "60s"),
            ("post.hook.backup.velero.io/container", "compute"),
            (
                "post.hook.backup.velero.io/command",
                r#"["/usr/bin/virt-freezer","--unfreeze","--name","vm1","--namespace","ns"]"#,
            ),
            ("kubevirt.io/domain", "vm1"),
        ]))
        .unwrap();
        let plan = plan_workflow(&recipe, "backup", &PlanOptions::default()).unwrap();
        let ids: Vec<&str> = plan.steps.iter().map(PlannedStep::id).collect();
        assert_eq!(
            ids,
            [
                "velero-pre-backup/pre",
                "group:disks",
                "velero-post-backup/post"
            ]
        );
        let PlannedStep::Exec(pre) = &plan.steps[0] else {
            panic!()
        };
        assert_eq!(
            (pre.target, pre.timeout, pre.on_error),
            (Target::Host, Duration::from_secs(60), OnError::Fail)
        );
        assert_eq!(pre.container.as_deref(), Some("compute"));
        assert_eq!(pre.argv[1], "--freeze");
        let PlannedStep::Exec(post) = &plan.steps[2] else {
            panic!()
        };
        assert_eq!(post.timeout, VELERO_DEFAULT_TIMEOUT, "Velero's default");
        assert!(
            validate(
                &recipe,
                &ValidateOptions {
                    platform: crate::Platform::Kubevirt,
                    disks: None
                }
            )
            .is_empty()
        );
    }

    #[test]
    fn legacy_keys_are_the_pre_hook_and_plain_strings_are_one_argument() {
        let recipe = parse_annotations(&map(&[(
            "hook.backup.velero.io/command",
            "/sbin/fsfreeze --freeze /data",
        )]))
        .unwrap();
        let op = &recipe.hook("velero-pre-backup").unwrap().ops[0];
        assert_eq!(
            op.command.as_ref().unwrap().value.argv,
            ["/sbin/fsfreeze --freeze /data"]
        );
        assert_eq!(
            recipe.hook("velero-pre-backup").unwrap().container,
            None,
            "first container"
        );
    }

    #[test]
    fn restore_hooks_default_to_continue_and_keep_their_waits() {
        let recipe = parse_annotations(&map(&[
            ("post.hook.restore.velero.io/command", r#"["/bin/check"]"#),
            ("post.hook.restore.velero.io/wait-timeout", "2m"),
            ("post.hook.restore.velero.io/wait-for-ready", "true"),
            ("init.hook.restore.velero.io/container-image", "alpine:3"),
            ("init.hook.restore.velero.io/container-name", "prep"),
            ("init.hook.restore.velero.io/command", r#"["/bin/prep"]"#),
        ]))
        .unwrap();
        let post = recipe.hook("velero-post-restore").unwrap();
        assert_eq!(post.on_error, Some(OnError::Continue));
        assert_eq!(
            post.restore_wait,
            Some(RestoreWait {
                wait_timeout: Some(Duration::from_secs(120)),
                wait_for_ready: true
            })
        );
        let restore: Vec<&StepKind> = recipe
            .workflow("restore")
            .unwrap()
            .sequence
            .iter()
            .map(|s| &s.kind)
            .collect();
        assert_eq!(restore[0], &StepKind::Group("disks".into()));
        assert_eq!(
            restore[1],
            &StepKind::Hook {
                hook: "velero-init-restore".into(),
                item: "init".into()
            }
        );
        assert_eq!(
            recipe.hook("velero-init-restore").unwrap().ops[0]
                .image
                .as_deref(),
            Some("alpine:3")
        );
    }

    #[test]
    fn every_bad_annotation_is_reported_by_its_key() {
        let errors = parse_annotations(&map(&[
            ("pre.hook.backup.velero.io/command", "[\"a\""),
            ("post.hook.backup.velero.io/command", "[\"b\"]"),
            ("post.hook.backup.velero.io/timeout", "soon"),
            ("post.hook.restore.velero.io/container", "c"),
            ("pre.hook.backup.velero.io/timout", "30s"),
            ("post.hook.restore.velero.io/on-error", "fail"),
        ]))
        .unwrap_err();
        let keys: Vec<&str> = errors.iter().filter_map(RecipeError::annotation).collect();
        assert!(
            keys.contains(&"pre.hook.backup.velero.io/command"),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"post.hook.backup.velero.io/timeout"),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"pre.hook.backup.velero.io/timout"),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"post.hook.restore.velero.io/command"),
            "missing command: {keys:?}"
        );
        let timeout = errors
            .iter()
            .find(|e| e.annotation() == Some("post.hook.backup.velero.io/timeout"))
            .unwrap();
        assert_eq!(
            timeout.to_string(),
            "annotation post.hook.backup.velero.io/timeout is invalid: \"soon\" is not a duration such as 30s or 1m30s"
        );
    }

    #[test]
    fn suggested_annotations_per_level() {
        let crash = suggest_annotations("vm1", "ns", Level::Crash, None).unwrap();
        assert!(crash.annotations.is_empty() && !crash.notes.is_empty());
        let fs = suggest_annotations("vm1", "ns", Level::Filesystem, None).unwrap();
        assert_eq!(
            fs.annotations["pre.hook.backup.velero.io/command"],
            r#"["stillpoint","freeze","--name","vm1","--namespace","ns"]"#
        );
        assert_eq!(fs.annotations["pre.hook.backup.velero.io/timeout"], "60s");
        assert_eq!(
            fs.annotations["post.hook.backup.velero.io/container"],
            "compute"
        );
        // What we print, read back, is a valid hook set.
        let back = parse_annotations(&fs.annotations).unwrap();
        assert_eq!(
            back.hook("velero-post-backup").unwrap().ops[0]
                .command
                .as_ref()
                .unwrap()
                .value
                .argv[1],
            "unfreeze"
        );
        assert!(suggest_annotations("vm1", "ns", Level::Application, None).is_err());
    }
}
