"""Add a comment to a post and nudge the post's readers, in one transaction.

    DATABASE_URL=postgres://... python3 publish_comment.py 42 "hello" [--notify alice]
"""
import argparse
import os

import psycopg
from psycopg.types.json import Jsonb

parser = argparse.ArgumentParser()
parser.add_argument("post_id", type=int)
parser.add_argument("body")
parser.add_argument("--notify", metavar="USER", help="also send USER a personal message.created event")
args = parser.parse_args()

# conn.transaction() commits when the block ends and rolls back on an exception: the comment and its events are
# committed together or not at all, so nobody is nudged about a comment that does not exist.
with psycopg.connect(os.environ["DATABASE_URL"]) as conn, conn.transaction():
    comment_id = conn.execute(
        "INSERT INTO comments (post_id, author, body) VALUES (%s, %s, %s) RETURNING id",
        (args.post_id, "python-example", args.body),
    ).fetchone()[0]
    # Only a hint goes in data: the id to fetch. Clients load the comment from your API, which checks access.
    conn.execute(
        "INSERT INTO nudge.events (topic, kind, data) VALUES (%s, %s, %s)",
        (f"post:{args.post_id}", "comment.created", Jsonb({"comment_id": comment_id})),
    )
    if args.notify:
        # A personal event: with recipients set, it goes to that user's connections, whatever they subscribed to.
        message_id = conn.execute(
            "INSERT INTO messages (sender, recipient, body) VALUES (%s, %s, %s) RETURNING id",
            ("python-example", args.notify, f"New comment on post {args.post_id}"),
        ).fetchone()[0]
        # nudge.publish(topic, kind, recipients, data) inserts the same row and returns its id; a producer role
        # (sql/roles.sql) may call it although it may not read nudge.events.
        conn.execute(
            "SELECT nudge.publish(%s, %s, %s, %s)",
            ("inbox", "message.created", [args.notify], Jsonb({"message_id": message_id})),
        )

print(comment_id)
