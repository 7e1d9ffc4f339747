//! The OpenAPI 3.1 document of the HTTP API, served at `/openapi.json`.
//!
//! Written by hand. The `http` integration tests check it against the routers kck serves: the routes that
//! [`crate::http::routes`] and [`crate::ops::http::routes`] list (the router is built from exactly these)
//! must be the documented paths and methods, every documented method must answer on the real router (not
//! the fallback 404/405), and every other method 405. Bodies are described as README.md documents them.

use serde_json::{Value, json};

/// The document.
pub fn document() -> Value {
    let error = |description: &str| {
        json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        })
    };
    let timeout = json!({
        "name": "timeout", "in": "query", "required": false,
        "description": "How long to wait (`2s`, `500ms`); default `http.wait_timeout`, at most `http.max_wait`.",
        "schema": {"type": "string", "examples": ["2s"]}
    });
    let min_lsn = json!({
        "name": "min_lsn", "in": "query", "required": false,
        "description": "Wait until the value reflects every change committed up to this WAL position (as \
            `POST /update` returns, or `pg_current_wal_insert_lsn()` after your own COMMIT).",
        "schema": {"$ref": "#/components/schemas/Lsn"}
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "kck",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "A cache of parameterised Postgres query results, kept fresh from logical \
                replication. Every error is `{\"error\": {\"code\", \"message\", ...}}`."
        },
        "security": [{"bearer": []}, {}],
        "tags": [{"name": "operations", "description": "For operators: dashboard, status, metrics, cache inspection."}],
        "paths": {
            "/fetch/{key}": {
                "get": {
                    "operationId": "fetch",
                    "summary": "A cached value",
                    "description": "`key` is the primer's key text and may span several path segments \
                        (`orders_by_user/42`); text parameters are percent-encoded. A miss is computed \
                        and cached when `prime_on_cache_miss` is on.",
                    "parameters": [
                        {"name": "key", "in": "path", "required": true, "schema": {"type": "string"},
                         "examples": {"key": {"value": "orders_by_user/42"}}},
                        min_lsn,
                        {"name": "wait_change", "in": "query", "required": false,
                         "description": "Long-poll: answer as soon as the value's ETag differs from this \
                            one, or `304` when `timeout` passes first.",
                         "schema": {"type": "string"}},
                        timeout,
                        {"name": "If-None-Match", "in": "header", "required": false,
                         "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {
                            "description": "The cached JSON value, as stored.",
                            "headers": {
                                "ETag": {"schema": {"type": "string"}},
                                "Cache-Control": {"schema": {"type": "string"}},
                                "kck-lsn": {"description": "The WAL position the value reflects.",
                                            "schema": {"$ref": "#/components/schemas/Lsn"}},
                                "kck-computed-at": {"schema": {"type": "string", "format": "date-time"}},
                                "kck-cache": {"schema": {"type": "string", "enum": ["hit", "miss"]}}
                            },
                            "content": {"application/json": {"schema": {}}}
                        },
                        "304": {"description": "Not modified (`If-None-Match` matched, or `wait_change` timed out)."},
                        "400": error("Bad key, key parameter, or query string."),
                        "401": error("Missing or invalid token (authentication on)."),
                        "403": error("The token does not grant access to this key."),
                        "404": error("Not cached and `prime_on_cache_miss` is off."),
                        "502": error("The primer's query failed in Postgres."),
                        "503": error("kck is shutting down, or `not_visible`: a miss needs a change not proven visible yet (no replication process publishing, or it is behind), or `too_many_misses`: every miss slot (`http.max_concurrent_misses`) stayed taken for `http.miss_wait`; `Retry-After` says when to retry."),
                        "504": error("`not_fresh`: the value did not reach `min_lsn` in time; says how far behind kck is.")
                    }
                }
            },
            "/subscribe": {
                "get": {
                    "operationId": "subscribe",
                    "summary": "Live keys as Server-Sent Events",
                    "description": "One `value` event per key with its current value, then one whenever a key's value changes (its ETag differs). Data: `{key, value, etag, lsn, computed_at}`; the event id is the LSN. Reconnecting with `Last-Event-ID` sends every key's current value again. Comments every `http.subscribe.heartbeat` (15 s) keep the stream open. Other events, data JSON: `resync` `{reason: \"slow_reader\", keys, message}` (the client read too slowly; every key's current value follows), `expired` `{reason: \"token_expired\", exp, message}` (the token expired; the stream ends), `end` `{reason: \"shutdown\", message}` (kck is stopping; the stream ends), `error` `{error: {code, message}}` (a key could not be read; the stream ends).",
                    "parameters": [{"name": "key", "in": "query", "required": true, "style": "form", "explode": true,
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "description": "A key to watch; repeat for more (at most `http.subscribe.max_keys`)."}],
                    "responses": {
                        "200": {"description": "The event stream.", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        "400": error("A key or the query string is invalid, or too many keys."),
                        "401": error("No valid bearer token."),
                        "403": error("The token does not grant access to a key."),
                        "503": error("`too_many_subscriptions`, or kck is shutting down.")
                    }
                },
                "post": {
                    "operationId": "subscribeMany",
                    "summary": "Live keys as Server-Sent Events, the keys in the body",
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {"schema": {
                            "type": "object", "required": ["keys"], "additionalProperties": false,
                            "properties": {"keys": {"type": "array", "items": {"type": "string"}}}
                        }}}
                    },
                    "responses": {
                        "200": {"description": "The event stream, as for GET.", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        "400": error("A key or the body is invalid, or too many keys."),
                        "401": error("No valid bearer token."),
                        "403": error("The token does not grant access to a key."),
                        "503": error("`too_many_subscriptions`, or kck is shutting down.")
                    }
                }
            },
            "/fetch": {
                "post": {
                    "operationId": "fetchMany",
                    "summary": "Many cached values in one round trip",
                    "parameters": [min_lsn, timeout],
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {"schema": {
                            "type": "object", "required": ["keys"], "additionalProperties": false,
                            "properties": {"keys": {"type": "array", "items": {"type": "string"},
                                "description": "At most `http.max_batch_keys`."}}
                        }}}
                    },
                    "responses": {
                        "200": {
                            "description": "One result per distinct key asked for; each has its own status.",
                            "content": {"application/json": {"schema": {
                                "type": "object", "required": ["results"],
                                "properties": {"results": {"type": "object", "additionalProperties": {
                                    "$ref": "#/components/schemas/FetchResult"}}}
                            }}}
                        },
                        "400": error("Bad body, too many keys, or bad query string."),
                        "401": error("Missing or invalid token (authentication on)."),
                        "413": error("The body is larger than `http.body_limit`."),
                        "415": error("The body is not JSON.")
                    }
                }
            },
            "/update/{name}": {
                "post": {
                    "operationId": "update",
                    "summary": "Run an updater: its statements in one transaction",
                    "parameters": [
                        {"name": "name", "in": "path", "required": true, "schema": {"type": "string"}},
                        {"name": "wait", "in": "query", "required": false,
                         "description": "`fresh`: answer once every cached value reflects the write.",
                         "schema": {"type": "string", "enum": ["fresh"]}},
                        timeout
                    ],
                    "requestBody": {
                        "required": false,
                        "content": {"application/json": {"schema": {
                            "type": "object", "description": "The updater's parameters by name."}}}
                    },
                    "responses": {
                        "200": {
                            "description": "Committed.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/UpdateResult"}}}
                        },
                        "400": error("A parameter is missing, unknown or of the wrong type (`parameter` names it), or Postgres refused a value."),
                        "401": error("Missing or invalid token (authentication on)."),
                        "403": error("The token does not grant access to this updater with these parameters."),
                        "404": error("No updater has this name."),
                        "409": error("`constraint_violation` (with `constraint`) or `transaction_conflict`; nothing was written."),
                        "413": error("The body is larger than `http.body_limit`."),
                        "415": error("The body is not JSON."),
                        "422": error("`rejected`: the database raised an exception (a trigger or function); nothing was written."),
                        "502": error("The updater failed in Postgres; nothing was written."),
                        "503": error("The database is unavailable (nothing was written), or the connection failed during COMMIT (`commit_unknown`)."),
                        "202": { "description": "With `wait=fresh`: the write was committed but the cache did not reflect it within the timeout: `fresh: false` and `not_fresh` say how far behind kck is. Do not retry the write." },
                        "504": error("`timeout`: the request timed out before the write committed (nothing was written).")
                    }
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness: 200 while the process runs",
                    "security": [],
                    "responses": {"200": {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}}
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "The OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "tags": ["operations"],
                    "summary": "Readiness: the slot is held, the store and Postgres answer",
                    "security": [],
                    "responses": {
                        "200": {"description": "Ready.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
                        "503": {"description": "Not ready; `not_ready` says why.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}}
                    }
                }
            },
            "/": {
                "get": {
                    "operationId": "dashboard",
                    "tags": ["operations"],
                    "summary": "The dashboard (an HTML page polling /status)",
                    "responses": {
                        "200": {"description": "HTML.", "content": {"text/html": {"schema": {"type": "string"}}}},
                        "401": error("Missing or invalid token (authentication on)."),
                        "403": error("The token lacks `auth.operator`'s claims.")
                    }
                }
            },
            "/status": {
                "get": {
                    "operationId": "status",
                    "tags": ["operations"],
                    "summary": "The status document: stream, slot, queue, primers, recent problems",
                    "parameters": [{"name": "history", "in": "query", "required": false,
                                    "description": "`false` leaves out the chart history.",
                                    "schema": {"type": "boolean"}}],
                    "responses": {
                        "200": {"description": "Status.", "content": {"application/json": {"schema": {"type": "object"}}}},
                        "401": error("Missing or invalid token (authentication on)."),
                        "403": error("The token lacks `auth.operator`'s claims.")
                    }
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "tags": ["operations"],
                    "summary": "Prometheus metrics (text format)",
                    "responses": {
                        "200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                        "401": error("Missing or invalid token (authentication on)."),
                        "403": error("The token lacks `auth.operator`'s claims.")
                    }
                }
            },
            "/cache/keys/{primer}": {
                "get": {
                    "operationId": "cacheKeys",
                    "tags": ["operations"],
                    "summary": "Cached keys of a primer, in order, a page at a time",
                    "parameters": [
                        {"name": "primer", "in": "path", "required": true, "schema": {"type": "string"}},
                        {"name": "after", "in": "query", "required": false, "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}
                    ],
                    "responses": {
                        "200": {"description": "`{primer, keys, next_after}`.", "content": {"application/json": {"schema": {"type": "object"}}}},
                        "400": error("No such primer."),
                        "401": error("Missing or invalid token (authentication on)."),
                        "403": error("The token lacks `auth.operator`'s claims.")
                    }
                }
            },
            "/cache/entry/{key}": {
                "get": {
                    "operationId": "cacheEntry",
                    "tags": ["operations"],
                    "summary": "A cached entry with its LSN and time, without computing a miss",
                    "parameters": [{"name": "key", "in": "path", "required": true, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {"description": "`{key, lsn, computed_at, expires_at_ms, value}`.", "content": {"application/json": {"schema": {"type": "object"}}}},
                        "400": error("Bad key."),
                        "401": error("Missing or invalid token (authentication on)."),
                        "403": error("The token lacks `auth.operator`'s claims."),
                        "404": error("Not cached.")
                    }
                }
            },
            "/cache/{key}": {
                "delete": {
                    "operationId": "cacheDelete",
                    "tags": ["operations"],
                    "summary": "Invalidate one key: drop it, or (`?mode=refresh`) mark it expired and refresh it",
                    "parameters": [
                        {"name": "key", "in": "path", "required": true, "schema": {"type": "string"}},
                        {"name": "mode", "in": "query", "required": false, "schema": {"type": "string", "enum": ["drop", "refresh"]}}
                    ],
                    "responses": {
                        "200": {"description": "`{keys, mode}`: how many keys were affected (0 when it was not cached).", "content": {"application/json": {"schema": {"type": "object"}}}},
                        "400": error("Bad key."),
                        "401": error("Missing or invalid token (authentication on)."),
                        "403": error("The token lacks `auth.operator`'s claims.")
                    }
                }
            },
            "/invalidate": {
                "post": {
                    "operationId": "invalidate",
                    "tags": ["operations"],
                    "summary": "Invalidate a key, a primer's keys or the keys with a prefix: mark them expired and refresh them (mode refresh, the default), or drop them",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object",
                        "properties": {"key": {"type": "string"}, "primer": {"type": "string"}, "prefix": {"type": "string"},
                                       "mode": {"type": "string", "enum": ["refresh", "drop"]}},
                        "additionalProperties": false}}}},
                    "responses": {
                        "200": {"description": "`{keys, mode}`.", "content": {"application/json": {"schema": {"type": "object"}}}},
                        "400": error("Not exactly one of key, primer, prefix; an unknown primer; a bad key."),
                        "401": error("Missing or invalid token (authentication on)."),
                        "403": error("The token lacks `auth.operator`'s claims.")
                    }
                }
            },
            "/refresh": {
                "post": {
                    "operationId": "refresh",
                    "tags": ["operations"],
                    "summary": "Queue a refresh of a key, a primer's keys or the keys with a prefix (their values are served meanwhile)",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object",
                        "properties": {"key": {"type": "string"}, "primer": {"type": "string"}, "prefix": {"type": "string"}},
                        "additionalProperties": false}}}},
                    "responses": {
                        "200": {"description": "`{keys}`: how many keys were queued.", "content": {"application/json": {"schema": {"type": "object"}}}},
                        "400": error("Not exactly one of key, primer, prefix; an unknown primer; a bad key."),
                        "401": error("Missing or invalid token (authentication on)."),
                        "403": error("The token lacks `auth.operator`'s claims.")
                    }
                }
            }
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": "Required on every route but `auth.public_paths` when `auth.jwt` is configured; \
                            the operations routes (tag `operations`) also need `auth.operator`'s claims."}
            },
            "schemas": {
                "Readiness": {
                    "type": "object",
                    "properties": {
                        "ready": {"type": "boolean"},
                        "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
                        "not_ready": {"type": "array", "items": {"type": "string"}}
                    }
                },
                "Lsn": {"type": "string", "pattern": "^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$", "examples": ["16/B374D848"]},
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": {"error": {
                        "type": "object", "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        "additionalProperties": true
                    }}
                },
                "FetchResult": {
                    "type": "object", "required": ["status"],
                    "properties": {
                        "status": {"type": "integer"},
                        "value": {"description": "The cached JSON value (status 200)."},
                        "lsn": {"$ref": "#/components/schemas/Lsn"},
                        "etag": {"type": "string"},
                        "computed_at": {"type": "string", "format": "date-time"},
                        "cache": {"type": "string", "enum": ["hit", "miss"]},
                        "error": {"$ref": "#/components/schemas/Error/properties/error"}
                    }
                },
                "UpdateResult": {
                    "type": "object", "required": ["rows", "lsn"],
                    "properties": {
                        "rows": {"type": "array", "items": {"type": "integer"},
                                 "description": "Rows each statement affected, in order."},
                        "lsn": {"oneOf": [{"$ref": "#/components/schemas/Lsn"}, {"type": "null"}],
                                "description": "A WAL position at or after the commit: pass it as `min_lsn`."},
                        "fresh": {"type": "boolean", "description": "With `wait=fresh`: true."}
                    }
                }
            }
        }
    })
}
