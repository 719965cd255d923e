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
//!
//! The key is one secret or PEM public key, or the issuer's published keys (`jwks.rs`): then a token's `kid`
//! header picks the key and its `alg` must be one that key verifies ([`Authenticator::verify_waiting`] fetches the
//! set again, bounded, for a key id nudge does not have yet). The topic patterns come from the claim
//! `NUDGE_JWT_TOPICS_CLAIM` names ([`TopicsClaim`]).

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::jwks::{Algorithms, Jwks, Lookup, Refresh, Staleness};

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
    #[value(name = "RS384")]
    Rs384,
    #[value(name = "RS512")]
    Rs512,
    #[value(name = "PS256")]
    Ps256,
    #[value(name = "PS384")]
    Ps384,
    #[value(name = "PS512")]
    Ps512,
    #[value(name = "ES256")]
    Es256,
    #[value(name = "ES384")]
    Es384,
    #[value(name = "EdDSA")]
    EdDsa,
}

impl JwtAlgorithm {
    pub fn jsonwebtoken(self) -> Algorithm {
        match self {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Rs384 => Algorithm::RS384,
            JwtAlgorithm::Rs512 => Algorithm::RS512,
            JwtAlgorithm::Ps256 => Algorithm::PS256,
            JwtAlgorithm::Ps384 => Algorithm::PS384,
            JwtAlgorithm::Ps512 => Algorithm::PS512,
            JwtAlgorithm::Es256 => Algorithm::ES256,
            JwtAlgorithm::Es384 => Algorithm::ES384,
            JwtAlgorithm::EdDsa => Algorithm::EdDSA,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Rs384 => "RS384",
            JwtAlgorithm::Rs512 => "RS512",
            JwtAlgorithm::Ps256 => "PS256",
            JwtAlgorithm::Ps384 => "PS384",
            JwtAlgorithm::Ps512 => "PS512",
            JwtAlgorithm::Es256 => "ES256",
            JwtAlgorithm::Es384 => "ES384",
            JwtAlgorithm::EdDsa => "EdDSA",
        }
    }
}

#[derive(Clone)]
pub enum JwtKey {
    Secret(String),
    PublicKeyPem(PathBuf),
    /// The issuer's published keys. `only` (`NUDGE_JWT_ALGORITHM`, when set) narrows the algorithms tokens may
    /// use; `JwtSettings::algorithm` is not read.
    Jwks {
        jwks: Arc<Jwks>,
        only: Option<JwtAlgorithm>,
    },
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
    #[error(
        "no JWT key: set NUDGE_JWT_SECRET (HS256), NUDGE_JWT_PUBLIC_KEY (RS256, ES256, EdDSA...) or NUDGE_JWKS_URL"
    )]
    Missing,
    #[error("set either NUDGE_JWT_SECRET or NUDGE_JWT_PUBLIC_KEY, not both")]
    Both,
    #[error("NUDGE_JWKS_URL and {0} exclude each other: set one of them")]
    JwksAnd(&'static str),
    #[error("NUDGE_JWT_ALGORITHM=HS256 cannot be used with NUDGE_JWKS_URL, which publishes public keys")]
    HmacFromJwks,
    #[error(
        "NUDGE_JWKS_URL needs NUDGE_JWT_ISSUER or NUDGE_JWT_AUDIENCE: a key set may sign tokens of many tenants \
         (Firebase, Entra ID), and without them nudge would accept every one"
    )]
    JwksUnpinned,
    #[error(transparent)]
    Jwks(#[from] crate::jwks::JwksError),
    #[error("NUDGE_JWT_TOPICS_CLAIM must be 1 to 256 characters and not sub, exp or nbf")]
    BadTopicsClaim,
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
    /// With a JWKS: `alg` is HS*, `none` or one nudge does not verify.
    #[error(
        "token algorithm is not one nudge accepts (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
    )]
    UnsupportedAlgorithm,
    #[error("token header has no kid (key id): nudge finds the issuer's key by it")]
    NoKeyId,
    #[error("token algorithm is not one key {kid} allows ({allowed})")]
    KeyAlgorithm { kid: String, allowed: String },
    #[error("token key id {kid} is not among the issuer's keys: {detail}")]
    UnknownKey { kid: String, detail: String },
    #[error("no issuer keys yet: nudge has not been able to fetch the issuer's key set")]
    NoKeys,
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

