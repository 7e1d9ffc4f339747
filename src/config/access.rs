//! Builds the [`Access`] rules of a primer, an updater or `auth.operator`.

use super::*;

/// Validate an `access` rule or list of rules; `params` are the names `match` may refer to (key
/// parameters of a primer, parameters of an updater). `field` is the dotted field of `access`.
pub(super) fn build_access(
    access: &Spanned<RawAccess>,
    params: &[&str],
    file: &Path,
    field: &str,
    auth_on: bool,
) -> Result<Access, ConfigError> {
    let line = line_of(access);
    if !auth_on {
        return Err(invalid(
            file,
            line,
            field,
            "access rules need authentication: configure `auth.jwt` (without it every request is \
             anonymous, and an access rule would either refuse everything or protect nothing)",
        ));
    }
    let rules: Vec<(usize, String, &RawAccessRule)> = match &access.value {
        RawAccess(_, Some(rule)) => vec![(line, field.to_owned(), rule)],
        RawAccess(list, None) => list
            .iter()
            .enumerate()
            .map(|(i, r)| (line_of(r), format!("{field}[{i}]"), &r.value))
            .collect(),
    };
    if rules.is_empty() {
        return Err(invalid(file, line, field, "list at least one rule"));
    }
    let mut out = Vec::with_capacity(rules.len());
    for (rule_line, rule_field, rule) in rules {
        let mut require = Vec::new();
        if let Some(r) = &rule.require {
            for (claim, values) in &r.value.0 {
                if claim.is_empty() || values.is_empty() {
                    return Err(invalid(
                        file,
                        line_of(r),
                        format!("{rule_field}.require"),
                        "each entry names a claim and its required value (or a list of accepted values)",
                    ));
                }
                require.push((claim.clone(), values.clone()));
            }
        }
        let mut matches = Vec::new();
        if let Some(m) = &rule.matches {
            for (claim, param) in &m.value.0 {
                let Some(index) = params.iter().position(|p| *p == param.value) else {
                    return Err(invalid(
                        file,
                        line_of(param),
                        format!("{rule_field}.match.{claim}"),
                        format!(
                            "'{}' is not a parameter here (the parameters: {}); `match` maps a claim to the \
                             parameter it must equal, such as {{ sub: user_id }}",
                            param.value,
                            list_or_none(params)
                        ),
                    ));
                };
                matches.push((claim.clone(), index));
            }
        }
        if require.is_empty() && matches.is_empty() {
            return Err(invalid(
                file,
                rule_line,
                rule_field,
                "a rule needs `require` (claims and their values) or `match` (claims that must equal \
                 parameters), or both",
            ));
        }
        out.push(AccessRule { require, matches });
    }
    Ok(Access { rules: out })
}
