"""``a67 deploy [DIR]`` and ``a67 apps`` (list), ``apps show|url|scale|update|rollback|remove``."""

from __future__ import annotations

import queue
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from automator67.v1 import deployment_pb2
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

from controller.client.app import command, common_options, state
from controller.client.appdir import PackedSource, app_type_value, load_manifest, pack, parse_env_flags
from controller.client.errors import FAILED, NOT_FOUND, UNREACHABLE, CliError
from controller.client.render import Output, enum_label, message_dict, transfer_progress, when
from controller.client.session import Connection, Stream
from controller.limits import CHUNK_BYTES

POLL_SECONDS = 2.0
"""How often the rollout's state is also read directly while following its events."""

RUNNING = deployment_pb2.DEPLOYMENT_STATUS_RUNNING
FAILED_STATUS = deployment_pb2.DEPLOYMENT_STATUS_FAILED


def status_label(status: deployment_pb2.DeploymentStatus.ValueType) -> str:
    return enum_label(deployment_pb2.DeploymentStatus.Name(status), "DEPLOYMENT_STATUS_")


def type_label(app_type: deployment_pb2.AppType.ValueType) -> str:
    return enum_label(deployment_pb2.AppType.Name(app_type), "APP_TYPE_")


def all_apps(conn: Connection) -> Iterator[deployment_pb2.Deployment]:
    token = ""
    while True:
        reply = conn.call(
            conn.deployments.ListDeployments,
            deployment_pb2.ListDeploymentsRequest(page_size=100, page_token=token),
        )
        yield from reply.deployments
        token = reply.next_page_token
        if not token:
            return


def lookup_app(conn: Connection, ref: str) -> deployment_pb2.Deployment | None:
    for app in all_apps(conn):
        if ref in (app.name, app.id):
            return app
    return None


def find_app(conn: Connection, ref: str) -> deployment_pb2.Deployment:
    app = lookup_app(conn, ref)
    if app is None:
        raise CliError(
            f"You have no app named {ref!r}.",
            exit_code=NOT_FOUND,
            reason="APP_NOT_FOUND",
            hint="list them: a67 apps",
        )
    return app


def get_app(conn: Connection, deployment_id: str) -> deployment_pb2.Deployment:
    reply: deployment_pb2.GetDeploymentResponse = conn.call(
        conn.deployments.GetDeployment, deployment_pb2.GetDeploymentRequest(deployment_id=deployment_id)
    )
    return reply.deployment


# -- upload ----------------------------------------------------------------------------------


def _chunks(
    packed: PackedSource, progress: Progress | None, task: Any
) -> Iterator[deployment_pb2.UploadSourceRequest]:
    yield deployment_pb2.UploadSourceRequest(
        metadata=deployment_pb2.UploadSourceMetadata(size=packed.size, sha256=packed.sha256)
    )
    packed.file.seek(0)
    while chunk := packed.file.read(CHUNK_BYTES):
        yield deployment_pb2.UploadSourceRequest(chunk=chunk)
        if progress is not None:
            progress.advance(task, len(chunk))


def upload(conn: Connection, packed: PackedSource, out: Output) -> str:
    """Upload the packed source with ``UploadSource`` (a progress bar on a terminal); its SHA-256."""
    progress = transfer_progress(out, "uploading")
    with progress:
        task = progress.add_task("upload", total=packed.size)
        reply = conn.call(conn.deployments.UploadSource, _chunks(packed, progress, task), timeout=None)
    if reply.sha256 != packed.sha256:
        raise CliError(
            "The controller stored a different source than was sent.",
            exit_code=FAILED,
            reason="UPLOAD_MISMATCH",
        )
    if not out.err.is_terminal:
        out.note(f"uploaded {packed.files} files, {packed.size} bytes (sha256 {packed.sha256[:12]})")
    return str(reply.sha256)


# -- following a rollout ---------------------------------------------------------------------


@dataclass
class Replica:
    node_id: str = ""
    status: str = ""
    endpoint: str = ""
    error: str = ""


