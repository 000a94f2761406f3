"""Validation of the credentials in Register and Login requests.

``email`` gets a practical RFC 5321/5322 check (not the full grammar: no quoted
local parts, no IP-literal domains) of its normalised form (see
:func:`normalize_email`: Unicode NFKC and case folding for the part before ``@``,
IDNA 2008 / UTS #46 A-labels for the domain), so that addresses that look the
same are the same account. ``password_hash`` is the client's own salted hash of
the password: printable ASCII without spaces, 32 to 1024 characters. It is never
stripped or truncated: a value that is too long is an error stating the limit.

Example::

    from controller.errors import require_fields

    violations = validate_credentials(request.email, request.password_hash)
    require_fields(violations)              # raises InvalidArgument if any
    email = normalize_email(request.email)

Each field gets at most one violation (the first problem found), with field names
as in the API (``email``, ``password_hash``).
"""

from __future__ import annotations

import re
import unicodedata

import idna

from controller.errors import FieldViolation

EMAIL_MAX_LENGTH = 254
"""Longest address (RFC 5321 path limit minus the angle brackets), in characters."""

EMAIL_LOCAL_MAX_LENGTH = 64
"""Longest part before ``@``, in octets (RFC 5321 §4.5.3.1.1)."""

DOMAIN_LABEL_MAX_LENGTH = 63
"""Longest label of a domain name, in octets."""

PASSWORD_HASH_MIN_LENGTH = 32
"""Shortest accepted ``password_hash`` (shorter is not a real salted hash)."""

PASSWORD_HASH_MAX_LENGTH = 1024
"""Longest accepted ``password_hash``; longer is rejected, never truncated."""

REQUIRED = "is required"

# RFC 5322 atext plus UTF-8 (RFC 6531); dots are checked separately.
_LOCAL_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PRINTABLE_NO_SPACE = re.compile(r"[\x21-\x7e]+")