/// Where the topic patterns are in a token (`NUDGE_JWT_TOPICS_CLAIM`, default `topics`).
///
/// The name is first looked up as one top-level claim, whole: `topics`, `https://example.com/topics` and
/// `app.topics` all name a claim of that exact name if the token has one. Otherwise a name with dots is a path:
/// at each level (the token's claims, then the object found), the longest member name that is the rest of the
/// path, or the rest of the path up to one of its dots, is taken, and the path goes on inside its value
/// (`app_metadata.topics`, `https://example.com/claims.topics`). A path that leads nowhere (a member missing, a
/// value on the way that is not an object) means no topics, like a missing claim.
///
/// The value: an array of strings (each one pattern), a string (patterns separated by whitespace, like OAuth's
/// `scope`), or `null` (none). Anything else refuses the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicsClaim {
    name: Box<str>,
}

impl Default for TopicsClaim {
    fn default() -> Self {
        TopicsClaim { name: "topics".into() }
    }
}

impl TopicsClaim {
    /// The claims whose names nudge reads itself, which therefore cannot hold topics.
    const RESERVED: [&'static str; 3] = ["sub", "exp", "nbf"];

    pub fn new(name: &str) -> Result<TopicsClaim, KeyError> {
        if name.is_empty() || name.chars().count() > 256 || Self::RESERVED.contains(&name) {
            return Err(KeyError::BadTopicsClaim);
        }
        Ok(TopicsClaim { name: name.into() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A top-level claim that may start the path: its name followed by a dot begins the configured name.
    fn starts_path(&self, claim: &str) -> bool {
        self.name.len() > claim.len() && self.name.starts_with(claim) && self.name.as_bytes()[claim.len()] == b'.'
    }

    /// The value the path leads to, given the top-level claims that may start it (`starts_path`).
    fn follow<'v>(&self, starts: &'v [(String, Value)]) -> Option<&'v Value> {
        let top = |name: &str| starts.iter().find(|(claim, _)| claim == name).map(|(_, value)| value);
        for (dot, _) in self.name.rmatch_indices('.') {
            if let Some(value) = top(&self.name[..dot]) {
                return descend(value, &self.name[dot + 1..]);
            }
        }
        None
    }

    /// The patterns of a found value; `Err` names the claim for a value of the wrong type.
    fn patterns(&self, value: Option<&Value>) -> Result<Option<Vec<String>>, String> {
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(words)) => Ok(Some(words.split_whitespace().map(str::to_owned).collect())),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.wrong_type()),
            Some(_) => Err(self.wrong_type()),
        }
    }

    fn wrong_type(&self) -> String {
        format!("token claim {} is not an array of strings or a space-separated string", self.name)
    }
}

/// `rest` of a topics path inside `value`: the member named `rest`, else the longest member named by `rest` up to
/// one of its dots, and on from there.
fn descend<'v>(value: &'v Value, rest: &str) -> Option<&'v Value> {
    let object = value.as_object()?;
    if let Some(found) = object.get(rest) {
        return Some(found);
    }
    for (dot, _) in rest.rmatch_indices('.') {
        if let Some(inner) = object.get(&rest[..dot]) {
            return descend(inner, &rest[dot + 1..]);
        }
    }
    None
}

thread_local! {
    /// The topics claim of the `verify` running on this thread. jsonwebtoken deserializes the claims itself (no
    /// seed can be passed), and `Claims` must read the topics while it reads the rest, so that a wrongly typed one
    /// is reported in the order serde meets it (tests/properties.rs). Set only around the synchronous decode.
    static TOPICS_CLAIM: RefCell<TopicsClaim> = RefCell::new(TopicsClaim::default());
}

/// What `verify` reads of the claims: `sub`, the time claims (`numeric_date`, judged by `check_times`; JSON `null`
/// counts as absent) and the topics ([`TopicsClaim`]). Other claims are skipped unread, except those that may
/// start a topics path.
struct Claims {
    sub: String,
    exp: Option<f64>,
    nbf: Option<f64>,
    topics: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for Claims {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ClaimsVisitor)
    }
}

