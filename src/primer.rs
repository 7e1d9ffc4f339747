//! Primers: parameterised queries whose results kck caches, and their keys.
//!
//! A primer has a key template (`orders_by_user/{user_id:int}`), one SQL query whose `$1..$n` are the key's
//! parameters in template order, a result [`Shape`], and [`Dependency`]s that say which changed rows affect
//! which keys. A [`Key`] is one instance of a template: its canonical text is the cache key.
//!
//! Key text grammar: segments separated by `/`; a template segment is either a literal or `{name}` /
//! `{name:type}` with type `int`, `text` (default) or `uuid`. In key text, parameter values are
//! percent-encoded so that a text value may hold `/`. The canonical form of a key is what
//! [`Catalog::render`] produces: integers without leading zeros or `+`, UUIDs in lower-case hyphenated
//! form, text percent-encoded minimally (`/`, `%`, `?`, `#`, space, control characters and non-ASCII
//! characters are encoded; a text value that is exactly `.` or `..` is encoded as `%2E` / `%2E%2E` so
//! that URL normalisation cannot eat it).
//!
//! Key text must reach [`Catalog::parse_key`] still percent-encoded: a web framework that decodes the path
//! first turns `%2F` into `/` and the key no longer has the template's shape.
//!
//! For every key `k` of a catalog, `parse_key(&render(&k)) == Ok(k)`.

// Parses what people type: no indexing that could panic, no unwrap (checked by clippy; tests opt out in
// clippy.toml).
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

pub mod access;
pub mod policy;

pub use access::Access;
pub use policy::{BatchQuery, OnExpiry, Policy};

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::{self, Write as _};

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// The type of one key parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Int,
    Text,
    Uuid,
}

/// One typed key parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParam {
    pub name: String,
    pub ty: ParamType,
}

/// A segment of a key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// Index into [`KeyTemplate::params`].
    Param(usize),
}

/// A parsed key template such as `orders_by_user/{user_id:int}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    /// The template as written.
    pub source: String,
    pub segments: Vec<Segment>,
    pub params: Vec<KeyParam>,
}

/// How a primer's rows become the cached JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// All rows as a JSON array of objects (`[]` when there are none).
    Rows,
    /// The first row as a JSON object (`null` when there is none).
    Row,
    /// The first column of the first row as a JSON value (`null` when there is none).
    Value,
}

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

/// `schema.name`, each part quoted only when Postgres needs it to read the name back (`app."User"`,
/// `public.orders`): how messages name a table, and how `depends_on` may give it.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", Ident(&self.schema), Ident(&self.name))
    }
}

/// An identifier as Postgres reads it back: bare when it is a lower-case name, else quoted.
pub struct Ident<'a>(pub &'a str);

impl fmt::Display for Ident<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        let bare = matches!(chars.next(), Some('a'..='z' | '_'))
            && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '$'));
        if bare {
            f.write_str(self.0)
        } else {
            write!(f, "\"{}\"", self.0.replace('"', "\"\""))
        }
    }
}

/// How a changed row of one table maps to keys of one primer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    /// Each key parameter (by index into the template's params) is read from a column of the changed row.
    Columns(Vec<(usize, String)>),
    /// A query run against Postgres turns the changed row into key parameters. `args` are columns of the
    /// changed row bound as `$1..$n`; the query returns columns named like the key parameters.
    Lookup { query: String, args: Vec<String> },
    /// Any change to the table refreshes every cached key of the primer.
    AllKeys,
}

/// One table a primer reads, and how its changes map to keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub table: TableName,
    pub mapping: Mapping,
}

/// A validated primer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primer {
    pub name: String,
    pub template: KeyTemplate,
    /// The user's query, trailing `;` removed. `$1..$n` are the template's params in order.
    pub query: String,
    pub shape: Shape,
    pub dependencies: Vec<Dependency>,
    /// Whether the config listed `depends_on`. Without it, `dependencies` is empty until
    /// [`crate::plan::complete`] fills it from the query's plan (every table read, at table level); with
    /// it, the plan checks that no table the query reads is missing.
    pub depends_on_given: bool,
    /// `not_followed`: tables the query reads whose changes kck must not follow (they are not
    /// published); they reach the cache only through `ttl`, `refresh_interval` or invalidation.
    pub not_followed: Vec<TableName>,
    /// The tables of `depends_on` and `not_followed` written without a schema: `public` until
    /// [`crate::plan::resolve_names`] looks them up in the source's `search_path`, as the query's own
    /// unqualified names are.
    pub unqualified: Vec<TableName>,
    /// For each table its query reads, the columns it reads there, where the plan shows them exactly
    /// ([`crate::plan::columns_read`]): an UPDATE that changes none of them refreshes nothing for this
    /// primer. A table not listed: unknown, so every change to it counts. Empty until
    /// [`crate::plan::complete`].
    pub columns_read: Vec<(TableName, Vec<String>)>,
    /// Schedules, expiry, warming and limits besides replication (see [`crate::schedule`]).
    pub policy: Policy,
    /// `Cache-Control` for `/fetch` answers of this primer; `None`: [`crate::config::DEFAULT_CACHE_CONTROL`].
    pub cache_control: Option<String>,
    /// Who may fetch its keys when authentication is on (`None`: any valid token). `match` indexes are key
    /// parameters.
    pub access: Option<Access>,
}

