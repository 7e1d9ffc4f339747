//! Reading the expressions of a plan as Postgres prints them (`EXPLAIN VERBOSE`): the equalities
//! `alias.column = $n` a scan's conditions hold at their top level, and the functions an expression calls.
//!
//! Only exact shapes are accepted: anything else reads as "no equality" (the table is then followed at table
//! level), never as a wrong one. Pure functions over text, so they are unit-tested and fuzzed.

/// The identifier at the start of `s` (bare `[a-z0-9_$]+`, or quoted with `""` for a quote), unquoted, and the
/// rest of `s`.
fn ident(s: &str) -> Option<(String, &str)> {
    if let Some(rest) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if rest[i + 1..].starts_with('"') {
                    out.push('"');
                    chars.next();
                } else {
                    return Some((out, &rest[i + 1..]));
                }
            } else {
                out.push(c);
            }
        }
        return None;
    }
    let end = s
        .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$'))
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((s[..end].to_owned(), &s[end..]))
}

/// `s` without one pair of parentheses that encloses all of it.
fn unwrap_parens(s: &str) -> &str {
    let s = s.trim();
    if !(s.starts_with('(') && s.ends_with(')')) {
        return s;
    }
    // The first '(' must close at the very end.
    let mut depth = 0usize;
    let mut in_quote = None::<char>;
    for (i, c) in s.char_indices() {
        match (in_quote, c) {
            (Some(q), c) if c == q => in_quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => in_quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return if i == s.len() - 1 {
                        s.get(1..s.len() - 1).unwrap_or(s).trim()
                    } else {
                        s
                    };
                }
            }
            _ => {}
        }
    }
    s
}

/// `s` split at `sep` where it is at parenthesis depth 0 and outside quotes.
fn split_top<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    let mut parts = Vec::new();
    let (mut depth, mut start, mut skip_to) = (0usize, 0usize, 0usize);
    let mut in_quote = None::<char>;
    for (i, c) in s.char_indices() {
        if i < skip_to {
            continue;
        }
        match (in_quote, c) {
            (Some(q), c) if c == q => in_quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => in_quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => depth = depth.saturating_sub(1),
            (None, _) if depth == 0 && s[i..].starts_with(sep) => {
                parts.push(&s[start..i]);
                start = i + sep.len();
                skip_to = start;
            }
            _ => {}
        }
    }
    parts.push(s.get(start..).unwrap_or(""));
    parts
}

/// One side of an equality: a column of `alias`, or an external parameter `$n`.
#[derive(Debug, PartialEq)]
enum Side {
    Column(String),
    Param(usize),
}

/// Casts that change nothing of a text value (varchar compared as text).
const TEXT_CASTS: &[&str] = &["::text", "::character varying"];

fn side(s: &str, alias: &str) -> Option<Side> {
    let s = unwrap_parens(s);
    if let Some(n) = s.strip_prefix('$') {
        return n.parse().ok().filter(|n| *n > 0).map(Side::Param);
    }
    // `($1)::bigint`: the parameter, cast to the column's type.
    if let Some((inner, _ty)) = s.rsplit_once(")::")
        && let Some(inner) = inner.strip_prefix('(')
        && let Some(n) = inner.trim().strip_prefix('$')
    {
        return n.parse().ok().filter(|n| *n > 0).map(Side::Param);
    }
    // `(alias.col)::text`: a varchar column compared as text.
    for cast in TEXT_CASTS {
        if let Some(inner) = s.strip_suffix(cast)
            && inner.starts_with('(')
            && inner.ends_with(')')
        {
            return column(unwrap_parens(inner), alias).map(Side::Column);
        }
    }
    column(s, alias).map(Side::Column)
}

fn column(s: &str, alias: &str) -> Option<String> {
    let (qualifier, rest) = ident(s)?;
    let rest = rest.strip_prefix('.')?;
    let (name, rest) = ident(rest)?;
    (qualifier == alias && rest.is_empty()).then_some(name)
}

