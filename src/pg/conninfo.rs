//! The parts of a libpq connection string that kck reads itself, before tokio-postgres sees the rest.
//!
//! tokio-postgres parses `sslmode` with three values only and refuses `sslrootcert`, `sslcert`, `sslkey`
//! and `passfile` as unknown. [`split`] takes those parameters out of either form of the string (URL and
//! key/value), in libpq's quoting rules, and hands back the string without them; [`pgpass`] finds a
//! password in a `.pgpass` file as libpq does.

use std::path::Path;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// The parameters kck handles itself (TLS, password files) or refuses with a reason; every other one
/// goes on to tokio-postgres.
pub const OWN: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcompression",
    "sslcertmode",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requiressl",
    "gssencmode",
    "passfile",
    "service",
];

/// A connection string split in two.
#[derive(Debug, Default, PartialEq)]
pub struct Split {
    /// The string without the parameters of [`OWN`], in its own form.
    pub rest: String,
    /// The parameters of [`OWN`] it gave, decoded, in order.
    pub own: Vec<(String, String)>,
}

impl Split {
    /// The value of `key` (the last one given, as libpq takes it).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.own
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a connection string cannot be split.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SplitError {
    #[error("missing \"=\" after \"{0}\"")]
    MissingEquals(String),
    #[error("unterminated quoted value of \"{0}\"")]
    Unterminated(String),
    #[error("the value of \"{0}\" is not valid percent-encoded UTF-8")]
    BadEncoding(String),
}

/// Take the parameters of [`OWN`] out of `url`, a `postgres://` URL or a key/value string.
pub fn split(url: &str) -> Result<Split, SplitError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_url(url)
    } else {
        split_key_value(url)
    }
}

/// What a URL's query needs encoded when kck writes a value back.
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'&')
    .add(b'=')
    .add(b'#')
    .add(b'%')
    .add(b'+');

fn split_url(url: &str) -> Result<Split, SplitError> {
    let Some(q) = url.find('?') else {
        return Ok(Split {
            rest: url.to_owned(),
            own: Vec::new(),
        });
    };
    let (base, query) = (&url[..q], &url[q + 1..]);
    let mut kept = Vec::new();
    let mut own = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k)?;
        if OWN.contains(&key.as_str()) {
            own.push((
                key.clone(),
                decode(v).map_err(|_| SplitError::BadEncoding(key))?,
            ));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(Split { rest, own })
}

fn decode(s: &str) -> Result<String, SplitError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| SplitError::BadEncoding(s.to_owned()))
}

/// `value` encoded for a URL query, for messages that rebuild one.
pub fn encode_query_value(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

fn split_key_value(s: &str) -> Result<Split, SplitError> {
    let mut out = Split::default();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            return Err(SplitError::MissingEquals(key));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(SplitError::Unterminated(key)),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(SplitError::Unterminated(key)),
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        value.push(next);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if OWN.contains(&key.as_str()) {
            out.own.push((key, value));
        } else {
            if !out.rest.is_empty() {
                out.rest.push(' ');
            }
            out.rest.push_str(&key);
            out.rest.push_str("='");
            out.rest
                .push_str(&value.replace('\\', "\\\\").replace('\'', "\\'"));
            out.rest.push('\'');
        }
    }
    Ok(out)
}

/// The password for `host:port:database:user` in the `.pgpass` file at `path`, as libpq reads it: the
/// first matching line wins, `*` matches anything, `\` escapes `:` and `\`. A file others can read is
/// ignored (libpq's rule; kck says so in [`PassFile::Unsafe`]).
pub fn pgpass(path: &Path, host: &str, port: u16, database: &str, user: &str) -> PassFile {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(_) => return PassFile::Absent,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            return PassFile::Unsafe;
        }
    }
    let port = port.to_string();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = pgpass_fields(line);
        let [h, p, d, u, password] = fields.as_slice() else {
            continue;
        };
        let matches = |field: &str, value: &str| field == "*" || field == value;
        if matches(h, host) && matches(p, &port) && matches(d, database) && matches(u, user) {
            return PassFile::Found(password.clone());
        }
    }
    PassFile::NoMatch
}

/// What [`pgpass`] found.
#[derive(Debug, PartialEq)]
pub enum PassFile {
    /// No such file (or it cannot be read).
    Absent,
    /// The file can be read by its group or others, so libpq (and kck) ignore it.
    Unsafe,
    /// No line matches.
    NoMatch,
    Found(String),
}

/// A `.pgpass` line's fields: the first four end at an unescaped `:`, the password takes the rest.
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next()
                    && let Some(f) = fields.last_mut()
                {
                    f.push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_of_its_own_come_out_and_the_rest_stays() {
        let s = split(
            "postgres://u:p%3Fw@db.example.com:6543/app?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca%201.crt",
        )
        .unwrap();
        assert_eq!(
            s.rest,
            "postgres://u:p%3Fw@db.example.com:6543/app?application_name=x"
        );
        assert_eq!(s.get("sslmode"), Some("verify-full"));
        assert_eq!(s.get("sslrootcert"), Some("/tmp/ca 1.crt"));
        let plain = split("postgresql://localhost/db").unwrap();
        assert_eq!(plain.rest, "postgresql://localhost/db");
        assert!(plain.own.is_empty());
        let only = split("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(only.rest, "postgres://h/db");
    }

    #[test]
    fn key_value_strings_follow_libpq_quoting() {
        let s = split(
            "host=h  port = 5433 password='it\\'s a \\\\secret' sslmode=require sslrootcert = '/a b/ca.crt' dbname=d\\ x",
        )
        .unwrap();
        assert_eq!(
            s.rest,
            "host='h' port='5433' password='it\\'s a \\\\secret' dbname='d x'"
        );
        assert_eq!(s.get("sslmode"), Some("require"));
        assert_eq!(s.get("sslrootcert"), Some("/a b/ca.crt"));
        // tokio-postgres reads the rebuilt string back to the same values.
        let pg: tokio_postgres::Config = s.rest.parse().unwrap();
        assert_eq!(pg.get_password(), Some(&b"it's a \\secret"[..]));
        assert_eq!(pg.get_dbname(), Some("d x"));
        assert_eq!(
            split("host=h sslmode").unwrap_err(),
            SplitError::MissingEquals("sslmode".into())
        );
        assert_eq!(
            split("password='open").unwrap_err(),
            SplitError::Unterminated("password".into())
        );
    }

    #[test]
    fn pgpass_matches_as_libpq_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(
            &path,
            "# comment\nother:5432:*:kck:no\ndb.example.com:5432:app:kck:pa\\:ss:word\n*:*:*:kck:fallback\n",
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(
            pgpass(&path, "db.example.com", 5432, "app", "kck"),
            PassFile::Found("pa:ss:word".into())
        );
        assert_eq!(
            pgpass(&path, "db.example.com", 6543, "app", "kck"),
            PassFile::Found("fallback".into())
        );
        assert_eq!(pgpass(&path, "h", 1, "d", "someone"), PassFile::NoMatch);
        assert_eq!(
            pgpass(&dir.path().join("none"), "h", 1, "d", "u"),
            PassFile::Absent
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert_eq!(pgpass(&path, "h", 1, "d", "kck"), PassFile::Unsafe);
        }
    }
}
