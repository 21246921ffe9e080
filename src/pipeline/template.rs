//! `${params.x}` and `${matrix.x}` substitution.
//!
//! A string that is exactly one template takes the referenced value with its type (so
//! `budget: "${params.budgets}"` yields a list); otherwise values are interpolated as text.
//! Only the `params` and `matrix` namespaces are ours: `${HOME}` and friends are left for the
//! shell, and `$${` writes a literal `${`.

use indexmap::IndexMap;
use serde_json::Value;
use std::cell::Cell;
use std::collections::BTreeMap;

pub struct Scope<'a> {
    pub params: &'a IndexMap<String, Value>,
    pub matrix: Option<&'a IndexMap<String, Value>>,
    pub budget: &'a Budget,
}

/// Bytes that templates may still produce for a whole pipeline: a small file that pastes a
/// large param into every expansion of a large matrix fails here instead of exhausting memory.
#[derive(Debug)]
pub struct Budget(Cell<usize>);

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        Budget(Cell::new(bytes))
    }

    fn charge(&self, bytes: usize) -> Result<(), String> {
        match self.0.get().checked_sub(bytes) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(format!(
                "templates expand to more than {} MiB in this pipeline (a large param pasted into many stages?)",
                BUDGET_BYTES >> 20
            )),
        }
    }

    /// Charges the size of `value`, walking no further than the budget allows.
    fn charge_value(&self, value: &Value) -> Result<(), String> {
        match value {
            Value::String(s) => self.charge(s.len() + 2),
            Value::Array(items) => {
                self.charge(2)?;
                items.iter().try_for_each(|v| self.charge_value(v))
            }
            Value::Object(map) => {
                self.charge(2)?;
                map.iter().try_for_each(|(k, v)| {
                    self.charge(k.len() + 3)?;
                    self.charge_value(v)
                })
            }
            _ => self.charge(8),
        }
    }
}

/// The default template budget of a pipeline.
pub const BUDGET_BYTES: usize = 256 << 20;

/// Params a stage referenced, by dotted name: they enter its key and explain its re-runs.
pub type UsedParams = BTreeMap<String, Value>;