/// The `(column, n)` pairs of `condition` (one of a scan's `Filter`, `Index Cond` or `Recheck Cond`) that are
/// conjuncts at its top level of the form `alias.column = $n` (either way round, through the no-op casts
/// above). A disjunction, a function of the column, or any other shape gives none.
pub fn equalities(condition: &str, alias: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    conjuncts(condition, alias, &mut out, 0);
    out
}

fn conjuncts(condition: &str, alias: &str, out: &mut Vec<(String, usize)>, depth: usize) {
    for_each_conjunct(condition, depth, &mut |conjunct| {
        let sides = split_top(conjunct, " = ");
        let [a, b] = sides.as_slice() else { return };
        match (side(a, alias), side(b, alias)) {
            (Some(Side::Column(c)), Some(Side::Param(n)))
            | (Some(Side::Param(n)), Some(Side::Column(c))) => out.push((c, n)),
            _ => {}
        }
    });
}

/// Calls `f` with each conjunct at the top level of `condition` (nested ANDs included, parentheses
/// removed); a condition with a top-level OR has none.
fn for_each_conjunct(condition: &str, depth: usize, f: &mut dyn FnMut(&str)) {
    // Nested ANDs are conjuncts too (bounded: plan text is small, but never trust it).
    if depth > 32 {
        return;
    }
    let unwrapped = unwrap_parens(condition);
    if split_top(unwrapped, " OR ").len() > 1 {
        return;
    }
    let parts = split_top(unwrapped, " AND ");
    if parts.len() > 1 {
        for part in parts {
            for_each_conjunct(part, depth + 1, f);
        }
        return;
    }
    f(unwrapped);
}

/// `((alias, column), (alias, column))`: the two sides of a join equality.
pub type ColumnPair = ((String, String), (String, String));

/// A column `alias.column` (through the no-op text casts), any alias.
fn any_column(s: &str) -> Option<(String, String)> {
    let mut s = unwrap_parens(s);
    for cast in TEXT_CASTS {
        if let Some(inner) = s.strip_suffix(cast)
            && inner.starts_with('(')
            && inner.ends_with(')')
        {
            s = unwrap_parens(inner);
        }
    }
    let (qualifier, rest) = ident(s)?;
    let rest = rest.strip_prefix('.')?;
    let (name, rest) = ident(rest)?;
    rest.is_empty().then_some((qualifier, name))
}

/// The `((alias, column), (alias, column))` pairs of `condition` (a join condition, or a scan's condition that
/// names an outer scan's column) that are conjuncts at its top level of the form `a.x = b.y` with two
/// different aliases. Any other shape gives none.
pub fn column_equalities(condition: &str) -> Vec<ColumnPair> {
    let mut out = Vec::new();
    column_conjuncts(condition, &mut out, 0);
    out
}

fn column_conjuncts(condition: &str, out: &mut Vec<ColumnPair>, depth: usize) {
    for_each_conjunct(condition, depth, &mut |conjunct| {
        let sides = split_top(conjunct, " = ");
        let [a, b] = sides.as_slice() else { return };
        if let (Some(a), Some(b)) = (any_column(a), any_column(b))
            && a.0 != b.0
        {
            out.push((a, b));
        }
    });
}

/// `s` (which starts with a quote) after the string literal it starts with (`''` is a quote inside); empty
/// when the literal does not end.
fn after_literal(s: &str) -> &str {
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        if c == '\'' {
            if s[i + 1..].starts_with('\'') {
                chars.next();
            } else {
                return &s[i + 1..];
            }
        }
    }
    ""
}

