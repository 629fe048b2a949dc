from typing import Any

from paddler.config import AgentSettings, BalancerSettings

ROLES = ("agent", "balancer")


def run_role(role: str, settings: dict[str, Any]) -> int:
    if role == "agent":
        from paddler.agent.agent import run as run_agent  # noqa: PLC0415 - one role per process

        return run_agent(AgentSettings(**settings))
    from paddler.balancer.server import run as run_balancer  # noqa: PLC0415

    return run_balancer(BalancerSettings(**settings))
