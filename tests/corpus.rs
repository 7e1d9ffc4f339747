//! Dependencies from the query itself, at scale: 40 primers over 10 tables (a partitioned one, views of
//! views), **none with depends_on**, covering the SQL people write. A randomised workload writes every
//! table; after the queue drains every cached key equals its query run fresh. The test prints, per primer,
//! what kck inferred (per key or table level) and the keys it refreshed against a refresh-everything
//! baseline (the seed is printed; `KCK_CORPUS_SEED` replays one).

use std::collections::BTreeMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::support::kck::{ConfigYaml, assert_converged, fetch, load, start, wait_drained};
use crate::support::pg::database;

const SCHEMA: &str = r#"
CREATE TABLE countries (id int PRIMARY KEY, code text NOT NULL UNIQUE, name text NOT NULL);
CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL, country_id int NOT NULL,
    prefs jsonb NOT NULL DEFAULT '{}');
CREATE TABLE products (id int PRIMARY KEY, sku text NOT NULL UNIQUE, name text NOT NULL, price numeric(10,2) NOT NULL,
    tags text[] NOT NULL DEFAULT '{}', attrs jsonb NOT NULL DEFAULT '{}');
CREATE TABLE categories (id int PRIMARY KEY, name text NOT NULL, parent_id int);
CREATE TABLE product_categories (product_id int NOT NULL, category_id int NOT NULL, PRIMARY KEY (product_id, category_id));
CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL, status text NOT NULL, total numeric(10,2) NOT NULL);
CREATE TABLE order_items (id int PRIMARY KEY, order_id int NOT NULL, product_id int NOT NULL, qty int NOT NULL);
CREATE TABLE reviews (id int PRIMARY KEY, product_id int NOT NULL, user_id int NOT NULL, stars int NOT NULL, body text);
CREATE TABLE events (id int NOT NULL, user_id int NOT NULL, kind text NOT NULL, PRIMARY KEY (id, user_id))
    PARTITION BY HASH (user_id);
CREATE TABLE events_0 PARTITION OF events FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE events_1 PARTITION OF events FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE settings (name text PRIMARY KEY, value text NOT NULL);
ALTER TABLE users ADD COLUMN note text NOT NULL DEFAULT '';
ALTER TABLE orders ADD COLUMN note text NOT NULL DEFAULT '';
ALTER TABLE reviews ADD COLUMN note text NOT NULL DEFAULT '';
ALTER TABLE orders REPLICA IDENTITY FULL;
ALTER TABLE order_items REPLICA IDENTITY FULL;
ALTER TABLE reviews REPLICA IDENTITY FULL;
ALTER TABLE events_0 REPLICA IDENTITY FULL;
ALTER TABLE events_1 REPLICA IDENTITY FULL;
ALTER TABLE users REPLICA IDENTITY FULL;
ALTER TABLE product_categories REPLICA IDENTITY FULL;
CREATE VIEW user_orders AS SELECT u.id AS user_id, u.name, o.id AS order_id, o.status, o.total
    FROM users u JOIN orders o ON o.user_id = u.id;
CREATE VIEW big_user_orders AS SELECT * FROM user_orders WHERE total > 50;
INSERT INTO countries SELECT g, 'C' || g, 'Country ' || g FROM generate_series(1, 4) g;
INSERT INTO users SELECT g, 'user ' || g, 'u' || g || '@example.com', 1 + g % 4,
    jsonb_build_object('theme', CASE WHEN g % 2 = 0 THEN 'dark' ELSE 'light' END) FROM generate_series(1, 10) g;
INSERT INTO products SELECT g, 'SKU-' || g, 'product ' || g, 10 * g, ARRAY['t' || (g % 3), 't' || (g % 5)],
    jsonb_build_object('color', CASE WHEN g % 2 = 0 THEN 'red' ELSE 'blue' END) FROM generate_series(1, 10) g;
