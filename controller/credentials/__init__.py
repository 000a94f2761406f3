"""Provider OAuth tokens of nodes: life cycle (refresh, replace, revoke) and sealed delivery.

* :mod:`~controller.credentials.providers` — one adapter per provider (spec §3.2), all on
  one OAuth 2.0 client (Authlib over httpx): refresh-token grant (RFC 6749 §6), revocation
  (RFC 7009), refresh-token rotation.
* :mod:`~controller.credentials.states` — the ``node_credential_states`` rows: state,
  version and the refresh lease (at most one refresh per token in flight, across
  controllers and restarts).
* :mod:`~controller.credentials.refresher` — refreshes each token at a share of its
  lifetime with jitter, rate-limited, with backoff on temporary failures.
* :mod:`~controller.credentials.service` — ``UpdateNodeCredentials``,
  ``RevokeNodeCredentials`` and the state shown on ``GetNode``.
* :mod:`~controller.credentials.sealing` and :mod:`~controller.credentials.delivery` —
  ``FetchNodeCredentials``: HPKE-sealed to the node's own certificate key.

Plaintext tokens exist only in memory for the duration of one call; they are never
logged, returned to users, cached or stored unencrypted (docs/credentials.md).
"""
