//! The parser and validator never panic, whatever the bytes: random input, and mutations of the
//! real examples and the broken corpus (byte flips, truncations, splices). Complements the
//! cargo-fuzz target in `fuzz/`, which needs a nightly toolchain.

use std::path::Path;

use proptest::prelude::*;
use stillpoint_recipe::velero::parse_annotations;
use stillpoint_recipe::{PlanOptions, ValidateOptions, check_any_source, plan_workflow};

fn seeds() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds = Vec::new();
    for dir in [
        root.join("../../examples/recipes"),
        root.join("tests/broken"),
    ] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                seeds.push(std::fs::read(path).unwrap());
            }
        }
    }
    assert!(seeds.len() > 10);
    seeds
}

fn exercise(bytes: &[u8]) {
    let source = String::from_utf8_lossy(bytes);
    let (recipe, _diagnostics) = check_any_source(&source, &ValidateOptions::default());
    if let Some(recipe) = recipe {
        for workflow in &recipe.workflows {
            let _ = plan_workflow(&recipe, &workflow.name.value, &PlanOptions::default());
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let tokens: Vec<Vec<u8>> = [
        "{",
        "}",
        "[",
        "]",
        ":",
        "- ",
        "\n",
        "  ",
        "\t",
        "'",
        "\"",
        "&a ",
        "*a",
        "!!binary ",
        "/",
        "{$.",
        "==",
        "&&",
        "(",
        "\u{00e9}",
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect();
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Flip(at, byte)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::sample::select(tokens))
            .prop_map(|(at, token)| Mutation::Insert(at, token)),
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Delete(at, len)),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip(at, byte) => {
                if !bytes.is_empty() {
                    bytes[at % len] = *byte;
                }
            }
            Mutation::Truncate(at) => bytes.truncate(at % len),
            Mutation::Insert(at, token) => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, token.iter().copied());
            }
            Mutation::Delete(at, n) => {
                let start = at % len;
                let end = (start + n).min(bytes.len());
                if start < end {
                    bytes.drain(start..end);
                }
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        exercise(&bytes);
    }

    #[test]
    fn mutated_corpus_never_panics(seed in 0usize..1000, mutations in proptest::collection::vec(mutation(), 1..8)) {
        let seeds = seeds();
        let bytes = apply(seeds[seed % seeds.len()].clone(), &mutations);
        exercise(&bytes);
    }

    #[test]
    fn arbitrary_annotations_never_panic(
        entries in proptest::collection::btree_map(
            proptest::sample::select(vec![
                "pre.hook.backup.velero.io/command", "pre.hook.backup.velero.io/timeout", "pre.hook.backup.velero.io/on-error",
                "hook.backup.velero.io/command", "post.hook.backup.velero.io/command", "post.hook.restore.velero.io/wait-timeout",
                "post.hook.restore.velero.io/command", "init.hook.restore.velero.io/command", "post.hook.restore.velero.io/x",
            ]).prop_map(str::to_owned),
            ".{0,40}",
            0..6,
        )
    ) {
        let _ = parse_annotations(&entries);
    }
}

#[test]
fn deeply_nested_and_alias_heavy_documents_are_refused_cleanly() {
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let (recipe, diagnostics) = check_any_source(&deep, &ValidateOptions::default());
    assert!(recipe.is_none() && !diagnostics.is_empty());
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
    for i in 0..12 {
        let prev = if i == 0 {
            "a".to_owned()
        } else {
            format!("a{}", i - 1)
        };
        bomb.push_str(&format!("a{i}: &a{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    let (recipe, diagnostics) = check_any_source(&bomb, &ValidateOptions::default());
    assert!(recipe.is_none() && !diagnostics.is_empty());
}
