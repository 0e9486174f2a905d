"""Observation: cgroup and /proc readers, the sampler, faults and the metrics endpoint.

``cgroupstats`` and ``procscan`` parse the kernel's files (through
``nsd.kerneltext``'s one decode policy), ``sampler`` takes periodic snapshots,
``faults`` and ``faultwatch`` notice limit hits as they happen, and ``metrics``
serves Prometheus (``catalogue``, ``collectors``, ``exposition``, ``http``,
``access`` for who may read it).
"""
