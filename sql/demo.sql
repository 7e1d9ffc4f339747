-- kck demo schema and data (loaded by scripts/demo into database kck_demo).
-- Deterministic: the same rows on every load. 100 users, 40 products, 300 orders, 750 line items.
BEGIN;

CREATE TABLE users (
    id    bigint PRIMARY KEY,
    name  text NOT NULL,
    email text NOT NULL
);

CREATE TABLE orders (
    id         bigint PRIMARY KEY,
    user_id    bigint NOT NULL REFERENCES users,
    status     text NOT NULL,
    total      numeric(10,2) NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_user_id ON orders (user_id);

CREATE TABLE line_items (
    id       bigint PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES orders ON DELETE CASCADE,
    sku      text NOT NULL,
    qty      int NOT NULL,
    price    numeric(10,2) NOT NULL
);
CREATE INDEX line_items_order_id ON line_items (order_id);

CREATE TABLE products (
    sku         text PRIMARY KEY,
    title       text NOT NULL,
    description text
);

-- The whole old row in UPDATE/DELETE messages: moving an order to another user refreshes both users, and
-- moving or deleting a line item refreshes only its order's user (with the default identity, the primary
-- key, Postgres would not send the old order_id, and kck would refresh every cached orders_by_user key;
-- `kck check` warns about that).
ALTER TABLE orders REPLICA IDENTITY FULL;
ALTER TABLE line_items REPLICA IDENTITY FULL;

INSERT INTO users (id, name, email)
SELECT i,
       (ARRAY['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara', 'Donald', 'Frances', 'Ken'])[1 + i % 8]
           || ' ' || (ARRAY['Smith', 'Jones', 'Garcia', 'Chen', 'Okafor', 'Novak', 'Silva'])[1 + i % 7]
           || ' ' || i,
       'user' || i || '@example.com'
FROM generate_series(1, 100) AS i;

INSERT INTO products (sku, title, description)
SELECT 'SKU-' || lpad(i::text, 4, '0'),
       (ARRAY['Widget', 'Gadget', 'Sprocket', 'Gizmo', 'Doohickey'])[1 + i % 5] || ' ' || i,
       'A ' || (ARRAY['small', 'sturdy', 'shiny', 'quiet', 'handy'])[1 + (i * 3) % 5]
           || ' thing, model ' || i || '.'
FROM generate_series(1, 40) AS i;

-- 3 orders per user: user u has orders u, u + 100 and u + 200.
INSERT INTO orders (id, user_id, status, created_at)
SELECT i,
       (i - 1) % 100 + 1,
       (ARRAY['pending', 'paid', 'shipped', 'delivered'])[1 + (i + i / 100) % 4],
       timestamptz '2026-01-01 00:00:00+00' + i * interval '7 hours'
FROM generate_series(1, 300) AS i;

-- 2 or 3 items per order.
INSERT INTO line_items (id, order_id, sku, qty, price)
SELECT i,
       (i - 1) % 300 + 1,
       'SKU-' || lpad(((i * 7) % 40 + 1)::text, 4, '0'),
       1 + i % 4,
       round((((i * 37) % 5000) / 100.0 + 1.99)::numeric, 2)
FROM generate_series(1, 750) AS i;

UPDATE orders o
SET total = s.total
FROM (SELECT order_id, sum(qty * price) AS total FROM line_items GROUP BY order_id) AS s
WHERE s.order_id = o.id;

CREATE PUBLICATION kck_demo FOR TABLE users, orders, line_items, products;

COMMIT;