@dataclass
class Rollout:
    status: deployment_pb2.DeploymentStatus.ValueType = deployment_pb2.DEPLOYMENT_STATUS_UNSPECIFIED
    message: str = ""
    replicas: dict[int, Replica] = field(default_factory=dict)

    def apply(self, assignment: deployment_pb2.NodeAssignment) -> Replica:
        replica = self.replicas.setdefault(assignment.replica_index, Replica())
        replica.node_id = assignment.node_id or replica.node_id
        replica.status = assignment.status or replica.status
        replica.endpoint = assignment.endpoint
        replica.error = assignment.error_message
        return replica

    def table(self, name: str) -> Table:
        table = Table("REPLICA", "NODE", "STATE", "ENDPOINT / ERROR", title=f"{name}: {status_label(self.status)}",
                      title_justify="left", caption=self.message or None, caption_justify="left")  # fmt: skip
        for index in sorted(self.replicas):
            r = self.replicas[index]
            table.add_row(str(index), r.node_id or "-", r.status or "-", r.error or r.endpoint or "")
        return table


def _pump(stream: Stream, sink: queue.Queue[Any]) -> None:
    try:
        for event in stream:
            sink.put(event)
    except BaseException as exc:
        sink.put(exc)
    else:
        sink.put(StopIteration())


def follow(
    conn: Connection,
    app: deployment_pb2.Deployment,
    out: Output,
    *,
    timeout: float,
    goal_version: int = 0,
    goal_replicas: int = 0,
) -> deployment_pb2.Deployment:
    """Follow a rollout live until it runs (returned) or fails (:class:`CliError`).

    Events come from ``WatchDeployment``; the state is also read every
    :data:`POLL_SECONDS`, so a missed event cannot leave it waiting. ``goal_version``: an
    update or rollback must end on that version (else it reverted); ``goal_replicas``: a
    scale must end with that many running replicas.
    """
    rollout = Rollout(status=app.status)
    for assignment in app.node_assignments:
        rollout.apply(assignment)
    events: queue.Queue[Any] = queue.Queue()
    stream = conn.stream(
        conn.deployments.WatchDeployment, deployment_pb2.WatchDeploymentRequest(deployment_id=app.id)
    )
    threading.Thread(target=_pump, args=(stream, events), daemon=True).start()
    deadline = time.monotonic() + timeout
    live = Live(rollout.table(app.name), console=out.err, transient=False, auto_refresh=False)
    if out.err.is_terminal and not out.as_json:
        live.start()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CliError(
                    f"{app.name} is not running after {timeout:g} s; the rollout goes on.",
                    exit_code=UNREACHABLE,
                    reason="ROLLOUT_TIMEOUT",
                    hint=f"follow it with: a67 apps show {app.name}",
                )
            try:
                item = events.get(timeout=min(POLL_SECONDS, remaining))
            except queue.Empty:
                item = None
            if isinstance(item, CliError):
                raise item
            if isinstance(item, BaseException):
                item = None  # the stream ended: keep reading the state directly
            if isinstance(item, deployment_pb2.WatchDeploymentResponse):
                rollout.status = item.status
                if item.message:
                    rollout.message = item.message
                line = f"{app.name}: {status_label(item.status)}"
                if item.HasField("assignment"):
                    replica = rollout.apply(item.assignment)
                    detail = replica.error or replica.endpoint
                    line += (
                        f" - replica {item.assignment.replica_index} on node {replica.node_id or '?'}: "
                        f"{replica.status}" + (f" ({detail})" if detail else "")
                    )
                elif item.message:
                    line += f" - {item.message}"
                if live.is_started:
                    live.update(rollout.table(app.name), refresh=True)
                elif not out.as_json:
                    out.note(line)
                if item.status not in (RUNNING, FAILED_STATUS):
                    continue
            current = get_app(conn, app.id)
            done = _finished(current, goal_version, goal_replicas)
            if done is None:
                continue
            for assignment in current.node_assignments:
                rollout.apply(assignment)
            rollout.status = current.status
            if live.is_started:
                live.update(rollout.table(app.name), refresh=True)
            if done:
                return current
            raise _failure(current, rollout, goal_version)
    finally:
        if live.is_started:
            live.stop()
        stream.cancel()


def _finished(app: deployment_pb2.Deployment, goal_version: int, goal_replicas: int) -> bool | None:
    """True: it runs as asked; False: it failed (or reverted); None: still going."""
    if app.status == FAILED_STATUS:
        return False
    if app.status != RUNNING:
        return None
    if goal_version and app.version != goal_version:
        return False
    running = sum(1 for a in app.node_assignments if a.status == "running")
    if goal_replicas and running != goal_replicas:
        return None
    return running > 0 or not app.node_assignments


