"""Size the host pool before the first step: which saved tensors the engine's rules will swap, and how
many bytes each copy needs (its storage span), read off a fake-tensor record of the step.

Without it every host buffer of step 1 is allocated inside the pack hook; a pinned allocation there is
an implicit device sync (torchtune#2076), so step 1 runs with the CPU tied to the GPU. With it the pool
holds one buffer per swapped tensor before training starts, and step 1 allocates nothing it predicted.
"""
from __future__ import annotations

from typing import List

from .plan_models import Settings, predict
from .policy import PlanPolicy, SwapPolicy, ThresholdPolicy
from .pool import HostPool
from .profile import StepProfile


def settings_of(policy: SwapPolicy) -> Settings:
    """The planner's ``Settings`` that replay ``policy``'s decisions (threshold rules or a plan)."""
    if isinstance(policy, PlanPolicy):
        return Settings(policy.threshold, policy.prefetch, swap=sorted(policy.swap))
    if isinstance(policy, ThresholdPolicy):
        return Settings(policy.threshold, policy.prefetch, policy.keep_last, policy.budget)
    raise TypeError(f"no planner settings for the {type(policy).__name__} policy")


def swapped_copy_bytes(profile: StepProfile, settings: Settings) -> List[int]:
    """The copy size of every tensor ``settings`` swaps in one step of ``profile`` (the host buffers
    that are in use at once at the end of forward)."""
    if not settings.enabled:
        return []
    cand = profile.candidates(settings.threshold)
    swapped = predict(profile, settings, 1.0, timed=False).swapped
    return [profile.tensors[cand[s]].copy_bytes for s in swapped]


def presize_host_pool(pool: HostPool, profile: StepProfile, settings: Settings) -> int:
    """Reserve the host buffers ``settings`` needs on ``profile``; returns the bytes reserved."""
    return pool.reserve(swapped_copy_bytes(profile, settings))


__all__ = ["settings_of", "swapped_copy_bytes", "presize_host_pool"]