impl Primer {
    /// The name of key parameter `i` (by index into the template's params), or `?` for none.
    pub fn param_name(&self, i: usize) -> &str {
        self.template.params.get(i).map_or("?", |p| p.name.as_str())
    }
}

/// A typed parameter value of a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ParamValue {
    Int(i64),
    Text(String),
    /// Lower-case hyphenated form.
    Uuid(String),
}

/// One key: a primer (by index in the config's primer list) and its parameter values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub primer: usize,
    pub params: Vec<ParamValue>,
}

/// A key's text could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key is {len} bytes long; keys are at most {MAX_KEY_BYTES} bytes")]
    TooLong { len: usize },
    #[error(
        "key parameter '{param}' of '{key}' holds a NUL character (%00), which Postgres text cannot hold"
    )]
    Nul { key: String, param: String },
    #[error("no primer has a key template matching '{key}' (the key templates: {known})")]
    UnknownPrimer {
        key: String,
        /// The catalog's key templates ([`Catalog::templates`]).
        known: String,
    },
    #[error("key '{key}' does not match the template '{template}'")]
    Shape { key: String, template: String },
    #[error("key parameter '{param}' of '{key}' must be {expected}, got '{value}'")]
    ParamType {
        key: String,
        param: String,
        expected: &'static str,
        value: String,
    },
}

/// The longest key text kck accepts (bytes, as sent: percent-encoding included). Longer keys are refused
/// before they reach the store or Postgres.
pub const MAX_KEY_BYTES: usize = 4096;

/// All primers of a config, indexed for key parsing.
///
/// Build it with [`Catalog::new`] (the indexes are private so that they always agree with `primers`).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub primers: Vec<Primer>,
    /// First literal segment of a template → indexes of the primers whose template starts with it.
    by_first: HashMap<String, Vec<usize>>,
    /// Primer name → index.
    by_name: HashMap<String, usize>,
}

impl Catalog {
    /// Build the catalog. Fails if two templates could match the same key text, if two primers share a
    /// name, or if a template is malformed (its first segment is not a literal, its parameters are not
    /// referenced in order).
    pub fn new(primers: Vec<Primer>) -> Result<Catalog, String> {
        let mut by_first: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_name = HashMap::with_capacity(primers.len());
        for (i, primer) in primers.iter().enumerate() {
            primer.template.check().map_err(|e| {
                format!(
                    "primer '{}': key template '{}': {e}",
                    primer.name, primer.template.source
                )
            })?;
            if let Some(j) = by_name.insert(primer.name.clone(), i) {
                return Err(format!(
                    "primers {j} and {i} are both named '{}'",
                    primer.name
                ));
            }
            let first = primer.template.first_literal().to_owned();
            let bucket = by_first.entry(first).or_default();
            for &j in bucket.iter() {
                let Some(other) = primers.get(j) else {
                    continue;
                };
                if other.template.overlaps(&primer.template) {
                    return Err(format!(
                        "the key templates '{}' (primer '{}') and '{}' (primer '{}') can match the same key text",
                        other.template.source, other.name, primer.template.source, primer.name
                    ));
                }
            }
            bucket.push(i);
        }
        Ok(Catalog {
            primers,
            by_first,
            by_name,
        })
    }

    /// Look a primer up by name.
    pub fn primer(&self, name: &str) -> Option<(usize, &Primer)> {
        let &i = self.by_name.get(name)?;
        self.primers.get(i).map(|p| (i, p))
    }

    /// Every table some primer depends on, sorted, each once (e.g. for `CREATE PUBLICATION ... FOR TABLE`).
    pub fn tables(&self) -> Vec<TableName> {
        let mut tables: Vec<TableName> = self
            .primers
            .iter()
            .flat_map(|p| p.dependencies.iter().map(|d| d.table.clone()))
            .collect();
        tables.sort();
        tables.dedup();
        tables
    }

