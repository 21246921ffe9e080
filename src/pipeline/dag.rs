//! The stage graph: edges from `needs` and from deps that are other stages' outs, checked for
//! cycles, clashing outs and missing inputs, and put in a stable topological order.

use super::Stage;
use petgraph::graph::DiGraph;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::Path;

/// Adjacency in both directions, by index into `Pipeline::stages`.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Dag {
    pub upstream: Vec<Vec<usize>>,
    pub downstream: Vec<Vec<usize>>,
}

impl Dag {
    /// `roots` and everything they (transitively) depend on.
    pub fn with_ancestors(&self, roots: &[usize]) -> Vec<bool> {
        self.closure(roots, &self.upstream)
    }

    fn closure(&self, roots: &[usize], edges: &[Vec<usize>]) -> Vec<bool> {
        let mut seen = vec![false; edges.len()];
        let mut stack = roots.to_vec();
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut seen[i], true) {
                stack.extend(&edges[i]);
            }
        }
        seen
    }

    /// Graphviz: every name a quoted ID with `\\` and `"` escaped.
    pub fn to_dot(&self, stages: &[Stage]) -> String {
        let id = |s: &Stage| format!("\"{}\"", s.name.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box];\n");
        for s in stages {
            out.push_str(&format!("  {};\n", id(s)));
        }
        for (i, ups) in self.upstream.iter().enumerate() {
            for &u in ups {
                out.push_str(&format!("  {} -> {};\n", id(&stages[u]), id(&stages[i])));
            }
        }
        out.push_str("}\n");
        out
    }

    /// Mermaid: nodes by index, names as quoted labels with mermaid's entity codes for the
    /// characters its parser would read (`"`, `#`, `<`, `>`, backquote).
    pub fn to_mermaid(&self, stages: &[Stage]) -> String {
        let label = |name: &str| {
            let mut out = String::with_capacity(name.len());
            for c in name.chars() {
                match c {
                    '"' => out.push_str("#quot;"),
                    '#' => out.push_str("#35;"),
                    '<' => out.push_str("#lt;"),
                    '>' => out.push_str("#gt;"),
                    '`' => out.push_str("#96;"),
                    c => out.push(c),
                }
            }
            out
        };
        let mut out = String::from("flowchart LR\n");
        for (i, s) in stages.iter().enumerate() {
            out.push_str(&format!("  s{i}[\"{}\"]\n", label(&s.name)));
        }
        for (i, ups) in self.upstream.iter().enumerate() {
            for &u in ups {
                out.push_str(&format!("  s{u} --> s{i}\n"));
            }
        }
        out
    }
}