struct ClaimsVisitor;

impl<'de> Visitor<'de> for ClaimsVisitor {
    type Value = Claims;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Claims, A::Error> {
        use serde::de::Error;
        let claim = TOPICS_CLAIM.with(|c| c.borrow().clone());
        let (mut sub, mut exp, mut nbf, mut topics) = (None, None, None, None);
        let mut starts = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "sub" if sub.is_some() => return Err(A::Error::duplicate_field("sub")),
                "sub" => sub = Some(map.next_value::<String>()?),
                "exp" if exp.is_some() => return Err(A::Error::duplicate_field("exp")),
                "exp" => exp = Some(map.next_value_seed(NumericDate("exp"))?),
                "nbf" if nbf.is_some() => return Err(A::Error::duplicate_field("nbf")),
                "nbf" => nbf = Some(map.next_value_seed(NumericDate("nbf"))?),
                name if *name == *claim.name && topics.is_some() => {
                    return Err(A::Error::custom(format!("duplicate claim {name}")));
                }
                name if *name == *claim.name => {
                    let value = map.next_value::<Value>()?;
                    topics = Some(claim.patterns(Some(&value)).map_err(A::Error::custom)?);
                }
                name if claim.starts_path(name) => starts.push((key, map.next_value::<Value>()?)),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let topics = match topics {
            Some(topics) => topics,
            None => claim.patterns(claim.follow(&starts)).map_err(A::Error::custom)?,
        };
        Ok(Claims {
            sub: sub.ok_or_else(|| A::Error::missing_field("sub"))?,
            exp: exp.flatten(),
            nbf: nbf.flatten(),
            topics,
        })
    }
}

