//! TLS for every connection kck opens, with libpq's meaning of `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey`.
//!
//! [`Tls::from_params`] turns the connection string's parameters (and libpq's environment variables and
//! default files) into one decision, made once: the rustls client configuration for ordinary connections
//! ([`Tls::connector`], through tokio-postgres-rustls) and the same decision for the replication connection
//! ([`Tls::replication`], through pgwire-replication's rustls support). The certificate checks are
//! webpki's (through rustls); kck only chooses which of them a mode asks for:
//!
//! | `sslmode` | TLS | chain checked | host name checked |
//! |---|---|---|---|
//! | `disable` | never | | |
//! | `allow`, `prefer` | when the server offers it | when a root certificate is given or `~/.postgresql/root.crt` exists | no |
//! | `require` | always | likewise | no |
//! | `verify-ca` | always | yes | no |
//! | `verify-full` | always | yes | yes (DNS name or IP address) |
//!
//! `allow` tries TLS first, like `prefer` (libpq tries plain text first); both reach the same servers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// `sslmode`, with all six of libpq's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A TLS setting kck cannot honour, or a file it names that cannot be used. Each names the parameter.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{param}={value:?} is not a value kck knows; use one of: {expected}")]
    BadValue {
        param: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{param}={value:?}: {why}")]
    Unsupported {
        param: &'static str,
        value: String,
        why: &'static str,
    },
    #[error(
        "sslmode={mode} checks the server's certificate, but the root certificate file {path} does not exist; \
         give the CA's file with sslrootcert=/path/to/ca.crt, use the system's trusted roots with \
         sslrootcert=system, or use sslmode=require to encrypt without checking the certificate"
    )]
    NoRootCert { mode: &'static str, path: String },
    #[error(
        "sslrootcert=system needs sslmode=verify-full (libpq's rule: the system's roots trust every public \
         CA, so only the host name check makes them safe); got sslmode={mode}"
    )]
    SystemNeedsVerifyFull { mode: &'static str },
    #[error(
        "sslrootcert=system: no certificate bundle of the system was found (SSL_CERT_FILE or the usual places \
         such as /etc/ssl/certs/ca-certificates.crt); install the ca-certificates package or give the CA's file"
    )]
    NoSystemRoots,
    #[error("{param}={path}: cannot read it: {source}")]
    Read {
        param: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{param}={path}: {what}")]
    Pem {
        param: &'static str,
        path: String,
        what: String,
    },
    #[error("sslcert and sslkey go together: {given} is given, {missing} is not")]
    HalfClientCert {
        given: &'static str,
        missing: &'static str,
    },
    #[error("the client certificate and key do not make a TLS client identity: {0}")]
    ClientIdentity(rustls::Error),
}

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq)]
enum Roots {
    /// No roots: the server's certificate is not checked.
    None,
    /// This PEM file (`sslrootcert`, `~/.postgresql/root.crt`, or the system bundle for `system`).
    File(PathBuf),
}

/// The TLS decision for one source, shared by all its connections.
#[derive(Clone)]
pub struct Tls {
    pub mode: SslMode,
    roots: Roots,
    /// Whether the roots are the system's (`sslrootcert=system`), for messages.
    system_roots: bool,
    client: Option<(PathBuf, PathBuf)>,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("roots", &self.roots)
            .field("client", &self.client)
            .finish()
    }
}

/// The places libpq reads by default (`~/.postgresql/…`) and its environment variables.
pub struct Defaults<'a> {
    /// The user's home directory, for `~/.postgresql/root.crt`, `postgresql.crt` and `postgresql.key`.
    pub home: Option<PathBuf>,
    /// Reads an environment variable (`PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`).
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

