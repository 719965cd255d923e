//! TLS to PostgreSQL, configured the way libpq is: `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in the
//! database URL (or key=value string). tokio-postgres knows only `sslmode=disable|prefer|require` and rejects the
//! other parameters, so [`split`] takes them out of the string before tokio-postgres parses the rest, and
//! [`Connector::new`] turns them into the one connector (rustls, `ring` provider) every session of the process
//! uses: the pools, LISTEN, the wake gate, migrations and `nudge status` (`db::Database` carries it).
//!
//! | sslmode | TLS | server certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow`, `prefer` (the default) | if the server offers it; a failed handshake is retried in plain text | not checked |
//! | `require` | always | not checked; with `sslrootcert`, checked as `verify-ca` (libpq) |
//! | `verify-ca` | always | issued by a root in `sslrootcert`, any host name |
//! | `verify-full` | always | issued by a root in `sslrootcert`, for the host name (or IP address) connected to |
//!
//! `sslrootcert=system` means the system's trusted roots and implies `verify-full` (libpq 16); weaker modes are
//! refused with it. Files are read once, at start: a file that cannot be read or holds no usable PEM is a
//! configuration error (exit code 2). A certificate that does not verify fails the session's handshake with one
//! line (`certificate verify failed: ...`), which `/readyz` shows while nudge retries.
//!
//! Unlike libpq, nudge reads no `~/.postgresql/*` default files and no `PGSSL*` environment variables: what is
//! used is in the URL. Over a Unix socket PostgreSQL never speaks TLS, and a URL whose hosts are all sockets
//! connects in plain text whatever the mode (libpq does the same).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslNegotiation};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "invalid sslmode {other:?} (disable, allow, prefer, require, verify-ca or verify-full)"
                ))
            }
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

/// The TLS parameters of one connection string, as written (last one wins, as in libpq).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
}

impl Params {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "sslmode" => Some(&mut self.sslmode),
            "sslrootcert" => Some(&mut self.sslrootcert),
            "sslcert" => Some(&mut self.sslcert),
            "sslkey" => Some(&mut self.sslkey),
            _ => None,
        }
    }
}

/// Take the TLS parameters out of a URL (`postgres://...?sslmode=...`) or key=value string: returns the string
/// for tokio-postgres (everything else, unchanged) and the parameters. Errors name a position or a parameter,
/// never a value (the string holds the password).
pub fn split(url: &str) -> Result<(String, Params), String> {
    for prefix in ["postgres://", "postgresql://"] {
        if url.starts_with(prefix) {
            return split_url(url, prefix.len());
        }
    }
    split_key_value(url)
}

/// The URL form, cut where tokio-postgres' parser cuts it: credentials up to the first `@`, then the query after
/// the first `?`, made of `&`-separated `key=value` pairs, both percent-encoded.
fn split_url(url: &str, prefix: usize) -> Result<(String, Params), String> {
    let credentials = url[prefix..].find('@').map_or(0, |at| at + 1);
    let Some(question) = url[prefix + credentials..].find('?').map(|q| prefix + credentials + q) else {
        return Ok((url.to_owned(), Params::default()));
    };
    let mut params = Params::default();
    let mut kept = Vec::new();
    for pair in url[question + 1..].split('&') {
        let extracted = match pair.split_once('=') {
            Some((key, value)) => {
                let key = percent_decode(key).map_err(|e| format!("{e} in a parameter name"))?;
                match params.slot(&key) {
                    Some(slot) => {
                        *slot = Some(percent_decode(value).map_err(|e| format!("{e} in parameter `{key}`"))?);
                        true
                    }
                    None => false,
                }
            }
            None => false,
        };
        if !extracted {
            kept.push(pair);
        }
    }
    let mut rest = url[..question].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, params))
}

fn percent_decode(text: &str) -> Result<String, &'static str> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "invalid UTF-8 after percent-decoding")
}

