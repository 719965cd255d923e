//! Authentication: JWTs issued by the application's backend.
//!
//! The algorithm is fixed by configuration and jsonwebtoken's `Validation` is set up deliberately: its defaults
//! (60 s leeway, `nbf` unchecked, `aud` checked only when present) are not what a relay that hands out live data
//! should accept. `Identity` is what a connection keeps: the user, the expiry, the topics it may subscribe to.
//!
//! The time claims are checked here, not by jsonwebtoken, so that every number an issuer can sign has one
//! documented answer (`check_times`): jsonwebtoken rounds a fractional `exp`, calls a negative one "missing", and
//! subtracts the leeway from the clock unchecked. `exp` is a JSON number, fractions dropped, no later than
//! [`MAX_EXP`]; `nbf`, when present, a JSON number, fractions rounded up; `iat` is not read.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The latest `exp` nudge accepts: 9999-12-31T23:59:59Z in Unix seconds, the last second a four-digit year names
/// (RFC 3339, and most date libraries). Later ones are refused with [`AuthError::ExpBeyondHorizon`]. It bounds
/// every [`Identity::valid_until`], and every `expires_at` a client is told fits a JavaScript number exactly.
pub const MAX_EXP: u64 = 253_402_300_799;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
    #[value(name = "EdDSA")]
    EdDsa,
}

impl JwtAlgorithm {
    fn jsonwebtoken(self) -> Algorithm {
        match self {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
            JwtAlgorithm::EdDsa => Algorithm::EdDSA,
        }
    }
}

#[derive(Debug, Clone)]
pub enum JwtKey {
    Secret(String),
    PublicKeyPem(PathBuf),
}

pub struct JwtSettings {
    pub algorithm: JwtAlgorithm,
    pub key: JwtKey,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub leeway: Duration,
}

/// A key configuration that cannot work. Reported at start, exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no JWT key: set NUDGE_JWT_SECRET (HS256) or NUDGE_JWT_PUBLIC_KEY (RS256, ES256, EdDSA)")]
    Missing,
    #[error("set either NUDGE_JWT_SECRET or NUDGE_JWT_PUBLIC_KEY, not both")]
    Both,
    #[error("NUDGE_JWT_SECRET is empty")]
    EmptySecret,
    #[error("NUDGE_JWT_ALGORITHM={0:?} needs a public key (NUDGE_JWT_PUBLIC_KEY), not a shared secret")]
    SecretForAsymmetric(JwtAlgorithm),
    #[error("NUDGE_JWT_ALGORITHM=HS256 needs NUDGE_JWT_SECRET, not a public key")]
    PublicKeyForHmac,
    #[error("cannot read NUDGE_JWT_PUBLIC_KEY {path}: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("NUDGE_JWT_PUBLIC_KEY {path} is not a PEM {algorithm:?} public key: {reason}")]
    BadPem { path: PathBuf, algorithm: JwtAlgorithm, reason: String },
}

/// Why a token was refused. The message goes to the client in an `unauthorized` error; never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    /// `exp` or `nbf` is not a JSON number (a string, `true`, an array...).
    #[error("token claim {0} is not a number of seconds since 1970")]
    NotANumericDate(&'static str),
    #[error("token claim exp is after 9999-12-31T23:59:59Z, the latest nudge accepts")]
    ExpBeyondHorizon,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token algorithm is not the configured {0}")]
    WrongAlgorithm(&'static str),
    #[error("token audience is missing or wrong")]
    WrongAudience,
    #[error("token issuer is missing or wrong")]
    WrongIssuer,
    #[error("token lacks the required claim {0}")]
    MissingClaim(String),
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("refresh token is for another user")]
    OtherUser,
}

/// Who a connection is, from a verified token.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The JWT `sub`; events name recipients by it. Shared with the hub's index, hence `Arc`.
    pub user: Arc<str>,
    /// The token's `exp` in whole Unix seconds (a fraction dropped), as told to the client in `ready` /
    /// `refreshed`. At most [`MAX_EXP`].
    pub expires_at: u64,
    /// When the connection must be closed with `token_expired`: `expires_at` plus the configured leeway, but never
    /// later than [`MAX_EXP`] (9999-12-31T23:59:59Z). `valid_until - now` is therefore below 8,000 years
    /// (2.6e11 s), which `Instant::now()` can take added (std's `Instant` holds i64 seconds; tokio's timer clamps
    /// deadlines beyond its wheel).
    pub valid_until: SystemTime,
    pub topics: TopicPatterns,
}

