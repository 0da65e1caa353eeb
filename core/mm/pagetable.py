"""Four-level page tables kept as pooled NumPy tables, and their entry encoding.

Kernel counterpart: the x86-64 page-table format (arch/x86/include/asm/
pgtable_types.h) and the generic walkers (mm/pagewalk.c), reduced to what the
HMM contracts observe.

Every table is a row of 512 ``uint64`` entries in one pooled 2-D array, so a
range walk is one gather of table rows plus vectorised decoding, never a
Python loop per page. Levels: PGD → PUD → PMD → PTE. An upper-level entry is
either a pointer to the next table (present, HUGE clear), a *leaf* (present
with HUGE set: a PMD-mapped THP or 2 MiB hugetlb page, a PUD-mapped 1 GiB
hugetlb page), a non-present typed entry (migration, device-private …), or
none.

Entry layout (the model's own, x86-flavoured)::

    bit 0   PRESENT        bit 5  YOUNG       bit 8  SOFTLEAF (non-present, typed)
    bit 1   WRITE          bit 6  DIRTY       bit 9  SPECIAL (no struct page / zero page)
    bits 1-4 softleaf type bit 7  HUGE        bit 10 PROTNONE (PROT_NONE or NUMA hint)
    bits 12-51 pfn, table index, or swap offset

A softleaf entry (the kernel's swap-type entries, ``softleaf_t`` in 6.19+)
has PRESENT clear, SOFTLEAF set, a type in bits 1-4 and an offset (a pfn or a
swap slot) in bits 12-51; YOUNG and DIRTY survive in it, as the kernel keeps
them in migration entries.
"""

from __future__ import annotations

from typing import Final

import attrs
import numpy as np
from numpy.typing import NDArray

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
PTRS_PER_TABLE: Final = 512
PMD_ORDER: Final = 9
PUD_ORDER: Final = 18
PMD_SIZE: Final = 1 << (PAGE_SHIFT + PMD_ORDER)
PUD_SIZE: Final = 1 << (PAGE_SHIFT + PUD_ORDER)
PMD_PAGES: Final = 1 << PMD_ORDER
PUD_PAGES: Final = 1 << PUD_ORDER

PTE_PRESENT: Final = 1 << 0
PTE_WRITE: Final = 1 << 1
PTE_YOUNG: Final = 1 << 5
PTE_DIRTY: Final = 1 << 6
PTE_HUGE: Final = 1 << 7
PTE_SOFTLEAF: Final = 1 << 8
PTE_SPECIAL: Final = 1 << 9
PTE_PROTNONE: Final = 1 << 10
PTE_PFN_SHIFT: Final = 12
PTE_PFN_MASK: Final = ((1 << 40) - 1) << PTE_PFN_SHIFT
SOFTLEAF_TYPE_SHIFT: Final = 1
SOFTLEAF_TYPE_MASK: Final = 0xF << SOFTLEAF_TYPE_SHIFT

# Softleaf (swap-type) entry types.
SWP_SWAP: Final = 0
SWP_MIGRATION_READ: Final = 1
SWP_MIGRATION_READ_EXCLUSIVE: Final = 2
SWP_MIGRATION_WRITE: Final = 3
SWP_DEVICE_PRIVATE_READ: Final = 4
SWP_DEVICE_PRIVATE_WRITE: Final = 5
SWP_DEVICE_EXCLUSIVE: Final = 6
SWP_HWPOISON: Final = 7
SWP_MARKER: Final = 8

# What an entry is, as decoded by ``entry_kind`` (one uint8 per entry).
KIND_NONE: Final = 0
KIND_PRESENT: Final = 1
KIND_PROTNONE: Final = 2
KIND_SWAP: Final = 3
KIND_MIGRATION: Final = 4
KIND_DEVICE_PRIVATE: Final = 5
KIND_DEVICE_EXCLUSIVE: Final = 6
KIND_HWPOISON: Final = 7
KIND_MARKER: Final = 8

KIND_NAMES: Final = (
    "none",
    "present",
    "protnone",
    "swap",
    "migration",
    "device_private",
    "device_exclusive",
    "hwpoison",
    "marker",
)

# Level of the entry that maps a page in a walk.
LEVEL_PTE: Final = 0
LEVEL_PMD: Final = 1
LEVEL_PUD: Final = 2
LEVEL_ORDER: Final = (0, PMD_ORDER, PUD_ORDER)

