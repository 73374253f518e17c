"""Database URLs shared by the search storage (optuna) and the study's vote store.

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
