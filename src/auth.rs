//! Authentication with JWT bearer tokens, and the per-primer / per-updater access rules.
//!
//! Off unless the config has `auth.jwt`. When on, [`authenticate`] (an axum middleware) runs before every
//! route except the public paths (`auth.public_paths`: health checks by default): it takes the token from
//! `Authorization: Bearer`, verifies it with [`Verifier`] and puts its claims in the request as a
//! [`Principal`]. A missing or invalid token is a `401` ([`AuthError`]); the body never says more than
//! "missing" or "invalid" (the reason goes to the debug log).
//!
//! Verification never trusts the token's header beyond choosing among configured keys: the algorithm
//! must be in the configured allowlist (`alg: none` is not even parsed), the key must be of that
//! algorithm's family (so an HS256 token "signed" with an RSA public key is refused), and `exp` (required),
//! `nbf`, `iss` and `aud` are checked with the configured leeway.
//!
//! [`Access`] rules (from the config of a primer or an updater) then decide, per key or per update, whether
//! a principal may proceed: `403` ([`AuthError::Forbidden`]) when not. Keys live in the config and the
//! [`Verifier`] in `AppState`, never in a global, so tests bring their own.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, header};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

pub use crate::primer::access::{Access, AccessRule, Claims, Principal, claim_text};

/// `auth` in the config.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `None`: authentication is off and every route is open.
    pub jwt: Option<JwtConfig>,
    /// Exact request paths that never need a token (when `jwt` is on).
    pub public_paths: Vec<String>,
    /// What a token must carry for the operations routes (dashboard, `/status`, `/metrics`, `/cache/...`):
    /// they show every cached value and key, whatever the primers' own rules. `None`: refused to every
    /// token (list a path in `public_paths` to open it).
    pub operator: Option<Access>,
}

/// The default of `auth.public_paths`: health checks and the API description.
pub const DEFAULT_PUBLIC_PATHS: [&str; 3] = ["/healthz", "/readyz", "/openapi.json"];

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt: None,
            public_paths: DEFAULT_PUBLIC_PATHS.iter().map(|p| p.to_string()).collect(),
            operator: None,
        }
    }
}

/// `auth.jwt`, validated: the keys are loaded and every check is decided.
#[derive(Clone)]
pub struct JwtConfig {
    pub algorithms: Vec<Algorithm>,
    pub issuer: Option<Vec<String>>,
    pub audience: Option<Vec<String>>,
    pub leeway: Duration,
    /// Where the keys came from, for messages (`secret_env KCK_JWT_SECRET`, `public_key_file ...`).
    pub key_source: String,
    keys: Arc<Vec<VerifyKey>>,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("JwtConfig")
            .field("algorithms", &self.algorithms)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("key_source", &self.key_source)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// A key tokens may be signed with.
#[derive(Clone)]
pub struct Key {
    /// The JWKS `kid`; a token naming a `kid` is only checked against keys with that `kid`.
    pub kid: Option<String>,
    pub key: DecodingKey,
    /// The algorithms the key itself allows (a JWK's `alg`, or its curve); `None`: any of its family.
    pub only: Option<Vec<Algorithm>>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("family", &self.key.family())
            .field("only", &self.only)
            .finish_non_exhaustive()
    }
}

struct VerifyKey {
    kid: Option<String>,
    key: DecodingKey,
    /// `algorithms` is the configured algorithms this key can verify.
    validation: Validation,
}

fn family_name(family: AlgorithmFamily) -> &'static str {
    match family {
        AlgorithmFamily::Hmac => "HMAC (HS*)",
        AlgorithmFamily::Rsa => "RSA (RS*, PS*)",
        AlgorithmFamily::Ec => "EC (ES*)",
        AlgorithmFamily::Ed => "EdDSA",
    }
}