/// The key=value form, tokenized as tokio-postgres does: `key = value` separated by whitespace, values either bare
/// (up to whitespace) or single-quoted, with `\` escaping the next character in both.
fn split_key_value(text: &str) -> Result<(String, Params), String> {
    let mut params = Params::default();
    let mut rest = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let mut kept_until = 0;
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else { break };
        while chars.next_if(|&(_, c)| !c.is_whitespace() && c != '=').is_some() {}
        let key_end = chars.peek().map_or(text.len(), |&(i, _)| i);
        let key = &text[start..key_end];
        if key.is_empty() {
            return Err(format!("unexpected `=` at byte {start}: a parameter name is missing"));
        }
        // Errors below name a byte offset, not the text: a malformed string may have split a password.
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        match chars.next() {
            Some((_, '=')) => {}
            Some((i, _)) => return Err(format!("unexpected character at byte {i}: expected `=`")),
            None => return Err("unexpected end of the string: expected `=`".into()),
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                match chars.next() {
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("unterminated quoted value from byte {start}")),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next().map(|(_, c)| c));
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err(format!("a value is missing after byte {start}"));
            }
        }
        let end = chars.peek().map_or(text.len(), |&(i, _)| i);
        if let Some(slot) = params.slot(key) {
            *slot = Some(value);
            rest.push_str(&text[kept_until..start]);
            kept_until = end;
        }
    }
    rest.push_str(&text[kept_until..]);
    Ok((rest, params))
}

/// Where the server certificate's roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    File(PathBuf),
    System,
}

impl fmt::Display for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Roots::File(path) => write!(f, "sslrootcert {}", path.display()),
            Roots::System => f.write_str("the system's trusted roots"),
        }
    }
}

/// The TLS side of every session nudge opens to one database: cheap to clone, shared by all sessions.
#[derive(Clone)]
pub struct Connector {
    /// `None`: never TLS (`sslmode=disable`).
    config: Option<Arc<ClientConfig>>,
    mode: SslMode,
    /// What verification failures are reported against.
    context: Arc<str>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector").field("mode", &self.mode).field("context", &self.context).finish()
    }
}

