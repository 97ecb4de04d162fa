//! From the positioned YAML tree to the [`Recipe`] model, collecting every problem on the way
//! (wrong types, missing or unknown fields, duplicate keys, malformed references, commands,
//! conditions and selectors) instead of stopping at the first.
//!
//! Unknown fields are **errors** (a misspelt `inverseOp` would otherwise silently drop the
//! unlock), with a "did you mean" hint. Fields the Recipe CR defines but stillpoint does not
//! act on (`priority`, `skipHookIfNotPresent`, Kubernetes-only group fields …) are accepted and
//! reported as warnings where they change behaviour elsewhere.

use std::time::Duration;

use crate::command::Command;
use crate::condition::Condition;
use crate::diagnostic::{Diagnostic, Pos};
use crate::duration::suggest_seconds;
use crate::model::*;
use crate::params::{Parameters, fill, has_placeholder, unresolved_warning};
use crate::selector::{LabelSelector, Requirement, SelectorOp};
use crate::yaml::{Node, Value, parse_documents};

/// The model (when the document had the shape of a recipe at all) and every problem found.
#[derive(Debug)]
pub struct Parsed {
    /// The file's (first) Recipe: the one a run uses.
    pub recipe: Option<Recipe>,
    /// Further Recipe documents of a multi-document file: validated, not run.
    pub others: Vec<Recipe>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Parses a recipe document. Never panics, whatever the input.
pub fn parse_recipe(source: &str) -> Parsed {
    parse_recipe_with(source, &Parameters::new())
}

/// Parses a recipe file, filling template parameters (`${NAME}`) from `parameters`; each one
/// left unfilled is a warning at its position and is kept in [`Recipe::parameters_unset`].
///
/// A file of several YAML documents (`---` between them, e.g. a Recipe beside the Namespace
/// and the application it protects) gives its `kind: Recipe` documents; the others are left
/// out. Positions are those of the whole file.
pub fn parse_recipe_with(source: &str, parameters: &Parameters) -> Parsed {
    let mut ctx = Ctx::default();
    let mut documents = match parse_documents(source) {
        Ok(documents) => documents,
        Err(diagnostic) => {
            return Parsed {
                recipe: None,
                others: Vec::new(),
                diagnostics: vec![diagnostic],
            };
        }
    };
    let several = documents.len() > 1;
    let kinds: Vec<String> = documents
        .iter()
        .map(|d| document_kind(d).unwrap_or("(no kind)").to_owned())
        .collect();
    let mut recipes = Vec::new();
    for document in &mut documents {
        if several && document_kind(document) != Some("Recipe") {
            continue;
        }
        let unset = fill(document, parameters);
        for parameter in &unset {
            ctx.diagnostics.push(unresolved_warning(parameter));
        }
        if let Some(mut recipe) = ctx.recipe(document) {
            recipe.parameters_unset = unset;
            recipe.pos = document.pos;
            recipes.push(recipe);
        }
    }
    if several && !kinds.iter().any(|k| k == "Recipe") {
        ctx.error(
            Pos::new(1, 1),
            format!(
                "none of the {} documents of the file is a `kind: Recipe` (found: {})",
                kinds.len(),
                kinds.join(", ")
            ),
        );
    }
    let mut recipes = recipes.into_iter();
    Parsed {
        recipe: recipes.next(),
        others: recipes.collect(),
        diagnostics: ctx.diagnostics,
    }
}

/// The `kind` of a document, when it is a mapping with a string `kind`.
pub fn document_kind(document: &Node) -> Option<&str> {
    match &document.value {
        Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| k.as_str() == Some("kind"))
            .and_then(|(_, v)| v.as_str()),
        _ => None,
    }
}

const METADATA_FIELDS: &[&str] = &[
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generateName",
    "finalizers",
    "ownerReferences",
    "managedFields",
    "selfLink",
];

const GROUP_KUBERNETES_FIELDS: &[&str] = &[
    "parent",
    "backupRef",
    "includedResourceTypes",
    "excludedResourceTypes",
    "selectResource",
    "includeClusterResources",
    "includedNamespacesByLabel",
    "includedNamespaces",
    "excludedNamespaces",
    "restoreStatus",
    "restoreOverwriteResources",
];

#[derive(Default)]
struct Ctx {
    diagnostics: Vec<Diagnostic>,
}