/// Parse one `auth.jwt.algorithms` entry.
pub fn parse_algorithm(text: &str) -> Result<Algorithm, String> {
    if text.eq_ignore_ascii_case("none") {
        return Err("`none` is never accepted: unsigned tokens prove nothing".into());
    }
    text.parse::<Algorithm>().map_err(|_| {
        format!(
            "unknown algorithm '{text}': use HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, \
             ES256, ES384 or EdDSA"
        )
    })
}

/// A shared secret for HS* algorithms. At least 32 bytes: shorter secrets can be brute-forced offline
/// from any token.
pub fn secret_key(secret: &[u8]) -> Result<Vec<Key>, String> {
    if secret.len() < 32 {
        return Err(format!(
            "the secret is {} bytes; use at least 32 random bytes (e.g. `openssl rand -base64 48`)",
            secret.len()
        ));
    }
    Ok(vec![Key {
        kid: None,
        key: DecodingKey::from_secret(secret),
        only: None,
    }])
}

/// A PEM public key (RSA, EC or Ed25519).
pub fn pem_key(pem: &[u8]) -> Result<Vec<Key>, String> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("PRIVATE KEY") {
        return Err(
            "the file holds a private key: give kck the public key only (it never signs), e.g. \
             `openssl pkey -in private.pem -pubout -out public.pem`"
                .into(),
        );
    }
    if !text.contains("-----BEGIN") {
        return Err("not a PEM file (no -----BEGIN line)".into());
    }
    let key = DecodingKey::from_rsa_pem(pem)
        .or_else(|_| DecodingKey::from_ec_pem(pem))
        .or_else(|_| DecodingKey::from_ed_pem(pem))
        .map_err(|e| format!("not an RSA, EC or Ed25519 public key in PEM form: {e}"))?;
    Ok(vec![Key {
        kid: None,
        key,
        only: None,
    }])
}

/// The keys of a JWKS document (`{"keys": [...]}`). Symmetric (`oct`) keys are refused: a shared secret
/// belongs in `secret_env`, not in a file served as a key set.
pub fn jwks_keys(json: &str) -> Result<Vec<Key>, String> {
    let set: JwkSet =
        serde_json::from_str(json).map_err(|e| format!("not a JWKS document: {e}"))?;
    if set.keys.is_empty() {
        return Err("the key set has no keys".into());
    }
    let mut keys = Vec::with_capacity(set.keys.len());
    for (i, jwk) in set.keys.iter().enumerate() {
        // Keys meant for encryption are not for signatures.
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let name = jwk
            .common
            .key_id
            .as_deref()
            .map_or_else(|| format!("keys[{i}]"), |kid| format!("key '{kid}'"));
        let mut only = match &jwk.common.key_algorithm {
            Some(alg) => Some(vec![Algorithm::try_from(*alg).map_err(|_| {
                format!("{name}: its `alg` is not a signature algorithm kck supports")
            })?]),
            None => None,
        };
        match &jwk.algorithm {
            AlgorithmParameters::OctetKey(_) => {
                return Err(format!(
                    "{name} is a symmetric (oct) key: put HMAC secrets in `secret_env`, not in a key set"
                ));
            }
            AlgorithmParameters::EllipticCurve(ec) => {
                let curve = match ec.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => {
                        return Err(format!(
                            "{name}: only the P-256 and P-384 curves are supported"
                        ));
                    }
                };
                if only.as_ref().is_some_and(|o| !o.contains(&curve)) {
                    return Err(format!("{name}: its `alg` does not match its curve"));
                }
                only = Some(vec![curve]);
            }
            _ => {}
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{name}: {e}"))?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            key,
            only,
        });
    }
    if keys.is_empty() {
        return Err("the key set has no signature keys (every key is marked `use: enc`)".into());
    }
    Ok(keys)
}