impl Connector {
    /// The connector for `params`, and tokio-postgres' own `sslmode` set on `config` to match. Reads the files
    /// named; an error is a configuration error (one line, no secrets).
    pub fn new(params: &Params, config: &mut tokio_postgres::Config) -> Result<Connector, String> {
        let roots = params.sslrootcert.as_deref().map(|value| match value {
            "system" => Roots::System,
            path => Roots::File(PathBuf::from(path)),
        });
        let mode = match params.sslmode.as_deref().map(SslMode::parse).transpose()? {
            Some(mode) => mode,
            // libpq 16: sslrootcert=system makes verify-full the default.
            None if roots == Some(Roots::System) => SslMode::VerifyFull,
            // libpq's default.
            None => SslMode::Prefer,
        };
        if roots == Some(Roots::System) && mode != SslMode::VerifyFull {
            return Err(format!(
                "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
                mode.as_str()
            ));
        }
        if config.get_ssl_negotiation() == SslNegotiation::Direct && mode < SslMode::Require {
            return Err(format!(
                "weak sslmode \"{}\" may not be used with sslnegotiation=direct (use \"require\" or stronger)",
                mode.as_str()
            ));
        }
        let context = match (&roots, mode) {
            (Some(roots), SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull) => {
                format!("sslmode={}, roots: {roots}", mode.as_str())
            }
            _ => format!("sslmode={}", mode.as_str()),
        };
        if mode == SslMode::Disable {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            return Ok(Connector { config: None, mode, context: context.into() });
        }
        if roots.is_some() && mode < SslMode::Require {
            tracing::warn!(
                "sslrootcert is set but sslmode={} never checks the server's certificate; set sslmode=verify-full \
                 (or verify-ca) to have it checked",
                mode.as_str()
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, &roots) {
            (SslMode::Disable | SslMode::Allow | SslMode::Prefer, _) | (SslMode::Require, None) => {
                Arc::new(Unchecked(provider.signature_verification_algorithms))
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(format!(
                    "sslmode={} needs sslrootcert: a PEM file with the CA that issued the server's certificate, \
                     or \"system\" for the system's trusted roots",
                    mode.as_str()
                ))
            }
            // libpq: with a root certificate, require verifies the chain as verify-ca does.
            (SslMode::Require | SslMode::VerifyCa, Some(roots)) => Arc::new(ChainOnly {
                roots: Arc::new(load_roots(roots)?),
                algorithms: provider.signature_verification_algorithms,
            }),
            (_, Some(roots)) => rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(load_roots(roots)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("{roots}: {e}"))?,
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut client = match (&params.sslcert, &params.sslkey) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let (cert, key) = (Path::new(cert), Path::new(key));
                let chain = read_certificates("sslcert", cert)?;
                builder.with_client_auth_cert(chain, read_key(key)?).map_err(|e| {
                    format!("sslcert {} and sslkey {} do not make a pair: {e}", cert.display(), key.display())
                })?
            }
            (Some(_), None) => return Err("sslcert needs sslkey (the client certificate's private key)".into()),
            (None, Some(_)) => return Err("sslkey needs sslcert (the client certificate)".into()),
        };
        if config.get_ssl_negotiation() == SslNegotiation::Direct {
            // PostgreSQL 17 accepts a direct TLS handshake only with this ALPN protocol.
            client.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        let all_sockets = config.get_hostaddrs().is_empty()
            && !config.get_hosts().is_empty()
            && config.get_hosts().iter().all(|host| !matches!(host, Host::Tcp(_)));
        config.ssl_mode(match mode {
            // PostgreSQL never offers TLS on a Unix socket; libpq ignores sslmode there.
            _ if all_sockets => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        // tokio-postgres takes the name to verify (and send as SNI) from `host`; with only `hostaddr`, the address
        // is that name.
        if config.get_hosts().is_empty() {
            for addr in config.get_hostaddrs().to_vec() {
                config.host(addr.to_string());
            }
        }
        Ok(Connector { config: Some(Arc::new(client)), mode, context: context.into() })
    }

    /// Open a session with this connector. Under `allow`/`prefer`, a TLS handshake that fails is retried once in
    /// plain text, as libpq does.
    pub async fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, tokio_postgres::Connection<Socket, TlsStream>), tokio_postgres::Error> {
        match config.connect(self.clone()).await {
            Err(e) if self.mode < SslMode::Require && is_handshake_failure(&e) => {
                tracing::debug!(
                    "TLS handshake failed ({}); sslmode={}: trying without TLS",
                    super::describe(&e),
                    self.mode.as_str()
                );
                let mut plain = config.clone();
                plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
                plain.connect(self.clone()).await
            }
            other => other,
        }
    }
}

fn is_handshake_failure(error: &tokio_postgres::Error) -> bool {
    std::error::Error::source(error).is_some_and(|cause| cause.is::<HandshakeError>())
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// A PEM error without the file's content (a key file's lines must not end up in a log).
fn pem_error(what: &str, path: &Path, error: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    let reason = match error {
        Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_owned(),
        Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".to_owned(),
        Error::Base64Decode(_) => "a PEM section is not valid base64".to_owned(),
        Error::NoItemsFound => "nothing usable in it".to_owned(),
        other => other.to_string(),
    };
    format!("{what} {}: {reason}", path.display())
}

fn read_certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_file(what, path)?;
    let certs =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no PEM CERTIFICATE block in it", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_file("sslkey", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "sslkey {}: no PEM private key in it (PKCS#8, RSA or EC; encrypted keys are not supported)",
            path.display()
        ),
        other => pem_error("sslkey", path, other),
    })
}

fn load_roots(roots: &Roots) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            for cert in read_certificates("sslrootcert", path)? {
                store.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
                return Err(format!(
                    "sslrootcert=system: no trusted roots found on this system{why}; install the ca-certificates \
                     package or point SSL_CERT_FILE at a PEM bundle"
                ));
            }
        }
    }
    Ok(store)
}