/// The entries of a mapping after duplicate and unknown keys were reported.
struct Fields<'a> {
    pos: Pos,
    entries: Vec<(&'a str, &'a Node, &'a Node)>,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(key, _, _)| *key == name)
            .map(|(_, _, value)| *value)
    }

    fn key_pos(&self, name: &str) -> Option<Pos> {
        self.entries
            .iter()
            .find(|(key, _, _)| *key == name)
            .map(|(_, key, _)| key.pos)
    }
}

impl Ctx {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic::error(pos, message));
    }

    fn warning(&mut self, pos: Pos, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic::warning(pos, message));
    }

    /// Reads a mapping: reports non-string keys, duplicate keys (second occurrence, naming the
    /// first) and unknown keys (with a suggestion). Returns `None` when `node` is not a mapping.
    fn fields<'a>(&mut self, node: &'a Node, what: &str, known: &[&str]) -> Option<Fields<'a>> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                format!("{what} must be a mapping, found {}", node.value.kind()),
            );
            return None;
        };
        let mut fields = Fields {
            pos: node.pos,
            entries: Vec::new(),
        };
        for (key, value) in entries {
            let Some(name) = key.as_str() else {
                self.error(
                    key.pos,
                    format!(
                        "{what} has a key that is {}, not a field name",
                        key.value.kind()
                    ),
                );
                continue;
            };
            if let Some(first) = fields.key_pos(name) {
                self.error(
                    key.pos,
                    format!("duplicate field `{name}` in {what} (first at {first})"),
                );
                continue;
            }
            if !known.contains(&name) {
                let hint = suggestion(name, known)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.error(key.pos, format!("unknown field `{name}` in {what}{hint}"));
                continue;
            }
            fields.entries.push((name, key, value));
        }
        Some(fields)
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::String(_) => {
                self.error(node.pos, format!("{what} must not be empty"));
                None
            }
            other => {
                self.error(
                    node.pos,
                    format!("{what} must be a string, found {}", other.kind()),
                );
                None
            }
        }
    }

    fn required_string(&mut self, fields: &Fields, name: &str, what: &str) -> Option<At<String>> {
        match fields.get(name) {
            Some(node) => self
                .string(node, &format!("`{name}` of {what}"))
                .map(|s| At::new(s, node.pos)),
            None => {
                self.error(fields.pos, format!("{what} has no `{name}`"));
                None
            }
        }
    }

    fn optional_string(&mut self, fields: &Fields, name: &str, what: &str) -> Option<String> {
        fields
            .get(name)
            .and_then(|node| self.string(node, &format!("`{name}` of {what}")))
    }

    fn boolean(&mut self, fields: &Fields, name: &str, what: &str) -> Option<bool> {
        let node = fields.get(name)?;
        match &node.value {
            Value::Bool(b) => Some(*b),
            Value::Null => None,
            other => {
                self.error(
                    node.pos,
                    format!(
                        "`{name}` of {what} must be true or false, found {}",
                        describe(node, other)
                    ),
                );
                None
            }
        }
    }

    /// A timeout or interval in whole seconds (the Recipe CR's `int`). 0 means "not set", as in
    /// Ramen's code, and is reported so the default that applies is visible.
    fn seconds(&mut self, fields: &Fields, name: &str, what: &str) -> Option<Duration> {
        let node = fields.get(name)?;
        match &node.value {
            Value::Int(0) => {
                self.warning(
                    node.pos,
                    format!("`{name}: 0` of {what} means \"not set\": the default applies"),
                );
                None
            }
            Value::Int(n) if *n > 0 => Some(Duration::from_secs(n.unsigned_abs())),
            Value::Int(_) => {
                self.error(
                    node.pos,
                    format!("`{name}` of {what} must be a positive number of seconds"),
                );
                None
            }
            Value::Null => None,
            Value::String(text) if has_placeholder(text) => None,
            other => {
                let hint = match other {
                    Value::String(text) => suggest_seconds(text)
                        .map(|secs| format!("; write `{name}: {secs}`"))
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                self.error(
                    node.pos,
                    format!(
                        "`{name}` of {what} must be a whole number of seconds, found {}{hint}",
                        describe(node, other)
                    ),
                );
                None
            }
        }
    }

    fn on_error(&mut self, fields: &Fields, what: &str) -> Option<OnError> {
        let node = fields.get("onError")?;
        match node.as_str() {
            Some("fail") => Some(OnError::Fail),
            Some("continue") => Some(OnError::Continue),
            _ => {
                self.error(
                    node.pos,
                    format!(
                        "`onError` of {what} must be `fail` or `continue`, found {}",
                        describe(node, &node.value)
                    ),
                );
                None
            }
        }
    }

    fn command(&mut self, node: &Node, what: &str) -> Option<At<Command>> {
        let result = match &node.value {
            Value::String(text) => Command::from_string(text),
            Value::Seq(items) => {
                let mut argv = Vec::new();
                for item in items {
                    match item.scalar_text() {
                        Some(text) => argv.push(text),
                        None => {
                            self.error(
                                item.pos,
                                format!(
                                    "the command of {what} must be a list of strings, found {}",
                                    item.value.kind()
                                ),
                            );
                            return None;
                        }
                    }
                }
                Command::from_list(argv)
            }
            other => {
                self.error(
                    node.pos,
                    format!(
                        "the command of {what} must be a string or a list of strings, found {}",
                        other.kind()
                    ),
                );
                return None;
            }
        };
        match result {
            Ok(command) => Some(At::new(command, node.pos)),
            Err(error) => {
                self.error(node.pos, format!("the command of {what}: {error}"));
                None
            }
        }
    }

    fn list<'a>(&mut self, node: &'a Node, what: &str) -> &'a [Node] {
        match &node.value {
            Value::Seq(items) => items,
            Value::Null => &[],
            other => {
                self.error(
                    node.pos,
                    format!("{what} must be a list, found {}", other.kind()),
                );
                &[]
            }
        }
    }

    fn recipe(&mut self, root: &Node) -> Option<Recipe> {
        if matches!(root.value, Value::Null) {
            self.error(
                root.pos,
                "the file is empty: expected a `kind: Recipe` document",
            );
            return None;
        }
        let fields = self.fields(
            root,
            "the recipe",
            &["apiVersion", "kind", "metadata", "spec", "status"],
        )?;
        let api_version = match fields.get("apiVersion") {
            None => {
                self.error(
                    fields.pos,
                    format!(
                        "the recipe has no `apiVersion`; use `{}` or `{}`",
                        ApiVersion::RAMEN,
                        ApiVersion::FUSION
                    ),
                );
                None
            }
            Some(node) => match node.as_str() {
                Some(ApiVersion::RAMEN) => Some(ApiVersion::Ramen),
                Some(ApiVersion::FUSION) => Some(ApiVersion::Fusion),
                _ => {
                    self.error(
                        node.pos,
                        format!(
                            "unsupported apiVersion {}; use `{}` or `{}`",
                            describe(node, &node.value),
                            ApiVersion::RAMEN,
                            ApiVersion::FUSION
                        ),
                    );
                    None
                }
            },
        };
        match fields.get("kind") {
            None => self.error(
                fields.pos,
                "the recipe has no `kind`; expected `kind: Recipe`",
            ),
            Some(node) if node.as_str() == Some("Recipe") => {}
            Some(node) => self.error(
                node.pos,
                format!(
                    "expected `kind: Recipe`, found {}",
                    describe(node, &node.value)
                ),
            ),
        }
        if let Some(pos) = fields.key_pos("status") {
            self.warning(
                pos,
                "`status` is written by the Kubernetes controller and ignored here",
            );
        }
        let (mut name, mut namespace) = (None, None);
        if let Some(meta) = fields.get("metadata")
            && let Some(meta) = self.fields(meta, "metadata", METADATA_FIELDS)
        {
            name = self.optional_string(&meta, "name", "metadata");
            namespace = self.optional_string(&meta, "namespace", "metadata");
        }
        let Some(spec_node) = fields.get("spec") else {
            self.error(fields.pos, "the recipe has no `spec`");
            return None;
        };
        let spec = self.fields(
            spec_node,
            "spec",
            &["appType", "groups", "volumes", "hooks", "workflows", "jobs"],
        )?;
        if let Some(pos) = spec.key_pos("jobs") {
            self.warning(
                pos,
                "`spec.jobs` (Fusion job templates) is not supported by stillpoint and is ignored",
            );
        }
        let app_type = self.optional_string(&spec, "appType", "spec");
        let groups = match spec.get("groups") {
            Some(node) => self
                .list(node, "`spec.groups`")
                .iter()
                .filter_map(|g| self.group(g, None))
                .collect(),
            None => Vec::new(),
        };
        let volumes = spec
            .get("volumes")
            .and_then(|node| self.group(node, Some("volumes")));
        let hooks = match spec.get("hooks") {
            Some(node) => self
                .list(node, "`spec.hooks`")
                .iter()
                .filter_map(|h| self.hook(h))
                .collect(),
            None => Vec::new(),
        };
        let workflows = match spec.get("workflows") {
            Some(node) => self
                .list(node, "`spec.workflows`")
                .iter()
                .filter_map(|w| self.workflow(w))
                .collect(),
            None => Vec::new(),
        };
        Some(Recipe {
            pos: root.pos,
            parameters_unset: Vec::new(),
            api_version: api_version.unwrap_or(ApiVersion::Ramen),
            name,
            namespace,
            app_type,
            groups,
            volumes,
            hooks,
            workflows,
        })
    }

    /// A group; `fixed_name` is set for `spec.volumes`, which has no name of its own.
    fn group(&mut self, node: &Node, fixed_name: Option<&str>) -> Option<Group> {
        let mut known = vec!["name", "type", "labelSelector", "nameSelector", "essential"];
        known.extend_from_slice(GROUP_KUBERNETES_FIELDS);
        let what = match fixed_name {
            Some(_) => "`spec.volumes`",
            None => "a group",
        };
        let fields = self.fields(node, what, &known)?;
        let name = match fixed_name {
            Some(fixed) => match fields.get("name") {
                Some(n) => self
                    .string(n, "`name` of `spec.volumes`")
                    .map(|s| At::new(s, n.pos)),
                None => Some(At::new(fixed.to_owned(), node.pos)),
            },
            None => self.required_string(&fields, "name", "a group"),
        };
        let name = name?;
        let what_owned = format!("group `{}`", name.value);
        let what = what_owned.as_str();
        let group_type = match fields.get("type") {
            None if fixed_name.is_some() => At::new(GroupType::Volume, node.pos),
            None => {
                self.error(
                    fields.pos,
                    format!("{what} has no `type`; use `volume` (disks) or `resource`"),
                );
                At::new(GroupType::Volume, node.pos)
            }
            Some(t) => match t.as_str() {
                Some("volume") => At::new(GroupType::Volume, t.pos),
                Some("resource") => At::new(GroupType::Resource, t.pos),
                _ => {
                    self.error(
                        t.pos,
                        format!(
                            "`type` of {what} must be `volume` or `resource`, found {}",
                            describe(t, &t.value)
                        ),
                    );
                    At::new(GroupType::Volume, t.pos)
                }
            },
        };
        let name_selector = match fields.get("nameSelector") {
            None => Vec::new(),
            Some(n) => {
                match &n.value {
                    Value::String(s) => vec![At::new(s.clone(), n.pos)],
                    Value::Seq(items) => items
                        .iter()
                        .filter_map(|item| {
                            self.string(item, &format!("an entry of `nameSelector` of {what}"))
                                .map(|s| At::new(s, item.pos))
                        })
                        .collect(),
                    other => {
                        self.error(n.pos, format!("`nameSelector` of {what} must be a name or a list of names, found {}", other.kind()));
                        Vec::new()
                    }
                }
            }
        };
        let label_selector = fields
            .get("labelSelector")
            .and_then(|n| self.label_selector(n, what));
        let essential = self.boolean(&fields, "essential", what);
        let kubernetes_fields = fields
            .entries
            .iter()
            .filter(|(key, _, _)| GROUP_KUBERNETES_FIELDS.contains(key))
            .map(|(key, node, _)| At::new((*key).to_owned(), node.pos))
            .collect();
        Some(Group {
            name,
            pos: node.pos,
            group_type,
            name_selector,
            label_selector,
            essential,
            kubernetes_fields,
        })
    }

    fn label_selector(&mut self, node: &Node, what: &str) -> Option<At<LabelSelector>> {
        match &node.value {
            // Checked once the parameter is filled; the warning says it is not.
            Value::String(text) if has_placeholder(text) => None,
            Value::String(text) => match LabelSelector::parse_string(text) {
                Ok(selector) => Some(At::new(selector, node.pos)),
                Err((offset, message)) => {
                    self.error(
                        node.pos_in_content(offset),
                        format!("`labelSelector` of {what}: {message}"),
                    );
                    None
                }
            },
            Value::Map(_) => {
                let fields = self.fields(
                    node,
                    &format!("`labelSelector` of {what}"),
                    &["matchLabels", "matchExpressions"],
                )?;
                let mut labels = Vec::new();
                if let Some(map) = fields.get("matchLabels") {
                    if let Value::Map(entries) = &map.value {
                        for (key, value) in entries {
                            match (key.as_str(), value.scalar_text()) {
                                (Some(k), Some(v)) => labels.push((k.to_owned(), v)),
                                _ => self.error(
                                    key.pos,
                                    format!(
                                        "`matchLabels` of {what} must map label names to values"
                                    ),
                                ),
                            }
                        }
                    } else {
                        self.error(
                            map.pos,
                            format!(
                                "`matchLabels` of {what} must be a mapping, found {}",
                                map.value.kind()
                            ),
                        );
                    }
                }
                let mut expressions = Vec::new();
                if let Some(list) = fields.get("matchExpressions") {
                    for item in self.list(list, &format!("`matchExpressions` of {what}")) {
                        let Some(expr) =
                            self.fields(item, "a match expression", &["key", "operator", "values"])
                        else {
                            continue;
                        };
                        let key = self.required_string(&expr, "key", "a match expression");
                        let operator = match expr.get("operator") {
                            None => {
                                self.error(expr.pos, "a match expression has no `operator`; use In, NotIn, Exists or DoesNotExist");
                                None
                            }
                            Some(op) => match op.as_str() {
                                Some("In") => Some(SelectorOp::In),
                                Some("NotIn") => Some(SelectorOp::NotIn),
                                Some("Exists") => Some(SelectorOp::Exists),
                                Some("DoesNotExist") => Some(SelectorOp::DoesNotExist),
                                _ => {
                                    self.error(op.pos, format!("unknown operator {}; use In, NotIn, Exists or DoesNotExist", describe(op, &op.value)));
                                    None
                                }
                            },
                        };
                        let values: Vec<String> = match expr.get("values") {
                            Some(v) => self
                                .list(v, "`values` of a match expression")
                                .iter()
                                .filter_map(Node::scalar_text)
                                .collect(),
                            None => Vec::new(),
                        };
                        if let Some(operator) = operator {
                            let needs_values =
                                matches!(operator, SelectorOp::In | SelectorOp::NotIn);
                            if needs_values == values.is_empty() {
                                let message = if needs_values {
                                    "operators In and NotIn need a non-empty `values` list"
                                } else {
                                    "operators Exists and DoesNotExist take no `values`"
                                };
                                self.error(expr.pos, message);
                            }
                            if let Some(key) = key {
                                expressions.push(Requirement {
                                    key: key.value,
                                    operator,
                                    values,
                                });
                            }
                        }
                    }
                }
                Some(At::new(
                    LabelSelector::from_parts(labels, expressions),
                    node.pos,
                ))
            }
            other => {
                self.error(node.pos, format!("`labelSelector` of {what} must be a string (`app=db`) or a mapping with matchLabels/matchExpressions, found {}", other.kind()));
                None
            }
        }
    }

    fn hook(&mut self, node: &Node) -> Option<Hook> {
        let known = [
            "name",
            "namespace",
            "type",
            "selectResource",
            "labelSelector",
            "nameSelector",
            "singlePodOnly",
            "onError",
            "timeout",
            "ops",
            "chks",
            "essential",
            "target",
            "container",
            "skipHookIfNotPresent",
            "jobs",
        ];
        let fields = self.fields(node, "a hook", &known)?;
        let name = self.required_string(&fields, "name", "a hook")?;
        let what = format!("hook `{}`", name.value);
        let hook_type = match fields.get("type") {
            None => {
                self.error(
                    fields.pos,
                    format!("{what} has no `type`; use exec, check or scale"),
                );
                None
            }
            Some(t) => match t.as_str() {
                Some("exec") => Some(At::new(HookType::Exec, t.pos)),
                Some("check") => Some(At::new(HookType::Check, t.pos)),
                Some("scale") => Some(At::new(HookType::Scale, t.pos)),
                Some("job") => Some(At::new(HookType::Job, t.pos)),
                _ => {
                    self.error(
                        t.pos,
                        format!(
                            "`type` of {what} must be exec, check or scale, found {}",
                            describe(t, &t.value)
                        ),
                    );
                    None
                }
            },
        };
        let target = match fields.get("target") {
            None => At::new(Target::Guest, name.pos),
            Some(t) => match t.as_str() {
                Some("guest") => At::new(Target::Guest, t.pos),
                Some("host") => At::new(Target::Host, t.pos),
                _ => {
                    self.error(
                        t.pos,
                        format!(
                            "`target` of {what} must be `guest` or `host`, found {}",
                            describe(t, &t.value)
                        ),
                    );
                    At::new(Target::Guest, t.pos)
                }
            },
        };
        for ignored in ["skipHookIfNotPresent", "jobs"] {
            if let Some(pos) = fields.key_pos(ignored) {
                self.warning(
                    pos,
                    format!("`{ignored}` of {what} is not supported by stillpoint and is ignored"),
                );
            }
        }
        let namespace = self.optional_string(&fields, "namespace", &what);
        let container = self.optional_string(&fields, "container", &what);
        let select_resource = fields.get("selectResource").and_then(|n| {
            self.string(n, "`selectResource`")
                .map(|s| At::new(s, n.pos))
        });
        let name_selector = fields
            .get("nameSelector")
            .and_then(|n| self.string(n, "`nameSelector`").map(|s| At::new(s, n.pos)));
        let label_selector = fields
            .get("labelSelector")
            .and_then(|n| self.label_selector(n, &what));
        let single_pod_only = self
            .boolean(&fields, "singlePodOnly", &what)
            .unwrap_or(false);
        let on_error = self.on_error(&fields, &what);
        let timeout = self.seconds(&fields, "timeout", &what);
        let essential = self.boolean(&fields, "essential", &what);
        let ops = match fields.get("ops") {
            Some(list) => self
                .list(list, &format!("`ops` of {what}"))
                .iter()
                .filter_map(|op| self.op(op, &name.value))
                .collect(),
            None => Vec::new(),
        };
        let chks = match fields.get("chks") {
            Some(list) => self
                .list(list, &format!("`chks` of {what}"))
                .iter()
                .filter_map(|c| self.check(c, &name.value))
                .collect(),
            None => Vec::new(),
        };
        Some(Hook {
            pos: node.pos,
            hook_type: hook_type.unwrap_or(At::new(HookType::Exec, name.pos)),
            name,
            namespace,
            target,
            container,
            select_resource,
            name_selector,
            label_selector,
            single_pod_only,
            on_error,
            timeout,
            essential,
            ops,
            chks,
            restore_wait: None,
        })
    }

    fn op_ref(&mut self, fields: &Fields, field: &str, what: &str) -> Option<At<OpRef>> {
        let node = fields.get(field)?;
        let text = self.string(node, &format!("`{field}` of {what}"))?;
        match OpRef::parse(&text) {
            Some(op_ref) => Some(At::new(op_ref, node.pos)),
            None => {
                self.error(
                    node.pos,
                    format!("malformed `{field}` `{text}` of {what}: write OP, /OP or HOOK/OP"),
                );
                None
            }
        }
    }

    fn op(&mut self, node: &Node, hook: &str) -> Option<Op> {
        let known = [
            "name",
            "container",
            "command",
            "onError",
            "timeout",
            "inverseOp",
            "background",
            "ends",
            "env",
            "stdin",
        ];
        let fields = self.fields(node, &format!("an op of hook `{hook}`"), &known)?;
        let name = self.required_string(&fields, "name", &format!("an op of hook `{hook}`"))?;
        let what = format!("op `{hook}/{}`", name.value);
        let command = match fields.get("command") {
            Some(c) => self.command(c, &what),
            None => None,
        };
        let env = match fields.get("env") {
            None => Vec::new(),
            Some(env) => match &env.value {
                Value::Map(entries) => entries
                    .iter()
                    .filter_map(|(k, v)| match (k.as_str(), v.scalar_text()) {
                        (Some(k), Some(v)) => Some((k.to_owned(), v)),
                        _ => {
                            self.error(
                                k.pos,
                                format!("`env` of {what} must map variable names to values"),
                            );
                            None
                        }
                    })
                    .collect(),
                other => {
                    self.error(
                        env.pos,
                        format!(
                            "`env` of {what} must be a mapping of NAME: value, found {}",
                            other.kind()
                        ),
                    );
                    Vec::new()
                }
            },
        };
        let stdin = fields.get("stdin").and_then(|n| match &n.value {
            Value::String(s) => Some(s.clone()),
            other => {
                self.error(
                    n.pos,
                    format!("`stdin` of {what} must be a string, found {}", other.kind()),
                );
                None
            }
        });
        Some(Op {
            pos: node.pos,
            container: self.optional_string(&fields, "container", &what),
            command,
            command_written: fields.get("command").is_some(),
            on_error: self.on_error(&fields, &what),
            timeout: self.seconds(&fields, "timeout", &what),
            inverse_op: self.op_ref(&fields, "inverseOp", &what),
            background: self.boolean(&fields, "background", &what).unwrap_or(false),
            ends: self.op_ref(&fields, "ends", &what),
            env,
            stdin,
            image: None,
            name,
        })
    }

    fn check(&mut self, node: &Node, hook: &str) -> Option<Check> {
        let known = [
            "name",
            "condition",
            "onError",
            "timeout",
            "command",
            "interval",
        ];
        let fields = self.fields(node, &format!("a check of hook `{hook}`"), &known)?;
        let name = self.required_string(&fields, "name", &format!("a check of hook `{hook}`"))?;
        let what = format!("check `{hook}/{}`", name.value);
        let condition = match fields.get("condition") {
            None => {
                self.error(fields.pos, format!("{what} has no `condition`"));
                None
            }
            Some(c) => match self.string(c, &format!("`condition` of {what}")) {
                None => None,
                Some(text) => match Condition::parse(&text) {
                    Ok(condition) => Some(At::new(condition, c.pos)),
                    Err(error) => {
                        self.error(
                            c.pos_in_content(error.offset),
                            format!("bad condition in {what}: {}", error.message),
                        );
                        None
                    }
                },
            },
        };
        let command = match fields.get("command") {
            Some(c) => self.command(c, &what),
            None => None,
        };
        Some(Check {
            pos: node.pos,
            condition,
            command,
            on_error: self.on_error(&fields, &what),
            timeout: self.seconds(&fields, "timeout", &what),
            interval: self.seconds(&fields, "interval", &what),
            name,
        })
    }

    fn workflow(&mut self, node: &Node) -> Option<Workflow> {
        let fields = self.fields(
            node,
            "a workflow",
            &["name", "sequence", "failOn", "priority"],
        )?;
        let name = self.required_string(&fields, "name", "a workflow")?;
        let what = format!("workflow `{}`", name.value);
        if let Some(pos) = fields.key_pos("priority") {
            self.warning(pos, format!("`priority` of {what} is ignored: stillpoint runs one workflow at a time, never in parallel"));
        }
        let fail_on = match fields.get("failOn") {
            None => FailOn::AnyError,
            Some(f) => match f.as_str() {
                Some("any-error") => FailOn::AnyError,
                Some("essential-error") => FailOn::EssentialError,
                Some("full-error") => FailOn::FullError,
                _ => {
                    self.error(f.pos, format!("`failOn` of {what} must be any-error, essential-error or full-error, found {}", describe(f, &f.value)));
                    FailOn::AnyError
                }
            },
        };
        let mut sequence = Vec::new();
        match fields.get("sequence") {
            None => self.error(fields.pos, format!("{what} has no `sequence`")),
            Some(list) => {
                for item in self.list(list, &format!("`sequence` of {what}")) {
                    if let Some(step) = self.step(item, &what) {
                        sequence.push(step);
                    }
                }
            }
        }
        Some(Workflow {
            name,
            pos: node.pos,
            fail_on,
            sequence,
        })
    }

    fn step(&mut self, node: &Node, what: &str) -> Option<Step> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                format!(
                    "a step of {what} must be `group: NAME` or `hook: HOOK/OP`, found {}",
                    node.value.kind()
                ),
            );
            return None;
        };
        let keys: Vec<&str> = entries.iter().filter_map(|(k, _)| k.as_str()).collect();
        if entries.len() != 1 {
            let message = if keys.contains(&"group") && keys.contains(&"hook") {
                format!(
                    "a step of {what} names both a group and a hook; a step does one thing. A hook cannot run \
                     inside the capture: the guest is frozen then and its agent refuses guest-exec. Put the hook \
                     in its own step before or after the group"
                )
            } else if entries.is_empty() {
                format!("a step of {what} is empty; write `group: NAME` or `hook: HOOK/OP`")
            } else {
                format!(
                    "a step of {what} has {} keys ({}); write one of `group: NAME`, `hook: HOOK/OP` or `workflow: NAME`",
                    entries.len(),
                    keys.join(", ")
                )
            };
            self.error(node.pos, message);
            return None;
        }
        let (key, value) = &entries[0];
        let text = value.scalar_text();
        match key.as_str() {
            Some("group") => {
                let name = self.string(value, &format!("the group of a step of {what}"))?;
                let _ = text;
                Some(Step {
                    kind: StepKind::Group(name),
                    pos: value.pos,
                })
            }
            Some("workflow") => {
                let name = self.string(value, &format!("the workflow of a step of {what}"))?;
                Some(Step {
                    kind: StepKind::Workflow(name),
                    pos: value.pos,
                })
            }
            Some("hook") => {
                let reference = self.string(value, &format!("the hook of a step of {what}"))?;
                match reference.split_once('/') {
                    Some((hook, item))
                        if !hook.trim().is_empty()
                            && !item.trim().is_empty()
                            && !item.contains('/') =>
                    {
                        Some(Step {
                            kind: StepKind::Hook {
                                hook: hook.trim().into(),
                                item: item.trim().into(),
                            },
                            pos: value.pos,
                        })
                    }
                    _ => {
                        self.error(value.pos, format!("malformed hook reference `{reference}` in {what}: write HOOK/OP or HOOK/CHECK (exactly one `/`)"));
                        None
                    }
                }
            }
            Some(other) => {
                let hint = suggestion(other, &["group", "hook", "workflow"])
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.error(
                    key.pos,
                    format!("unknown step kind `{other}` in {what}{hint}"),
                );
                None
            }
            None => {
                self.error(
                    key.pos,
                    format!("a step of {what} has a key that is {}", key.value.kind()),
                );
                None
            }
        }
    }
}