INSERT INTO categories SELECT g, 'category ' || g, CASE WHEN g > 2 THEN 1 + g % 2 END FROM generate_series(1, 5) g;
INSERT INTO product_categories SELECT g, 1 + g % 5 FROM generate_series(1, 10) g;
INSERT INTO orders SELECT g, 1 + g % 10, CASE WHEN g % 3 = 0 THEN 'shipped' ELSE 'open' END, 7 * g FROM generate_series(1, 20) g;
INSERT INTO order_items SELECT g, 1 + g % 20, 1 + g % 10, 1 + g % 3 FROM generate_series(1, 40) g;
INSERT INTO reviews SELECT g, 1 + g % 10, 1 + g % 10, 1 + g % 5, 'review ' || g FROM generate_series(1, 30) g;
INSERT INTO events SELECT g, 1 + g % 10, CASE WHEN g % 2 = 0 THEN 'click' ELSE 'view' END FROM generate_series(1, 40) g;
INSERT INTO settings VALUES ('currency', 'EUR'), ('banner', 'hello');
CREATE PUBLICATION kck_test FOR ALL TABLES;
"#;

/// `(name, key template, shape, query, keys to cache)`.
type Entry = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

const U: &[&str] = &["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];
const P: &[&str] = &["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];
const C: &[&str] = &["1", "2", "3", "4"];
const NONE: &[&str] = &[""];

const CORPUS: &[Entry] = &[
    // Point lookups.
    (
        "user",
        "user/{id:int}",
        "row",
        "SELECT id, name, email FROM users WHERE id = $1",
        U,
    ),
    (
        "product",
        "product/{id:int}",
        "row",
        "SELECT sku, name, price FROM products WHERE id = $1",
        P,
    ),
    (
        "product_by_sku",
        "product_by_sku/{sku}",
        "row",
        "SELECT id, name FROM products WHERE sku = $1",
        &["SKU-1", "SKU-2", "SKU-3", "SKU-11"],
    ),
    (
        "setting",
        "setting/{name}",
        "value",
        "SELECT value FROM settings WHERE name = $1",
        &["currency", "banner", "missing"],
    ),
    (
        "country_by_code",
        "country_by_code/{code}",
        "row",
        "SELECT id, name FROM countries WHERE code = $1",
        &["C1", "C2", "C9"],
    ),
    // Multi-parameter keys.
    (
        "user_review",
        "user_review/{user:int}/{product:int}",
        "rows",
        "SELECT stars, body FROM reviews WHERE user_id = $1 AND product_id = $2 ORDER BY id",
        &["1/1", "2/2", "3/3", "1/2"],
    ),
    (
        "user_status_orders",
        "user_status_orders/{user:int}/{status}",
        "rows",
        "SELECT id, total FROM orders WHERE user_id = $1 AND status = $2 ORDER BY id",
        &["1/open", "2/shipped", "3/open"],
    ),
    // Joins of 2 to 4 tables, inner and left.
    (
        "user_orders_join",
        "user_orders_join/{id:int}",
        "rows",
        "SELECT o.id, o.status, u.name FROM orders o JOIN users u ON u.id = o.user_id WHERE u.id = $1 ORDER BY o.id",
        U,
    ),
    (
        "order_lines",
        "order_lines/{order:int}",
        "rows",
        "SELECT p.name, oi.qty FROM order_items oi JOIN products p ON p.id = oi.product_id WHERE oi.order_id = $1 ORDER BY oi.id",
        &["1", "2", "3", "4", "5"],
    ),
    (
        "user_country",
        "user_country/{id:int}",
        "row",
        "SELECT u.name, c.name AS country FROM users u LEFT JOIN countries c ON c.id = u.country_id WHERE u.id = $1",
        U,
    ),
    (
        "user_spend",
        "user_spend/{id:int}",
        "value",
        "SELECT coalesce(sum(oi.qty * p.price), 0) FROM orders o JOIN order_items oi ON oi.order_id = o.id JOIN products p ON p.id = oi.product_id WHERE o.user_id = $1",
        U,
    ),
    (
        "user_products_4",
        "user_products_4/{id:int}",
        "rows",
        "SELECT DISTINCT p.name, c.name AS category FROM orders o JOIN order_items oi ON oi.order_id = o.id JOIN products p ON p.id = oi.product_id LEFT JOIN product_categories pc ON pc.product_id = p.id LEFT JOIN categories c ON c.id = pc.category_id WHERE o.user_id = $1 ORDER BY 1, 2",
        U,
    ),
    // Views, plain and nested.
    (
        "view_orders",
        "view_orders/{id:int}",
        "rows",
        "SELECT order_id, status FROM user_orders WHERE user_id = $1 ORDER BY order_id",
        U,
    ),
    (
        "nested_view",
        "nested_view/{id:int}",
        "rows",
        "SELECT order_id, total FROM big_user_orders WHERE user_id = $1 ORDER BY order_id",
        U,
    ),
    // IN, EXISTS, NOT EXISTS, scalar subqueries.
    (
        "in_subquery",
        "in_subquery/{id:int}",
        "rows",
        "SELECT name FROM products WHERE id IN (SELECT product_id FROM reviews WHERE user_id = $1) ORDER BY name",
        U,
    ),
    (
        "exists",
        "exists/{id:int}",
        "value",
        "SELECT EXISTS (SELECT 1 FROM orders WHERE user_id = $1 AND status = 'shipped')",
        U,
    ),
    (
        "not_exists",
        "not_exists/{id:int}",
        "rows",
        "SELECT p.name FROM products p WHERE p.id <= $1 AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.product_id = p.id AND r.stars = 5) ORDER BY p.id",
        &["3", "6", "10"],
    ),
    (
        "scalar_sub",
        "scalar_sub/{id:int}",
        "row",
        "SELECT name, (SELECT count(*) FROM reviews r WHERE r.product_id = p.id) AS reviews FROM products p WHERE p.id = $1",
        P,
    ),
    (
        "scalar_uncorrelated",
        "scalar_uncorrelated/{id:int}",
        "row",
        "SELECT name, (SELECT max(stars) FROM reviews) AS best FROM products WHERE id = $1",
        P,
    ),
    // CTEs.
    (
        "cte",
        "cte/{id:int}",
        "value",
        "WITH mine AS (SELECT id FROM orders WHERE user_id = $1) SELECT count(*) FROM order_items WHERE order_id IN (SELECT id FROM mine)",
        U,
    ),
    (
        "cte_materialized",
        "cte_materialized/{id:int}",
        "rows",
        "WITH r AS MATERIALIZED (SELECT product_id, avg(stars) AS a FROM reviews GROUP BY product_id) SELECT p.name, r.a FROM products p LEFT JOIN r ON r.product_id = p.id WHERE p.id = $1",
        P,
    ),
    // GROUP BY aggregates.
    (
        "stars_by_product",
        "stars_by_product/{id:int}",
        "rows",
        "SELECT stars, count(*) FROM reviews WHERE product_id = $1 GROUP BY stars ORDER BY stars",
        P,
    ),
    (
        "orders_per_status",
        "orders_per_status/{id:int}",
        "rows",
        "SELECT status, count(*), sum(total) FROM orders WHERE user_id = $1 GROUP BY status ORDER BY status",
        U,
    ),
    (
        "country_users",
        "country_users/{id:int}",
        "value",
        "SELECT count(*) FROM users WHERE country_id = $1",
        C,
    ),
    // Window functions.
    (
        "ranked_reviews",
        "ranked_reviews/{id:int}",
        "rows",
        "SELECT id, stars, rank() OVER (ORDER BY stars DESC, id) FROM reviews WHERE product_id = $1 ORDER BY id",
        P,
    ),
    (
        "running_total",
        "running_total/{id:int}",
        "rows",
        "SELECT id, sum(total) OVER (ORDER BY id) AS running FROM orders WHERE user_id = $1 ORDER BY id",
        U,
    ),
    // LATERAL.
    (
        "lateral_last_order",
        "lateral_last_order/{id:int}",
        "rows",
        "SELECT u.name, l.id, l.total FROM users u CROSS JOIN LATERAL (SELECT id, total FROM orders o WHERE o.user_id = u.id ORDER BY id DESC LIMIT 1) l WHERE u.id = $1",
        U,
    ),
    // UNION and UNION ALL.
    (
        "union_activity",
        "union_activity/{id:int}",
        "rows",
        "SELECT 'order' AS what, id FROM orders WHERE user_id = $1 UNION SELECT 'review', id FROM reviews WHERE user_id = $1 ORDER BY 1, 2",
        U,
    ),
    (
        "union_all_counts",
        "union_all_counts/{id:int}",
        "rows",
        "SELECT 'orders' AS what, count(*) FROM orders WHERE user_id = $1 UNION ALL SELECT 'events', count(*) FROM events WHERE user_id = $1",
        U,
    ),
    // DISTINCT ON, ORDER BY ... LIMIT.
    (
        "latest_review_per_user",
        "latest_review_per_user/{id:int}",
        "rows",
        "SELECT DISTINCT ON (user_id) user_id, id, stars FROM reviews WHERE product_id = $1 ORDER BY user_id, id DESC",
        P,
    ),
    (
        "top_products",
        "top_products/{n:int}",
        "rows",
        "SELECT id, name, price FROM products ORDER BY price DESC, id LIMIT $1",
        &["3", "5"],
    ),
    (
        "cheapest_in_category",
        "cheapest_in_category/{id:int}",
        "row",
        "SELECT p.name, p.price FROM products p JOIN product_categories pc ON pc.product_id = p.id WHERE pc.category_id = $1 ORDER BY p.price, p.id LIMIT 1",
        &["1", "2", "3", "4", "5"],
    ),
    // jsonb and array operators.
    (
        "users_by_theme",
        "users_by_theme/{theme}",
        "rows",
        "SELECT id FROM users WHERE prefs->>'theme' = $1 ORDER BY id",
        &["dark", "light"],
    ),
    (
        "products_with_tag",
        "products_with_tag/{tag}",
        "rows",
        "SELECT id FROM products WHERE tags @> ARRAY[$1::text] ORDER BY id",
        &["t0", "t1", "t2"],
    ),
    (
        "products_by_attr",
        "products_by_attr/{color}",
        "rows",
        "SELECT id, attrs FROM products WHERE attrs @> jsonb_build_object('color', $1::text) ORDER BY id",
        &["red", "blue"],
    ),
    (
        "product_tag_count",
        "product_tag_count/{id:int}",
        "value",
        "SELECT cardinality(tags) FROM products WHERE id = $1",
        P,
    ),
    // The partitioned table.
    (
        "user_events",
        "user_events/{id:int}",
        "rows",
        "SELECT kind, count(*) FROM events WHERE user_id = $1 GROUP BY kind ORDER BY kind",
        U,
    ),
    (
        "all_clicks",
        "all_clicks",
        "value",
        "SELECT count(*) FROM events WHERE kind = 'click'",
        NONE,
    ),
    // A category tree (recursive CTE) and a key with no parameters.
    (
        "category_tree",
        "category_tree/{id:int}",
        "rows",
        "WITH RECURSIVE t AS (SELECT id, name, parent_id FROM categories WHERE id = $1 UNION ALL SELECT c.id, c.name, c.parent_id FROM categories c JOIN t ON c.parent_id = t.id) SELECT id, name FROM t ORDER BY id",
        &["1", "2", "3"],
    ),
    (
        "review_count",
        "review_count",
        "value",
        "SELECT count(*) FROM reviews",
        NONE,
    ),
];

/// A random statement that writes one of the tables; the table it writes.
fn statement(rng: &mut rand::rngs::StdRng, i: usize) -> (&'static str, String) {
    let user = rng.random_range(1..=12);
    let product = rng.random_range(1..=12);
    match rng.random_range(0..19) {
        0 => (
            "users",
            format!(
                "UPDATE users SET name = 'user {i}', prefs = jsonb_build_object('theme', '{}') WHERE id = {user}",
                if rng.random_bool(0.5) {
                    "dark"
                } else {
                    "light"
                }
            ),
        ),
        1 => (
            "users",
            format!(
                "UPDATE users SET country_id = {} WHERE id = {user}",
                rng.random_range(1..=4)
            ),
        ),
        2 => (
            "products",
            format!(
                "UPDATE products SET price = {}, tags = ARRAY['t{}'] WHERE id = {product}",
                rng.random_range(1..200),
                rng.random_range(0..3)
            ),
        ),
        3 => (
            "products",
            format!(
                "UPDATE products SET attrs = jsonb_build_object('color', '{}'), sku = 'SKU-{}' WHERE id = {product}",
                if rng.random_bool(0.5) { "red" } else { "blue" },
                rng.random_range(1..14)
            ),
        ),
        4 => (
            "orders",
            format!(
                "INSERT INTO orders VALUES ({}, {user}, 'open', {}) ON CONFLICT DO NOTHING",
                100 + i,
                rng.random_range(1..100)
            ),
        ),
        5 => (
            "orders",
            format!(
                "UPDATE orders SET status = CASE status WHEN 'open' THEN 'shipped' ELSE 'open' END, total = total + 30 WHERE id = {}",
                rng.random_range(1..=40)
            ),
        ),
        6 => (
            "orders",
            format!(
                "UPDATE orders SET user_id = {user} WHERE id = {}",
                rng.random_range(1..=40)
            ),
        ),
        7 => (
            "order_items",
            format!(
                "INSERT INTO order_items VALUES ({}, {}, {product}, {}) ON CONFLICT DO NOTHING",
                100 + i,
                rng.random_range(1..=40),
                rng.random_range(1..4)
            ),
        ),
        8 => (
            "order_items",
            format!(
                "DELETE FROM order_items WHERE id = {}",
                rng.random_range(1..=60)
            ),
        ),
        9 => (
            "reviews",
            format!(
                "INSERT INTO reviews VALUES ({}, {product}, {user}, {}, 'r{i}') ON CONFLICT DO NOTHING",
                100 + i,
                rng.random_range(1..=5)
            ),
        ),
        10 => (
            "reviews",
            format!(
                "UPDATE reviews SET stars = {}, product_id = {product} WHERE id = {}",
                rng.random_range(1..=5),
                rng.random_range(1..=40)
            ),
        ),
        11 => (
            "events",
            format!(
                "INSERT INTO events VALUES ({}, {user}, '{}')",
                100 + i,
                if rng.random_bool(0.5) {
                    "click"
                } else {
                    "view"
                }
            ),
        ),
        12 => (
            "events",
            format!(
                "UPDATE events SET user_id = {user} WHERE id = {}",
                rng.random_range(1..=40)
            ),
        ),
        13 => (
            "product_categories",
            format!(
                "INSERT INTO product_categories VALUES ({product}, {}) ON CONFLICT DO NOTHING",
                rng.random_range(1..=5)
            ),
        ),
        14 => (
            "categories",
            format!(
                "UPDATE categories SET name = 'category {i}', parent_id = {} WHERE id = {}",
                rng.random_range(1..=2),
                rng.random_range(3..=5)
            ),
        ),
        // Columns no primer reads: column relevance refreshes nothing for them (the old row is sent).
        15 => (
            "users",
            format!("UPDATE users SET note = 'n{i}' WHERE id = {user}"),
        ),
        16 => (
            "orders",
            format!(
                "UPDATE orders SET note = 'n{i}' WHERE id = {}",
                rng.random_range(1..=40)
            ),
        ),
        17 => (
            "reviews",
            format!(
                "UPDATE reviews SET note = 'n{i}' WHERE id = {}",
                rng.random_range(1..=40)
            ),
        ),
        _ => (
            "countries",
            format!(
                "UPDATE countries SET name = 'Country {i}' WHERE id = {}",
                rng.random_range(1..=4)
            ),
        ),
    }
}

/// The corpus as the `primers:` list of a config.
fn corpus_primers() -> String {
    let mut primers = String::new();
    for (name, key, shape, query, _) in CORPUS {
        primers.push_str(&format!(
            "  - name: {name}\n    key: \"{key}\"\n    shape: {shape}\n    query: \"{}\"\n",
            query.replace('"', "\\\"")
        ));
    }
    primers
}

#[tokio::test]
async fn forty_primers_without_depends_on_converge_under_random_writes() {
    let seed: u64 = std::env::var("KCK_CORPUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("corpus seed {seed} (replay with KCK_CORPUS_SEED={seed})");
    assert!(
        CORPUS.len() >= 40,
        "the corpus has {} primers",
        CORPUS.len()
    );
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = corpus_primers();
    // Every fetched key is counted, those whose row does not exist too: kept at once.
    let path = ConfigYaml {
        refresh_extra: "  absent_rows: keep\n",
        ..ConfigYaml::new(&db.url, "kck_test", &db.name, &primers)
    }
    .write(dir.path());
    let config = load(&path);

    let client = db.client().await;
    let running = start(config.clone()).await;
    let addr = running.http_addr;
    let mut cached: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, key, _, _, params) in CORPUS {
        for p in *params {
            let k = if p.is_empty() {
                key.to_string()
            } else {
                format!("{}/{p}", key.split('/').next().unwrap_or(key))
            };
            let (status, body) = fetch(addr, &k).await;
            assert_eq!(status, 200, "{k}: {body}");
            *cached.entry(name).or_default() += 1;
        }
    }
    let before: BTreeMap<&str, u64> = CORPUS
        .iter()
        .map(|(name, ..)| (*name, running.refresher.primer_health(name).keys_refreshed))
        .collect();

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows_changed: BTreeMap<&str, u64> = BTreeMap::new();
    for i in 0..600 {
        let (table, sql) = statement(&mut rng, i);
        if let Ok(n) = client.execute(sql.as_str(), &[]).await {
            *rows_changed.entry(table).or_default() += n;
        }
    }
    wait_drained(&running, &client, Duration::from_secs(120)).await;
    let checked = assert_converged(&running, &client, &config).await;
    assert_eq!(checked, cached.values().sum::<usize>());

    // The report: per primer, how each table it reads is followed, and keys refreshed against a baseline that
    // refreshes every cached key of the primer on every changed row of a table it reads.
    let report = kck::cli::explain::run(
        &kck::pg::Source::new(&config.source).unwrap(),
        &config.catalog,
        None,
    )
    .await
    .unwrap();
    let mut total = (0u64, 0u64);
    eprintln!(
        "{:<26} {:>9} {:>9}  inferred",
        "primer", "refreshed", "baseline"
    );
    for (name, ..) in CORPUS {
        let section: Vec<&str> = report
            .split("\n\n")
            .filter(|s| s.starts_with(&format!("primer {name} ")))
            .collect();
        let section = section.first().copied().unwrap_or("");
        let mut how: Vec<String> = Vec::new();
        let mut baseline = 0u64;
        for line in section.lines().skip(2) {
            // Column relevance: `+c` when kck knows which of the table's columns the primer reads.
            let read = line.trim_start();
            if line.starts_with("    ")
                && (read.starts_with("reads columns") || read.starts_with("reads no column"))
                && let Some(last) = how.last_mut()
            {
                last.push_str("+c");
            }
            let Some((table, rest)) = line.trim().split_once(": ") else {
                continue;
            };
            if line.starts_with("    ") {
                continue;
            }
            let short = table.trim_start_matches("public.");
            let level = if rest.starts_with("every cached key") {
                "table"
            } else if rest.contains("runs the lookup") {
                "lookup"
            } else {
                "key"
            };
            how.push(format!("{short}:{level}"));
            if !table.contains("events_") {
                baseline += rows_changed.get(short).copied().unwrap_or(0) * cached[name] as u64;
            }
        }
        let refreshed = running.refresher.primer_health(name).keys_refreshed - before[name];
        total.0 += refreshed;
        total.1 += baseline;
        eprintln!("{name:<26} {refreshed:>9} {baseline:>9}  {}", how.join(" "));
    }
    eprintln!(
        "all primers: {} keys refreshed against {} for refresh-everything ({:.1}%)",
        total.0,
        total.1,
        100.0 * total.0 as f64 / total.1.max(1) as f64
    );
    running.stop().await.unwrap();
    db.cleanup().await;
}

/// Automatic batching: many keys of a primer computed in one query give, key for key, the bytes the
/// one-key query gives, on every primer of the corpus (those Postgres cannot batch fall back to one query
/// per key).
#[tokio::test]
async fn automatic_batches_give_the_one_key_bytes_on_every_primer_of_the_corpus() {
    let db = database(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let primers = corpus_primers();
    let path = ConfigYaml::new(&db.url, "kck_test", &db.name, &primers).write(dir.path());
    let config = load(&path);
    let running = start(config.clone()).await;
    let mut batched = 0;
    for (index, (name, key, _, _, params)) in CORPUS.iter().enumerate() {
        let texts: Vec<String> = params
            .iter()
            .map(|p| {
                if p.is_empty() {
                    key.to_string()
                } else {
                    format!("{}/{p}", key.split('/').next().unwrap_or(key))
                }
            })
            .collect();
        let keys: Vec<_> = texts
            .iter()
            .map(|t| config.catalog.parse_key(t).unwrap())
            .collect();
        let refs: Vec<_> = keys.iter().collect();
        let many = running
            .refresher
            .compute_batch(index, &refs, kck::lsn::Lsn(0))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(many.len(), keys.len(), "{name}");
        for ((text, key), entry) in texts.iter().zip(&keys).zip(&many) {
            let one = running
                .refresher
                .compute(key, kck::lsn::Lsn(0))
                .await
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                String::from_utf8_lossy(&entry.value),
                String::from_utf8_lossy(&one.value),
                "{text}: the batch's bytes differ from the one-key query's"
            );
        }
        if running.refresher.batches_automatically(index) {
            batched += 1;
        } else if keys.len() > 1 {
            eprintln!("{name}: one query per key (Postgres cannot batch it)");
        }
    }
    eprintln!("{batched} of {} primers batch automatically", CORPUS.len());
    assert!(batched >= 35, "only {batched} primers batch automatically");
    running.stop().await.unwrap();
    db.cleanup().await;
}