/// The functions `expr` calls, as `name` or `schema.name` (lower case as printed, quotes removed), and the
/// SQL value keywords it uses (`CURRENT_USER`, `CURRENT_TIMESTAMP`...), outside string literals.
pub fn functions(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "CURRENT_USER",
        "SESSION_USER",
        "CURRENT_ROLE",
        "CURRENT_TIMESTAMP",
        "CURRENT_DATE",
        "CURRENT_TIME",
        "LOCALTIME",
        "LOCALTIMESTAMP",
        "CURRENT_CATALOG",
        "CURRENT_SCHEMA",
    ];
    let mut out: Vec<String> = Vec::new();
    let mut rest = expr;
    while let Some(c) = rest.chars().next() {
        if c == '\'' {
            rest = after_literal(rest);
            continue;
        }
        if c == '"' || c.is_ascii_lowercase() || c == '_' {
            let Some((first, after)) = ident(rest) else {
                rest = &rest[c.len_utf8()..];
                continue;
            };
            let (name, after) = match after.strip_prefix('.').and_then(ident) {
                Some((second, after2)) => (format!("{first}.{second}"), after2),
                None => (first, after),
            };
            if after.starts_with('(') && !out.contains(&name) {
                out.push(name);
            }
            rest = after;
            continue;
        }
        if c.is_ascii_uppercase() {
            let end = rest
                .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                .unwrap_or(rest.len());
            let word = &rest[..end];
            if KEYWORDS.contains(&word) && !out.iter().any(|o| o == word) {
                out.push(word.to_owned());
            }
            rest = &rest[end.max(1)..];
            continue;
        }
        if c.is_ascii_digit() {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(rest.len());
            rest = &rest[end.max(1)..];
            continue;
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The column references and parameters of a plan expression (see [`refs`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Refs {
    /// `alias.column`, and `(alias, "*")` for a whole-row reference (`t.*`).
    pub qualified: Vec<(String, String)>,
    /// Identifiers printed without a table (EXPLAIN leaves them bare when the query has one relation):
    /// columns, or words such as type names, which the caller filters against the table's columns.
    pub bare: Vec<String>,
    /// `$n` parameters.
    pub params: Vec<usize>,
}

impl Refs {
    fn push_qualified(&mut self, q: String, c: String) {
        if !self.qualified.iter().any(|(a, b)| *a == q && *b == c) {
            self.qualified.push((q, c));
        }
    }
}

/// Add the column references of `expr` (as `EXPLAIN VERBOSE` prints it) to `out`: every `alias.column` and
/// `alias.*` outside string literals, bare identifiers that are not calls, and `$n` parameters. Calls
/// (`f(`, `schema.f(`), SQL keywords (printed upper case) and the type after `::` are not references. Reading
/// more than is there is harmless (a column kck thinks is read); reading less is not, so any identifier
/// that could be a column is kept.
pub fn refs(expr: &str, out: &mut Refs) {
    let mut rest = expr;
    while let Some(c) = rest.chars().next() {
        if c == '\'' {
            rest = after_literal(rest);
            continue;
        }
        if let Some(after) = rest.strip_prefix("::") {
            // A cast's type: `::text`, `::public.mood`, `::character varying` (later words stay bare).
            rest = match ident(after) {
                Some((_, after)) => match after.strip_prefix('.').and_then(ident) {
                    Some((_, after)) => after,
                    None => after,
                },
                None => after,
            };
            continue;
        }
        if c == '$' {
            let digits = rest[1..]
                .find(|c: char| !c.is_ascii_digit())
                .map_or(rest.len(), |e| e + 1);
            if let Ok(n) = rest[1..digits].parse::<usize>()
                && !out.params.contains(&n)
            {
                out.params.push(n);
            }
            rest = &rest[digits.max(1)..];
            continue;
        }
        if c == '"' || c.is_ascii_lowercase() || c == '_' {
            let Some((first, after)) = ident(rest) else {
                rest = &rest[c.len_utf8()..];
                continue;
            };
            if let Some(star) = after.strip_prefix(".*") {
                out.push_qualified(first, "*".to_owned());
                rest = star;
                continue;
            }
            if let Some((second, after2)) = after.strip_prefix('.').and_then(ident) {
                if !after2.starts_with('(') {
                    out.push_qualified(first, second);
                }
                rest = after2;
                continue;
            }
            if !after.starts_with('(') && !out.bare.contains(&first) {
                out.bare.push(first);
            }
            rest = after;
            continue;
        }
        if c.is_ascii_uppercase() || c.is_ascii_digit() {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(rest.len());
            rest = &rest[end.max(1)..];
            continue;
        }
        rest = &rest[c.len_utf8()..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equalities_at_the_top_level_only() {
        assert_eq!(equalities("(t.id = $1)", "t"), vec![("id".into(), 1)]);
        assert_eq!(
            equalities(
                r#"(((("user"."userName")::text = $1) AND ("user".email = 'a(b'::text)) AND (lower("user".email) = $1) AND ($2 = "user"."Id"))"#,
                "user"
            ),
            vec![("userName".into(), 1), ("Id".into(), 2)]
        );
        assert_eq!(
            equalities("(t2.t_id = ($1)::bigint)", "t2"),
            vec![("t_id".into(), 1)]
        );
        // Not this scan's alias, a disjunction, an inequality, an internal parameter, a join condition.
        assert!(equalities("(t2.t_id = $1)", "t").is_empty());
        assert!(equalities("((t.id = $1) OR (t.id = $2))", "t").is_empty());
        assert!(equalities("(t.id > $1)", "t").is_empty());
        assert!(equalities("(t.id = $0)", "t").is_empty());
        assert!(equalities("(t2.t_id = t.id)", "t2").is_empty());
        assert!(equalities("((t.x)::integer = $1)", "t").is_empty());
        assert!(equalities("(t.id = ANY ($1))", "t").is_empty());
        // Unbalanced or odd text reads as nothing, never panics.
        for odd in [
            "",
            "(",
            ")",
            "((t.id = $1)",
            "t.id = $",
            "\"t.id = $1",
            "(t.\"x = $1)",
        ] {
            let _ = equalities(odd, "t");
        }
    }

    #[test]
    fn column_equalities_of_join_conditions() {
        assert_eq!(
            column_equalities("((i.order_id = o.id) AND (i.x = 1))"),
            vec![(("i".into(), "order_id".into()), ("o".into(), "id".into()))]
        );
        assert_eq!(
            column_equalities(r#"(("a b".k)::text = (o.k)::text)"#),
            vec![(("a b".into(), "k".into()), ("o".into(), "k".into()))]
        );
        assert!(column_equalities("((i.a = o.b) OR (i.c = o.d))").is_empty());
        assert!(column_equalities("(i.a = i.b)").is_empty());
        assert!(column_equalities("(i.a < o.b)").is_empty());
        assert!(column_equalities("(lower(i.a) = o.b)").is_empty());
    }

    #[test]
    fn functions_outside_literals() {
        assert_eq!(
            functions(
                r#"now(), random(), CURRENT_USER, current_setting('x(y)'::text), lower("user".email), app.score(t.id), 'now()'::text, 1.5e3"#
            ),
            vec![
                "now",
                "random",
                "CURRENT_USER",
                "current_setting",
                "lower",
                "app.score"
            ]
        );
        assert!(functions("(t.id = $1)").is_empty());
        assert_eq!(functions(r#""My Fn"(x)"#), vec!["My Fn"]);
    }
    #[test]
    fn refs_name_every_column_outside_literals_and_calls() {
        let mut r = Refs::default();
        refs(
            r#"row_to_json(t.*), lower("User"."eMail"), (t.v)::public.mood, app.score(t.id), 'x.y'::text, $2, ($10)::bigint, count(*), v, CASE WHEN flag THEN 1.5 END, (t.c).f"#,
            &mut r,
        );
        assert_eq!(
            r.qualified,
            vec![
                ("t".into(), "*".into()),
                ("User".into(), "eMail".into()),
                ("t".into(), "v".into()),
                ("t".into(), "id".into()),
                ("t".into(), "c".into()),
            ]
        );
        assert_eq!(r.params, vec![2, 10]);
        assert_eq!(r.bare, vec!["v".to_owned(), "flag".into(), "f".into()]);
        for odd in [
            "",
            "$",
            "\"",
            "'",
            "t.",
            "t.\"",
            "::",
            "$99999999999999999999999",
        ] {
            refs(odd, &mut Refs::default());
        }
    }
}