/// The `topics` claim: exact topics, or prefixes ending in `*`.
#[derive(Debug, Clone, Default)]
pub struct TopicPatterns(Box<[Box<str>]>);

impl TopicPatterns {
    pub fn new<I: IntoIterator<Item = String>>(patterns: I) -> Self {
        TopicPatterns(patterns.into_iter().map(String::into_boxed_str).collect())
    }

    pub fn allows(&self, topic: &str) -> bool {
        self.0.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => topic.starts_with(prefix),
            None => **pattern == *topic,
        })
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// The time claims as NumericDates (`numeric_date`), judged by `check_times`. JSON `null` counts as absent.
    #[serde(default, deserialize_with = "exp_date")]
    exp: Option<f64>,
    #[serde(default, deserialize_with = "nbf_date")]
    nbf: Option<f64>,
    #[serde(default)]
    topics: Option<Vec<String>>,
}

/// The message of a time claim that is not a JSON number; `explain` finds it in serde's error.
fn not_a_numeric_date(claim: &'static str) -> String {
    AuthError::NotANumericDate(claim).to_string()
}

fn exp_date<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    numeric_date(deserializer, "exp")
}

fn nbf_date<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    numeric_date(deserializer, "nbf")
}

/// A NumericDate (RFC 7519 section 2: seconds since 1970, fractions allowed) as an `f64`. Read from the raw text, so
/// that every JSON number has a value: integers up to 2^53 exactly (the whole range up to [`MAX_EXP`] is far
/// below), larger ones rounded, and beyond `f64`'s range ±infinity, where serde_json would refuse them.
///
/// Any other JSON value is an error of our own, raised while our struct is read, before jsonwebtoken reads the
/// same claims for its own checks: its reader gives up in the middle of an array or object there and reports only
/// "expected `,` or `}`".
fn numeric_date<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
    claim: &'static str,
) -> Result<Option<f64>, D::Error> {
    let Some(raw) = Option::<Box<RawValue>>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let text = raw.get().trim();
    // A JSON number starts with `-` or a digit, and Rust's float grammar includes JSON's.
    match text.starts_with(|c: char| c == '-' || c.is_ascii_digit()).then(|| text.parse::<f64>().ok()).flatten() {
        Some(seconds) => Ok(Some(seconds)),
        None => Err(serde::de::Error::custom(not_a_numeric_date(claim))),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Verifies tokens with the one configured key and algorithm.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    algorithm: JwtAlgorithm,
    /// Clock leeway for `exp` and `nbf`, in whole seconds (rounded up).
    leeway: u64,
}

impl Authenticator {
    pub fn new(settings: JwtSettings) -> Result<Self, KeyError> {
        let algorithm = settings.algorithm;
        let key = match (&settings.key, algorithm) {
            (JwtKey::Secret(secret), JwtAlgorithm::Hs256) => {
                if secret.is_empty() {
                    return Err(KeyError::EmptySecret);
                }
                if secret.len() < 32 {
                    tracing::warn!("NUDGE_JWT_SECRET is shorter than 32 bytes; use a long random secret");
                }
                DecodingKey::from_secret(secret.as_bytes())
            }
            (JwtKey::Secret(_), other) => return Err(KeyError::SecretForAsymmetric(other)),
            (JwtKey::PublicKeyPem(_), JwtAlgorithm::Hs256) => return Err(KeyError::PublicKeyForHmac),
            (JwtKey::PublicKeyPem(path), _) => {
                let pem = std::fs::read(path).map_err(|source| KeyError::Unreadable { path: path.clone(), source })?;
                let parsed = match algorithm {
                    JwtAlgorithm::Rs256 => DecodingKey::from_rsa_pem(&pem),
                    JwtAlgorithm::Es256 => DecodingKey::from_ec_pem(&pem),
                    JwtAlgorithm::EdDsa => DecodingKey::from_ed_pem(&pem),
                    JwtAlgorithm::Hs256 => unreachable!("matched above"),
                };
                parsed.map_err(|e| KeyError::BadPem { path: path.clone(), algorithm, reason: e.to_string() })?
            }
        };

        let mut validation = Validation::new(algorithm.jsonwebtoken());
        // `check_times` does these, with one rule for every number (module doc).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        let leeway = settings.leeway.as_secs().saturating_add(u64::from(settings.leeway.subsec_nanos() > 0));
        let mut required = vec!["sub"];
        match &settings.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // Without a configured audience a token's `aud` is not ours to judge.
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &settings.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);

        Ok(Authenticator { key, validation, algorithm, leeway })
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| self.explain(e))?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::MissingClaim("sub".into()));
        }
        let expires_at = self.check_times(&claims, unix_now())?;
        let valid_until = expires_at.saturating_add(self.leeway).min(MAX_EXP);
        Ok(Identity {
            user: claims.sub.into(),
            expires_at,
            valid_until: UNIX_EPOCH + Duration::from_secs(valid_until),
            topics: TopicPatterns::new(claims.topics.unwrap_or_default()),
        })
    }

    /// The time claims, at `now` (Unix seconds); returns `exp` in whole seconds. That `exp` and `nbf` are JSON
    /// numbers was checked as they were read ([`AuthError::NotANumericDate`]). Then, in this order:
    /// - `exp` must be present ([`AuthError::MissingClaim`]); a fraction is dropped (a token is never valid longer
    ///   than it says). Later than [`MAX_EXP`]: [`AuthError::ExpBeyondHorizon`]. Negative, or before `now` even
    ///   with the leeway: [`AuthError::Expired`].
    /// - `nbf`, if present, is rounded up (never valid sooner than it says); later than `now` plus the leeway:
    ///   [`AuthError::NotYetValid`]. Any past value, negative ones included, is fine.
    /// - `iat` is not read: it neither widens nor narrows what `exp` and `nbf` allow.
    fn check_times(&self, claims: &Claims, now: u64) -> Result<u64, AuthError> {
        let exp = claims.exp.ok_or_else(|| AuthError::MissingClaim("exp".into()))?.floor();
        if exp > MAX_EXP as f64 {
            return Err(AuthError::ExpBeyondHorizon);
        }
        if exp < 0.0 {
            return Err(AuthError::Expired);
        }
        // Exact: 0 <= exp <= MAX_EXP, an integer.
        let exp = exp as u64;
        if exp.saturating_add(self.leeway) < now {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = claims.nbf {
            if nbf.ceil() > now.saturating_add(self.leeway) as f64 {
                return Err(AuthError::NotYetValid);
            }
        }
        Ok(exp)
    }

    fn explain(&self, error: jsonwebtoken::errors::Error) -> AuthError {
        match error.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::WrongAlgorithm(self.algorithm_name())
            }
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                "aud" => AuthError::WrongAudience,
                "iss" => AuthError::WrongIssuer,
                other => AuthError::MissingClaim(other.to_owned()),
            },
            // An unknown `alg` such as "none" fails while parsing the header.
            ErrorKind::Json(e) if e.to_string().contains("unknown variant") => {
                AuthError::WrongAlgorithm(self.algorithm_name())
            }
            // Our claims struct requires `sub`, so serde reports it missing before jsonwebtoken does.
            ErrorKind::Json(e) => match e.to_string().split('`').nth(1) {
                Some(field) if e.to_string().starts_with("missing field") => AuthError::MissingClaim(field.to_owned()),
                _ if e.to_string().starts_with(&not_a_numeric_date("exp")) => AuthError::NotANumericDate("exp"),
                _ if e.to_string().starts_with(&not_a_numeric_date("nbf")) => AuthError::NotANumericDate("nbf"),
                _ => AuthError::Malformed(e.to_string()),
            },
            _ => AuthError::Malformed(error.to_string()),
        }
    }

    fn algorithm_name(&self) -> &'static str {
        match self.algorithm {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Es256 => "ES256",
            JwtAlgorithm::EdDsa => "EdDSA",
        }
    }
}

