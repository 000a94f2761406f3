"""``automator67.v1.StorageService`` over :class:`~controller.federation.storage.StorageService`,
and the storage RPCs of the node port (FetchChunk, PushChunk, ReportChunks).

Two methods move bulk bytes without protobuf copies (:func:`raw_storage_messages`):
``StorageService.UploadFile`` takes its requests serialized (a data message is read as a
view of the bytes gRPC received; :func:`upload_part`), and ``NodeService.FetchChunk``
sends responses that are already serialized (made once per chunk, shared by its copies).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, TypeAlias, cast

import grpc
from automator67.v1 import node_pb2, storage_pb2, storage_pb2_grpc
from google.api import httpbody_pb2

from controller.api.context import current_principal
from controller.api.http import set_http_status
from controller.errors import FieldViolation, InvalidArgument
from controller.federation.storage import StorageService
from controller.federation.storage.plan import ReportedCopy, parse_range
from controller.wire import only_bytes_field

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

PATH_HEADER = "x-a67-path"
REPLICAS_HEADER = "x-a67-replicas"
LENGTH_HEADER = "x-a67-content-length"
"""Set on REST downloads: the gateway's Lua filter turns it into Content-Length."""


UPLOAD_FILE_METHOD = "/automator67.v1.StorageService/UploadFile"
FETCH_CHUNK_METHOD = "/automator67.v1.NodeService/FetchChunk"
_DATA_TAG = 0x12  # UploadFileRequest.data: field 2, length-delimited


def upload_part(raw: bytes | storage_pb2.UploadFileRequest) -> storage_pb2.UploadFileRequest | memoryview:
    """A serialized ``UploadFileRequest``: the bytes of its ``data`` as a view of ``raw``
    when the message is just that field (no copy), else the parsed message.

    >>> bytes(upload_part(storage_pb2.UploadFileRequest(data=b"x" * 300).SerializeToString()))[:3]
    b'xxx'
    >>> upload_part(storage_pb2.UploadFileRequest(metadata={"path": "a"}).SerializeToString()).metadata.path
    'a'
    """
    if not isinstance(raw, bytes):
        return raw  # already parsed (a caller that is not the gRPC server)
    data = only_bytes_field(raw, _DATA_TAG)
    return data if data is not None else storage_pb2.UploadFileRequest.FromString(raw)


