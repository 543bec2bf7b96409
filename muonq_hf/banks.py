"""State banks: the states of the k parameters of one shape group, stacked once, each parameter's entries views.

A shape group (``backends.common.muon_groups``) steps k Muon parameters of one matrix plan together: their
matrices go through each kernel of the step at once. Stacking their states into one batch every step, and
copying the results back, would cost two copies per state entry and parameter (on a GPU: launches that grow
with the number of matrices, not with the number of shapes). A bank keeps the group's state stacked: entry
``key`` is one tensor laid out as the state of a single stacked parameter of k E matrices (``MatrixPlan`` with
``experts = k E``, see ``StateBank.plan``), and each member's ``state[key]`` is the view of its own part of it.
The step reads the bank and writes it in place, so the members' entries, which ``state_dict`` saves per
parameter in the checkpoint format, are current without a copy.

A member entry that is no longer the bank's view (``load_state_dict`` put new tensors in, a user replaced one)
makes the bank stack the members' entries again before the step: one copy per entry, once.
"""

from __future__ import annotations

import dataclasses

import torch

from .matrices import MatrixPlan
from .weights import KAHAN


class StateBank:
    """The stacked state of k parameters with matrix plan ``plan`` (the members' own plan)."""

    def __init__(self, plan: MatrixPlan, states: list[dict]) -> None:
        self.member_plan = plan
        self.states = list(states)  # the members' state dicts, in group order
        self.k = len(states)
        # the bank is the state of one stacked parameter whose experts are the members' matrices, member by member
        self.plan = dataclasses.replace(plan, experts=self.k * plan.experts, stacked=True)
        self.entries: dict[str, torch.Tensor] = {}  # key -> (k E, ...); "step" -> (k,)
        self._views: list[dict[str, torch.Tensor]] = [{} for _ in states]

    def current(self, states: list[dict]) -> bool:
        """Whether ``states`` are this bank's members and each of their entries is still the bank's view."""
        if len(states) != self.k or any(s is not t for s, t in zip(states, self.states, strict=True)):
            return False
        return all(
            s.keys() - {KAHAN} == v.keys() and all(s[key] is view for key, view in v.items())
            for s, v in zip(states, self._views, strict=True)
        )

    def gather(self) -> None:
        """Stack the members' entries into the bank (all members must have the same entries) and make them views."""
        entries = [s.keys() - {KAHAN} for s in self.states]  # the weights' Kahan buffers stay each member's own
        other = next((e for e in entries if e != entries[0]), None)
        if other is not None:
            raise ValueError(
                "MuonQ: the parameters of one shape group are not at the same stage (a first step among later "
                f"ones): entries {sorted(entries[0])} and {sorted(other)}"
            )
        keys = [k for k in self.states[0] if k != KAHAN]
        self.entries = {key: self._stacked(key, [s[key] for s in self.states]) for key in keys}
        self.publish()

    def publish(self) -> None:
        """Each member's entries become the views of its part of the bank's entries."""
        for i, state in enumerate(self.states):
            views = {key: self._member(key, value, i) for key, value in self.entries.items()}
            state.update(views)
            self._views[i] = views

    def _stacked(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if key == "step" or not self.member_plan.stacked:  # a plain member keeps no expert dim in its state
            return torch.stack(tensors)  # (k, ...)
        return torch.cat(tensors)  # (E, ...) each -> (k E, ...)

    def _member(self, key: str, value: torch.Tensor, i: int) -> torch.Tensor:
        if key == "step" or not self.member_plan.stacked:
            return value[i]
        E = value.size(0) // self.k
        return value[i * E : (i + 1) * E]


class BankCache:
    """The banks of one optimizer's shape groups, kept from step to step (those of groups no longer stepped go)."""

    def __init__(self) -> None:
        self._banks: dict[tuple[int, ...], StateBank] = {}
        self._used: set[tuple[int, ...]] = set()

    def bank(self, plan: MatrixPlan, states: list[dict]) -> StateBank:
        """The bank of these members, current: made or re-stacked where needed."""
        key = tuple(id(s) for s in states)
        self._used.add(key)
        bank = self._banks.get(key)
        if bank is None or bank.member_plan != plan or not bank.current(states):
            bank = self._banks[key] = StateBank(plan, states)
            if states[0]:  # past the first step: stack what the members hold
                bank.gather()
        return bank

    def sweep(self) -> None:
        """Forget the banks of groups not stepped since the last sweep (their members keep their views)."""
        self._banks = {k: v for k, v in self._banks.items() if k in self._used}
        self._used = set()
