//! The demo's own backend: what an application's API would do, reduced to a live comment thread.
//!
//! Adding a comment inserts the comment and its nudge event in one transaction, exactly as the README's "Publishing events" tells
//! backends to; the page then fetches new comments from here, never from the hint. These routes exist only under
//! `nudge demo`, token issuing included.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde::Deserialize;
use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

use crate::auth::{issue_token, TokenRequest};

/// The demo application's table, beside nudge's.
pub const SCHEMA: &str = r#"
CREATE SCHEMA IF NOT EXISTS demo;
CREATE TABLE IF NOT EXISTS demo.comments (
    id         bigserial PRIMARY KEY,
    post_id    bigint NOT NULL,
    author     text NOT NULL,
    body       text NOT NULL CHECK (char_length(body) BETWEEN 1 AND 2000),
    created_at timestamptz NOT NULL DEFAULT now()
);
"#;

const PAGE: &str = include_str!("page.html");
const CLIENT: &str = include_str!("../../clients/js/src/index.js");

#[derive(Deserialize)]
struct TokenBody {
    user: String,
}

#[derive(Deserialize)]
struct CommentBody {
    author: String,
    body: String,
}

#[derive(Deserialize)]
struct NudgeBody {
    from: String,
    to: String,
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: String,
}

#[derive(Deserialize)]
struct After {
    #[serde(default)]
    after: i64,
}

