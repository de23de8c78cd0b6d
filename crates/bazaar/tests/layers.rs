//! The layers a newcomer reads the code by, held by tests: which crate may depend on which
//! (read from `cargo metadata`), and no cycle of modules importing each other inside a crate
//! (read from the sources). `docs/architecture.md` draws the same arrows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Every workspace crate and the bazaar crates just below it: its code (not its tests) may
/// depend on those and on everything they may depend on ([`allowed`]). The lowest know no
/// other bazaar crate; a service may use the kit, the contracts and the saga engine, never
/// another service; only tests and the bench use the test kit.
const LAYERS: &[(&str, &[&str])] = &[
    ("bazaar-core", &[]),
    ("bazaar-trust", &[]),
    ("bazaar-drain", &[]),
    ("bazaar-store", &[]),
    ("bazaar-contracts", &["bazaar-core"]),
    ("bazaar-messaging", &["bazaar-core", "bazaar-store"]),
    ("bazaar-mesh", &["bazaar-drain", "bazaar-trust"]),
    ("bazaar-saga", &["bazaar-messaging"]),
    ("bazaar-kit", &["bazaar-messaging", "bazaar-mesh"]),
    ("bazaar-gateway", &["bazaar-trust", "bazaar-drain"]),
    ("bazaar-users", SERVICE),
    ("bazaar-inventory", SERVICE),
    ("bazaar-orders", SERVICE),
    ("bazaar-payments", SERVICE),
    ("bazaar-notifications", SERVICE),
    ("bazaar-web", SERVICE),
    ("bazaar-testkit", &["bazaar-kit", "bazaar-saga"]),
    (
        "bazaar",
        &[
            "bazaar-gateway",
            "bazaar-users",
            "bazaar-inventory",
            "bazaar-orders",
            "bazaar-payments",
            "bazaar-notifications",
            "bazaar-web",
        ],
    ),
    ("bazaar-bench", &["bazaar", "bazaar-testkit"]),
];

/// What a service may use directly.
const SERVICE: &[&str] = &["bazaar-kit", "bazaar-contracts", "bazaar-saga"];

/// The crates `name` may depend on: those [`LAYERS`] puts just below it, and theirs in turn.
fn allowed(name: &str) -> BTreeSet<&'static str> {
    let below = |n: &str| LAYERS.iter().find(|(c, _)| *c == n).map_or(&[][..], |(_, b)| *b);
    let mut out = BTreeSet::new();
    let mut todo: Vec<&'static str> = below(name).to_vec();
    while let Some(next) = todo.pop() {
        if out.insert(next) {
            todo.extend(below(next));
        }
    }
    out
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `cargo metadata` of the workspace's own crates.
fn metadata() -> Value {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(workspace())
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON")
}

#[test]
fn every_crate_depends_only_on_the_layers_below_it() {
    let meta = metadata();
    let listed: BTreeSet<String> = LAYERS.iter().map(|(c, _)| c.to_string()).collect();
    let mut found = BTreeSet::new();
    let mut wrong = Vec::new();
    for package in meta["packages"].as_array().expect("packages") {
        let name = package["name"].as_str().expect("a name");
        found.insert(name.to_string());
        if !listed.contains(name) {
            wrong.push(format!("{name} is not in LAYERS: give it its place"));
            continue;
        }
        let may = allowed(name);
        for dep in package["dependencies"].as_array().expect("dependencies") {
            let (dep_name, kind) = (dep["name"].as_str().unwrap_or_default(), &dep["kind"]);
            let normal = kind.is_null() || kind == "build";
            if normal && dep_name.starts_with("bazaar") && !may.contains(&dep_name) {
                wrong.push(format!("{name} depends on {dep_name}"));
            }
        }
    }
    assert_eq!(found, listed, "LAYERS lists exactly the workspace's crates");
    assert!(wrong.is_empty(), "arrows against the layers: {wrong:#?}");
}