/// A time claim, read by `numeric_date`.
struct NumericDate(&'static str);

impl<'de> DeserializeSeed<'de> for NumericDate {
    type Value = Option<f64>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Option<f64>, D::Error> {
        numeric_date(deserializer, self.0)
    }
}

/// The message of a time claim that is not a JSON number; `explain` finds it in serde's error.
fn not_a_numeric_date(claim: &'static str) -> String {
    AuthError::NotANumericDate(claim).to_string()
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

/// Verifies tokens with the configured key (or the issuer's published keys) and algorithm.
pub struct Authenticator {
    verifier: Verifier,
    /// Clock leeway for `exp` and `nbf`, in whole seconds (rounded up).
    leeway: u64,
    topics_claim: TopicsClaim,
}

enum Verifier {
    /// One secret or public key, one algorithm.
    Fixed { key: DecodingKey, validation: Box<Validation>, algorithm: JwtAlgorithm },
    /// The issuer's published keys, each pinned to its algorithms; one `Validation` per algorithm tokens may use.
    Jwks { jwks: Arc<Jwks>, only: Option<JwtAlgorithm>, validations: Vec<(Algorithm, Validation)> },
}

impl Authenticator {
    pub fn new(settings: JwtSettings) -> Result<Self, KeyError> {
        let leeway = settings.leeway.as_secs().saturating_add(u64::from(settings.leeway.subsec_nanos() > 0));
        let verifier = match &settings.key {
            JwtKey::Jwks { jwks, only } => {
                if *only == Some(JwtAlgorithm::Hs256) {
                    return Err(KeyError::HmacFromJwks);
                }
                if settings.audience.is_none() && settings.issuer.is_none() {
                    return Err(KeyError::JwksUnpinned);
                }
                let allowed = only.map_or(Algorithms::ALL, |a| Algorithms::of(a.jsonwebtoken()));
                let validations = allowed.iter().map(|alg| (alg, validation(&settings, alg))).collect();
                Verifier::Jwks { jwks: jwks.clone(), only: *only, validations }
            }
            key => {
                let algorithm = settings.algorithm;
                let key = fixed_key(key, algorithm)?;
                let validation = Box::new(validation(&settings, algorithm.jsonwebtoken()));
                Verifier::Fixed { key, validation, algorithm }
            }
        };
        Ok(Authenticator { verifier, leeway, topics_claim: TopicsClaim::default() })
    }

    /// Read the topic patterns from this claim instead of `topics`.
    pub fn with_topics_claim(mut self, claim: TopicsClaim) -> Self {
        self.topics_claim = claim;
        self
    }

    /// The issuer's key set, when tokens are verified with one: `node.rs` runs its refresh.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.verifier {
            Verifier::Jwks { jwks, .. } => Some(jwks),
            Verifier::Fixed { .. } => None,
        }
    }

    /// Verify with the key at hand: never waits. With a key set, a token naming a key id nudge does not have is
    /// refused ([`AuthError::UnknownKey`]) without fetching the set again; [`Authenticator::verify_waiting`] does.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        match &self.verifier {
            Verifier::Fixed { key, validation, .. } => self.decode(token, key, validation),
            Verifier::Jwks { jwks, .. } => self.verify_with_keys(token, jwks, None),
        }
    }

    /// Verify; with a key set, a token naming a key id nudge does not have makes it fetch the set again (shared
    /// with every other such token, at most once per `NUDGE_JWKS_MIN_INTERVAL`) and wait for it, at most
    /// [`crate::jwks::UNKNOWN_KEY_WAIT`]: a key the issuer just published is found without a restart.
    pub async fn verify_waiting(&self, token: &str) -> Result<Identity, AuthError> {
        let Verifier::Jwks { jwks, .. } = &self.verifier else {
            return self.verify(token);
        };
        match self.verify_with_keys(token, jwks, None) {
            Err(AuthError::UnknownKey { .. } | AuthError::NoKeys) => {
                let refresh = jwks.refresh_for_unknown_key().await;
                self.verify_with_keys(token, jwks, Some(refresh))
            }
            other => other,
        }
    }

    /// The header picks the key: `alg` must be one nudge verifies (and the configured one, if any), `kid` must
    /// name a cached key that verifies that `alg`.
    fn verify_with_keys(&self, token: &str, jwks: &Jwks, refresh: Option<Refresh>) -> Result<Identity, AuthError> {
        let Verifier::Jwks { only, validations, .. } = &self.verifier else {
            unreachable!("called with a key set only")
        };
        let header = jsonwebtoken::decode_header(token).map_err(|e| match self.explain(e) {
            AuthError::WrongAlgorithm(_) if only.is_none() => AuthError::UnsupportedAlgorithm,
            other => other,
        })?;
        let Some((alg, validation)) = validations.iter().find(|(alg, _)| *alg == header.alg) else {
            return Err(match only {
                Some(only) if Algorithms::ALL.contains(header.alg) => AuthError::WrongAlgorithm(only.name()),
                _ => AuthError::UnsupportedAlgorithm,
            });
        };
        let kid = header.kid.ok_or(AuthError::NoKeyId)?;
        let keys = jwks.current();
        match keys.find(&kid, *alg) {
            Lookup::Found(key) => self.decode(token, &key.key, validation),
            Lookup::WrongAlgorithm(allowed) => Err(AuthError::KeyAlgorithm {
                kid: shown(&kid),
                allowed: allowed.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", "),
            }),
            Lookup::Missing if keys.is_empty() => Err(AuthError::NoKeys),
            Lookup::Missing => Err(AuthError::UnknownKey { kid: shown(&kid), detail: missing(jwks, refresh) }),
        }
    }

    fn decode(&self, token: &str, key: &DecodingKey, validation: &Validation) -> Result<Identity, AuthError> {
        let previous = TOPICS_CLAIM.with(|c| c.replace(self.topics_claim.clone()));
        let decoded = jsonwebtoken::decode::<Claims>(token, key, validation);
        TOPICS_CLAIM.with(|c| c.replace(previous));
        let claims = decoded.map_err(|e| self.explain(e))?.claims;
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
        match &self.verifier {
            Verifier::Fixed { algorithm, .. } => algorithm.name(),
            Verifier::Jwks { only: Some(only), .. } => only.name(),
            Verifier::Jwks { only: None, .. } => "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA",
        }
    }
}

