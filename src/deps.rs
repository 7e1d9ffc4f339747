//! Dependencies: which cached keys a changed row affects.
//!
//! [`DepIndex`] is built once from the primers. When the stream describes a table (a pgoutput Relation
//! message) [`DepIndex::resolve`] turns every dependency on that table into column positions, once; then
//! [`DepIndex::map_row`] runs per changed row and only indexes into the row images.
//!
//! Rules (see `docs/config.md`):
//! - INSERT maps the new row, DELETE the old row, UPDATE both (two keys when a row moves between keys).
//! - An unchanged TOASTed value (`'u'`) is taken from the old row image when there is one.
//! - When a value a mapping needs was not sent (an UPDATE without an old image, a key-only old image under
//!   `REPLICA IDENTITY DEFAULT` while the mapping reads a non-key column, or a `'u'` with no old value),
//!   the row cannot be mapped to exact keys, so every cached key of that primer is refreshed instead. That
//!   is always correct, but costly: [`ResolvedTable::warnings`] says so, with the `ALTER TABLE` that fixes it.
//!
//! **Architecture invariant:** nothing here does IO; lookups become [`TaskKind::Lookup`] tasks that the
//! refresh workers run.

use std::collections::HashMap;
use std::sync::Arc;

use crate::primer::{Catalog, Mapping, TableName};
use crate::queue::TaskKind;
use crate::replication::pgoutput::{Relation, Tuple, Value};

/// One changed row, as pgoutput sent it. `old_is_key`: the old image holds only the replica identity key
/// columns (the others read as NULL because they were not sent).
#[derive(Debug, Clone, Copy)]
pub enum RowChange<'a> {
    Insert {
        new: &'a Tuple,
    },
    Update {
        old: Option<&'a Tuple>,
        old_is_key: bool,
        new: &'a Tuple,
    },
    Delete {
        old: &'a Tuple,
        old_is_key: bool,
    },
}

/// Every primer dependency, by table.
#[derive(Debug, Clone)]
pub struct DepIndex {
    catalog: Arc<Catalog>,
    /// Table → (primer index, dependency index).
    by_table: HashMap<TableName, Vec<(usize, usize)>>,
}

#[derive(Debug, Clone)]
enum Target {
    /// Column positions in template parameter order.
    Columns {
        primer: usize,
        columns: Vec<usize>,
        all_key: bool,
    },
    Lookup {
        primer: usize,
        dependency: usize,
        columns: Vec<usize>,
        all_key: bool,
    },
    AllKeys {
        primer: usize,
    },
}

/// One dependency resolved, with the positions of the columns its primer reads from the table (`None`:
/// unknown, every change counts).
#[derive(Debug, Clone)]
struct Resolved {
    target: Target,
    reads: Option<Vec<usize>>,
}

/// The dependencies on one table, resolved against its current column list.
#[derive(Debug, Clone)]
pub struct ResolvedTable {
    pub table: TableName,
    targets: Vec<Resolved>,
    /// Dependencies that name a column the table does not have. They fall back to refreshing all keys.
    pub errors: Vec<String>,
    /// Mappings that will often fall back to refreshing all keys, with the fix.
    pub warnings: Vec<String>,
}

impl ResolvedTable {
    /// Whether any primer depends on this table.
    pub fn is_relevant(&self) -> bool {
        !self.targets.is_empty()
    }
}

impl DepIndex {
    pub fn new(catalog: Arc<Catalog>) -> DepIndex {
        let mut by_table: HashMap<TableName, Vec<(usize, usize)>> = HashMap::new();
        for (p, primer) in catalog.primers.iter().enumerate() {
            for (d, dep) in primer.dependencies.iter().enumerate() {
                by_table.entry(dep.table.clone()).or_default().push((p, d));
            }
        }
        DepIndex { catalog, by_table }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Every table some primer reads.
    pub fn tables(&self) -> impl Iterator<Item = &TableName> {
        self.by_table.keys()
    }

    /// Names of the primers that read `table`, each once.
    pub fn primers_reading(&self, table: &TableName) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .by_table
            .get(table)
            .into_iter()
            .flatten()
            .map(|(p, _)| self.catalog.primers[*p].name.as_str())
            .collect();
        names.dedup();
        names
    }

    /// Whether some primer depends on `table`.
    pub fn follows(&self, table: &TableName) -> bool {
        self.by_table.contains_key(table)
    }

