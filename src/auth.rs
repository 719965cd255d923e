//! Authentication: JWTs issued by the application's backend.
//!
//! The algorithm is fixed by configuration and jsonwebtoken's `Validation` is set up deliberately: its defaults
//! (60 s leeway, `nbf` unchecked, `aud` checked only when present) are not what a relay that hands out live data
//! should accept. `Identity` is what a connection keeps: the user, the expiry, the topics it may subscribe to.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

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
    /// The token's `exp` (Unix seconds), as told to the client in `ready` / `refreshed`.
    pub expires_at: u64,
    /// When the connection must be closed with `token_expired`: `exp` plus the configured leeway.
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
    exp: u64,
    #[serde(default)]
    topics: Option<Vec<String>>,
}

/// Verifies tokens with the one configured key and algorithm.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    algorithm: JwtAlgorithm,
    leeway: Duration,
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
        validation.leeway = settings.leeway.as_secs() + u64::from(settings.leeway.subsec_nanos() > 0);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
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

        let leeway = Duration::from_secs(validation.leeway);
        Ok(Authenticator { key, validation, algorithm, leeway })
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| self.explain(e))?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::MissingClaim("sub".into()));
        }
        Ok(Identity {
            user: claims.sub.into(),
            expires_at: claims.exp,
            valid_until: UNIX_EPOCH + Duration::from_secs(claims.exp) + self.leeway,
            topics: TopicPatterns::new(claims.topics.unwrap_or_default()),
        })
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
            // Our claims struct requires `sub` and `exp`, so serde reports them missing before jsonwebtoken does.
            ErrorKind::Json(e) => match e.to_string().split('`').nth(1) {
                Some(field) if e.to_string().starts_with("missing field") => AuthError::MissingClaim(field.to_owned()),
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
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let claims = IssuedClaims {
        sub: request.sub,
        iat: now,
        exp: now + request.ttl.as_secs().max(1),
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
