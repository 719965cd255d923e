// Add a comment to a post and nudge the post's readers, in one transaction.
//
//   DATABASE_URL=postgres://... node publish_comment.mjs 42 "hello"
import pg from 'pg';

const [postId, body] = process.argv.slice(2);
if (!postId || body === undefined || !process.env.DATABASE_URL) {
  console.error('usage: DATABASE_URL=postgres://user:pass@host:port/db node publish_comment.mjs POST_ID BODY');
  process.exit(2);
}

const client = new pg.Client({ connectionString: process.env.DATABASE_URL });
await client.connect();
try {
  // BEGIN/COMMIT on the same client: the comment and its event commit together or not at all, so readers are
  // never nudged about a comment that was rolled back. (With a pg.Pool, check out one client for the transaction.)
  await client.query('BEGIN');
  const { rows } = await client.query(
    'INSERT INTO comments (post_id, author, body) VALUES ($1, $2, $3) RETURNING id',
    [postId, 'node-example', body]);
  // pg returns bigint as a string; keep ids as numbers in the hint so clients see {"comment_id": 7}.
  const commentId = Number(rows[0].id);
  // Only a hint goes in data: what to fetch, not the comment itself (nudge never carries content).
  // pg serializes a plain object to JSON text, which PostgreSQL casts to jsonb.
  await client.query('INSERT INTO nudge.events (topic, kind, data) VALUES ($1, $2, $3)',
    [`post:${postId}`, 'comment.created', { comment_id: commentId }]);
  await client.query('COMMIT');
  console.log(commentId);
} catch (err) {
  await client.query('ROLLBACK').catch(() => {});
  throw err;
} finally {
  await client.end();
}