/// `prefer`, and `require` without roots: the certificate is not checked (libpq does the same). The handshake's
/// signatures still are, so the session is with whoever holds the presented certificate's key.
#[derive(Debug)]
struct Unchecked(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca` (and `require` with roots): the chain must lead to one of the roots and be valid now; the names in
/// the certificate are not looked at.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl MakeTlsConnect<Socket> for Connector {
    type Stream = TlsStream;
    type TlsConnect = Handshake;
    type Error = HandshakeError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Handshake, HandshakeError> {
        let Some(config) = &self.config else {
            return Ok(Handshake(None));
        };
        // tokio-postgres passes "" for a Unix socket, where PostgreSQL never offers TLS.
        if host.is_empty() {
            return Ok(Handshake(None));
        }
        let name = ServerName::try_from(host)
            .map_err(|_| HandshakeError(format!("{host:?} is not a valid host name for TLS")))?
            .to_owned();
        Ok(Handshake(Some(Pending {
            connector: tokio_rustls::TlsConnector::from(config.clone()),
            name,
            context: self.context.clone(),
        })))
    }
}

pub struct Pending {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    context: Arc<str>,
}

/// One session's TLS handshake; `None` when this session cannot use TLS (disabled, or a Unix socket, where
/// PostgreSQL answers the TLS request with "no" and tokio-postgres goes on in plain text).
pub struct Handshake(Option<Pending>);

impl TlsConnect<Socket> for Handshake {
    type Stream = TlsStream;
    type Error = HandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream, HandshakeError>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let Some(Pending { connector, name, context }) = self.0 else {
                return Err(HandshakeError("TLS is not possible on this connection".into()));
            };
            match connector.connect(name, stream).await {
                Ok(stream) => Ok(TlsStream(stream)),
                Err(e) => Err(HandshakeError::new(&e, &context)),
            }
        })
    }
}

/// Why a TLS handshake failed, in one line: `certificate verify failed: <rustls' reason> (sslmode=..., roots: ...)`
/// when the server's certificate was refused.
#[derive(Debug)]
pub struct HandshakeError(String);

impl HandshakeError {
    fn new(error: &io::Error, context: &str) -> HandshakeError {
        let tls = error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
        HandshakeError(match tls {
            Some(e @ rustls::Error::InvalidCertificate(reason)) => {
                let hint = match reason {
                    rustls::CertificateError::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => {
                        "; the server presents a CA certificate as its own: give it a certificate issued by that CA"
                    }
                    _ => "",
                };
                format!("certificate verify failed: {e} ({context}{hint})")
            }
            Some(e) => format!("{e} ({context})"),
            None => format!("{error} ({context})"),
        })
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HandshakeError {}

/// A TLS session to PostgreSQL. Gives tokio-postgres the `tls-server-end-point` channel binding, so SCRAM
/// authentication is bound to this TLS session (`SCRAM-SHA-256-PLUS`; `channel_binding=require` works).
pub struct TlsStream(tokio_rustls::client::TlsStream<Socket>);

impl tokio_postgres::tls::TlsStream for TlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        let end_entity = session.peer_certificates().and_then(|certs| certs.first());
        match end_entity.and_then(|cert| server_end_point(cert)) {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// RFC 5929 `tls-server-end-point`: the certificate's hash, with the hash function of its signature algorithm
/// (SHA-256 for MD5 and SHA-1), as PostgreSQL computes it. `None` for algorithms without one (Ed25519, RSA-PSS):
/// SCRAM then runs without channel binding, which PostgreSQL accepts unless the server insists.
fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use ring::digest;
    let algorithm = match signature_algorithm(cert)? {
        // md5WithRSAEncryption, sha1WithRSAEncryption, sha256WithRSAEncryption
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04 | 0x05 | 0x0b]
        // ecdsa-with-SHA1, ecdsa-with-SHA256
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02] => &digest::SHA256,
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c] | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] => {
            &digest::SHA384
        }
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d] | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04] => {
            &digest::SHA512
        }
        _ => return None,
    };
    Some(digest::digest(algorithm, cert).as_ref().to_vec())
}

/// The OID (content bytes) of `Certificate.signatureAlgorithm`:
/// `SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE { OID, ... }, signature BIT STRING }`.
fn signature_algorithm(cert: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = der(cert, 0x30)?;
    let (_, rest) = der(certificate, 0x30)?;
    let (algorithm, _) = der(rest, 0x30)?;
    let (oid, _) = der(algorithm, 0x06)?;
    Some(oid)
}

/// One DER element with tag `tag` at the start of `input`: (its content, what follows it).
fn der(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, input) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&length, mut input) = input.split_first()?;
    let length = if length < 0x80 {
        usize::from(length)
    } else {
        let octets = usize::from(length & 0x7f);
        if octets == 0 || octets > 4 || input.len() < octets {
            return None;
        }
        let (bytes, rest) = input.split_at(octets);
        input = rest;
        bytes.iter().fold(0usize, |n, &b| n << 8 | usize::from(b))
    };
    (input.len() >= length).then(|| input.split_at(length))
}

