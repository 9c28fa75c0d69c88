//! TLS to PostgreSQL with rustls: libpq's `sslmode` and `sslrootcert`, which tokio-postgres's
//! parser does not fully know (it takes only `disable`, `prefer` and `require`, and no
//! `sslrootcert`). [`take_tls_params`] removes both from the connection string before
//! tokio-postgres parses it; [`connector`] builds the rustls configuration they ask for.
//!
//! | `sslmode`     | encrypted                  | certificate checked                  |
//! |---------------|----------------------------|--------------------------------------|
//! | `disable`     | never                      | -                                    |
//! | `prefer`      | if the server offers it    | no                                   |
//! | `require`     | always                     | no; chain only with `sslrootcert`    |
//! | `verify-ca`   | always                     | chain to a trusted root              |
//! | `verify-full` | always                     | chain, and the host name (or IP)     |
//!
//! Trusted roots are the certificates in the `sslrootcert` PEM file, or with none given (or
//! `sslrootcert=system`) the Mozilla root set compiled in from `webpki-roots`. Unlike libpq,
//! `~/.postgresql/root.crt` is never read implicitly.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::CertificateError as Cert;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore};
use rustls::{Error as TlsError, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// libpq's default, and ours.
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether to ask for TLS, and whether to insist.
    pub(crate) fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            Self::Disable => Pg::Disable,
            Self::Prefer => Pg::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => Pg::Require,
        }
    }
}

/// Where trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// The Mozilla roots of `webpki-roots` (no `sslrootcert`, or `sslrootcert=system`).
    Public,
    /// Every certificate in this PEM file (`sslrootcert=/path`).
    File(PathBuf),
}

/// The TLS parameters of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: SslMode,
    pub roots: RootCerts,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("unknown sslmode `{0}` (expected disable, prefer, require, verify-ca, verify-full)")]
    UnknownSslMode(String),
    #[error("cannot read sslrootcert {path}")]
    RootCertUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sslrootcert {path} holds no usable PEM certificate")]
    NoRootCerts { path: PathBuf },
    #[error("could not set up TLS")]
    Rustls(#[from] TlsError),
    #[error("could not set up certificate verification")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// Removes `sslmode` and `sslrootcert` from a URL (`postgres://...?sslmode=...`) or
/// key=value connection string, returning the rest for tokio-postgres and what they said.
/// A later occurrence overrides an earlier one, as in libpq. Text that does not scan as either
/// form is returned unchanged, for tokio-postgres to report.
pub fn take_tls_params(conninfo: &str) -> Result<(String, TlsParams), TlsConfigError> {
    let mut mode = None;
    let mut root = None;
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            mode = Some(value);
            true
        }
        "sslrootcert" => {
            root = Some(value);
            true
        }
        _ => false,
    };
    let rest = if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        strip_url_params(conninfo, &mut take)
    } else {
        strip_key_values(conninfo, &mut take)
    };
    let mode = match mode {
        None => SslMode::default(),
        Some(text) => SslMode::parse(&text).ok_or(TlsConfigError::UnknownSslMode(text))?,
    };
    let roots = match root.as_deref() {
        None | Some("system") => RootCerts::Public,
        Some(path) => RootCerts::File(path.into()),
    };
    Ok((rest, TlsParams { mode, roots }))
}

/// The URL form: parameters after `?`, separated by `&`, values percent-encoded.
fn strip_url_params(url: &str, take: &mut impl FnMut(&str, String) -> bool) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            !take(key, percent_decode(value))
        })
        .collect();
    if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The key=value form: `key = value` pairs separated by whitespace; a value may be quoted with
/// `'`, and `\` escapes the next character.
fn strip_key_values(conninfo: &str, take: &mut impl FnMut(&str, String) -> bool) -> String {
    let Some(pairs) = scan_key_values(conninfo) else {
        return conninfo.to_owned();
    };
    let mut rest = String::new();
    let mut copied_to = 0;
    for (start, end, key, value) in pairs {
        if take(key, value) {
            rest.push_str(&conninfo[copied_to..start]);
            copied_to = end;
        }
    }
    rest.push_str(&conninfo[copied_to..]);
    rest
}

/// Each pair's byte span, key and unescaped value; `None` if the text does not scan.
fn scan_key_values(text: &str) -> Option<Vec<(usize, usize, &str, String)>> {
    let mut chars = text.char_indices().peekable();
    let mut pairs = Vec::new();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            return Some(pairs);
        };
        let mut key_end = start;
        while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key_end = i + c.len_utf8();
        }
        if key_end == start {
            return None;
        }
        skip_ws(&mut chars);
        chars.next_if(|(_, c)| *c == '=')?;
        skip_ws(&mut chars);
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut end = text.len();
        let mut closed = !quoted;
        while let Some(&(i, c)) = chars.peek() {
            if (quoted && c == '\'') || (!quoted && c.is_whitespace()) {
                if quoted {
                    chars.next();
                    closed = true;
                    end = i + 1;
                } else {
                    end = i;
                }
                break;
            }
            chars.next();
            if c == '\\' {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            } else {
                value.push(c);
            }
        }
        if !closed || (!quoted && value.is_empty()) {
            return None;
        }
        pairs.push((start, end, &text[start..key_end], value));
    }
}

