"""Message and transfer limits shared by the controller and the agent (one definition).

The node stream (``NodeService.Connect``) carries **control messages only**: every
message on it is at most :data:`CONTROL_MESSAGE_MAX_BYTES` (256 KiB). Bytes (packages)
move in chunks of :data:`CHUNK_BYTES` over their own streaming RPCs
(``NodeService.FetchPackage`` on the node port, ``DeploymentService.UploadSource`` on
the user port), so a big package never rides the stream that carries heartbeats.

Both ends set gRPC's per-message limits of the node channel from
:func:`node_channel_options` (the agent's channel; the controller checks what it sends
on the stream against :data:`CONTROL_MESSAGE_MAX_BYTES` before sending, and refuses an
oversized command with a clear error instead of letting gRPC kill the stream).

>>> CHUNK_BYTES + CHUNK_OVERHEAD_BYTES <= NODE_CHANNEL_MAX_MESSAGE_BYTES
True
>>> CONTROL_MESSAGE_MAX_BYTES <= NODE_CHANNEL_MAX_MESSAGE_BYTES
True
"""

from __future__ import annotations

from google.protobuf.message import Message

CONTROL_MESSAGE_MAX_BYTES = 256 * 1024
"""Largest message either end sends on ``NodeService.Connect`` (serialized size)."""

CHUNK_BYTES = 192 * 1024
"""Bytes of package data in one chunk message (upload and fetch)."""

CHUNK_OVERHEAD_BYTES = 1024
"""What a chunk message carries beside its data (field tags, offset, lengths)."""

NODE_CHANNEL_MAX_MESSAGE_BYTES = CONTROL_MESSAGE_MAX_BYTES + 4 * 1024
"""gRPC's send and receive limit on the agent's channels to the node port: the control
bound plus framing slack. A message over it would fail the whole call."""

SQL_INLINE_MAX_BYTES = 64 * 1024
"""A shard statement's SQL longer than this (UTF-8) is not sent in its command: the node
fetches it with ``NodeService.FetchStatement`` (controller/nodes/statements.py)."""

DEFAULT_MAX_PACKAGE_BYTES = 1024 * 1024 * 1024
"""Largest uploaded source by default (1 GiB; ``A67_MAX_PACKAGE_BYTES``)."""

FETCH_ATTEMPTS = 8
"""How many times an agent (re)starts one package download before giving up."""


class MessageTooLarge(ValueError):
    """A control message is over :data:`CONTROL_MESSAGE_MAX_BYTES`."""


def node_channel_options() -> list[tuple[str, int]]:
    """gRPC message limits of a channel to the node port (the agent sets these)."""
    return [
        ("grpc.max_send_message_length", NODE_CHANNEL_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", NODE_CHANNEL_MAX_MESSAGE_BYTES),
    ]


def check_control_message(message: Message, what: str) -> int:
    """The serialized size of ``message``; :class:`MessageTooLarge` if it is over the bound."""
    size = message.ByteSize()
    if size > CONTROL_MESSAGE_MAX_BYTES:
        raise MessageTooLarge(
            f"{what} is {size} bytes, over the node stream's limit of {CONTROL_MESSAGE_MAX_BYTES} "
            "bytes (256 KiB): bulk data must move over its own streaming RPC"
        )
    return size