/// Modules of one crate never import each other in a cycle, so each crate reads one way:
/// from the modules that import nothing of the crate up to the ones that wire them.
#[test]
fn no_crate_has_modules_that_import_each_other_in_a_cycle() {
    let meta = metadata();
    let mut cycles = BTreeSet::new();
    for package in meta["packages"].as_array().expect("packages") {
        let name = package["name"].as_str().expect("a name");
        let manifest = PathBuf::from(package["manifest_path"].as_str().expect("a manifest"));
        let src = manifest.parent().expect("a crate directory").join("src");
        for cycle in module_cycles(&src) {
            cycles.insert(format!("{name}: {{{}}}", cycle.join(", ")));
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other in a cycle: {cycles:#?}"
    );
}

/// Functions longer than this (from `fn` to its closing brace) say why they are one piece.
const LONG_FUNCTION: usize = 70;

/// A function past [`LONG_FUNCTION`] lines either does several jobs, which get functions and
/// names of their own, or is one piece, and its doc says why in a paragraph that begins
/// `One piece:` (a plain `//` comment above an HTTP handler, whose doc is its API
/// description); tests are left out.
#[test]
fn every_long_function_says_why_it_is_one_piece() {
    let meta = metadata();
    let mut unexplained = Vec::new();
    for package in meta["packages"].as_array().expect("packages") {
        let manifest = PathBuf::from(package["manifest_path"].as_str().expect("a manifest"));
        let src = manifest.parent().expect("a crate directory").join("src");
        for (_, file) in top_level_files(&src) {
            let text = std::fs::read_to_string(&file).expect("a source file");
            for f in long_functions(&text)
                .into_iter()
                .filter(|f| !f.doc.contains("One piece:"))
            {
                let root = workspace().canonicalize().expect("the workspace");
                let relative = file.strip_prefix(&root).unwrap_or(&file).display().to_string();
                unexplained.push(format!("{relative}:{} {} ({} lines)", f.line, f.name, f.lines));
            }
        }
    }
    unexplained.sort();
    assert!(
        unexplained.is_empty(),
        "split these, or say in their doc why each is one piece (`/// One piece: …`):\n{}",
        unexplained.join("\n")
    );
}

/// A function of a source file, outside its `#[cfg(test)]` modules.
#[derive(Debug)]
struct Function {
    name: String,
    /// Its `fn` line, from 1.
    line: usize,
    lines: usize,
    /// Its doc and the comments above it, joined.
    doc: String,
}

/// The functions of rustfmt-formatted `text` longer than [`LONG_FUNCTION`] lines: a body
/// ends at the first line that is its `fn` line's indentation and `}`.
fn long_functions(text: &str) -> Vec<Function> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let closing = |from: usize, depth: usize| {
        (from + 1..lines.len()).find(|&j| indent(lines[j]) == depth && lines[j].trim() == "}")
    };
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        if line.starts_with("#[cfg(test)]") && lines.get(i + 1).is_some_and(|l| l.trim_start().starts_with("mod ")) {
            i = closing(i + 1, indent(lines[i + 1])).unwrap_or(lines.len());
            continue;
        }
        if let Some(name) = fn_name(line).filter(|_| !line.ends_with(';')) {
            if let Some(end) = closing(i, indent(lines[i])) {
                let doc: Vec<&str> = lines[..i]
                    .iter()
                    .rev()
                    .map(|l| l.trim())
                    // Doc and comment lines, and attributes however many lines they take.
                    .take_while(|l| l.starts_with("//") || !(l.is_empty() || l.ends_with(['{', '}', ';'])))
                    .collect();
                if end - i + 1 > LONG_FUNCTION {
                    found.push(Function {
                        name,
                        line: i + 1,
                        lines: end - i + 1,
                        doc: doc.into_iter().rev().collect::<Vec<_>>().join(" "),
                    });
                }
            }
        }
        i += 1;
    }
    found
}

/// The name of the function a line declares (`pub(crate) async fn name<…>(`), if it does.
fn fn_name(line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    let mut word = words.next()?;
    while ["pub", "pub(crate)", "pub(super)", "async", "const", "unsafe", "extern"].contains(&word) {
        word = words.next()?;
    }
    (word == "fn").then(|| ident(words.next()?)).flatten()
}

/// The cycles among the modules of each target under `src` (the library from `lib.rs`, the
/// binary from `main.rs`), each as its sorted module names; a directory module is one. A
/// module's edges are the `crate::<module>` paths its code names, outside comments and
/// `#[cfg(test)] mod` blocks. The crate root is the crate's table of contents (it declares
/// and re-exports the modules) and is not counted.
fn module_cycles(src: &Path) -> Vec<Vec<String>> {
    let files = top_level_files(src);
    let mut cycles = Vec::new();
    for root in ["lib.rs", "main.rs"] {
        let root_file = src.join(root);
        if !root_file.is_file() {
            continue;
        }
        let declared = declared_modules(&code_of(&root_file));
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (module, file) in files.iter().filter(|(m, _)| declared.contains(m)) {
            let code = code_of(file);
            let named = crate_paths(&code).filter(|name| declared.contains(name) && name != module);
            graph.entry(module.clone()).or_default().extend(named);
        }
        cycles.extend(strongly_connected(&graph).into_iter().filter(|c| c.len() > 1));
    }
    cycles
}

/// The code of `file` without comments and without its `#[cfg(test)] mod … { … }` blocks.
fn code_of(file: &Path) -> String {
    let text = std::fs::read_to_string(file).expect("a source file");
    let mut code = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        code.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        rest = match after.trim_start().strip_prefix("mod ") {
            Some(module) => skip_block(module),
            None => after,
        };
    }
    code.push_str(rest);
    code.lines()
        .map(str::trim_start)
        .filter(|line| !line.starts_with("//"))
        .map(|line| line.split(" //").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What follows the brace-delimited block `text` opens (after its name).
fn skip_block(text: &str) -> &str {
    let Some(open) = text.find('{') else {
        return text;
    };
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => return &text[open + i + 1..],
            '}' => depth -= 1,
            _ => {}
        }
    }
    ""
}

