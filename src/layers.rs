//! The architecture test: imports point down the layers, never up, and modules form no cycle.
//!
//! It reads every file under `src/` (the library; `main.rs` is the binary's edge and may use anything),
//! finds each `crate::…` and `super::…` path outside comments and string literals, resolves it to the
//! module it names, and fails naming the file, the line and the edge when
//! - the target's layer is above the importer's ([`LAYERS`]), or
//! - two modules import each other, directly or through others (between top-level modules, and between
//!   the submodules of one module; a module and its own parent or child are one unit).
//!
//! Unit tests may import `crate::config` to build fixtures the way a person writes them; nothing else
//! is exempt. ARCHITECTURE.md explains the layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may import its own layer (without cycles) and the layers below.
/// A module is matched by its longest listed prefix (`replication::pgoutput` before `replication`).
pub const LAYERS: &[(&str, &[&str])] = &[
    (
        "model",
        &[
            "lsn",
            "clock",
            "pg",
            "primer",
            "sqlscan",
            "report",
            "replication::pgoutput",
        ],
    ),
    (
        "state",
        &[
            "deps",
            "queue",
            "visibility",
            "store",
            "auth",
            "telemetry",
            "plan",
        ],
    ),
    (
        "flow",
        &[
            "replication",
            "refresh",
            "freshness",
            "update",
            "invalidate",
        ],
    ),
    (
        "serve",
        &["http", "listen", "openapi", "schedule", "jobs", "ops"],
    ),
    ("wiring", &["config", "app"]),
    ("commands", &["cli", "fuzzing"]),
];

/// Test code may build its fixtures through these.
const TEST_FIXTURES: &[&str] = &["config"];

/// One `crate::`/`super::` path in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub file: String,
    pub line: usize,
    pub from: String,
    pub to: String,
    pub in_test: bool,
}

