//! The raw form: serde types that mirror the file. Every field is optional so that a missing one gets our
//! own message (with the enclosing mapping's line); values that need checking are kept as text with their
//! location.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) source: Option<Spanned<RawSource>>,
    pub(super) store: Option<Spanned<RawStore>>,
    pub(super) roles: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) http: Option<Spanned<RawHttp>>,
    pub(super) refresh: Option<Spanned<RawRefresh>>,
    pub(super) jobs: Option<Spanned<Vec<Spanned<RawJob>>>>,
    pub(super) prime_on_cache_miss: Option<Spanned<bool>>,
    pub(super) primers_dir: Option<Spanned<String>>,
    pub(super) primers: Option<Spanned<Vec<Spanned<RawPrimer>>>>,
    pub(super) auth: Option<Spanned<RawAuth>>,
    pub(super) write: Option<Spanned<RawWrite>>,
    pub(super) updaters_dir: Option<Spanned<String>>,
    pub(super) updaters: Option<Spanned<Vec<Spanned<RawUpdater>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) url: Option<Spanned<String>>,
    pub(super) publication: Option<Spanned<String>>,
    pub(super) create_publication: Option<Spanned<bool>>,
    pub(super) slot: Option<Spanned<String>>,
    pub(super) standby: Option<Spanned<bool>>,
    pub(super) max_retained_wal: Option<Spanned<String>>,
    pub(super) on_slot_lost: Option<Spanned<String>>,
}

/// One struct for every store kind: a field of another kind is rejected by validation, by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) kind: Option<Spanned<String>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) memory_cache: Option<Spanned<ScalarText>>,
    pub(super) max_entries: Option<Spanned<ScalarText>>,
    pub(super) max_bytes: Option<Spanned<ScalarText>>,
    pub(super) nodes: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) keyspace: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "present")]
    pub(super) replication: Option<Spanned<ReplicationPairs>>,
    pub(super) consistency: Option<Spanned<String>>,
    pub(super) username: Option<Spanned<String>>,
    pub(super) password: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "present")]
    pub(super) tls: Option<Spanned<RawTls>>,
    pub(super) init: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_file: Option<Spanned<String>>,
}

/// A number or a word, as the values of `store.replication` are.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Scalar {
    Int(i64),
    Text(String),
}

/// The `store.replication` mapping, in file order.
#[derive(Debug)]
pub(super) struct ReplicationPairs(pub(super) Vec<(String, Spanned<Scalar>)>);

impl<'de> Deserialize<'de> for ReplicationPairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ReplicationPairs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a mapping such as { class: NetworkTopologyStrategy, dc1: 3 } or { class: SimpleStrategy, replication_factor: 1 }",
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ReplicationPairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value()?;
                    pairs.push((key, value));
                }
                Ok(ReplicationPairs(pairs))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    pub(super) bind: Option<Spanned<String>>,
    pub(super) request_timeout: Option<Spanned<String>>,
    pub(super) body_limit: Option<Spanned<ScalarText>>,
    pub(super) max_batch_keys: Option<Spanned<i64>>,
    pub(super) wait_timeout: Option<Spanned<String>>,
    pub(super) max_wait: Option<Spanned<String>>,
    pub(super) cors_origins: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) header_read_timeout: Option<Spanned<String>>,
    pub(super) max_header_bytes: Option<Spanned<ScalarText>>,
    pub(super) max_batch_misses: Option<Spanned<i64>>,
    pub(super) max_concurrent_misses: Option<Spanned<i64>>,
    pub(super) miss_wait: Option<Spanned<String>>,
    pub(super) allowed_hosts: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) subscribe: Option<Spanned<RawSubscribe>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubscribe {
    pub(super) heartbeat: Option<Spanned<String>>,
    pub(super) max_subscriptions: Option<Spanned<i64>>,
    pub(super) max_keys: Option<Spanned<i64>>,
    pub(super) buffer: Option<Spanned<i64>>,
    pub(super) poll: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWrite {
    pub(super) url: Option<Spanned<String>>,
    pub(super) connections: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) jwt: Option<Spanned<RawJwt>>,
    pub(super) public_paths: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) operator: Option<Spanned<RawAccess>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwt {
    pub(super) algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) secret_env: Option<Spanned<String>>,
    pub(super) public_key_file: Option<Spanned<String>>,
    pub(super) jwks_file: Option<Spanned<String>>,
    pub(super) issuer: Option<Spanned<OneOrMany>>,
    pub(super) audience: Option<Spanned<OneOrMany>>,
    pub(super) leeway: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpdater {
    pub(super) name: Option<Spanned<String>>,
    pub(super) params: Option<Spanned<Vec<Spanned<RawParam>>>>,
    pub(super) statements: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) access: Option<Spanned<RawAccess>>,
}

/// An updater parameter: `name:type` (type default `text`), or `{ name, type, nullable }`.
#[derive(Debug)]
pub(super) struct RawParam {
    pub(super) name: String,
    pub(super) ty: Option<String>,
    pub(super) nullable: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawParamFields {
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) ty: Option<String>,
    #[serde(default)]
    pub(super) nullable: bool,
}