/// Builds and validates the graph; returns the stages in topological order (file order where
/// the graph allows) with the matching adjacency. Errors are `line: stage `x`: message`.
pub fn build(stages: Vec<Stage>, workspace: &Path) -> Result<(Vec<Stage>, Dag), Vec<String>> {
    let mut errors = Vec::new();
    let err = |s: &Stage, msg: String| format!("{}: stage `{}`: {msg}", s.line, s.name);

    let mut by_base: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, s) in stages.iter().enumerate() {
        if s.name != s.base {
            by_base.entry(&s.base).or_default().push(i);
        }
    }
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (i, s) in stages.iter().enumerate() {
        if let Some(&j) = by_name.get(s.name.as_str()) {
            errors.push(err(
                s,
                format!("has the same name as the stage on line {}", stages[j].line),
            ));
        }
        by_name.insert(&s.name, i);
    }

    // Who writes what; an out may not be inside another out.
    let mut producers: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, s) in stages.iter().enumerate() {
        for out in &s.outs {
            if let Some(&j) = producers.get(out.as_str()) {
                let what = if i == j {
                    "twice".to_string()
                } else {
                    format!("and so does stage `{}`", stages[j].name)
                };
                errors.push(err(s, format!("writes `{out}` {what}")));
            }
            producers.insert(out, i);
        }
    }
    let outs: Vec<(&str, usize)> = producers.iter().map(|(k, v)| (*k, *v)).collect();
    for w in outs.windows(2) {
        let ((a, i), (b, j)) = (w[0], w[1]);
        if is_inside(b, a) {
            errors.push(err(
                &stages[j],
                format!(
                    "writes `{b}`, inside `{a}` which stage `{}` writes",
                    stages[i].name
                ),
            ));
        }
    }

    let mut graph = DiGraph::<usize, ()>::new();
    let nodes: Vec<_> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
    let mut upstream: Vec<Vec<usize>> = vec![Vec::new(); stages.len()];
    for (i, s) in stages.iter().enumerate() {
        for dep in &s.deps {
            if s.outs.contains(dep) {
                errors.push(err(s, format!("lists `{dep}` as both a dep and an out")));
                continue;
            }
            let found = producers_of(&producers, dep);
            if found.is_empty() && std::fs::symlink_metadata(workspace.join(dep)).is_err() {
                errors.push(err(
                    s,
                    format!("dep `{dep}` does not exist and no stage writes it"),
                ));
            }
            upstream[i].extend(found);
        }
        for need in &s.needs {
            let hits: Vec<usize> = by_name
                .get(need.as_str())
                .into_iter()
                .copied()
                .chain(by_base.get(need.as_str()).into_iter().flatten().copied())
                .collect();
            if hits.is_empty() {
                errors.push(err(
                    s,
                    format!("needs `{need}`, but there is no such stage"),
                ));
            }
            upstream[i].extend(hits);
        }
        upstream[i].sort_unstable();
        upstream[i].dedup();
        for &u in &upstream[i] {
            graph.add_edge(nodes[u], nodes[i], ());
        }
    }
    for cycle in cycles(&graph, &upstream) {
        let names: Vec<&str> = cycle.iter().map(|&i| stages[i].name.as_str()).collect();
        errors.push(err(
            &stages[cycle[0]],
            format!("is in a cycle: {}", names.join(" → ")),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let order = stable_topological_order(&upstream);
    let mut position = vec![0; stages.len()];
    for (pos, &i) in order.iter().enumerate() {
        position[i] = pos;
    }
    let mut dag = Dag {
        upstream: vec![Vec::new(); stages.len()],
        downstream: vec![Vec::new(); stages.len()],
    };
    for (i, ups) in upstream.iter().enumerate() {
        for &u in ups {
            dag.upstream[position[i]].push(position[u]);
            dag.downstream[position[u]].push(position[i]);
        }
    }
    for list in dag.upstream.iter_mut().chain(dag.downstream.iter_mut()) {
        list.sort_unstable();
    }
    let mut slots: Vec<Option<Stage>> = stages.into_iter().map(Some).collect();
    let ordered = order
        .iter()
        .map(|&i| slots[i].take().expect("each stage once"))
        .collect();
    Ok((ordered, dag))
}

fn is_inside(path: &str, dir: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

/// Stages whose outs are `dep`, contain it, or lie inside it.
fn producers_of(producers: &BTreeMap<&str, usize>, dep: &str) -> Vec<usize> {
    let mut found = Vec::new();
    let mut prefix = dep;
    loop {
        if let Some(&i) = producers.get(prefix) {
            found.push(i);
        }
        match prefix.rfind('/') {
            Some(cut) => prefix = &prefix[..cut],
            None => break,
        }
    }
    let below = format!("{dep}/");
    found.extend(
        producers
            .range(below.as_str()..)
            .take_while(|(k, _)| k.starts_with(&below))
            .map(|(_, &i)| i),
    );
    found
}

/// Each strongly connected component of more than one stage (or a stage needing itself), as a
/// closed path through it.
fn cycles(graph: &DiGraph<usize, ()>, upstream: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut found = Vec::new();
    for scc in petgraph::algo::tarjan_scc(graph) {
        let members: Vec<usize> = scc.iter().map(|n| graph[*n]).collect();
        if members.len() == 1 && !upstream[members[0]].contains(&members[0]) {
            continue;
        }
        let start = *members.iter().min().expect("non-empty");
        found.push(path_back_to(start, &members, upstream));
    }
    found
}

/// A path start → … → start inside one component (following downstream edges).
fn path_back_to(start: usize, members: &[usize], upstream: &[Vec<usize>]) -> Vec<usize> {
    // Breadth-first over reversed edges from `start` gives, for each member, the next hop
    // towards `start` along a downstream edge.
    let mut next: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &u in &upstream[v] {
            if members.contains(&u) && !next.contains_key(&u) {
                next.insert(u, v);
                if u == start {
                    queue.clear();
                    break;
                }
                queue.push_back(u);
            }
        }
    }
    let mut path = vec![start];
    let mut v = next[&start];
    while v != start && path.len() <= members.len() {
        path.push(v);
        v = next[&v];
    }
    path.push(start);
    path
}

/// Kahn's algorithm, always taking the ready stage that comes first in the file.
fn stable_topological_order(upstream: &[Vec<usize>]) -> Vec<usize> {
    let n = upstream.len();
    let mut pending: Vec<usize> = upstream.iter().map(Vec::len).collect();
    let mut downstream = vec![Vec::new(); n];
    for (i, ups) in upstream.iter().enumerate() {
        for &u in ups {
            downstream[u].push(i);
        }
    }
    let mut ready: BinaryHeap<std::cmp::Reverse<usize>> = (0..n)
        .filter(|&i| pending[i] == 0)
        .map(std::cmp::Reverse)
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        order.push(i);
        for &d in &downstream[i] {
            pending[d] -= 1;
            if pending[d] == 0 {
                ready.push(std::cmp::Reverse(d));
            }
        }
    }
    order
}
