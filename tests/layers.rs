//! The floors of `src/`: every top-level module has a floor, and imports go only down (or
//! sideways on the same floor), never up, and never in a cycle. A new top-level module fails
//! this test until it is given a floor here (and in docs/ARCHITECTURE.md), which is the rule
//! for where new code goes. Floor 0 modules import nothing of the crate.
//!
//! Imports are read from the source text: every `crate::name` path (also inside `use
//! crate::{...}` groups) outside `#[cfg(test)]` modules, attributed to the top-level module of
//! the file it is in. Doc comments and line comments are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The floors, bottom up (docs/ARCHITECTURE.md draws them).
const FLOORS: &[(&str, u8)] = &[
    // 0: leaves
    ("telemetry", 0),
    ("clock", 0),
    ("feedback_id", 0),
    ("live", 0),
    ("notify", 0),
    ("rfc5321", 0),
    ("secret_file", 0),
    // 1: values every layer passes around
    ("message", 1),
    ("tls", 1),
    ("taxonomy", 1),
    // 2
    ("config", 2),
    // 3: domain
    ("auth", 3),
    ("verp", 3),
    ("origin", 3),
    ("bounce", 3),
    ("dkim", 3),
    ("maillog", 3),
    ("routing", 3),
    ("suppression", 3),
    ("cluster", 3),
    ("events", 3),
    // 4: services
    ("delivery", 4),
    ("shaping", 4),
    ("feedback", 4),
    ("sidecar", 4),
    ("sendtime", 4),
    ("unsubscribe", 4),
    ("tlsrpt", 4),
    ("enqueue", 4),
    ("outcome", 4),
    // 5
    ("intake", 5),
    ("scheduler", 5),
    ("policy", 5),
    // 6: edges
    ("smtp", 6),
    ("admin", 6),
    // 7: composition
    ("daemon", 7),
    ("reload", 7),
    ("cli", 7),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its test module and without comments.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            // Good enough for this tree: no `//` inside string literals before a path.
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules `code` names through `crate::`.
fn imported(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        if i > 0 {
            let before = code[..i].chars().next_back().unwrap();
            if before.is_ascii_alphanumeric() || before == '_' || before == ':' {
                continue; // `tern_crate::` or `$crate::`-like paths are not ours
            }
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c, d::{e, f}}`: the first segment of each top-level item.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_ascii_alphanumeric() || c == '_') => {
                        out.insert(ident_at(&group[j..]).to_string());
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident_at(rest);
            if !name.is_empty() {
                out.insert(name.to_string());
            }
        }
    }
    out
}

fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Module -> the other top-level modules it imports (lib.rs and main.rs excluded).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy();
        if file.parent() == Some(src.as_path()) && (name == "lib.rs" || name == "main.rs") {
            continue;
        }
        let module = top_module(&src, &file);
        let text = std::fs::read_to_string(&file).unwrap();
        let entry = graph.entry(module.clone()).or_default();
        for target in imported(&code(&text)) {
            if target != module && target != "self" && target != "super" {
                entry.insert(target);
            }
        }
    }
    graph
}

#[test]
fn every_module_has_a_floor_and_imports_only_downwards() {
    let floors: BTreeMap<&str, u8> = FLOORS.iter().copied().collect();
    let graph = graph();
    let mut problems = Vec::new();
    for (module, targets) in &graph {
        let Some(&floor) = floors.get(module.as_str()) else {
            problems.push(format!(
                "src/{module}: no floor; give it one in tests/layers.rs and docs/ARCHITECTURE.md"
            ));
            continue;
        };
        for target in targets {
            match floors.get(target.as_str()) {
                None => problems.push(format!("{module} imports {target}, which has no floor")),
                Some(_) if floor == 0 => {
                    problems.push(format!("{module} is a leaf (floor 0) but imports {target}"))
                }
                Some(&t) if t > floor => problems.push(format!(
                    "{module} (floor {floor}) imports {target} (floor {t}): upwards"
                )),
                Some(_) => {}
            }
        }
    }
    for name in floors.keys() {
        if !graph.contains_key(*name) {
            problems.push(format!("{name} has a floor but no source in src/"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_import_cycles_between_top_level_modules() {
    // Depth-first search for a back edge; reports one cycle as a path.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let from = path.iter().position(|n| n == next).unwrap();
                    let mut cycle = path[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, state, path) {
                        return Some(cycle);
                    }
                }
            }
        }
        path.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let graph = graph();
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node) {
            if let Some(cycle) = visit(node, &graph, &mut state, &mut Vec::new()) {
                panic!("import cycle: {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_import_reader_sees_grouped_and_plain_paths() {
    let code = "use crate::config::{A, B};\nuse crate::{message::Submission, tls};\nlet x = crate::clock::now();\nuse tern_crate::x;";
    let found = imported(code);
    let want: BTreeSet<String> = ["config", "message", "tls", "clock"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, want);
}