/// The rustls connector for these parameters. With `disable` it is never used.
pub fn connector(params: &TlsParams) -> Result<MakeRustlsConnect, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let explicit_root = matches!(params.roots, RootCerts::File(_));
    let config = match params.mode {
        SslMode::Disable | SslMode::Prefer => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth(),
        // As libpq: `require` with a root certificate file given checks the chain.
        SslMode::Require if !explicit_root => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth(),
        SslMode::Require | SslMode::VerifyCa => {
            let chain = WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(&params.roots)?),
                provider,
            )
            .build()?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(chain)))
                .with_no_client_auth()
        }
        SslMode::VerifyFull => builder
            .with_root_certificates(root_store(&params.roots)?)
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

fn root_store(roots: &RootCerts) -> Result<RootCertStore, TlsConfigError> {
    match roots {
        RootCerts::Public => Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
        RootCerts::File(path) => {
            let pem = std::fs::read(path).map_err(|source| TlsConfigError::RootCertUnreadable {
                path: path.clone(),
                source,
            })?;
            let mut store = RootCertStore::empty();
            let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsConfigError::NoRootCerts { path: path.clone() });
            }
            Ok(store)
        }
    }
}

/// Encrypts without checking who is at the other end (`prefer`, `require`), as libpq does.
/// The handshake signature is still checked against the certificate presented.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
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
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
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

/// `verify-ca`: the full check, except that a certificate issued for another name passes.
/// The chain is checked before the name, so a name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let verified =
            self.0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        match verified {
            Err(TlsError::InvalidCertificate(
                Cert::NotValidForName | Cert::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(mode: SslMode, roots: RootCerts) -> TlsParams {
        TlsParams { mode, roots }
    }

    #[test]
    fn tls_params_are_taken_out_of_urls() {
        let (rest, found) = take_tls_params(
            "postgres://u:p@h:5432/db?sslmode=verify-full&application_name=x\
             &sslrootcert=%2Fetc%2Fca%20dir%2Froot.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@h:5432/db?application_name=x");
        assert_eq!(
            found,
            params(
                SslMode::VerifyFull,
                RootCerts::File("/etc/ca dir/root.pem".into())
            )
        );

        let (rest, found) = take_tls_params("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(found, params(SslMode::Require, RootCerts::Public));

        let (rest, found) = take_tls_params("postgres://h/db").unwrap();
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(found, params(SslMode::Prefer, RootCerts::Public));
    }

    #[test]
    fn tls_params_are_taken_out_of_key_value_strings() {
        let (rest, found) = take_tls_params(
            "host=h sslmode = verify-ca  dbname=db sslrootcert='/a b/it\\'s.pem' user=u",
        )
        .unwrap();
        assert_eq!(rest, "host=h   dbname=db  user=u");
        assert_eq!(
            found,
            params(SslMode::VerifyCa, RootCerts::File("/a b/it's.pem".into()))
        );
        // The later one wins; `system` means the built-in roots.
        let (rest, found) =
            take_tls_params("sslmode=disable host=h sslmode=verify-full sslrootcert=system")
                .unwrap();
        assert_eq!(rest.split_whitespace().collect::<Vec<_>>(), ["host=h"]);
        assert_eq!(found, params(SslMode::VerifyFull, RootCerts::Public));
    }

    #[test]
    fn unknown_modes_are_refused_and_unscannable_text_is_left_alone() {
        assert!(matches!(
            take_tls_params("postgres://h/db?sslmode=allow-anything"),
            Err(TlsConfigError::UnknownSslMode(mode)) if mode == "allow-anything"
        ));
        let broken = "host=h sslmode='unterminated";
        assert_eq!(take_tls_params(broken).unwrap().0, broken);
    }

    #[test]
    fn a_missing_or_empty_root_file_is_a_clear_error() {
        let missing = params(
            SslMode::VerifyFull,
            RootCerts::File("/nonexistent/milo-root.pem".into()),
        );
        let error = connector(&missing).err().expect("an error");
        assert!(
            error.to_string().contains("/nonexistent/milo-root.pem"),
            "{error}"
        );

        let empty = std::env::temp_dir().join(format!("milo-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = connector(&params(SslMode::VerifyCa, RootCerts::File(empty.clone())))
            .err()
            .expect("an error");
        std::fs::remove_file(&empty).unwrap();
        assert!(
            matches!(error, TlsConfigError::NoRootCerts { .. }),
            "{error}"
        );
    }

    #[test]
    fn every_mode_builds_with_the_public_roots() {
        for mode in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            let mode = SslMode::parse(mode).unwrap();
            assert!(
                connector(&params(mode, RootCerts::Public)).is_ok(),
                "{mode:?}"
            );
            assert_eq!(SslMode::parse(mode.as_str()), Some(mode));
        }
    }
}