impl JwtConfig {
    /// Check that the keys fit the algorithms: every key verifies at least one configured algorithm and
    /// every algorithm has a key (so no configured algorithm silently rejects everything).
    pub fn new(
        algorithms: Vec<Algorithm>,
        keys: Vec<Key>,
        key_source: String,
        issuer: Option<Vec<String>>,
        audience: Option<Vec<String>>,
        leeway: Duration,
    ) -> Result<JwtConfig, String> {
        if algorithms.is_empty() {
            return Err("list at least one algorithm".into());
        }
        let mut verify = Vec::with_capacity(keys.len());
        let mut covered = vec![false; algorithms.len()];
        for (i, key) in keys.into_iter().enumerate() {
            let family = key.key.family();
            let usable: Vec<Algorithm> = algorithms
                .iter()
                .copied()
                .filter(|a| a.family() == family)
                .filter(|a| key.only.as_ref().is_none_or(|only| only.contains(a)))
                .collect();
            if usable.is_empty() {
                let which = key
                    .kid
                    .as_deref()
                    .map_or_else(|| format!("key {}", i + 1), |k| format!("key '{k}'"));
                return Err(format!(
                    "{which} from {key_source} is a {} key, but none of the algorithms ({}) can use it",
                    family_name(family),
                    names(&algorithms)
                ));
            }
            for (j, a) in algorithms.iter().enumerate() {
                covered[j] |= usable.contains(a);
            }
            let mut validation = Validation::new(usable[0]);
            validation.algorithms = usable;
            validation.leeway = leeway.as_secs();
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.validate_aud = true;
            let mut required = vec!["exp"];
            if let Some(iss) = &issuer {
                validation.set_issuer(iss);
                required.push("iss");
            }
            if let Some(aud) = &audience {
                validation.set_audience(aud);
                required.push("aud");
            }
            validation.set_required_spec_claims(&required);
            verify.push(VerifyKey {
                kid: key.kid,
                key: key.key,
                validation,
            });
        }
        if let Some(j) = covered.iter().position(|c| !c) {
            return Err(format!(
                "algorithm {:?} has no key of its family ({}) in {key_source}",
                algorithms[j],
                family_name(algorithms[j].family())
            ));
        }
        Ok(JwtConfig {
            algorithms,
            issuer,
            audience,
            leeway,
            key_source,
            keys: Arc::new(verify),
        })
    }

    /// Verify a token: its signature, algorithm, `exp`, `nbf`, `iss` and `aud`. The error is for the log.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| describe(&e))?;
        // RFC 7515 4.1.11: a recipient that does not understand an extension `crit` names must refuse the
        // token. kck understands none.
        if let Some(crit) = &header.crit {
            return Err(format!(
                "the token's crit header names extensions kck does not implement ({})",
                crit.join(", ")
            ));
        }
        if !self.algorithms.contains(&header.alg) {
            return Err(format!("algorithm {:?} is not allowed", header.alg));
        }
        let mut last = String::from("no configured key can verify this algorithm");
        for key in self.keys.iter() {
            if !key.validation.algorithms.contains(&header.alg) {
                continue;
            }
            if let (Some(wanted), Some(kid)) = (&header.kid, &key.kid)
                && wanted != kid
            {
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    let described = describe(&e);
                    // Past the signature, another key would not change the verdict.
                    if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                        return Err(described);
                    }
                    last = described;
                }
            }
        }
        Err(last)
    }
}

fn names(algorithms: &[Algorithm]) -> String {
    algorithms
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    match e.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim {c}"),
        other => format!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------
// Requests

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this route needs a token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("the token does not grant access to {0}")]
    Forbidden(String),
}

impl AuthError {
    /// The `WWW-Authenticate` challenge (RFC 6750 section 3) its 401 or 403 carries.
    pub fn challenge(&self) -> &'static str {
        match self {
            AuthError::Missing => r#"Bearer realm="kck""#,
            AuthError::Invalid => r#"Bearer realm="kck", error="invalid_token""#,
            AuthError::Forbidden(_) => r#"Bearer realm="kck", error="insufficient_scope""#,
        }
    }
}