    /// Resolve the dependencies on the relation's table to column positions.
    pub fn resolve(&self, relation: &Relation) -> ResolvedTable {
        let table = TableName {
            schema: relation.namespace.clone(),
            name: relation.name.clone(),
        };
        self.resolve_as(relation, table)
    }

    /// Resolve `relation` (a partition, as the stream names it when the publication does not publish via
    /// the root) with the dependencies declared on `table` (its root or another ancestor): partitions share
    /// their root's column names, and positions are taken from the relation itself.
    pub fn resolve_as(&self, relation: &Relation, table: TableName) -> ResolvedTable {
        let mut resolved = ResolvedTable {
            table: table.clone(),
            targets: Vec::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
        };
        let position = |name: &str| relation.columns.iter().position(|c| c.name == name);
        let is_key = |i: usize| relation.columns[i].flags & 1 == 1;
        let full = relation.replica_identity == b'f';
        for &(p, d) in self.by_table.get(&table).into_iter().flatten() {
            let primer = &self.catalog.primers[p];
            // Column relevance: where each column the primer reads sits in the stream's rows.
            let reads: Option<Vec<usize>> = primer
                .columns_read
                .iter()
                .find(|(t, _)| *t == table)
                .and_then(|(_, columns)| columns.iter().map(|c| position(c)).collect());
            let resolve = |target: Target| Resolved {
                target,
                reads: reads.clone(),
            };
            let names: Vec<&str> = match &primer.dependencies[d].mapping {
                Mapping::AllKeys => {
                    resolved
                        .targets
                        .push(resolve(Target::AllKeys { primer: p }));
                    continue;
                }
                Mapping::Columns(pairs) => {
                    let mut by_param: Vec<(usize, &str)> =
                        pairs.iter().map(|(i, c)| (*i, c.as_str())).collect();
                    by_param.sort_by_key(|(i, _)| *i);
                    by_param.into_iter().map(|(_, c)| c).collect()
                }
                Mapping::Lookup { args, .. } => args.iter().map(String::as_str).collect(),
            };
            let mut columns = Vec::with_capacity(names.len());
            for name in &names {
                match position(name) {
                    Some(i) => columns.push(i),
                    None => resolved.errors.push(format!(
                        "primer '{}' depends on column '{}' of table {}, which the replication stream \
                         does not carry (the table no longer has it, or it is a generated column, which \
                         Postgres does not replicate); every change to {} now refreshes all of the primer's \
                         keys. Map stored columns in the primer's depends_on and restart kck.",
                        primer.name, name, table, table
                    )),
                }
            }
            if columns.len() != names.len() {
                resolved
                    .targets
                    .push(resolve(Target::AllKeys { primer: p }));
                continue;
            }
            let all_key = columns.iter().all(|&i| is_key(i));
            if !all_key && !full {
                resolved.warnings.push(format!(
                    "table {table} has REPLICA IDENTITY {} and primer '{}' maps its non-key column(s) {}: \
                     Postgres does not send their old values, so every UPDATE and DELETE of {table} \
                     refreshes all of the primer's cached keys. To refresh only the affected keys run: \
                     ALTER TABLE {table} REPLICA IDENTITY FULL;",
                    identity_name(relation.replica_identity),
                    primer.name,
                    names.join(", "),
                ));
            }
            resolved
                .targets
                .push(resolve(match &primer.dependencies[d].mapping {
                    Mapping::Lookup { .. } => Target::Lookup {
                        primer: p,
                        dependency: d,
                        columns,
                        all_key,
                    },
                    _ => Target::Columns {
                        primer: p,
                        columns,
                        all_key,
                    },
                }));
        }
        resolved
    }

