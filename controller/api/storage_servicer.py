"""``automator67.v1.StorageService`` over :class:`~controller.federation.storage.StorageService`,
and the storage RPCs of the node port (FetchChunk, PushChunk, ReportChunks)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias, cast

import grpc
from automator67.v1 import node_pb2, storage_pb2, storage_pb2_grpc
from google.api import httpbody_pb2

from controller.api.context import current_principal
from controller.api.http import set_http_status
from controller.errors import FieldViolation, InvalidArgument
from controller.federation.storage import StorageService
from controller.federation.storage.plan import ReportedCopy, parse_range

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

PATH_HEADER = "x-a67-path"
REPLICAS_HEADER = "x-a67-replicas"
LENGTH_HEADER = "x-a67-content-length"
"""Set on REST downloads: the gateway's Lua filter turns it into Content-Length."""


def _header(context: Context, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    def __init__(self, service: StorageService) -> None:
        self._service = service

    async def UploadFile(
        self, request_iterator: AsyncIterator[storage_pb2.UploadFileRequest], context: Context
    ) -> storage_pb2.UploadFileResponse:
        user_id = current_principal().user_id
        iterator = aiter(request_iterator)
        try:
            first = await anext(iterator)
        except StopAsyncIteration:
            first = storage_pb2.UploadFileRequest()
        if first.WhichOneof("part") != "metadata":
            raise InvalidArgument(
                "An upload must start with its metadata",
                reason="METADATA_EXPECTED",
                field_violations=[FieldViolation("metadata", "the first message must carry the metadata")],
            )

        async def data() -> AsyncIterator[bytes]:
            async for message in iterator:
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
) -> AsyncIterator[node_pb2.FetchChunkResponse]:
    # The messages are made once per chunk and shared by its copies (StorageService).
    for message in service.transfers.serve(node_id, request.transfer_id):
        yield cast(node_pb2.FetchChunkResponse, message)


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