U64 = np.uint64
_SOFT_KINDS = {
    SWP_SWAP: KIND_SWAP,
    SWP_MIGRATION_READ: KIND_MIGRATION,
    SWP_MIGRATION_READ_EXCLUSIVE: KIND_MIGRATION,
    SWP_MIGRATION_WRITE: KIND_MIGRATION,
    SWP_DEVICE_PRIVATE_READ: KIND_DEVICE_PRIVATE,
    SWP_DEVICE_PRIVATE_WRITE: KIND_DEVICE_PRIVATE,
    SWP_DEVICE_EXCLUSIVE: KIND_DEVICE_EXCLUSIVE,
    SWP_HWPOISON: KIND_HWPOISON,
    SWP_MARKER: KIND_MARKER,
}


def _build_kind_lut() -> NDArray[np.uint8]:
    """Map the low 11 bits of an entry to its kind: one table lookup per entry."""
    lut = np.zeros(1 << 11, dtype=np.uint8)
    for low in range(1 << 11):
        if low & PTE_PRESENT:
            lut[low] = KIND_PRESENT
        elif low & PTE_SOFTLEAF:
            typ = (low & SOFTLEAF_TYPE_MASK) >> SOFTLEAF_TYPE_SHIFT
            lut[low] = _SOFT_KINDS.get(typ, KIND_MARKER)
        elif low & PTE_PROTNONE:
            lut[low] = KIND_PROTNONE
        else:
            lut[low] = KIND_NONE
    return lut


_KIND_LUT: Final = _build_kind_lut()


def entry_kind(entries: NDArray[np.uint64]) -> NDArray[np.uint8]:
    """Vectorised decode of entry kinds (``KIND_*``)."""
    return _KIND_LUT[(entries & U64(0x7FF)).astype(np.intp)]


def kind_of(entry: int) -> int:
    """Kind of one entry."""
    return int(_KIND_LUT[entry & 0x7FF])


def entry_pfn(entries: NDArray[np.uint64]) -> NDArray[np.int64]:
    """The pfn/offset field of entries, as int64."""
    return ((entries & U64(PTE_PFN_MASK)) >> U64(PTE_PFN_SHIFT)).astype(np.int64)


def pfn_of(entry: int) -> int:
    return (entry & PTE_PFN_MASK) >> PTE_PFN_SHIFT


def softleaf_type(entry: int) -> int:
    return (entry & SOFTLEAF_TYPE_MASK) >> SOFTLEAF_TYPE_SHIFT


def make_present(
    pfn: int,
    *,
    write: bool = False,
    dirty: bool = False,
    young: bool = True,
    special: bool = False,
    huge: bool = False,
) -> int:
    entry = (pfn << PTE_PFN_SHIFT) | PTE_PRESENT
    if write:
        entry |= PTE_WRITE
    if dirty:
        entry |= PTE_DIRTY
    if young:
        entry |= PTE_YOUNG
    if special:
        entry |= PTE_SPECIAL
    if huge:
        entry |= PTE_HUGE
    return entry


def make_present_array(
    pfns: NDArray[np.int64], *, write: bool, dirty: bool, young: bool = True, huge: bool = False
) -> NDArray[np.uint64]:
    flags = PTE_PRESENT | (PTE_WRITE if write else 0) | (PTE_DIRTY if dirty else 0)
    flags |= (PTE_YOUNG if young else 0) | (PTE_HUGE if huge else 0)
    return (pfns.astype(U64) << U64(PTE_PFN_SHIFT)) | U64(flags)


def make_softleaf(typ: int, offset: int, *, keep: int = 0) -> int:
    """A non-present typed entry; ``keep`` carries YOUNG/DIRTY over."""
    return (
        (offset << PTE_PFN_SHIFT)
        | PTE_SOFTLEAF
        | (typ << SOFTLEAF_TYPE_SHIFT)
        | (keep & (PTE_YOUNG | PTE_DIRTY))
    )


def make_softleaf_array(
    typ: int, offsets: NDArray[np.int64], keep: NDArray[np.uint64] | None = None
) -> NDArray[np.uint64]:
    out = (offsets.astype(U64) << U64(PTE_PFN_SHIFT)) | U64(
        PTE_SOFTLEAF | (typ << SOFTLEAF_TYPE_SHIFT)
    )
    if keep is not None:
        out |= keep & U64(PTE_YOUNG | PTE_DIRTY)
    return out


