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