def _fold(text: str) -> str:
    """Unicode NFKC, case folding, NFKC again (NFKC_Casefold without removing ignorables)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _canonical_domain(domain: str) -> str:
    """The domain as lower-case ASCII (IDNA 2008 A-labels, UTS #46 mapping).

    A plain ASCII domain is only lower-cased (the validator then explains what is
    wrong with it, if anything). A domain with non-ASCII characters or an
    ``xn--`` label goes through :func:`idna.encode`, which maps lookalike forms
    (full-width letters, U+3002 as a dot, NFD) to one A-label and refuses invalid ones
    (e.g. an ``xn--`` label that decodes to a non-NFC string). An invalid domain is
    returned case-folded, and the validator rejects it.
    """
    lowered = domain.lower()
    if domain.isascii() and not _has_a_label(lowered):
        return lowered
    encoded = _idna_ascii(domain)
    return _fold(domain) if encoded is None else encoded


def _has_a_label(domain: str) -> bool:
    return any(label.startswith("xn--") for label in domain.lower().split("."))


def _idna_ascii(domain: str) -> str | None:
    """``domain`` as IDNA 2008 A-labels (UTS #46 mapping), or None if it is not a valid IDN."""
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def normalize_email(email: str) -> str:
    """The one form in which an email is stored, compared and looked up.

    1. Unicode NFKC over the whole address (full-width U+FF41 becomes ``a``,
       U+FF20 becomes ``@``, NFD ``e`` + U+0301 becomes NFC U+00E9), then surrounding
       whitespace is stripped;
    2. the part before the (last) ``@`` is case-folded (``str.casefold``, so
       ``ß`` becomes ``ss``) and NFKC-normalised again;
    3. the domain becomes its IDNA 2008 ASCII form with the UTS #46 mapping
       (``Bücher.example`` becomes ``xn--bcher-kva.example``); an ASCII domain is
       lower-cased.

    Never raises: whatever does not normalise cleanly is left for
    :func:`email_problem` to reject.
    """
    value = unicodedata.normalize("NFKC", email).strip()
    local, at, domain = value.rpartition("@")
    if not at:
        return _fold(value)
    return f"{_fold(local)}@{_canonical_domain(domain)}"


normalise_email = normalize_email
"""Alias of :func:`normalize_email`."""


def _has_space_or_control(text: str) -> bool:
    return any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in text)


def email_problem(email: str | None) -> str | None:
    """What is wrong with ``email`` (after normalisation), or ``None`` if it is acceptable."""
    if email is None:
        return REQUIRED
    if not isinstance(email, str):
        return "must be a string"
    value = normalize_email(email)
    if not value:
        return REQUIRED
    if len(value) > EMAIL_MAX_LENGTH:
        return f"must be at most {EMAIL_MAX_LENGTH} characters (got {len(value)})"
    if _has_space_or_control(value):
        return "must not contain spaces or control characters"
    if value.count("@") != 1:
        return "must contain exactly one '@', like name@example.com"
    local, _, domain = value.partition("@")
    if not local:
        return "needs a name before the '@'"
    if len(local.encode("utf-8")) > EMAIL_LOCAL_MAX_LENGTH:
        return f"the part before '@' must be at most {EMAIL_LOCAL_MAX_LENGTH} characters"
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return "the part before '@' must not start or end with a dot or contain two dots in a row"
    if not all(_LOCAL_ATEXT.fullmatch(atom) for atom in local.split(".")):
        return "the part before '@' contains a character that is not allowed"
    return _domain_problem(domain)


def _domain_problem(domain: str) -> str | None:
    if not domain:
        return "needs a domain after the '@'"
    if not domain.isascii():
        # normalize_email could not make an IDNA A-label of it.
        return "the domain after '@' is not a valid domain name"
    ascii_domain = domain
    labels = ascii_domain.split(".")
    if len(labels) < 2:
        return "the domain after '@' needs a dot, like example.com"
    for label in labels:
        if not label:
            return "the domain after '@' must not contain empty labels (two dots in a row)"
        if len(label) > DOMAIN_LABEL_MAX_LENGTH:
            return f"each part of the domain must be at most {DOMAIN_LABEL_MAX_LENGTH} characters"
        if _LABEL.fullmatch(label) is None:
            return (
                "the domain after '@' may contain only letters, digits and hyphens, "
                "and no part may start or end with a hyphen"
            )
    if _has_a_label(ascii_domain) and _idna_ascii(ascii_domain) != ascii_domain:
        # An A-label that is not valid IDNA 2008 (or not in its one canonical form).
        return "the domain after '@' is not a valid domain name"
    if labels[-1].isdigit():
        return "the domain after '@' must end in a name, not a number"
    return None


def password_hash_problem(password_hash: str | None) -> str | None:
    """What is wrong with ``password_hash``, or ``None`` if it is acceptable."""
    if password_hash is None:
        return REQUIRED
    if not isinstance(password_hash, str):
        return "must be a string"
    if not password_hash:
        return REQUIRED
    if len(password_hash) > PASSWORD_HASH_MAX_LENGTH:
        return f"must be at most {PASSWORD_HASH_MAX_LENGTH} characters (got {len(password_hash)})"
    if _PRINTABLE_NO_SPACE.fullmatch(password_hash) is None:
        return "must be printable ASCII without spaces (the client's salted hash, e.g. hex or base64)"
    if len(password_hash) < PASSWORD_HASH_MIN_LENGTH:
        return (
            f"must be at least {PASSWORD_HASH_MIN_LENGTH} characters: send the client's salted hash "
            "of the password, not the password"
        )
    return None


def validate_credentials(email: str | None, password_hash: str | None) -> list[FieldViolation]:
    """Field violations of a Register/Login request (empty list if it is valid)."""
    violations: list[FieldViolation] = []
    problem = email_problem(email)
    if problem is not None:
        violations.append(FieldViolation("email", problem))
    problem = password_hash_problem(password_hash)
    if problem is not None:
        violations.append(FieldViolation("password_hash", problem))
    return violations
