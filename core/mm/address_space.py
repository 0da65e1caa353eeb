"""The address space of a process (``struct mm_struct``).

Kernel counterpart: ``struct mm_struct`` (include/linux/mm_types.h): the VMA
set, the page tables, ``mmap_lock``, the user count, the MMU-notifier
subscriptions and flags such as ``MMF_UNSTABLE`` (set by the OOM reaper).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from ..errors import KernelBug
from ..sched import RwSem
from .pagetable import PageTable
from .vma import Vma, VmaSet

if TYPE_CHECKING:
    from ..machine import Machine
    from ..notifier import Subscriptions


@attrs.define(eq=False, repr=False)
class AddressSpace:
    """An mm: VMAs, page tables, ``mmap_lock`` and notifier subscriptions."""

    machine: Machine
    id: int = attrs.field(
        default=attrs.Factory(lambda self: self.machine.new_mm_id(), takes_self=True)
    )
    pt: PageTable = attrs.field(factory=PageTable)
    vmas: VmaSet = attrs.field(factory=VmaSet)
    mmap_lock: RwSem = attrs.field(init=False)
    notifier_subscriptions: Subscriptions | None = None
    #: ``mm_users``: the mm is torn down when it drops to zero.
    users: int = 1
    #: ``MMF_UNSTABLE``: the OOM reaper has torn pages out from under it.
    unstable: bool = False

    def __attrs_post_init__(self) -> None:
        self.mmap_lock = RwSem(f"mm{self.id}.mmap_lock")

    def __repr__(self) -> str:
        return f"AddressSpace(id={self.id}, vmas={len(self.vmas)}, users={self.users})"

    def find_vma(self, addr: int) -> Vma | None:
        """The VMA containing ``addr`` (not the kernel's "next VMA" semantics)."""
        return self.vmas.find(addr)

    def mmget_not_zero(self) -> bool:
        """Take a user reference unless the mm is already being torn down."""
        if self.users <= 0:
            return False
        self.users += 1
        return True

    def mmput(self) -> None:
        """Drop a user reference; the last one tears the address space down."""
        from .exit import exit_mmap

        if self.users <= 0:
            raise KernelBug("mmput on an mm with no users")
        self.users -= 1
        if self.users == 0:
            exit_mmap(self)
