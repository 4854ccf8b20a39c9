//! The code's shape, checked: no import cycles between files. Every `crate::a::b` path in
//! non-comment source lines is an edge from the file to the module it names (the longest
//! prefix that is a module); a parent and its own submodules are not counted. Data flows one
//! way — source → route → sink → checkpoint — with config, errors and metrics at the edges.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn module_of(path: &Path, src: &Path) -> String {
    let rel = path.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crate::a::b::c` → ["a", "b", "c"] for every such path in `line`.
fn crate_paths(line: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        out.push(
            path.split("::")
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
        );
    }
    out
}

#[test]
fn no_import_cycles_between_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f, &src)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = module_of(f, &src);
        for line in std::fs::read_to_string(f).unwrap().lines() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for parts in crate_paths(line) {
                let target = (1..=parts.len())
                    .rev()
                    .map(|n| parts[..n].join("::"))
                    .find(|m| modules.contains(m));
                let Some(to) = target else { continue };
                let related = to == from
                    || from.starts_with(&format!("{to}::"))
                    || to.starts_with(&format!("{from}::"));
                if !related {
                    edges.entry(from.clone()).or_default().insert(to);
                }
            }
        }
    }
    // Any edge a → b with a path back from b to a is a cycle.
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(m) = stack.pop() {
            if m == to {
                return true;
            }
            if seen.insert(m.clone()) {
                stack.extend(edges.get(&m).into_iter().flatten().cloned());
            }
        }
        false
    };
    let mut cycles = Vec::new();
    for (a, targets) in &edges {
        for b in targets {
            if reaches(b, a) {
                cycles.push(format!("{a} → {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
    assert!(
        edges.len() > 10,
        "the check saw the code: {} modules with imports",
        edges.len()
    );
}
