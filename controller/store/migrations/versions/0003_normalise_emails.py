"""Normalise stored emails with the lookalike-proof rule (NFKC, case folding, IDNA A-labels).

Until now an email was stored trimmed and lower-cased only, so ``josé@`` in NFC and
in NFD, ``ops@bücher.example`` and ``ops@xn--bcher-kva.example``, or ``adm@`` and a
full-width ``adm@`` (U+FF41 for the ``a``) could be two accounts. From this revision on the controller
stores and looks up emails normalised (``controller.auth.validation.normalize_email``);
this migration brings existing rows to that form.

The rule is copied here, frozen, so that this migration does the same thing
whatever the application's function becomes later.

If two existing accounts normalise to one email (lookalike duplicates made before
this fix), the one whose stored email already is the normal form keeps it, else
the oldest account; the others keep their stored email unchanged (no sign-in by
email can reach them any more, since logins look up the normal form) and are
named by id in a warning for an operator to resolve. Nothing is deleted.

Downgrade changes nothing: normalised emails are valid under the old rule too.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence

import idna
import sqlalchemy as sa
from alembic import context, op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

_users = sa.table(
    "users",
    sa.column("id", sa.String(36)),
    sa.column("email", sa.String(255)),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _domain(domain: str) -> str:
    lowered = domain.lower()
    if domain.isascii() and not any(label.startswith("xn--") for label in lowered.split(".")):
        return lowered
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return _fold(domain)


def normalise(email: str) -> str:
    """The normal form of ``email`` as of this revision."""
    value = unicodedata.normalize("NFKC", email).strip()
    local, at, domain = value.rpartition("@")
    if not at:
        return _fold(value)
    return f"{_fold(local)}@{_domain(domain)}"


def upgrade() -> None:
    if context.is_offline_mode():
        log.warning("0003: emails are normalised only when migrating online (not with --sql)")
        return
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_users.c.id, _users.c.email).order_by(_users.c.created_at, _users.c.id)
    ).all()
    taken = {email for _, email in rows if normalise(email) == email}
    skipped: list[str] = []
    for user_id, email in rows:
        normal = normalise(email)
        if normal == email:
            continue
        if normal in taken:
            skipped.append(user_id)
            continue
        bind.execute(sa.update(_users).where(_users.c.id == user_id).values(email=normal))
        taken.add(normal)
    if skipped:
        log.warning(
            "0003: %d account(s) kept their stored email because another account already has its "
            "normal form (lookalike duplicates; resolve by hand): user ids %s",
            len(skipped),
            ", ".join(skipped),
        )


def downgrade() -> None:
    pass
