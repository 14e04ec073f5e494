"""The annotation database (SQLite, WAL): images, the Swiss rounds' pairs, and the votes on them.

The database is the only state. Every call opens its own connection and runs in one ``BEGIN
IMMEDIATE`` transaction, so several annotators (threads or processes) never receive the same pair, a
vote is committed before the next pair is handed out, and a restarted server continues where it was.

A round is a Swiss round over every image (``swiss.swiss_round``); its pairs are handed out one at a
time. When all of a round's pairs have a vote (a skip counts), the next round is paired from all votes
so far. Nobody waits for a round to finish: when its free pairs are gone, an annotator gets an open
pair that is already with someone else (the longest-waiting first), and both judgements count, as
repeated comparisons do in Bradley-Terry. A vote is keyed by (pair, annotator): a retried request is
answered as a duplicate and never counted twice.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..data.categories import ImageEntry
from ..errors import UserError
from .swiss import standings, swiss_round

OUTCOMES = {"left": 1.0, "right": 0.0, "tie": 0.5, "skip": None}
SCHEMA_VERSION = 1  # PRAGMA user_version; another version is refused, never altered in place

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, prompt TEXT NOT NULL, category TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, round INTEGER NOT NULL, left_id INTEGER NOT NULL REFERENCES images(id),
    right_id INTEGER NOT NULL REFERENCES images(id));
CREATE TABLE IF NOT EXISTS assignments (
    pair_id INTEGER NOT NULL REFERENCES pairs(id), annotator TEXT NOT NULL, served_at REAL NOT NULL,
    PRIMARY KEY (pair_id, annotator));
CREATE TABLE IF NOT EXISTS byes (round INTEGER PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images(id));
CREATE TABLE IF NOT EXISTS votes (
    pair_id INTEGER NOT NULL REFERENCES pairs(id), annotator TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('left', 'right', 'tie', 'skip')), created REAL NOT NULL,
    PRIMARY KEY (pair_id, annotator));
CREATE INDEX IF NOT EXISTS pairs_round ON pairs(round);
"""


_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(path.resolve(), threading.Lock())


@dataclass(frozen=True)
class Vote:
    left: str
    right: str
    outcome: str
    annotator: str
    round: int
    left_prompt: str
    right_prompt: str