/// The key of a fixed-key configuration.
fn fixed_key(key: &JwtKey, algorithm: JwtAlgorithm) -> Result<DecodingKey, KeyError> {
    match (key, algorithm) {
        (JwtKey::Secret(secret), JwtAlgorithm::Hs256) => {
            if secret.is_empty() {
                return Err(KeyError::EmptySecret);
            }
            if secret.len() < 32 {
                tracing::warn!("NUDGE_JWT_SECRET is shorter than 32 bytes; use a long random secret");
            }
            Ok(DecodingKey::from_secret(secret.as_bytes()))
        }
        (JwtKey::Secret(_), other) => Err(KeyError::SecretForAsymmetric(other)),
        (JwtKey::PublicKeyPem(_), JwtAlgorithm::Hs256) => Err(KeyError::PublicKeyForHmac),
        (JwtKey::PublicKeyPem(path), _) => {
            let pem = std::fs::read(path).map_err(|source| KeyError::Unreadable { path: path.clone(), source })?;
            let parsed = match algorithm.jsonwebtoken() {
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                _ => DecodingKey::from_rsa_pem(&pem),
            };
            parsed.map_err(|e| KeyError::BadPem { path: path.clone(), algorithm, reason: e.to_string() })
        }
        (JwtKey::Jwks { .. }, _) => unreachable!("a key set is not a fixed key"),
    }
}

/// jsonwebtoken's `Validation`, set up deliberately for `alg`: the time claims are `check_times`' (module doc),
/// `sub` is required, and `aud` / `iss` when configured.
fn validation(settings: &JwtSettings, alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = 0;
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
    validation
}

/// A token's `kid` as a message shows it: quoted, at most 64 characters.
fn shown(kid: &str) -> String {
    match kid.char_indices().nth(64) {
        Some((cut, _)) => format!("{:?}...", &kid[..cut]),
        None => format!("{kid:?}"),
    }
}

/// Why a key id was not found, as the client is told (the URL and network errors stay in the log).
fn missing(jwks: &Jwks, refresh: Option<Refresh>) -> String {
    match (refresh, jwks.staleness()) {
        (Some(Refresh::TooSoon), _) => format!(
            "the key set was fetched less than {:?} ago, and is fetched again for unknown key ids at most that often",
            jwks.min_interval()
        ),
        (Some(Refresh::TimedOut), _) => {
            format!("fetching the key set again took longer than {:?}", crate::jwks::UNKNOWN_KEY_WAIT)
        }
        (_, Staleness::LastFetchFailed) => "the key set could not be fetched again; its cached keys were used".into(),
        (Some(Refresh::Finished), _) => "not in the key set fetched again just now".into(),
        (None, _) => "not among the cached keys".into(),
    }
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
    issue_token_with(secret, request, &TopicsClaim::default())
}

