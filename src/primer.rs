//! Primers: parameterised queries whose results kck caches, and their keys.
//!
//! A primer has a key template (`orders_by_user/{user_id:int}`), one SQL query whose `$1..$n` are the key's
//! parameters in template order, a result [`Shape`], and [`Dependency`]s that say which changed rows affect
//! which keys. A [`Key`] is one instance of a template: its canonical text is the cache key.
//!
//! Key text grammar: segments separated by `/`; a template segment is either a literal or `{name}` /
//! `{name:type}` with type `int`, `text` (default) or `uuid`. In key text, parameter values are
//! percent-encoded so that a text value may hold `/`. The canonical form of a key is what
//! [`Key::render`] produces: integers without leading zeros or `+`, UUIDs in lower-case hyphenated form,
//! text percent-encoded minimally.

use std::fmt;

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

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
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
    #[error("no primer has a key template matching '{key}'")]
    UnknownPrimer { key: String },
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

/// All primers of a config, indexed for key parsing.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub primers: Vec<Primer>,
}

impl Catalog {
    /// Build the catalog. Fails if two templates could match the same key text.
    pub fn new(primers: Vec<Primer>) -> Result<Catalog, String> {
        Ok(Catalog { primers })
    }

    /// Look a primer up by name.
    pub fn primer(&self, name: &str) -> Option<(usize, &Primer)> {
        self.primers
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == name)
    }

    /// Parse key text (as in `/fetch/{key}`, percent-encoded parameter values) into a typed key.
    pub fn parse_key(&self, text: &str) -> Result<Key, KeyError> {
        Err(KeyError::UnknownPrimer {
            key: text.to_string(),
        })
    }

    /// The canonical text of a key.
    pub fn render(&self, key: &Key) -> String {
        let _ = key;
        String::new()
    }

    /// Build a key of `primer` from text values (as pgoutput or a lookup query gives them), one per
    /// template parameter. `None` (NULL, or a value that is not of the parameter's type) means the row maps
    /// to no key.
    pub fn key_from_text(&self, primer: usize, values: &[Option<&str>]) -> Option<Key> {
        let _ = (primer, values);
        None
    }
}