    /// Map one changed row to tasks.
    pub fn map_row(
        &self,
        table: &ResolvedTable,
        change: RowChange<'_>,
        emit: &mut dyn FnMut(TaskKind),
    ) {
        for Resolved { target, reads } in &table.targets {
            // Column relevance: an UPDATE whose full old image shows that no column the primer reads
            // changed cannot change any of its results.
            if let (
                Some(reads),
                RowChange::Update {
                    old: Some(old),
                    old_is_key: false,
                    new,
                },
            ) = (reads, change)
                && unchanged(old, new, reads)
            {
                continue;
            }
            let (primer, columns, all_key) = match target {
                Target::AllKeys { primer } => {
                    emit(self.all_keys(*primer));
                    continue;
                }
                Target::Columns {
                    primer,
                    columns,
                    all_key,
                }
                | Target::Lookup {
                    primer,
                    columns,
                    all_key,
                    ..
                } => (*primer, columns.as_slice(), *all_key),
            };
            // The images to map, each with the image that may stand in for its unchanged TOAST values; and
            // whether an image that was needed is missing (then the exact keys are unknown).
            let mut images: [Option<(&Tuple, Option<&Tuple>)>; 2] = [None, None];
            let mut exact = true;
            match change {
                RowChange::Insert { new } => images[0] = Some((new, None)),
                RowChange::Update {
                    old,
                    old_is_key,
                    new,
                } => {
                    let full_old = old.filter(|_| !old_is_key);
                    images[0] = Some((new, full_old));
                    match old {
                        Some(old) if !old_is_key || all_key => images[1] = Some((old, None)),
                        // Without an old image the key columns did not change; the old values of non-key
                        // columns are unknown.
                        None if all_key => {}
                        _ => exact = false,
                    }
                }
                RowChange::Delete { old, old_is_key } => {
                    if !old_is_key || all_key {
                        images[0] = Some((old, None));
                    } else {
                        exact = false;
                    }
                }
            }
            // The values the first image mapped to: an UPDATE that leaves the mapped columns alone maps
            // its old image to the same key, which is then not built (and checked and queued) twice.
            let mut first: Option<Vec<Option<&str>>> = None;
            for (image, stand_in) in images.into_iter().flatten() {
                let Some(values) = values(image, stand_in, columns) else {
                    exact = false;
                    continue;
                };
                if first.as_ref() == Some(&values) {
                    continue;
                }
                match target {
                    Target::Columns { .. } => {
                        if let Some(key) = self.catalog.key_from_text(primer, &values) {
                            emit(TaskKind::Key(self.catalog.render(&key)));
                        }
                    }
                    Target::Lookup { dependency, .. } => {
                        if values.iter().any(Option::is_some) {
                            emit(TaskKind::Lookup {
                                primer: self.catalog.primers[primer].name.clone(),
                                dependency: *dependency,
                                args: values.iter().map(|v| v.map(str::to_string)).collect(),
                            });
                        }
                    }
                    Target::AllKeys { .. } => {}
                }
                first = Some(values);
            }
            if !exact {
                emit(self.all_keys(primer));
            }
        }
    }

    fn all_keys(&self, primer: usize) -> TaskKind {
        TaskKind::Primer {
            primer: self.catalog.primers[primer].name.clone(),
            after: None,
        }
    }
}

/// Whether `new` holds the same value as `old` at every one of `columns` (an unchanged TOAST value in
/// `new` is the same; one in `old`, or a column missing from either, is not known to be).
fn unchanged(old: &Tuple, new: &Tuple, columns: &[usize]) -> bool {
    columns.iter().all(|&i| match (old.0.get(i), new.0.get(i)) {
        (Some(_), Some(Value::UnchangedToast)) => true,
        (Some(Value::Null), Some(Value::Null)) => true,
        (Some(Value::Text(a)), Some(Value::Text(b))) => a == b,
        (Some(Value::Binary(a)), Some(Value::Binary(b))) => a == b,
        _ => false,
    })
}

/// The text values at `columns` of `image`; an unchanged TOAST value is taken from `other`. `None` when a
/// value is not available as text (unchanged TOAST with no other image, binary, not UTF-8).
fn values<'a>(
    image: &'a Tuple,
    other: Option<&'a Tuple>,
    columns: &[usize],
) -> Option<Vec<Option<&'a str>>> {
    columns
        .iter()
        .map(|&i| match image.0.get(i)? {
            Value::Null => Some(None),
            Value::Text(bytes) => std::str::from_utf8(bytes).ok().map(Some),
            Value::UnchangedToast => match other?.0.get(i)? {
                Value::Text(bytes) => std::str::from_utf8(bytes).ok().map(Some),
                Value::Null => Some(None),
                _ => None,
            },
            Value::Binary(_) => None,
        })
        .collect()
}