/// The modules a crate root declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn declared_modules(root: &str) -> BTreeSet<String> {
    root.lines()
        .filter_map(|line| {
            let line = line.trim();
            let line = line
                .strip_prefix("pub(crate) ")
                .or_else(|| line.strip_prefix("pub "))
                .unwrap_or(line);
            let name = ident(line.strip_prefix("mod ")?)?;
            line.ends_with(';').then_some(name)
        })
        .collect()
}

/// Each `.rs` file under `src` with the top-level module it belongs to (`lib`/`main` for
/// the crate root's own file).
fn top_level_files(src: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("a source directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(src).expect("under src");
                let first = relative.components().next().expect("a component");
                let module = Path::new(first.as_os_str()).file_stem().expect("a name");
                out.push((module.to_string_lossy().into_owned(), path));
            }
        }
    }
    out
}

/// The module names `code` reaches by `crate::name` or inside `use crate::{a, b::{c}}`.
fn crate_paths(code: &str) -> impl Iterator<Item = String> + '_ {
    let mut names = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            names.extend(ident(rest));
            continue;
        };
        // The group's items at its own depth, up to its closing brace.
        let (mut depth, mut item_start) = (0usize, true);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if c.is_whitespace() => {}
                _ if item_start => {
                    names.extend(ident(&group[i..]));
                    item_start = false;
                }
                _ => {}
            }
        }
    }
    names.into_iter()
}

/// The identifier `text` starts with.
fn ident(text: &str) -> Option<String> {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    (end > 0).then(|| text[..end].to_string())
}

/// Tarjan's strongly connected components of `graph`, each sorted.
fn strongly_connected(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, (usize, usize)>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(w: &mut Walk<'g>, v: &'g str) {
        let n = w.index.len();
        w.index.insert(v, (n, n));
        w.stack.push(v);
        w.on_stack.insert(v);
        for next in &w.graph[v] {
            let next = next.as_str();
            if !w.index.contains_key(next) {
                visit(w, next);
                let low = w.index[next].1.min(w.index[v].1);
                w.index.get_mut(v).expect("visited").1 = low;
            } else if w.on_stack.contains(next) {
                let low = w.index[next].0.min(w.index[v].1);
                w.index.get_mut(v).expect("visited").1 = low;
            }
        }
        if w.index[v].0 == w.index[v].1 {
            let mut component = Vec::new();
            while let Some(top) = w.stack.pop() {
                w.on_stack.remove(top);
                component.push(top.to_string());
                if top == v {
                    break;
                }
            }
            component.sort();
            w.out.push(component);
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            visit(&mut walk, v);
        }
    }
    walk.out
}

#[test]
fn the_cycle_finder_finds_a_cycle_and_nothing_else() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", &["b"][..]), ("b", &["c"]), ("c", &["a"]), ("d", &["a"])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect();
    let cycles: Vec<_> = strongly_connected(&graph).into_iter().filter(|c| c.len() > 1).collect();
    assert_eq!(cycles, [["a", "b", "c"]]);
    let code = "use crate::{\n    store::Tx,\n    http, outbox::{self, Outbox},\n};\nlet x = crate::saga::x;";
    let paths: Vec<String> = crate_paths(code).collect();
    assert_eq!(paths, ["store", "http", "outbox", "saga"]);
    let root = "//! doc\npub mod a;\nmod b;\npub(crate) mod c;\nmod d {}\npub use a::X;";
    assert_eq!(declared_modules(root), ["a", "b", "c"].map(String::from).into());
    assert_eq!(
        skip_block(" tests {\n fn t() { let v = {1}; }\n}\nfn after() {}"),
        "\nfn after() {}"
    );
}

#[test]
fn the_long_function_finder_measures_bodies_and_reads_their_docs() {
    let body = "    let x = 1;\n".repeat(LONG_FUNCTION);
    let text = format!(
        "/// Short.\nfn short() {{\n}}\n\n/// Long.\n///\n/// One piece: a reason.\n#[inline]\npub(crate) async fn long(\n    a: u8,\n) -> u8 {{\n{body}}}\n\nimpl X {{\n    fn bare() {{\n{body}    }}\n}}\n\n#[cfg(test)]\nmod tests {{\n    fn in_tests() {{\n{body}    }}\n}}\n"
    );
    let found = long_functions(&text);
    let named: Vec<(&str, bool)> = found
        .iter()
        .map(|f| (f.name.as_str(), f.doc.contains("One piece:")))
        .collect();
    assert_eq!(named, [("long", true), ("bare", false)], "{found:#?}");
    assert_eq!(found[0].lines, LONG_FUNCTION + 4);
}

#[test]
fn the_contracts_build_without_a_database_broker_tls_or_http_server() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "bazaar-contracts",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(workspace())
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    let heavy: BTreeSet<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            [
                "sqlx",
                "rusqlite",
                "libsqlite3-sys",
                "async-nats",
                "rustls",
                "axum",
                "hyper",
                "reqwest",
            ]
            .contains(name)
        })
        .collect();
    assert!(heavy.is_empty(), "bazaar-contracts pulls in {heavy:?}");
}
