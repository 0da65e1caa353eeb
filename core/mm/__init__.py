"""The CPU side of the memory model: physical memory, page tables, VMAs, faults.

Each module models one part of Linux mm/; see its docstring for the kernel
counterpart.
"""