impl Tls {
    /// Decide from the connection string's own TLS parameters (`get`), libpq's environment variables and
    /// default files. Reads and parses every file now, so a wrong path or a bad PEM is told at start-up
    /// (and by `kck check`), naming the parameter.
    pub fn from_params(
        get: &dyn Fn(&str) -> Option<String>,
        defaults: &Defaults<'_>,
    ) -> Result<Tls, TlsError> {
        let param = |name: &str, env: &str| get(name).or_else(|| (defaults.env)(env));
        let root_param = param("sslrootcert", "PGSSLROOTCERT");
        let system_roots = root_param.as_deref() == Some("system");
        let mode = match param("sslmode", "PGSSLMODE") {
            Some(v) => SslMode::parse(&v).ok_or(TlsError::BadValue {
                param: "sslmode",
                value: v,
                expected: "disable, allow, prefer, require, verify-ca, verify-full",
            })?,
            None if get("requiressl").as_deref() == Some("1") => SslMode::Require,
            None if system_roots => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        for (p, ok) in [
            ("sslcompression", &["0", "1"][..]),
            ("sslsni", &["1"][..]),
            ("requiressl", &["0", "1"][..]),
            ("gssencmode", &["disable", "prefer", "allow"][..]),
            (
                "ssl_min_protocol_version",
                &["TLSv1", "TLSv1.1", "TLSv1.2"][..],
            ),
            ("ssl_max_protocol_version", &["TLSv1.3"][..]),
            ("sslcertmode", &["allow", "require", "disable"][..]),
        ] {
            if let Some(v) = get(p)
                && !v.is_empty()
                && !ok.contains(&v.as_str())
            {
                return Err(TlsError::Unsupported {
                    param: static_name(p),
                    value: v,
                    why: match p {
                        "sslsni" => "kck always sends the host name (SNI) in TLS",
                        "gssencmode" => "kck has no GSSAPI encryption; use TLS (sslmode)",
                        "ssl_min_protocol_version" | "ssl_max_protocol_version" => {
                            "kck speaks TLS 1.2 and 1.3 and cannot narrow that on the replication connection"
                        }
                        _ => "not a value kck can honour",
                    },
                });
            }
        }
        for p in ["sslpassword", "sslcrl", "sslcrldir"] {
            if let Some(v) = get(p).filter(|v| !v.is_empty()) {
                return Err(TlsError::Unsupported {
                    param: static_name(p),
                    value: if p == "sslpassword" { "***".into() } else { v },
                    why: match p {
                        "sslpassword" => {
                            "kck cannot read encrypted client keys; decrypt it (openssl pkey -in key.enc -out key.pem) \
                             and keep the file readable only by kck's user"
                        }
                        _ => {
                            "kck cannot check certificate revocation lists on every connection it opens"
                        }
                    },
                });
            }
        }

        let dot = defaults.home.as_ref().map(|h| h.join(".postgresql"));
        let roots = if mode == SslMode::Disable {
            Roots::None
        } else if system_roots {
            if mode != SslMode::VerifyFull {
                return Err(TlsError::SystemNeedsVerifyFull {
                    mode: mode.as_str(),
                });
            }
            Roots::File(system_bundle(defaults.env).ok_or(TlsError::NoSystemRoots)?)
        } else if let Some(path) = root_param {
            let path = PathBuf::from(path);
            if !path.exists() && matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) {
                return Err(TlsError::NoRootCert {
                    mode: mode.as_str(),
                    path: path.display().to_string(),
                });
            }
            if path.exists() {
                Roots::File(path)
            } else {
                Roots::None
            }
        } else {
            match dot.as_ref().map(|d| d.join("root.crt")) {
                Some(p) if p.exists() => Roots::File(p),
                p if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                    return Err(TlsError::NoRootCert {
                        mode: mode.as_str(),
                        path: p
                            .map_or("~/.postgresql/root.crt".into(), |p| p.display().to_string()),
                    });
                }
                _ => Roots::None,
            }
        };

