//! Property tests: whatever a client sends (a frame, a topic, a token), the parser, the topic rules and token
//! verification do not panic and give one of their documented answers. No database, no sockets: the functions
//! themselves, a few hundred inputs each, in a few seconds.
//!
//! Signed tokens are signed with the test secret, so their claims are really examined, and their claims are
//! written as JSON text, so that numbers no `serde_json::Value` holds (2^64, 1e400) are among them.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey};
use nudge::auth::{AuthError, Authenticator, Identity, JwtAlgorithm, JwtKey, JwtSettings, TopicPatterns, MAX_EXP};
use nudge::protocol::{self, Request};
use proptest::prelude::*;
use serde_json::{Map, Value};

const SECRET: &str = "0123456789abcdef0123456789abcdef";
/// The audience and issuer of the configured authenticator.
const AUD: &str = "app";
const ISS: &str = "https://auth.example";
const LEEWAY: u64 = 30;

/// When the test started, Unix seconds. Generated times near it stay 100 s or more away from it, so the clock moving
/// during the run cannot change an answer.
static START: LazyLock<i64> = LazyLock::new(|| unix_now() as i64);

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        any::<String>().prop_map(Value::from),
        "[a-z:*]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z]{0,4}", inner), 0..4)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// A request-shaped object: each of `type`, `topic`, `token`, `since`, `ref` absent, plausible, or any JSON value.
fn request_object() -> impl Strategy<Value = Map<String, Value>> {
    let names = ["auth", "subscribe", "unsubscribe", "wakeup", "ping", "refresh", "resume", "Ping", "subscrbe", ""];
    let type_value = prop_oneof![3 => prop::sample::select(names.to_vec()).prop_map(Value::from), 1 => json_value()];
    let text = || prop_oneof![any::<String>().prop_map(Value::from), json_value()];
    let since = prop_oneof![any::<i64>().prop_map(Value::from), json_value()];
    use prop::option::of;
    (of(type_value), of(text()), of(text()), of(since), of(json_value())).prop_map(
        |(t, topic, token, since, reference)| {
            let fields = [("type", t), ("topic", topic), ("token", token), ("since", since), ("ref", reference)];
            fields.into_iter().filter_map(|(key, value)| Some((key.to_owned(), value?))).collect()
        },
    )
}

/// The text of a NumericDate claim: near the start of the test (with or without a fraction), any integer, any
/// float, the numbers at the edges, and any other JSON value.
fn time_text() -> impl Strategy<Value = String> {
    let edges = [
        "0",
        "-0",
        "0.0",
        "-1",
        "1e-400",
        "1e400",
        "-1e400",
        "1e300",
        "4611686018427387904",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775809",
        "18446744073709551615",
        "18446744073709551616",
        "253402300799",
        "253402300799.5",
        "253402300800",
        "1E+3",
    ];
    prop_oneof![
        6 => (100i64..100_000_000, any::<bool>(), 0u32..1000).prop_map(|(offset, past, millis)| {
            let at = if past { *START - offset } else { *START + offset };
            if millis == 0 { at.to_string() } else { format!("{at}.{millis:03}") }
        }),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| format!("{f:e}")),
        2 => prop::sample::select(edges.to_vec()).prop_map(str::to_owned),
        1 => json_value().prop_map(|v| v.to_string()),
    ]
}

/// The claims of one token, each as JSON text or absent.
#[derive(Debug, Clone)]
struct ClaimTexts {
    sub: Option<String>,
    exp: Option<String>,
    nbf: Option<String>,
    iat: Option<String>,
    topics: Option<String>,
    aud: Option<String>,
    iss: Option<String>,
}

impl ClaimTexts {
    /// The payload, claims in this order (serde reports a wrongly typed claim in the order it reads them).
    fn payload(&self) -> String {
        let claims = [
            ("sub", &self.sub),
            ("exp", &self.exp),
            ("nbf", &self.nbf),
            ("iat", &self.iat),
            ("topics", &self.topics),
            ("aud", &self.aud),
            ("iss", &self.iss),
        ];
        let present: Vec<String> =
            claims.iter().filter_map(|(name, text)| text.as_ref().map(|t| format!("\"{name}\":{t}"))).collect();
        format!("{{{}}}", present.join(","))
    }
}

