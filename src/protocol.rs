//! Wire protocol v1: the JSON text frames exchanged on `GET /ws`, and the close codes.
//!
//! This file is a contract (docs/protocol.md): adding a field or message is fine, changing one needs a new
//! protocol version and a note in CHANGELOG.md.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Closed because authentication failed: bad, missing or expired token, or auth timeout.
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
/// Closed because an inbound frame was over the size limit.
pub const CLOSE_TOO_LARGE: u16 = 1009;
/// Closed because nudge is shutting down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Closed because the client read nothing for `NUDGE_WRITE_TIMEOUT` (or fell behind the retention).
pub const CLOSE_TOO_SLOW: u16 = 1013;
/// Closed because a backend called `nudge.disconnect()` for this user.
pub const CLOSE_REVOKED: u16 = 4003;

/// A client request, by its `type`.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Auth {
        token: String,
    },
    Subscribe {
        topic: String,
    },
    Unsubscribe {
        topic: String,
    },
    Wakeup,
    Ping,
    Refresh {
        token: String,
    },
    /// Replay what this user missed after `since` (an event's `seq`), then carry on live. Once per connection.
    Resume {
        since: i64,
    },
}

/// A parsed frame: the request and the `ref` its reply must echo.
#[derive(Debug)]
pub struct Inbound {
    pub reference: Option<Value>,
    pub request: Request,
}

/// A frame that is not a valid request. Still carries the `ref` when one could be read.
#[derive(Debug)]
pub struct BadRequest {
    pub reference: Option<Value>,
    pub message: String,
}

pub fn parse(text: &str) -> Result<Inbound, BadRequest> {
    let bad = |reference, message: String| BadRequest { reference, message };
    let mut object: Map<String, Value> = match serde_json::from_str(text) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err(bad(None, "expected a JSON object".into())),
        Err(e) => return Err(bad(None, format!("malformed JSON: {e}"))),
    };
    let reference = object.remove("ref");
    match object.get("type") {
        None => return Err(bad(reference, "missing field `type`".into())),
        Some(Value::String(_)) => {}
        Some(_) => return Err(bad(reference, "`type` must be a string".into())),
    }
    match serde_json::from_value(Value::Object(object)) {
        Ok(request) => Ok(Inbound { reference, request }),
        // serde's own wording is precise: "unknown variant `subscrbe`, expected one of ..." / "missing field `topic`".
        Err(e) => Err(bad(reference, e.to_string().replace("variant", "type"))),
    }
}

/// What a topic must look like, the same rule as the table's `events_topic_format` constraint.
pub fn check_topic(topic: &str) -> Result<(), String> {
    let chars = topic.chars().count();
    if chars == 0 || chars > 200 {
        return Err(format!("a topic is 1 to 200 characters, this one has {chars}"));
    }
    if topic.chars().any(char::is_whitespace) {
        return Err("a topic may not contain whitespace".into());
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    TokenExpired,
    TooLarge,
    RateLimited,
    /// `nudge.disconnect()`: the connection is closed with 4003.
    Revoked,
}

/// Replies and errors, i.e. every server frame except events.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply<'a> {
    Ready {
        user: &'a str,
        expires_at: u64,
    },
    Subscribed {
        topic: &'a str,
    },
    Unsubscribed {
        topic: &'a str,
    },
    Pong,
    Refreshed {
        expires_at: u64,
    },
    /// After a `resume`: events in (since, until] were replayed; `complete: false` means some are gone
    /// (older than the retention, or too many) and the client should refetch everything.
    Resumed {
        since: i64,
        until: i64,
        replayed: usize,
        complete: bool,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
    },
}

impl Reply<'_> {
    /// The frame's text, with `ref` echoed when the request had one.
    pub fn encode(&self, reference: Option<&Value>) -> String {
        // Serializing a reply of strings and integers cannot fail; `type` stays the first key.
        let text = serde_json::to_string(self).unwrap_or_default();
        match (reference, text.strip_suffix('}')) {
            (Some(reference), Some(open)) => format!("{open},\"ref\":{reference}}}"),
            _ => text,
        }
    }
}

/// An event as clients receive it. Serialized once per event, then shared by every recipient's queue.
#[derive(Debug, Serialize)]
pub struct EventFrame<'a> {
    #[serde(rename = "type")]
    pub frame_type: &'static str,
    pub id: i64,
    /// Cluster-wide delivery order: what a client passes to `resume` after a reconnect.
    pub seq: i64,
    pub topic: &'a str,
    pub kind: &'a str,
    /// `occurred_at` in UTC with milliseconds, formatted by the database.
    pub at: &'a str,
    pub data: &'a RawValue,
}

/// Append one unmasked, final WebSocket text frame (server to client, RFC 6455 section 5.2) to `out`.
///
/// Event frames are encoded here rather than by tungstenite so that a connection writes a whole batch of them
/// with one `write()`: tungstenite writes each frame as it is fed unless its write buffer is on, and that buffer
/// keeps its capacity in every connection that ever received a burst.
pub fn encode_text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    const FIN_TEXT: u8 = 0x81;
    let len = payload.len();
    out.reserve(len + 10);
    out.push(FIN_TEXT);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_request_and_keeps_ref() {
        let inbound = parse(r#"{"type":"subscribe","topic":"post:42","ref":7}"#).expect("valid");
        assert_eq!(inbound.request, Request::Subscribe { topic: "post:42".into() });
        assert_eq!(inbound.reference, Some(json!(7)));
        assert_eq!(parse(r#"{"type":"wakeup"}"#).expect("valid").request, Request::Wakeup);
        assert_eq!(parse(r#"{"type":"ping"}"#).expect("valid").request, Request::Ping);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        assert!(parse("{").unwrap_err().message.starts_with("malformed JSON"));
        assert_eq!(parse("[1]").unwrap_err().message, "expected a JSON object");
        let unknown = parse(r#"{"type":"subscrbe","ref":"a"}"#).unwrap_err();
        assert!(unknown.message.starts_with("unknown type `subscrbe`"), "{}", unknown.message);
        assert_eq!(unknown.reference, Some(json!("a")));
        assert_eq!(parse(r#"{"type":"subscribe"}"#).unwrap_err().message, "missing field `topic`");
    }

    #[test]
    fn replies_echo_ref() {
        let text = Reply::Subscribed { topic: "t" }.encode(Some(&json!("r1")));
        let value: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value, json!({"type": "subscribed", "topic": "t", "ref": "r1"}));
    }

    #[test]
    fn topics_follow_the_table_rule() {
        assert!(check_topic("post:42").is_ok());
        assert!(check_topic("").is_err());
        assert!(check_topic("a b").is_err());
        assert!(check_topic(&"x".repeat(200)).is_ok());
        assert!(check_topic(&"x".repeat(201)).is_err());
    }

    #[test]
    fn text_frames_are_encoded_exactly_as_tungstenite_encodes_them() {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload = "x".repeat(len);
            let mut ours = Vec::new();
            super::encode_text_frame(&mut ours, payload.as_bytes());
            let mut theirs = Vec::new();
            Frame::message(payload, OpCode::Data(Data::Text), true).format(&mut theirs).unwrap();
            assert_eq!(ours, theirs, "payload of {len} bytes");
        }
    }
}
