"""The reference node agent (``a67 agent``): the other end of ``NodeService.Connect``.

Modules:

* :mod:`~controller.agent.client` — :class:`Agent`: enroll once, hold the stream,
  reconnect with backoff; :func:`keepalive_options` (its parts: ``agent_config``,
  ``agent_enroll``, ``agent_session``, ``agent_commands``, ``agent_node_port``);
* :mod:`~controller.agent.identity` — the key, certificates and node.json on disk;
* :mod:`~controller.agent.handlers` — :class:`CommandHandlers`, the command registry;
* :mod:`~controller.agent.metrics` — capabilities and live metrics from psutil;
* :mod:`~controller.agent.backoff` — exponential backoff with full jitter;
* :mod:`~controller.agent.cli` — :func:`add_agent_parser`, the ``a67 agent`` command.
"""

from controller.agent.backoff import Backoff
from controller.agent.cli import add_agent_parser
from controller.agent.client import (
    Agent,
    AgentConfig,
    EnrollmentRefused,
    keepalive_options,
    server_keepalive_options,
)
from controller.agent.handlers import CommandHandler, CommandHandlers, error_result, ok_result
from controller.agent.identity import Enrollment, Identity, IdentityError
from controller.agent.metrics import MetricsState, RequestCounters, collect_metrics, measure_capabilities

__all__ = [
    "Agent",
    "AgentConfig",
    "Backoff",
    "CommandHandler",
    "CommandHandlers",
    "Enrollment",
    "EnrollmentRefused",
    "Identity",
    "IdentityError",
    "MetricsState",
    "RequestCounters",
    "add_agent_parser",
    "collect_metrics",
    "error_result",
    "keepalive_options",
    "measure_capabilities",
    "ok_result",
    "server_keepalive_options",
]
