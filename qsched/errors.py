"""Errors raised at qsched's boundaries.

Every error a user can cause by bad input is a :class:`QSchedError`: its message
says what was given, what is allowed and what to do. The CLI prints it as one
line and exits with status 2.
"""

from __future__ import annotations


class QSchedError(ValueError):
    """Bad input or state that the user can fix; the message says how."""
