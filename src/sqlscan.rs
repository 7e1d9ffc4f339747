//! SQL scanning: just enough lexing to find `$n` placeholders, a second statement and the end of a query,
//! outside string literals, quoted identifiers, comments and dollar-quoted strings. The config loader
//! checks primers' and updaters' SQL with it. It never panics on any input (fuzzed: `fuzz/`'s `sqlscan`).

// Parses what people type: no indexing that could panic, no unwrap (checked by clippy; tests opt out in
// clippy.toml).
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

/// What [`scan_sql`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SqlScan {
    /// `used[n - 1]`: whether `$n` appears.
    pub(crate) used: Vec<bool>,
    /// Byte offset of the first occurrence of the highest placeholder.
    pub(crate) max_offset: usize,
    /// The start of the statement: its first token (leading whitespace and comments excluded).
    pub(crate) start: usize,
    /// The end of the statement: trailing whitespace, comments and `;` excluded.
    pub(crate) end: usize,
    /// Every placeholder: its byte range (`$` to the last digit) and its number.
    pub(crate) placeholders: Vec<(std::ops::Range<usize>, usize)>,
}

impl SqlScan {
    pub(crate) fn max(&self) -> usize {
        self.used.len()
    }

    /// Byte offset of the statement's first token.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Byte offset just past the statement's last token.
    pub fn end(&self) -> usize {
        self.end
    }

    /// Every `$n` outside literals, quoted identifiers and comments: its byte range and `n`.
    pub fn placeholders(&self) -> &[(std::ops::Range<usize>, usize)] {
        &self.placeholders
    }
}

/// `sql` with each placeholder `$n` replaced by `with(n)` (outside literals, quoted identifiers and
/// comments), or the scanner's error.
pub fn replace_placeholders(
    sql: &str,
    with: impl Fn(usize) -> String,
) -> Result<String, (usize, String)> {
    let scan = scan_sql(sql)?;
    let mut out = String::with_capacity(sql.len() + 16 * scan.placeholders.len());
    let mut at = 0;
    for (range, n) in &scan.placeholders {
        out.push_str(sql.get(at..range.start).unwrap_or_default());
        out.push_str(&with(*n));
        at = range.end;
    }
    out.push_str(sql.get(at..).unwrap_or_default());
    Ok(out)
}

/// Scan a query: placeholders outside string literals, quoted identifiers, comments and dollar-quoted
/// strings. Errors (with a byte offset) for an empty query, a second statement, and unterminated quotes.
pub fn scan_sql(sql: &str) -> Result<SqlScan, (usize, String)> {
    let mut statements = scan_statements(sql, false)?;
    statements.pop().ok_or((0, "the query is empty".into()))
}

/// Scan SQL holding one statement (`many == false`: a second one is an error) or several separated by
/// `;` (each scanned like a query; empty statements are skipped). Offsets are into `sql`.
pub fn scan_statements(sql: &str, many: bool) -> Result<Vec<SqlScan>, (usize, String)> {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    // The byte at `i`, or 0 past the end (0 is not a character any rule looks for).
    let at = |i: usize| b.get(i).copied().unwrap_or(0);
    let mut statements = Vec::new();
    let mut scan = SqlScan::default();
    let mut in_statement = false;
    let mut i = 0;
    // Offset of the first `;` outside quotes and comments.
    let mut semicolon: Option<usize> = None;
    while i < b.len() {
        let c = at(i);
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && at(i) != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            loop {
                if i + 1 >= b.len() {
                    return Err((start, "unterminated /* comment */".into()));
                }
                if at(i) == b'/' && at(i + 1) == b'*' {
                    depth += 1;
                    i += 2;
                } else if at(i) == b'*' && at(i + 1) == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            continue;
        }
        if let Some(s) = semicolon {
            if c != b';' {
                return Err((
                    start,
                    format!(
                        "the query holds more than one statement (a `;` at byte {s} is followed by more SQL); a primer runs one query"
                    ),
                ));
            }
            i += 1;
            continue;
        }
        if c == b';' {
            if many {
                if in_statement {
                    statements.push(std::mem::take(&mut scan));
                    in_statement = false;
                }
            } else {
                semicolon = Some(i);
            }
            i += 1;
            continue;
        }
        if !in_statement {
            in_statement = true;
            scan.start = start;
        }
        match c {
            b'\'' => {
                let escapes =
                    i > 0 && matches!(at(i - 1), b'e' | b'E') && !(i > 1 && ident(at(i - 2)));
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err((start, "unterminated string literal ('...')".into())),
                        Some(b'\\') if escapes => i += 2,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
            }
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None => {
                            return Err((start, "unterminated quoted identifier (\"...\")".into()));
                        }
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
            }
            b'$' if i > 0 && ident(at(i - 1)) => i += 1,
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i += 1;
                let digits = i;
                while i < b.len() && at(i).is_ascii_digit() {
                    i += 1;
                }
                let n: usize = sql[digits..i].parse().unwrap_or(usize::MAX);
                if n == 0 {
                    return Err((
                        start,
                        "$0 is not a parameter: parameters are numbered from $1".into(),
                    ));
                }
                if n > 65_535 {
                    return Err((
                        start,
                        format!(
                            "${} is beyond Postgres' limit of 65535 parameters",
                            &sql[digits..i]
                        ),
                    ));
                }
                scan.placeholders.push((start..i, n));
                if n > scan.used.len() {
                    scan.used.resize(n, false);
                    scan.max_offset = start;
                }
                if let Some(used) = scan.used.get_mut(n - 1) {
                    *used = true;
                }
            }
            b'$' => {
                // A dollar quote `$tag$...$tag$` (tag empty or an identifier without `$`), else a lone `$`.
                let tag_end = b
                    .get(i + 1..)
                    .unwrap_or_default()
                    .iter()
                    .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e) if at(e) == b'$' && !b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                        let tag = &sql[i..=e];
                        match sql[e + 1..].find(tag) {
                            Some(p) => i = e + 1 + p + tag.len(),
                            None => {
                                return Err((
                                    start,
                                    format!("unterminated dollar-quoted string {tag}...{tag}"),
                                ));
                            }
                        }
                    }
                    _ => i += 1,
                }
            }
            _ => {
                i += 1;
                if ident(c) {
                    while i < b.len() && ident(at(i)) {
                        i += 1;
                    }
                }
            }
        }
        scan.end = i;
    }
    if in_statement {
        statements.push(scan);
    }
    if statements.is_empty() {
        return Err((0, "the query is empty".into()));
    }
    Ok(statements)
}