def _failure(app: deployment_pb2.Deployment, rollout: Rollout, goal_version: int) -> CliError:
    errors = [
        f"replica {a.replica_index} on node {a.node_id}: {a.error_message}"
        for a in app.node_assignments
        if a.error_message
    ]
    if app.status == RUNNING and goal_version and app.version != goal_version:
        message = f"Version {goal_version} of {app.name} failed and it went back to version {app.version}"
        reason = "ROLLOUT_REVERTED"
    else:
        message = f"The rollout of {app.name} failed"
        reason = "DEPLOYMENT_FAILED"
    if rollout.message:
        message += f": {rollout.message}"
    return CliError(message.rstrip(".") + ".", exit_code=FAILED, reason=reason, details=errors)


# -- rendering -------------------------------------------------------------------------------


def show_app(out: Output, app: deployment_pb2.Deployment, *, explain: bool = False, action: str = "") -> None:
    if out.as_json:
        body: dict[str, Any] = {"deployment": message_dict(app)}
        if action:
            body["action"] = action
        out.json(body)
        return
    m = app.manifest
    out.fields(
        [
            ("name", app.name),
            ("id", app.id),
            ("status", status_label(app.status)),
            ("type", f"{type_label(app.app_type)} ({m.runtime}: {m.entrypoint})"),
            ("replicas", f"{app.current_replicas} running of {app.desired_replicas}"),
            ("version", app.version),
            ("resources", f"memory {m.resources.memory}, cpu {m.resources.cpu}"),
            ("endpoints", ", ".join(app.endpoints) or "-"),
            ("updated", when(app.updated_at)),
        ]
    )
    if app.node_assignments:
        out.table(
            ["REPLICA", "NODE", "STATE", "ENDPOINT / ERROR", "STARTED"],
            [
                (a.replica_index, a.node_id, a.status, a.error_message or a.endpoint, when(a.started_at))
                for a in sorted(app.node_assignments, key=lambda a: a.replica_index)
            ],
        )
    if explain:
        show_placement(out, app)


def show_placement(out: Output, app: deployment_pb2.Deployment) -> None:
    if not app.placement:
        out.say("No placement decisions are recorded for this app.")
        return
    out.table(
        ["NODE", "CHOSEN", "SCORE", "FACTORS", "WHY NOT"],
        [
            (
                p.node_id,
                "yes" if p.selected else "no",
                f"{p.total_score:.3f}" if p.selected or p.total_score else "-",
                ", ".join(f"{k} {v:.2f}" for k, v in sorted(p.factor_scores.items())) or "-",
                p.reason or "",
            )
            for p in sorted(app.placement, key=lambda p: (not p.selected, -p.total_score))
        ],
        title="placement",
    )


# -- the manifest from a directory and flags ---------------------------------------------------


def _dns_label(text: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:63].strip("-")


def build_manifest(directory: Path, overrides: dict[str, Any]) -> deployment_pb2.DeploymentManifest:
    manifest = load_manifest(directory)
    for key in ("name", "runtime", "entrypoint"):
        if overrides.get(key):
            setattr(manifest, key, overrides[key])
    if overrides.get("app_type"):
        manifest.app_type = app_type_value(overrides["app_type"])  # type: ignore[assignment]
    if overrides.get("replicas"):
        manifest.replicas = overrides["replicas"]
    if overrides.get("memory"):
        manifest.resources.memory = overrides["memory"]
    if overrides.get("cpu"):
        manifest.resources.cpu = overrides["cpu"]
    if overrides.get("atomic") is not None:
        manifest.atomic = overrides["atomic"]
    for key, value in overrides.get("env", {}).items():
        manifest.env[key] = value
    if not manifest.name:
        manifest.name = _dns_label(directory.resolve().name)
    return manifest