        let cert_param = param("sslcert", "PGSSLCERT");
        let key_param = param("sslkey", "PGSSLKEY");
        let client = if mode == SslMode::Disable || get("sslcertmode").as_deref() == Some("disable")
        {
            None
        } else {
            match (cert_param, key_param) {
                (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
                (Some(_), None) => {
                    return Err(TlsError::HalfClientCert {
                        given: "sslcert",
                        missing: "sslkey",
                    });
                }
                (None, Some(_)) => {
                    return Err(TlsError::HalfClientCert {
                        given: "sslkey",
                        missing: "sslcert",
                    });
                }
                (None, None) => dot
                    .as_ref()
                    .map(|d| (d.join("postgresql.crt"), d.join("postgresql.key")))
                    .filter(|(c, k)| c.exists() && k.exists()),
            }
        };

        let config = client_config(mode, &roots, client.as_ref())?;
        Ok(Tls {
            mode,
            roots,
            system_roots,
            client,
            config: Arc::new(config),
        })
    }

    /// The connector for tokio-postgres (ordinary connections and pools).
    pub fn connector(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        tokio_postgres_rustls::MakeRustlsConnect::new((*self.config).clone())
    }

    /// tokio-postgres's own, coarser `sslmode` (whether to ask for TLS and whether to insist).
    pub fn tokio_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    /// The same decision for the replication connection to `host`.
    pub fn replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::config::SslMode as P;
        let ca = match &self.roots {
            Roots::File(p) => Some(p.clone()),
            Roots::None => None,
        };
        let mode = match (self.mode, &ca) {
            (SslMode::Disable, _) => P::Disable,
            (SslMode::Allow | SslMode::Prefer, None) => P::Prefer,
            (SslMode::Require, None) => P::Require,
            // pgwire-replication checks nothing in its Prefer mode, where libpq checks the chain when it has
            // roots: insist on TLS and check the chain (a server without TLS then fails here and in check).
            (SslMode::Allow | SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, Some(_)) => {
                P::VerifyCa
            }
            (SslMode::VerifyCa, None) => P::VerifyCa,
            (SslMode::VerifyFull, _) => P::VerifyFull,
        };
        let mut tls = pgwire_replication::TlsConfig {
            mode,
            ca_pem_path: ca,
            ..pgwire_replication::TlsConfig::default()
        };
        if mode == P::VerifyFull {
            // pgwire-replication refuses an IP address unless a name is given for it; rustls then checks the
            // certificate's IP address entries, as libpq does.
            tls.sni_hostname = Some(host.to_owned());
        }
        if let Some((cert, key)) = &self.client {
            tls.client_cert_pem_path = Some(cert.clone());
            tls.client_key_pem_path = Some(key.clone());
        }
        tls
    }

    /// One line for `kck check` and logs: what this mode checks.
    pub fn describe(&self) -> String {
        let roots = match (&self.roots, self.system_roots) {
            (Roots::None, _) => "the server's certificate is not checked".to_string(),
            (Roots::File(_), true) => {
                "the certificate is checked against the system's roots".to_string()
            }
            (Roots::File(p), false) => {
                format!("the certificate is checked against {}", p.display())
            }
        };
        let what = match self.mode {
            SslMode::Disable => return "sslmode=disable: plain text, no TLS".into(),
            SslMode::Allow | SslMode::Prefer => "TLS when the server offers it, else plain text",
            SslMode::Require => "TLS always",
            SslMode::VerifyCa => "TLS always, the certificate chain checked",
            SslMode::VerifyFull => "TLS always, the certificate chain and the host name checked",
        };
        let client = if self.client.is_some() {
            "; a client certificate is sent"
        } else {
            ""
        };
        format!("sslmode={}: {what}; {roots}{client}", self.mode.as_str())
    }
}

/// The `&'static str` for a parameter name of the fixed lists above.
fn static_name(p: &str) -> &'static str {
    super::conninfo::OWN
        .iter()
        .find(|o| **o == p)
        .copied()
        .unwrap_or("a TLS parameter")
}