/// The claims `issue_token` signs; the same shape `verify` reads.
#[derive(serde::Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    topics: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// What a development token carries: `nudge token` and the demo's token route.
pub struct TokenRequest<'a> {
    pub sub: &'a str,
    pub topics: &'a [String],
    pub ttl: Duration,
    pub audience: Option<&'a str>,
    pub issuer: Option<&'a str>,
}

/// Sign an HS256 token. Production tokens come from the application's backend; this is for development.
pub fn issue_token(secret: &str, request: &TokenRequest<'_>) -> Result<String, jsonwebtoken::errors::Error> {
    let now = unix_now();
    let claims = IssuedClaims {
        sub: request.sub,
        iat: now,
        // An absurd `--ttl` gets the latest `exp` nudge accepts rather than an overflow.
        exp: now.saturating_add(request.ttl.as_secs().max(1)).min(MAX_EXP),
        topics: request.topics,
        aud: request.audience,
        iss: request.issuer,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    fn hs256(audience: Option<&str>) -> Authenticator {
        Authenticator::new(JwtSettings {
            algorithm: JwtAlgorithm::Hs256,
            key: JwtKey::Secret("0123456789abcdef0123456789abcdef".into()),
            audience: audience.map(str::to_owned),
            issuer: None,
            leeway: Duration::ZERO,
        })
        .expect("valid settings")
    }

    fn sign(alg: Algorithm, claims: serde_json::Value) -> String {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"))
            .expect("signs")
    }

    #[test]
    fn topic_patterns_match_exact_topics_and_star_prefixes() {
        let p = TopicPatterns::new(["post:*".to_owned(), "chat:7".to_owned()]);
        assert!(p.allows("post:42"));
        assert!(!p.allows("posts:1"));
        assert!(p.allows("chat:7"));
        assert!(!p.allows("chat:70"));
        assert!(!TopicPatterns::default().allows("post:42"));
        assert!(TopicPatterns::new(["*".to_owned()]).allows("anything"));
    }

    #[test]
    fn refuses_what_the_readme_says_it_refuses() {
        let auth = hs256(None);
        let good = sign(Algorithm::HS256, json!({"sub": "alice", "exp": now() + 60}));
        assert_eq!(&*auth.verify(&good).expect("good token").user, "alice");

        let expired = sign(Algorithm::HS256, json!({"sub": "alice", "exp": now() - 5}));
        assert_eq!(auth.verify(&expired).unwrap_err(), AuthError::Expired);

        let no_exp = sign(Algorithm::HS256, json!({"sub": "alice"}));
        assert_eq!(auth.verify(&no_exp).unwrap_err(), AuthError::MissingClaim("exp".into()));

        let future = sign(Algorithm::HS256, json!({"sub": "alice", "exp": now() + 60, "nbf": now() + 30}));
        assert_eq!(auth.verify(&future).unwrap_err(), AuthError::NotYetValid);

        let other_alg = sign(Algorithm::HS384, json!({"sub": "alice", "exp": now() + 60}));
        assert_eq!(auth.verify(&other_alg).unwrap_err(), AuthError::WrongAlgorithm("HS256"));

        // Change the signature's first character: the last one partly encodes padding bits, so changing it may
        // not change the decoded signature at all.
        let dot = good.rfind('.').expect("three parts") + 1;
        let first = &good[dot..dot + 1];
        let tampered = format!("{}{}{}", &good[..dot], if first == "A" { "B" } else { "A" }, &good[dot + 1..]);
        assert_eq!(auth.verify(&tampered).unwrap_err(), AuthError::BadSignature);
    }

    #[test]
    fn alg_none_is_refused() {
        use base64_like::encode_url;
        let header = encode_url(br#"{"alg":"none","typ":"JWT"}"#);
        let body = encode_url(format!(r#"{{"sub":"alice","exp":{}}}"#, now() + 60).as_bytes());
        let token = format!("{header}.{body}.");
        assert_eq!(hs256(None).verify(&token).unwrap_err(), AuthError::WrongAlgorithm("HS256"));
    }

    #[test]
    fn issued_tokens_verify() {
        let topics = vec!["post:*".to_owned()];
        let request =
            TokenRequest { sub: "alice", topics: &topics, ttl: Duration::from_secs(60), audience: None, issuer: None };
        let token = issue_token("0123456789abcdef0123456789abcdef", &request).expect("signs");
        let identity = hs256(None).verify(&token).expect("verifies");
        assert_eq!(&*identity.user, "alice");
        assert!(identity.topics.allows("post:1"));
    }

    #[test]
    fn configured_audience_is_required() {
        let auth = hs256(Some("app"));
        let none = sign(Algorithm::HS256, json!({"sub": "a", "exp": now() + 60}));
        assert_eq!(auth.verify(&none).unwrap_err(), AuthError::WrongAudience);
        let wrong = sign(Algorithm::HS256, json!({"sub": "a", "exp": now() + 60, "aud": "other"}));
        assert_eq!(auth.verify(&wrong).unwrap_err(), AuthError::WrongAudience);
        let right = sign(Algorithm::HS256, json!({"sub": "a", "exp": now() + 60, "aud": "app"}));
        assert!(auth.verify(&right).is_ok());
    }

    /// An HS256 token over exactly this payload text (numbers a `serde_json::Value` cannot hold, such as 1e400).
    fn sign_text(payload: &str) -> String {
        use base64_like::encode_url;
        let message = format!("{}.{}", encode_url(br#"{"alg":"HS256","typ":"JWT"}"#), encode_url(payload.as_bytes()));
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("signs");
        format!("{message}.{signature}")
    }

    #[test]
    fn every_exp_has_one_documented_answer() {
        let auth = hs256(None);
        let verify = |exp: &str| auth.verify(&sign_text(&format!(r#"{{"sub":"a","exp":{exp}}}"#)));
        let hour = now() + 3600;
        for beyond in ["253402300800", "4611686018427387904", "18446744073709551615", "18446744073709551616", "1e300"] {
            assert_eq!(verify(beyond).unwrap_err(), AuthError::ExpBeyondHorizon, "{beyond}");
        }
        assert_eq!(verify("1e400").unwrap_err(), AuthError::ExpBeyondHorizon);
        for past in ["-1", "-0", "0", "0.9", "-1e300", "-1e400", "-9223372036854775808", "1e-300"] {
            assert_eq!(verify(past).unwrap_err(), AuthError::Expired, "{past}");
        }
        for not_a_number in [r#""1700000000""#, "true", "[1]", "{}"] {
            assert_eq!(verify(not_a_number).unwrap_err(), AuthError::NotANumericDate("exp"), "{not_a_number}");
        }
        assert_eq!(verify("null").unwrap_err(), AuthError::MissingClaim("exp".into()));

        let horizon = verify("253402300799").expect("the horizon itself is accepted");
        assert_eq!(horizon.expires_at, MAX_EXP);
        assert_eq!(horizon.valid_until, UNIX_EPOCH + Duration::from_secs(MAX_EXP));
        for (text, whole) in [
            (format!("{hour}.999"), hour),
            (format!("{hour}e0"), hour),
            (format!("{}e2", hour / 100), hour / 100 * 100),
        ] {
            let identity = verify(&text).expect("fractions and exponents are numbers");
            assert_eq!(identity.expires_at, whole, "{text}");
            assert_eq!(identity.valid_until, UNIX_EPOCH + Duration::from_secs(whole), "{text}");
        }
    }

    #[test]
    fn nbf_is_a_number_rounded_up_and_iat_is_not_read() {
        let auth = hs256(None);
        let hour = now() + 3600;
        let verify = |more: &str| auth.verify(&sign_text(&format!(r#"{{"sub":"a","exp":{hour},{more}}}"#)));
        for past in ["-1", "0", "0.5", "-1e400", "-18446744073709551616", &(now() - 10).to_string()] {
            assert!(verify(&format!(r#""nbf":{past}"#)).is_ok(), "nbf {past}");
        }
        for future in
            ["1e300", "1e400", "18446744073709551615", &(now() + 60).to_string(), &format!("{}.5", now() + 60)]
        {
            assert_eq!(verify(&format!(r#""nbf":{future}"#)).unwrap_err(), AuthError::NotYetValid, "nbf {future}");
        }
        for not_a_number in [r#""0""#, "false", "[0]", r#"{"n":0}"#] {
            let answer = verify(&format!(r#""nbf":{not_a_number}"#)).unwrap_err();
            assert_eq!(answer, AuthError::NotANumericDate("nbf"), "nbf {not_a_number}");
        }
        assert!(verify(r#""nbf":null"#).is_ok());
        for iat in ["1e400", "-1", "18446744073709551616", r#""yesterday""#, "null", "[]"] {
            assert_eq!(verify(&format!(r#""iat":{iat}"#)).expect("iat is not read").expires_at, hour, "iat {iat}");
        }
    }

    #[test]
    fn any_leeway_keeps_valid_until_within_the_horizon() {
        let with_leeway = |leeway| {
            Authenticator::new(JwtSettings {
                algorithm: JwtAlgorithm::Hs256,
                key: JwtKey::Secret("0123456789abcdef0123456789abcdef".into()),
                audience: None,
                issuer: None,
                leeway,
            })
            .expect("valid settings")
        };
        assert_eq!(with_leeway(Duration::from_millis(1)).leeway, 1, "rounded up");
        for leeway in [Duration::from_secs(u64::MAX), Duration::MAX] {
            let auth = with_leeway(leeway);
            assert_eq!(auth.leeway, u64::MAX);
            let identity = auth.verify(&sign_text(r#"{"sub":"a","exp":0}"#)).expect("within a huge leeway");
            assert_eq!(identity.expires_at, 0);
            assert_eq!(identity.valid_until, UNIX_EPOCH + Duration::from_secs(MAX_EXP));
            let early = sign_text(r#"{"sub":"a","exp":253402300799,"nbf":253402300799}"#);
            assert!(auth.verify(&early).is_ok());
        }
    }

    /// Just enough unpadded base64url to forge an `alg: none` token without another dependency.
    mod base64_like {
        pub fn encode_url(input: &[u8]) -> String {
            const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in input.chunks(3) {
                let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..=chunk.len() {
                    out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            out
        }
    }
}