fn claim_texts() -> impl Strategy<Value = ClaimTexts> {
    let string = |s: String| Value::from(s).to_string();
    let sub = prop_oneof![
        10 => "[a-z]{0,6}".prop_map(string),
        1 => any::<String>().prop_map(string),
        1 => json_value().prop_map(|v| v.to_string()),
    ];
    let topics = prop_oneof![
        6 => prop::collection::vec("[a-z:*]{0,6}", 0..4).prop_map(|t| Value::from(t).to_string()),
        1 => json_value().prop_map(|v| v.to_string()),
    ];
    let names = |name: &'static str| {
        let right = [format!("\"{name}\""), format!("[\"x\",\"{name}\"]")];
        let wrong = ["\"other\"", "[\"x\"]", "[]", "5", "null"].map(str::to_owned);
        prop_oneof![
            12 => prop::sample::select(right.to_vec()),
            2 => prop::sample::select(wrong.to_vec()),
            1 => json_value().prop_map(|v| v.to_string()),
        ]
    };
    use prop::option::weighted;
    (
        weighted(0.95, sub),
        weighted(0.95, time_text()),
        weighted(0.4, time_text()),
        weighted(0.4, time_text()),
        weighted(0.6, topics),
        weighted(0.9, names(AUD)),
        weighted(0.9, names(ISS)),
    )
        .prop_map(|(sub, exp, nbf, iat, topics, aud, iss)| ClaimTexts { sub, exp, nbf, iat, topics, aud, iss })
}

fn authenticator(configured: bool) -> Authenticator {
    Authenticator::new(JwtSettings {
        algorithm: JwtAlgorithm::Hs256,
        key: JwtKey::Secret(SECRET.into()),
        audience: configured.then(|| AUD.to_owned()),
        issuer: configured.then(|| ISS.to_owned()),
        leeway: Duration::from_secs(if configured { LEEWAY } else { 0 }),
    })
    .expect("valid settings")
}

static PLAIN: LazyLock<Authenticator> = LazyLock::new(|| authenticator(false));
static CONFIGURED: LazyLock<Authenticator> = LazyLock::new(|| authenticator(true));

/// An HS256 token over exactly these payload bytes, signed with the test secret.
fn sign(payload: &[u8]) -> String {
    let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let message = format!("{header}.{}", b64url(payload));
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("signs");
    format!("{message}.{signature}")
}

fn b64url(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// What every verified identity must satisfy, whatever the token said.
fn assert_bounded(identity: &Identity) {
    let horizon = UNIX_EPOCH + Duration::from_secs(MAX_EXP);
    assert!(identity.expires_at <= MAX_EXP, "expires_at {} beyond the horizon", identity.expires_at);
    assert!(identity.valid_until <= horizon, "valid_until {:?} beyond the horizon", identity.valid_until);
    // What the connection does with it (`connection::instant_of`) must not overflow.
    let left = identity.valid_until.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(std::time::Instant::now().checked_add(left).is_some());
    assert!(tokio::time::Instant::now().checked_add(left).is_some());
}

// ---------------------------------------------------------------------------------------------
// The model of token verification: the documented rule, written independently of src/auth.rs
// ---------------------------------------------------------------------------------------------

/// The value of a claim's JSON text: a number (any JSON number, as f64, ±infinity beyond f64) or another value.
enum Claim {
    Number(f64),
    Other(Value),
}

fn claim(text: &str) -> Claim {
    if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Claim::Number(text.parse().expect("JSON numbers are floats"))
    } else {
        Claim::Other(serde_json::from_str(text).expect("generated JSON"))
    }
}

/// A claim that jsonwebtoken reads as a name or a list of names (`aud`, `iss`); `Some(true)` if `name` is among them.
fn names_include(text: Option<&str>, name: &str) -> Option<bool> {
    match claim(text?) {
        Claim::Other(Value::String(s)) => Some(s == name),
        Claim::Other(Value::Array(items)) if items.iter().all(Value::is_string) => {
            Some(items.iter().any(|i| i == name))
        }
        _ => None,
    }
}