/// `a::b::c`'s layer index, by the longest listed prefix.
fn layer_of(module: &str) -> Option<(usize, &'static str)> {
    let mut best: Option<(usize, usize, &'static str)> = None;
    for (i, (name, members)) in LAYERS.iter().enumerate() {
        for m in members.iter() {
            let matches = module == *m || module.starts_with(&format!("{m}::"));
            if matches && best.is_none_or(|(len, _, _)| m.len() > len) {
                best = Some((m.len(), i, name));
            }
        }
    }
    best.map(|(_, i, name)| (i, name))
}

/// Blank out comments, string and char literals (keeping newlines, so line numbers hold).
fn code_only(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !b
                .get(i.wrapping_sub(1))
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                match b.get(j) {
                    None => break,
                    Some('"') if (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) => {
                        j += 1 + hashes;
                        break;
                    }
                    Some(_) => j += 1,
                }
            }
            for ch in &b[i..j.min(b.len())] {
                out.push(blank(*ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\''), or a lifetime ('a): only literals are blanked.
            if next == Some('\\') {
                let mut j = i + 2;
                while j < b.len() && b[j] != '\'' {
                    j += 1;
                }
                for _ in i..=j.min(b.len() - 1) {
                    out.push(' ');
                }
                i = j + 1;
            } else if b.get(i + 2) == Some(&'\'') {
                out.push_str("   ");
                i += 3;
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_at(b: &[char], mut i: usize) -> (String, usize) {
    let mut s = String::new();
    while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
        s.push(b[i]);
        i += 1;
    }
    (s, i)
}

fn skip_ws(b: &[char], mut i: usize) -> usize {
    while i < b.len() && b[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The paths of a use tree starting at `i` (just after `crate::`): `a::b`, `{a, b::{c, d}}`, `a::*`.
fn paths_at(b: &[char], i: usize, prefix: &[String], out: &mut Vec<(Vec<String>, usize)>) -> usize {
    let i = skip_ws(b, i);
    if b.get(i) == Some(&'{') {
        let mut j = i + 1;
        loop {
            j = skip_ws(b, j);
            match b.get(j) {
                None => return j,
                Some('}') => return j + 1,
                Some(',') => j += 1,
                Some(_) => {
                    let before = j;
                    j = paths_at(b, j, prefix, out);
                    if j == before {
                        j += 1;
                    }
                }
            }
        }
    }
    let (ident, j) = ident_at(b, i);
    if ident.is_empty() {
        if !prefix.is_empty() {
            out.push((prefix.to_vec(), i));
        }
        return if b.get(i) == Some(&'*') { i + 1 } else { i };
    }
    let mut path = prefix.to_vec();
    path.push(ident);
    let k = skip_ws(b, j);
    if b.get(k) == Some(&':') && b.get(k + 1) == Some(&':') {
        paths_at(b, k + 2, &path, out)
    } else {
        out.push((path, i));
        j
    }
}

/// The module a file defines: `src/ops/status.rs` → `ops::status`, `src/store/mod.rs` → `store`.
fn module_of(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).unwrap_or(file).with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Every `crate::` and `super::` edge of one file whose module is `module`; `modules` is every module
/// of the crate (to tell a module from an item at the end of a path).
pub fn edges_of(
    file: &str,
    module: &[String],
    text: &str,
    modules: &BTreeSet<String>,
) -> Vec<Edge> {
    let code = code_only(text);
    let b: Vec<char> = code.chars().collect();
    let mut edges = Vec::new();
    // The line of each character.
    let mut line_at = Vec::with_capacity(b.len());
    let mut n = 1;
    for ch in &b {
        line_at.push(n);
        if *ch == '\n' {
            n += 1;
        }
    }
    // Inline modules: (path, brace depth at which it closes).
    let mut inline: Vec<(Vec<String>, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut test_depth: Option<usize> = None;
    let mut pending_test = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                if test_depth == Some(depth) {
                    test_depth = None;
                }
            }
            _ => {}
        }
        let at_word = i == 0 || !(b[i - 1].is_alphanumeric() || b[i - 1] == '_' || b[i - 1] == ':');
        if c == '#' && b[i..].iter().take(12).collect::<String>() == "#[cfg(test)]" {
            pending_test = true;
        }
        if at_word && (c.is_alphabetic() || c == '_') {
            let (word, j) = ident_at(&b, i);
            let current: Vec<String> = inline
                .last()
                .map(|(p, _)| p.clone())
                .unwrap_or_else(|| module.to_vec());
            if word == "mod" {
                let k = skip_ws(&b, j);
                let (name, k2) = ident_at(&b, k);
                let k3 = skip_ws(&b, k2);
                if !name.is_empty() && b.get(k3) == Some(&'{') {
                    let mut p = current.clone();
                    p.push(name);
                    inline.push((p, depth));
                    if pending_test && test_depth.is_none() {
                        test_depth = Some(depth);
                    }
                }
                pending_test = false;
            } else if (word == "crate" || word == "super")
                && b.get(j) == Some(&':')
                && b.get(j + 1) == Some(&':')
            {
                let base: Vec<String> = if word == "crate" {
                    Vec::new()
                } else {
                    // `super` is the parent of the module the path is in (inline or file).
                    let mut p = current.clone();
                    p.pop();
                    p
                };
                let mut paths = Vec::new();
                let end = paths_at(&b, j + 2, &base, &mut paths);
                for (path, at) in paths {
                    // The longest prefix that is a module.
                    let mut target = None;
                    for n in (1..=path.len()).rev() {
                        let candidate = path[..n].join("::");
                        if modules.contains(&candidate) {
                            target = Some(candidate);
                            break;
                        }
                    }
                    let from = current.join("::");
                    let Some(to) = target else { continue };
                    edges.push(Edge {
                        file: file.to_owned(),
                        line: line_at.get(at).copied().unwrap_or(n),
                        from,
                        to,
                        in_test: test_depth.is_some(),
                    });
                }
                i = end;
                continue;
            } else if word != "pub" && word != "cfg" && word != "test" {
                pending_test = pending_test && (word == "mod" || word == "crate");
            }
            i = j;
            continue;
        }
        i += 1;
    }
    // Inline modules are named in paths too (`tests`), but they are part of their file's module.
    edges
        .into_iter()
        .map(|mut e| {
            e.from = strip_inline(&e.from, modules);
            e.to = strip_inline(&e.to, modules);
            e
        })
        .collect()
}

/// The longest prefix of `path` that is a file module.
fn strip_inline(path: &str, modules: &BTreeSet<String>) -> String {
    let parts: Vec<&str> = path.split("::").collect();
    for n in (1..=parts.len()).rev() {
        let candidate = parts[..n].join("::");
        if modules.contains(&candidate) {
            return candidate;
        }
    }
    path.to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "bin") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every edge of the library under `root` (`src/`).
pub fn crate_edges(root: &Path) -> Vec<Edge> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    files.sort();
    files.retain(|f| f != &root.join("main.rs"));
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(root, f).join("::"))
        .filter(|m| !m.is_empty())
        .collect();
    let mut edges = Vec::new();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        let module = module_of(root, f);
        let name = f.strip_prefix(root.parent().unwrap_or(root)).unwrap_or(f);
        edges.extend(edges_of(
            &name.display().to_string(),
            &module,
            &text,
            &modules,
        ));
    }
    edges
}

/// Whether `a` is `b` or one of its ancestors or descendants.
fn related(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

/// The problems: upward edges, and cycles.
pub fn violations(edges: &[Edge]) -> Vec<String> {
    let mut problems = Vec::new();
    for e in edges {
        if related(&e.from, &e.to) {
            continue;
        }
        let (Some((from_layer, from_name)), Some((to_layer, to_name))) =
            (layer_of(&e.from), layer_of(&e.to))
        else {
            problems.push(format!(
                "{}:{}: `{}` or `{}` is in no layer: add it to LAYERS in src/layers.rs",
                e.file, e.line, e.from, e.to
            ));
            continue;
        };
        if to_layer > from_layer && !(e.in_test && TEST_FIXTURES.contains(&e.to.as_str())) {
            problems.push(format!(
                "{}:{}: `{}` ({from_name}) imports `{}` ({to_name}), a higher layer: move the item down \
                 or the caller up",
                e.file, e.line, e.from, e.to
            ));
        }
    }
    // Cycles, at two levels: top-level modules; submodules within one top-level module.
    for level in [Level::Top, Level::Sub] {
        let mut graph: BTreeMap<String, BTreeMap<String, (String, usize)>> = BTreeMap::new();
        for e in edges.iter().filter(|e| !e.in_test) {
            let (from, to) = match level {
                Level::Top => (top(&e.from), top(&e.to)),
                Level::Sub => {
                    if top(&e.from) != top(&e.to) || related(&e.from, &e.to) {
                        continue;
                    }
                    (e.from.clone(), e.to.clone())
                }
            };
            if from == to {
                continue;
            }
            graph
                .entry(from)
                .or_default()
                .entry(to)
                .or_insert((e.file.clone(), e.line));
        }
        if let Some(cycle) = find_cycle(&graph) {
            let steps: Vec<String> = cycle
                .windows(2)
                .map(|w| {
                    let (file, line) = &graph[&w[0]][&w[1]];
                    format!("`{}` → `{}` ({file}:{line})", w[0], w[1])
                })
                .collect();
            problems.push(format!("import cycle: {}", steps.join(", ")));
        }
    }
    problems
}

#[derive(Clone, Copy)]
enum Level {
    Top,
    Sub,
}

fn top(module: &str) -> String {
    // pgoutput is its own bottom module though it sits under replication.
    if module.starts_with("replication::pgoutput") {
        return "replication::pgoutput".to_owned();
    }
    module.split("::").next().unwrap_or(module).to_owned()
}

fn find_cycle(graph: &BTreeMap<String, BTreeMap<String, (String, usize)>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeMap<String, (String, usize)>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flat_map(|m| m.keys()) {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node.as_str())
            && let Some(c) = visit(node, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules() -> BTreeSet<String> {
        [
            "lsn",
            "primer",
            "store",
            "store::cql",
            "http",
            "config",
            "ops",
            "ops::status",
            "ops::monitor",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn edges(module: &str, text: &str) -> Vec<Edge> {
        let m: Vec<String> = module.split("::").map(str::to_owned).collect();
        edges_of("src/x.rs", &m, text, &modules())
    }

    #[test]
    fn the_tree_has_no_upward_import_and_no_cycle() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let edges = crate_edges(&root);
        assert!(
            edges.len() > 100,
            "found only {} edges: is the reader broken?",
            edges.len()
        );
        let problems = violations(&edges);
        assert!(
            problems.is_empty(),
            "the layers (src/layers.rs, ARCHITECTURE.md) are broken:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn an_upward_import_fails_naming_file_line_and_edge() {
        let text = "//! doc mentions crate::config::Config\nuse crate::lsn::Lsn;\n\nuse crate::config::Config;\n";
        let found = edges("store", text);
        let problems = violations(&found);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("src/x.rs:4: `store` (state) imports `config` (wiring)"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn use_trees_strings_and_comments_are_read_right() {
        let text = r##"
use crate::{
    lsn::Lsn,
    store::{cql::Thing, Store},
};
const S: &str = "crate::config::Config";
const R: &str = r#"crate::config"#;
let c = '"'; // crate::config
fn f() -> crate::primer::Key { todo!() }
"##;
        let found = edges("http", text);
        let targets: Vec<(&str, usize)> = found.iter().map(|e| (e.to.as_str(), e.line)).collect();
        assert_eq!(
            targets,
            vec![("lsn", 3), ("store::cql", 4), ("store", 4), ("primer", 9)]
        );
    }

    #[test]
    fn super_resolves_from_file_and_inline_modules() {
        let found = edges("ops::status", "use super::monitor::Reading;\n");
        assert_eq!(found[0].to, "ops::monitor");
        let found = edges("ops", "mod tests {\n    use super::status::X;\n}\n");
        assert_eq!(found[0].to, "ops::status");
        assert_eq!(found[0].from, "ops");
    }

    #[test]
    fn a_cycle_fails_with_its_path() {
        let mut found = edges("store", "use crate::lsn::Lsn;\n");
        found.extend(edges("lsn", "use crate::primer::Key;\n"));
        found.extend(edges("primer", "use crate::lsn::Lsn;\n"));
        let problems = violations(&found);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("import cycle: `lsn` → `primer`")),
            "{problems:?}"
        );
    }

    #[test]
    fn test_code_may_build_fixtures_with_config_only() {
        let text = "#[cfg(test)]\nmod tests {\n    use crate::config::Config;\n    use crate::http::X;\n}\n";
        let problems = violations(&edges("store", text));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("imports `http`"), "{}", problems[0]);
    }
}
