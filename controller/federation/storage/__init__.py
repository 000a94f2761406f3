"""Storage federation: files chunked, encrypted and replicated across storage nodes.

* :mod:`.crypto` — per-file data keys (wrapped by the vault), AES-256-GCM chunks;
* :mod:`.plan` — pure decisions: path rules, replication status, repair plans,
  inventory reconciliation, GC due dates, the repair rate limit, HTTP ranges;
* :mod:`.transfers` — chunk bytes in flight to and from nodes (FetchChunk/PushChunk);
* :mod:`.service` — the harness: upload, download, metadata, repair, inventory, GC.

See docs/storage.md.
"""

from controller.federation.storage.service import StorageLimits, StorageService

__all__ = ["StorageLimits", "StorageService"]