/// What `verify` must answer. `Err(list)`: one of these errors (when two claims are missing, the order jsonwebtoken
/// checks required claims in is unspecified). `Ok((expires_at, valid_until))` otherwise.
fn expected(t: &ClaimTexts, configured: bool) -> Result<(u64, u64), Vec<AuthError>> {
    let leeway = if configured { LEEWAY } else { 0 };
    let malformed = || Err(vec![AuthError::Malformed(String::new())]);
    // 1. Types, in the order the claims appear in the payload.
    if let Some(sub) = &t.sub {
        if !matches!(claim(sub), Claim::Other(Value::String(_))) {
            return malformed();
        }
    }
    for (name, text) in [("exp", &t.exp), ("nbf", &t.nbf)] {
        if let Some(Claim::Other(value)) = text.as_deref().map(claim) {
            if !value.is_null() {
                return Err(vec![AuthError::NotANumericDate(name)]);
            }
        }
    }
    if let Some(topics) = &t.topics {
        match claim(topics) {
            // A string holds patterns separated by whitespace (OAuth's `scope` style).
            Claim::Other(Value::Null | Value::String(_)) => {}
            Claim::Other(Value::Array(items)) if items.iter().all(Value::is_string) => {}
            _ => return malformed(),
        }
    }
    let Some(Claim::Other(Value::String(sub))) = t.sub.as_deref().map(claim) else {
        return Err(vec![AuthError::MissingClaim("sub".into())]);
    };
    // 2. aud and iss, when configured: a missing (or unreadable) one first, then a wrong issuer, then a wrong audience.
    if configured {
        let aud = names_include(t.aud.as_deref(), AUD);
        let iss = names_include(t.iss.as_deref(), ISS);
        match (aud, iss) {
            (None, None) => return Err(vec![AuthError::WrongAudience, AuthError::WrongIssuer]),
            (None, _) => return Err(vec![AuthError::WrongAudience]),
            (_, None) | (_, Some(false)) => return Err(vec![AuthError::WrongIssuer]),
            (Some(false), _) => return Err(vec![AuthError::WrongAudience]),
            (Some(true), Some(true)) => {}
        }
    }
    // 3. sub not empty, then the times: exp (whole seconds, fraction dropped), then nbf (rounded up).
    if sub.is_empty() {
        return Err(vec![AuthError::MissingClaim("sub".into())]);
    }
    let Some(Claim::Number(exp)) = t.exp.as_deref().map(claim) else {
        return Err(vec![AuthError::MissingClaim("exp".into())]);
    };
    let exp = exp.floor();
    if exp > MAX_EXP as f64 {
        return Err(vec![AuthError::ExpBeyondHorizon]);
    }
    let now = *START as f64;
    if exp + (leeway as f64) < now {
        return Err(vec![AuthError::Expired]);
    }
    if let Some(Claim::Number(nbf)) = t.nbf.as_deref().map(claim) {
        if nbf.ceil() > now + leeway as f64 {
            return Err(vec![AuthError::NotYetValid]);
        }
    }
    Ok((exp as u64, (exp as u64 + leeway).min(MAX_EXP)))
}