def manifest_options(func: Any) -> Any:
    options = [
        click.option("--name", help="App name (overrides name in a67.toml; default: the directory's name)."),
        click.option("--type", "app_type", type=click.Choice(["backend", "worker"]), help="App type."),
        click.option("--runtime", help="python or command."),
        click.option("--entrypoint", help="What to run, e.g. app.py."),
        click.option("--replicas", type=click.IntRange(1, 20), help="Number of replicas."),
        click.option("--memory", help="Memory per replica, e.g. 128MB."),
        click.option("--cpu", help="CPU per replica, e.g. 0.25 or 250m."),
        click.option(
            "--atomic/--no-atomic", default=None, help="Roll back the whole rollout if a replica fails."
        ),
        click.option(
            "--env",
            "-e",
            multiple=True,
            metavar="NAME[=VALUE]",
            help="Set an environment variable; NAME alone takes its value from your environment "
            "(keeps secrets off the command line). Repeatable.",
        ),
        click.option("--explain", is_flag=True, help="Show why each node was chosen or not."),
        click.option("--no-wait", is_flag=True, help="Return once the rollout has started."),
        click.option(
            "--timeout", type=float, default=600.0, show_default=True, help="Seconds to follow the rollout."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _overrides(params: dict[str, Any]) -> dict[str, Any]:
    values = {
        k: params.get(k)
        for k in ("name", "app_type", "runtime", "entrypoint", "replicas", "memory", "cpu", "atomic")
    }
    values["env"] = parse_env_flags(tuple(params.get("env") or ()))
    return values


def _deploy(directory: Path, params: dict[str, Any], *, must_exist: str | None = None) -> int:
    st = state()
    out = st.output
    conn = st.connection()
    manifest = build_manifest(directory, _overrides(params))
    if must_exist is not None:
        existing: deployment_pb2.Deployment | None = find_app(conn, must_exist)
        assert existing is not None
        if params.get("name") is None:
            manifest.name = existing.name
    else:
        existing = lookup_app(conn, manifest.name)
    packed = pack(directory)
    try:
        sha = upload(conn, packed, out)
    finally:
        packed.close()
    if existing is None:
        created = conn.call(
            conn.deployments.CreateDeployment,
            deployment_pb2.CreateDeploymentRequest(
                manifest=manifest, source_sha256=sha, request_id=str(uuid.uuid4())
            ),
        )
        app = get_app(conn, created.deployment_id)
        action, goal = "created", 0
        out.note(f"{manifest.name}: deployment {app.id} created")
    else:
        app = conn.call(
            conn.deployments.UpdateDeployment,
            deployment_pb2.UpdateDeploymentRequest(
                deployment_id=existing.id, manifest=manifest, source_sha256=sha
            ),
        ).deployment
        action, goal = "updated", app.version
        out.note(f"{manifest.name}: rolling update to version {app.version}")
    if params.get("no_wait"):
        show_app(out, app, action=action)
        return 0
    try:
        final = follow(conn, app, out, timeout=params["timeout"], goal_version=goal)
    except CliError as error:
        if error.reason in ("DEPLOYMENT_FAILED", "ROLLOUT_REVERTED"):
            from controller.client.cmd_logs import show_failure_logs  # cmd_logs imports this module

            show_failure_logs(conn, out, app.id)
        if params.get("explain"):
            show_placement(out, get_app(conn, app.id))
        raise
    if out.as_json:
        show_app(out, final, action=action)
        return 0
    out.say(
        f"{final.name} is running: {final.current_replicas} of {final.desired_replicas} replicas, "
        f"version {final.version}."
    )
    for endpoint in final.endpoints:
        out.say(f"  {endpoint}")
    if params.get("explain"):
        show_placement(out, final)
    return 0


def register(root: click.Group) -> None:
    @command(root, "deploy")
    @click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
    @manifest_options
    def deploy(directory: Path, **params: Any) -> int:
        """Deploy the app in DIRECTORY (default: here) and follow the rollout.

        Reads DIRECTORY/a67.toml (flags override its fields), packs the directory
        (skipping what .a67ignore names), uploads it and follows each replica until the
        app runs (exit 0) or fails (exit 1, with the reasons). Deploying an app name that
        exists already is a rolling update.

        \b
        Examples:
          a67 deploy examples/hello
          a67 deploy . --replicas 3 --env GREETING=hi --explain
          a67 deploy --name api --env DATABASE_URL   # value from your environment
        """
        return _deploy(directory, params)

    @root.group("apps", invoke_without_command=True)
    @common_options
    @click.pass_context
    def apps(ctx: click.Context) -> int:
        """Your apps: list them (the default), show, scale, update, roll back, remove.

        \b
        Examples:
          a67 apps
          a67 apps show hello --json
          a67 apps scale hello 3
        """
        if ctx.invoked_subcommand is None:
            _list(state())
        return 0

    @command(apps, "list")
    def list_cmd() -> None:
        """List your apps.

        \b
        Example:
          a67 apps list --json
        """
        _list(state())

    @command(apps, "show")
    @click.argument("app")
    @click.option("--explain", is_flag=True, help="Show the placement decision for each node.")
    def show(app: str, explain: bool) -> None:
        """Show an app (by name or id): status, replicas, endpoints.

        \b
        Example:
          a67 apps show hello --explain
        """
        st = state()
        conn = st.connection()
        show_app(st.output, get_app(conn, find_app(conn, app).id), explain=explain)

    @command(apps, "url")
    @click.argument("app")
    def url(app: str) -> None:
        """Print the endpoint the next request to APP should go to (a healthy replica).

        \b
        Example:
          curl "$(a67 apps url hello)"
        """
        st = state()
        conn = st.connection()
        reply = conn.call(
            conn.deployments.ResolveEndpoint,
            deployment_pb2.ResolveEndpointRequest(deployment_id=find_app(conn, app).id),
        )
        if st.output.as_json:
            st.output.json(message_dict(reply))
        else:
            st.output.say(reply.endpoint)

    @command(apps, "scale")
    @click.argument("app")
    @click.argument("replicas", type=click.IntRange(1, 20))
    @click.option("--no-wait", is_flag=True, help="Return without following the change.")
    @click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to follow it.")
    def scale(app: str, replicas: int, no_wait: bool, timeout: float) -> None:
        """Scale APP to REPLICAS replicas and follow it until they run.

        \b
        Example:
          a67 apps scale hello 3
        """
        st = state()
        conn = st.connection()
        found = find_app(conn, app)
        scaled = conn.call(
            conn.deployments.ScaleDeployment,
            deployment_pb2.ScaleDeploymentRequest(deployment_id=found.id, replicas=replicas),
        ).deployment
        final = (
            scaled if no_wait else follow(conn, scaled, st.output, timeout=timeout, goal_replicas=replicas)
        )
        if st.output.as_json:
            show_app(st.output, final)
        else:
            st.output.say(
                f"{final.name}: {final.current_replicas} of {final.desired_replicas} replicas running."
            )

    @command(apps, "update")
    @click.argument("app")
    @click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
    @manifest_options
    def update(app: str, directory: Path, **params: Any) -> int:
        """Roll APP out again from DIRECTORY (a new version, one replica at a time).

        If a new replica is not healthy in time, the app goes back to its last good
        version by itself, and this exits 1.

        \b
        Example:
          a67 apps update hello examples/hello --env GREETING=bonjour
        """
        return _deploy(directory, params, must_exist=app)

    @command(apps, "rollback")
    @click.argument("app")
    @click.option(
        "--version", type=int, default=0, help="The version to return to (default: the previous one)."
    )
    @click.option("--no-wait", is_flag=True, help="Return without following the rollback.")
    @click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to follow it.")
    def rollback(app: str, version: int, no_wait: bool, timeout: float) -> None:
        """Roll APP back to its previous version (or --version N).

        \b
        Example:
          a67 apps rollback hello
        """
        st = state()
        conn = st.connection()
        found = find_app(conn, app)
        started = conn.call(
            conn.deployments.RollbackDeployment,
            deployment_pb2.RollbackDeploymentRequest(deployment_id=found.id, version=version),
        ).deployment
        final = (
            started
            if no_wait
            else follow(conn, started, st.output, timeout=timeout, goal_version=started.version)
        )
        if st.output.as_json:
            show_app(st.output, final)
        else:
            st.output.say(f"{final.name} is at version {final.version}: {status_label(final.status)}.")

    @command(apps, "remove")
    @click.argument("app")
    @click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
    def remove(app: str, yes: bool) -> None:
        """Stop every replica of APP and delete it.

        \b
        Example:
          a67 apps remove hello --yes
        """
        st = state()
        conn = st.connection()
        found = find_app(conn, app)
        if not yes and not st.output.as_json:
            click.confirm(
                f"Remove {found.name} and stop its {found.current_replicas} replicas?", abort=True, err=True
            )
        conn.call(
            conn.deployments.DeleteDeployment, deployment_pb2.DeleteDeploymentRequest(deployment_id=found.id)
        )
        if st.output.as_json:
            st.output.json({"removed": found.id, "name": found.name})
        else:
            st.output.say(f"Removed {found.name}.")


def _list(st: Any) -> None:
    out = st.output
    apps = list(all_apps(st.connection()))
    if out.as_json:
        out.json({"deployments": [message_dict(a) for a in apps]})
        return
    if not apps:
        out.say("No apps yet. Deploy one with: a67 deploy DIRECTORY")
        return
    out.table(
        ["NAME", "STATUS", "TYPE", "REPLICAS", "VERSION", "ENDPOINTS", "UPDATED"],
        [
            (
                a.name,
                status_label(a.status),
                type_label(a.app_type),
                f"{a.current_replicas}/{a.desired_replicas}",
                a.version,
                ", ".join(a.endpoints) or "-",
                when(a.updated_at),
            )
            for a in apps
        ],
    )
