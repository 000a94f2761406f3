"""Output: Rich tables for people, JSON (the REST API's shapes) and CSV for scripts."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from controller.client.errors import CliError


def message_dict(message: Message) -> dict[str, Any]:
    """A message as the gateway prints it: snake_case names, defaults present, enum names."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def enum_label(name: str, prefix: str) -> str:
    """``NODE_STATUS_READY`` → ``ready``."""
    return name.removeprefix(prefix).lower().replace("_", "-") or "unknown"


def when(ts: Timestamp) -> str:
    """A timestamp as local-free UTC text, or ``-`` if unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def percent(value: float) -> str:
    return f"{value:.0f}%"


class Output:
    """Where a command writes: stdout for results, stderr for progress and errors."""

    def __init__(self, *, as_json: bool = False) -> None:
        self.as_json = as_json
        self.console = Console(highlight=False, soft_wrap=False)
        self.err = Console(stderr=True, highlight=False)

    def json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def json_line(self, value: Any) -> None:
        """One JSON document per line (streams)."""
        sys.stdout.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def table(
        self, headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None
    ) -> None:
        table = Table(*headers, title=title, title_justify="left", header_style="bold")
        for row in rows:
            table.add_row(*("" if cell is None else str(cell) for cell in row))
        self.console.print(table)

    def fields(self, pairs: Iterable[tuple[str, Any]], *, title: str | None = None) -> None:
        """A two-column key/value table."""
        table = Table(show_header=False, title=title, title_justify="left", box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        for key, value in pairs:
            table.add_row(key, "" if value is None else str(value))
        self.console.print(table)

    def say(self, text: str) -> None:
        """A line for people (stdout, not in --json mode)."""
        if not self.as_json:
            self.console.print(text, markup=False)

    def command_line(self, text: str) -> None:
        """A shell command for the user to copy: one line, never wrapped or highlighted."""
        if not self.as_json:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        """Progress or advice for people: stderr, so stdout stays clean."""
        self.err.print(text, markup=False)

    def error(self, error: CliError) -> None:
        if self.as_json:
            sys.stderr.write(json.dumps(error.as_dict(), ensure_ascii=False) + "\n")
            return
        reason = f" ({error.reason})" if error.reason else ""
        self.err.print(f"a67: {error.message}{reason}", markup=False, soft_wrap=True)
        for detail in error.details:
            self.err.print(f"  - {detail}", markup=False, soft_wrap=True)
        if error.hint:
            self.err.print(f"  hint: {error.hint}", markup=False, soft_wrap=True)


def csv_text(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow(["" if cell is None else _csv_cell(cell) for cell in row])
    return buffer.getvalue()


def _csv_cell(cell: Any) -> str:
    if isinstance(cell, bool):
        return "true" if cell else "false"
    if isinstance(cell, dict | list):
        return json.dumps(cell, ensure_ascii=False)
    return str(cell)


def cell_text(value: Any) -> str:
    """A SQL value in a table: NULL shown as such, JSON for nested values."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 2**53 else str(value)
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def transfer_progress(out: Output, what: str) -> Progress:
    """A byte-transfer progress bar labelled ``what`` on standard error (shown only on a terminal)."""
    return Progress(
        TextColumn(what),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=out.err,
        transient=False,
        disable=not out.err.is_terminal,
    )
