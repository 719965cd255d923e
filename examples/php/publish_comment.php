<?php
// Add a comment to a post and nudge the post's readers, in one transaction.
//
//   DATABASE_URL=postgres://... php publish_comment.php 42 "hello"
[, $postId, $body] = $argv + [null, null, null];
// PDO wants its own DSN, so take postgres://user:pass@host:port/db apart.
$url = parse_url(getenv('DATABASE_URL') ?: '');
if ($postId === null || $body === null || empty($url['host'])) {
    fwrite(STDERR, "usage: DATABASE_URL=postgres://user:pass@host:port/db php publish_comment.php POST_ID BODY\n");
    exit(2);
}
$dsn = sprintf('pgsql:host=%s;port=%d;dbname=%s', $url['host'], $url['port'] ?? 5432, ltrim($url['path'] ?? '', '/'));
$pdo = new PDO($dsn, urldecode($url['user'] ?? ''), urldecode($url['pass'] ?? ''),
    [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);

// One transaction: if anything throws before commit(), PDO rolls back when the script ends, and nobody is
// nudged about a comment that does not exist.
$pdo->beginTransaction();
$stmt = $pdo->prepare('INSERT INTO comments (post_id, author, body) VALUES (?, ?, ?) RETURNING id');
$stmt->execute([$postId, 'php-example', $body]);
$commentId = (int) $stmt->fetchColumn();
// Only a hint goes in data: the id to fetch. PDO sends strings, hence the explicit ::jsonb cast.
$pdo->prepare('INSERT INTO nudge.events (topic, kind, data) VALUES (?, ?, ?::jsonb)')
    ->execute(["post:$postId", 'comment.created', json_encode(['comment_id' => $commentId])]);
$pdo->commit();

echo $commentId, PHP_EOL;
