"""The merge engine: pure tensor math and the plan that applies it key by key.

``plan`` checks a recipe against its models and resolves every key's ratios; ``run`` streams
the merged tensors. The math lives in ``modes`` (SuperMerger's four formulas), ``calcmodes``
(one module per calcmode) and ``methods`` (one module per N-model method such as TIES); ``ratios``
and ``adjust`` turn MBW vectors, elemental lines and adjust values into per-key numbers.
"""
from .plan import KeyJob, MergePlan, plan_for, plan_merge
from .run import MergeResult, check_inputs, iter_merge, merge, prepare

__all__ = ["KeyJob", "MergePlan", "MergeResult", "check_inputs", "iter_merge", "merge", "plan_for", "plan_merge", "prepare"]
