//! `.sql` primer and updater files (`primers_dir`, `updaters_dir`): a `-- kck:primer` or `-- kck:updater`
//! header of YAML, then the query.

use super::*;

/// The `*.sql` files of a directory, sorted by name.
pub(super) fn sql_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "sql") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The first line of a `.sql` primer file.
pub(super) const SQL_MARKER: &str = "-- kck:primer";
/// The first line of a `.sql` updater file.
pub(super) const UPDATER_MARKER: &str = "-- kck:updater";

/// A `.sql` file split into its YAML header (line numbers kept: the marker line is blanked) and its body.
pub(super) struct SqlFile {
    pub(super) header: String,
    pub(super) body: String,
    /// The line of the file where the body starts.
    pub(super) body_line: usize,
}

/// Read a `.sql` file whose first line is `marker`, then `--` lines forming a YAML header, then SQL.
pub(super) fn read_sql_file(file: &Path, marker: &str, what: &str) -> Result<SqlFile, ConfigError> {
    let text = read_text(file)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut lines = text.split_inclusive('\n');
    let first = lines.next().unwrap_or("");
    if first.trim_end() != marker {
        let hint = match first.trim_end() {
            SQL_MARKER => ": this is a primer file; put it in `primers_dir`",
            UPDATER_MARKER => ": this is an updater file; put it in `updaters_dir`",
            _ => "",
        };
        return Err(invalid(
            file,
            1,
            "header",
            format!(
                "{what} file must start with the line `{marker}` (found `{}`){hint}",
                first.trim_end().chars().take(60).collect::<String>()
            ),
        ));
    }
    // The header as YAML, with the marker line blanked so that YAML line numbers are the file's.
    let mut header = String::from("\n");
    let mut offset = first.len();
    let mut line = 1;
    for l in lines {
        let Some(content) = l.strip_prefix("--") else {
            break;
        };
        header.push_str(
            content
                .strip_prefix(' ')
                .unwrap_or(content)
                .trim_end_matches(['\n', '\r']),
        );
        header.push('\n');
        offset += l.len();
        line += 1;
    }
    Ok(SqlFile {
        header,
        body: text[offset..].to_owned(),
        body_line: line + 1,
    })
}

/// Read a `.sql` primer: `-- kck:primer`, then `--` lines forming a YAML header, then the query.
pub(super) fn load_sql_primer(
    file: &Path,
    auth_on: bool,
) -> Result<(Primer, PrimerOrigin), ConfigError> {
    let SqlFile {
        header,
        body,
        body_line,
    } = read_sql_file(file, SQL_MARKER, "a primer")?;
    let raw: RawPrimer = from_yaml(&header, file)?;
    if let Some(q) = &raw.query {
        return Err(invalid(
            file,
            line_of(q),
            "query",
            "the query of a .sql primer is the body of the file, after the header: remove `query` from the header",
        ));
    }
    let default_name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let origin = PrimerOrigin {
        file: file.to_owned(),
        prefix: String::new(),
        name_line: 1,
        key_line: 1,
    };
    build_primer(
        raw,
        1,
        origin,
        Some(SqlBody {
            default_name,
            query: body,
            line: body_line,
        }),
        false,
        auth_on,
    )
}

/// Read a `.sql` updater: `-- kck:updater`, a YAML header (`name`, `params`, `access`), then its
/// statements separated by `;`. Returns the updater and the line of its name.
pub(super) fn load_sql_updater(
    file: &Path,
    auth_on: bool,
) -> Result<(Updater, usize), ConfigError> {
    let SqlFile {
        header,
        body,
        body_line,
    } = read_sql_file(file, UPDATER_MARKER, "an updater")?;
    let raw: RawUpdater = from_yaml(&header, file)?;
    if let Some(st) = &raw.statements {
        return Err(invalid(
            file,
            line_of(st),
            "statements",
            "the statements of a .sql updater are the body of the file, after the header: remove \
             `statements` from the header",
        ));
    }
    let default_name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    build_updater(
        raw,
        1,
        file,
        "",
        Some(SqlBody {
            default_name,
            query: body,
            line: body_line,
        }),
        auth_on,
    )
}

/// What a `.sql` file gives a primer besides its header.
pub(super) struct SqlBody {
    pub(super) default_name: String,
    pub(super) query: String,
    /// The line of the file where the query starts (after the header).
    pub(super) line: usize,
}