def migration_entries_readonly(entries: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """``make_readable_migration_entry`` on every writable migration entry."""
    typ = entries & U64(PTE_SOFTLEAF | PTE_PRESENT | SOFTLEAF_TYPE_MASK)
    writable = typ == U64(PTE_SOFTLEAF | (SWP_MIGRATION_WRITE << SOFTLEAF_TYPE_SHIFT))
    if not writable.any():
        return entries
    out = entries.copy()
    out[writable] = (entries[writable] & ~U64(SOFTLEAF_TYPE_MASK)) | U64(
        SWP_MIGRATION_READ << SOFTLEAF_TYPE_SHIFT
    )
    return out


def make_swap(slot: int) -> int:
    return make_softleaf(SWP_SWAP, slot)


def make_hwpoison(pfn: int) -> int:
    return make_softleaf(SWP_HWPOISON, pfn)


def make_protnone(entry: int) -> int:
    """Present → PROT_NONE entry, keeping pfn and the saved write/dirty bits."""
    return (entry & ~PTE_PRESENT) | PTE_PROTNONE


def is_table_pointer(entry: int) -> bool:
    return (entry & (PTE_PRESENT | PTE_HUGE)) == PTE_PRESENT


@attrs.define(eq=False)
class Walk:
    """A snapshot of the entries that map ``npages`` pages from ``vpn``.

    ``entries[i]`` is the entry that maps page ``vpn + i``: a PTE, or the PMD/
    PUD entry for pages under a huge leaf (repeated for every page it covers).
    ``loc[i]`` is that entry's flat index in the pool (-1 when the table that
    would hold it does not exist) and ``level[i]`` its level.
    """

    vpn: int
    npages: int
    entries: NDArray[np.uint64]
    _ckind: NDArray[np.int8]
    _cval: NDArray[np.int64]
    _cloc: NDArray[np.int64]

    @property
    def _offset(self) -> int:
        return self.vpn & (PTRS_PER_TABLE - 1)

    def _expand(self, per_chunk: NDArray[np.generic]) -> NDArray[np.generic]:
        off = self._offset
        return np.repeat(per_chunk, PTRS_PER_TABLE)[off : off + self.npages]

    @property
    def level(self) -> NDArray[np.int8]:
        lvl = np.where(self._ckind == 3, LEVEL_PUD, np.where(self._ckind == 2, LEVEL_PMD, 0))
        return self._expand(lvl.astype(np.int8))  # type: ignore[return-value]

    @property
    def order(self) -> NDArray[np.uint8]:
        """CPU mapping order of each page: 0 (PTE), 9 (PMD) or 18 (PUD)."""
        lvl = np.where(
            self._ckind == 3, PUD_ORDER, np.where(self._ckind == 2, PMD_ORDER, 0)
        ).astype(np.uint8)
        return self._expand(lvl)  # type: ignore[return-value]

    @property
    def loc(self) -> NDArray[np.int64]:
        nc = self._ckind.shape[0]
        loc2d = np.full((nc, PTRS_PER_TABLE), -1, dtype=np.int64)
        tab = self._ckind == 1
        if tab.any():
            loc2d[tab] = self._cval[tab][:, None] * PTRS_PER_TABLE + np.arange(
                PTRS_PER_TABLE, dtype=np.int64
            )
        leaf = self._ckind >= 2
        if leaf.any():
            loc2d[leaf] = self._cloc[leaf][:, None]
        off = self._offset
        return loc2d.ravel()[off : off + self.npages]

    @property
    def kinds(self) -> NDArray[np.uint8]:
        return entry_kind(self.entries)

    def pfns(self) -> NDArray[np.int64]:
        """pfn (or softleaf offset) per page, with the offset inside huge leaves added."""
        base = entry_pfn(self.entries)
        if bool((self._ckind >= 2).any()):
            vpns = np.arange(self.vpn, self.vpn + self.npages, dtype=np.int64)
            order = self.order.astype(np.int64)
            base = base + (vpns & ((np.int64(1) << order) - 1))
        return base

    def chunk_levels(self) -> NDArray[np.int8]:
        """Per 2 MiB chunk: 0 no table, 1 PTE table, 2 PMD entry, 3 PUD entry."""
        return self._ckind


class PageTable:
    """One mm's page tables: a pool of 512-entry tables, the PGD at row 0."""

    def __init__(self, capacity: int = 64) -> None:
        capacity = max(8, capacity)
        self.rows: NDArray[np.uint64] = np.zeros((capacity, PTRS_PER_TABLE), dtype=U64)
        self.flat: NDArray[np.uint64] = self.rows.reshape(-1)
        self._free: list[int] = []
        self._next = 1  # row 0 is the PGD
        self.tables_in_use = 1

    # ----- table pool -------------------------------------------------------
    def alloc_table(self) -> int:
        if self._free:
            t = self._free.pop()
        else:
            if self._next == self.rows.shape[0]:
                self._grow()
            t = self._next
            self._next += 1
        self.tables_in_use += 1
        return t

    def _grow(self) -> None:
        cap = self.rows.shape[0]
        rows = np.zeros((cap * 2, PTRS_PER_TABLE), dtype=U64)
        rows[:cap] = self.rows
        self.rows = rows
        self.flat = rows.reshape(-1)

    def free_table(self, t: int) -> None:
        if t == 0:
            raise ValueError("the PGD is never freed")
        self.rows[t] = 0
        self._free.append(t)
        self.tables_in_use -= 1

    @property
    def table_bytes(self) -> int:
        return self.tables_in_use * PTRS_PER_TABLE * 8

    # ----- descending --------------------------------------------------------
    def _child(self, loc: int, alloc: bool) -> int:
        """Table index behind the pointer at ``loc``; -1 if none (or a leaf)."""
        e = int(self.flat[loc])
        if e == 0:
            if not alloc:
                return -1
            t = self.alloc_table()
            self.flat[loc] = (t << PTE_PFN_SHIFT) | PTE_PRESENT
            return t
        if is_table_pointer(e):
            return pfn_of(e)
        return -1

    def pud_loc(self, vpn: int, alloc: bool = False) -> int:
        """Flat index of the PUD entry covering ``vpn`` (-1 if its table is missing)."""
        pud_t = self._child((vpn >> 27) & 511, alloc)
        if pud_t < 0:
            return -1
        return pud_t * PTRS_PER_TABLE + ((vpn >> 18) & 511)

    def pmd_loc(self, vpn: int, alloc: bool = False) -> int:
        """Flat index of the PMD entry covering ``vpn``; -1 if missing or under a PUD leaf."""
        pudloc = self.pud_loc(vpn, alloc)
        if pudloc < 0:
            return -1
        pmd_t = self._child(pudloc, alloc)
        if pmd_t < 0:
            return -1
        return pmd_t * PTRS_PER_TABLE + ((vpn >> 9) & 511)

    def pte_table(self, vpn: int, alloc: bool = False) -> int:
        """Index of the PTE table covering ``vpn``; -1 if missing or under a leaf."""
        pmdloc = self.pmd_loc(vpn, alloc)
        if pmdloc < 0:
            return -1
        e = int(self.flat[pmdloc])
        if e != 0 and not is_table_pointer(e):
            return -1
        return self._child(pmdloc, alloc)

    def pte_loc(self, vpn: int, alloc: bool = False) -> int:
        t = self.pte_table(vpn, alloc)
        return -1 if t < 0 else t * PTRS_PER_TABLE + (vpn & 511)

    def lookup(self, vpn: int) -> tuple[int, int, int]:
        """(loc, entry, level) of the entry mapping ``vpn``; loc -1 if no table."""
        pudloc = self.pud_loc(vpn)
        if pudloc < 0:
            return -1, 0, LEVEL_PTE
        e = int(self.flat[pudloc])
        if e and not is_table_pointer(e):
            return pudloc, e, LEVEL_PUD
        if not e:
            return -1, 0, LEVEL_PTE
        pmdloc = pfn_of(e) * PTRS_PER_TABLE + ((vpn >> 9) & 511)
        e = int(self.flat[pmdloc])
        if e and not is_table_pointer(e):
            return pmdloc, e, LEVEL_PMD
        if not e:
            return -1, 0, LEVEL_PTE
        loc = pfn_of(e) * PTRS_PER_TABLE + (vpn & 511)
        return loc, int(self.flat[loc]), LEVEL_PTE

    def get(self, loc: int) -> int:
        return int(self.flat[loc])

    def set(self, loc: int, entry: int) -> None:
        self.flat[loc] = entry

    # ----- range operations --------------------------------------------------
    def walk(self, vpn: int, npages: int) -> Walk:
        """Snapshot the entries mapping [vpn, vpn + npages): one gather per level."""
        if npages <= 0:
            raise ValueError("empty walk")
        c0 = vpn >> PMD_ORDER
        c1 = (vpn + npages - 1) >> PMD_ORDER
        nc = c1 - c0 + 1
        ckind = np.zeros(nc, dtype=np.int8)
        cval = np.zeros(nc, dtype=np.int64)
        cloc = np.full(nc, -1, dtype=np.int64)
        leafval = np.zeros(nc, dtype=U64)
        flat = self.flat
        c = c0
        while c <= c1:
            g_last = min(c1, c | 511)
            sl = slice(c - c0, g_last - c0 + 1)
            pudloc = self.pud_loc(c << PMD_ORDER)
            if pudloc >= 0:
                pude = int(flat[pudloc])
                if pude != 0 and is_table_pointer(pude):
                    locs = pfn_of(pude) * PTRS_PER_TABLE + np.arange(
                        c & 511, (g_last & 511) + 1, dtype=np.int64
                    )
                    pmde = flat[locs]
                    tab = (pmde & U64(PTE_PRESENT | PTE_HUGE)) == U64(PTE_PRESENT)
                    leaf = (pmde != 0) & ~tab
                    ckind[sl] = np.where(tab, 1, np.where(leaf, 2, 0))
                    cval[sl] = np.where(tab, (pmde >> U64(PTE_PFN_SHIFT)).astype(np.int64), 0)
                    leafval[sl] = np.where(leaf, pmde, U64(0))
                    cloc[sl] = locs
                elif pude != 0:
                    ckind[sl] = 3
                    leafval[sl] = pude
                    cloc[sl] = pudloc
            c = g_last + 1
        off = vpn & 511
        tab = ckind == 1
        if bool(tab.all()):
            entries2d = self.rows[cval]
        else:
            entries2d = np.zeros((nc, PTRS_PER_TABLE), dtype=U64)
            if tab.any():
                entries2d[tab] = self.rows[cval[tab]]
            leaf = ckind >= 2
            if leaf.any():
                entries2d[leaf] = leafval[leaf][:, None]
        entries = entries2d.reshape(-1)[off : off + npages]
        return Walk(vpn, npages, entries, ckind, cval, cloc)

    def ensure_ptes(self, vpn: int, npages: int) -> NDArray[np.int64]:
        """Flat indices of the PTEs for [vpn, vpn+npages), allocating tables.

        The range must not lie under a huge leaf (split it first).
        """
        c0 = vpn >> PMD_ORDER
        c1 = (vpn + npages - 1) >> PMD_ORDER
        tables = np.empty(c1 - c0 + 1, dtype=np.int64)
        for i, c in enumerate(range(c0, c1 + 1)):
            t = self.pte_table(c << PMD_ORDER, alloc=True)
            if t < 0:
                raise ValueError(f"vpn {c << PMD_ORDER:#x} lies under a huge leaf")
            tables[i] = t
        off = vpn & 511
        loc2d = tables[:, None] * PTRS_PER_TABLE + np.arange(PTRS_PER_TABLE, dtype=np.int64)
        return loc2d.reshape(-1)[off : off + npages]

    def ensure_pte_locs(self, vpns: NDArray[np.int64]) -> NDArray[np.int64]:
        """Flat indices of the PTEs of arbitrary pages ``vpns``, allocating tables."""
        chunks = vpns >> PMD_ORDER
        uniq, inverse = np.unique(chunks, return_inverse=True)
        tables = np.array(
            [self.pte_table(int(c) << PMD_ORDER, alloc=True) for c in uniq], dtype=np.int64
        )
        if (tables < 0).any():
            raise ValueError("a page lies under a huge leaf")
        return tables[inverse] * PTRS_PER_TABLE + (vpns & (PTRS_PER_TABLE - 1))

    def set_ptes(self, vpn: int, entries: NDArray[np.uint64]) -> None:
        self.flat[self.ensure_ptes(vpn, len(entries))] = entries

    def free_empty_pte_tables(self, vpn: int, npages: int) -> int:
        """Free PTE tables of fully covered 2 MiB chunks that map nothing.

        Mirrors ``free_pgtables`` after an munmap leaves a region with no VMA.
        Returns the number of tables freed.
        """
        c_first = (vpn + PMD_PAGES - 1) >> PMD_ORDER
        c_end = (vpn + npages) >> PMD_ORDER
        freed = 0
        for c in range(c_first, c_end):
            pmdloc = self.pmd_loc(c << PMD_ORDER)
            if pmdloc < 0:
                continue
            e = int(self.flat[pmdloc])
            if e != 0 and is_table_pointer(e):
                t = pfn_of(e)
                if not self.rows[t].any():
                    self.flat[pmdloc] = 0
                    self.free_table(t)
                    freed += 1
        return freed
