SELECT o.id, 'it''s' AS x, $1::int FROM orders o WHERE o.user_id = $1 -- c
; /* block */ UPDATE t SET v = $$dollar $1$$ WHERE id = $2;