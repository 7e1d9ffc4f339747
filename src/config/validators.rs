//! Small validators shared by the builders: origins, sizes, identifiers, table names, positions.

use super::*;

/// A CORS origin: `*`, or `scheme://host[:port]` (no path), as browsers send it in `Origin`.
pub(super) fn check_origin(text: &str) -> Result<String, String> {
    let origin = text.trim();
    if origin == "*" {
        return Ok(origin.to_owned());
    }
    let ok = origin.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https")
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', ' '])
    });
    if ok {
        Ok(origin.to_owned())
    } else {
        Err(format!(
            "'{text}' is not an origin: write it as browsers send it, such as https://app.example.com or \
             http://localhost:3000 (no path), or *"
        ))
    }
}

/// `http.body_limit`: a size as [`crate::ops::size::parse_byte_size`] reads it (`1MB`, `512kB`: powers of
/// 1024, as in postgresql.conf), between 1 kB and 1 GB.
pub(super) fn parse_size(text: &str) -> Result<usize, String> {
    let bytes = crate::ops::size::parse_byte_size(text)?;
    if !(1 << 10..=1 << 30).contains(&bytes) {
        return Err(format!(
            "'{text}' is out of range: give between 1kB and 1GB"
        ));
    }
    usize::try_from(bytes).map_err(|_| format!("'{text}' is too large for this machine"))
}

pub(super) fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The line of byte `offset` of `text`, whose first line is `first_line`.
pub(super) fn line_at(text: &str, offset: usize, first_line: usize) -> usize {
    first_line
        + text[..offset.min(text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
}

/// An SQL identifier by Postgres's rules: unquoted, `[A-Za-z_][A-Za-z0-9_$]*` folded to lower case (as
/// Postgres folds it); quoted, `"..."` with `""` for a quote, kept as written (any characters, any case).
pub(super) fn parse_identifier(text: &str, what: &str) -> Result<String, String> {
    if let Some(inner) = text.strip_prefix('"') {
        let Some(body) = inner.strip_suffix('"') else {
            return Err(format!(
                "'{text}' is not valid as {what}: a quoted name ends with '\"'"
            ));
        };
        // Inside, a quote only comes doubled.
        if body.is_empty() || body.replace("\"\"", "").contains('"') {
            return Err(format!(
                "'{text}' is not valid as {what}: a quoted name is not empty, and a '\"' inside it is written '\"\"'"
            ));
        }
        return Ok(body.replace("\"\"", "\""));
    }
    let mut chars = text.chars();
    let ok = matches!(chars.next(), Some('a'..='z' | 'A'..='Z' | '_'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    if ok {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(format!(
            "'{text}' is not valid as {what}: use letters, digits, '_' and '$', not starting with a digit, \
             or quote it as Postgres does (\"CamelCase\", in YAML '\"CamelCase\"')"
        ))
    }
}

/// `text` split at the dots that are not inside a quoted name.
fn split_dots(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Whether a table name is written with its schema (`schema.table`).
pub(super) fn has_schema(text: &str) -> bool {
    split_dots(text).len() > 1
}

/// `table` or `schema.table`, each part an identifier ([`parse_identifier`]); the schema defaults to
/// `public`.
pub(super) fn parse_table(text: &str) -> Result<TableName, String> {
    let parts = split_dots(text);
    let (schema, name) = match parts.as_slice() {
        [name] => ("public".to_owned(), *name),
        [schema, name] => (parse_identifier(schema, "a schema name")?, *name),
        _ => {
            return Err(format!(
                "'{text}' is not a table name: write `table` or `schema.table`"
            ));
        }
    };
    Ok(TableName {
        schema,
        name: parse_identifier(name, "a table name")?,
    })
}

/// The name of a primer or an updater (`what`): `name`, else the `.sql` file's own name (`default`);
/// lower-case letters, digits and `_`. `required` says what the name is, for when there is none.
pub(super) fn item_name(
    name: Option<&Spanned<String>>,
    default: Option<&str>,
    line: usize,
    what: &str,
    required: &str,
    err: &dyn Fn(usize, &str, String) -> ConfigError,
) -> Result<(String, usize), ConfigError> {
    let (text, name_line) = match (name, default) {
        (Some(n), _) => (n.value.clone(), line_of(n)),
        (None, Some(default)) => (default.to_owned(), 1),
        (None, None) => return Err(err(line, "name", format!("required: {required}"))),
    };
    if text.is_empty()
        || !text
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
    {
        let hint = if name.is_none() {
            " (the name comes from the file name; set `name` in the header)"
        } else {
            ""
        };
        return Err(err(
            name_line,
            "name",
            format!(
                "'{text}' is not a valid {what} name: use lower-case letters, digits and '_'{hint}"
            ),
        ));
    }
    Ok((text, name_line))
}
