"""The controller process: one ``grpc.aio`` server hosting every service.

:func:`start_controller` builds the whole object graph from :class:`Settings`
(store, cache, keys, services), binds the port and starts serving;
:meth:`Controller.stop` drains: health goes ``NOT_SERVING``, streams are told
to finish, in-flight RPCs get ``drain_grace_seconds`` and are then cancelled.
:func:`serve` runs it until SIGTERM or SIGINT and returns the exit code.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from automator67.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    deployment_pb2,
    deployment_pb2_grpc,
    metrics_pb2,
    metrics_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller import keepalive
from controller.api.auth_servicer import AuthServicer
from controller.api.deployment_servicer import DeploymentServicer
from controller.api.interceptors import ControllerInterceptor
from controller.api.metrics_servicer import MetricsServicer
from controller.api.node_servicer import NodeServicer
from controller.api.query_servicer import QueryServicer
from controller.api.storage_servicer import StorageServicer, raw_storage_messages
from controller.auth.mfa import MfaService
from controller.auth.passwords import PasswordHasher
from controller.auth.service import AuthService
from controller.auth.tokens import TokenService
from controller.cache import open_cache
from controller.cache.base import Cache
from controller.config import Settings
from controller.credentials.delivery import CredentialDelivery
from controller.credentials.providers import load_adapters
from controller.credentials.refresher import Refresher
from controller.credentials.service import NodeCredentialsService
from controller.credentials.states import CredentialStates
from controller.deployments.blobs import PackageStore
from controller.deployments.logs import ReplicaLogs
from controller.deployments.service import DeploymentService
from controller.errors import Unavailable
from controller.federation.query.workers import MergeWorkers
from controller.federation.repository import DatabaseRepository
from controller.federation.results import ShardResults
from controller.federation.service import DatabaseService
from controller.federation.shards import ResultCaps
from controller.federation.storage import StorageLimits, StorageService
from controller.federation.transactions import TransactionLog, TransactionManager
from controller.ingress.service import IngressService
from controller.ingress.snapshot import IngressOptions
from controller.keys import KeyMaterial, load_key_material
from controller.leases import LoopLeases
from controller.nodes.ca import CertificateAuthority
from controller.nodes.enrollment import EnrollmentTokens
from controller.nodes.fleet import Fleet
from controller.nodes.health import HealthConfig
from controller.nodes.registration import NodeRegistrar
from controller.nodes.relay import CommandRelay
from controller.nodes.repository import NodeRepository
from controller.nodes.watch import NodeWatch
from controller.nodes.watchers import NodeWatchers
from controller.registry import ControllerRegistry, live_controllers
from controller.store.db import Store, ensure_data_dir, redact
from controller.store.migrate import ensure_schema
from controller.store.repositories import AuthFailureRepository, RefreshTokenRepository, UserRepository
from controller.vault import Vault
from controller.vault.audit import SecretAuditLog
from controller.vault.keyfile import file_source, keyring_file
from controller.vault.rewrap import Rewrapper

log = logging.getLogger("a67.server")

SERVICE_NAMES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (auth_pb2, "AuthService"),
        (node_pb2, "NodeService"),
        (deployment_pb2, "DeploymentService"),
        (query_pb2, "QueryService"),
        (storage_pb2, "StorageService"),
        (metrics_pb2, "MetricsService"),
    )
)

# The largest response message sent (gRPC's default is unlimited). The largest request
# accepted is Settings.max_receive_message_bytes (gRPC's default is 4 MiB).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# The largest request metadata accepted (gRPC's default is 8 KiB, rejected from 16 KiB).
MAX_METADATA_BYTES = 128 * 1024


@dataclass
class Controller:
    """A running controller and everything it owns."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    store: Store
    cache: Cache
    keys: KeyMaterial
    auth: AuthService
    health: health.aio.HealthServicer
    fleet: Fleet
    deployments: DeploymentService
    ca: CertificateAuthority
    node_port: int | None
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    transactions: TransactionManager | None = None
    ingress: IngressService | None = None
    storage: StorageService | None = None
    shard_results: ShardResults | None = None
    merge_workers: MergeWorkers | None = None
    vault: Vault | None = None
    secret_audit: SecretAuditLog | None = None
    rewrapper: Rewrapper | None = None
    credentials: NodeCredentialsService | None = None
    refresher: Refresher | None = None
    replica_logs: ReplicaLogs | None = None
    node_watch: NodeWatch | None = None
    registry: ControllerRegistry | None = None
    loop_leases: LoopLeases | None = None
    relay: CommandRelay | None = None
    watchers: NodeWatchers | None = None

    @property
    def address(self) -> str:
        host = self.settings.listen_address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, finish in-flight RPCs within ``grace``, close resources."""
        if self.draining.is_set():
            return
        self.draining.set()
        await self.health.enter_graceful_shutdown()
        if self.rewrapper is not None:
            await self.rewrapper.stop()
        if self.refresher is not None:
            await self.refresher.stop()
        await self.deployments.stop()
        if self.storage is not None:
            await self.storage.stop()
        if self.ingress is not None:
            await self.ingress.stop()
        if self.transactions is not None:
            await self.transactions.stop()
        if self.watchers is not None:
            await self.watchers.stop()
        await self.fleet.stop()
        if self.relay is not None:
            await self.relay.close()
        grace = self.settings.drain_grace_seconds if grace is None else grace
        log.info("draining: health is NOT_SERVING; in-flight calls have %.1f s to finish", grace)
        await self.server.stop(grace)
        if self.secret_audit is not None:
            await self.secret_audit.stop()
        if self.merge_workers is not None:
            self.merge_workers.close()
        await self.cache.close()
        if self.loop_leases is not None:
            await self.loop_leases.release()
        if self.registry is not None:
            await self.registry.release()
        await self.store.close()
        log.info("stopped")


async def start_controller(settings: Settings) -> Controller:
    """Build every component from ``settings``, bind the port and start serving."""
    ensure_data_dir(settings.data_dir)
    keys = load_key_material(settings)
    user_credentials = user_port_credentials(settings) if settings.tls else None
    await ensure_schema(settings)
    store = await Store.open(settings.effective_store_url)
    controller_id = settings.resolved_controller_id()
    registry = ControllerRegistry(store, controller_id, allow_peers=settings.scale_out)
    try:
        await registry.claim()  # one controller per store: refuses if another serves it
    except BaseException:
        await store.close()
        raise
    cache = open_cache(settings.cache_url)
    tokens = TokenService(
        signing_key=keys.jwt_signing_key,
        key_id=keys.jwt_key_id,
        verification_keys=keys.verification_keys,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        access_ttl=settings.access_token_ttl_seconds,
        refresh_ttl=settings.refresh_token_ttl_seconds,
    )
    interval_ms = round(settings.heartbeat_interval_seconds * 1000)
    ca = CertificateAuthority.load_or_create(settings.keys_dir)
    nodes = NodeRepository(store)
    enrollment = EnrollmentTokens(store)
    fleet = Fleet(
        nodes=nodes,
        cache=cache,
        health_config=HealthConfig(
            interval_seconds=settings.heartbeat_interval_seconds,
            restart_grace_seconds=max(
                settings.node_restart_grace_seconds, 3 * settings.heartbeat_interval_seconds
            ),
        ),
    )
    fleet.holder_id = controller_id  # the store says which controller watches each node

    async def peers() -> set[str]:
        return await live_controllers(store)

    fleet.peers = peers
    vault = Vault(keys.keyring)
    secret_audit = SecretAuditLog(store)  # issue 16: every decryption, append-only
    vault.set_auditor(secret_audit.record)
    keyfile = keyring_file(settings.master_keys, settings.master_keys_file, settings.keys_dir)
    rewrapper = Rewrapper(  # master-key rotation: rewraps stored secrets in the background
        store,
        vault,
        keyring_source=file_source(keyfile) if keyfile is not None else None,
        poll_seconds=settings.vault_keyring_poll_seconds,
    )
    deployments = DeploymentService(
        store=store,
        fleet=fleet,
        vault=vault,
        reconcile_interval_seconds=settings.heartbeat_interval_seconds,
        packages=PackageStore(settings.data_dir / "packages", max_bytes=settings.max_package_bytes),
        controller_id=controller_id,
    )
    # The fleet-wide loops run where their leases are (one controller of those sharing the store).
    loop_leases = LoopLeases(store, controller_id)
    rewrapper.loop_leases = loop_leases
    deployments.loop_leases = loop_leases
    deployments.share_packages = settings.scale_out  # any controller can hand a node any package
    storage = StorageService(
        store=store,
        controller_id=controller_id,
        fleet=fleet,
        vault=vault,
        limits=StorageLimits(
            chunk_bytes=settings.storage_chunk_bytes,
            max_bytes_per_user=settings.storage_max_bytes_per_user,
            max_files_per_user=settings.storage_max_files_per_user,
            gc_grace_seconds=settings.storage_gc_grace_seconds,
            gc_interval_seconds=settings.storage_gc_interval_seconds,
            repair_interval_seconds=settings.storage_repair_interval_seconds,
            repair_rate_per_second=settings.storage_repair_rate_per_second,
        ),
    )

    async def on_node_failed(node_id: str, user_id: str) -> None:
        await storage.on_node_failed(node_id, user_id)  # only wakes the repairer: never slow
        await deployments.on_node_failed(node_id, user_id)

    storage.loop_leases = loop_leases
    fleet.recovery_handler = on_node_failed
    fleet.replica_report_handler = deployments.on_replicas_reported
    ingress: IngressService | None = None
    if settings.xds_listen_address:
        ingress = IngressService(
            fleet=fleet,
            users=UserRepository(store),
            listen_address=settings.xds_listen_address,
            options=IngressOptions(apps_domain=settings.apps_domain),
            public_url=settings.ingress_url,
        )
        deployments.on_change = ingress.deployment_changed
        fleet.app_traffic = ingress.node_traffic
        deployments.drain_seconds = settings.ingress_drain_seconds
    # Provider tokens: refreshed before expiry, revocable, delivered sealed (controller/credentials/).
    credential_states = CredentialStates(store)
    delivery = CredentialDelivery(
        states=credential_states, vault=vault, cache=cache, streams=fleet.streams, load_node=nodes.get
    )
    refresher = Refresher(
        states=credential_states,
        vault=vault,
        adapters=load_adapters(
            settings.provider_oauth, timeout_seconds=settings.credential_http_timeout_seconds
        ),
        share=settings.credential_refresh_share,
        jitter=settings.credential_refresh_jitter,
        rate_per_second=settings.credential_refresh_rate_per_second,
        concurrency=settings.credential_refresh_concurrency,
        lease_seconds=settings.credential_refresh_lease_seconds,
        poll_seconds=settings.credential_refresh_poll_seconds,
        backoff_seconds=settings.credential_refresh_backoff_seconds,
        on_changed=delivery.changed,
        alert=deployments.alerts.add,
        owner=controller_id,
    )
    node_credentials = NodeCredentialsService(
        states=credential_states, vault=vault, delivery=delivery, refresher=refresher
    )
    registrar = NodeRegistrar(
        store,
        enrollment,
        nodes,
        ca,
        vault,
        controller_endpoint=settings.node_advertise_address or settings.node_listen_address,
        heartbeat_interval_ms=interval_ms,
        credential_schedule=refresher.schedule,
    )
    users = UserRepository(store)
    auth = AuthService(
        users=users,
        refresh_tokens=RefreshTokenRepository(store),
        failures=AuthFailureRepository(store),
        tokens=tokens,
        passwords=PasswordHasher(),
        cache=cache,
        mfa=MfaService(store, vault),
    )
    server = grpc.aio.server(
        interceptors=[ControllerInterceptor(auth)],
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Whatever headers the gateway accepts (60 KiB, and the transcoder copies the
            # path into x-envoy-original-path) must reach a servicer, not end in a 429.
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            # One process per port: a second controller on a port in use fails to bind
            # instead of sharing (and silently splitting) its connections.
            ("grpc.so_reuseport", 0),
            *keepalive.server_options(interval_ms),
        ],
    )
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(auth, users, secret_audit), server)
    # shard statements' rows (NodeService.PushShardResult)
    shard_results = ShardResults(settings.shard_result_queue_batches)
    replica_logs = ReplicaLogs(fleet.streams)  # app logs (GetReplicaLogs; NodeService.PushReplicaLogs)
    merge_workers = MergeWorkers(settings.query_merge_processes)  # StreamQuery merges, off the GIL
    draining = asyncio.Event()
    node_watch = NodeWatch(fleet, stop=draining)  # WatchNodes: ends when the controller drains
    node_pb2_grpc.add_NodeServiceServicer_to_server(
        NodeServicer(
            fleet=fleet,
            nodes=nodes,
            enrollment=enrollment,
            registrar=registrar,
            ca=ca,
            heartbeat_interval_ms=interval_ms,
            deployments_on=deployments.deployments_on_async,
            alerts=deployments.alerts,
            serve_package=deployments.serve_package,
            storage=storage,
            shard_results=shard_results,
            credentials=node_credentials,
            replica_logs=replica_logs.slots,
            watch=node_watch,
            controller_endpoints=lambda: (registry.endpoints_version, registry.node_endpoints),
        ),
        # FetchChunk sends serialized messages as they are
        raw_storage_messages(server),
    )
    deployment_pb2_grpc.add_DeploymentServiceServicer_to_server(
        DeploymentServicer(deployments, ingress, logs=replica_logs), server
    )
    transactions = TransactionManager(
        log_store=TransactionLog(store, controller_id), streams=fleet.streams, results=shard_results
    )
    query_pb2_grpc.add_QueryServiceServicer_to_server(
        QueryServicer(
            DatabaseService(
                databases=DatabaseRepository(store),
                nodes=nodes,
                streams=fleet.streams,
                vault=vault,
                cache=cache,
                transactions=transactions,
                shard_results=shard_results,
                max_query_bytes=settings.max_query_bytes,
                stream_caps=ResultCaps(settings.stream_shard_max_rows, settings.stream_shard_max_bytes),
                max_result_rows=settings.max_result_rows,
                collect_shard_bytes=settings.collect_shard_max_bytes,
                merge_workers=merge_workers,
                shared_write_order=settings.scale_out,
            )
        ),
        server,
    )
    # UploadFile's data reaches the service uncopied
    storage_pb2_grpc.add_StorageServiceServicer_to_server(
        StorageServicer(storage), raw_storage_messages(server)
    )

    metrics_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsServicer(fleet, nodes, draining), server)
    health_servicer = health.aio.HealthServicer()
    # grpc's servicer starts with the server ("") SERVING: not until everything below runs
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    node_port: int | None = None
    node_address = "-"
    try:
        if user_credentials is not None:
            port = server.add_secure_port(settings.listen_address, user_credentials)
        else:
            port = server.add_insecure_port(settings.listen_address)
        if settings.node_listen_address:
            host = settings.node_listen_address.rsplit(":", 1)[0].strip("[]")
            key_pem, cert_pem = ca.server_certificate([host, "localhost"])
            credentials = grpc.ssl_server_credentials(
                [(key_pem, cert_pem)], root_certificates=ca.ca_cert_pem, require_client_auth=True
            )
            node_port = server.add_secure_port(settings.node_listen_address, credentials)
            node_address = f"{settings.node_listen_address.rsplit(':', 1)[0]}:{node_port}"
            if not settings.node_advertise_address:
                # Advertise the port really bound (the setting may say port 0).
                registrar.controller_endpoint = node_address
    except (RuntimeError, OSError) as exc:
        await cache.close()
        await registry.release()
        await store.close()
        raise Unavailable(f"Cannot listen: {exc}", reason="BIND_FAILED") from exc
    await server.start()
    if ingress is not None:
        try:
            await ingress.start()
        except (RuntimeError, OSError) as exc:
            await server.stop(0)
            await cache.close()
            await registry.release()
            await store.close()
            raise Unavailable(f"Cannot listen for xDS: {exc}", reason="BIND_FAILED") from exc
    if node_port is not None:
        await registry.set_node_endpoint(registrar.controller_endpoint)  # told to nodes (scale-out)
    relay: CommandRelay | None = None
    if settings.scale_out:
        # Commands for nodes whose stream another controller holds go through it, over the
        # Redis cache (A67_SCALE_OUT is refused without one).
        relay = CommandRelay(
            settings.cache_url,
            controller_id,
            fleet.streams.send_local,
            nodes.stream_holder,
            reply_to=registrar.controller_endpoint,  # this node port, as nodes dial it
        )
        relay.start()
        fleet.streams.relay = relay
    secret_audit.start()
    rewrapper.start()
    refresher.start()
    await fleet.start()
    watchers = NodeWatchers(fleet, peers, loop_leases, settings.heartbeat_interval_seconds)
    watchers.start()
    await deployments.start()
    await storage.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    controller = Controller(
        settings=settings,
        server=server,
        port=port,
        store=store,
        cache=cache,
        keys=keys,
        auth=auth,
        health=health_servicer,
        fleet=fleet,
        deployments=deployments,
        ca=ca,
        node_port=node_port,
        draining=draining,
        transactions=transactions,
        ingress=ingress,
        storage=storage,
        shard_results=shard_results,
        merge_workers=merge_workers,
        vault=vault,
        secret_audit=secret_audit,
        rewrapper=rewrapper,
        credentials=node_credentials,
        refresher=refresher,
        replica_logs=replica_logs,
        node_watch=node_watch,
        registry=registry,
        loop_leases=loop_leases,
        relay=relay,
        watchers=watchers,
    )
    transactions.start()
    log.info(
        "serving on %s (%s), nodes on %s (mutual TLS), xDS on %s (store %s, cache %s)",
        controller.address,
        "TLS" if settings.tls else "plaintext",
        node_address,
        ingress.address if ingress is not None else "-",
        store.url,
        redact(settings.cache_url),
    )
    return controller


def user_port_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS (no client certificate) for the user-facing port, from ``tls_cert`` and ``tls_key``."""
    try:
        cert_pem = Path(settings.tls_cert).read_bytes()
        key_pem = Path(settings.tls_key).read_bytes()
        # gRPC reads the pair only at the first handshake; check it now, while we can say why.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.tls_cert, settings.tls_key)
    except OSError as exc:  # ssl.SSLError is one
        raise Unavailable(
            f"Cannot use the TLS certificate {settings.tls_cert} with the key {settings.tls_key}: "
            f"{exc.strerror or exc}",
            reason="BAD_TLS",
        ) from None
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


async def serve(settings: Settings) -> int:
    """Run the controller until SIGTERM/SIGINT, then drain; the process exit code.

    The signal handlers come first: a SIGTERM while the controller is still starting (its
    port may already answer) is kept and drains it as soon as it is up."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    controller = await start_controller(settings)
    if controller.registry is not None:
        controller.registry.on_lost = stop.set  # another controller took the store: drain, exit
    await stop.wait()
    log.info("received a stop signal")
    await controller.stop()
    return 0