fn identity_name(code: u8) -> &'static str {
    match code {
        b'd' => "DEFAULT",
        b'n' => "NOTHING",
        b'i' => "USING INDEX",
        b'f' => "FULL",
        _ => "(unknown)",
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use bytes::Bytes;

    use super::*;
    use crate::config::Config;
    use crate::replication::pgoutput::Column;

    const YAML: &str = r#"
source: { url: "postgres://u@localhost/db" }
primers:
  - name: by_user
    key: "by_user/{user_id:int}"
    query: "SELECT * FROM orders WHERE user_id = $1"
    depends_on:
      - table: orders
        columns: { user_id: user_id }
      - table: items
        lookup: { query: "SELECT user_id FROM orders WHERE id = $1", args: [order_id] }
  - name: order
    key: "order/{id:int}"
    query: "SELECT * FROM orders WHERE id = $1"
    depends_on:
      - table: orders
        columns: { id: id }
  - name: everything
    key: "everything/{n:int}"
    query: "SELECT count(*) + $1 FROM orders"
    depends_on:
      - table: orders
"#;

    fn index() -> DepIndex {
        let config = Config::from_yaml_str(YAML, Path::new("t.yaml"), |_| None).unwrap();
        DepIndex::new(Arc::new(config.catalog))
    }

    fn relation(name: &str, identity: u8, columns: &[(&str, bool)]) -> Relation {
        Relation {
            id: 1,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: identity,
            columns: columns
                .iter()
                .map(|(n, key)| Column {
                    flags: u8::from(*key),
                    name: n.to_string(),
                    type_oid: 20,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn tuple(values: &[Option<&str>]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| match v {
                    Some("<toast>") => Value::UnchangedToast,
                    Some(s) => Value::Text(Bytes::from(s.to_string())),
                    None => Value::Null,
                })
                .collect(),
        )
    }

    fn map(index: &DepIndex, table: &ResolvedTable, change: RowChange<'_>) -> Vec<String> {
        let mut out = Vec::new();
        index.map_row(table, change, &mut |k| {
            out.push(k.id().replace('\u{1f}', " "))
        });
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn full_identity_maps_old_and_new_rows() {
        let index = index();
        let orders = index.resolve(&relation(
            "orders",
            b'f',
            &[("id", true), ("user_id", false)],
        ));
        assert!(orders.warnings.is_empty() && orders.errors.is_empty());
        let old = tuple(&[Some("5"), Some("1")]);
        let new = tuple(&[Some("5"), Some("2")]);
        let moved = RowChange::Update {
            old: Some(&old),
            old_is_key: false,
            new: &new,
        };
        assert_eq!(
            map(&index, &orders, moved),
            ["k by_user/1", "k by_user/2", "k order/5", "p everything"]
        );
        let insert = RowChange::Insert { new: &new };
        assert_eq!(
            map(&index, &orders, insert),
            ["k by_user/2", "k order/5", "p everything"]
        );
        let delete = RowChange::Delete {
            old: &old,
            old_is_key: false,
        };
        assert_eq!(
            map(&index, &orders, delete),
            ["k by_user/1", "k order/5", "p everything"]
        );
    }

    #[test]
    fn an_update_that_keeps_the_key_emits_it_once() {
        let index = index();
        let orders = index.resolve(&relation(
            "orders",
            b'f',
            &[("id", true), ("user_id", false)],
        ));
        let old = tuple(&[Some("5"), Some("1")]);
        let new = tuple(&[Some("5"), Some("1")]);
        let mut emitted = Vec::new();
        let update = RowChange::Update {
            old: Some(&old),
            old_is_key: false,
            new: &new,
        };
        index.map_row(&orders, update, &mut |k| emitted.push(k.id()));
        emitted.sort();
        assert_eq!(
            emitted,
            ["k\u{1f}by_user/1", "k\u{1f}order/5", "p\u{1f}everything"]
        );
    }

    #[test]
    fn an_update_of_columns_no_primer_reads_refreshes_nothing() {
        let mut config = Config::from_yaml_str(YAML, Path::new("t.yaml"), |_| None).unwrap();
        let orders = TableName {
            schema: "public".into(),
            name: "orders".into(),
        };
        // by_user reads user_id, `everything` no column (count(*)); `order` lists none, so its reads are
        // unknown and every change counts.
        config.catalog.primers[0].columns_read = vec![(orders.clone(), vec!["user_id".into()])];
        config.catalog.primers[2].columns_read = vec![(orders.clone(), vec![])];
        let index = DepIndex::new(Arc::new(config.catalog));
        let full = index.resolve(&relation(
            "orders",
            b'f',
            &[("id", true), ("user_id", false), ("note", false)],
        ));
        let old = tuple(&[Some("5"), Some("1"), Some("a")]);
        let note_only = tuple(&[Some("5"), Some("1"), Some("b")]);
        let update = |new| RowChange::Update {
            old: Some(&old),
            old_is_key: false,
            new,
        };
        assert_eq!(map(&index, &full, update(&note_only)), ["k order/5"]);
        // An unchanged TOAST value is unchanged.
        let toasted = tuple(&[Some("5"), Some("<toast>"), Some("b")]);
        assert_eq!(map(&index, &full, update(&toasted)), ["k order/5"]);
        let moved = tuple(&[Some("5"), Some("2"), Some("a")]);
        assert_eq!(
            map(&index, &full, update(&moved)),
            ["k by_user/1", "k by_user/2", "k order/5"]
        );
        // Inserts and deletes always count; so does an UPDATE without the full old row.
        assert_eq!(
            map(&index, &full, RowChange::Insert { new: &note_only }),
            ["k by_user/1", "k order/5", "p everything"]
        );
        let key_only = RowChange::Update {
            old: None,
            old_is_key: false,
            new: &note_only,
        };
        assert_eq!(
            map(&index, &full, key_only),
            ["k by_user/1", "k order/5", "p by_user", "p everything"]
        );
    }

    #[test]
    fn default_identity_falls_back_to_every_key_when_the_old_value_is_unknown() {
        let index = index();
        let orders = index.resolve(&relation(
            "orders",
            b'd',
            &[("id", true), ("user_id", false)],
        ));
        assert_eq!(orders.warnings.len(), 1);
        assert!(orders.warnings[0].contains("ALTER TABLE public.orders REPLICA IDENTITY FULL"));
        let new = tuple(&[Some("5"), Some("2")]);
        // No old image: the key column did not change, but user_id may have.
        let update = RowChange::Update {
            old: None,
            old_is_key: false,
            new: &new,
        };
        assert_eq!(
            map(&index, &orders, update),
            ["k by_user/2", "k order/5", "p by_user", "p everything"]
        );
        // A key-only old image: user_id reads as NULL because it was not sent.
        let old_key = tuple(&[Some("5"), None]);
        let delete = RowChange::Delete {
            old: &old_key,
            old_is_key: true,
        };
        assert_eq!(
            map(&index, &orders, delete),
            ["k order/5", "p by_user", "p everything"]
        );
    }

    #[test]
    fn unchanged_toast_comes_from_the_old_row_or_falls_back() {
        let index = index();
        let orders = index.resolve(&relation(
            "orders",
            b'f',
            &[("id", true), ("user_id", false)],
        ));
        let old = tuple(&[Some("5"), Some("1")]);
        let new = tuple(&[Some("5"), Some("<toast>")]);
        let update = RowChange::Update {
            old: Some(&old),
            old_is_key: false,
            new: &new,
        };
        assert_eq!(
            map(&index, &orders, update),
            ["k by_user/1", "k order/5", "p everything"]
        );
        let insert = RowChange::Insert { new: &new };
        assert_eq!(
            map(&index, &orders, insert),
            ["k order/5", "p by_user", "p everything"]
        );
    }

    #[test]
    fn lookups_become_tasks_and_nulls_map_to_no_key() {
        let index = index();
        let items = index.resolve(&relation(
            "items",
            b'f',
            &[("id", true), ("order_id", false)],
        ));
        let new = tuple(&[Some("1"), Some("9")]);
        assert_eq!(
            map(&index, &items, RowChange::Insert { new: &new }),
            ["l by_user 1 [\"9\"]"]
        );
        let orders = index.resolve(&relation(
            "orders",
            b'f',
            &[("id", true), ("user_id", false)],
        ));
        let null_user = tuple(&[Some("5"), None]);
        assert_eq!(
            map(&index, &orders, RowChange::Insert { new: &null_user }),
            ["k order/5", "p everything"]
        );
        let unrelated = index.resolve(&relation("other", b'd', &[("id", true)]));
        assert!(!unrelated.is_relevant());
    }

    #[test]
    fn a_dropped_dependency_column_is_reported_and_refreshes_everything() {
        let index = index();
        let orders = index.resolve(&relation("orders", b'f', &[("id", true)]));
        assert_eq!(orders.errors.len(), 1, "{:?}", orders.errors);
        assert!(orders.errors[0].contains("'user_id'"));
        let new = tuple(&[Some("5")]);
        assert_eq!(
            map(&index, &orders, RowChange::Insert { new: &new }),
            ["k order/5", "p by_user", "p everything"]
        );
    }
}