/// The rule: the highest `$n` equals the number of values bound (`names`), and each of `$1..$n` appears.
/// The error carries the offset of the offending placeholder when there is one.
pub(crate) fn check_placeholders(
    scan: &SqlScan,
    names: &[&str],
    bound_by: &str,
    kind: &str,
) -> Result<(), (Option<usize>, String)> {
    let n = names.len();
    let plural = |k: usize, word: &str| {
        if k == 1 {
            format!("1 {word}")
        } else {
            format!("{k} {word}s")
        }
    };
    if scan.max() != n {
        let uses = if scan.max() == 0 {
            "no $n placeholder".to_owned()
        } else {
            format!("${}", scan.max())
        };
        let offset = (scan.max() > n).then_some(scan.max_offset);
        let message = if n == 0 {
            format!(
                "the query uses {uses} but {bound_by} has no {kind}s, so the query cannot use $n placeholders"
            )
        } else {
            format!(
                "the query uses {uses} but {bound_by} has {} ({}): they are bound as $1..$n in order, so the \
                 highest placeholder must be ${n}",
                plural(n, kind),
                names.join(", ")
            )
        };
        return Err((offset, message));
    }
    if let Some(missing) = scan.used.iter().position(|u| !u) {
        return Err((
            None,
            format!(
                "the query does not use ${} ({kind} '{}'): each of $1..${n} must appear, as Postgres cannot infer the type of a parameter the query does not use",
                missing + 1,
                names.get(missing).copied().unwrap_or("?")
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_outside_literals_and_comments() {
        let sql =
            "SELECT '$1', \"$1\", $$ $1 $$ -- $1\n, a$1, $1 /* $2 */ + $12 FROM t WHERE x = $2";
        assert_eq!(
            replace_placeholders(sql, |n| format!("(k.p{n})")).unwrap(),
            "SELECT '$1', \"$1\", $$ $1 $$ -- $1\n, a$1, (k.p1) /* $2 */ + (k.p12) FROM t WHERE x = (k.p2)"
        );
    }

    /// The fuzz target's property on a few thousand deterministic mixes of SQL's tricky pieces: never a
    /// panic, every offset a char boundary inside the text.
    #[test]
    fn any_mix_of_quotes_comments_and_placeholders_scans_within_bounds() {
        const PIECES: [&str; 24] = [
            "SELECT ", "$1", "$2", "$", "$$", "$tag$", "'", "''", "\"", "--", "/*", "*/", "\n",
            ";", "e'", "\\", "é", "x", " ", "1e", "$10", "E'a\\'", "q", "ß$",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..4000 {
            let mut sql = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut x = seed;
            for _ in 0..(x % 12) {
                sql.push_str(PIECES[(x % PIECES.len() as u64) as usize]);
                x /= 7;
                x = x.wrapping_add(seed.rotate_left(11));
            }
            for many in [false, true] {
                match scan_statements(&sql, many) {
                    Ok(statements) => {
                        for st in statements {
                            assert!(st.start() <= st.end() && st.end() <= sql.len(), "{sql:?}");
                            assert!(sql.get(st.start()..st.end()).is_some(), "{sql:?}");
                        }
                    }
                    Err((offset, _)) => assert!(offset <= sql.len(), "{sql:?}"),
                }
            }
        }
    }
}