    /// The key templates, for an error that names what a key could be: `user/{id:int}, orders/{id:int}`
    /// (the first 20, then how many more).
    pub fn templates(&self) -> String {
        const SHOWN: usize = 20;
        let mut text = self
            .primers
            .iter()
            .take(SHOWN)
            .map(|p| p.template.source.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if self.primers.len() > SHOWN {
            text.push_str(&format!(" and {} more", self.primers.len() - SHOWN));
        }
        if text.is_empty() {
            text.push_str("none: the config has no primers");
        }
        text
    }

    /// Parse key text (as in `/fetch/{key}`, percent-encoded parameter values) into a typed key.
    ///
    /// The text is split on `/` (before percent-decoding, so an encoded `%2F` stays inside its value) and
    /// matched against the templates whose first literal equals the first segment. Integers may have a
    /// sign and leading zeros; UUIDs may be upper-case and without hyphens: [`Catalog::render`] gives the
    /// canonical form.
    pub fn parse_key(&self, text: &str) -> Result<Key, KeyError> {
        // Bounded before anything else: a key is stored, indexed and echoed in messages.
        if text.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong { len: text.len() });
        }
        let first = match text.find('/') {
            Some(i) => &text[..i],
            None => text,
        };
        let Some(candidates) = self.by_first.get(first) else {
            return Err(KeyError::UnknownPrimer {
                key: text.to_owned(),
                known: self.templates(),
            });
        };
        let segment_count = 1 + text.bytes().filter(|&b| b == b'/').count();
        let matched =
            candidates.iter().copied().find(|&i| {
                let Some(template) = self.primers.get(i).map(|p| &p.template) else {
                    return false;
                };
                template.segments.len() == segment_count
                    && template.segments.iter().zip(text.split('/')).skip(1).all(
                        |(segment, part)| match segment {
                            Segment::Literal(literal) => literal == part,
                            Segment::Param(_) => true,
                        },
                    )
            });
        let Some(primer) = matched else {
            // Name the template the text most likely meant: one with the same number of segments if any.
            let best = candidates
                .iter()
                .copied()
                .find(|&i| {
                    self.primers
                        .get(i)
                        .is_some_and(|p| p.template.segments.len() == segment_count)
                })
                .or_else(|| candidates.first().copied());
            return Err(KeyError::Shape {
                key: text.to_owned(),
                template: best
                    .and_then(|i| self.primers.get(i))
                    .map(|p| p.template.source.clone())
                    .unwrap_or_default(),
            });
        };
        let Some(template) = self.primers.get(primer).map(|p| &p.template) else {
            return Err(KeyError::UnknownPrimer {
                key: text.to_owned(),
                known: self.templates(),
            });
        };
        let mut params = Vec::with_capacity(template.params.len());
        for (segment, part) in template.segments.iter().zip(text.split('/')) {
            let Segment::Param(p) = *segment else {
                continue;
            };
            let Some(param) = template.params.get(p) else {
                return Err(KeyError::Shape {
                    key: text.to_owned(),
                    template: template.source.clone(),
                });
            };
            let value = match percent_decode_str(part).decode_utf8() {
                // Postgres rejects NUL in text (SQLSTATE 22021): refuse the key rather than store a
                // key whose every refresh fails.
                Ok(decoded) if decoded.contains('\0') => {
                    return Err(KeyError::Nul {
                        key: text.to_owned(),
                        param: param.name.clone(),
                    });
                }
                Ok(decoded) => match param.ty {
                    ParamType::Text => Some(ParamValue::Text(decoded.into_owned())),
                    ty => ty.parse_value(&decoded),
                },
                Err(_) => None,
            };
            match value {
                Some(value) => params.push(value),
                None => {
                    return Err(KeyError::ParamType {
                        key: text.to_owned(),
                        param: param.name.clone(),
                        expected: param.ty.expected(),
                        value: percent_decode_str(part).decode_utf8_lossy().into_owned(),
                    });
                }
            }
        }
        Ok(Key { primer, params })
    }

    /// The canonical text of a key.
    ///
    /// A `key` that is not of this catalog (its primer index or parameter count does not fit) renders
    /// incomplete; keys come from [`Catalog::parse_key`] and [`Catalog::key_from_text`], which never make one.
    pub fn render(&self, key: &Key) -> String {
        let len = self
            .primers
            .get(key.primer)
            .map_or(0, |p| p.template.source.len());
        let mut out = String::with_capacity(len + 16);
        self.render_into(key, &mut out);
        out
    }

    /// Append the canonical text of a key to `out` (see [`Catalog::render`]).
    ///
    pub fn render_into(&self, key: &Key, out: &mut String) {
        debug_assert!(key.primer < self.primers.len(), "a key of another catalog");
        let Some(primer) = self.primers.get(key.primer) else {
            return;
        };
        let template = &primer.template;
        for (i, segment) in template.segments.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            match segment {
                Segment::Literal(literal) => out.push_str(literal),
                Segment::Param(p) => {
                    if let Some(value) = key.params.get(*p) {
                        value.render_into(out);
                    }
                }
            }
        }
    }

    /// Build a key of `primer` from text values (as pgoutput or a lookup query gives them), one per
    /// template parameter. `None` (NULL, or a value that is not of the parameter's type) means the row maps
    /// to no key.
    pub fn key_from_text(&self, primer: usize, values: &[Option<&str>]) -> Option<Key> {
        let template = &self.primers.get(primer)?.template;
        if values.len() != template.params.len() {
            return None;
        }
        let mut params = Vec::with_capacity(values.len());
        for (param, value) in template.params.iter().zip(values) {
            params.push(param.ty.parse_value((*value)?)?);
        }
        Some(Key { primer, params })
    }

    /// The key's parameter values as Postgres text input, in template order: bind them as `$1..$n`
    /// (text-format parameters) of the primer's query.
    pub fn param_values_as_text(&self, key: &Key) -> Vec<String> {
        key.params
            .iter()
            .map(|v| v.as_pg_text().into_owned())
            .collect()
    }
}