impl<'de> Deserialize<'de> for RawParam {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawParam;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`name:type` (such as user_id:int) or { name: user_id, type: int, nullable: false }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawParam, E> {
                let (name, ty) = match v.split_once(':') {
                    Some((n, t)) => (n.trim(), Some(t.trim().to_owned())),
                    None => (v.trim(), None),
                };
                Ok(RawParam {
                    name: name.to_owned(),
                    ty,
                    nullable: false,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawParam, A::Error> {
                let f =
                    RawParamFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawParam {
                    name: f.name,
                    ty: f.ty,
                    nullable: f.nullable,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `access`: one rule (a mapping) or a list of rules, any of which grants access.
#[derive(Debug)]
pub(super) struct RawAccess(
    pub(super) Vec<Spanned<RawAccessRule>>,
    pub(super) Option<RawAccessRule>,
);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccessRule {
    pub(super) require: Option<Spanned<RequirePairs>>,
    #[serde(rename = "match")]
    pub(super) matches: Option<Spanned<ColumnPairs>>,
}

impl<'de> Deserialize<'de> for RawAccess {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawAccess;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a rule such as { require: { role: admin }, match: { sub: user_id } }, or a list of rules",
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawAccess, A::Error> {
                let rule =
                    RawAccessRule::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawAccess(Vec::new(), Some(rule)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<RawAccess, A::Error> {
                let rules = Vec::<Spanned<RawAccessRule>>::deserialize(
                    serde::de::value::SeqAccessDeserializer::new(seq),
                )?;
                Ok(RawAccess(rules, None))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `require`: claim → accepted value (a scalar) or values (a list of scalars), in file order.
#[derive(Debug)]
pub(super) struct RequirePairs(pub(super) Vec<(String, Vec<String>)>);

impl<'de> Deserialize<'de> for RequirePairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RequirePairs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping from claim to required value, such as { role: admin }")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RequirePairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(claim) = map.next_key::<String>()? {
                    let OneOrMany(values) = map.next_value::<OneOrMany>()?;
                    pairs.push((claim, values));
                }
                Ok(RequirePairs(pairs))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// A scalar (string, number or boolean) as text, or a list of them.
#[derive(Debug)]
pub(super) struct OneOrMany(pub(super) Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(ScalarText(v)) = seq.next_element::<ScalarText>()? {
                    out.push(v);
                }
                Ok(OneOrMany(out))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A scalar (string, number or boolean) as text.
#[derive(Debug)]
pub(super) struct ScalarText(pub(super) String);

impl<'de> Deserialize<'de> for ScalarText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ScalarText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a number or true/false")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRefresh {
    pub(super) workers: Option<Spanned<i64>>,
    pub(super) visibility_timeout: Option<Spanned<String>>,
    pub(super) pool_size: Option<Spanned<i64>>,
    pub(super) max_queue: Option<Spanned<i64>>,
    pub(super) cold_after: Option<Spanned<String>>,
    pub(super) claim_batch: Option<Spanned<i64>>,
    pub(super) absent_rows: Option<Spanned<String>>,
    pub(super) absent_window: Option<Spanned<String>>,
    pub(super) park_after: Option<Spanned<i64>>,
    pub(super) parked_retry: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJob {
    pub(super) name: Option<Spanned<String>>,
    pub(super) sql: Option<Spanned<String>>,
    pub(super) interval: Option<Spanned<String>>,
    pub(super) cron: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBatch {
    pub(super) query: Option<Spanned<String>>,
    pub(super) key_column: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrimer {
    pub(super) name: Option<Spanned<String>>,
    pub(super) key: Option<Spanned<String>>,
    pub(super) shape: Option<Spanned<String>>,
    pub(super) query: Option<Spanned<String>>,
    pub(super) depends_on: Option<Spanned<Vec<Spanned<RawDependency>>>>,
    pub(super) not_followed: Option<Spanned<Vec<Spanned<String>>>>,
    // Refresh policy (see `crate::schedule::Policy`).
    pub(super) refresh_interval: Option<Spanned<String>>,
    pub(super) ttl: Option<Spanned<String>>,
    pub(super) on_expiry: Option<Spanned<String>>,
    pub(super) stale_while_revalidate: Option<Spanned<String>>,
    pub(super) cold_after: Option<Spanned<String>>,
    pub(super) warm: Option<Spanned<String>>,
    pub(super) concurrency: Option<Spanned<i64>>,
    pub(super) batch: Option<Spanned<RawBatch>>,
    pub(super) cache_control: Option<Spanned<String>>,
    pub(super) access: Option<Spanned<RawAccess>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDependency {
    pub(super) table: Option<Spanned<String>>,
    /// `columns:` with no value is an error rather than absent (which would mean "all keys").
    #[serde(default, deserialize_with = "present")]
    pub(super) columns: Option<Spanned<ColumnPairs>>,
    #[serde(default, deserialize_with = "present")]
    pub(super) lookup: Option<Spanned<RawLookup>>,
}

/// For a field whose explicit null must not read as "absent": deserialize the value as `T` even if null.
pub(super) fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLookup {
    pub(super) query: Option<Spanned<String>>,
    pub(super) args: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A `columns` mapping (key parameter → column), in file order.
#[derive(Debug)]
pub(super) struct ColumnPairs(pub(super) Vec<(String, Spanned<String>)>);

impl<'de> Deserialize<'de> for ColumnPairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ColumnPairs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping from key parameter to column, such as { user_id: user_id }")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ColumnPairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value()?;
                    pairs.push((key, value));
                }
                Ok(ColumnPairs(pairs))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}
