"""Votes in a database behind a SQLAlchemy URL: SQLite (WAL) by default, PostgreSQL for many processes.

One row per (annotator, question), enforced by a unique constraint: a double click, a
retried request or two server processes racing on the same submission store one vote,
and the first answer stands (``INSERT ... ON CONFLICT DO NOTHING``). A vote is
acknowledged only after its transaction commits, so an acknowledged vote survives a
killed server (SQLite in WAL mode with ``synchronous=NORMAL`` loses nothing on a process
crash; only a power loss can cost the last transactions).

The store also keeps the study's identity (``meta``): a random secret (sides and image
URLs derive from it, identical in every process) and what the study is about
(configurations, prompts, pairs), so a store is never reused for another study.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from qsched.dburl import normalize_url, redact
from qsched.errors import QSchedError

FORMAT = 1


@dataclass(frozen=True)
class Vote:
    """One answer: who, which question, what was shown where, what was answered, how fast."""

    annotator: str
    question: str
    index: int
    left: str
    right: str
    answer: str
    winner: str | None
    gold: bool
    correct: bool | None
    response_ms: int
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class VoteStore:
    """The votes of one study in one database (thread-safe; one per process)."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.url = normalize_url(url)
        if "://" not in url:
            raise QSchedError(f"storage {url!r} is not a database URL; use e.g. sqlite:///votes.db or postgresql://user@host/db")
        self._sa = sa
        metadata = sa.MetaData()
        self.meta = sa.Table("study_meta", metadata, sa.Column("key", sa.String(64), primary_key=True),
                             sa.Column("value", sa.Text, nullable=False))
        self.votes = sa.Table(
            "study_votes", metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("annotator", sa.String(64), nullable=False),
            sa.Column("question", sa.String(32), nullable=False),
            sa.Column("prompt_index", sa.Integer, nullable=False),
            sa.Column("left_config", sa.String(200), nullable=False),
            sa.Column("right_config", sa.String(200), nullable=False),
            sa.Column("answer", sa.String(8), nullable=False),
            sa.Column("winner", sa.String(200), nullable=True),
            sa.Column("gold", sa.Boolean, nullable=False),
            sa.Column("correct", sa.Boolean, nullable=True),
            sa.Column("response_ms", sa.Integer, nullable=False),
            sa.Column("created", sa.Float, nullable=False),
            sa.UniqueConstraint("annotator", "question", name="one_vote_per_question"),
        )
        self._sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}} if self._sqlite else {"pool_pre_ping": True}
        try:
            self.engine = sa.create_engine(self.url, **kwargs)
            if self._sqlite:
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            metadata.create_all(self.engine, checkfirst=True)
            self._prepare()
        except (sa.exc.SQLAlchemyError, ImportError, ValueError) as err:
            if isinstance(err, sa.exc.IntegrityError) or "already exists" in str(err):
                metadata.create_all(self.engine, checkfirst=True)  # another process created the tables first
                self._prepare()
            else:
                raise QSchedError(f"cannot open storage {redact(url)}: {str(err).splitlines()[0]}") from None

    # --- identity ---------------------------------------------------------------------

    def bind(self, identity: dict[str, Any]) -> str:
        """Tie the store to a study (``identity``) and return its secret; another study is refused."""
        sa = self._sa
        wanted = {"format": str(FORMAT), "identity": json.dumps(identity, sort_keys=True), "secret": secrets.token_hex(16)}
        for key, value in wanted.items():
            with self.engine.begin() as conn:
                if conn.execute(sa.select(self.meta.c.value).where(self.meta.c.key == key)).first() is None:
                    try:
                        conn.execute(self.meta.insert().values(key=key, value=value))
                    except sa.exc.IntegrityError:
                        pass  # another process wrote it first; its value stands
        with self.engine.connect() as conn:
            stored = dict(conn.execute(sa.select(self.meta.c.key, self.meta.c.value)).all())
        if stored["identity"] != wanted["identity"] or stored["format"] != wanted["format"]:
            old = json.loads(stored["identity"])
            differs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
            raise QSchedError(f"storage {redact(self.url)} holds another study (differs in: {', '.join(differs)}); "
                              "use another --storage for this evaluation or these pairs")
        return stored["secret"]

    def identity(self) -> dict[str, Any] | None:
        sa = self._sa
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.meta.c.value).where(self.meta.c.key == "identity")).first()
        return None if row is None else json.loads(row[0])

    # --- votes --------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Build the hot statements once: compiling a statement per call cost more than running it."""
        sa = self._sa
        c = self.votes.c
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            self._insert = (insert(self.votes).on_conflict_do_nothing(index_elements=["annotator", "question"])
                            .returning(c.id))
        else:  # other databases: a plain insert; the unique constraint raises on a repeat
            self._insert = self.votes.insert()
        self._answered = sa.select(c.question).where(c.annotator == sa.bindparam("who"))

    def add(self, vote: Vote) -> tuple[Vote, bool]:
        """Store ``vote`` unless this annotator answered the question already; returns (stored vote, was new)."""
        sa = self._sa
        row = {"annotator": vote.annotator, "question": vote.question, "prompt_index": vote.index,
               "left_config": vote.left, "right_config": vote.right, "answer": vote.answer, "winner": vote.winner,
               "gold": vote.gold, "correct": vote.correct, "response_ms": vote.response_ms, "created": time.time()}
        try:
            with self.engine.begin() as conn:  # with ON CONFLICT, a row comes back only if this insert stored one
                result = conn.execute(self._insert, row)
                new = result.first() is not None if result.returns_rows else True
        except sa.exc.IntegrityError:
            new = False
        if new:
            return Vote(**{**vote.to_dict(), "created": row["created"]}), True
        stored = self.votes_where(self.votes.c.annotator == vote.annotator, self.votes.c.question == vote.question)
        return stored[0], False

    def answered(self, annotator: str) -> set[str]:
        """Question ids ``annotator`` has answered."""
        with self.engine.connect() as conn:
            return set(conn.execute(self._answered, {"who": annotator}).scalars())

    def counts(self) -> dict[str, int]:
        """Votes per question id, all annotators."""
        sa = self._sa
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.votes.c.question, sa.func.count()).group_by(self.votes.c.question)).all()
        return {q: int(n) for q, n in rows}

    def count(self) -> int:
        sa = self._sa
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(self.votes)).scalar_one())

    def votes_where(self, *conditions: Any) -> list[Vote]:
        sa = self._sa
        c = self.votes.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(c.annotator, c.question, c.prompt_index, c.left_config, c.right_config,
                                          c.answer, c.winner, c.gold, c.correct, c.response_ms, c.created)
                                .where(*conditions).order_by(c.id)).all()
        return [Vote(r[0], r[1], int(r[2]), r[3], r[4], r[5], r[6], bool(r[7]), None if r[8] is None else bool(r[8]),
                     int(r[9]), float(r[10])) for r in rows]

    def all_votes(self) -> list[Vote]:
        return self.votes_where(self._sa.true())

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL: readers never block the writer; NORMAL sync is crash-safe for a killed process."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
