"""Graph stage: channel groups, cost, pruning plans, surgery and the equivalence check.

Import the submodules directly (``splinecompress.graph.groups`` etc.); the names below are the public API.
"""

from splinecompress.graph.cost import ModelCost, NodeCost, model_cost
from splinecompress.graph.equivalence import EquivalenceResult, check_equivalence, masked_original
from splinecompress.graph.groups import Group, GroupReport, Groups, GroupSummary, Member, analyze_groups, group_summary
from splinecompress.graph.plan import PruningPlan, random_plan, round_channels
from splinecompress.graph.surgery import SurgeryResult, apply_plan

__all__ = [
    # analysis
    "Group",
    "GroupReport",
    "GroupSummary",
    "Groups",
    "Member",
    "analyze_groups",
    "group_summary",
    # cost
    "ModelCost",
    "NodeCost",
    "model_cost",
    # plans
    "PruningPlan",
    "random_plan",
    "round_channels",
    # surgery and equivalence
    "EquivalenceResult",
    "SurgeryResult",
    "apply_plan",
    "check_equivalence",
    "masked_original",
]
