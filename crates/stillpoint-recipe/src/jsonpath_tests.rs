use serde_json::{Value as Json, json};

use super::*;

/// The input of kubectl's "JSONPath Support" page
/// (https://kubernetes.io/docs/reference/kubectl/jsonpath/).
fn kubectl_doc_input() -> Json {
    json!({
      "kind": "List",
      "items":[
        {
          "kind":"None",
          "metadata":{
            "name":"127.0.0.1",
            "labels":{
              "kubernetes.io/hostname":"127.0.0.1"
            }
          },
          "status":{
            "capacity":{"cpu":"4"},
            "addresses":[{"type": "LegacyHostIP", "address":"127.0.0.1"}]
          }
        },
        {
          "kind":"None",
          "metadata":{"name":"127.0.0.2"},
          "status":{
            "capacity":{"cpu":"8"},
            "addresses":[
              {"type": "LegacyHostIP", "address":"127.0.0.2"},
              {"type": "another", "address":"127.0.0.3"}
            ]
          }
        }
      ],
      "users":[
        {
          "name": "myself",
          "user": {}
        },
        {
          "name": "e2e",
          "user": {"username": "admin", "password": "secret"}
        }
      ]
    })
}

/// Prints values as kubectl does (`PrintResults`: Go's `fmt.Fprint` of each, joined by a space).
fn kubectl_print(values: &[&Json]) -> String {
    fn go(value: &Json) -> String {
        match value {
            Json::Null => "<nil>".into(),
            Json::String(s) => s.clone(),
            Json::Bool(b) => b.to_string(),
            Json::Number(n) => n.to_string(),
            Json::Array(items) => {
                format!("[{}]", items.iter().map(go).collect::<Vec<_>>().join(" "))
            }
            Json::Object(map) => format!(
                "map[{}]",
                map.iter()
                    .map(|(k, v)| format!("{k}:{}", go(v)))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }
    values.iter().map(|v| go(v)).collect::<Vec<_>>().join(" ")
}

fn printed(path: &str, doc: &Json) -> String {
    let parsed = JsonPath::parse(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    kubectl_print(&parsed.select(doc))
}

/// Each expression of the page's table (the part inside `{…}`) with the output kubectl prints.
#[test]
fn the_kubectl_documentation_table_prints_what_kubectl_prints() {
    let doc = kubectl_doc_input();
    let table = [
        // child operator
        (".kind", "List"),
        ("['kind']", "List"),
        ("$.kind", "List"),
        // recursive descent
        ("..name", "127.0.0.1 127.0.0.2 myself e2e"),
        // wildcard: the page shows `[127.0.0.1 127.0.0.2]`, but kubectl prints the two
        // results joined by a space (PrintResults); there is no list to print brackets for.
        (".items[*].metadata.name", "127.0.0.1 127.0.0.2"),
        // subscript operator
        (".users[0].name", "myself"),
        // union operator; a quoted name is a path in kubectl
        (
            ".items[*]['metadata.name', 'status.capacity']",
            "127.0.0.1 127.0.0.2 map[cpu:4] map[cpu:8]",
        ),
        // filter
        (".users[?(@.name==\"e2e\")].user.password", "secret"),
        // escaping the `.` of a label key
        (
            ".items[0].metadata.labels.kubernetes\\.io/hostname",
            "127.0.0.1",
        ),
        // negative indices and slices (the page's note on them)
        (".items[-1].metadata.name", "127.0.0.2"),
        (".items[-1:].metadata.name", "127.0.0.2"),
        (".users[0:1].name", "myself"),
        (".items[-5].metadata.name", ""),
    ];
    for (path, expected) in table {
        assert_eq!(printed(path, &doc), expected, "{{{path}}}");
    }
    // `{@}` is the input itself.
    let whole = JsonPath::parse("@").unwrap();
    assert_eq!(whole.select(&doc), vec![&doc]);
}

#[test]
fn the_rows_that_print_text_are_refused_with_a_reason() {
    // `{range .items[*]}[{.metadata.name}, {.status.capacity}] {end}` and the `{'\t'}` row
    // print text around values; an operand of a condition is one value.
    for (path, needle) in [("range .items[*]", "range/end"), ("end", "range/end")] {
        let error = JsonPath::parse(path).unwrap_err();
        assert_eq!(error.offset, 0, "{path}");
        assert!(error.message.contains(needle), "{path}: {error}");
    }
}

#[test]
fn filters_as_recipes_write_them() {
    let pod = json!({"status": {"conditions": [
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": "False", "count": 2, "ok": false},
        {"type": "ContainersReady", "status": "True", "count": 5}
    ]}});
    let table = [
        (".status.conditions[?(@.type==\"Ready\")].status", "False"),
        ("$.status.conditions[?(@.type=='Ready')].status", "False"),
        (
            "$.status.conditions[?( @.type != 'Ready' )].type",
            "Initialized ContainersReady",
        ),
        (
            "$.status.conditions[?(@.count > 2)].type",
            "ContainersReady",
        ),
        ("$.status.conditions[?(@.count >= 2)].count", "2 5"),
        ("$.status.conditions[?(@.count<3)].type", "Ready"),
        ("$.status.conditions[?(@.ok == false)].type", "Ready"),
        // exists; and an element without the field does not match (kubectl would fail)
        (
            "$.status.conditions[?(@.count)].type",
            "Ready ContainersReady",
        ),
        // path on both sides; `$` in a filter is the element, as in kubectl
        (
            "$.status.conditions[?(@.type == $.type)].type",
            "Initialized Ready ContainersReady",
        ),
        // a string never equals a number: no conversion in filters
        ("$.status.conditions[?(@.count == \"2\")].type", ""),
        // quotes may hold `)`, `]` and `}`
        ("$.status.conditions[?(@.type == \"a)]}\")].type", ""),
        // nothing to filter
        ("$.status[?(@.type==\"Ready\")]", ""),
        ("$.nope[?(@.type==\"Ready\")]", ""),
    ];
    for (path, expected) in table {
        assert_eq!(printed(path, &pod), expected, "{{{path}}}");
    }
}

#[test]
fn wildcards_unions_slices_and_recursive_descent() {
    let doc = json!({"a": [0, 1, 2, 3, 4, 5], "m": {"x": {"k": 1}, "y": {"k": 2}}, "s": "text"});
    let table = [
        ("$.a[*]", "0 1 2 3 4 5"),
        ("$.a.*", "0 1 2 3 4 5"),
        ("$.m.*.k", "1 2"),
        ("$.m[*].k", "1 2"),
        ("$.a[1:3]", "1 2"),
        ("$.a[:2]", "0 1"),
        ("$.a[4:]", "4 5"),
        ("$.a[::2]", "0 2 4"),
        ("$.a[-2:]", "4 5"),
        ("$.a[2:100]", "2 3 4 5"),
        ("$.a[0,2,-1]", "0 2 5"),
        ("$.m['x','y']", "map[k:1] map[k:2]"),
        ("$.m['x.k', 'y.k']", "1 2"),
        ("$..k", "1 2"),
        ("$.m..k", "1 2"),
        ("$..[0]", "0"),
        ("$.a[9]", ""),
        ("$.s[0]", ""),
        ("$.s.length", ""),
        ("$.m[\"x\"].k", "1"),
    ];
    for (path, expected) in table {
        assert_eq!(printed(path, &doc), expected, "{{{path}}}");
    }
}

#[test]
fn syntax_errors_point_at_the_offending_character() {
    let cases = [
        ("$.a.", 3, "field name after `.`"),
        ("$.a...b", 3, "one recursive descent"),
        ("$..", 1, "after the recursive descent"),
        ("$.a[", 3, "never closed"),
        ("$.a[]", 4, "empty `[]`"),
        ("$.a[x]", 4, "not supported"),
        ("$.a[0, y]", 7, "not supported"),
        ("$.a[1:2:3:4]", 4, "at most"),
        ("$.a[::0]", 4, "positive"),
        (
            "$.a[?(@.x == 1 && @.y == 2)]",
            15,
            "not supported inside a filter",
        ),
        ("$.a[?(@.x =~ \"y\")]", 10, "`=~`"),
        ("$.a[?(@.x = 1)]", 10, "use =="),
        ("$.a[?(@.x == Ready)]", 13, "quote strings"),
        ("$.a[?(@.x == \"Ready)]", 13, "never closed"),
        ("$.a[?(@.x == 1]", 14, "expected an operator or `)]`"),
        ("$.a[?(@.x == 1", 3, "never closed"),
        ("$.a[?@.x == 1]", 3, "with parentheses"),
        ("$.a['b]", 3, "never closed"),
        ("$x", 1, "expected `.name`"),
        ("$.a b", 3, "unexpected ` `"),
        ("$.a\\", 3, "escapes nothing"),
    ];
    for (path, offset, needle) in cases {
        let error = JsonPath::parse(path).unwrap_err();
        assert_eq!(error.offset, offset, "{path:?}: {error}");
        assert!(
            error.message.contains(needle),
            "{path:?}: {}",
            error.message
        );
    }
}

#[test]
fn deeply_nested_filters_are_an_error_not_a_stack_overflow() {
    let path = format!("$.a{}", "[?(@.b".repeat(10_000));
    let error = JsonPath::parse(&path).unwrap_err();
    assert!(error.message.contains("nest more than"), "{error}");
}

proptest::proptest! {
    #[test]
    fn any_text_parses_or_fails_and_selects_without_panic(text in "[$@.a-c0-9*\\[\\]?()='\" ,:<>!&|~-]{0,40}") {
        let doc = json!({"a": [{"b": 1, "c": "x"}, {"b": [2, {"a": 3}]}], "b": {"c": null}});
        match JsonPath::parse(&text) {
            Ok(path) => { let _ = path.select(&doc); }
            Err(error) => proptest::prop_assert!(error.offset <= text.chars().count(), "{text:?}: {error}"),
        }
    }
}

/// The examples of the dialect table in docs/recipes.md, with what the table says they select.
#[test]
fn the_examples_in_docs_recipes_select_what_the_doc_says() {
    let doc = json!({"items":[{"metadata":{"name":"a","labels":{"kubernetes.io/hostname":"n1"}}},{"metadata":{"name":"b"}}]});
    let table = [
        (".items[0].metadata.name", "a"),
        ("$['items'][1]['metadata.name']", "b"),
        (".items[0].metadata.labels.kubernetes\\.io/hostname", "n1"),
        (".items[-1].metadata.name", "b"),
        (".items[0:1].metadata.name", "a"),
        (".items[*].metadata.name", "a b"),
        (".items[0,1].metadata.name", "a b"),
        ("..name", "a b"),
        (".items[?(@.metadata.name==\"b\")].metadata.name", "b"),
        (".items[?(@.metadata.labels)].metadata.name", "a"),
        (".items.length", ""),
    ];
    for (path, expected) in table {
        assert_eq!(printed(path, &doc), expected, "{{{path}}}");
    }
    for unsupported in [
        "range .items[*]",
        ".items[?(@.a==1 && @.b==2)]",
        ".items[?(@.name=~\"db-.*\")]",
        ".items[?@.type==\"Ready\"]",
    ] {
        assert!(JsonPath::parse(unsupported).is_err(), "{unsupported}");
    }
}
