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

Entry layout (the model's own; flags on top so that an HMM pfn is one mask
away: PRESENT sits where ``HMM_PFN_VALID`` does and WRITE where
``HMM_PFN_WRITE`` does)::

    bit 63 PRESENT      bit 59 SOFTLEAF (non-present, typed)   bit 56 YOUNG
    bit 62 WRITE        bit 58 HUGE (leaf at PMD/PUD level)    bits 52-55 softleaf type
    bit 61 PROTNONE     bit 57 DIRTY                           bits 0-51 pfn, table
    bit 60 SPECIAL                                                 index, or swap offset

A softleaf entry (the kernel's swap-type entries, ``softleaf_t`` in 6.19+)
has PRESENT clear, SOFTLEAF set, a type and an offset (a pfn or a swap slot);
YOUNG and DIRTY survive in it, as the kernel keeps them in migration entries.
Writability of a softleaf entry is part of its type (migration-write,
device-private-write).
"""

from __future__ import annotations

from typing import Final

import attrs
import numpy as np
from numpy.typing import NDArray

from ..errors import KernelBug

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
PTRS_PER_TABLE: Final = 512
PMD_ORDER: Final = 9
PUD_ORDER: Final = 18
PMD_SIZE: Final = 1 << (PAGE_SHIFT + PMD_ORDER)
PUD_SIZE: Final = 1 << (PAGE_SHIFT + PUD_ORDER)
PMD_PAGES: Final = 1 << PMD_ORDER
PUD_PAGES: Final = 1 << PUD_ORDER

PTE_PRESENT: Final = 1 << 63
PTE_WRITE: Final = 1 << 62
PTE_PROTNONE: Final = 1 << 61
PTE_SPECIAL: Final = 1 << 60
PTE_SOFTLEAF: Final = 1 << 59
PTE_HUGE: Final = 1 << 58
PTE_DIRTY: Final = 1 << 57
PTE_YOUNG: Final = 1 << 56
PTE_PFN_SHIFT: Final = 0
PTE_PFN_MASK: Final = (1 << 52) - 1
SOFTLEAF_TYPE_SHIFT: Final = 52
SOFTLEAF_TYPE_MASK: Final = 0xF << SOFTLEAF_TYPE_SHIFT
#: The top 12 bits: every flag and the softleaf type (what ``pte_kind_array`` looks at).
_FLAG_SHIFT: Final = 52

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

# What an entry is, as decoded by ``pte_kind_array`` (one uint8 per entry).
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
    """Map the top 12 bits of an entry to its kind: one table lookup per entry."""
    lut = np.zeros(1 << 12, dtype=np.uint8)
    for top in range(1 << 12):
        bits = top << _FLAG_SHIFT
        if bits & PTE_PRESENT:
            lut[top] = KIND_PRESENT
        elif bits & PTE_SOFTLEAF:
            typ = (bits & SOFTLEAF_TYPE_MASK) >> SOFTLEAF_TYPE_SHIFT
            lut[top] = _SOFT_KINDS.get(typ, KIND_MARKER)
        elif bits & PTE_PROTNONE:
            lut[top] = KIND_PROTNONE
        else:
            lut[top] = KIND_NONE
    return lut


_KIND_LUT: Final = _build_kind_lut()


def pte_kind_array(entries: NDArray[np.uint64]) -> NDArray[np.uint8]:
    """Vectorised decode of entry kinds (``KIND_*``)."""
    return _KIND_LUT[(entries >> U64(_FLAG_SHIFT)).astype(np.intp)]


def pte_kind(entry: int) -> int:
    """The kind (``KIND_*``) of one entry; ``pte_kind_array`` is its vectorised twin."""
    return int(_KIND_LUT[entry >> _FLAG_SHIFT])


def pte_pfn_array(entries: NDArray[np.uint64]) -> NDArray[np.int64]:
    """The pfn/offset field of entries, as int64."""
    return (entries & U64(PTE_PFN_MASK)).astype(np.int64)


def pte_pfn(entry: int) -> int:
    """``pte_pfn``: the pfn (or swap offset) field of one entry; ``pte_pfn_array``
    is its vectorised twin."""
    return entry & PTE_PFN_MASK


def softleaf_type(entry: int) -> int:
    return (entry & SOFTLEAF_TYPE_MASK) >> SOFTLEAF_TYPE_SHIFT


def make_table_pointer(table: int) -> int:
    """An upper-level entry pointing at the next table."""
    return table | PTE_PRESENT


def make_present(
    pfn: int,
    *,
    write: bool = False,
    dirty: bool = False,
    young: bool = True,
    special: bool = False,
    huge: bool = False,
) -> int:
    entry = pfn | PTE_PRESENT
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
    return pfns.astype(U64) | U64(flags)


def make_softleaf(typ: int, offset: int, *, keep: int = 0) -> int:
    """A non-present typed entry; ``keep`` carries YOUNG/DIRTY over."""
    return offset | PTE_SOFTLEAF | (typ << SOFTLEAF_TYPE_SHIFT) | (keep & (PTE_YOUNG | PTE_DIRTY))


def make_softleaf_array(
    typ: int, offsets: NDArray[np.int64], keep: NDArray[np.uint64] | None = None
) -> NDArray[np.uint64]:
    out = offsets.astype(U64) | U64(PTE_SOFTLEAF | (typ << SOFTLEAF_TYPE_SHIFT))
    if keep is not None:
        out |= keep & U64(PTE_YOUNG | PTE_DIRTY)
    return out


def softleaf_entries_readonly(entries: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """Writable migration and device-private entries made read-only.

    ``make_readable_migration_entry`` / ``make_readable_device_private_entry``,
    as fork (COW) and mprotect do.
    """
    typ = entries & U64(PTE_SOFTLEAF | PTE_PRESENT | SOFTLEAF_TYPE_MASK)
    out = entries
    for writable, readable in (
        (SWP_MIGRATION_WRITE, SWP_MIGRATION_READ),
        (SWP_DEVICE_PRIVATE_WRITE, SWP_DEVICE_PRIVATE_READ),
    ):
        sel = typ == U64(PTE_SOFTLEAF | (writable << SOFTLEAF_TYPE_SHIFT))
        if sel.any():
            if out is entries:
                out = entries.copy()
            out[sel] = (entries[sel] & ~U64(SOFTLEAF_TYPE_MASK)) | U64(
                readable << SOFTLEAF_TYPE_SHIFT
            )
    return out


def softleaf_writable(entries: NDArray[np.uint64]) -> NDArray[np.bool_]:
    """Writable migration or device-private entries (device-exclusive counts too)."""
    typ = (entries & U64(SOFTLEAF_TYPE_MASK)) >> U64(SOFTLEAF_TYPE_SHIFT)
    soft = (entries & U64(PTE_SOFTLEAF | PTE_PRESENT)) == U64(PTE_SOFTLEAF)
    out: NDArray[np.bool_] = soft & (
        (typ == SWP_MIGRATION_WRITE)
        | (typ == SWP_DEVICE_PRIVATE_WRITE)
        | (typ == SWP_DEVICE_EXCLUSIVE)
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


@attrs.frozen
class EntrySlots:
    """Distinct entries of a walk: where each lives and what it holds.

    ``vpns`` is the first page each entry maps; ``pfns`` the pfn (the head
    pfn for a huge leaf) or softleaf offset; ``pages`` how many pages each maps.
    """

    vpns: NDArray[np.int64]
    locs: NDArray[np.int64]
    levels: NDArray[np.int8]
    entries: NDArray[np.uint64]

    def __len__(self) -> int:
        return len(self.vpns)

    @property
    def kinds(self) -> NDArray[np.uint8]:
        return pte_kind_array(self.entries)

    @property
    def pfns(self) -> NDArray[np.int64]:
        return pte_pfn_array(self.entries)

    @property
    def pages(self) -> NDArray[np.int64]:
        return np.int64(1) << np.array(LEVEL_ORDER, dtype=np.int64)[self.levels]

    def select(self, mask: NDArray[np.bool_]) -> EntrySlots:
        return EntrySlots(self.vpns[mask], self.locs[mask], self.levels[mask], self.entries[mask])


CHUNK_NONE: Final = 0
CHUNK_TABLE: Final = 1
CHUNK_PMD: Final = 2
CHUNK_PUD: Final = 3
#: The level of the entry that maps a chunk's pages, by chunk kind.
_CHUNK_LEVEL: Final = (LEVEL_PTE, LEVEL_PTE, LEVEL_PMD, LEVEL_PUD)


@attrs.define(eq=False)
class Walk:
    """A snapshot of the entries that map ``npages`` pages from ``vpn``.

    ``entries[i]`` is the entry that maps page ``vpn + i``: a PTE, or the PMD/
    PUD entry for pages under a huge leaf (repeated for every page it covers).
    ``loc[i]`` is that entry's flat index in the pool (-1 when the table that
    would hold it does not exist) and ``level[i]`` its level.

    The per-2 MiB-chunk arrays say how each chunk is mapped: ``chunk_kind``
    (``CHUNK_NONE``: no table, ``CHUNK_TABLE``: a PTE table, ``CHUNK_PMD``/
    ``CHUNK_PUD``: a PMD/PUD entry), ``chunk_table`` (the PTE table index),
    ``chunk_loc`` (where the PMD/PUD entry lives) and ``chunk_entry`` (that
    entry).
    """

    vpn: int
    npages: int
    entries: NDArray[np.uint64]
    chunk_kind: NDArray[np.int8]
    chunk_table: NDArray[np.int64]
    chunk_loc: NDArray[np.int64]
    chunk_entry: NDArray[np.uint64]

    @property
    def first_chunk_vpn(self) -> int:
        return self.vpn & ~(PTRS_PER_TABLE - 1)

    def _expand(self, per_chunk: NDArray[np.generic]) -> NDArray[np.generic]:
        off = self.vpn & (PTRS_PER_TABLE - 1)
        return np.repeat(per_chunk, PTRS_PER_TABLE)[off : off + self.npages]

    @property
    def huge(self) -> bool:
        """Some page of the range is mapped by a PMD or PUD entry."""
        if len(self.chunk_kind) == 1:
            return int(self.chunk_kind[0]) >= CHUNK_PMD
        return bool((self.chunk_kind >= CHUNK_PMD).any())

    @property
    def level(self) -> NDArray[np.int8]:
        ck = self.chunk_kind
        if len(ck) == 1:  # one chunk (the usual small walk): one level
            return np.full(self.npages, _CHUNK_LEVEL[int(ck[0])], dtype=np.int8)
        lvl = np.where(ck == CHUNK_PUD, LEVEL_PUD, np.where(ck == CHUNK_PMD, LEVEL_PMD, 0))
        return self._expand(lvl.astype(np.int8))  # type: ignore[return-value]

    @property
    def order(self) -> NDArray[np.uint8]:
        """CPU mapping order of each page: 0 (PTE), 9 (PMD) or 18 (PUD)."""
        ck = self.chunk_kind
        if len(ck) == 1:
            return np.full(self.npages, LEVEL_ORDER[_CHUNK_LEVEL[int(ck[0])]], dtype=np.uint8)
        lvl = np.where(ck == CHUNK_PUD, PUD_ORDER, np.where(ck == CHUNK_PMD, PMD_ORDER, 0))
        return self._expand(lvl.astype(np.uint8))  # type: ignore[return-value]

    @property
    def loc(self) -> NDArray[np.int64]:
        ck = self.chunk_kind
        if len(ck) == 1:
            kind = int(ck[0])
            if kind == CHUNK_TABLE:
                first = int(self.chunk_table[0]) * PTRS_PER_TABLE + (self.vpn & 511)
                return np.arange(first, first + self.npages, dtype=np.int64)
            loc = int(self.chunk_loc[0]) if kind >= CHUNK_PMD else -1
            return np.full(self.npages, loc, dtype=np.int64)
        loc2d = np.full((len(ck), PTRS_PER_TABLE), -1, dtype=np.int64)
        tab = ck == CHUNK_TABLE
        if tab.any():
            loc2d[tab] = self.chunk_table[tab][:, None] * PTRS_PER_TABLE + np.arange(
                PTRS_PER_TABLE, dtype=np.int64
            )
        leaf = ck >= CHUNK_PMD
        if leaf.any():
            loc2d[leaf] = self.chunk_loc[leaf][:, None]
        off = self.vpn & (PTRS_PER_TABLE - 1)
        return loc2d.reshape(-1)[off : off + self.npages]

    @property
    def kinds(self) -> NDArray[np.uint8]:
        return pte_kind_array(self.entries)

    def pfns(self) -> NDArray[np.int64]:
        """pfn (or softleaf offset) per page, with the offset inside huge leaves added."""
        base = pte_pfn_array(self.entries)
        if len(self.chunk_kind) == 1 and int(self.chunk_kind[0]) >= CHUNK_PMD:
            nr = 1 << LEVEL_ORDER[_CHUNK_LEVEL[int(self.chunk_kind[0])]]
            first = self.vpn & (nr - 1)
            return base + np.arange(first, first + self.npages, dtype=np.int64)
        if self.huge:
            vpns = np.arange(self.vpn, self.vpn + self.npages, dtype=np.int64)
            order = self.order.astype(np.int64)
            base = base + (vpns & ((np.int64(1) << order) - 1))
        return base

    def slots(self) -> EntrySlots:
        """Every distinct non-none entry of the range, in address order.

        A PTE appears once per page, a huge leaf once (with the first page it
        maps, which may lie before ``vpn``).
        """
        tab_pages = self._expand(self.chunk_kind == CHUNK_TABLE)
        idx = (
            np.flatnonzero(tab_pages & (self.entries != 0))
            if not bool((self.chunk_kind == CHUNK_TABLE).all())
            else np.flatnonzero(self.entries != 0)
        )
        vpns = self.vpn + idx.astype(np.int64)
        chunk = (vpns >> PMD_ORDER) - (self.vpn >> PMD_ORDER)
        locs = self.chunk_table[chunk] * PTRS_PER_TABLE + (vpns & (PTRS_PER_TABLE - 1))
        entries = self.entries[idx]
        levels = np.zeros(len(idx), dtype=np.int8)
        leaves = self.leaves()
        if leaves:
            lv = np.array([x[0] for x in leaves], dtype=np.int64)
            vpns = np.concatenate([vpns, lv])
            levels = np.concatenate([levels, np.array([x[1] for x in leaves], dtype=np.int8)])
            locs = np.concatenate([locs, np.array([x[2] for x in leaves], dtype=np.int64)])
            entries = np.concatenate([entries, np.array([x[3] for x in leaves], dtype=U64)])
            order = np.argsort(vpns, kind="stable")
            vpns, levels, locs, entries = vpns[order], levels[order], locs[order], entries[order]
        return EntrySlots(vpns, locs, levels, entries)

    def leaves(self) -> list[tuple[int, int, int, int]]:
        """Each distinct huge entry: (first vpn it maps, level, loc, entry)."""
        out = []
        seen = set()
        c0 = self.vpn >> PMD_ORDER
        for i in np.flatnonzero(self.chunk_kind >= CHUNK_PMD).tolist():
            loc = int(self.chunk_loc[i])
            if loc in seen:
                continue
            seen.add(loc)
            level = LEVEL_PUD if self.chunk_kind[i] == CHUNK_PUD else LEVEL_PMD
            nr = PUD_PAGES if level == LEVEL_PUD else PMD_PAGES
            out.append((((c0 + i) << PMD_ORDER) & ~(nr - 1), level, loc, int(self.chunk_entry[i])))
        return out


class PageTable:
    """One mm's page tables: a pool of 512-entry tables, the PGD at row 0."""

    def __init__(self, capacity: int = 16) -> None:
        # Small to start (an mm with a few mappings needs 4 tables per region);
        # the pool doubles as tables are needed.
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
            raise KernelBug("the PGD is never freed")
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
            self.flat[loc] = make_table_pointer(t)
            return t
        if is_table_pointer(e):
            return pte_pfn(e)
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

    def pmd_locs(self, vpns: NDArray[np.int64]) -> NDArray[np.int64]:
        """Flat indices of the PMD entries covering ``vpns``, allocating upper tables.

        One Python step per 1 GiB region, not per 2 MiB.
        """
        out = np.empty(len(vpns), dtype=np.int64)
        regions = vpns >> PUD_ORDER
        for region in np.unique(regions).tolist():
            sel = regions == region
            pudloc = self.pud_loc(region << PUD_ORDER, alloc=True)
            t = self._child(pudloc, alloc=True)
            if t < 0:
                raise KernelBug(f"vpn {region << PUD_ORDER:#x} lies under a PUD leaf")
            out[sel] = t * PTRS_PER_TABLE + ((vpns[sel] >> PMD_ORDER) & 511)
        return out

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
        pmdloc = pte_pfn(e) * PTRS_PER_TABLE + ((vpn >> 9) & 511)
        e = int(self.flat[pmdloc])
        if e and not is_table_pointer(e):
            return pmdloc, e, LEVEL_PMD
        if not e:
            return -1, 0, LEVEL_PTE
        loc = pte_pfn(e) * PTRS_PER_TABLE + (vpn & 511)
        return loc, int(self.flat[loc]), LEVEL_PTE

    def get(self, loc: int) -> int:
        return int(self.flat[loc])

    def set(self, loc: int, entry: int) -> None:
        self.flat[loc] = entry

    # ----- range operations --------------------------------------------------
    def walk(self, vpn: int, npages: int, *, per_page: bool = True) -> Walk:
        """Snapshot the entries mapping [vpn, vpn + npages): one gather per level.

        With ``per_page=False`` only the per-chunk arrays are filled (the
        per-page ``entries`` array stays empty), for callers that can decide
        from whole 2 MiB chunks.
        """
        if npages <= 0:
            raise KernelBug("empty walk")
        c0 = vpn >> PMD_ORDER
        c1 = (vpn + npages - 1) >> PMD_ORDER
        if c0 == c1:
            return self._walk_one_chunk(vpn, npages, per_page)
        nc = c1 - c0 + 1
        ckind = np.zeros(nc, dtype=np.int8)
        ctable = np.zeros(nc, dtype=np.int64)
        cloc = np.full(nc, -1, dtype=np.int64)
        centry = np.zeros(nc, dtype=U64)
        flat = self.flat
        c = c0
        while c <= c1:
            g_last = min(c1, c | 511)
            sl = slice(c - c0, g_last - c0 + 1)
            pudloc = self.pud_loc(c << PMD_ORDER)
            if pudloc >= 0:
                pude = int(flat[pudloc])
                if pude != 0 and is_table_pointer(pude):
                    locs = pte_pfn(pude) * PTRS_PER_TABLE + np.arange(
                        c & 511, (g_last & 511) + 1, dtype=np.int64
                    )
                    pmde = flat[locs]
                    tab = (pmde & U64(PTE_PRESENT | PTE_HUGE)) == U64(PTE_PRESENT)
                    leaf = (pmde != 0) & ~tab
                    ckind[sl] = np.where(tab, CHUNK_TABLE, np.where(leaf, CHUNK_PMD, CHUNK_NONE))
                    ctable[sl] = np.where(tab, (pmde & U64(PTE_PFN_MASK)).astype(np.int64), 0)
                    centry[sl] = np.where(leaf, pmde, U64(0))
                    cloc[sl] = locs
                elif pude != 0:
                    ckind[sl] = CHUNK_PUD
                    centry[sl] = pude
                    cloc[sl] = pudloc
            c = g_last + 1
        off = vpn & 511
        tab = ckind == CHUNK_TABLE
        if not per_page:
            return Walk(vpn, npages, np.empty(0, dtype=U64), ckind, ctable, cloc, centry)
        if bool(tab.all()):
            entries2d = self.rows[ctable]
        else:
            entries2d = np.zeros((nc, PTRS_PER_TABLE), dtype=U64)
            if tab.any():
                entries2d[tab] = self.rows[ctable[tab]]
            leaf = ckind >= CHUNK_PMD
            if leaf.any():
                entries2d[leaf] = centry[leaf][:, None]
        entries = entries2d.reshape(-1)[off : off + npages]
        return Walk(vpn, npages, entries, ckind, ctable, cloc, centry)

    def _walk_one_chunk(self, vpn: int, npages: int, per_page: bool) -> Walk:
        """``walk`` of a range inside one 2 MiB chunk: scalar descent, one slice.

        Most walks (fault windows, races, small buffers) are this case, where
        the general path's per-level array set-up would cost more than the walk.
        """
        kind, table, loc, entry = self._chunk(vpn)
        ckind = np.array([kind], dtype=np.int8)
        ctable = np.array([table], dtype=np.int64)
        cloc = np.array([loc], dtype=np.int64)
        centry = np.array([entry], dtype=U64)
        if not per_page:
            entries = np.empty(0, dtype=U64)
        elif kind == CHUNK_TABLE:
            off = vpn & 511
            entries = self.rows[table, off : off + npages].copy()
        else:
            entries = np.full(npages, entry, dtype=U64)
        return Walk(vpn, npages, entries, ckind, ctable, cloc, centry)

    def _chunk(self, vpn: int) -> tuple[int, int, int, int]:
        """How the 2 MiB chunk holding ``vpn`` is mapped, as ``Walk``'s per-chunk
        fields: (kind, PTE table index, loc of the PMD/PUD entry, that entry)."""
        flat = self.flat
        kind, table, loc, entry = CHUNK_NONE, 0, -1, 0
        pudloc = self.pud_loc(vpn)
        if pudloc >= 0:
            pude = int(flat[pudloc])
            if pude != 0 and is_table_pointer(pude):
                loc = pte_pfn(pude) * PTRS_PER_TABLE + ((vpn >> PMD_ORDER) & 511)
                pmde = int(flat[loc])
                if pmde != 0 and is_table_pointer(pmde):
                    kind, table = CHUNK_TABLE, pte_pfn(pmde)
                elif pmde != 0:
                    kind, entry = CHUNK_PMD, pmde
            elif pude != 0:
                kind, entry, loc = CHUNK_PUD, pude, pudloc
        return kind, table, loc, entry

    def signature(self, vpn: int, npages: int) -> bytes:
        """A byte string that changes whenever an entry mapping [vpn, vpn +
        npages) changes (its value or the level that maps it): a cheap test
        for "did anything here change" between two moments."""
        if vpn >> PMD_ORDER != (vpn + npages - 1) >> PMD_ORDER:
            walk = self.walk(vpn, npages)
            return walk.entries.tobytes() + walk.chunk_kind.tobytes()
        kind, table, _, entry = self._chunk(vpn)
        if kind == CHUNK_TABLE:
            off = vpn & 511
            return bytes([kind]) + self.rows[table, off : off + npages].tobytes()
        return bytes([kind]) + entry.to_bytes(8, "little")

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
                raise KernelBug(f"vpn {c << PMD_ORDER:#x} lies under a huge leaf")
            tables[i] = t
        off = vpn & 511
        loc2d = tables[:, None] * PTRS_PER_TABLE + np.arange(PTRS_PER_TABLE, dtype=np.int64)
        return loc2d.reshape(-1)[off : off + npages]

    def ensure_pte_locs(self, vpns: NDArray[np.int64]) -> NDArray[np.int64]:
        """Flat indices of the PTEs of arbitrary pages ``vpns``, allocating tables."""
        chunks = vpns >> PMD_ORDER
        if len(chunks) > 1 and bool((chunks[1:] >= chunks[:-1]).all()):
            # Sorted input (the usual case): run boundaries instead of a sort.
            starts = np.flatnonzero(chunks[1:] != chunks[:-1]) + 1
            uniq = np.concatenate([chunks[:1], chunks[starts]])
            inverse = np.repeat(
                np.arange(len(uniq)), np.diff(np.concatenate([[0], starts, [len(chunks)]]))
            )
        else:
            uniq, inverse = np.unique(chunks, return_inverse=True)
        tables = np.array(
            [self.pte_table(int(c) << PMD_ORDER, alloc=True) for c in uniq], dtype=np.int64
        )
        if (tables < 0).any():
            raise KernelBug("a page lies under a huge leaf")
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
                t = pte_pfn(e)
                if not self.rows[t].any():
                    self.flat[pmdloc] = 0
                    self.free_table(t)
                    freed += 1
        return freed

    def free_tables(self, vpn: int, end: int, floor: int, ceiling: int) -> int:
        """``free_pgd_range``: free the tables that served only [floor, ceiling).

        Frees every PTE, PMD and PUD table that maps some page of [vpn, end)
        and no page outside [floor, ceiling) (the gap between the VMAs that
        remain around an unmapped range), provided it holds no entry any more.
        Only tables that exist are visited, so the cost follows what was
        mapped, not the length of the range. Returns the number freed.
        """
        if end <= vpn:
            return 0
        return self._free_below(0, 0, 39 - PAGE_SHIFT, vpn, end, floor, ceiling)

    def _free_below(
        self, table: int, base: int, shift: int, vpn: int, end: int, floor: int, ceiling: int
    ) -> int:
        """Free the child tables of ``table`` (entries span ``1 << shift`` pages)."""
        span = 1 << shift
        first = max(0, (vpn - base) >> shift)
        last = min(PTRS_PER_TABLE - 1, (end - 1 - base) >> shift)
        if first > last:
            return 0
        row = self.rows[table, first : last + 1]
        pointers = np.flatnonzero((row & U64(PTE_PRESENT | PTE_HUGE)) == U64(PTE_PRESENT))
        freed = 0
        for i in (pointers + first).tolist():
            lo = base + (i << shift)
            child = pte_pfn(int(self.rows[table, i]))
            if shift > PMD_ORDER:
                freed += self._free_below(child, lo, shift - 9, vpn, end, floor, ceiling)
            if floor <= lo and lo + span <= ceiling and not self.rows[child].any():
                self.rows[table, i] = 0
                self.free_table(child)
                freed += 1
        return freed

    def spans(self, vpn: int, end: int) -> list[tuple[int, int]]:
        """The parts of [vpn, end) under a non-empty PUD entry, as merged [lo, hi).

        Walking these instead of the whole range keeps the cost of a sparse
        or empty range proportional to the 1 GiB regions that hold tables.
        """
        out: list[tuple[int, int]] = []
        if end <= vpn:
            return out
        g_first = vpn >> 27
        g_last = min(PTRS_PER_TABLE - 1, (end - 1) >> 27)
        pgd = self.rows[0]
        for g in (np.flatnonzero(pgd[g_first : g_last + 1]) + g_first).tolist():
            pud_t = pte_pfn(int(pgd[g]))
            base = g << 27
            first = max(0, (vpn - base) >> PUD_ORDER)
            last = min(PTRS_PER_TABLE - 1, (end - 1 - base) >> PUD_ORDER)
            for i in (np.flatnonzero(self.rows[pud_t, first : last + 1]) + first).tolist():
                lo = max(vpn, base + (i << PUD_ORDER))
                hi = min(end, base + ((i + 1) << PUD_ORDER))
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
        return out