pub fn routes(pool: Pool, secret: Arc<str>) -> BoxedFilter<(Response,)> {
    let with_pool = warp::any().map(move || pool.clone());

    let page = warp::path::end().and(warp::get()).map(|| warp::reply::html(PAGE).into_response());
    let client = warp::path!("demo" / "nudge-client.js")
        .and(warp::get())
        .map(|| warp::reply::with_header(CLIENT, "content-type", "text/javascript; charset=utf-8").into_response());
    let token =
        warp::path!("demo" / "token").and(warp::post()).and(json_body::<TokenBody>()).map(move |body: TokenBody| {
            if !valid_user(&body.user) {
                return error(StatusCode::BAD_REQUEST, "user: 1 to 32 letters, digits, - or _");
            }
            let topics = vec!["post:*".to_owned()];
            let request = TokenRequest {
                sub: &body.user,
                topics: &topics,
                ttl: Duration::from_secs(3600),
                audience: None,
                issuer: None,
            };
            match issue_token(&secret, &request) {
                Ok(token) => warp::reply::json(&json!({ "token": token })).into_response(),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        });
    let list = warp::path!("demo" / "posts" / i64 / "comments")
        .and(warp::get())
        .and(warp::query::<After>())
        .and(with_pool.clone())
        .then(
            |post: i64, after: After, pool: Pool| async move { respond(list_comments(&pool, post, after.after).await) },
        );
    let add = warp::path!("demo" / "posts" / i64 / "comments")
        .and(warp::post())
        .and(json_body::<CommentBody>())
        .and(with_pool.clone())
        .then(|post: i64, body: CommentBody, pool: Pool| async move { respond(add_comment(&pool, post, body).await) });
    let nudge = warp::path!("demo" / "nudge")
        .and(warp::post())
        .and(json_body::<NudgeBody>())
        .and(with_pool.clone())
        .then(|body: NudgeBody, pool: Pool| async move { respond(nudge_user(&pool, body).await) });
    let online = warp::path!("demo" / "online")
        .and(warp::get())
        .and(with_pool.clone())
        .then(|pool: Pool| async move { respond(who_is_online(&pool).await) });
    let disconnect = warp::path!("demo" / "disconnect")
        .and(warp::post())
        .and(json_body::<DisconnectBody>())
        .and(with_pool)
        .then(|body: DisconnectBody, pool: Pool| async move { respond(disconnect_user(&pool, body).await) });

    page.or(client)
        .unify()
        .or(token)
        .unify()
        .or(list)
        .unify()
        .or(add)
        .unify()
        .or(nudge)
        .unify()
        .or(online)
        .unify()
        .or(disconnect)
        .unify()
        .boxed()
}

/// A JSON request body of at most 8 KiB.
fn json_body<T: serde::de::DeserializeOwned + Send>() -> impl Filter<Extract = (T,), Error = warp::Rejection> + Clone {
    warp::body::content_length_limit(8 * 1024).and(warp::body::json())
}

type ApiResult = Result<serde_json::Value, (StatusCode, String)>;

async fn list_comments(pool: &Pool, post: i64, after: i64) -> ApiResult {
    let client = pool.get().await.map_err(internal)?;
    let rows = client
        .query(
            "SELECT id, author, body, to_char(created_at AT TIME ZONE 'UTC', 'HH24:MI:SS') \
             FROM demo.comments WHERE post_id = $1 AND id > $2 ORDER BY id LIMIT 200",
            &[&post, &after],
        )
        .await
        .map_err(internal)?;
    let comments: Vec<_> = rows
        .iter()
        .map(|r| json!({ "id": r.get::<_, i64>(0), "author": r.get::<_, String>(1), "body": r.get::<_, String>(2), "at": r.get::<_, String>(3) }))
        .collect();
    Ok(json!({ "comments": comments }))
}

async fn add_comment(pool: &Pool, post: i64, body: CommentBody) -> ApiResult {
    if !valid_user(&body.author) || body.body.trim().is_empty() || body.body.chars().count() > 2000 {
        return Err((StatusCode::BAD_REQUEST, "author and a body of 1 to 2000 characters are required".into()));
    }
    let mut client = pool.get().await.map_err(internal)?;
    // The real change and its hint commit together: no hint for a rolled-back comment, no comment without one.
    let tx = client.transaction().await.map_err(internal)?;
    let id: i64 = tx
        .query_one(
            "INSERT INTO demo.comments (post_id, author, body) VALUES ($1, $2, $3) RETURNING id",
            &[&post, &body.author, &body.body.trim()],
        )
        .await
        .map_err(internal)?
        .get(0);
    tx.execute(
        "INSERT INTO nudge.events (topic, kind, data) VALUES ($1, 'comment.created', jsonb_build_object('comment_id', $2::bigint))",
        &[&format!("post:{post}"), &id],
    )
    .await
    .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    Ok(json!({ "id": id }))
}

async fn nudge_user(pool: &Pool, body: NudgeBody) -> ApiResult {
    if !valid_user(&body.from) || !valid_user(&body.to) {
        return Err((StatusCode::BAD_REQUEST, "from and to must be user names".into()));
    }
    let client = pool.get().await.map_err(internal)?;
    let id: i64 = client
        .query_one(
            "SELECT nudge.publish('inbox', 'nudge.received', ARRAY[$1], jsonb_build_object('from', $2::text))",
            &[&body.to, &body.from],
        )
        .await
        .map_err(internal)?
        .get(0);
    Ok(json!({ "event_id": id }))
}

/// Who is online, as a backend asks it: `nudge.presence`.
async fn who_is_online(pool: &Pool) -> ApiResult {
    let client = pool.get().await.map_err(internal)?;
    let rows = client
        .query("SELECT user_id, connections FROM nudge.presence ORDER BY user_id LIMIT 100", &[])
        .await
        .map_err(internal)?;
    let users: Vec<_> =
        rows.iter().map(|r| json!({ "user": r.get::<_, String>(0), "connections": r.get::<_, i32>(1) })).collect();
    Ok(json!({ "online": users }))
}

/// Revoke a user's connections, as a backend does when a session is revoked: `nudge.disconnect()`.
async fn disconnect_user(pool: &Pool, body: DisconnectBody) -> ApiResult {
    if !valid_user(&body.user) {
        return Err((StatusCode::BAD_REQUEST, "user must be a user name".into()));
    }
    let client = pool.get().await.map_err(internal)?;
    client
        .execute("SELECT nudge.disconnect($1, 'disconnected from the demo page')", &[&body.user])
        .await
        .map_err(internal)?;
    Ok(json!({ "disconnected": body.user }))
}

fn valid_user(user: &str) -> bool {
    (1..=32).contains(&user.len()) && user.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn internal(e: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn respond(result: ApiResult) -> Response {
    match result {
        Ok(value) => warp::reply::json(&value).into_response(),
        Err((status, message)) => error(status, &message),
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    let mut response = warp::reply::json(&json!({ "error": message })).into_response();
    *response.status_mut() = status;
    response
}
