"""What the server keeps: conversations, stored chat completions and the media sent with them,
in one SQLite file.

Durability. The file is in WAL mode with ``synchronous=FULL``: every commit appends to the
write-ahead log and fsyncs it before the call returns, and the server answers a request only
after its commit. So a message the client was answered about survives ``kill -9`` of the server
(the log is on disk; SQLite replays it on the next open) and also a power cut or kernel crash.
``synchronous=NORMAL`` would also survive ``kill -9`` (the log is in the operating system's
cache, which a killed process does not take with it) but may lose the last commits to a power
cut; the price of FULL is one fsync per commit, which is small beside the model call that
precedes every stored message. WAL also lets readers read while a writer writes.

Media. An image or audio clip inside a message (a ``data:`` URL or a base64 field) is stored
once, by content (the same image sent twice is one row), and the message keeps a reference;
reading the message back puts the data back in place, so what is read is what was sent.

All calls are synchronous and short; the server calls them from worker threads. One connection
is shared under a lock (SQLite serialises writers anyway).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from polymodal.serve.media import DATA_URL, data_url

SCHEMA_VERSION = 1
MEDIA_REF = "polymodal-media:"  # a data: URL kept in the media table
MEDIA_B64_REF = "polymodal-media-base64:"  # a bare base64 field (input_audio.data, audio.data) kept there
INLINE_UP_TO = 512  # characters: shorter media stay inline in their message

SCHEMA = """
CREATE TABLE IF NOT EXISTS media (
    id TEXT PRIMARY KEY,            -- media_<sha-256 of the bytes>
    mime TEXT NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS completions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL,
    model TEXT NOT NULL,
    metadata TEXT NOT NULL,         -- JSON object
    completion TEXT NOT NULL,       -- the chat.completion as answered (JSON, media by reference)
    messages TEXT NOT NULL          -- the request's messages, each with an id (JSON list)
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    title TEXT,
    metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    created INTEGER NOT NULL,
    message TEXT NOT NULL           -- {"role", "content", ...} (JSON, media by reference)
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation, seq);
"""


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class Store:
    """The SQLite store (see the module doc). ``path`` is created with its folder if missing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._conn.row_factory = sqlite3.Row
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite could not use WAL mode here (got {mode})")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed (and fsynced) when the block ends, rolled back on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # ---- media ----

    def _put_media(self, c: sqlite3.Connection, data: bytes, mime: str) -> str:
        id = "media_" + hashlib.sha256(data).hexdigest()
        c.execute("INSERT OR IGNORE INTO media (id, mime, size, data, created) VALUES (?, ?, ?, ?, ?)",
                  (id, mime, len(data), data, int(time.time())))
        return id

    def put_media(self, data: bytes, mime: str) -> str:
        """Keep ``data``; its id (the same bytes always get the same id)."""
        with self._write() as c:
            return self._put_media(c, data, mime)

    def media(self, id: str) -> tuple[str, bytes] | None:
        """``(mime, bytes)`` of a kept medium, or None."""
        rows = self._read("SELECT mime, data FROM media WHERE id = ?", (id,))
        return (rows[0]["mime"], bytes(rows[0]["data"])) if rows else None

    def _externalise(self, c: sqlite3.Connection, value: Any, key: str | None = None) -> Any:
        """``value`` with every large data: URL and base64 media field replaced by a reference."""
        if isinstance(value, dict):
            return {k: self._externalise(c, v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self._externalise(c, v) for v in value]
        if isinstance(value, str) and len(value) > INLINE_UP_TO:
            match = DATA_URL.match(value)
            if match and match["base64"]:
                try:
                    data = base64.b64decode(value[match.end():], validate=True)
                except (binascii.Error, ValueError):
                    return value
                return MEDIA_REF + self._put_media(c, data, (match["mime"] or "application/octet-stream").lower())
            if key == "data":  # input_audio.data, audio.data: bare base64
                try:
                    data = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    return value
                return MEDIA_B64_REF + self._put_media(c, data, "application/octet-stream")
        return value

    def _internalise(self, value: Any) -> Any:
        """The inverse of :meth:`_externalise`: references replaced by the data they stand for."""
        if isinstance(value, dict):
            return {k: self._internalise(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._internalise(v) for v in value]
        if isinstance(value, str) and value.startswith((MEDIA_REF, MEDIA_B64_REF)):
            as_url = value.startswith(MEDIA_REF)
            found = self.media(value.removeprefix(MEDIA_REF if as_url else MEDIA_B64_REF))
            if found is None:
                return value
            mime, data = found
            return data_url(data, mime) if as_url else base64.b64encode(data).decode()
        return value

    # ---- stored chat completions ----

    def save_completion(self, completion: dict, messages: list[dict], metadata: dict[str, str] | None) -> None:
        """Keep a chat completion and the messages it answered (``store: true``)."""
        numbered = [{"id": f"{completion['id']}-{i}", **m} for i, m in enumerate(messages)]
        with self._write() as c:
            c.execute("INSERT INTO completions (id, created, model, metadata, completion, messages) "
                      "VALUES (?, ?, ?, ?, ?, ?)",
                      (completion["id"], completion["created"], completion["model"], json.dumps(metadata or {}),
                       json.dumps(self._externalise(c, completion)), json.dumps(self._externalise(c, numbered))))

    def completion(self, id: str) -> dict | None:
        rows = self._read("SELECT completion, metadata FROM completions WHERE id = ?", (id,))
        if not rows:
            return None
        return {**self._internalise(json.loads(rows[0]["completion"])), "metadata": json.loads(rows[0]["metadata"])}

    def completion_messages(self, id: str) -> list[dict] | None:
        rows = self._read("SELECT messages FROM completions WHERE id = ?", (id,))
        return self._internalise(json.loads(rows[0]["messages"])) if rows else None

    def completions(self, model: str | None = None, metadata: dict[str, str] | None = None) -> list[dict]:
        """Every stored completion (oldest first), of ``model`` and with ``metadata`` if given."""
        sql, args = "SELECT completion, metadata FROM completions", ()
        if model:
            sql, args = sql + " WHERE model = ?", (model,)
        out = []
        for row in self._read(sql + " ORDER BY seq", args):
            kept = json.loads(row["metadata"])
            if metadata and any(kept.get(k) != v for k, v in metadata.items()):
                continue
            out.append({**self._internalise(json.loads(row["completion"])), "metadata": kept})
        return out

    def delete_completion(self, id: str) -> bool:
        with self._write() as c:
            return c.execute("DELETE FROM completions WHERE id = ?", (id,)).rowcount > 0

    # ---- conversations ----

    def create_conversation(self, title: str | None = None, metadata: dict[str, str] | None = None) -> dict:
        now = int(time.time())
        id = new_id("conv_")
        with self._write() as c:
            c.execute("INSERT INTO conversations (id, created, updated, title, metadata) VALUES (?, ?, ?, ?, ?)",
                      (id, now, now, title, json.dumps(metadata or {})))
        return self.conversation(id)  # type: ignore[return-value]

    def conversation(self, id: str) -> dict | None:
        rows = self._read("SELECT * FROM conversations WHERE id = ?", (id,))
        return _conversation(rows[0]) if rows else None

    def conversations(self) -> list[dict]:
        """Every conversation, the most recently updated first."""
        return [_conversation(r) for r in self._read("SELECT * FROM conversations ORDER BY updated DESC, id")]

    def delete_conversation(self, id: str) -> bool:
        with self._write() as c:
            return c.execute("DELETE FROM conversations WHERE id = ?", (id,)).rowcount > 0

    def append_messages(self, conversation: str, messages: list[dict], title: str | None = None) -> list[dict]:
        """Add ``messages`` to the end of a conversation, all or none; returns them with their ids.
        ``title`` names the conversation if it has no title yet."""
        now = int(time.time())
        out = []
        with self._write() as c:
            for message in messages:
                id = new_id("msg_")
                c.execute("INSERT INTO messages (id, conversation, created, message) VALUES (?, ?, ?, ?)",
                          (id, conversation, now, json.dumps(self._externalise(c, message))))
                out.append({"id": id, "created_at": now, **message})
            c.execute("UPDATE conversations SET updated = ?, title = COALESCE(title, ?) WHERE id = ?",
                      (now, title, conversation))
        return out

    def messages(self, conversation: str) -> list[dict]:
        """The messages of a conversation, oldest first, each with its ``id`` and ``created_at``."""
        rows = self._read("SELECT id, created, message FROM messages WHERE conversation = ? ORDER BY seq",
                          (conversation,))
        return [{"id": r["id"], "created_at": r["created"], **self._internalise(json.loads(r["message"]))}
                for r in rows]


def _conversation(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "object": "conversation", "created_at": row["created"], "updated_at": row["updated"],
            "title": row["title"], "metadata": json.loads(row["metadata"])}
