//! How an error is told to a person: its message, then each cause once. Errors keep their cause as a
//! `#[source]` and do not repeat it in their own message; the edges (the CLI, the logs, the HTTP answers
//! and `/status`) print the whole chain with [`Chain`].

use std::error::Error;
use std::fmt;

/// Displays an error and its causes, `outer: cause: root cause`, skipping a cause whose text the message
/// already holds (errors that still format their source into their own text).
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            // A Postgres error is told as `db_error_text` tells it (never its own text, which quotes the
            // values it refused), and its causes with it.
            if let Some(db) = c
                .downcast_ref::<tokio_postgres::Error>()
                .and_then(|e| e.as_db_error())
                .or_else(|| c.downcast_ref::<tokio_postgres::error::DbError>())
            {
                let text = db_error_text(db);
                if !out.contains(&text) {
                    out.push_str(": ");
                    out.push_str(&text);
                }
                break;
            }
            let text = c.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&out)
    }
}

/// A Postgres error as a person needs it: the server's message, SQLSTATE, detail and hint
/// (`crate::pg::error_text` for a whole `tokio_postgres::Error`).
///
/// It goes into logs and `/status`, which never carry parameter or row values: for a data exception
/// (SQLSTATE class 22, whose message quotes the value it refused: `invalid input syntax for type
/// integer: "abc"`) quoted text is left out, and for classes 22 and 23 (integrity: `Key (id)=(1) already
/// exists`) the detail too.
pub fn db_error_text(db: &tokio_postgres::error::DbError) -> String {
    let code = db.code().code();
    let quotes_values = code.starts_with("22");
    let message = if quotes_values {
        without_quoted(db.message())
    } else {
        db.message().to_owned()
    };
    let mut s = format!("{message} (SQLSTATE {code})");
    if let Some(d) = db
        .detail()
        .filter(|_| !quotes_values && !code.starts_with("23"))
    {
        s.push_str(&format!("; {d}"));
    }
    if let Some(h) = db.hint() {
        s.push_str(&format!("; hint: {h}"));
    }
    s
}

/// `text` with every double-quoted part replaced by `"…"` (Postgres quotes the values it refuses).
pub fn without_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut quoted = false;
    for c in text.chars() {
        if c == '"' {
            if !quoted {
                out.push_str("\"…");
            } else {
                out.push('"');
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

/// `1 key`, `2 keys`: a count with its noun in the right number (`plural` is the noun for any count but
/// one).
pub fn count(n: impl Into<u64>, one: &str, plural: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { plural })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_left_out() {
        assert_eq!(
            without_quoted(r#"invalid input syntax for type integer: "abc""#),
            r#"invalid input syntax for type integer: "…""#
        );
        assert_eq!(
            without_quoted(r#"value "99999999999" is out of range for type integer"#),
            r#"value "…" is out of range for type integer"#
        );
        assert_eq!(without_quoted("division by zero"), "division by zero");
        assert_eq!(without_quoted(r#"open "x"#), r#"open "…"#);
    }

    #[test]
    fn counts_say_one_thing_and_two_things() {
        assert_eq!(count(1u32, "key", "keys"), "1 key");
        assert_eq!(count(0u32, "key", "keys"), "0 keys");
        assert_eq!(count(2u64, "dependency", "dependencies"), "2 dependencies");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the store at /x")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once() {
        let io = || std::io::Error::other("disk full");
        assert_eq!(
            Chain(&Outer(io())).to_string(),
            "cannot open the store at /x: disk full"
        );
        assert_eq!(Chain(&Repeats(io())).to_string(), "cannot start: disk full");
    }
}