impl AsyncRead for TlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(mode: Option<&str>, root: Option<&str>) -> Params {
        Params { sslmode: mode.map(Into::into), sslrootcert: root.map(Into::into), ..Params::default() }
    }

    #[test]
    fn urls_lose_their_tls_parameters_and_keep_everything_else() {
        let (rest, found) = split(
            "postgres://u:p%40ss?w0rd@db.example:6432/app?application_name=x&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca%20bundle.pem&connect_timeout=3&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p%40ss?w0rd@db.example:6432/app?application_name=x&connect_timeout=3");
        assert_eq!(
            found,
            Params {
                sslmode: Some("verify-full".into()),
                sslrootcert: Some("/etc/ca bundle.pem".into()),
                sslcert: Some("/c.pem".into()),
                sslkey: Some("/k.pem".into()),
            }
        );
        let (rest, found) = split("postgresql://db/app?sslmode=require").unwrap();
        assert_eq!((rest.as_str(), found.sslmode.as_deref()), ("postgresql://db/app", Some("require")));
        let (rest, found) = split("postgres://u@db/app").unwrap();
        assert_eq!((rest.as_str(), found), ("postgres://u@db/app", Params::default()));
    }

    #[test]
    fn key_value_strings_lose_their_tls_parameters_and_keep_everything_else() {
        let (rest, found) = split(
            "host=db.example sslmode = verify-ca password='it\\'s secret' sslrootcert='/etc/my ca.pem' \
             user=u sslkey=/k\\ ey.pem",
        )
        .unwrap();
        assert_eq!(rest, "host=db.example  password='it\\'s secret'  user=u ");
        assert_eq!(found.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(found.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        assert_eq!(found.sslkey.as_deref(), Some("/k ey.pem"));
        // Whatever is left is still what tokio-postgres parsed before.
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_user(), Some("u"));
        assert_eq!(split("host=db sslmode").unwrap_err(), "unexpected end of the string: expected `=`");
        for broken in ["host=db password=hunter2 sslrootcert='x", "password=hun ter2 sslmode=require"] {
            let error = split(broken).unwrap_err();
            assert!(!error.contains("hun"), "{error}");
        }
    }

    #[test]
    fn modes_follow_libpq() {
        let mode = |p: &Params| {
            let mut config: tokio_postgres::Config = "host=db".parse().unwrap();
            Connector::new(p, &mut config).map(|c| (c.mode, config.get_ssl_mode()))
        };
        use tokio_postgres::config::SslMode as Tp;
        assert_eq!(mode(&params(None, None)).unwrap(), (SslMode::Prefer, Tp::Prefer));
        assert_eq!(mode(&params(Some("disable"), None)).unwrap(), (SslMode::Disable, Tp::Disable));
        assert_eq!(mode(&params(Some("require"), None)).unwrap(), (SslMode::Require, Tp::Require));
        assert!(mode(&params(Some("verify-full"), None)).unwrap_err().contains("needs sslrootcert"));
        assert!(mode(&params(Some("verify_full"), None)).unwrap_err().contains("invalid sslmode \"verify_full\""));
        assert!(mode(&params(Some("require"), Some("system"))).unwrap_err().contains("weak sslmode \"require\""));
        assert!(mode(&params(Some("verify-ca"), Some("/nonexistent/ca.pem")))
            .unwrap_err()
            .starts_with("cannot read sslrootcert /nonexistent/ca.pem: "));
        let only_sockets = |mode: &str| {
            let mut config: tokio_postgres::Config = "host=/run/postgresql".parse().unwrap();
            Connector::new(&params(Some(mode), None), &mut config).unwrap();
            config.get_ssl_mode()
        };
        assert_eq!(only_sockets("require"), Tp::Disable);
        assert_eq!(only_sockets("prefer"), Tp::Disable);
        // With only an address, the address is the name to verify.
        let mut by_address: tokio_postgres::Config = "hostaddr=10.0.0.7 user=u".parse().unwrap();
        Connector::new(&params(Some("require"), None), &mut by_address).unwrap();
        assert_eq!(by_address.get_hosts(), [Host::Tcp("10.0.0.7".into())]);
        let mut direct: tokio_postgres::Config = "host=db sslnegotiation=direct".parse().unwrap();
        assert!(Connector::new(&params(None, None), &mut direct).unwrap_err().contains("sslnegotiation=direct"));
    }

    #[test]
    fn der_lengths_are_read_in_both_forms() {
        assert_eq!(der(&[0x30, 0x02, 1, 2, 9], 0x30), Some((&[1u8, 2][..], &[9u8][..])));
        let long = [&[0x04u8, 0x82, 0x01, 0x00][..], &[7u8; 256]].concat();
        assert_eq!(der(&long, 0x04).map(|(content, _)| content.len()), Some(256));
        assert_eq!(der(&[0x30, 0x05, 1], 0x30), None);
        assert_eq!(der(&[0x31, 0x00], 0x30), None);
    }
}
