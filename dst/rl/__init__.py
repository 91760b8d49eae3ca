"""Continual reinforcement learning: environments whose dynamics change (Slippery Ant) for PPO with any refresh
strategy. Needs the ``rl`` extra: ``pip install -e ".[rl]"`` (Gymnasium with MuJoCo)."""

from .ant import FRICTION_RANGE, SlipperyAnt, friction_schedule

__all__ = ["FRICTION_RANGE", "SlipperyAnt", "friction_schedule"]