class AnnotationStore:
    def __init__(self, path: str | Path, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = timeout
        if not self.path.exists():
            raise UserError(f"{self.path}: no annotation database (start with `ernie-lora rank serve DIR`)")
        try:
            with self._connect() as con:
                version = con.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: not an SQLite database ({exc})") from None
        if version != SCHEMA_VERSION:
            raise UserError(f"{self.path}: not an annotation database of schema {SCHEMA_VERSION} (found {version})")

    @classmethod
    def create_or_open(cls, path: str | Path, root: str | Path, images: list[ImageEntry]) -> AnnotationStore:
        """Open the database for ``root``, adding images new to the folder; creates it on first use.
        A database made for another folder is refused (its votes name that folder's files)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        try:
            try:
                con.execute("PRAGMA journal_mode=WAL")
            except sqlite3.DatabaseError as exc:
                raise UserError(f"{path}: not an SQLite database ({exc}); choose another --db") from None
            version = con.execute("PRAGMA user_version").fetchone()[0]
            has_tables = con.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
            if has_tables and version != SCHEMA_VERSION:
                raise UserError(f"{path}: annotation database of schema {version}, this ernie-lora reads "
                                f"{SCHEMA_VERSION}; use the version that made it or another --db")
            con.executescript(SCHEMA)
            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            con.execute("BEGIN IMMEDIATE")
            row = con.execute("SELECT value FROM meta WHERE key = 'root'").fetchone()
            root_text = str(Path(root).resolve())
            if row is None:
                con.execute("INSERT INTO meta VALUES ('root', ?)", (root_text,))
            elif row[0] != root_text:
                con.execute("ROLLBACK")
                raise UserError(f"{path}: made for {row[0]}, not {root_text}; use another --db")
            con.executemany("INSERT OR IGNORE INTO images (path, prompt, category) VALUES (?, ?, ?)",
                            [(e.path, e.prompt, e.category) for e in images])
            con.execute("COMMIT")
        finally:
            con.close()
        return cls(path)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # threads of one server queue on a lock: SQLite's busy handler would sleep up to 100 ms per retry
        with _lock_for(self.path), self._connect() as con:
            yield con

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # a vote answered is a vote on disk, power cut included
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    @property
    def root(self) -> Path:
        with self._transaction() as con:
            return Path(con.execute("SELECT value FROM meta WHERE key = 'root'").fetchone()[0])

    def image_path(self, image_id: int) -> str | None:
        with self._transaction() as con:
            row = con.execute("SELECT path FROM images WHERE id = ?", (image_id,)).fetchone()
        return row[0] if row else None

    # -- serving -------------------------------------------------------------------------------------
    def next_pair(self, annotator: str, now: float | None = None) -> dict:
        """The pair this annotator should judge: the last one handed to them while nobody has answered
        it (a reload shows it again), else an open pair of the current round, else (round complete) one
        of a new round; ``{"done": true}`` when every image has met every other."""
        now = time.time() if now is None else now
        with self._transaction() as con:
            current = con.execute("SELECT MAX(round) FROM pairs").fetchone()[0]
            row = con.execute(
                "SELECT a.pair_id FROM assignments a JOIN pairs p ON p.id = a.pair_id WHERE a.annotator = ? "
                "AND p.round = ? AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.pair_id = a.pair_id) "
                "ORDER BY a.served_at DESC LIMIT 1", (annotator, current)).fetchone()
            if row is None and current is not None:
                row = self._open_pair(con, current, annotator)
            if row is None:
                row = self._new_round(con, (current or 0) + 1)
            if row == "done":
                return {**self._progress(con, annotator), "done": True}
            con.execute("INSERT INTO assignments VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET served_at = ?",
                        (row[0], annotator, now, now))
            return {**self._describe(con, row[0]), **self._progress(con, annotator)}

    @staticmethod
    def _open_pair(con: sqlite3.Connection, current: int, annotator: str):
        """A pair of the round nobody has answered: one nobody holds first, else the one held longest."""
        return con.execute(
            "SELECT p.id FROM pairs p WHERE p.round = ? AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.pair_id = p.id) "
            "AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.pair_id = p.id AND a.annotator = ?) "
            "ORDER BY (SELECT COUNT(*) FROM assignments a WHERE a.pair_id = p.id), "
            "(SELECT MAX(served_at) FROM assignments a WHERE a.pair_id = p.id), p.id LIMIT 1",
            (current, annotator)).fetchone()

    def _new_round(self, con: sqlite3.Connection, number: int):
        ids = [r[0] for r in con.execute("SELECT id FROM images ORDER BY id")]
        if len(ids) < 2:
            raise UserError("fewer than two images to compare")
        results = [(a, b, OUTCOMES[o]) for a, b, o in con.execute(
            "SELECT p.left_id, p.right_id, v.outcome FROM votes v JOIN pairs p ON p.id = v.pair_id "
            "WHERE v.outcome != 'skip'")]
        played = {frozenset(r) for r in con.execute("SELECT left_id, right_id FROM pairs")}
        byes = {r[0] for r in con.execute("SELECT image_id FROM byes")}
        try:
            pairs, bye = swiss_round(standings(ids, results), played, byes, random.Random(number))
        except UserError:
            return "done"
        if bye is not None:
            con.execute("INSERT INTO byes VALUES (?, ?)", (number, bye))
        rng = random.Random(-number)  # which image shows on the left is random: no position bias in scores
        con.executemany("INSERT INTO pairs (round, left_id, right_id) VALUES (?, ?, ?)",
                        [(number, *((a, b) if rng.random() < 0.5 else (b, a))) for a, b in pairs])
        return con.execute("SELECT MIN(id) FROM pairs WHERE round = ?", (number,)).fetchone()

    def _describe(self, con: sqlite3.Connection, pair_id: int) -> dict:
        r = con.execute(
            "SELECT p.id, p.round, a.id, a.path, a.prompt, b.id, b.path, b.prompt FROM pairs p "
            "JOIN images a ON a.id = p.left_id JOIN images b ON b.id = p.right_id WHERE p.id = ?",
            (pair_id,)).fetchone()
        return {"pair_id": r[0], "round": r[1], "left": {"id": r[2], "path": r[3], "prompt": r[4]},
                "right": {"id": r[5], "path": r[6], "prompt": r[7]}}

    def _progress(self, con: sqlite3.Connection, annotator: str) -> dict:
        current = con.execute("SELECT MAX(round) FROM pairs").fetchone()[0] or 0
        in_round = con.execute("SELECT COUNT(*) FROM pairs WHERE round = ?", (current,)).fetchone()[0]
        voted = con.execute("SELECT COUNT(DISTINCT v.pair_id) FROM votes v JOIN pairs p ON p.id = v.pair_id "
                            "WHERE p.round = ?", (current,)).fetchone()[0]
        return {"progress": {
            "round": current, "round_pairs": in_round, "round_voted": voted,
            "votes": con.execute("SELECT COUNT(*) FROM votes").fetchone()[0],
            "mine": con.execute("SELECT COUNT(*) FROM votes WHERE annotator = ?", (annotator,)).fetchone()[0],
            "images": con.execute("SELECT COUNT(*) FROM images").fetchone()[0]}}

    def vote(self, pair_id: int, outcome: str, annotator: str) -> bool:
        """Record a vote; True if new, False if this annotator had already answered this pair (a retried
        request). Committed before this returns."""
        if outcome not in OUTCOMES:
            raise UserError(f"outcome {outcome!r}: one of {', '.join(OUTCOMES)}")
        with self._transaction() as con:
            if con.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
                raise UserError(f"pair {pair_id}: no such pair")
            # ON CONFLICT, not OR IGNORE: only a repeat is ignored, never a broken constraint
            done = con.execute("INSERT INTO votes (pair_id, annotator, outcome, created) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT (pair_id, annotator) DO NOTHING",
                               (pair_id, annotator, outcome, time.time()))
            return done.rowcount == 1

    def undo(self, annotator: str) -> dict | None:
        """Take back the annotator's last vote if its round is still the current one; returns that pair
        to be judged again (None: nothing to undo)."""
        with self._transaction() as con:
            current = con.execute("SELECT MAX(round) FROM pairs").fetchone()[0]
            row = con.execute(
                "SELECT v.pair_id FROM votes v JOIN pairs p ON p.id = v.pair_id WHERE v.annotator = ? "
                "AND p.round = ? ORDER BY v.created DESC, v.rowid DESC LIMIT 1", (annotator, current)).fetchone()
            if row is None:
                return None
            con.execute("DELETE FROM votes WHERE pair_id = ? AND annotator = ?", (row[0], annotator))
            now = time.time()
            con.execute("INSERT INTO assignments VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET served_at = ?",
                        (row[0], annotator, now, now))
            return {**self._describe(con, row[0]), **self._progress(con, annotator)}

    # -- reading -------------------------------------------------------------------------------------
    def images(self) -> list[ImageEntry]:
        with self._transaction() as con:
            return [ImageEntry(*r) for r in con.execute("SELECT path, prompt, category FROM images ORDER BY id")]

    def votes(self) -> list[Vote]:
        with self._transaction() as con:
            return [Vote(*r) for r in con.execute(
                "SELECT a.path, b.path, v.outcome, v.annotator, p.round, a.prompt, b.prompt FROM votes v "
                "JOIN pairs p ON p.id = v.pair_id JOIN images a ON a.id = p.left_id "
                "JOIN images b ON b.id = p.right_id ORDER BY v.created, v.rowid")]
