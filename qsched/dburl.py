"""Database URLs shared by the search storage (optuna) and the study's vote store: drivers, redaction.

``postgresql://`` means SQLAlchemy's default PostgreSQL driver, psycopg2. qsched's
dependency is psycopg 3 (``postgresql+psycopg://``); a bare ``postgresql://`` URL is
pointed at it when psycopg2 is not installed, so users can paste the URL they know.
"""

from __future__ import annotations

import importlib.util


def normalize_url(url: str) -> str:
    """``url`` with a driver SQLAlchemy can load: ``postgresql://`` -> ``postgresql+psycopg://`` without psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix) and importlib.util.find_spec("psycopg2") is None \
                and importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def redact(url: str) -> str:
    """``url`` with any password hidden (for cards, logs and errors)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given
        return url
