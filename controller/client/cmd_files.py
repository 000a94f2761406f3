"""``a67 files``: your files on your storage nodes (``StorageService``, docs/storage.md) —
list, upload (a progress bar), download, show (chunks and where their copies are), remove.

A file is named by its id or by its path (``reports/q1.csv``); a path is looked up with
``ListFiles`` and must match exactly.
"""

from __future__ import annotations

import mimetypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click
from automator67.v1 import storage_pb2
from rich.progress import Progress

from controller.client.app import command, common_options, state
from controller.client.errors import NOT_FOUND, USAGE, CliError
from controller.client.render import message_dict, transfer_progress, when
from controller.client.session import Connection

UPLOAD_PIECE_BYTES = 1024 * 1024
"""Bytes per ``UploadFile`` data message (well under the controller's message limit)."""

LIST_PAGE = 200
"""Files per ``ListFiles`` page when a path is looked up or every file listed."""

STATUS = {
    storage_pb2.REPLICATION_STATUS_COMPLETE: "complete",
    storage_pb2.REPLICATION_STATUS_REPLICATING: "replicating",
    storage_pb2.REPLICATION_STATUS_DEGRADED: "degraded",
}


def listed(conn: Connection, prefix: str) -> Iterator[storage_pb2.StorageFile]:
    """Every file under ``prefix``, page after page."""
    token = ""
    while True:
        reply: storage_pb2.ListFilesResponse = conn.call(
            conn.storage.ListFiles,
            storage_pb2.ListFilesRequest(prefix=prefix, page_size=LIST_PAGE, page_token=token),
        )
        yield from reply.files
        token = reply.next_page_token
        if not token:
            return


def find_file(conn: Connection, ref: str) -> storage_pb2.StorageFile:
    """The file whose id or path is ``ref``; exit 4 if there is none."""
    if ref and "/" not in ref:
        try:
            reply: storage_pb2.GetFileResponse = conn.call(
                conn.storage.GetFile, storage_pb2.GetFileRequest(file_id=ref)
            )
            return reply.file
        except CliError as error:
            if error.exit_code != NOT_FOUND:
                raise
    for found in listed(conn, ref):
        if found.path == ref:
            got: storage_pb2.GetFileResponse = conn.call(
                conn.storage.GetFile, storage_pb2.GetFileRequest(file_id=found.id)
            )
            return got.file
    raise CliError(
        f"You have no file {ref!r}.",
        exit_code=NOT_FOUND,
        reason="FILE_NOT_FOUND",
        hint="list them: a67 files",
    )


def _pieces(
    metadata: storage_pb2.UploadFileMetadata, source: IO[bytes], progress: Progress, task: Any
) -> Iterator[storage_pb2.UploadFileRequest]:
    yield storage_pb2.UploadFileRequest(metadata=metadata)
    while piece := source.read(UPLOAD_PIECE_BYTES):
        yield storage_pb2.UploadFileRequest(data=piece)
        progress.advance(task, len(piece))


