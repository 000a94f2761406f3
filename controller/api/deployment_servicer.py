"""``automator67.v1.DeploymentService``: the RPCs over :class:`DeploymentService`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from automator67.v1 import deployment_pb2, deployment_pb2_grpc
from google.api import httpbody_pb2

from controller.api.context import current_principal
from controller.api.http import set_http_status
from controller.deployments.logs import ReplicaLogs
from controller.deployments.service import STATUS_ENUM, DeploymentService
from controller.errors import FieldViolation, InvalidArgument, Unavailable
from controller.ingress.service import IngressService

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class DeploymentServicer(deployment_pb2_grpc.DeploymentServiceServicer):
    def __init__(
        self,
        service: DeploymentService,
        ingress: IngressService | None = None,
        *,
        logs: ReplicaLogs | None = None,
    ) -> None:
        self._service = service
        self._ingress = ingress
        self._logs = logs

    async def _proto(self, row: Any) -> deployment_pb2.Deployment:
        """The deployment as returned, with its ingress URLs and traffic when there is an ingress."""
        deployment = self._service.to_proto(row)
        if self._ingress is not None:
            await self._ingress.describe(deployment)
        return deployment

    async def CreateDeployment(
        self, request: deployment_pb2.CreateDeploymentRequest, context: Context
    ) -> deployment_pb2.CreateDeploymentResponse:
        deployment_id, status = await self._service.create(current_principal().user_id, request)
        await set_http_status(context, 202)
        return deployment_pb2.CreateDeploymentResponse(
            deployment_id=deployment_id,
            status=STATUS_ENUM.get(status, deployment_pb2.DEPLOYMENT_STATUS_UNSPECIFIED),
        )

    async def GetDeployment(
        self, request: deployment_pb2.GetDeploymentRequest, context: Context
    ) -> deployment_pb2.GetDeploymentResponse:
        row = await self._service.owned(current_principal().user_id, request.deployment_id)
        return deployment_pb2.GetDeploymentResponse(deployment=await self._proto(row))

    async def ListDeployments(
        self, request: deployment_pb2.ListDeploymentsRequest, context: Context
    ) -> deployment_pb2.ListDeploymentsResponse:
        rows, token = await self._service.repo.list_for_user(
            current_principal().user_id, request.page_size, request.page_token
        )
        return deployment_pb2.ListDeploymentsResponse(
            deployments=[await self._proto(row) for row in rows], next_page_token=token
        )

    async def WatchDeployment(
        self, request: deployment_pb2.WatchDeploymentRequest, context: Context
    ) -> AsyncIterator[deployment_pb2.WatchDeploymentResponse]:
        row = await self._service.owned(current_principal().user_id, request.deployment_id)
        async for event in self._service.watch(row):
            yield event

    async def GetReplicaLogs(
        self, request: deployment_pb2.GetReplicaLogsRequest, context: Context
    ) -> AsyncIterator[deployment_pb2.GetReplicaLogsResponse]:
        """The replicas' output (controller/deployments/logs.py); another user's app is NOT_FOUND."""
        row = await self._service.owned(current_principal().user_id, request.deployment_id)
        if self._logs is None:
            raise Unavailable("This controller cannot read app logs", reason="LOGS_UNAVAILABLE")
        repo = self._service.repo
        async for batch in self._logs.stream(row, request, placement=lambda: repo.get(row.id)):
            yield batch

    async def ScaleDeployment(
        self, request: deployment_pb2.ScaleDeploymentRequest, context: Context
    ) -> deployment_pb2.ScaleDeploymentResponse:
        row = await self._service.owned(current_principal().user_id, request.deployment_id)
        scaled = await self._service.scale(row, request.replicas)
        return deployment_pb2.ScaleDeploymentResponse(deployment=self._service.to_proto(scaled))

    async def DeleteDeployment(
        self, request: deployment_pb2.DeleteDeploymentRequest, context: Context
    ) -> deployment_pb2.DeleteDeploymentResponse:
        row = await self._service.owned(current_principal().user_id, request.deployment_id)
        await self._service.delete(row)
        return deployment_pb2.DeleteDeploymentResponse()

    async def ResolveEndpoint(
        self, request: deployment_pb2.ResolveEndpointRequest, context: Context
    ) -> deployment_pb2.ResolveEndpointResponse:
        row = await self._service.owned(current_principal().user_id, request.deployment_id)
        return self._service.resolve(row)

    async def UpdateDeployment(
        self, request: deployment_pb2.UpdateDeploymentRequest, context: Context
    ) -> deployment_pb2.UpdateDeploymentResponse:
        row = await self._service.owned(current_principal().user_id, request.deployment_id)
        updated = await self._service.update(row, request)
        await set_http_status(context, 202)
        return deployment_pb2.UpdateDeploymentResponse(deployment=self._service.to_proto(updated))

    async def RollbackDeployment(
        self, request: deployment_pb2.RollbackDeploymentRequest, context: Context
    ) -> deployment_pb2.RollbackDeploymentResponse:
        row = await self._service.owned(current_principal().user_id, request.deployment_id)
        rolled = await self._service.rollback(row, request.version)
        await set_http_status(context, 202)
        return deployment_pb2.RollbackDeploymentResponse(deployment=self._service.to_proto(rolled))

    async def UploadSource(
        self, request_iterator: AsyncIterator[deployment_pb2.UploadSourceRequest], context: Context
    ) -> deployment_pb2.UploadSourceResponse:
        user_id = current_principal().user_id
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "metadata":
            raise InvalidArgument(
                "An upload starts with a metadata message, then sends chunks",
                reason="UPLOAD_METADATA_EXPECTED",
                field_violations=[FieldViolation("metadata", "must be the first message")],
            )

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.WhichOneof("kind") != "chunk":
                    raise InvalidArgument(
                        "Only the first message of an upload holds metadata",
                        reason="UPLOAD_METADATA_REPEATED",
                        field_violations=[FieldViolation("metadata", "must be sent once, first")],
                    )
                yield message.chunk

        stored = await self._service.sources.receive(
            user_id, chunks(), expected_size=first.metadata.size, expected_sha256=first.metadata.sha256
        )
        return deployment_pb2.UploadSourceResponse(sha256=stored.sha256, size=stored.size)

    async def UploadSourceBody(
        self, request_iterator: AsyncIterator[httpbody_pb2.HttpBody], context: Context
    ) -> deployment_pb2.UploadSourceBodyResponse:
        user_id = current_principal().user_id

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                yield message.data

        stored = await self._service.sources.receive(user_id, chunks())
        await set_http_status(context, 201)
        return deployment_pb2.UploadSourceBodyResponse(sha256=stored.sha256, size=stored.size)