/// `"30s"` → `a string "30s"`, numbers as written: for messages.
fn describe(node: &Node, value: &Value) -> String {
    match (value, node.scalar_text()) {
        (Value::String(s), _) => format!("\"{s}\""),
        (_, Some(text)) => format!("{} ({text})", value.kind()),
        _ => value.kind().to_owned(),
    }
}

/// The known name closest to `name` (edit distance ≤ 2, or same when case is ignored).
fn suggestion<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(&name.to_lowercase(), &k.to_lowercase()), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_and_case() {
        assert_eq!(
            suggestion("inverseop", &["inverseOp", "onError"]),
            Some("inverseOp")
        );
        assert_eq!(suggestion("timeot", &["timeout"]), Some("timeout"));
        assert_eq!(suggestion("zzzzzz", &["timeout"]), None);
    }

    #[test]
    fn a_minimal_recipe_parses_into_the_model() {
        let parsed = parse_recipe(
            "apiVersion: ramendr.openshift.io/v1alpha1\nkind: Recipe\nmetadata: {name: r}\nspec:\n  appType: demo\n  \
             groups: [{name: disks, type: volume}]\n  hooks:\n  - name: db\n    type: exec\n    ops:\n    - {name: lock, command: 'echo hi', inverseOp: unlock}\n    \
             - {name: unlock, command: [echo, bye], timeout: 5}\n  workflows:\n  - name: backup\n    sequence:\n    - hook: db/lock\n    - group: disks\n    - hook: db/unlock\n",
        );
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        let recipe = parsed.recipe.unwrap();
        assert_eq!(
            recipe.hooks[0].ops[0].command.as_ref().unwrap().value.argv,
            ["echo", "hi"]
        );
        assert_eq!(recipe.hooks[0].ops[1].timeout, Some(Duration::from_secs(5)));
        assert_eq!(
            recipe.hooks[0].ops[0].inverse_op.as_ref().unwrap().value,
            OpRef {
                hook: None,
                op: "unlock".into()
            }
        );
        assert_eq!(recipe.workflows[0].sequence.len(), 3);
        assert_eq!(recipe.hooks[0].target.value, Target::Guest);
    }

    #[test]
    fn op_refs_accept_the_three_ramen_forms() {
        assert_eq!(
            OpRef::parse("h/o"),
            Some(OpRef {
                hook: Some("h".into()),
                op: "o".into()
            })
        );
        assert_eq!(
            OpRef::parse("/o"),
            Some(OpRef {
                hook: None,
                op: "o".into()
            })
        );
        assert_eq!(
            OpRef::parse("o"),
            Some(OpRef {
                hook: None,
                op: "o".into()
            })
        );
        assert_eq!(OpRef::parse("a/b/c"), None);
        assert_eq!(OpRef::parse("h/"), None);
    }
}