def register(root: click.Group) -> None:
    @root.group("files", invoke_without_command=True)
    @common_options
    @click.option("--prefix", default="", help="Only paths that start with this.")
    @click.pass_context
    def files(ctx: click.Context, prefix: str) -> None:
        """Your files on your storage nodes: encrypted, chunked and copied to several nodes.

        \b
        Examples:
          a67 files                                  # path, size, copies, status, modified, id
          a67 files upload report.csv --path reports/q1.csv --replicas 2
          a67 files download reports/q1.csv -o q1.csv
          a67 files show reports/q1.csv              # chunks and the nodes holding them
          a67 files remove reports/q1.csv --yes
        """
        if ctx.invoked_subcommand is not None:
            return
        st = state()
        out = st.output
        found = list(listed(st.connection(), prefix))
        if out.as_json:
            out.json({"files": [message_dict(f) for f in found]})
            return
        if not found:
            out.say("No files yet. Upload one with: a67 files upload FILE")
            return
        out.table(
            ["PATH", "SIZE", "COPIES", "STATUS", "MODIFIED", "ID"],
            [
                (f.path, f.size, f.replicas, STATUS.get(f.replication_status, "-"), when(f.modified_at), f.id)
                for f in found
            ],
        )

    @command(files, "upload")
    @click.argument("local", type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path))
    @click.option("--path", "remote", help="Where it goes (default: the local file's name).")
    @click.option("--replicas", type=click.IntRange(1, 5), default=3, show_default=True, help="Copies.")
    @click.option("--type", "mime_type", help="Its MIME type (default: guessed from the name).")
    def upload(local: Path, remote: str | None, replicas: int, mime_type: str | None) -> None:
        """Upload LOCAL (a file, or - for standard input), replacing a file at the same path.

        \b
        Examples:
          a67 files upload report.csv --path reports/q1.csv
          tar -cz photos | a67 files upload - --path backups/photos.tar.gz --replicas 2
        """
        st = state()
        out = st.output
        stdin = str(local) == "-"
        path = remote or ("" if stdin else local.name)
        if not path:
            raise CliError("Say where the file goes: --path.", exit_code=USAGE, reason="PATH_REQUIRED")
        guessed = mimetypes.guess_type(path)[0]
        metadata = storage_pb2.UploadFileMetadata(
            path=path, mime_type=mime_type or guessed or "application/octet-stream", replicas=replicas
        )
        size = None
        if not stdin:
            size = os.stat(local).st_size
            metadata.size = size
        conn = st.connection()
        progress = transfer_progress(out, "uploading")
        with progress, sys.stdin.buffer if stdin else open(local, "rb") as source:
            task = progress.add_task("upload", total=size)
            reply: storage_pb2.UploadFileResponse = conn.call(
                conn.storage.UploadFile, _pieces(metadata, source, progress, task), timeout=None
            )
        f = reply.file
        if out.as_json:
            out.json(message_dict(f))
        else:
            copies = "1 copy" if f.replicas == 1 else f"{f.replicas} copies"
            out.say(f"Uploaded {f.path}: {f.size} bytes, {copies}.")
            out.command_line(f"id {f.id}")  # never wrapped: to copy

    @command(files, "download")
    @click.argument("ref", metavar="FILE")
    @click.option(
        "--output", "-o", default="-", metavar="PATH", help="Where to write it (default: standard output)."
    )
    def download(ref: str, output: str) -> None:
        """Download FILE (an id or a path); every chunk is verified on the way.

        \b
        Examples:
          a67 files download reports/q1.csv -o q1.csv
          a67 files download reports/q1.csv | head
        """
        st = state()
        conn = st.connection()
        found = find_file(conn, ref)
        progress = transfer_progress(st.output, "downloading")
        target = Path(output)
        partial = target.with_name(target.name + ".part")
        with progress:
            task = progress.add_task("download", total=found.size)
            stream = conn.stream(conn.storage.DownloadFile, storage_pb2.DownloadFileRequest(file_id=found.id))
            sink = sys.stdout.buffer if output == "-" else open(partial, "wb")  # noqa: SIM115
            try:
                for piece in stream:
                    sink.write(piece.data)
                    progress.advance(task, len(piece.data))
                sink.flush()
            except BaseException:
                if output != "-":
                    sink.close()
                    partial.unlink(missing_ok=True)
                raise
        if output != "-":
            sink.close()
            partial.replace(target)
            st.output.note(f"wrote {found.size} bytes to {target}")

    @command(files, "show")
    @click.argument("ref", metavar="FILE")
    def show(ref: str) -> None:
        """A file's details (FILE is an id or a path): checksum, encryption, and each chunk's copies.

        \b
        Example:
          a67 files show reports/q1.csv --json
        """
        st = state()
        out = st.output
        f = find_file(st.connection(), ref)
        if out.as_json:
            out.json(message_dict(f))
            return
        out.table(
            ["FIELD", "VALUE"],
            [
                ("path", f.path),
                ("id", f.id),
                ("size", f.size),
                ("type", f.mime_type),
                ("sha256", f.checksum),
                ("copies", f.replicas),
                ("status", STATUS.get(f.replication_status, "-")),
                ("encryption", f"{f.encryption.algorithm} (key {f.encryption.key_id})"),
                ("modified", when(f.modified_at)),
            ],
        )
        out.table(
            ["CHUNK", "SIZE", "NODES"],
            [(c.index, c.size, ", ".join(loc.node_id for loc in c.locations) or "-") for c in f.chunks],
        )

    @command(files, "remove")
    @click.argument("ref", metavar="FILE")
    @click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
    def remove(ref: str, yes: bool) -> None:
        """Delete FILE (an id or a path); its copies are collected from the nodes later.

        \b
        Example:
          a67 files remove reports/q1.csv --yes
        """
        st = state()
        conn = st.connection()
        f = find_file(conn, ref)
        if not yes and not st.output.as_json:
            click.confirm(f"Remove {f.path} ({f.size} bytes)?", abort=True, err=True)
        conn.call(conn.storage.DeleteFile, storage_pb2.DeleteFileRequest(file_id=f.id))
        if st.output.as_json:
            st.output.json({"removed": f.id, "path": f.path})
        else:
            st.output.say(f"Removed {f.path}.")
