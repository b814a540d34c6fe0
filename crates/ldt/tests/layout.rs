//! The layout holds what the README draws: within each crate of the workspace no module
//! imports a module that (directly or through others) imports it back, and no service
//! module names another service. (Between crates, cargo holds the layers: the binary →
//! the services → the runtime → the contract; the tools and the test kit beside them.)
//!
//! The modules are read from the source text: every path a file names (`use` trees
//! included) that starts at `crate`, `super`, `self` or a module the file declares, resolved
//! to the deepest module it reaches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The services: none may name another (`step`, what the step services share, is not one).
const SERVICES: [&str; 6] = [
    "order",
    "orchestrator",
    "payment",
    "inventory",
    "delivery",
    "dead_letter",
];

type Module = Vec<String>;

struct Crate {
    /// Each module's file.
    files: BTreeMap<Module, PathBuf>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The modules of the crate whose sources are in `src`, by walking its `mod x;` declarations
/// from the root file.
fn modules(src: &Path, root: &str) -> Crate {
    let mut files = BTreeMap::new();
    let mut todo = vec![(Vec::<String>::new(), src.join(root))];
    while let Some((module, file)) = todo.pop() {
        let text = strip(&std::fs::read_to_string(&file).unwrap());
        // A module's children live beside it (`a.rs` → `a/x.rs`), or in its folder
        // (`a/mod.rs` → `a/x.rs`); the root's in `src`.
        let dir = if module.is_empty() || file.ends_with("mod.rs") {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        for child in declared_children(&text) {
            let candidates = [
                dir.join(format!("{child}.rs")),
                dir.join(&child).join("mod.rs"),
            ];
            if let Some(path) = candidates.into_iter().find(|p| p.exists()) {
                let mut m = module.clone();
                m.push(child);
                todo.push((m, path));
            }
        }
        files.insert(module, file);
    }
    Crate { files }
}

/// The source without comments, string and char literals (their text is not code).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'r' if b.get(i + 1) == Some(&b'#')
                || (b.get(i + 1) == Some(&b'"') && (i == 0 || !is_ident(b[i - 1]))) =>
            {
                // A raw string: r"…", r#"…"#.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == b'"'
                        && b[j + 1..]
                            .iter()
                            .take(hashes)
                            .filter(|c| **c == b'#')
                            .count()
                            == hashes
                    {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // A char literal ('a', '\n', '\u{1f}'), or a lifetime ('a) left as it is.
                let close = if b.get(i + 1) == Some(&b'\\') {
                    b[i + 2..]
                        .iter()
                        .position(|c| *c == b'\'')
                        .map(|p| i + 2 + p)
                } else if b.get(i + 2) == Some(&b'\'') {
                    Some(i + 2)
                } else {
                    None
                };
                match close {
                    Some(end) => {
                        out.push_str("' '");
                        i = end + 1;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The names of the modules a file declares with `mod x;` (not inline `mod x { … }`).
fn declared_children(text: &str) -> Vec<String> {
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    let mut children = Vec::new();
    for w in words.windows(2) {
        if w[0] == "mod"
            && let Some(name) = w[1].strip_suffix(';')
        {
            children.push(name.to_owned());
        }
    }
    children
}

/// Every path the code names: `a::b::c` sequences, with `use` trees expanded.
fn paths(text: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    // `use` trees first, then removed, so that their braces do not confuse the scan.
    let mut rest = String::new();
    let mut s = text;
    while let Some(at) = find_use(s) {
        rest.push_str(&s[..at]);
        let end = at + s[at..].find(';').unwrap_or(s.len() - at);
        let tree = &s[at + 3..end];
        expand(
            &tree.replace(char::is_whitespace, ""),
            &mut Vec::new(),
            &mut found,
        );
        s = &s[(end + 1).min(s.len())..];
    }
    rest.push_str(s);
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if is_ident(b[i]) && (i == 0 || !(is_ident(b[i - 1]) || b[i - 1] == b':')) {
            let mut segs = Vec::new();
            let mut j = i;
            loop {
                let start = j;
                while j < b.len() && is_ident(b[j]) {
                    j += 1;
                }
                segs.push(rest[start..j].to_owned());
                if b.get(j) == Some(&b':')
                    && b.get(j + 1) == Some(&b':')
                    && b.get(j + 2).is_some_and(|c| is_ident(*c))
                {
                    j += 2;
                } else {
                    break;
                }
            }
            if segs.len() > 1 {
                found.push(segs);
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    found
}

/// Where the next `use` statement starts (the keyword itself).
fn find_use(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut from = 0;
    while let Some(p) = s[from..].find("use ") {
        let at = from + p;
        if at == 0 || !is_ident(b[at - 1]) {
            return Some(at);
        }
        from = at + 4;
    }
    None
}

/// Expands a `use` tree (`a::{b, c::{d, self}}`) into its paths.
fn expand(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim_start_matches("::");
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut depth = 0;
        let mut start = 0;
        let mut items = Vec::new();
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        items.push(&inner[start..]);
        let n = prefix.len();
        prefix.extend(head);
        for item in items.into_iter().filter(|i| !i.is_empty()) {
            expand(item, prefix, out);
        }
        prefix.truncate(n);
    } else {
        // (`x as y` reads as one segment `xasy`: past the deepest module, it does not count.)
        let mut path = prefix.clone();
        for seg in tree.split("::") {
            if seg == "self" || seg == "*" || seg.is_empty() {
                continue;
            }
            path.push(seg.to_owned());
        }
        out.push(path);
    }
}

/// The module `path` (named in `module`) reaches, if it is one of this crate's.
fn resolve(krate: &Crate, module: &Module, path: &[String]) -> Option<Module> {
    let mut base: Module = match path.first()?.as_str() {
        "crate" => Vec::new(),
        "self" => module.clone(),
        "super" => {
            let mut m = module.clone();
            let mut i = 0;
            while path.get(i).map(String::as_str) == Some("super") {
                m.pop()?;
                i += 1;
            }
            let mut full = m;
            full.extend(path[i..].iter().cloned());
            return deepest(krate, &full);
        }
        child => {
            let mut m = module.clone();
            m.push(child.to_owned());
            if !krate.files.contains_key(&m) {
                return None;
            }
            module.clone()
        }
    };
    let skip = usize::from(matches!(path[0].as_str(), "crate" | "self"));
    base.extend(path[skip..].iter().cloned());
    deepest(krate, &base)
}

fn deepest(krate: &Crate, full: &[String]) -> Option<Module> {
    (0..=full.len())
        .rev()
        .map(|n| full[..n].to_vec())
        .find(|m| krate.files.contains_key(m))
}

/// The text with `super` inside each inline module (`mod tests { … }`) read as the file's
/// own module, which is what it names there.
fn flatten_inline_modules(text: &str) -> String {
    let mut out = text.to_owned();
    let mut from = 0;
    while let Some(p) = out[from..].find("mod ") {
        let at = from + p;
        let rest = &out[at + 4..];
        let name_len = rest.bytes().take_while(|c| is_ident(*c)).count();
        let after = rest[name_len..].trim_start();
        if name_len == 0 || !after.starts_with('{') {
            from = at + 4;
            continue;
        }
        let open = at + 4 + rest.len() - after.len();
        let mut depth = 0;
        let mut close = out.len();
        for (i, c) in out[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let inner = out[open..close].replace("super::", "self::");
        out.replace_range(open..close, &inner);
        from = open + 1;
    }
    out
}

/// Each module's imports: the other modules of the crate its code names. A module naming a
/// module inside itself (its own children) is its business, not an import cycle.
fn imports(krate: &Crate) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut graph = BTreeMap::new();
    for (module, file) in &krate.files {
        let text = flatten_inline_modules(&strip(&std::fs::read_to_string(file).unwrap()));
        let mut edges = BTreeSet::new();
        for path in paths(&text) {
            if let Some(target) = resolve(krate, module, &path)
                && target != *module
            {
                edges.insert(target);
            }
        }
        graph.insert(module.clone(), edges);
    }
    graph
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// A cycle of imports, if there is one.
fn cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        m: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        marks: &mut BTreeMap<Module, Mark>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match marks.get(m) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|s| s == m).unwrap_or(0);
                let mut c = stack[from..].to_vec();
                c.push(m.clone());
                return Some(c);
            }
            None => {}
        }
        marks.insert(m.clone(), Mark::Open);
        stack.push(m.clone());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(m.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in graph.keys() {
        if let Some(c) = visit(m, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn crates() -> Vec<(String, Crate)> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(workspace()).unwrap() {
        let src = dir.unwrap().path().join("src");
        for root in ["lib.rs", "main.rs"] {
            if src.join(root).exists() {
                let label = format!(
                    "{}/{root}",
                    src.parent().unwrap().file_name().unwrap().to_string_lossy()
                );
                out.push((label, modules(&src, root)));
            }
        }
    }
    out
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let crates = crates();
    assert!(
        crates.len() >= 6,
        "found the crates: {:?}",
        crates.iter().map(|c| &c.0).collect::<Vec<_>>()
    );
    for (label, krate) in &crates {
        let graph = imports(krate);
        if label == "ldt/lib.rs" {
            // The reading sees real imports: `use super::…` trees, `crate::` paths.
            let m = |s: &str| s.split("::").map(str::to_owned).collect::<Module>();
            let handler = &graph[&m("services::orchestrator::handler")];
            assert!(
                handler.contains(&m("services::orchestrator::saga")),
                "{handler:?}"
            );
            assert!(
                handler.contains(&m("services::orchestrator::store")),
                "{handler:?}"
            );
            assert!(graph[&m("services::payment")].contains(&m("services::step")));
        }
        if let Some(c) = cycle(&graph) {
            panic!(
                "{label}: an import cycle: {}",
                c.iter().map(name).collect::<Vec<_>>().join(" → ")
            );
        }
    }
}

#[test]
fn no_service_module_names_another_service() {
    let (_, krate) = crates()
        .into_iter()
        .find(|(label, _)| label == "ldt/lib.rs")
        .expect("the services' crate");
    let service_of = |m: &Module| -> Option<String> {
        (m.len() >= 2 && m[0] == "services" && SERVICES.contains(&m[1].as_str()))
            .then(|| m[1].clone())
    };
    let graph = imports(&krate);
    let mut services_seen = BTreeSet::new();
    for (module, targets) in &graph {
        let Some(own) = service_of(module) else {
            continue;
        };
        services_seen.insert(own.clone());
        for target in targets {
            if let Some(other) = service_of(target) {
                assert_eq!(
                    other,
                    own,
                    "{} names {}: a service never depends on another",
                    name(module),
                    name(target)
                );
            }
        }
    }
    assert_eq!(
        services_seen.len(),
        SERVICES.len(),
        "every service was read: {services_seen:?}"
    );
}

/// The checks themselves: a cycle through `super`, a `use` tree and a child module is found.
#[test]
fn the_checker_finds_a_cycle_it_is_shown() {
    let dir = std::env::temp_dir().join(format!("ldt-layout-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
    std::fs::write(
        src.join("a/mod.rs"),
        "mod x;\npub use x::Thing;\n// crate::b is a comment\n",
    )
    .unwrap();
    std::fs::write(
        src.join("a/x.rs"),
        "use crate::{b::{self, Other}};\npub struct Thing;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("b.rs"),
        "pub struct Other;\nfn f() { let _ = \"crate::a\"; }\n",
    )
    .unwrap();
    let krate = modules(&src, "lib.rs");
    let graph = imports(&krate);
    assert!(cycle(&graph).is_none(), "{graph:?}");
    std::fs::write(
        src.join("b.rs"),
        "pub struct Other;\nfn f() -> super::a::Thing { todo!() }\n",
    )
    .unwrap();
    let graph = imports(&krate);
    let c = cycle(&graph).expect("a → a::x → b → a");
    assert!(c.len() >= 3, "{c:?}");
    std::fs::remove_dir_all(dir).unwrap();
}