/// `issue_token`, the topics under `claim`'s name as one top-level claim (which `verify` tries first).
pub fn issue_token_with(
    secret: &str,
    request: &TokenRequest<'_>,
    claim: &TopicsClaim,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = unix_now();
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), request.sub.into());
    claims.insert("iat".into(), now.into());
    // An absurd `--ttl` gets the latest `exp` nudge accepts rather than an overflow.
    claims.insert("exp".into(), now.saturating_add(request.ttl.as_secs().max(1)).min(MAX_EXP).into());
    if !request.topics.is_empty() {
        claims.insert(claim.name().into(), request.topics.into());
    }
    if let Some(aud) = request.audience {
        claims.insert("aud".into(), aud.into());
    }
    if let Some(iss) = request.issuer {
        claims.insert("iss".into(), iss.into());
    }
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

    fn topics_from(claim: &str, payload: serde_json::Value) -> Result<Vec<String>, AuthError> {
        let auth = hs256(None).with_topics_claim(TopicsClaim::new(claim).expect("a valid claim name"));
        let mut claims = json!({"sub": "a", "exp": now() + 60});
        claims.as_object_mut().unwrap().extend(payload.as_object().unwrap().clone());
        let identity = auth.verify(&sign(Algorithm::HS256, claims))?;
        let allowed = ["x", "y", "post:*", "z"].into_iter().filter(|t| identity.topics.allows(t));
        Ok(allowed.map(str::to_owned).collect())
    }

    #[test]
    fn the_topics_claim_is_an_exact_claim_first_then_a_dot_path() {
        let x = || json!(["x"]);
        assert_eq!(topics_from("topics", json!({"topics": ["x", "y"]})).unwrap(), ["x", "y"]);
        assert_eq!(topics_from("perms", json!({"topics": x()})).unwrap(), Vec::<String>::new());
        let url = "https://example.com/topics";
        assert_eq!(topics_from(url, json!({ url: x() })).unwrap(), ["x"]);
        // A claim named with dots, whole, wins over the path.
        assert_eq!(topics_from("a.b", json!({"a.b": ["x"], "a": {"b": ["y"]}})).unwrap(), ["x"]);
        assert_eq!(topics_from("a.b", json!({"a": {"b": ["y"]}})).unwrap(), ["y"]);
        assert_eq!(topics_from("app_metadata.topics", json!({"app_metadata": {"topics": x()}})).unwrap(), ["x"]);
        let deep = json!({"https://example.com/claims": {"nudge": {"topics": ["z"]}}});
        assert_eq!(topics_from("https://example.com/claims.nudge.topics", deep).unwrap(), ["z"]);
        // At each level the longest member that fits is taken, and the path goes on only there.
        let both = json!({"a": {"b.c": ["x"]}, "a.b": {"c": ["y"]}});
        assert_eq!(topics_from("a.b.c", both).unwrap(), ["y"]);
        let inner = json!({"a": {"b.c": {"d": ["x"]}, "b": {"c.d": ["y"]}}});
        assert_eq!(topics_from("a.b.c.d", inner).unwrap(), ["x"]);
        // A path that leads nowhere is no topics.
        for nowhere in [json!({}), json!({"a": 5}), json!({"a": {"c": ["x"]}}), json!({"a": ["x"]})] {
            assert_eq!(topics_from("a.b", nowhere.clone()).unwrap(), Vec::<String>::new(), "{nowhere}");
        }
    }

    #[test]
    fn the_topics_claim_is_an_array_of_strings_a_string_of_words_or_null() {
        assert_eq!(topics_from("topics", json!({"topics": "x  post:*\ty"})).unwrap(), ["x", "y", "post:*"]);
        assert_eq!(topics_from("topics", json!({"topics": ""})).unwrap(), Vec::<String>::new());
        assert_eq!(topics_from("topics", json!({"topics": null})).unwrap(), Vec::<String>::new());
        assert_eq!(topics_from("a.b", json!({"a": {"b": "x z"}})).unwrap(), ["x", "z"]);
        for wrong in [json!(5), json!(true), json!({"x": 1}), json!(["x", 1]), json!([null])] {
            for (claim, payload) in [("topics", json!({ "topics": wrong })), ("a.b", json!({"a": {"b": wrong}}))] {
                match topics_from(claim, payload.clone()) {
                    Err(AuthError::Malformed(message)) => {
                        assert!(message.contains(&format!("token claim {claim} is not an array")), "{message}")
                    }
                    other => panic!("{payload}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_topics_claim_name_is_short_and_not_one_nudge_reads_itself() {
        for bad in ["", "sub", "exp", "nbf", &"x".repeat(257)] {
            assert!(TopicsClaim::new(bad).is_err(), "{bad:?}");
        }
        assert!(TopicsClaim::new(&"x".repeat(256)).is_ok());
        assert!(TopicsClaim::new("iss").is_ok());
    }

    #[test]
    fn issued_tokens_carry_topics_under_the_configured_claim() {
        let topics = vec!["post:*".to_owned()];
        let request =
            TokenRequest { sub: "alice", topics: &topics, ttl: Duration::from_secs(60), audience: None, issuer: None };
        let claim = TopicsClaim::new("app.topics").unwrap();
        let token = issue_token_with("0123456789abcdef0123456789abcdef", &request, &claim).expect("signs");
        let identity = hs256(None).with_topics_claim(claim).verify(&token).expect("verifies");
        assert!(identity.topics.allows("post:1"));
        assert!(!hs256(None).verify(&token).expect("verifies").topics.allows("post:1"));
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