impl ParamType {
    /// The name used in templates: `int`, `text` or `uuid`.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Int => "int",
            ParamType::Text => "text",
            ParamType::Uuid => "uuid",
        }
    }

    /// What a value of this type must look like (for messages).
    pub fn expected(self) -> &'static str {
        match self {
            ParamType::Int => "an integer between -9223372036854775808 and 9223372036854775807",
            ParamType::Text => "UTF-8 text",
            ParamType::Uuid => {
                "a UUID (32 hexadecimal digits, optionally hyphenated as 8-4-4-4-12)"
            }
        }
    }

    /// Parse a (percent-decoded) value. Integers: optional sign, decimal digits (leading zeros allowed),
    /// fitting `i64`. UUIDs: 32 hex digits, plain or hyphenated 8-4-4-4-12, any case. Text: anything.
    pub fn parse_value(self, text: &str) -> Option<ParamValue> {
        match self {
            ParamType::Int => text.parse::<i64>().ok().map(ParamValue::Int),
            ParamType::Text => Some(ParamValue::Text(text.to_owned())),
            ParamType::Uuid => canonical_uuid(text).map(ParamValue::Uuid),
        }
    }
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Some(lower-case hyphenated)` for 32 hex digits, plain or hyphenated 8-4-4-4-12.
fn canonical_uuid(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let hyphenated = match bytes.len() {
        32 => false,
        36 => {
            if [8, 13, 18, 23].iter().any(|&i| bytes.get(i) != Some(&b'-')) {
                return None;
            }
            true
        }
        _ => return None,
    };
    let mut out = String::with_capacity(36);
    let mut digits = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if hyphenated && matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        if !b.is_ascii_hexdigit() {
            return None;
        }
        if matches!(digits, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        out.push(b.to_ascii_lowercase() as char);
        digits += 1;
    }
    Some(out)
}

/// What the canonical text of a text parameter encodes; everything else (ASCII) stays literal.
/// `utf8_percent_encode` always encodes non-ASCII bytes.
const TEXT_ENCODE: &AsciiSet = &CONTROLS.add(b' ').add(b'/').add(b'%').add(b'?').add(b'#');

impl ParamValue {
    /// The value as Postgres text input (what `$n` is bound to).
    pub fn as_pg_text(&self) -> Cow<'_, str> {
        match self {
            ParamValue::Int(n) => Cow::Owned(n.to_string()),
            ParamValue::Text(s) | ParamValue::Uuid(s) => Cow::Borrowed(s),
        }
    }

    /// Append the value's canonical key-text form (percent-encoded for text).
    fn render_into(&self, out: &mut String) {
        match self {
            ParamValue::Int(n) => {
                let _ = write!(out, "{n}");
            }
            ParamValue::Uuid(s) => out.push_str(s),
            ParamValue::Text(s) if s == "." || s == ".." => {
                for _ in 0..s.len() {
                    out.push_str("%2E");
                }
            }
            ParamValue::Text(s) => out.extend(utf8_percent_encode(s, TEXT_ENCODE)),
        }
    }
}

impl Key {
    /// The parameter values as Postgres text input, in template order (see
    /// [`Catalog::param_values_as_text`]).
    pub fn param_values_as_text(&self) -> Vec<String> {
        self.params
            .iter()
            .map(|v| v.as_pg_text().into_owned())
            .collect()
    }
}

/// Characters allowed in a literal segment of a template: URL "unreserved" characters, which key text
/// carries unchanged.
fn is_literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '~')
}

fn is_param_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

impl KeyTemplate {
    /// Parse a template such as `orders_by_user/{user_id:int}`.
    ///
    /// Segments are separated by `/` and none may be empty. A segment is either a literal of letters,
    /// digits, `_`, `-`, `.` and `~` (not `.` or `..`), or a parameter `{name}` / `{name:type}` with `name`
    /// matching `[a-z_][a-z0-9_]*` and type `int`, `text` (the default) or `uuid`. The first segment must
    /// be a literal; parameter names must be unique.
    pub fn parse(source: &str) -> Result<KeyTemplate, String> {
        if source.trim().is_empty() {
            return Err("the key template is empty".into());
        }
        let mut segments = Vec::new();
        let mut params: Vec<KeyParam> = Vec::new();
        for (i, part) in source.split('/').enumerate() {
            let position = i + 1;
            if part.is_empty() {
                return Err(format!(
                    "segment {position} is empty (segments are separated by a single '/', with none at the start or end)"
                ));
            }
            if let Some(inner) = part.strip_prefix('{') {
                let Some(inner) = inner.strip_suffix('}') else {
                    return Err(format!(
                        "segment '{part}' must end with '}}' (a parameter is a whole segment)"
                    ));
                };
                let (name, ty) = match inner.split_once(':') {
                    Some((name, ty)) => (name, ty),
                    None => (inner, "text"),
                };
                if !is_param_name(name) {
                    return Err(format!(
                        "parameter name '{name}' in '{part}' is not valid: use lower-case letters, digits and '_', not starting with a digit"
                    ));
                }
                let ty = match ty {
                    "int" => ParamType::Int,
                    "text" => ParamType::Text,
                    "uuid" => ParamType::Uuid,
                    other => {
                        return Err(format!(
                            "parameter '{name}' has unknown type '{other}': expected int, text or uuid"
                        ));
                    }
                };
                if params.iter().any(|p| p.name == name) {
                    return Err(format!("parameter '{name}' appears more than once"));
                }
                if i == 0 {
                    return Err(format!(
                        "the first segment must be a literal (such as the primer's name), not the parameter '{part}'"
                    ));
                }
                segments.push(Segment::Param(params.len()));
                params.push(KeyParam {
                    name: name.to_owned(),
                    ty,
                });
            } else {
                if let Some(bad) = part.chars().find(|&c| !is_literal_char(c)) {
                    return Err(format!(
                        "literal segment '{part}' contains '{}': literals may hold letters, digits, '_', '-', '.' and '~', and a parameter is written {{name}} or {{name:type}} as a whole segment",
                        bad.escape_default()
                    ));
                }
                if part == "." || part == ".." {
                    return Err(format!(
                        "literal segment '{part}' is not allowed (URLs drop it)"
                    ));
                }
                segments.push(Segment::Literal(part.to_owned()));
            }
        }
        Ok(KeyTemplate {
            source: source.to_owned(),
            segments,
            params,
        })
    }

    /// The first segment's literal (`""` if the template does not start with one, which `parse` forbids).
    pub fn first_literal(&self) -> &str {
        match self.segments.first() {
            Some(Segment::Literal(l)) => l,
            _ => "",
        }
    }

    /// The index of the parameter called `name`.
    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| p.name == name)
    }

    /// Whether some key text could match both templates: the same number of segments, and wherever both
    /// have a literal the literals are equal. (Parameter types are not considered.)
    pub fn overlaps(&self, other: &KeyTemplate) -> bool {
        self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|pair| match pair {
                    (Segment::Literal(a), Segment::Literal(b)) => a == b,
                    _ => true,
                })
    }

    /// Structural invariants the key functions rely on (they hold for any template from `parse`).
    fn check(&self) -> Result<(), String> {
        if !matches!(self.segments.first(), Some(Segment::Literal(_))) {
            return Err("the first segment must be a literal".into());
        }
        let mut next = 0;
        for segment in &self.segments {
            if let Segment::Param(p) = *segment {
                if p != next {
                    return Err("parameters must be referenced once each, in order".into());
                }
                next += 1;
            }
        }
        if next != self.params.len() {
            return Err("parameters must be referenced once each, in order".into());
        }
        Ok(())
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Fuzzing entry point (`fuzz/fuzz_targets/key.rs`): the first line of `data` holds up to four key
/// templates separated by tabs, each further line a key text. Templates that parse become primers of one
/// catalog (if [`Catalog::new`] takes them); each key is parsed against it. Must never panic, and a key
/// that parses renders to a canonical text that parses back to the same key.
#[doc(hidden)]
pub fn fuzz_key(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let Some(first) = lines.next() else {
        return;
    };
    let primers: Vec<Primer> = first
        .split('\t')
        .take(4)
        .enumerate()
        .filter_map(|(i, source)| {
            let template = KeyTemplate::parse(source).ok()?;
            let _ = template.first_literal();
            Some(Primer {
                name: format!("p{i}"),
                query: "SELECT 1".to_owned(),
                shape: Shape::Rows,
                dependencies: Vec::new(),
                depends_on_given: true,
                not_followed: Vec::new(),
                unqualified: Vec::new(),
                columns_read: Vec::new(),
                policy: Policy::default(),
                cache_control: None,
                access: None,
                template,
            })
        })
        .collect();
    for a in &primers {
        for b in &primers {
            // Overlap is symmetric: the catalog refuses a pair whichever comes first.
            assert_eq!(
                a.template.overlaps(&b.template),
                b.template.overlaps(&a.template)
            );
        }
    }
    let Ok(catalog) = Catalog::new(primers) else {
        return;
    };
    let _ = catalog.templates();
    for line in lines.take(16) {
        let Ok(key) = catalog.parse_key(line) else {
            continue;
        };
        let rendered = catalog.render(&key);
        if rendered.len() <= MAX_KEY_BYTES {
            assert_eq!(
                catalog.parse_key(&rendered).as_ref(),
                Ok(&key),
                "{line:?} -> {rendered:?}"
            );
        }
        let values = catalog.param_values_as_text(&key);
        let refs: Vec<Option<&str>> = values.iter().map(|v| Some(v.as_str())).collect();
        assert_eq!(
            catalog.key_from_text(key.primer, &refs).as_ref(),
            Some(&key)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primer(name: &str, key: &str) -> Primer {
        Primer {
            name: name.to_owned(),
            template: KeyTemplate::parse(key).unwrap(),
            query: "SELECT 1".to_owned(),
            shape: Shape::Rows,
            dependencies: vec![Dependency {
                table: TableName {
                    schema: "public".into(),
                    name: "t".into(),
                },
                mapping: Mapping::AllKeys,
            }],
            depends_on_given: true,
            unqualified: Vec::new(),
            columns_read: Vec::new(),
            not_followed: Vec::new(),
            policy: Default::default(),
            cache_control: None,
            access: None,
        }
    }

    fn catalog(keys: &[(&str, &str)]) -> Catalog {
        Catalog::new(keys.iter().map(|(n, k)| primer(n, k)).collect()).unwrap()
    }

    fn sample() -> Catalog {
        catalog(&[
            ("orders_by_user", "orders_by_user/{user_id:int}"),
            ("user_by_name", "user/by_name/{name}"),
            ("user_by_id", "user/by_id/{id:uuid}"),
            ("pair", "pair/{a:int}/x/{b:text}"),
            ("all", "all"),
        ])
    }

    #[test]
    fn template_parses() {
        let t = KeyTemplate::parse("orders_by_user/{user_id:int}/v-1.0~/{name}/{id:uuid}").unwrap();
        assert_eq!(
            t.source,
            "orders_by_user/{user_id:int}/v-1.0~/{name}/{id:uuid}"
        );
        assert_eq!(
            t.segments,
            vec![
                Segment::Literal("orders_by_user".into()),
                Segment::Param(0),
                Segment::Literal("v-1.0~".into()),
                Segment::Param(1),
                Segment::Param(2),
            ]
        );
        assert_eq!(
            t.params,
            vec![
                KeyParam {
                    name: "user_id".into(),
                    ty: ParamType::Int
                },
                KeyParam {
                    name: "name".into(),
                    ty: ParamType::Text
                },
                KeyParam {
                    name: "id".into(),
                    ty: ParamType::Uuid
                },
            ]
        );
        assert_eq!(t.first_literal(), "orders_by_user");
        assert_eq!(t.param_index("id"), Some(2));
        let t = KeyTemplate::parse("all").unwrap();
        assert_eq!(t.params, vec![]);
        assert!(KeyTemplate::parse("a/{_x9:text}").is_ok());
    }

    #[test]
    fn bad_templates() {
        for (bad, expect) in [
            ("", "empty"),
            ("   ", "empty"),
            ("a//b", "segment 2 is empty"),
            ("/a", "segment 1 is empty"),
            ("a/", "segment 2 is empty"),
            ("{id}", "first segment must be a literal"),
            ("{id}/a", "first segment must be a literal"),
            ("a/{id", "must end with '}'"),
            ("a/{id}x", "must end with '}'"),
            ("a/x{id}", "contains '{'"),
            ("a/{}", "parameter name '' "),
            ("a/{Id}", "parameter name 'Id'"),
            ("a/{9d}", "parameter name '9d'"),
            ("a/{id:integer}", "unknown type 'integer'"),
            ("a/{id:}", "unknown type ''"),
            ("a/{id}/{id:int}", "'id' appears more than once"),
            ("a b/{id}", "contains ' '"),
            ("a/%41", "contains '%'"),
            ("a/..", "'..' is not allowed"),
            ("a/./{x}", "'.' is not allowed"),
        ] {
            let err = KeyTemplate::parse(bad).expect_err(bad);
            assert!(err.contains(expect), "{bad:?}: {err}");
        }
    }

    #[test]
    fn ambiguity_is_rejected() {
        for (a, b) in [
            ("a/{x}", "a/{y:int}"),
            ("a/b", "a/{x}"),
            ("a/{x}/c", "a/b/{y}"),
            ("a", "a"),
        ] {
            let err = Catalog::new(vec![primer("p", a), primer("q", b)]).unwrap_err();
            assert!(
                err.contains(&format!("'{a}' (primer 'p')"))
                    && err.contains(&format!("'{b}' (primer 'q')")),
                "{err}"
            );
        }
        for (a, b) in [
            ("a/{x}", "b/{x}"),
            ("a/{x}", "a/{x}/{y}"),
            ("a/b/{x}", "a/c/{x}"),
            ("a", "a/{x}"),
        ] {
            Catalog::new(vec![primer("p", a), primer("q", b)]).unwrap();
        }
        let err = Catalog::new(vec![primer("p", "a"), primer("p", "b")]).unwrap_err();
        assert!(err.contains("both named 'p'"), "{err}");
    }

    #[test]
    fn parse_and_render() {
        let c = sample();
        let k = c.parse_key("orders_by_user/42").unwrap();
        assert_eq!(
            k,
            Key {
                primer: 0,
                params: vec![ParamValue::Int(42)]
            }
        );
        assert_eq!(c.render(&k), "orders_by_user/42");
        let k = c.parse_key("all").unwrap();
        assert_eq!(
            k,
            Key {
                primer: 4,
                params: vec![]
            }
        );
        assert_eq!(c.render(&k), "all");
        let k = c.parse_key("pair/-7/x/hello%20world").unwrap();
        assert_eq!(
            k.params,
            vec![ParamValue::Int(-7), ParamValue::Text("hello world".into())]
        );
        assert_eq!(c.render(&k), "pair/-7/x/hello%20world");
        assert_eq!(
            c.param_values_as_text(&k),
            vec!["-7".to_string(), "hello world".to_string()]
        );
        assert_eq!(
            c.primer("pair").map(|(i, p)| (i, p.name.as_str())),
            Some((3, "pair"))
        );
        assert!(c.primer("nope").is_none());
    }

    #[test]
    fn text_values_round_trip() {
        let c = sample();
        for (value, rendered) in [
            ("a/b", "a%2Fb"),
            ("100%", "100%25"),
            ("what? #1", "what%3F%20%231"),
            ("Zoë 東京", "Zo%C3%AB%20%E6%9D%B1%E4%BA%AC"),
            ("tab\there\n\u{7f}", "tab%09here%0A%7F"),
            ("a+b=c&d:e@f!$'()*,;~-._", "a+b=c&d:e@f!$'()*,;~-._"),
            ("", ""),
            (".", "%2E"),
            ("..", "%2E%2E"),
            ("...", "..."),
        ] {
            let key = Key {
                primer: 1,
                params: vec![ParamValue::Text(value.into())],
            };
            let text = c.render(&key);
            assert_eq!(text, format!("user/by_name/{rendered}"));
            assert_eq!(c.parse_key(&text).unwrap(), key, "{text}");
        }
        // Unnecessary encodings and stray '%' are accepted and canonicalised.
        let k = c.parse_key("user/by_name/%61%2fb%zz").unwrap();
        assert_eq!(k.params, vec![ParamValue::Text("a/b%zz".into())]);
        assert_eq!(c.render(&k), "user/by_name/a%2Fb%25zz");
        // Invalid UTF-8 after decoding.
        let err = c.parse_key("user/by_name/%FF").unwrap_err();
        assert!(
            matches!(err, KeyError::ParamType { ref param, .. } if param == "name"),
            "{err}"
        );
    }

    #[test]
    fn uuid_canonicalisation() {
        let c = sample();
        let canonical = "0f8fad5b-d9cb-469f-a165-70867728950e";
        for text in [
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
            "0f8fad5bd9cb469fa16570867728950e",
            "0F8FAD5BD9CB469FA16570867728950e",
        ] {
            let k = c.parse_key(&format!("user/by_id/{text}")).unwrap();
            assert_eq!(k.params, vec![ParamValue::Uuid(canonical.into())]);
            assert_eq!(c.render(&k), format!("user/by_id/{canonical}"));
        }
        for bad in [
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0f8fad5b-d9cb-469f-a165-70867728950e0",
            "0f8fad5bd-9cb-469f-a165-70867728950e",
            "0g8fad5b-d9cb-469f-a165-70867728950e",
            "0f8fad5bd9cb469fa16570867728950",
            "{0f8fad5b-d9cb-469f-a165-70867728950e}",
            "",
        ] {
            let err = c.parse_key(&format!("user/by_id/{bad}")).unwrap_err();
            match err {
                KeyError::ParamType {
                    param,
                    expected,
                    value,
                    ..
                } => {
                    assert_eq!(param, "id");
                    assert!(expected.contains("UUID"));
                    assert_eq!(value, bad);
                }
                other => panic!("{bad}: {other}"),
            }
        }
    }

    #[test]
    fn int_edge_cases() {
        let c = sample();
        for (text, value) in [
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
            ("0", 0),
            ("-0", 0),
            ("007", 7),
            ("+5", 5),
            ("%2B5", 5),
            ("-0000000000000000000001", -1),
        ] {
            let k = c.parse_key(&format!("orders_by_user/{text}")).unwrap();
            assert_eq!(k.params, vec![ParamValue::Int(value)], "{text}");
            assert_eq!(c.render(&k), format!("orders_by_user/{value}"));
        }
        for bad in [
            "9223372036854775808",
            "-9223372036854775809",
            "",
            "1.0",
            "1e3",
            " 1",
            "0x10",
            "-",
            "+",
            "abc",
        ] {
            let err = c.parse_key(&format!("orders_by_user/{bad}")).unwrap_err();
            assert!(
                matches!(&err, KeyError::ParamType { param, expected, .. } if param == "user_id" && expected.contains("integer")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn key_errors() {
        let c = sample();
        assert_eq!(
            c.parse_key("nope/1"),
            Err(KeyError::UnknownPrimer {
                key: "nope/1".into(),
                known: c.templates(),
            })
        );
        assert_eq!(
            c.parse_key(""),
            Err(KeyError::UnknownPrimer {
                key: "".into(),
                known: c.templates(),
            })
        );
        assert_eq!(
            c.parse_key("/orders_by_user/1"),
            Err(KeyError::UnknownPrimer {
                key: "/orders_by_user/1".into(),
                known: c.templates(),
            })
        );
        for (text, template) in [
            ("orders_by_user", "orders_by_user/{user_id:int}"),
            ("orders_by_user/1/2", "orders_by_user/{user_id:int}"),
            ("user/by_nme/x", "user/by_name/{name}"),
            ("user/by_name", "user/by_name/{name}"),
            ("pair/1/y/b", "pair/{a:int}/x/{b:text}"),
            ("all/", "all"),
        ] {
            assert_eq!(
                c.parse_key(text),
                Err(KeyError::Shape {
                    key: text.into(),
                    template: template.into()
                }),
                "{text}"
            );
        }
        let err = c.parse_key("orders_by_user/x1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "key parameter 'user_id' of 'orders_by_user/x1' must be an integer between -9223372036854775808 and 9223372036854775807, got 'x1'"
        );
    }

    #[test]
    fn key_from_text() {
        let c = sample();
        assert_eq!(
            c.key_from_text(0, &[Some("12")]),
            Some(Key {
                primer: 0,
                params: vec![ParamValue::Int(12)]
            })
        );
        assert_eq!(c.key_from_text(0, &[None]), None);
        assert_eq!(c.key_from_text(0, &[Some("1.5")]), None);
        assert_eq!(c.key_from_text(0, &[Some("99999999999999999999")]), None);
        assert_eq!(c.key_from_text(0, &[]), None);
        assert_eq!(c.key_from_text(0, &[Some("1"), Some("2")]), None);
        assert_eq!(c.key_from_text(99, &[Some("1")]), None);
        // Text is taken as is (no percent-decoding): it is a column value, not key text.
        let k = c.key_from_text(1, &[Some("a/b %41")]).unwrap();
        assert_eq!(k.params, vec![ParamValue::Text("a/b %41".into())]);
        assert_eq!(c.render(&k), "user/by_name/a%2Fb%20%2541");
        let k = c
            .key_from_text(2, &[Some("0F8FAD5BD9CB469FA16570867728950E")])
            .unwrap();
        assert_eq!(
            k.params,
            vec![ParamValue::Uuid(
                "0f8fad5b-d9cb-469f-a165-70867728950e".into()
            )]
        );
        assert_eq!(c.key_from_text(2, &[Some("nope")]), None);
        assert_eq!(
            c.key_from_text(4, &[]),
            Some(Key {
                primer: 4,
                params: vec![]
            })
        );
        let k = c.key_from_text(3, &[Some("5"), Some("")]).unwrap();
        assert_eq!(
            k.param_values_as_text(),
            vec!["5".to_string(), String::new()]
        );
    }

    #[test]
    fn tables_are_sorted_and_unique() {
        let mut a = primer("a", "a/{x}");
        a.dependencies.push(Dependency {
            table: TableName {
                schema: "app".into(),
                name: "z".into(),
            },
            mapping: Mapping::AllKeys,
        });
        let c = Catalog::new(vec![a, primer("b", "b")]).unwrap();
        let names: Vec<String> = c.tables().iter().map(ToString::to_string).collect();
        assert_eq!(names, vec!["app.z", "public.t"]);
    }

    /// A small deterministic generator (xorshift64*), so the property test needs no extra crates.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn property_parse_render_round_trip() {
        let c = sample();
        // No NUL: Postgres text cannot hold it, so a key with one is refused (`KeyError::Nul`).
        let alphabet: Vec<char> = "aZ09/%?# .~-_+\t\n\u{7f}éü東😀'\"\\{}".chars().collect();
        let mut g = Gen(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let primer = g.below(c.primers.len() as u64) as usize;
            let params = c.primers[primer]
                .template
                .params
                .iter()
                .map(|p| match p.ty {
                    ParamType::Int => ParamValue::Int(match g.below(4) {
                        0 => i64::MIN,
                        1 => i64::MAX,
                        _ => g.next() as i64 >> g.below(64),
                    }),
                    ParamType::Text => {
                        let len = g.below(8);
                        ParamValue::Text(
                            (0..len)
                                .map(|_| alphabet[g.below(alphabet.len() as u64) as usize])
                                .collect(),
                        )
                    }
                    ParamType::Uuid => {
                        let (a, b) = (g.next(), g.next());
                        let hex = format!("{a:016x}{b:016x}");
                        ParamValue::Uuid(canonical_uuid(&hex).unwrap())
                    }
                })
                .collect();
            let key = Key { primer, params };
            let text = c.render(&key);
            assert_eq!(c.parse_key(&text).as_ref(), Ok(&key), "{text}");
            // Canonical text is stable, and key text from the values gives the same key.
            let reparsed = c.parse_key(&text).unwrap();
            assert_eq!(c.render(&reparsed), text);
            let values = key.param_values_as_text();
            let refs: Vec<Option<&str>> = values.iter().map(|v| Some(v.as_str())).collect();
            assert_eq!(c.key_from_text(primer, &refs).as_ref(), Some(&key));
        }
    }
}
