"""Scrub credentials out of untrusted text (a replica's output) and cap its length.

A replica's exit or crash output travels to the controller (the agent's command
results and heartbeats) and to the user (``GetDeployment``'s ``error_message``). An app
can print anything it managed to read, so that text is treated as hostile: before it
leaves the agent, and again before the controller stores it, :func:`redact` replaces
whatever looks like a credential with ``***`` and keeps at most :data:`MAX_CHARS`.

What is scrubbed (best effort: a filter, not the boundary — see docs/security.md):

* URLs with userinfo: ``scheme://user:pass@host`` → ``scheme://user:***@host``;
* PEM private key blocks (``-----BEGIN … PRIVATE KEY-----`` … ``END``, or the rest of the
  text when the end is cut off);
* JWT-shaped strings (three base64url parts, the first starting ``eyJ``);
* assignments to a name that ends like a secret: ``…KEY=``, ``…TOKEN=``, ``…PASSWORD=``,
  ``…SECRET=``, ``…PASSWD=``, ``…CREDENTIAL(S)=`` (also ``:`` and quoted values), and
  ``Authorization: Bearer …``;
* long high-entropy tokens (32+ characters of base64/hex alphabet with mixed classes,
  like ``a67e_…`` enrollment tokens or API keys).

Pure and dependency-free.
"""

from __future__ import annotations

import math
import re

MAX_CHARS = 2048
"""The longest text :func:`redact` returns (the end is kept: a crash's last lines matter most)."""

MASK = "***"

_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:/@]*):(?P<pw>[^\s@/]*)@")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_ASSIGNMENT = re.compile(
    r"(?i)(?P<name>[A-Za-z0-9_.-]*(?:key|token|passw(?:or)?d|pwd|secret|credentials?|auth))\b"
    r"(?P<sep>[\"']?\s*[=:]\s*)"
    r"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^\s,;&\"']+)"
)
_CANDIDATE = re.compile(r"[A-Za-z0-9_+/=.~-]{32,}")


def _entropy(text: str) -> float:
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _looks_random(word: str) -> bool:
    """A long word of token alphabet with mixed character classes and high entropy."""
    core = word.strip("=.")
    if len(core) < 32 or core.startswith(("/", "./", "~")):
        return False  # paths are long, not secret
    classes = sum(
        (
            any(c.islower() for c in core),
            any(c.isupper() for c in core),
            any(c.isdigit() for c in core),
        )
    )
    return classes >= 2 and _entropy(core) >= 3.5


def _mask_assignment(match: re.Match[str]) -> str:
    value = match.group("value")
    if value in (MASK, f'"{MASK}"', f"'{MASK}'") or not value.strip("\"'"):
        return match.group(0)
    quote = value[0] if value[0] in "\"'" else ""
    return f"{match.group('name')}{match.group('sep')}{quote}{MASK}{quote}"


def redact(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` with credentials masked and at most ``limit`` characters (its end kept,
    after a leading ``…``)."""
    # Cut first (bounded work on hostile input), leaving room for what masking removes.
    if len(text) > 4 * limit:
        text = text[-4 * limit :]
    text = _PEM.sub(f"[private key {MASK}]", text)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", text)
    text = _JWT.sub(MASK, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _ASSIGNMENT.sub(_mask_assignment, text)
    text = _CANDIDATE.sub(lambda m: MASK if _looks_random(m.group(0)) else m.group(0), text)
    if len(text) > limit:
        text = "…" + text[-(limit - 1) :]
    return text