/// What [`authenticate`] needs.
#[derive(Debug, Clone)]
pub struct Authenticator {
    pub jwt: JwtConfig,
    pub public_paths: Arc<Vec<String>>,
    /// See [`AuthConfig::operator`].
    pub operator: Option<Access>,
}

impl Authenticator {
    /// From the config; `None` when authentication is off.
    pub fn from_config(config: &AuthConfig) -> Option<Authenticator> {
        Some(Authenticator {
            jwt: config.jwt.clone()?,
            public_paths: Arc::new(config.public_paths.clone()),
            operator: config.operator.clone(),
        })
    }
}

impl Authenticator {
    /// The principal of a request with these headers.
    pub fn principal(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Err(AuthError::Missing);
        };
        if values.next().is_some() {
            tracing::debug!("Refused a request with two Authorization headers.");
            return Err(AuthError::Invalid);
        }
        let value = value.to_str().map_err(|_| AuthError::Invalid)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Missing);
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        match self.jwt.verify(token) {
            Ok(claims) => Ok(Principal {
                claims: Some(Arc::new(claims)),
            }),
            Err(reason) => {
                tracing::debug!(%reason, "Refused a token.");
                Err(AuthError::Invalid)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn principal(claims: Value) -> Principal {
        match claims {
            Value::Object(map) => Principal {
                claims: Some(Arc::new(map)),
            },
            _ => unreachable!(),
        }
    }

    #[test]
    fn access_rules_require_claims_and_match_parameters() {
        let admin = AccessRule {
            require: vec![("role".into(), vec!["admin".into(), "support".into()])],
            matches: vec![],
        };
        let own = AccessRule {
            require: vec![("scope".into(), vec!["orders:read".into()])],
            matches: vec![("sub".into(), 0)],
        };
        let access = Access {
            rules: vec![admin, own],
        };
        let param_is_42 = |i: usize, v: &Value| i == 0 && claim_text(v).as_deref() == Some("42");
        let check = |claims: Value| access.allows(&principal(claims), &param_is_42);
        assert!(check(json!({"role": "admin"})));
        assert!(check(json!({"role": ["user", "support"]})));
        assert!(!check(json!({"role": "user"})));
        assert!(check(json!({"sub": "42", "scope": "profile orders:read"})));
        assert!(check(json!({"sub": 42, "scope": "orders:read"})));
        assert!(!check(json!({"sub": "43", "scope": "orders:read"})));
        assert!(!check(json!({"sub": "42", "scope": "orders:write"})));
        assert!(!check(json!({"sub": ["42"], "scope": "orders:read"})));
        assert!(!check(json!({})));
        assert!(!access.allows(&Principal::default(), &param_is_42));
    }

    #[test]
    fn algorithms_and_keys_must_fit() {
        assert!(parse_algorithm("none").unwrap_err().contains("never"));
        assert!(parse_algorithm("HS257").is_err());
        let secret = secret_key(&[7u8; 32]).unwrap();
        assert!(secret_key(b"short").unwrap_err().contains("at least 32"));
        let ok = JwtConfig::new(
            vec![Algorithm::HS256],
            secret.clone(),
            "test".into(),
            None,
            None,
            Duration::ZERO,
        );
        assert!(ok.is_ok());
        let err = JwtConfig::new(
            vec![Algorithm::RS256],
            secret.clone(),
            "test".into(),
            None,
            None,
            Duration::ZERO,
        )
        .unwrap_err();
        assert!(err.contains("none of the algorithms"), "{err}");
        let err = JwtConfig::new(
            vec![Algorithm::HS256, Algorithm::RS256],
            secret,
            "test".into(),
            None,
            None,
            Duration::ZERO,
        )
        .unwrap_err();
        assert!(err.contains("RS256 has no key"), "{err}");
        assert!(
            jwks_keys(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#)
                .unwrap_err()
                .contains("symmetric")
        );
        assert!(
            pem_key(b"-----BEGIN PRIVATE KEY-----\n")
                .unwrap_err()
                .contains("private key")
        );
    }
}
