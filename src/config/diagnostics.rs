//! Deserialization with locations: YAML and serde errors turned into file, line and field, with the
//! closest known name for a misspelt one.

use super::*;

pub(super) fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Deserialize `text` (read from `file`) into `T`; a serde error becomes [`ConfigError::Invalid`] with its
/// line and the dotted path of the field.
pub(super) fn from_yaml<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    let mut path = None;
    let options = serde_saphyr::options! {
        strict_booleans: true,
        with_snippet: false,
    };
    let result = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = Some(e.path().clone());
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let line = e.location().map_or(0, |l| l.line() as usize);
        let mut field = path.as_ref().map(field_path).unwrap_or_default();
        let e = e.without_snippet();
        let message = match e {
            serde_saphyr::Error::SerdeUnknownField {
                field: name,
                expected,
                ..
            } => {
                let known = expected.join(", ");
                match closest(name, expected) {
                    Some(best) => format!(
                        "unknown field `{name}`; did you mean `{best}`? (known fields: {known})"
                    ),
                    None => format!("unknown field `{name}` (known fields: {known})"),
                }
            }
            serde_saphyr::Error::DuplicateMappingKey { key, .. } => {
                if let Some(key) = key {
                    if field.is_empty() {
                        field = key.clone();
                    }
                    format!("`{key}` is given twice in the same mapping")
                } else {
                    "a key is given twice in the same mapping".to_owned()
                }
            }
            serde_saphyr::Error::InvalidScalar { ty, .. } => {
                format!("expected {}", friendly_type(ty))
            }
            serde_saphyr::Error::InvalidBooleanStrict { .. } => "expected true or false".to_owned(),
            serde_saphyr::Error::Unexpected { expected, .. } => {
                format!("expected {}", friendly_type(expected))
            }
            other => strip_location(&other.to_string()).to_owned(),
        };
        let field = if field.is_empty() {
            "(document)".to_owned()
        } else {
            field
        };
        ConfigError::Invalid {
            path: file.to_owned(),
            line,
            field,
            message,
        }
    })
}

/// The dotted field path of a serde error. `Spanned<T>` reads its value as a field named `value`, which is
/// dropped (no field of the file format is called `value`; a key parameter called `value` in a `columns`
/// mapping is dropped too, which only makes the path of such an error one segment shorter).
pub(super) fn field_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
            }
            serde_path_to_error::Segment::Map { key } if key == "value" => {}
            serde_path_to_error::Segment::Map { key }
            | serde_path_to_error::Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    out
}

pub(super) fn friendly_type(ty: &str) -> &str {
    match ty {
        "i64" | "i32" | "u64" | "u32" | "usize" => "an integer",
        "bool" => "true or false",
        "mapping start" | "mapping" => "a mapping (`key: value` entries)",
        "sequence start" | "sequence" => "a list (`- item` entries or `[a, b]`)",
        "string scalar" | "string" => "a string",
        other => other,
    }
}

/// Drop saphyr's " at line N, column M" (our messages carry the line themselves).
pub(super) fn strip_location(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(", column ") => &message[..i],
        _ => message,
    }
}

/// The known name closest to `name`, if it is plausibly a misspelling of it.
pub(super) fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let (best, distance) = known
        .iter()
        .map(|k| (*k, edit_distance(name, k)))
        .min_by_key(|(_, d)| *d)?;
    (distance <= 2.max(name.chars().count() / 3)).then_some(best)
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

pub(super) fn line_of<T>(s: &Spanned<T>) -> usize {
    s.referenced.line() as usize
}

/// The line of a top-level `key:` in YAML text (for errors about a section that is absent or null).
pub(super) fn top_level_key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

/// Whether the scalar whose content starts on `line` is a literal block (`key: |`, `|-`, `|+`, `|2`): the
/// line before it ends with the indicator.
pub(super) fn is_literal_block(text: &str, line: usize) -> bool {
    line >= 2
        && text.lines().nth(line - 2).is_some_and(|l| {
            let l = l.find(" #").map_or(l, |i| &l[..i]).trim_end();
            l.trim_end_matches(|c: char| c == '-' || c == '+' || c.is_ascii_digit())
                .ends_with('|')
        })
}