/// The system's certificate bundle: `SSL_CERT_FILE`, else the first of the usual places that exists.
fn system_bundle(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(f) = env("SSL_CERT_FILE")
        .map(PathBuf::from)
        .filter(|p| p.exists())
    {
        return Some(f);
    }
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/ca-bundle.pem",
        "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        "/etc/ssl/cert.pem",
        "/usr/local/etc/openssl/cert.pem",
        "/opt/homebrew/etc/openssl@3/cert.pem",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(param: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        param,
        path: path.display().to_string(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            param,
            path: path.display().to_string(),
            what: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            param,
            path: path.display().to_string(),
            what: "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

fn client_config(
    mode: SslMode,
    roots: &Roots,
    client: Option<&(PathBuf, PathBuf)>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ClientIdentity)?;
    let builder = match roots {
        Roots::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCheck(provider))),
        Roots::File(path) => {
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(read_certs("sslrootcert", path)?);
            if added == 0 {
                return Err(TlsError::Pem {
                    param: "sslrootcert",
                    path: path.display().to_string(),
                    what: "holds no CA certificate rustls can use".into(),
                });
            }
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(store),
                provider,
            )
            .build()
            .map_err(|e| TlsError::Pem {
                param: "sslrootcert",
                path: path.display().to_string(),
                what: e.to_string(),
            })?;
            if mode == SslMode::VerifyFull {
                builder.with_webpki_verifier(verifier)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
            }
        }
    };
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = read_certs("sslcert", cert)?;
            let key_bytes = std::fs::read(key).map_err(|source| TlsError::Read {
                param: "sslkey",
                path: key.display().to_string(),
                source,
            })?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Pem {
                param: "sslkey",
                path: key.display().to_string(),
                what: format!("not an unencrypted PEM private key: {e}"),
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(TlsError::ClientIdentity)
        }
    }
}

/// `sslmode=require` (or prefer/allow) without roots: encrypt, check nothing of the certificate (libpq's
/// meaning), but still check that the server holds the key of the certificate it sent.
#[derive(Debug)]
struct NoCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: webpki checks the chain, its dates and its use; only a name mismatch is let through.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(params: &[(&str, &str)], home: Option<&Path>) -> Result<Tls, TlsError> {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = move |k: &str| {
            params
                .iter()
                .rev()
                .find(|(p, _)| p == k)
                .map(|(_, v)| v.clone())
        };
        let env = |_: &str| None;
        Tls::from_params(
            &get,
            &Defaults {
                home: home.map(Path::to_path_buf),
                env: &env,
            },
        )
    }

    #[test]
    fn modes_follow_libpq() {
        let none = tempfile::tempdir().unwrap();
        let t = tls(&[], Some(none.path())).unwrap();
        assert_eq!(t.mode, SslMode::Prefer, "libpq's default");
        assert_eq!(t.roots, Roots::None);
        let t = tls(&[("sslmode", "require")], Some(none.path())).unwrap();
        assert_eq!(
            t.replication("db").mode,
            pgwire_replication::config::SslMode::Require
        );
        let err = tls(&[("sslmode", "verify-full")], Some(none.path())).unwrap_err();
        assert!(err.to_string().contains("root.crt does not exist"), "{err}");
        assert!(err.to_string().contains("sslrootcert=system"), "{err}");
        let err = tls(&[("sslmode", "strict")], None).unwrap_err();
        assert!(err.to_string().contains("sslmode=\"strict\""), "{err}");
        let err = tls(&[("sslrootcert", "system"), ("sslmode", "require")], None).unwrap_err();
        assert!(
            err.to_string().contains("needs sslmode=verify-full"),
            "{err}"
        );
        let err = tls(&[("sslcrl", "/x.crl")], None).unwrap_err();
        assert!(err.to_string().starts_with("sslcrl="), "{err}");
        let err = tls(&[("sslpassword", "secret")], None).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        let err = tls(&[("sslcert", "/c.crt")], None).unwrap_err();
        assert!(err.to_string().contains("sslkey"), "{err}");
    }

    #[test]
    fn a_root_file_that_is_not_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "not a certificate").unwrap();
        let err = tls(
            &[
                ("sslmode", "verify-ca"),
                ("sslrootcert", ca.to_str().unwrap()),
            ],
            None,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("sslrootcert="), "{text}");
        assert!(text.contains("no certificate"), "{text}");
    }
}