pub fn resolve(value: &Value, scope: &Scope, used: &mut UsedParams) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => resolve_str(s, scope, used)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| resolve(v, scope, used))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                out.insert(k.clone(), resolve(v, scope, used)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// Resolves a string that must stay a string (a cmd, a path).
pub fn resolve_text(text: &str, scope: &Scope, used: &mut UsedParams) -> Result<String, String> {
    match resolve_str(text, scope, used)? {
        Value::String(s) => Ok(s),
        other => Ok(display(&other)),
    }
}

fn resolve_str(text: &str, scope: &Scope, used: &mut UsedParams) -> Result<Value, String> {
    let trimmed = text.trim();
    if let Some(inner) = whole_template(trimmed) {
        if let Some(v) = lookup(inner, scope, used)? {
            return Ok(v);
        }
    }
    scope.budget.charge(text.len())?;
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("${") {
        if rest[..pos].ends_with('$') {
            out.push_str(&rest[..pos - 1]);
            out.push_str("${");
            rest = &rest[pos + 2..];
            continue;
        }
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed `${{` in `{}`", quoted(text)));
        };
        let expr = &after[..end];
        match lookup(expr, scope, used)? {
            Some(v) => {
                let shown = display(&v);
                scope.budget.charge(shown.len())?;
                out.push_str(&shown)
            }
            None => {
                out.push_str("${");
                out.push_str(expr);
                out.push('}');
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

/// `${x}` with nothing around it, and no second template inside.
fn whole_template(s: &str) -> Option<&str> {
    let inner = s.strip_prefix("${")?.strip_suffix('}')?;
    (!inner.contains('}') && !inner.contains("${")).then_some(inner)
}

/// Looks up `params.a.b` or `matrix.k`; `None` for namespaces that are not ours.
fn lookup(expr: &str, scope: &Scope, used: &mut UsedParams) -> Result<Option<Value>, String> {
    let expr = expr.trim();
    let mut parts = expr.split('.');
    let namespace = parts.next().unwrap_or_default();
    let path: Vec<&str> = parts.collect();
    let root = match namespace {
        "params" => scope.params,
        "matrix" => match scope.matrix {
            Some(m) => m,
            None => return Err(format!("`${{{expr}}}` used in a stage without a matrix")),
        },
        _ => return Ok(None),
    };
    let Some((first, tail)) = path.split_first() else {
        return Err(format!("`${{{expr}}}` names no {namespace} entry"));
    };
    let mut value = root
        .get(*first)
        .ok_or_else(|| missing(namespace, expr, root))?;
    for key in tail {
        value = match value {
            Value::Object(m) => m.get(*key),
            Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| format!("`${{{expr}}}`: no `{key}` in {namespace}.{first}"))?;
    }
    scope.budget.charge_value(value)?;
    if namespace == "params" {
        used.insert(path.join("."), value.clone());
    }
    Ok(Some(value.clone()))
}

/// Text from the file as it may appear inside a one-line error: escaped, and cut if long.
fn quoted(text: &str) -> String {
    let cut = text.floor_char_boundary(80);
    let more = if cut < text.len() { "…" } else { "" };
    format!("{}{more}", text[..cut].escape_debug())
}

fn missing(namespace: &str, expr: &str, root: &IndexMap<String, Value>) -> String {
    let known: Vec<&str> = root.keys().map(String::as_str).collect();
    if known.is_empty() {
        format!("`${{{expr}}}`: there are no {namespace}")
    } else {
        format!(
            "`${{{expr}}}`: no such {namespace} entry (known: {})",
            known.join(", ")
        )
    }
}

/// Text form of a value as it appears in commands and stage names: `1e12` rather than
/// `1000000000000.0`.
pub fn display(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => display_float(f),
            _ => n.to_string(),
        },
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

fn display_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() >= 1e5 && f.is_finite() {
        format!("{f:e}")
    } else {
        format!("{f}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params() -> IndexMap<String, Value> {
        let mut p = IndexMap::new();
        p.insert("seed".into(), json!(3));
        p.insert("budgets".into(), json!([1e12, 3e12]));
        p.insert("model".into(), json!({"width": 64}));
        p
    }

    #[test]
    fn whole_template_keeps_type_and_records_use() {
        let p = params();
        let budget = Budget::new(BUDGET_BYTES);
        let scope = Scope {
            params: &p,
            matrix: None,
            budget: &budget,
        };
        let mut used = UsedParams::new();
        let v = resolve(&json!("${params.budgets}"), &scope, &mut used).unwrap();
        assert_eq!(v, json!([1e12, 3e12]));
        assert_eq!(used.keys().collect::<Vec<_>>(), vec!["budgets"]);
    }

    #[test]
    fn interpolation_formats_numbers_and_leaves_shell_vars() {
        let p = params();
        let mut m = IndexMap::new();
        m.insert("budget".into(), json!(3e12));
        let budget = Budget::new(BUDGET_BYTES);
        let scope = Scope {
            params: &p,
            matrix: Some(&m),
            budget: &budget,
        };
        let mut used = UsedParams::new();
        let s = resolve_text(
            "run --seed ${params.seed} --w ${params.model.width} -b ${matrix.budget} $HOME ${HOME} $${params.seed}",
            &scope,
            &mut used,
        )
        .unwrap();
        assert_eq!(
            s,
            "run --seed 3 --w 64 -b 3e12 $HOME ${HOME} ${params.seed}"
        );
        assert!(used.contains_key("model.width") && used.contains_key("seed"));
    }

    #[test]
    fn missing_names_are_errors_that_list_what_exists() {
        let p = params();
        let budget = Budget::new(BUDGET_BYTES);
        let scope = Scope {
            params: &p,
            matrix: None,
            budget: &budget,
        };
        let err = resolve_text("x ${params.sede}", &scope, &mut UsedParams::new()).unwrap_err();
        assert!(err.contains("params.sede") && err.contains("seed"), "{err}");
        let err = resolve_text("${matrix.a}", &scope, &mut UsedParams::new()).unwrap_err();
        assert!(err.contains("without a matrix"), "{err}");
        let err = resolve_text("${params.seed", &scope, &mut UsedParams::new()).unwrap_err();
        assert!(err.contains("unclosed"), "{err}");
    }

    #[test]
    fn output_is_bounded_by_the_budget() {
        let mut p = IndexMap::new();
        p.insert("big".to_string(), json!("x".repeat(1000)));
        p.insert("list".to_string(), json!(vec!["y".repeat(100); 100]));
        let budget = Budget::new(70_000);
        let scope = Scope {
            params: &p,
            matrix: None,
            budget: &budget,
        };
        let mut used = UsedParams::new();
        // About 20 KB per resolution of `many`: three fit, then the budget is spent whichever
        // form the next template takes.
        let many = "${params.big}".repeat(10);
        for _ in 0..3 {
            resolve_text(&many, &scope, &mut used).unwrap();
        }
        let err = resolve(&json!("${params.list}"), &scope, &mut used).unwrap_err();
        assert!(err.contains("templates expand to more than"), "{err}");
        assert!(resolve_text(&many, &scope, &mut used).is_err());
    }

    #[test]
    fn display_of_numbers() {
        assert_eq!(display(&json!(1e12)), "1e12");
        assert_eq!(display(&json!(1.5e12)), "1.5e12");
        assert_eq!(display(&json!(0.001)), "0.001");
        assert_eq!(display(&json!(42)), "42");
        assert_eq!(display(&json!(2.5)), "2.5");
    }
}