fn same_error(a: &AuthError, b: &AuthError) -> bool {
    match (a, b) {
        (AuthError::Malformed(_), AuthError::Malformed(_)) => true,
        _ => a == b,
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// The request `parse` must produce from an object, if any: the documented message types and their fields.
fn expected_request(object: &Map<String, Value>) -> Option<Request> {
    let string = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_owned);
    Some(match object.get("type")?.as_str()? {
        "auth" => Request::Auth { token: string("token")? },
        "refresh" => Request::Refresh { token: string("token")? },
        "subscribe" => Request::Subscribe { topic: string("topic")? },
        "unsubscribe" => Request::Unsubscribe { topic: string("topic")? },
        "resume" => Request::Resume { since: object.get("since")?.as_i64()? },
        "wakeup" => Request::Wakeup,
        "ping" => Request::Ping,
        _ => return None,
    })
}

proptest! {
    #![proptest_config(config(512))]

    /// A request-shaped object parses into exactly the request it describes, or is refused with a message; either
    /// way its `ref` comes back as it was.
    #[test]
    fn parse_answers_every_object_as_documented(object in request_object()) {
        let text = Value::Object(object).to_string();
        // As serde_json reads it back: without its `float_roundtrip` feature a float may come back one ulp off.
        let object: Map<String, Value> = serde_json::from_str(&text).expect("JSON");
        let reference = object.get("ref").cloned();
        match (protocol::parse(&text), expected_request(&object)) {
            (Ok(inbound), Some(request)) => {
                prop_assert_eq!(inbound.request, request);
                prop_assert_eq!(inbound.reference, reference);
            }
            (Err(bad), None) => {
                prop_assert!(!bad.message.is_empty());
                prop_assert_eq!(&bad.reference, &reference);
                match object.get("type") {
                    None => prop_assert_eq!(bad.message, "missing field `type`"),
                    Some(Value::String(_)) => {}
                    Some(_) => prop_assert_eq!(bad.message, "`type` must be a string"),
                }
            }
            (got, want) => prop_assert!(false, "{text}: parsed {got:?}, expected {want:?}"),
        }
    }

    /// Any text at all: a request or a `bad_request` with a message, never a panic.
    #[test]
    fn parse_survives_any_text(text in any::<String>()) {
        if let Err(bad) = protocol::parse(&text) {
            prop_assert!(!bad.message.is_empty());
        }
    }

    /// Valid requests cut short or with one character put anywhere: still a request or a `bad_request`.
    #[test]
    fn parse_survives_damaged_requests(object in request_object(), at in any::<prop::sample::Index>(), c in any::<char>(), cut in any::<bool>()) {
        let mut text = Value::Object(object).to_string();
        let at = at.index(text.len() + 1);
        let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        if cut { text.truncate(at) } else { text.insert(at, c) }
        if let Err(bad) = protocol::parse(&text) {
            prop_assert!(!bad.message.is_empty());
        }
    }

    /// Nesting as deep as a frame allows is refused by serde_json's depth limit, not by a stack overflow.
    #[test]
    fn parse_survives_deep_nesting(depth in 0usize..20_000, object in any::<bool>()) {
        let (open, close) = if object { ("{\"a\":", "}") } else { ("[", "]") };
        let text = format!("{{\"type\":{}1{}}}", open.repeat(depth), close.repeat(depth));
        let bad = protocol::parse(&text).expect_err("type is never a string");
        prop_assert!(!bad.message.is_empty());
    }

    /// A topic is 1 to 200 characters (not bytes) without whitespace: exactly those pass.
    #[test]
    fn check_topic_is_the_documented_rule(
        topic in prop_oneof![any::<String>(), "[a-z:]{195,205}", "[a-z: \t]{0,8}", prop::collection::vec(any::<char>(), 190..210).prop_map(String::from_iter)]
    ) {
        let chars = topic.chars().count();
        let valid = (1..=200).contains(&chars) && !topic.chars().any(char::is_whitespace);
        match protocol::check_topic(&topic) {
            Ok(()) => prop_assert!(valid, "{topic:?} accepted"),
            Err(message) => prop_assert!(!valid && !message.is_empty(), "{topic:?} refused: {message}"),
        }
    }

    /// `*` allows every topic; `p*` allows exactly the topics that start with `p` (whatever `p` holds, a `*`
    /// included: only the last `*` is special); a pattern not ending in `*` allows only itself; a list allows what
    /// one of its patterns allows, and an empty list nothing.
    #[test]
    fn topic_patterns_are_exact_topics_or_prefixes(
        patterns in prop::collection::vec(prop_oneof!["[a:*]{0,4}", any::<String>()], 0..4),
        prefix in prop_oneof!["[a:*]{0,4}", any::<String>()],
        suffix in prop_oneof!["[a:*]{0,3}", any::<String>()],
        other in prop_oneof!["[a:*]{0,6}", any::<String>()],
    ) {
        let one = |p: &str| TopicPatterns::new([p.to_owned()]);
        let topic = format!("{prefix}{suffix}");
        for t in [&topic, &other, &prefix] {
            prop_assert!(one("*").allows(t));
            prop_assert_eq!(one(&format!("{prefix}*")).allows(t), t.starts_with(&prefix));
            if !prefix.ends_with('*') {
                prop_assert_eq!(one(&prefix).allows(t), *t == prefix);
            }
            let any_one = patterns.iter().any(|p| one(p).allows(t));
            prop_assert_eq!(TopicPatterns::new(patterns.clone()).allows(t), any_one);
            prop_assert!(!TopicPatterns::default().allows(t));
        }
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// Signed tokens with any claims get exactly the documented answer (`expected`), with and without a configured
    /// audience, issuer and leeway; `iat` plays no part; a verified identity stays within the horizon.
    #[test]
    fn verify_answers_any_signed_claims_as_documented(claims in claim_texts(), configured in any::<bool>()) {
        let payload = claims.payload();
        let auth = if configured { &*CONFIGURED } else { &*PLAIN };
        let got = auth.verify(&sign(payload.as_bytes()));
        match (&got, expected(&claims, configured)) {
            (Ok(identity), Ok((expires_at, valid_until))) => {
                assert_bounded(identity);
                prop_assert_eq!(identity.expires_at, expires_at, "{}", payload);
                prop_assert_eq!(identity.valid_until, UNIX_EPOCH + Duration::from_secs(valid_until), "{}", payload);
                let sub: String = serde_json::from_str(claims.sub.as_deref().unwrap_or_default()).unwrap();
                prop_assert_eq!(&*identity.user, sub.as_str());
                let topics: Vec<String> = match claims.topics.as_deref().map(|t| serde_json::from_str(t).unwrap()) {
                    Some(Value::String(words)) => words.split_whitespace().map(str::to_owned).collect(),
                    Some(Value::Array(items)) => items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect(),
                    _ => Vec::new(),
                };
                for topic in topics {
                    prop_assert!(identity.topics.allows(&topic), "{} does not allow {}", payload, topic);
                }
            }
            (Err(error), Err(allowed)) => {
                prop_assert!(allowed.iter().any(|a| same_error(a, error)), "{payload}: {error:?}, expected one of {allowed:?}");
                prop_assert!(!error.to_string().is_empty());
            }
            (got, want) => prop_assert!(false, "{payload}: got {got:?}, expected {want:?}"),
        }
    }

    /// Whatever `exp`, `nbf` and `iat` hold: a time-claim answer (never a panic, never "malformed"), and a
    /// verified identity within the horizon.
    #[test]
    fn verify_answers_any_time_claims(
        exp in prop::option::weighted(0.95, time_text()),
        nbf in prop::option::of(time_text()),
        iat in prop::option::of(time_text()),
        configured in any::<bool>(),
    ) {
        let (aud, iss) = (Some(format!("\"{AUD}\"")), Some(format!("\"{ISS}\"")));
        let claims = ClaimTexts { sub: Some("\"alice\"".into()), exp, nbf, iat, topics: None, aud, iss };
        let auth = if configured { &*CONFIGURED } else { &*PLAIN };
        match auth.verify(&sign(claims.payload().as_bytes())) {
            Ok(identity) => assert_bounded(&identity),
            Err(error) => prop_assert!(
                matches!(
                    error,
                    AuthError::Expired
                        | AuthError::NotYetValid
                        | AuthError::ExpBeyondHorizon
                        | AuthError::NotANumericDate(_)
                ) || error == AuthError::MissingClaim("exp".into()),
                "{}: {:?}",
                claims.payload(),
                error
            ),
        }
    }

    /// Any bytes as the payload, correctly signed: an answer, never a panic.
    #[test]
    fn verify_survives_any_signed_payload(payload in prop::collection::vec(any::<u8>(), 0..80), configured in any::<bool>()) {
        let auth = if configured { &*CONFIGURED } else { &*PLAIN };
        if let Ok(identity) = auth.verify(&sign(&payload)) {
            assert_bounded(&identity);
        }
    }

    /// Any string, and any three (or two, or four) base64url-looking parts: refused, never a panic.
    #[test]
    fn verify_refuses_any_unsigned_string(
        text in prop_oneof![any::<String>(), prop::collection::vec("[A-Za-z0-9_=+/-]{0,40}", 0..5).prop_map(|p| p.join("."))],
        configured in any::<bool>(),
    ) {
        let auth = if configured { &*CONFIGURED } else { &*PLAIN };
        let error = auth.verify(&text).expect_err("no valid signature");
        prop_assert!(!error.to_string().is_empty());
    }
}