def _raw(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same method handler, made again with gRPC's public constructors, without the
    (de)serializer of its bulk bytes (None: gRPC hands over / sends the bytes as they are)."""
    if method == UPLOAD_FILE_METHOD:
        return grpc.stream_unary_rpc_method_handler(
            handler.stream_unary,
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
    if method == FETCH_CHUNK_METHOD:
        return grpc.unary_stream_rpc_method_handler(
            handler.unary_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=None,
        )
    return handler


class _RawGeneric:
    """A generic handler (gRPC calls its ``service``) that registers raw methods."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        return None if handler is None else _raw(handler_call_details.method, handler)


class _RawStorageMessages:
    """What the generated ``add_*Servicer_to_server`` functions call on a server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_RawGeneric(h) for h in handlers])

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {name: _raw(f"/{service}/{name}", h) for name, h in handlers.items()}
        )


def raw_storage_messages(server: grpc.aio.Server) -> grpc.aio.Server:
    """``server`` for ``add_StorageServiceServicer_to_server`` and
    ``add_NodeServiceServicer_to_server``: their bulk-byte methods are registered without
    protobuf (de)serialization of the bytes (see the module docstring); every other
    method as generated."""
    return cast(grpc.aio.Server, _RawStorageMessages(server))


def _header(context: Context, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    def __init__(self, service: StorageService) -> None:
        self._service = service

    async def UploadFile(
        self,
        request_iterator: AsyncIterator[bytes | storage_pb2.UploadFileRequest],
        context: Context,
    ) -> storage_pb2.UploadFileResponse:
        """The requests come serialized (:func:`raw_storage_messages`; parsed ones are
        taken too): the data messages' bytes reach the service as views, uncopied."""
        user_id = current_principal().user_id
        iterator = aiter(request_iterator)
        try:
            part = upload_part(await anext(iterator))
        except StopAsyncIteration:
            part = storage_pb2.UploadFileRequest()
        first = part if isinstance(part, storage_pb2.UploadFileRequest) else storage_pb2.UploadFileRequest()
        if first.WhichOneof("part") != "metadata":
            raise InvalidArgument(
                "An upload must start with its metadata",
                reason="METADATA_EXPECTED",
                field_violations=[FieldViolation("metadata", "the first message must carry the metadata")],
            )

        async def data() -> AsyncIterator[bytes | memoryview]:
            async for raw in iterator:
                message = upload_part(raw)
                if isinstance(message, memoryview):
                    yield message
                    continue
                if message.WhichOneof("part") != "data":
                    raise InvalidArgument(
                        "Only the first message of an upload carries metadata",
                        reason="UNEXPECTED_METADATA",
                        field_violations=[FieldViolation("metadata", "only allowed in the first message")],
                    )
                yield message.data

        stored = await self._service.upload(user_id, first.metadata, data())
        return storage_pb2.UploadFileResponse(file=stored)

    async def UploadFileBody(
        self, request_iterator: AsyncIterator[httpbody_pb2.HttpBody], context: Context
    ) -> storage_pb2.UploadFileBodyResponse:
        user_id = current_principal().user_id
        replicas_text = _header(context, REPLICAS_HEADER)
        try:
            replicas = int(replicas_text) if replicas_text else 0
        except ValueError:
            raise InvalidArgument(
                f"The {REPLICAS_HEADER} header must be a number from 1 to 5",
                field_violations=[FieldViolation("metadata.replicas", "must be a number from 1 to 5")],
            ) from None
        iterator = aiter(request_iterator)
        first: httpbody_pb2.HttpBody | None = None
        try:
            first = await anext(iterator)
        except StopAsyncIteration:
            first = None
        content_type = (first.content_type if first is not None else "") or _header(context, "content-type")
        metadata = storage_pb2.UploadFileMetadata(
            path=_header(context, PATH_HEADER), mime_type=content_type.strip(), replicas=replicas
        )

        async def data() -> AsyncIterator[bytes]:
            if first is not None:
                yield first.data
            async for message in iterator:
                yield message.data

        stored = await self._service.upload(user_id, metadata, data())
        await set_http_status(context, 201)
        return storage_pb2.UploadFileBodyResponse(file=stored)

    async def DownloadFile(
        self, request: storage_pb2.DownloadFileRequest, context: Context
    ) -> AsyncIterator[storage_pb2.DownloadFileResponse]:
        user_id = current_principal().user_id
        file, offset, _length, pieces = await self._service.open_download(
            user_id, request.file_id, request.offset, request.length
        )
        position = offset
        first = True
        async for piece in pieces:
            message = storage_pb2.DownloadFileResponse(data=piece, offset=position)
            if first:
                message.file.CopyFrom(file)
                first = False
            position += len(piece)
            yield message
        if first:
            yield storage_pb2.DownloadFileResponse(offset=position, file=file)

    async def DownloadFileBody(
        self, request: storage_pb2.DownloadFileBodyRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        user_id = current_principal().user_id
        file = await self._service.get(user_id, request.file_id)
        wanted = _header(context, "range")
        try:
            chosen = parse_range(wanted, file.size) if wanted else None
        except ValueError as exc:
            raise InvalidArgument(
                f"The range cannot be satisfied: {exc}",
                reason="RANGE_NOT_SATISFIABLE",
                field_violations=[FieldViolation("range", str(exc))],
                metadata={"size": str(file.size)},
            ) from None
        offset, length = chosen if chosen is not None else (0, file.size)
        file, offset, length, pieces = await self._service.open_download(
            user_id, request.file_id, offset, length
        )
        headers = [(LENGTH_HEADER, str(length)), ("accept-ranges", "bytes")]
        if chosen is not None:
            headers += [
                ("x-a67-http-status", "206"),
                ("content-range", f"bytes {offset}-{offset + length - 1}/{file.size}"),
            ]
        await context.send_initial_metadata(tuple(headers))
        sent = False
        async for piece in pieces:
            yield httpbody_pb2.HttpBody(content_type=file.mime_type if not sent else "", data=piece)
            sent = True
        if not sent:
            yield httpbody_pb2.HttpBody(content_type=file.mime_type)

    async def GetFile(
        self, request: storage_pb2.GetFileRequest, context: Context
    ) -> storage_pb2.GetFileResponse:
        return storage_pb2.GetFileResponse(
            file=await self._service.get(current_principal().user_id, request.file_id)
        )

    async def ListFiles(
        self, request: storage_pb2.ListFilesRequest, context: Context
    ) -> storage_pb2.ListFilesResponse:
        files, token = await self._service.list_files(
            current_principal().user_id, request.prefix, request.page_size, request.page_token
        )
        return storage_pb2.ListFilesResponse(files=files, next_page_token=token)

    async def DeleteFile(
        self, request: storage_pb2.DeleteFileRequest, context: Context
    ) -> storage_pb2.DeleteFileResponse:
        await self._service.delete(current_principal().user_id, request.file_id)
        return storage_pb2.DeleteFileResponse()


# -- the node port ------------------------------------------------------------------------------


async def fetch_chunk(
    service: StorageService, node_id: str, request: node_pb2.FetchChunkRequest
) -> AsyncIterator[bytes]:
    """Serialized ``FetchChunkResponse`` messages, made once per chunk and shared by its
    copies (StorageService); sent as they are (:func:`raw_storage_messages`)."""
    for message in service.transfers.serve(node_id, request.transfer_id):
        yield cast(bytes, message)


async def push_chunk(
    service: StorageService, node_id: str, requests: AsyncIterator[node_pb2.PushChunkRequest]
) -> node_pb2.PushChunkResponse:
    iterator = aiter(requests)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        raise InvalidArgument("A push must name its transfer", reason="TRANSFER_EXPECTED") from None

    async def pieces() -> AsyncIterator[bytes]:
        yield first.data
        async for message in iterator:
            yield message.data

    await service.transfers.receive(node_id, first.transfer_id, first.error, pieces())
    return node_pb2.PushChunkResponse()


async def report_chunks(
    service: StorageService, node_id: str, requests: AsyncIterator[node_pb2.ReportChunksRequest]
) -> node_pb2.ReportChunksResponse:
    reports: list[ReportedCopy] = []
    complete = False
    async for message in requests:
        reports.extend(ReportedCopy(c.chunk_id, c.sha256, c.size, c.corrupt) for c in message.chunks)
        if len(reports) > 10_000_000:
            raise InvalidArgument("The inventory is too large", reason="INVENTORY_TOO_LARGE")
        complete = complete or message.complete
    await service.chunks_reported(node_id, reports, complete)
    return node_pb2.ReportChunksResponse()
