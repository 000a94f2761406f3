"""``a67 vault status``, ``rotate``, ``retire``: master-key rotation, for operators (issue 16).

These commands act on the controller's own configuration and store (the same
``A67_*`` settings as ``a67 serve``: ``A67_DATA_DIR``, ``A67_STORE_URL``,
``A67_MASTER_KEYS`` or ``A67_MASTER_KEYS_FILE``), not through the API: only whoever
holds the keys can rotate them.

* ``rotate`` adds a fresh random key to the keyring file and makes it the primary
  one. Running controllers re-read the file (``A67_VAULT_KEYRING_POLL_SECONDS``),
  encrypt new secrets with it and rewrap every stored secret in the background
  (resumed after a restart). With ``A67_MASTER_KEYS`` there is no file to edit: the
  command says what to do instead.
* ``status`` counts stored secrets per key id (``--json`` for scripts).
* ``retire KEY_ID`` removes a key from the file, refused while any secret uses it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from controller.client.app import command, state
from controller.client.errors import CONFLICT, INVALID, USAGE, CliError
from controller.config import Settings
from controller.store.db import Store
from controller.vault.keyfile import keyring_file, read_keyring, write_keyring
from controller.vault.keyring import Keyring, validate_key_id
from controller.vault.rewrap import count_by_key, totals


def _settings(data_dir: Path | None, store_url: str | None) -> Settings:
    try:
        return Settings.from_env(data_dir=data_dir, store_url=store_url)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=USAGE, reason="INVALID_SETTINGS") from None


def _current_keyring(settings: Settings) -> tuple[Keyring, Path | None]:
    path = keyring_file(settings.master_keys, settings.master_keys_file, settings.keys_dir)
    try:
        if path is None:
            return Keyring.parse(settings.master_keys), None
        return read_keyring(path), path
    except ValueError as exc:
        raise CliError(str(exc), exit_code=INVALID, reason="INVALID_KEY_MATERIAL") from None


async def _counts(settings: Settings) -> dict[str, dict[str, int]]:
    store = await Store.open(settings.effective_store_url)
    try:
        return await count_by_key(store)
    finally:
        await store.close()


def _options(func: click.decorators.FC) -> click.decorators.FC:
    func = click.option("--store-url", help="The store (default: A67_STORE_URL, else the data directory's).")(
        func
    )
    return click.option(
        "--data-dir", type=click.Path(path_type=Path), help="The controller's data directory (A67_DATA_DIR)."
    )(func)


def register(group: click.Group) -> None:
    @group.group("vault")
    def vault_group() -> None:
        """Master keys of the vault: status, rotation and retirement (operators).

        \b
        Rotating a master key without downtime:
          a67 vault rotate          # new primary key; controllers pick it up and rewrap
          a67 vault status          # wait until no secret uses the old key
          a67 vault retire k1       # then remove the old key
        """

    @command(vault_group, "status")
    @_options
    def status_cmd(data_dir: Path | None, store_url: str | None) -> None:
        """Stored secrets per master key id, and which key is primary.

        \b
        Examples:
          a67 vault status
          a67 vault status --json
        """
        settings = _settings(data_dir, store_url)
        ring, path = _current_keyring(settings)
        by_location = asyncio.run(_counts(settings))
        total = totals(by_location)
        out = state().output
        key_ids = list(dict.fromkeys([*ring.key_ids, *sorted(total)]))
        if out.as_json:
            out.json(
                {
                    "primary": ring.primary_id,
                    "keys": [
                        {
                            "key_id": k,
                            "in_keyring": k in ring,
                            "primary": k == ring.primary_id,
                            "secrets": total.get(k, 0),
                        }
                        for k in key_ids
                    ],
                    "by_location": by_location,
                    "rewrap_pending": sum(n for k, n in total.items() if k != ring.primary_id),
                    "keyring_file": str(path) if path else None,
                }
            )
            return
        out.table(
            ["key id", "secrets", "state"],
            [
                (
                    k,
                    total.get(k, 0),
                    "primary" if k == ring.primary_id else ("in keyring" if k in ring else "NOT IN KEYRING"),
                )
                for k in key_ids
            ],
        )
        pending = sum(n for k, n in total.items() if k != ring.primary_id)
        out.say(
            f"{pending} secrets still to rewrap to {ring.primary_id}."
            if pending
            else "Every secret uses the primary key."
        )

    @command(vault_group, "rotate")
    @click.option("--key-id", help="Id of the new key (default: k<n+1>).")
    @_options
    def rotate_cmd(key_id: str | None, data_dir: Path | None, store_url: str | None) -> None:
        """Add a fresh random master key as the primary one.

        Running controllers re-read the keyring file within A67_VAULT_KEYRING_POLL_SECONDS,
        encrypt new secrets with the new key and rewrap every stored secret under it.

        \b
        Examples:
          a67 vault rotate
          a67 vault rotate --key-id k2027
        """
        settings = _settings(data_dir, store_url)
        ring, path = _current_keyring(settings)
        if path is None:
            raise CliError(
                "The keyring comes from A67_MASTER_KEYS, which this command cannot change.",
                exit_code=USAGE,
                reason="KEYRING_NOT_A_FILE",
                hint="move it to a file (A67_MASTER_KEYS_FILE, mode 0600) and run this again, or append "
                "a new entry to A67_MASTER_KEYS and restart the controllers one by one",
            )
        try:
            if key_id is not None:
                validate_key_id(key_id)
            rotated = ring.rotate(key_id)
        except ValueError as exc:
            raise CliError(str(exc), exit_code=INVALID, reason="INVALID_KEY_ID") from None
        write_keyring(path, rotated)
        out = state().output
        if out.as_json:
            out.json(
                {"primary": rotated.primary_id, "keys": list(rotated.key_ids), "keyring_file": str(path)}
            )
        else:
            out.say(
                f"Added master key {rotated.primary_id} (primary) to {path}; running controllers rewrap "
                "stored secrets under it. Follow with: a67 vault status"
            )

    @command(vault_group, "retire")
    @click.argument("key_id")
    @_options
    def retire_cmd(key_id: str, data_dir: Path | None, store_url: str | None) -> None:
        """Remove a master key; refused while any stored secret still uses it.

        \b
        Example:
          a67 vault retire k1
        """
        settings = _settings(data_dir, store_url)
        ring, path = _current_keyring(settings)
        if key_id not in ring:
            raise CliError(
                f"There is no master key {key_id!r} in the keyring.", exit_code=INVALID, reason="UNKNOWN_KEY"
            )
        if key_id == ring.primary_id:
            raise CliError(
                f"{key_id} is the primary key; rotate first (a67 vault rotate).",
                exit_code=CONFLICT,
                reason="KEY_IS_PRIMARY",
            )
        in_use = totals(asyncio.run(_counts(settings))).get(key_id, 0)
        if in_use:
            raise CliError(
                f"{in_use} stored secrets still use master key {key_id}; it cannot be retired yet.",
                exit_code=CONFLICT,
                reason="KEY_IN_USE",
                hint="wait for the controllers' rewrap to finish (a67 vault status)",
            )
        remaining = ring.remove(key_id)
        out = state().output
        if path is None:
            message = (
                f"No secret uses {key_id}: remove its entry from A67_MASTER_KEYS and restart the controllers."
            )
        else:
            write_keyring(path, remaining)
            message = f"Retired master key {key_id} from {path}."
        if out.as_json:
            out.json(
                {
                    "retired": key_id,
                    "keys": list(remaining.key_ids),
                    "keyring_file": str(path) if path else None,
                }
            )
        else:
            out.say(message)
