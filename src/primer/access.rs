//! Access rules of primers and updaters (`access` in the config), and the [`Principal`] they are checked
//! against. Plain data and logic: verifying tokens is `crate::auth`'s job, and the HTTP layer turns a
//! request into a principal.

use std::sync::Arc;

use serde_json::Value;

/// A token's claims (its payload), once verified.
pub type Claims = serde_json::Map<String, Value>;

/// Who makes a request: the claims of its verified token, or nobody (authentication is off).
#[derive(Debug, Clone, Default)]
pub struct Principal {
    pub claims: Option<Arc<Claims>>,
}

/// One accepted value of a required claim, compared as text (`3` and `"3"` are equal).
pub type ClaimText = String;

/// `access` of a primer or an updater: any one rule grants access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub rules: Vec<AccessRule>,
}

/// Every `require` and every `match` must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    /// Claim → accepted values (any one). A claim that is a list holds if it contains one of them; the
    /// space-separated `scope` and `scp` claims are split into a list first.
    pub require: Vec<(String, Vec<ClaimText>)>,
    /// Claim → index of the parameter (key parameter or updater parameter) it must equal.
    pub matches: Vec<(String, usize)>,
}

/// A claim value as text, if it is a scalar.
pub fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Access {
    /// Whether `principal` may proceed. `param_equals(index, claim)` says whether parameter `index` of the
    /// request equals the claim's value (in the parameter's type: a UUID claim in upper case still equals
    /// the key's UUID). Without claims (no token) nothing is granted.
    pub fn allows(
        &self,
        principal: &Principal,
        param_equals: &dyn Fn(usize, &Value) -> bool,
    ) -> bool {
        let Some(claims) = &principal.claims else {
            return false;
        };
        self.rules
            .iter()
            .any(|rule| rule.holds(claims, param_equals))
    }
}

impl AccessRule {
    fn holds(&self, claims: &Claims, param_equals: &dyn Fn(usize, &Value) -> bool) -> bool {
        let required = self.require.iter().all(|(claim, accepted)| {
            let Some(value) = claims.get(claim) else {
                return false;
            };
            let has = |v: &Value| claim_text(v).is_some_and(|t| accepted.contains(&t));
            match value {
                Value::Array(items) => items.iter().any(has),
                Value::String(s) if claim == "scope" || claim == "scp" => s
                    .split_ascii_whitespace()
                    .any(|scope| accepted.iter().any(|a| a == scope)),
                other => has(other),
            }
        });
        required
            && self.matches.iter().all(|(claim, param)| {
                claims
                    .get(claim)
                    .is_some_and(|v| claim_text(v).is_some() && param_equals(*param, v))
            })
    }
}
